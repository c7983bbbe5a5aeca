"""Ray Train loops (TorchTrainer + DeepSpeed ZeRO) for the IDM and the world model.

One loop serves both models: each model class gives `collate` (Ray Data numpy batch → tensors),
`training_module()` (an nn.Module whose forward returns the loss) and `save(dir)` (a directory the
model loads back by path). The loop reads as named steps: build → restore → for each batch:
forward, backward, step → log / validate / checkpoint. Distribution lives here, never in the models.

Checkpoints hold `model/` (safetensors, loadable by path), the engine's state (DeepSpeed's: weights,
optimizer, LR schedule; or, for DDP, `ddp_state.pt` with the same three), each rank's RNG states and
`state.json` with the step and the position in the epoch; every worker reports into the same checkpoint
directory, as Ray Train merges them. A restarted worker group or a re-run with the same name resumes from
the latest checkpoint and finishes at exactly `optim.max_steps`, with the weights an uninterrupted run
would have had (same data order, same random draws; `test_train.py::test_ddp_resume_*`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.train
import torch
from ray.train import Checkpoint, CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from cwm_ray import storage, tracking
from cwm_ray.config import TrainIDMConfig, TrainWorldModelConfig, accumulation_steps, to_dict
from cwm_ray.data import LOAD_TASK_CPUS, training_sets
from cwm_ray.preflight import check_job_fits
from cwm_ray.recognition import fade_to_uniform

TrainConfig = TrainIDMConfig | TrainWorldModelConfig
STATE_FILE = "state.json"
MODEL_DIR = "model"
MANIFEST = "manifest.rank{rank}.json"
ENGINE_TAG = "engine"
DDP_STATE = "ddp_state.pt"
RNG_STATE = "rng.rank{rank}.pt"
MODEL_INFO = "cwm_ray_model.json"
"""In every checkpoint's `model/` and so in every export: `model_info` of the job that wrote it."""


def build_model(cfg: TrainConfig) -> Any:
    """The model wrapper (IDM or world model) for this job, loaded or freshly built (`toy`)."""
    if isinstance(cfg, TrainIDMConfig):
        from cwm_ray.idm import InverseDynamicsModel

        return InverseDynamicsModel.load(cfg.idm)
    from cwm_ray.world_model import load_world_model

    return load_world_model(cfg.world_model, cfg.recognition)


def model_info(cfg: TrainConfig) -> dict[str, Any]:
    """The kind of model this job trains, and a fingerprint of the settings that decide its state-dict layout.

    A checkpoint of another layout cannot be resumed (torch fails deep inside a worker with "Error(s) in loading
    state_dict"), and an export must not silently replace a model of another kind. The layout is the base model,
    the backend, LoRA on or off (with its rank and targets) and which weights train (the optimizer's state follows
    them); the optimizer's settings are left out, as a resume may change them.
    """
    if isinstance(cfg, TrainIDMConfig):
        m: Any = cfg.idm
        kind, backend, layout = "idm", None, {"model": m.model, "adapter": m.adapter}
    else:
        m = cfg.world_model
        kind, backend, layout = "world_model", m.backend, {"backend": m.backend, "model": m.model, "adapter": m.adapter}
        if m.backend == "diffusion":
            layout["train_text_encoder"] = m.train_text_encoder and not m.lora.enabled
    layout["lora"] = {"r": m.lora.r, "target_modules": sorted(m.lora.target_modules)} if m.lora.enabled else None
    if m.lora.enabled and m.lora.modules_to_save:  # only when set, so existing runs keep their fingerprint
        layout["lora"]["modules_to_save"] = sorted(m.lora.modules_to_save)
    fingerprint = hashlib.sha256(json.dumps(layout, sort_keys=True).encode()).hexdigest()[:16]
    return {"kind": kind, "backend": backend, "fingerprint": fingerprint, "layout": layout}


def recipe(cfg: TrainConfig) -> dict[str, Any]:
    """What a resumed run must not change under its checkpoints: the world model's loss (recognition weighting).

    Why: the weighted and unweighted world models are the paper's ablation rows (b) and (c), one flag apart
    (`recognition.enabled`); a run of one resumed under the other's `train.name` would silently be neither.
    """
    if isinstance(cfg, TrainIDMConfig):
        return {}
    r = cfg.recognition
    return {"recognition": {"enabled": r.enabled, "floor": r.floor, "uniform_by": r.uniform_by}}


