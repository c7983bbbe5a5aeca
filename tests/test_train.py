"""Ray Train + DeepSpeed: tiny real models loaded by path, 2 CPU workers, ZeRO-2, checkpoints on moto S3."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import ray
import torch
from safetensors.torch import load_file

from cwm_ray import storage
from cwm_ray.config import (
    DataSource,
    IDMConfig,
    TrainIDMConfig,
    TrainWorldModelConfig,
    WorldModelConfig,
    load,
)
from cwm_ray.toyworld.corpus import make_corpus


@pytest.fixture(scope="module")
def ray_local() -> None:
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled"}})
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def gold(tmp_path_factory: pytest.TempPathFactory) -> str:
    from cwm_ray.config import ToyCorpusConfig

    out = tmp_path_factory.mktemp("corpus")
    make_corpus(ToyCorpusConfig(output=str(out), num_videos=0, num_train=96, num_test=8))
    return str(out / "gold" / "train.json")


def _common(tmp_path: Path, gold: str, storage_path: str, **kw: object) -> list[str]:
    overrides = {
        "train.storage_path": storage_path, "train.export": str(tmp_path / "export"), "train.log_every": 2,
        "train.eval_every": 4, "optim.batch_size": 8, "optim.warmup_steps": 1,
        "scaling.num_workers": 2, "scaling.cpus_per_worker": 0.5, "deepspeed.zero_stage": 2,
        "data.val_fraction": 0.2,
    } | kw
    return [f"{k}={v}" for k, v in overrides.items()] + [f"data.sources=[{{uri: {gold}}}]"]


@pytest.mark.fault
def test_idm_resumes_after_a_worker_dies_and_checkpoints_land_on_s3(
    ray_local: None, gold: str, s3_bucket: str, tmp_path: Path
) -> None:
    from cwm_ray.idm import InverseDynamicsModel
    from cwm_ray.toyworld.idm_model import build_toy_idm
    from cwm_ray.train import train

    model_dir = tmp_path / "tiny_idm"
    build_toy_idm(str(model_dir), hidden_size=32, text_layers=1)
    cfg = load(TrainIDMConfig, None, [f"idm.model={model_dir}", "train.name=idm_fault", "optim.max_steps=10",
                                      "train.checkpoint_every=4", "train.fail_at_step=6", "optim.lr=1e-3",
                                      "deepspeed.bf16_cpu=true",  # the toy IDM's setting, through a resume
                                      *_common(tmp_path, gold, s3_bucket + "/runs")])
    summary = train(cfg)
    assert summary["steps"] == 10  # the same final step count as an uninterrupted run
    assert summary["resumed_from"] and 0 < summary["resumed_from"][0] <= 6
    files = storage.list_files(s3_bucket + "/runs/idm_fault")
    assert any(f.endswith("model/model.safetensors") for f in files), files
    assert any(f.endswith("state.json") for f in files)
    idm = InverseDynamicsModel.load(IDMConfig(model=str(tmp_path / "export")))
    assert len(idm.label([_png()], [_png()])) == 1
    # DeepSpeed's resume restores every tensor (weights, ZeRO-2's optimizer partitions, schedule, random states):
    # the killed run ends where a run that never stopped does. Before this check, a resume that loaded nothing
    # would also have passed here (the step count and `resumed_from` come from state.json, not the engine).
    plain = train(load(TrainIDMConfig, None, [f"idm.model={model_dir}", "train.name=idm_plain", "optim.max_steps=10",
                                              "train.checkpoint_every=4", "optim.lr=1e-3", "deepspeed.bf16_cpu=true",
                                              *_common(tmp_path, gold, str(tmp_path / "runs")),
                                              f"train.export={tmp_path / 'plain'}"]))
    killed_checkpoint = tmp_path / "killed_checkpoint"
    storage.download_dir(f"s3://{summary['checkpoint']}", killed_checkpoint)
    assert_resumed_like_uninterrupted(plain, summary, (tmp_path / "plain", tmp_path / "export"),
                                      (Path(plain["checkpoint"]), killed_checkpoint))


def _png() -> bytes:
    from cwm_ray.config import ToyWorldConfig
    from cwm_ray.schema import encode_image
    from cwm_ray.toyworld.render import render
    from cwm_ray.toyworld.world import Obj, Scene

    return encode_image(render(Scene((Obj("circle", "red", 2, 2),)), ToyWorldConfig()))


def test_world_model_loss_decreases_and_rerun_resumes(ray_local: None, gold: str, tmp_path: Path) -> None:
    from cwm_ray.toyworld.diffusion_model import build_toy_world_model
    from cwm_ray.train import train
    from cwm_ray.world_model import load_world_model

    model_dir = tmp_path / "tiny_wm"
    build_toy_world_model(str(model_dir), resolution=32, block_out_channels=(16, 32), patch_size=2)
    store = tmp_path / "mlruns"  # a real MLflow file store
    args = [f"world_model.model={model_dir}", "world_model.resolution=32", "train.name=wm", "optim.lr=2e-3",
            "train.checkpoint_every=8", f"tracking.uri={store}", "tracking.experiment=cwm_test",
            *_common(tmp_path, gold, str(tmp_path / "runs"))]
    first = train(load(TrainWorldModelConfig, None, [*args, "optim.max_steps=24"]))
    losses = [m["loss"] for m in first["history"]]
    assert first["steps"] == 24 and losses[-1] < losses[0]
    assert first["history"][-1]["val_loss"] is not None
    # A re-run with the same name continues from the latest checkpoint instead of starting over.
    second = train(load(TrainWorldModelConfig, None, [*args, "optim.max_steps=28"]))
    assert second["steps"] == 28 and second["resumed_from"] == [24]
    # Both went to one MLflow run, through Ray's setup_mlflow on rank 0 only: the resolved config as parameters,
    # the logged metrics by step, the resumed steps appended.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(store.as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("cwm_test").experiment_id])
    assert run.info.run_name == "wm" and run.info.status == "FINISHED" and run.info.run_id == second["mlflow_run_id"]
    params = run.data.params
    assert params["optim/lr"] == "0.002" and params["world_model/model"] == str(model_dir)
    assert params["train/storage_path"] == str(tmp_path / "runs") and params["scaling/num_workers"] == "2"
    loss = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in loss] == list(range(2, 29, 2))
    assert [m.value for m in loss][:12] == pytest.approx(losses)
    assert {m.step for m in client.get_metric_history(run.info.run_id, "val_loss")} == {4, 8, 12, 16, 20, 24, 28}
    # Resuming with another worker count cannot re-partition ZeRO's optimizer state: a clear error, no load.
    with pytest.raises(Exception, match=r"checkpointed by 2 worker\(s\).*scaling\.num_workers=2"):
        train(load(TrainWorldModelConfig, None, [*args, "optim.max_steps=32", "scaling.num_workers=1",
                                                 "train.max_failures=0"]))
    wm = load_world_model(WorldModelConfig(model=str(tmp_path / "export"), resolution=32))
    out = wm.sample([_png()], ["move the red circle right"], n=2, seed=0)
    assert len(out[0]) == 2 and out[0][0].size == (32, 32)


def test_bad_training_config_is_rejected_before_ray_starts(tmp_path: Path) -> None:
    from cwm_ray.train import train

    with pytest.raises(ValueError, match="zero_stage"):  # now when the config is built (--print-config too)
        train(load(TrainIDMConfig, None, ["deepspeed.zero_stage=3"]))
    cfg = load(TrainIDMConfig, None, [f"data.sources=[{{uri: {tmp_path}/missing.json}}]"])
    with pytest.raises(FileNotFoundError, match="missing.json"):
        train(cfg)
    for bad in ("optim.adam_beta2=1.0", "optim.adam_beta1=-0.1", "optim.adam_epsilon=0", "optim.schedule=linear"):
        with pytest.raises(ValueError, match=bad.split("=")[0].replace(".", r"\.")):
            train(load(TrainIDMConfig, None, [bad]))


def test_a_resume_under_the_other_recognition_setting_is_refused(tmp_path: Path) -> None:
    """The ablation's rows (b) and (c) are one flag apart: (c) run under (b)'s train.name would resume (b)'s
    checkpoint and be neither, so the driver refuses, naming the way out."""
    import json

    from cwm_ray.train import STATE_FILE, check_run_kind, model_info, recipe

    args = [f"train.storage_path={tmp_path}", "train.name=wm"]
    unweighted = load(TrainWorldModelConfig, None, [*args, "recognition.enabled=false"])
    weighted = load(TrainWorldModelConfig, None, [*args, "recognition.enabled=true"])
    checkpoint = tmp_path / "wm" / "checkpoint_000000"
    checkpoint.mkdir(parents=True)
    (checkpoint / STATE_FILE).write_text(json.dumps({"step": 4, "model": model_info(unweighted),
                                                     "recipe": recipe(unweighted)}))
    check_run_kind(unweighted, model_info(unweighted))  # the same recipe resumes
    with pytest.raises(ValueError, match=r"trained with .*'enabled': False.*train\.name=<name> and train\.export"):
        check_run_kind(weighted, model_info(weighted))


def test_adamw_takes_the_configured_betas() -> None:
    import torch

    from cwm_ray.train import build_optimizer

    cfg = load(TrainIDMConfig, None, ["optim.adam_beta2=0.95", "optim.adam_epsilon=1e-6", "optim.weight_decay=0.1"])
    group = build_optimizer(cfg, [torch.nn.Parameter(torch.zeros(2))]).param_groups[0]
    assert group["betas"] == (0.9, 0.95) and group["eps"] == 1e-6 and group["weight_decay"] == 0.1
    assert load(TrainIDMConfig, None, []).optim.adam_beta2 == 0.999  # transformers' default when unset


def test_workers_that_leave_no_cpu_for_ray_data_are_refused(ray_local: None, capsys: pytest.CaptureFixture) -> None:
    from cwm_ray.train import _check_data_cpus

    # 2 workers x 1 CPU on this 2-CPU cluster: Ray Data's read tasks could never run and training would hang.
    starved = load(TrainIDMConfig, None, ["scaling.num_workers=2", "scaling.cpus_per_worker=1.0"])
    with pytest.raises(ValueError, match=r"take 2 of the cluster's 2 CPUs.*scaling\.cpus_per_worker"):
        _check_data_cpus(starved, fixed_cluster=True)
    _check_data_cpus(starved, fixed_cluster=False)  # a joined cluster may autoscale: warn only
    assert "warning" in capsys.readouterr().out
    _check_data_cpus(load(TrainIDMConfig, None, ["scaling.num_workers=2", "scaling.cpus_per_worker=0.5"]),
                     fixed_cluster=True)


def test_mixed_sources_with_weights(ray_local: None, gold: str) -> None:
    from cwm_ray.config import DataSection
    from cwm_ray.data import training_datasets, training_sets

    section = DataSection(sources=[DataSource(uri=gold), DataSource(uri=gold, weight=2.0)], val_fraction=0.25)
    train_ds, val_ds = training_datasets(section)
    n_train, n_val = train_ds.count(), val_ds.count()
    assert n_val % 2 == 0 and n_train == 3 * (96 - n_val // 2)
    assert training_sets(section).train_rows == n_train  # counted without reading an image
    row = train_ds.take(1)[0]
    assert set(row) == {"id", "source", "target", "action", "weights", "weights_shape"}
    assert row["source"][:4] == b"\x89PNG" and row["weights"] is None  # gold rows: the encoder's, at collate


def test_a_materialized_training_set_is_read_once(ray_local: None, gold: str, tmp_path: Path) -> None:
    """`data.materialize`: the images are read into the object store once, not again on every epoch."""
    import shutil

    from cwm_ray.config import DataSection
    from cwm_ray.data import training_datasets

    copy = tmp_path / "gold"
    shutil.copytree(Path(gold).parent, copy)
    section = DataSection(sources=[DataSource(uri=str(copy / "train.json"))], val_fraction=0.25, materialize=True)
    train_ds, val_ds = training_datasets(section)
    first = {r["id"]: r["source"] for r in train_ds.take_all()}
    shutil.rmtree(copy / "images")  # a re-read would fail now
    again = {r["id"]: r["source"] for epoch in range(2) for r in train_ds.take_all()}
    assert again == first and len(first) + val_ds.count() == 96


def test_a_relative_model_path_reaches_the_workers(ray_local: None, gold: str, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Ray Train workers run in their own directory; `idm.model=outputs/...` must not become a hub id."""
    from cwm_ray.toyworld.idm_model import build_toy_idm
    from cwm_ray.train import train

    monkeypatch.chdir(tmp_path)
    build_toy_idm("models/tiny", hidden_size=32, text_layers=1)
    cfg = load(TrainIDMConfig, None, ["idm.model=models/tiny", "train.name=rel", "optim.max_steps=2",
                                      "deepspeed.enabled=false", *_common(tmp_path, gold, "runs"),
                                      "scaling.num_workers=1", "train.eval_every=0",
                                      "tracking.enabled=false", "tracking.uri=mlruns"])  # tracking off: one setting
    summary = train(cfg)
    assert summary["steps"] == 2 and summary["mlflow_run_id"] is None and not (tmp_path / "mlruns").exists()


