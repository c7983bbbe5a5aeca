"""The device guard: every model path that runs on an accelerator, run on a stand-in one (tests/device_guard.py).

The stand-in device `fakegpu` keeps its tensors apart from the CPU's and refuses an op that mixes them, as CUDA
does, so a forgotten `.to(device)` fails here as it would on a GPU (issue 31: best-of-N crashed on the first
H200 run). The models are the tiny checkpoints of every real family (`cwm_ray/tiny/`) and the toy models, at the
dtypes the profiles give each stage (`configs/real/*.yaml`: a bf16 IDM for annotation and serving, a bf16 VAE
or VQ encoder for recognition weights, a fp16 / bf16 world model in Serve, training under DeepSpeed's bf16).
Each path must also compute on the device what it computes on the CPU.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from device_guard import DEVICE, DeviceTensor, guard
from PIL import Image

from cwm_ray.config import (
    AnnotateConfig,
    IDMConfig,
    LoRAConfig,
    RecognitionConfig,
    TokenSamplingConfig,
    TrainWorldModelConfig,
    WorldModelConfig,
    load,
)
from cwm_ray.evaluate.metrics import Embedder, cosine_pairs
from cwm_ray.idm import InverseDynamicsModel
from cwm_ray.recognition import RecognitionWeights
from cwm_ray.serve.app import serve_config
from cwm_ray.tiny.idm import IDM_FAMILIES, build_tiny_idm
from cwm_ray.tiny.world_model import build_tiny_world_model
from cwm_ray.world_model import load_world_model

REPO = Path(__file__).resolve().parents[1]
PROFILES = {"diffusion": REPO / "configs/real/qwen25vl7b_ip2p.yaml",
            "token": REPO / "configs/real/qwen25vl7b_janus_pro_1b.yaml"}
ACTIONS = ["remove the red circle", "move the blue square left"]


def _png(seed: int, size: int = 64) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


FRAMES = [_png(s) for s in range(3)]


@pytest.fixture
def device() -> torch.device:
    with guard() as d:
        yield d


def tiny_checkpoints(root: Path) -> dict[str, str]:
    """Every family's tiny checkpoint by family name (also tests/test_gpu.py's); IP2P at 64 px, Janus at 96.

    Janus is an IDM family and a world-model family with one checkpoint (`build_tiny_idm` writes the world
    model's), as the paper's single-model setting uses it."""
    paths = {f: build_tiny_idm(f, str(root / f)) for f in IDM_FAMILIES}
    paths["instruct_pix2pix"] = build_tiny_world_model("instruct_pix2pix", str(root / "ip2p"), resolution=64)
    return paths


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return tiny_checkpoints(tmp_path_factory.mktemp("guard"))


# -- the device itself ---------------------------------------------------------------------------------------------
def test_the_device_keeps_its_tensors_apart_and_refuses_a_mix_as_cuda_does(device: torch.device) -> None:
    x = torch.arange(6.0).reshape(2, 3)
    on = x.to(device)
    assert isinstance(on, DeviceTensor) and on.device.type == DEVICE and on.cpu().device.type == "cpu"
    assert torch.equal((on * 2).cpu(), x * 2) and on.sum().item() == 15.0 and on.tolist() == x.tolist()
    assert torch.zeros(2, device=device).device == on.device == torch.ones_like(on).device
    with pytest.raises(RuntimeError, match="Expected all tensors to be on the same device.*fakegpu:0 and cpu"):
        on + x
    with pytest.raises(RuntimeError, match="same device.*index_select"):
        on.repeat_interleave(torch.tensor([1, 2]), 0)  # the best-of-N crash of issue 31
    assert torch.equal(on.repeat_interleave(torch.tensor([1, 2], device=device), 0).cpu(), x[[0, 1, 1]])
    assert (on + torch.tensor(1.0)).device == on.device  # a 0-dim CPU tensor is a scalar to CUDA
    assert torch.equal(on[torch.tensor([1])].cpu(), x[[1]])  # and CPU indices are allowed
    with pytest.raises(RuntimeError, match="generator"):
        torch.randn(3, device=device, generator=torch.Generator().manual_seed(0))
    with pytest.raises(TypeError, match="Tensor.cpu"):
        on.numpy()
    layer = torch.nn.Linear(3, 1).to(device)
    torch.optim.AdamW(layer.parameters()).zero_grad()
    layer(on).sum().backward()
    assert layer.weight.grad.device == on.device
    before = layer.weight.detach().cpu()
    torch.optim.AdamW(layer.parameters(), lr=0.1).step()
    assert not torch.equal(before, layer.weight.detach().cpu())
    layer.to(torch.bfloat16)  # a module cast (DeepSpeed's bf16), then fp32 master weights by `.data`
    assert layer(on.bfloat16()).dtype == torch.bfloat16
    layer.weight.data = layer.weight.data.float()
    assert (layer.weight * 2).dtype == torch.float32  # the held CPU tensor followed (else the guard asserts)


def test_outside_a_guard_the_device_says_it_is_unavailable() -> None:
    """Installed once per process, it must not lead other tests' device choices (`auto`, accelerator queries)."""
    with guard():
        assert torch.fakegpu.is_available() and torch.accelerator.is_available()
    assert not torch.fakegpu.is_available() and not torch.accelerator.is_available()


# -- the IDM: label, score and a training step --------------------------------------------------------------------
def _train_step(module: torch.nn.Module, batch: dict[str, torch.Tensor], device: torch.device,
                dtype: torch.dtype) -> float:
    """One optimizer step as the trainer takes it under DeepSpeed's bf16: the module cast, the batch moved."""
    module = module.to(device, dtype)
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    loss = module(**{k: v.to(device) for k, v in batch.items()})
    loss.backward()
    optimizer.step()
    assert all(p.device.type == DEVICE for p in params)
    return float(loss)


@pytest.mark.parametrize("family", [*IDM_FAMILIES, "toy"])
def test_idm_labels_scores_and_trains_on_the_device(device: torch.device, checkpoints: dict[str, str],
                                                    family: str) -> None:
    profile = load(AnnotateConfig, PROFILES["diffusion"]).idm  # bf16, as annotation and the verifier run it
    model = "toy" if family == "toy" else checkpoints[family]
    size = 64 if family == "toy" else 96

    def idm(on: str) -> InverseDynamicsModel:
        return InverseDynamicsModel.load(IDMConfig(model=model, dtype=profile.dtype, device=on, max_new_tokens=3,
                                                   image_size=size))

    on_device, on_cpu = idm(DEVICE), idm("cpu")
    assert on_device.device.type == DEVICE and next(on_device.model.parameters()).dtype == torch.bfloat16
    labels, expected = on_device.label(FRAMES[:2], FRAMES[1:], seed=0), on_cpu.label(FRAMES[:2], FRAMES[1:], seed=0)
    assert [(x.action, x.num_tokens) for x in labels] == [(x.action, x.num_tokens) for x in expected]
    # bf16: transformers takes a few other kernels off the CPU (attention, masks), so equal to bf16's precision
    np.testing.assert_allclose([x.logprob for x in labels], [x.logprob for x in expected], rtol=1e-3)
    scores = on_device.score(FRAMES[0], FRAMES[1:], ACTIONS[0])
    np.testing.assert_allclose(scores, on_cpu.score(FRAMES[0], FRAMES[1:], ACTIONS[0]), rtol=1e-3)
    batch = on_device.collate({"source": np.array(FRAMES[:2], dtype=object),
                               "target": np.array(FRAMES[1:], dtype=object), "action": np.array(ACTIONS)})
    loss = _train_step(on_device.training_module(LoRAConfig(enabled=True)), batch, device, torch.bfloat16)
    assert np.isfinite(loss)


# -- world models: best-of-N sampling, recognition weights, a training step ---------------------------------------
WORLD_MODELS = {"instruct_pix2pix": "diffusion", "janus": "token", "toy_diffusion": "diffusion", "toy_token": "token"}


def _world_model_config(name: str, checkpoints: dict[str, str], **kw: object) -> WorldModelConfig:
    backend = WORLD_MODELS[name]
    model = checkpoints[name] if name in checkpoints else "toy"
    return WorldModelConfig(backend=backend, model=model, num_inference_steps=2,
                            resolution=64 if model == "toy" else None, **kw)


@pytest.mark.parametrize("name", list(WORLD_MODELS))
def test_world_model_samples_best_of_n_and_trains_on_the_device(device: torch.device, checkpoints: dict[str, str],
                                                                name: str) -> None:
    backend, toy = WORLD_MODELS[name], name.startswith("toy")
    # Serve's dtype: the real profiles' fp16 / bf16; the toys keep configs/serve.yaml's float32 (their constructed
    # VQ needs it), where the device must give exactly the CPU's candidates
    served = "float32" if toy else serve_config({"profile": str(PROFILES[backend])}).world_model.dtype
    token = {"temperature": 1.0, "top_k": 0, "guidance_scale": 5.0} if backend == "token" else {}

    def sample(on: str) -> list[np.ndarray]:
        cfg = _world_model_config(name, checkpoints, dtype=served, device=on, token=TokenSamplingConfig(**token))
        wm = load_world_model(cfg)
        out = wm.sample(FRAMES[:2], ACTIONS, n=[3, 1], seed=[5, 6])  # per-request n and seed, as Serve batches
        assert [len(c) for c in out] == [3, 1]
        return [np.asarray(im, dtype=np.float32) for cands in out for im in cands]

    candidates, expected = sample(DEVICE), sample("cpu")
    assert all(np.abs(candidates[0] - c).mean() > 1.0 for c in candidates[1:3])  # n seeds, n different candidates
    # The same candidates as on the CPU, to float32 rounding (a pixel level here and there) or half precision
    diffs = [float(np.abs(c - e).mean()) for c, e in zip(candidates, expected, strict=True)]
    assert max(diffs) <= (0.01 if served == "float32" else 1.0), diffs

    # recognition weights: the annotate profile's encoder dtype (bf16) on float32 pixels
    encoder = load(AnnotateConfig, PROFILES[backend]).world_model.dtype
    actor = RecognitionWeights(load_world_model(_world_model_config(name, checkpoints, dtype=encoder, device=DEVICE)))
    rows = actor({"source": np.array(FRAMES[:2], dtype=object), "target": np.array(FRAMES[1:], dtype=object)})
    assert len(rows["weights"]) == 2

    # a LoRA training step, the module cast to bf16 as DeepSpeed's bf16 does (the profiles' training)
    train = load(TrainWorldModelConfig, PROFILES[backend])
    assert train.deepspeed.bf16
    wm = load_world_model(_world_model_config(name, checkpoints, device=DEVICE, lora=LoRAConfig(enabled=True)),
                          RecognitionConfig())
    batch = wm.collate({"source": np.array(FRAMES[:2], dtype=object), "target": np.array(FRAMES[1:], dtype=object),
                        "action": np.array(ACTIONS)})
    assert np.isfinite(_train_step(wm.training_module(), batch, device, torch.bfloat16))


# -- evaluation's metric models ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def embedders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Tiny CLIP vision and DINOv2 checkpoints saved in bf16 (a hub checkpoint may be stored in half precision)."""
    from test_evaluate import tiny_embedders

    return tiny_embedders(tmp_path_factory.mktemp("embedders"), torch.bfloat16)


@pytest.mark.parametrize("kind", ["clip", "dino"])
def test_metric_embedders_run_on_the_device(device: torch.device, embedders: dict[str, str], kind: str) -> None:
    images = [Image.open(io.BytesIO(f)).convert("RGB") for f in FRAMES]
    embedder = Embedder(embedders[kind], kind, device=DEVICE)
    assert next(embedder.model.parameters()).device.type == DEVICE
    on_device = embedder(images)
    np.testing.assert_allclose(on_device, Embedder(embedders[kind], kind, device="cpu")(images), atol=1e-2)  # bf16
    assert np.allclose(cosine_pairs(embedder, images, images), 1.0, atol=1e-2)


# -- Serve's replicas: the batched sampling and scoring calls, as a request reaches them ---------------------------
def test_serve_replicas_sample_and_score_on_the_device(device: torch.device, checkpoints: dict[str, str]) -> None:
    """The replica classes themselves (no Ray), each given a batch of two requests as `@serve.batch` hands it over
    (the undecorated method: the batch queue needs a running replica); the model calls run in a worker thread."""
    import asyncio

    from cwm_ray.config import to_dict
    from cwm_ray.serve.deployments import SampleRequest, ScoreRequest, VerifierDeployment, WorldModelDeployment

    served = serve_config({"profile": str(PROFILES["diffusion"])})
    wm_cfg = _world_model_config("instruct_pix2pix", checkpoints, dtype=served.world_model.dtype, device=DEVICE)
    idm_cfg = IDMConfig(model=checkpoints["qwen2_vl"], dtype=served.idm.dtype, device=DEVICE, image_size=96)
    world_model = WorldModelDeployment.func_or_class(to_dict(wm_cfg), 4)
    verifier = VerifierDeployment.func_or_class(to_dict(idm_cfg), 4)

    async def best_of() -> list[list[float]]:
        requests = [SampleRequest(FRAMES[0], ACTIONS[0], 3, 1), SampleRequest(FRAMES[1], ACTIONS[1], 1, 2)]
        candidates = await WorldModelDeployment.func_or_class.sample.__wrapped__(world_model, requests)
        scoring = [ScoreRequest(r.image, c, r.action) for r, c in zip(requests, candidates, strict=True)]
        return await VerifierDeployment.func_or_class.score.__wrapped__(verifier, scoring)

    scores = asyncio.run(best_of())
    assert [len(s) for s in scores] == [3, 1] and np.isfinite(np.concatenate(scores)).all()
    for info in (world_model.info(), verifier.info()):
        assert info["device"].startswith(DEVICE) and info["dtype"] in ("float16", "bfloat16"), info