def kind_name(info: dict[str, Any]) -> str:
    if info.get("kind") == "idm":
        return "IDM"
    if info.get("kind") == "world_model":
        return f"{info.get('backend')} world model"
    return "model of unknown kind"


def _same_kind(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return (a.get("kind"), a.get("backend")) == (b.get("kind"), b.get("backend"))


def stored_model_info(directory: str) -> dict[str, Any] | None:
    """The kind of the model in `directory` (local or s3://); None when there is none (missing or empty).

    Its MODEL_INFO when there is one; else (a model exported before MODEL_INFO existed, or from elsewhere) told
    from the files each kind saves, and `{"kind": "unknown"}` when they do not tell.
    """
    if not storage.exists(directory):
        return None
    info_file = storage.join(directory, MODEL_INFO)
    if storage.exists(info_file):
        return storage.read_json(info_file)
    prefix = directory.rstrip("/") + "/"
    files = {f[len(prefix):] if f.startswith(prefix) else f for f in storage.list_files(directory)}
    if not files:
        return None
    if "model_index.json" in files or "pytorch_lora_weights.safetensors" in files \
            or any(f.startswith("unet/") for f in files):
        return {"kind": "world_model", "backend": "diffusion"}
    if "config.json" in files:
        model_type = str(storage.read_json(storage.join(directory, "config.json")).get("model_type", ""))
        return {"kind": "world_model", "backend": "token"} if "janus" in model_type else {"kind": "idm"}
    # A bare peft adapter without MODEL_INFO is the token backend's (an IDM adapter, `idm.lora_export: adapter`,
    # is only written by train_idm, with MODEL_INFO)
    if "adapter_config.json" in files:
        return {"kind": "world_model", "backend": "token"}
    return {"kind": "unknown"}


def check_run_kind(cfg: TrainConfig, info: dict[str, Any]) -> None:
    """Refuse, in the driver, to resume a run whose checkpoints hold another kind or layout of model.

    Ray Train resumes a run of the same name from its latest checkpoint whatever the config says; loading another
    model's state fails inside a worker with torch's bare state-dict error, after the cluster has started.
    """
    run_dir = storage.join(cfg.train.storage_path, cfg.train.name)
    if not storage.is_dir(run_dir):
        return
    prefix = run_dir.rstrip("/") + "/"
    for state_file in storage.list_files(run_dir):
        rel = state_file[len(prefix):] if state_file.startswith(prefix) else state_file
        parts = rel.split("/")
        if len(parts) != 2 or parts[1] != STATE_FILE:
            continue
        checkpoint = storage.join(run_dir, parts[0])
        try:
            saved_state = storage.read_json(state_file)
            saved = saved_state.get("model") or stored_model_info(storage.join(checkpoint, MODEL_DIR))
        except ValueError:
            continue  # a corrupt checkpoint: `verify_checkpoint` refuses it with its own message
        if saved_state.get("recipe", recipe(cfg)) != recipe(cfg):
            raise ValueError(
                f"run directory {run_dir} holds a checkpoint ({checkpoint}) trained with {saved_state['recipe']}, "
                f"but this job asks for {recipe(cfg)}: a resume would mix the two. Give this variant its own "
                f"train.name=<name> and train.export=<directory>, or delete {run_dir} to start this one over."
            )
        if not saved or saved.get("kind") == "unknown":
            continue
        if _same_kind(saved, info) and saved.get("fingerprint", info["fingerprint"]) == info["fingerprint"]:
            continue
        what = kind_name(saved) + (f" {saved['layout']}" if "layout" in saved else "")
        raise ValueError(
            f"run directory {run_dir} holds a checkpoint of a {what} ({checkpoint}), but this job trains a "
            f"{kind_name(info)} {info['layout']}: a resume could not load it. Start a new run with "
            f"train.name=<new name>, or delete {run_dir} to start this one over."
        )


def check_export(cfg: TrainConfig, info: dict[str, Any]) -> None:
    """Refuse, before training, an export that would replace a model of another kind (`train.overwrite_export`)."""
    existing = stored_model_info(cfg.train.export)
    if existing is None or _same_kind(existing, info) or cfg.train.overwrite_export:
        return
    raise ValueError(
        f"train.export={cfg.train.export} holds a {kind_name(existing)}, which this job's {kind_name(info)} would "
        f"replace: export elsewhere with train.export=<directory>, or set train.overwrite_export=true to replace it."
    )


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _deepspeed_config(cfg: TrainConfig) -> dict[str, Any]:
    return {
        "train_micro_batch_size_per_gpu": cfg.optim.batch_size,
        "gradient_accumulation_steps": accumulation_steps(cfg.optim, cfg.scaling),
        "gradient_clipping": cfg.deepspeed.gradient_clipping,
        "zero_optimization": {"stage": cfg.deepspeed.zero_stage},
        "bf16": {"enabled": bool(cfg.deepspeed.bf16 and cfg.scaling.use_gpu)},
        # Our optimizer is torch's AdamW (DeepSpeed's fused ones need CUDA); ZeRO-2 handles it fine.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


@dataclass
class _Engine:
    """The minimal surface the loop needs, over a DeepSpeed engine or a plain DDP module."""

    module: Any
    optimizer: Any
    scheduler: Any
    deepspeed: bool
    autocast_cpu: bool = False
    """`deepspeed.bf16_cpu` on a CPU run: the forward pass (training and validation) in bf16 autocast."""
    clip: float = 0.0
    """Gradient-norm clipping for the DDP path (DeepSpeed clips by its own config)."""
    accumulation: int = 1
    """Micro-batches per optimizer step (`accumulation_steps`); DeepSpeed is told it in its config."""
    micro: int = 0
    """Micro-batches stepped so far by the DDP path (DeepSpeed counts its own)."""

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast_cpu):
            return self.module(**batch)

    def step(self, loss: torch.Tensor) -> bool:
        """Backward of one micro-batch's mean loss; the optimizer (and the LR schedule) steps after every
        `accumulation`-th. Returns whether it stepped. The gradient of an accumulated step is the mean over its
        micro-batches: the gradient of one batch `accumulation` times the size, as a larger worker count gives."""
        if self.deepspeed:
            boundary = self.module.is_gradient_accumulation_boundary()
            self.module.backward(loss)  # scaled by 1 / gradient_accumulation_steps
            self.module.step()  # the optimizer, the LR schedule and clipping only at the boundary
            return boundary
        self.micro += 1
        boundary = self.micro % self.accumulation == 0
        if self.micro % self.accumulation == 1 or self.accumulation == 1:
            self.optimizer.zero_grad(set_to_none=True)
        # DDP all-reduces gradients on every backward unless told not to: only the window's last one syncs.
        no_sync = getattr(self.module, "no_sync", None)
        with contextlib.nullcontext() if boundary or no_sync is None else no_sync():
            (loss / self.accumulation).backward()
        if not boundary:
            return False
        if self.clip > 0:
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.clip)
        self.optimizer.step()
        self.scheduler.step()
        return True

    def save(self, directory: str) -> None:
        if self.deepspeed:
            self.module.save_checkpoint(directory, tag=ENGINE_TAG)  # a collective: every rank calls it
        elif ray.train.get_context().get_world_rank() == 0:
            # DDP keeps every rank's replica identical, so rank 0's copy is the state. The training module's own
            # state dict (not `model/`, which is the export format: merged or adapter-only) loads back exactly.
            torch.save({"model": _unwrap(self.module).state_dict(), "optimizer": self.optimizer.state_dict(),
                        "scheduler": self.scheduler.state_dict()}, os.path.join(directory, DDP_STATE))

    def load(self, directory: str) -> None:
        """Weights, optimizer and schedule, as `save` wrote them (DeepSpeed's `load_checkpoint` does all three)."""
        if self.deepspeed:
            path, _ = self.module.load_checkpoint(directory, tag=ENGINE_TAG)
            if path is None:
                raise RuntimeError(f"checkpoint {directory} has no DeepSpeed engine state")
            return
        file = os.path.join(directory, DDP_STATE)
        if not os.path.exists(file):
            raise RuntimeError(f"checkpoint {directory} has no {DDP_STATE} (it was not written by DDP, or by a version "
                               "that did not save the weights): resume it with the engine that wrote it, or start "
                               "a new run with train.name=<new name>")
        state = torch.load(file, weights_only=True)
        _unwrap(self.module).load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