def test_idm_trains_with_ddp_on_two_workers(ray_local: None, gold: str, tmp_path: Path) -> None:
    """`deepspeed.enabled=false` is DDP; LLaVA's unused vision post-layernorm must not stop it."""
    from cwm_ray.toyworld.idm_model import build_toy_idm
    from cwm_ray.train import train

    build_toy_idm(str(tmp_path / "tiny"), hidden_size=32, text_layers=1)
    cfg = load(TrainIDMConfig, None, [f"idm.model={tmp_path / 'tiny'}", "train.name=ddp", "optim.max_steps=4",
                                      "deepspeed.enabled=false", "deepspeed.bf16_cpu=true",
                                      *_common(tmp_path, gold, str(tmp_path / "runs")), "train.eval_every=0"])
    assert train(cfg)["steps"] == 4


def test_engine_autocasts_the_forward_on_cpu_and_clips_ddp_gradients() -> None:
    """`deepspeed.bf16_cpu`: the forward in bf16, the weights fp32; DDP clips to `gradient_clipping` as DeepSpeed."""
    import torch

    from cwm_ray.train import _Engine

    class Probe(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)
            self.seen: torch.dtype | None = None

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.lin(x)
            self.seen = y.dtype
            return 1e4 * y.float().pow(2).sum()  # a gradient far above the clipping norm

    probe = Probe()
    opt = torch.optim.SGD(probe.parameters(), lr=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    for autocast, dtype in ((True, torch.bfloat16), (False, torch.float32)):
        engine = _Engine(probe, opt, sched, deepspeed=False, autocast_cpu=autocast, clip=1.0)
        loss = engine.loss({"x": torch.ones(2, 4)})
        assert probe.seen == dtype and probe.lin.weight.dtype == torch.float32
        engine.step(loss)
        norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in probe.parameters()]))
        assert norm <= 1.0 + 1e-3, norm