def _rng_state() -> dict[str, Any]:
    """This process's random states (Python, NumPy, torch CPU and CUDA): dropout, noise and timestep draws."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": random.getstate(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss,
                                                   cached],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


SCHEDULES = {"cosine": "cosine", "constant": "constant_with_warmup"}
"""`optim.schedule` → transformers' `get_scheduler` name (after `optim.warmup_steps` of linear warm-up)."""


def check_optim(cfg: TrainConfig) -> None:
    """The optimizer and schedule settings, checked before Ray starts (else they fail inside a worker)."""
    o = cfg.optim
    if o.schedule not in SCHEDULES:
        raise ValueError(f"optim.schedule must be one of {sorted(SCHEDULES)}, got {o.schedule!r}")
    for name, beta in (("adam_beta1", o.adam_beta1), ("adam_beta2", o.adam_beta2)):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"optim.{name} must be in [0, 1), got {beta}")
    if not o.adam_epsilon > 0:
        raise ValueError(f"optim.adam_epsilon must be positive, got {o.adam_epsilon}")


def build_optimizer(cfg: TrainConfig, params: list[torch.nn.Parameter]) -> torch.optim.AdamW:
    """torch's AdamW from `cfg.optim` (DeepSpeed's fused optimizers need CUDA; ZeRO wraps this one)."""
    check_optim(cfg)
    o = cfg.optim
    return torch.optim.AdamW(params, lr=o.lr, betas=(o.adam_beta1, o.adam_beta2), eps=o.adam_epsilon,
                             weight_decay=o.weight_decay)


def build_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer) -> Any:
    """`optim.warmup_steps` of linear warm-up, then `optim.schedule`, over `optim.max_steps`.

    transformers is imported here, on the worker, not with this module: its optimization module imports peft and
    the modeling code (2.4 s of CPU), which the driver and Ray Train's controller, which also import this module
    (the controller unpickles `train_func`), never use.
    """
    from transformers import get_scheduler

    return get_scheduler(SCHEDULES[cfg.optim.schedule], optimizer, num_warmup_steps=cfg.optim.warmup_steps,
                         num_training_steps=cfg.optim.max_steps)


def _make_engine(cfg: TrainConfig, module: torch.nn.Module, device: torch.device) -> _Engine:
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    optimizer = build_optimizer(cfg, params)  # also checks optim.schedule
    autocast_cpu = cfg.deepspeed.bf16_cpu and device.type == "cpu"
    scheduler = build_scheduler(cfg, optimizer)
    if cfg.deepspeed.enabled:
        import deepspeed

        engine, optimizer, _, scheduler = deepspeed.initialize(
            model=module, optimizer=optimizer, lr_scheduler=scheduler, config=_deepspeed_config(cfg),
            dist_init_required=False,
        )
        return _Engine(engine, optimizer, scheduler, True, autocast_cpu,
                       accumulation=accumulation_steps(cfg.optim, cfg.scaling))
    # Some weights of a pretrained model may take no part in the loss (LLaVA never uses its vision tower's
    # post_layernorm); DDP must be told, as transformers' Trainer does by default (ddp_find_unused_parameters).
    module = ray.train.torch.prepare_model(module, move_to_device=device,
                                           parallel_strategy_kwargs={"find_unused_parameters": True})
    return _Engine(module, optimizer, scheduler, False, autocast_cpu, cfg.deepspeed.gradient_clipping,
                   accumulation=accumulation_steps(cfg.optim, cfg.scaling))