def test_ddp_accumulation_gives_the_gradient_and_step_of_one_larger_batch() -> None:
    """Two micro-batches accumulated (`optim.global_batch_size` = 2 x workers x batch_size) step the optimizer once,
    with the gradient of the mean loss over both: the update one batch twice the size gives."""
    import torch

    from cwm_ray.train import _Engine

    class Mean(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(3, 1)

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return (self.lin(x) - y).pow(2).mean()

    x, y = torch.randn(8, 3, generator=torch.Generator().manual_seed(0)), torch.randn(8, 1)
    results = []
    for accumulation, parts in ((1, [slice(0, 8)]), (2, [slice(0, 4), slice(4, 8)])):
        torch.manual_seed(0)
        module = Mean()
        # SGD, whose update scales with the gradient (Adam's would hide a gradient twice too large)
        opt = torch.optim.SGD(module.parameters(), lr=0.1)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step))
        engine = _Engine(module, opt, sched, deepspeed=False, clip=0.0, accumulation=accumulation)
        stepped = [engine.step(engine.loss({"x": x[s], "y": y[s]})) for s in parts * 2]  # two optimizer steps
        assert stepped == [True, True] if accumulation == 1 else [False, True, False, True]
        results.append(([p.detach().clone() for p in module.parameters()], [p.grad.clone() for p in
                                                                            module.parameters()], sched.last_epoch))
    (one, grad_one, steps_one), (two, grad_two, steps_two) = results
    assert steps_one == steps_two == 2  # the LR schedule steps per optimizer step, not per micro-batch
    for a, b in zip(one + grad_one, two + grad_two, strict=True):
        torch.testing.assert_close(a, b)