def _unwrap(module: Any) -> torch.nn.Module:
    return module.module if hasattr(module, "module") else module


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _validate(engine: _Engine, model: Any, cfg: TrainConfig, device: torch.device) -> float | None:
    """Mean loss over this worker's validation shard, averaged across workers."""
    try:
        shard = ray.train.get_dataset_shard("val")
    except KeyError:
        return None
    total, count = torch.zeros(2), 0
    _unwrap(engine.module).eval()
    with torch.no_grad():
        for batch in shard.iter_batches(batch_size=cfg.optim.batch_size, batch_format="numpy"):
            n = len(batch["action"])
            total[0] += engine.loss(_to_device(model.collate(batch), device)).float().item() * n
            count += n
    _unwrap(engine.module).train()
    total[1] = count
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(total)
    return float(total[0] / total[1]) if total[1] > 0 else None


def _checkpoint(engine: _Engine, model: Any, state: dict[str, Any], metrics: dict[str, Any]) -> None:
    """Every rank writes its part into a temporary directory and reports it; Ray merges them.

    Each rank also writes `manifest.rank<r>.json` (size and sha256 of every file it wrote), and rank 0's
    `state.json` names the world size, so a resume can tell a complete checkpoint from a partial upload
    or a corrupted file (`verify_checkpoint`).
    """
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    with tempfile.TemporaryDirectory() as tmp:
        engine.save(tmp)
        torch.save(_rng_state(), os.path.join(tmp, RNG_STATE.format(rank=rank)))
        if rank == 0:
            model.save(os.path.join(tmp, MODEL_DIR))
            Path(tmp, MODEL_DIR, MODEL_INFO).write_text(json.dumps(state["model"]))
            Path(tmp, STATE_FILE).write_text(json.dumps(state | {"world_size": ctx.get_world_size()}, default=str))
        manifest = {str(f.relative_to(tmp)): [f.stat().st_size, _sha256(f)]
                    for f in sorted(Path(tmp).rglob("*")) if f.is_file()}
        Path(tmp, MANIFEST.format(rank=rank)).write_text(json.dumps(manifest))
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class CorruptCheckpoint(RuntimeError):
    """A checkpoint that is incomplete or whose files differ from what was written: never loaded."""


def verify_checkpoint(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """The checkpoint's state, after checking every rank's manifest against the files; else CorruptCheckpoint."""
    d = Path(directory)
    state_path = d / STATE_FILE
    if not state_path.exists():
        raise CorruptCheckpoint(f"checkpoint {d} is incomplete: no {STATE_FILE}")
    try:
        state = json.loads(state_path.read_text())
    except json.JSONDecodeError as exc:
        raise CorruptCheckpoint(f"checkpoint {d}: {STATE_FILE} is not valid JSON ({exc})") from None
    expected: dict[str, set[tuple[int, str]]] = {}
    for rank in range(int(state.get("world_size", 1))):
        manifest = d / MANIFEST.format(rank=rank)
        if not manifest.exists():
            raise CorruptCheckpoint(f"checkpoint {d} is incomplete: no {manifest.name}")
        for name, (size, digest) in json.loads(manifest.read_text()).items():
            expected.setdefault(name, set()).add((int(size), digest))
    for name, versions in sorted(expected.items()):
        f = d / name
        if not f.is_file():
            raise CorruptCheckpoint(f"checkpoint {d} is incomplete: {name} is missing")
        if f.stat().st_size not in {size for size, _ in versions} or _sha256(f) not in {h for _, h in versions}:
            raise CorruptCheckpoint(f"checkpoint {d} is corrupt: {name} differs from what was written")
    return state


def check_resumable(state: dict[str, Any], world_size: int, cfg: TrainConfig) -> None:
    """Refuse, with the way out, a resume whose worker count differs from the checkpoint's.

    ZeRO partitions the optimizer state over the data-parallel ranks and DeepSpeed cannot re-partition it
    (its own error names neither the run nor the fix); resuming the weights alone would silently drop the
    optimizer's moments.
    """
    saved = int(state.get("world_size", 1))
    if saved != world_size and cfg.deepspeed.enabled and cfg.deepspeed.zero_stage > 0:
        raise ValueError(
            f"run {cfg.train.name!r} under {cfg.train.storage_path} was checkpointed by {saved} worker(s) at step "
            f"{state.get('step')}, but this run has {world_size}: DeepSpeed ZeRO cannot re-partition its optimizer "
            f"state. Resume it with scaling.num_workers={saved}, or start a new run with train.name=<new name>."
        )


def train_func(config: dict[str, Any]) -> None:
    """Per-worker loop; everything comes from `config["cfg"]`, as in Ray's examples."""
    cfg: TrainConfig = config["cfg"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    threads = cfg.scaling.torch_threads or (os.cpu_count() or 1) // max(1, ctx.get_local_world_size())
    torch.set_num_threads(max(1, threads))
    _seed_everything(cfg.optim.seed + rank)
    device = ray.train.torch.get_device() if cfg.scaling.use_gpu else torch.device("cpu")

    # build
    model = config.get("build_model", build_model)(cfg)
    # The world model reads its LoRA settings from its own config; the IDM takes them here.
    module = (model.training_module(cfg.idm.lora) if isinstance(cfg, TrainIDMConfig)
              else model.training_module()).to(device)
    module.train()
    engine = _make_engine(cfg, module, device)

    # restore
    state: dict[str, Any] = {"step": 0, "history": [], "resumed_from": [], "model": model_info(cfg),
                             "recipe": recipe(cfg)}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = verify_checkpoint(d)
            check_resumable(state, world, cfg)
            engine.load(d)
            rng = Path(d, RNG_STATE.format(rank=rank))
            if rng.exists():  # absent when resuming on more workers than wrote it: those ranks keep their seed
                _set_rng_state(torch.load(rng, weights_only=True))
        state["resumed_from"].append(state["step"])
        state["model"] = model_info(cfg)  # a checkpoint written before MODEL_INFO has none; the driver checked it
        if rank == 0:
            print(f"[train] resumed from checkpoint at step {state['step']}", flush=True)
    step = state["step"]

    # track: an MLflow run through Ray's setup_mlflow (rank 0 only; a resume continues the same run)
    tracker = None
    if cfg.tracking.enabled:
        tracker = tracking.start(cfg.tracking, cfg.train.name, to_dict(cfg),
                                 run_id=state.get("mlflow_run_id") if rank == 0 else None,
                                 tags={"cwm_ray.job": f"train_{state['model']['kind']}"})
        if rank == 0:
            state["mlflow_run_id"] = tracker.active_run().info.run_id

    # loop
    shard = ray.train.get_dataset_shard("train")
    recognition = getattr(cfg, "recognition", None)  # world models only
    t_last, samples_since, loss_sum, loss_n, step_rows = time.perf_counter(), 0, 0.0, 0, 0
    # Where the checkpoint was in its epoch: the resumed run replays that epoch's order (same shuffle seed,
    # `preserve_order` ingest) and skips the batches it had already trained on. Ray Data's iterators keep no
    # position, so the skipped batches are read again, once.
    epoch, skip = state.get("epoch", 1) - 1, state.get("epoch_batches", 0)
    while step < cfg.optim.max_steps:
        epoch += 1
        batches = shard.iter_batches(batch_size=cfg.optim.batch_size, batch_format="numpy", drop_last=True,
                                     local_shuffle_buffer_size=cfg.data.shuffle_buffer or None,
                                     local_shuffle_seed=cfg.optim.seed + 1000 * epoch)
        got_batch, epoch_batches = False, 0
        for batch in batches:
            got_batch, epoch_batches = True, epoch_batches + 1
            if skip > 0:
                skip -= 1
                continue
            if cfg.train.fail_at_step is not None and step == cfg.train.fail_at_step and rank == 0 \
                    and checkpoint is None:
                print(f"[train] fault injection: worker dies at step {step}", flush=True)
                # The controller registers reported checkpoints asynchronously; wait until the latest one
                # is surely registered, so the injected death tests resuming rather than that race.
                time.sleep(5)
                os._exit(1)
            collated = model.collate(batch)
            if recognition is not None and collated.get("weights") is not None:
                collated["weights"] = fade_to_uniform(collated["weights"], recognition, step, cfg.optim.max_steps)
            loss = engine.loss(_to_device(collated, device))
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss is {loss.item()} at step {step}")
            stepped = engine.step(loss)
            samples_since += len(batch["action"]) * world
            loss_sum, loss_n, step_rows = loss_sum + loss.item(), loss_n + 1, step_rows + len(batch["action"])
            if not stepped:  # gradient accumulation: the optimizer steps after the window's last micro-batch
                continue
            step += 1
            # Rows behind this optimizer step, over all workers (each worker's micro-batches are alike in size).
            samples_per_step, step_rows = step_rows * world, 0
            last = step >= cfg.optim.max_steps
            if _every(step, cfg.train.log_every) or last:
                now = time.perf_counter()
                metrics: dict[str, Any] = {"step": step, "epoch": epoch, "loss": loss_sum / loss_n,
                                           "lr": float(engine.scheduler.get_last_lr()[0]),
                                           "samples_per_step": samples_per_step,
                                           "samples_per_s": samples_since / (now - t_last)}
                t_last, samples_since, loss_sum, loss_n = now, 0, 0.0, 0
                if _every(step, cfg.train.eval_every) or last:
                    metrics["val_loss"] = _validate(engine, model, cfg, device)
                state["history"].append(metrics)
                if rank == 0:
                    shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}
                    print(f"[train] {shown}", flush=True)
                if tracker is not None:  # the no-op module on ranks > 0
                    tracker.log_metrics(tracking.numeric(metrics), step=step)
                # Only a checkpoint is reported to Ray Train (with its metrics): Ray Train V2 keeps a report's metrics
                # only with its checkpoint, every report is a barrier over the workers, and a report comes back
                # only once the controller has taken the last one, which it polls for every 2 s
                # (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S). A metrics-only report per logged step cost each step about
                # 2 s; the logged metrics go to the log, MLflow and the checkpoint's history instead.
                if _every(step, cfg.train.checkpoint_every) or last:
                    state |= {"step": step, "epoch": epoch, "epoch_batches": epoch_batches}
                    _checkpoint(engine, model, state, metrics)
            if last:
                break
        if not got_batch:
            raise ValueError("the training shard is empty: fewer rows than one batch per worker")
    if tracker is not None:
        tracker.end_run()


def _run_config(cfg: TrainConfig) -> RunConfig:
    fs, path = storage.filesystem(cfg.train.storage_path, cfg.storage)
    return RunConfig(
        name=cfg.train.name,
        storage_path=path,
        storage_filesystem=fs,
        failure_config=FailureConfig(max_failures=cfg.train.max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.num_to_keep),
        worker_runtime_env={"env_vars": {k: v for k, v in os.environ.items()
                                         if k.startswith(("AWS_", "HF_", "CWM_RAY_", "MLFLOW_"))}},
    )


def global_batch_size(cfg: TrainConfig) -> int:
    """Rows per optimizer step over all workers: `optim.global_batch_size`, or workers × micro-batch without it."""
    return cfg.scaling.num_workers * cfg.optim.batch_size * accumulation_steps(cfg.optim, cfg.scaling)


def resolve_steps(cfg: TrainConfig, train_rows: int) -> TrainConfig:
    """The config with `optim.max_steps` = ceil(epochs × train_rows / global batch) when `optim.epochs` is set.

    Why in the driver: the step count decides the LR schedule (warm-up, cosine to 0 at max_steps), which every
    worker builds before its first batch, and a resume must finish at the same step; so it is fixed once from the
    data's size, and the resolved config (max_steps, epochs null) is what the workers and the checkpoints see.
    """
    if cfg.optim.epochs is None:
        return cfg
    batch = global_batch_size(cfg)
    steps = max(1, math.ceil(cfg.optim.epochs * train_rows / batch))
    accumulation = accumulation_steps(cfg.optim, cfg.scaling)
    print(f"[train] schedule: {cfg.optim.epochs:g} epochs x {train_rows} rows / global batch {batch} "
          f"({cfg.scaling.num_workers} workers x {cfg.optim.batch_size} x {accumulation} accumulated) = {steps} "
          f"steps", flush=True)
    return dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, epochs=None, max_steps=steps))