def test_one_worker_accumulating_trains_the_recipe_of_two_workers(ray_local: None, gold: str, tmp_path: Path) -> None:
    """Epochs and a global batch are the recipe; the worker count only its speed: 1 worker accumulating 2
    micro-batches and 2 workers with 1 each take the same steps, rows per step and LR schedule (DeepSpeed's
    gradient_accumulation_steps), with max_steps derived from the epochs and the rows counted in the driver."""
    from cwm_ray.toyworld.idm_model import build_toy_idm
    from cwm_ray.train import train

    build_toy_idm(str(tmp_path / "tiny"), hidden_size=32, text_layers=1)
    runs = {}
    for workers in (1, 2):
        cfg = load(TrainIDMConfig, None, [
            f"idm.model={tmp_path / 'tiny'}", f"train.name=acc{workers}", "optim.max_steps=null", "optim.epochs=1",
            "optim.global_batch_size=8", "optim.warmup_steps=2", "data.max_rows=40",
            *_common(tmp_path, gold, str(tmp_path / "runs"), **{"optim.batch_size": 4, "scaling.num_workers": workers,
                                                                 "train.log_every": 1, "train.eval_every": 0})])
        runs[workers] = train(cfg)
    one, two = runs[1], runs[2]
    assert one["train_rows"] == two["train_rows"] and 24 <= one["train_rows"] <= 40
    assert one["steps"] == two["steps"] == -(-one["train_rows"] // 8)  # ceil(epochs x rows / global batch)
    for run in (one, two):
        assert run["global_batch_size"] == 8 and [m["samples_per_step"] for m in run["history"]] == [8] * run["steps"]
    assert [m["lr"] for m in one["history"]] == pytest.approx([m["lr"] for m in two["history"]])


@pytest.mark.fault
def test_a_corrupt_or_partial_checkpoint_is_detected_not_loaded(ray_local: None, gold: str, tmp_path: Path) -> None:
    import shutil

    from cwm_ray.toyworld.diffusion_model import build_toy_world_model
    from cwm_ray.train import CorruptCheckpoint, train, verify_checkpoint

    model_dir = tmp_path / "tiny_wm"
    build_toy_world_model(str(model_dir), resolution=16, block_out_channels=(8, 16), patch_size=1,
                          text_hidden_size=16)
    args = [f"world_model.model={model_dir}", "world_model.resolution=16", "train.name=wm", "train.max_failures=0",
            "train.checkpoint_every=4", *_common(tmp_path, gold, str(tmp_path / "runs"))]
    first = train(load(TrainWorldModelConfig, None, [*args, "optim.max_steps=4"]))
    ckpt = Path(first["checkpoint"])
    assert verify_checkpoint(ckpt)["step"] == 4
    assert sorted(p.name for p in ckpt.glob("manifest.rank*.json")) == ["manifest.rank0.json", "manifest.rank1.json"]

    def broken(how: str) -> Path:
        copy = tmp_path / f"copy_{how}"
        shutil.copytree(ckpt, copy)
        weights = next(copy.glob("model/unet/*.safetensors"))
        if how == "truncated":
            weights.write_bytes(weights.read_bytes()[:-100])
        elif how == "flipped":  # same size, different bytes
            data = bytearray(weights.read_bytes())
            data[-10] ^= 0xFF
            weights.write_bytes(bytes(data))
        elif how == "no_state":
            (copy / "state.json").unlink()
        elif how == "no_manifest":
            (copy / "manifest.rank1.json").unlink()
        elif how == "missing_file":
            weights.unlink()
        return copy

    for how in ("truncated", "flipped", "no_state", "no_manifest", "missing_file"):
        with pytest.raises(CorruptCheckpoint):
            verify_checkpoint(broken(how))

    # The run's own latest checkpoint, corrupted in place: a re-run refuses it instead of loading it.
    weights = next(ckpt.glob("model/unet/*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(Exception, match="is corrupt"):
        train(load(TrainWorldModelConfig, None, [*args, "optim.max_steps=8"]))


def _leaves(obj: object, prefix: str = "") -> dict[str, object]:
    """Every tensor and scalar of a (nested) checkpoint object, by its path in it."""
    if isinstance(obj, dict):
        return {k: v for key, value in obj.items() for k, v in _leaves(value, f"{prefix}/{key}").items()}
    if isinstance(obj, list | tuple):
        return {k: v for i, value in enumerate(obj) for k, v in _leaves(value, f"{prefix}/{i}").items()}
    if isinstance(obj, np.ndarray):
        return {prefix: torch.from_numpy(obj)}
    return {prefix: obj} if isinstance(obj, torch.Tensor | int | float | bool | str) or obj is None else {}


def assert_resumed_like_uninterrupted(plain: dict, killed: dict, exports: tuple[Path, Path],
                                      checkpoints: tuple[Path, Path]) -> None:
    """A run killed and resumed ends exactly where one that never stopped does: every exported tensor, every
    tensor and scalar of the final checkpoint's engine state (DeepSpeed's model states and each rank's ZeRO
    optimizer partition; DDP's state) and of each rank's random states, and the loss history.

    Shared by the resume tests of both engines and all three trainers (IDM, diffusion and token world models).

    Python's global `random` stream is left out: the training never draws from it (its draws are torch's and
    NumPy's, compared here), and libraries draw from it on their own schedule in a worker, at import (rich's style
    ids, through `ray.tune`, and opencensus's trace ids, seen in RayTrainWorker and Ray's agents with an audit of
    every call). Once, in a local run, a resumed worker drew from it after the restore where the uninterrupted one
    had not, with every weight and loss equal. That the state is saved and restored is checked by
    `test_a_checkpoints_random_states_restore_every_stream`."""
    assert plain["steps"] == killed["steps"] and killed["resumed_from"] and plain["resumed_from"] == []
    files = sorted(p.relative_to(exports[0]) for p in exports[0].rglob("*.safetensors"))
    assert files and files == sorted(p.relative_to(exports[1]) for p in exports[1].rglob("*.safetensors"))
    for name in files:
        a, b = load_file(exports[0] / name), load_file(exports[1] / name)
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=f"{name}:{k}")
    states = sorted(p.relative_to(checkpoints[0]) for p in checkpoints[0].rglob("*.pt"))
    assert states and states == sorted(p.relative_to(checkpoints[1]) for p in checkpoints[1].rglob("*.pt"))
    for name in states:  # our own checkpoints, checked against their manifests before any load (weights_only=False)
        a, b = (_leaves(torch.load(c / name, weights_only=False, map_location="cpu")) for c in checkpoints)
        assert a.keys() == b.keys(), name
        for k in a:
            if name.name.startswith("rng.") and k.startswith("/python/"):
                continue
            if isinstance(a[k], torch.Tensor):
                torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=f"{name}:{k}")
            else:
                assert b[k] == a[k], (name, k)
    assert [m["loss"] for m in killed["history"]] == pytest.approx([m["loss"] for m in plain["history"]], rel=1e-5)


def test_a_checkpoints_random_states_restore_every_stream(tmp_path: Path) -> None:
    """What a rank saves in `rng.rank<N>.pt` puts Python's, NumPy's and torch's streams back where they were:
    the draws after a restore are the draws the saved process made next."""
    import random

    from cwm_ray.train import _rng_state, _seed_everything, _set_rng_state

    def draws() -> tuple:
        return random.random(), float(np.random.rand()), float(np.random.randn()), torch.rand(3).tolist()

    _seed_everything(7)
    draws()
    saved = _rng_state()
    torch.save(saved, tmp_path / "rng.rank0.pt")  # through a file and a weights-only load, as a resume reads it
    restored = torch.load(tmp_path / "rng.rank0.pt", weights_only=True)
    expected = draws()
    _seed_everything(8)
    draws()
    _set_rng_state(restored)
    assert draws() == expected


@pytest.mark.fault
def test_ddp_resume_after_a_worker_dies_ends_with_the_uninterrupted_weights(ray_local: None, gold: str,
                                                                            tmp_path: Path) -> None:
    """`deepspeed.enabled=false`: a worker killed mid-epoch, then resumed, ends with the weights (and optimizer,
    schedule and random states) of a run that never stopped. Before, DDP restored the optimizer and schedule but
    not the model, so a resume trained on from the initial weights (and replayed other batches, under other random
    draws). DeepSpeed's resume is checked the same way by the IDM's test above and the token world model's."""
    from cwm_ray.toyworld.diffusion_model import build_toy_world_model
    from cwm_ray.train import train

    model_dir = tmp_path / "tiny_wm"
    build_toy_world_model(str(model_dir), resolution=16, block_out_channels=(8, 16), patch_size=1,
                          text_hidden_size=16)
    # 77 training rows over 2 workers: 4 batches of 8 per worker and epoch; the checkpoint at step 3 is mid-epoch.
    args = [f"world_model.model={model_dir}", "world_model.resolution=16", "deepspeed.enabled=false",
            "optim.max_steps=6", "train.checkpoint_every=3", "train.eval_every=3", "optim.lr=5e-3",
            *_common(tmp_path, gold, str(tmp_path / "runs")), "train.log_every=1"]
    plain = train(load(TrainWorldModelConfig, None, [*args, "train.name=plain", f"train.export={tmp_path / 'a'}"]))
    killed = train(load(TrainWorldModelConfig, None, [*args, "train.name=killed", "train.fail_at_step=5",
                                                      f"train.export={tmp_path / 'b'}"]))
    assert plain["steps"] == killed["steps"] == 6 and killed["resumed_from"] == [3] and plain["resumed_from"] == []
    assert_resumed_like_uninterrupted(plain, killed, (tmp_path / "a", tmp_path / "b"),
                                      (Path(plain["checkpoint"]), Path(killed["checkpoint"])))


def test_the_token_backend_gets_its_own_run_and_export_by_default() -> None:
    """`jobs/train_world_model.py world_model.backend=token` used to resume the diffusion run `toy_world_model`
    (a state-dict error in a worker) and, renamed, to export over the diffusion model."""
    yaml = Path(__file__).resolve().parents[1] / "configs" / "train_world_model.yaml"
    diffusion = load(TrainWorldModelConfig, yaml)
    assert (diffusion.train.name, diffusion.train.export) == ("toy_world_model", "outputs/models/toy_world_model")
    for layers in ([yaml], [], [yaml.with_name("train_token_world_model.yaml")]):
        token = load(TrainWorldModelConfig, layers or None, ["world_model.backend=token"])
        assert (token.train.name, token.train.export) == ("toy_token_world_model",
                                                          "outputs/models/toy_token_world_model")
    mine = load(TrainWorldModelConfig, yaml, ["world_model.backend=token", "train.name=mine", "train.export=/x/y"])
    assert (mine.train.name, mine.train.export) == ("mine", "/x/y")


def test_model_info_fingerprints_the_state_dict_layout_not_the_optimizer() -> None:
    from cwm_ray.train import model_info

    def info(*overrides: str) -> dict:
        return model_info(load(TrainWorldModelConfig, None, list(overrides)))

    base = info()
    assert base["kind"] == "world_model" and base["backend"] == "diffusion"
    assert info("optim.lr=0.5", "optim.max_steps=7", "world_model.lora.alpha=3")["fingerprint"] == base["fingerprint"]
    for other in (["world_model.backend=token"], ["world_model.lora.enabled=true"], ["world_model.model=/m"],
                  ["world_model.train_text_encoder=true"]):
        assert info(*other)["fingerprint"] != base["fingerprint"], other
    idm = model_info(load(TrainIDMConfig, None, []))
    assert idm["kind"] == "idm" and idm["backend"] is None


class _WorkersStarted(Exception):
    """Raised by a stand-in TorchTrainer: the driver got past its checks."""


def test_a_run_or_export_of_another_kind_is_refused_in_the_driver(ray_local: None, gold: str, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Resuming a run of another backend or layout, or exporting over a model of another kind, is a clear error
    naming the run directory or export and the fix, before any worker starts."""
    import json
    import re

    from cwm_ray import train as train_mod
    from cwm_ray.toyworld.diffusion_model import build_toy_world_model
    from cwm_ray.train import MODEL_INFO, stored_model_info, train

    model_dir = tmp_path / "tiny_wm"
    build_toy_world_model(str(model_dir), resolution=16, block_out_channels=(8, 16), patch_size=1,
                          text_hidden_size=16)
    runs = tmp_path / "runs"
    args = [f"world_model.model={model_dir}", "world_model.resolution=16", "train.name=wm", "train.max_failures=0",
            "train.checkpoint_every=2", *_common(tmp_path, gold, str(runs), **{"scaling.num_workers": 1})]
    first = train(load(TrainWorldModelConfig, None, [*args, "optim.max_steps=2"]))
    export = Path(first["export"])
    assert json.loads((export / MODEL_INFO).read_text())["backend"] == "diffusion"
    assert stored_model_info(str(export))["kind"] == "world_model"

    def no_workers(*a: object, **k: object) -> None:
        raise _WorkersStarted

    monkeypatch.setattr(train_mod, "TorchTrainer", no_workers)
    with pytest.raises(_WorkersStarted):  # the same model resumes (with another learning rate)
        train(load(TrainWorldModelConfig, None, [*args, "optim.max_steps=4", "optim.lr=0.5"]))
    run_dir = re.escape(str(runs / "wm"))
    for other in (["world_model.backend=token", "world_model.model=toy", "train.overwrite_export=true"],
                  ["world_model.lora.enabled=true"]):
        with pytest.raises(ValueError, match=rf"run directory {run_dir} .*train\.name=<new name>.*delete {run_dir}"):
            train(load(TrainWorldModelConfig, None, [*args, "optim.max_steps=4", *other]))
    # A checkpoint written before checkpoints recorded their kind: told from its model's files.
    for state_file in runs.glob("wm/*/state.json"):
        state = json.loads(state_file.read_text())
        state.pop("model", None)
        state_file.write_text(json.dumps(state))
        (state_file.parent / "model" / MODEL_INFO).unlink(missing_ok=True)
    with pytest.raises(ValueError, match=rf"run directory {run_dir} holds a checkpoint of a diffusion world model"):
        train(load(TrainWorldModelConfig, None, [*args, "world_model.backend=token", "world_model.model=toy",
                                                 "train.overwrite_export=true"]))

    # A new run exports over the diffusion model: refused for the token backend or an IDM, unless asked for.
    token = [*args, "train.name=token", "world_model.backend=token", "world_model.model=toy"]
    with pytest.raises(ValueError, match=rf"train\.export={re.escape(str(export))} holds a diffusion world model.*"
                                         r"train\.overwrite_export=true"):
        train(load(TrainWorldModelConfig, None, token))
    with pytest.raises(ValueError, match="holds a diffusion world model"):
        train(load(TrainIDMConfig, None, [f"train.export={export}", f"train.storage_path={runs}",
                                          f"data.sources=[{{uri: {gold}}}]"]))
    (export / MODEL_INFO).unlink()  # an export from before MODEL_INFO: told from its files
    assert stored_model_info(str(export)) == {"kind": "world_model", "backend": "diffusion"}
    with pytest.raises(ValueError, match="holds a diffusion world model"):
        train(load(TrainWorldModelConfig, None, token))
    with pytest.raises(_WorkersStarted):
        train(load(TrainWorldModelConfig, None, [*token, "train.overwrite_export=true"]))
    with pytest.raises(_WorkersStarted):  # the same kind replaces its own export freely
        train(load(TrainWorldModelConfig, None, [*args, "train.name=again"]))