def _every(step: int, n: int) -> bool:
    """Every n-th step; n <= 0 means only at the end."""
    return n > 0 and step % n == 0


def _check_data_cpus(cfg: TrainConfig, fixed_cluster: bool) -> None:
    """Ray Data's read tasks need CPU beside the workers: if the workers take every CPU, the job hangs silently.

    Ray Data excludes the Train workers' resources from its budget, so on a cluster of fixed size (the
    private one `train` starts) that is an error; on a cluster we joined, an autoscaler may still add nodes.
    """
    if cfg.scaling.use_gpu:
        return
    total = float(ray.cluster_resources().get("CPU", 0.0))
    taken = cfg.scaling.num_workers * cfg.scaling.cpus_per_worker
    if total - taken >= LOAD_TASK_CPUS:
        return
    msg = (f"{cfg.scaling.num_workers} training worker(s) x {cfg.scaling.cpus_per_worker} CPU take {taken:g} of "
           f"the cluster's {total:g} CPUs, leaving none for Ray Data's read tasks, so training would wait "
           "forever for data: lower scaling.cpus_per_worker (torch threads are set by scaling.torch_threads)")
    if fixed_cluster:
        raise ValueError(msg)
    print(f"[train] warning: {msg} (unless the autoscaler adds CPU nodes)", flush=True)


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run the job; export the final `model/` to `cfg.train.export`. Returns a summary."""
    if cfg.deepspeed.enabled and cfg.deepspeed.zero_stage not in (0, 1, 2):
        raise ValueError(f"deepspeed.zero_stage must be 0, 1 or 2, got {cfg.deepspeed.zero_stage}")
    check_optim(cfg)
    storage.configure(cfg.storage)
    # Relative local model paths made absolute here: Ray Train's workers run in another directory.
    if isinstance(cfg, TrainIDMConfig):
        cfg = dataclasses.replace(cfg, idm=storage.with_local_paths(cfg.idm))
    else:
        cfg = dataclasses.replace(cfg, world_model=storage.with_local_paths(cfg.world_model))
    cfg = dataclasses.replace(cfg, tracking=tracking.resolve(cfg.tracking))  # one absolute URI for every worker
    info = model_info(cfg)
    check_run_kind(cfg, info)
    check_export(cfg, info)
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(runtime_env={"env_vars": {"RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}})
    check_job_fits(cfg)  # workers the cluster cannot hold, now or autoscaled: an error, not a wait without end
    _check_data_cpus(cfg, fixed_cluster=started_here)
    sets = training_sets(cfg.data, cfg.storage)
    epochs = cfg.optim.epochs
    cfg = resolve_steps(cfg, sets.train_rows)
    datasets = {"train": sets.train} | ({"val": sets.val} if sets.val is not None else {})
    resources = {"CPU": cfg.scaling.cpus_per_worker}
    if cfg.scaling.use_gpu:
        resources["GPU"] = cfg.scaling.gpus_per_worker
    # The training set in the same order on every run, so a resume replays exactly the batches an uninterrupted
    # run would have seen (Ray Data otherwise yields blocks as tasks finish); validation order does not matter.
    ingest = DataConfig.default_ingest_options()
    ingest.preserve_order = True
    trainer = TorchTrainer(
        train_func,
        train_loop_config={"cfg": cfg, "build_model": build_model},
        scaling_config=ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
                                     resources_per_worker=resources),
        run_config=_run_config(cfg),
        datasets=datasets,
        dataset_config=DataConfig(execution_options={"train": ingest}),
    )
    t0 = time.perf_counter()
    result = trainer.fit()
    seconds = time.perf_counter() - t0
    if result.error:
        raise result.error
    if result.checkpoint is None:
        raise RuntimeError("training finished without a checkpoint")
    with result.checkpoint.as_directory() as d:
        state = verify_checkpoint(d)
        export = cfg.train.export
        if storage.is_s3(export):
            storage.upload_dir(Path(d, MODEL_DIR), export, cfg.storage)
        else:
            import shutil

            shutil.rmtree(export, ignore_errors=True)
            shutil.copytree(Path(d, MODEL_DIR), export)
    summary = {"name": cfg.train.name, "steps": state["step"], "epochs": epochs, "train_rows": sets.train_rows,
               "global_batch_size": global_batch_size(cfg), "metrics": state["history"][-1],
               "history": state["history"], "resumed_from": state["resumed_from"],
               "checkpoint": result.checkpoint.path, "export": cfg.train.export, "seconds": round(seconds, 1),
               "mlflow_run_id": state.get("mlflow_run_id")}
    print(f"[train] done: {json.dumps(summary, default=str)}", flush=True)
    return summary

