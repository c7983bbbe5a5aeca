"""The conformance matrix on a CUDA GPU: every family, every model path that runs on an accelerator.

CI has no GPU, so this module carries the `gpu` marker, which the default suite deselects (pyproject's addopts);
the device guard (tests/test_device_guard.py) is what CI runs instead. Selected where CUDA is absent, it fails.
On a GPU machine, from the project root, after packing what its image lacks (the openai
client too, which the Serve test drives):

    EXTRA=openai bash ../shared/gpu/bundle.sh                  # here, once
    bash .gpu/run.sh python3 -m pytest -q -m gpu tests/test_gpu.py    # there

It builds the tiny checkpoints of each family (`cwm_ray/tiny/`) and runs, on CUDA, at the dtypes the profiles
(`configs/real/*.yaml`) give each stage:
- each IDM family (LLaVA, Qwen2-VL, Qwen2.5-VL, Idefics3, Janus): label and score in bf16 (the same likelihoods as the
  CPU's in float32, to bf16's precision), and three LoRA training steps with the module in bf16 (DeepSpeed's bf16);
- each world-model family (InstructPix2Pix, Janus) and the toys: best-of-4 with a bf16 Qwen2-VL verifier at the
  serve dtype (fp16 / bf16), and three LoRA training steps in bf16;
- a Serve best-of-N request through the `openai` client for each world-model family, with replicas given a share
  of the GPU, which `/healthz` must report as their device.
Not yet run on a GPU (none was lent while it was written); on the CPU, with DEVICE = "cpu" and GPU_SHARE = 0
put in for one run, all 10 tests passed (Janus's IDM test, added later, passed the same way).
"""

from __future__ import annotations

import base64
import dataclasses
import io
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cwm_ray.config import (
    AnnotateConfig,
    LoRAConfig,
    RecognitionConfig,
    TokenSamplingConfig,
    WorldModelConfig,
    load,
)
from cwm_ray.idm import InverseDynamicsModel
from cwm_ray.serve.app import serve_config
from cwm_ray.tiny.idm import IDM_FAMILIES
from cwm_ray.verify import best_of_n
from cwm_ray.world_model import load_world_model

pytestmark = pytest.mark.gpu  # deselected by default (pyproject's addopts): CI has no GPU and runs the device guard


@pytest.fixture(autouse=True, scope="module")
def _cuda() -> None:
    """Selected with `-m gpu` where CUDA is absent: a failure that says so, never a skip."""
    if DEVICE == "cuda" and not torch.cuda.is_available():
        pytest.fail("tests/test_gpu.py needs a CUDA GPU; run it there with -m gpu (CI runs tests/test_device_guard.py)")


DEVICE = "cuda"
GPU_SHARE = 0.2
"""Of the GPU, for each model replica of the Serve test (two apps of two model deployments)."""
REPO = Path(__file__).resolve().parents[1]
PROFILES = {"diffusion": "configs/real/qwen25vl7b_ip2p.yaml", "token": "configs/real/qwen25vl7b_janus_pro_1b.yaml"}
WORLD_MODELS = {"instruct_pix2pix": "diffusion", "janus": "token", "toy_diffusion": "diffusion", "toy_token": "token"}
ACTIONS = ["remove the red circle", "move the blue square left"]
IDM_SIZE = 96
"""Frames are resized to this before the IDM's processor (a tiny checkpoint's vision tower is cheap at any size)."""


def _png(seed: int, size: int = 96) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


FRAMES = [_png(s) for s in range(3)]


def _batch() -> dict[str, np.ndarray]:
    return {"source": np.array(FRAMES[:2], dtype=object), "target": np.array(FRAMES[1:], dtype=object),
            "action": np.array(ACTIONS)}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    from test_device_guard import tiny_checkpoints

    return tiny_checkpoints(tmp_path_factory.mktemp("gpu"))


def _three_lora_steps(module: torch.nn.Module, batch: dict[str, torch.Tensor]) -> list[float]:
    """Three optimizer steps with the module in bf16, as DeepSpeed's bf16 runs it (the profiles' training)."""
    module = module.to(DEVICE, torch.bfloat16).train()
    trainable = {n: p for n, p in module.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable), sorted(trainable)[:3]
    before = {n: p.detach().clone() for n, p in trainable.items()}
    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-3)
    losses = []
    for _ in range(3):
        loss = module(**{k: v.to(DEVICE) for k, v in batch.items()})
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss))
    assert all(p.device.type == DEVICE for p in trainable.values())
    assert any(not torch.equal(before[n], p) for n, p in trainable.items()), "no LoRA weight moved"
    assert np.isfinite(losses).all(), losses
    return losses


def _idm(model: str, dtype: str, device: str = DEVICE) -> InverseDynamicsModel:
    profile = load(AnnotateConfig, REPO / PROFILES["diffusion"]).idm
    return InverseDynamicsModel.load(dataclasses.replace(profile, model=model, dtype=dtype, device=device,
                                                         image_size=IDM_SIZE, max_new_tokens=4))


@pytest.mark.parametrize("family", IDM_FAMILIES)
def test_idm_family_labels_scores_and_trains_on_cuda(checkpoints: dict[str, str], family: str) -> None:
    dtype = load(AnnotateConfig, REPO / PROFILES["diffusion"]).idm.dtype
    assert dtype == "bfloat16"
    idm = _idm(checkpoints[family], dtype)
    assert idm.device.type == DEVICE
    labels = idm.label(FRAMES[:2], FRAMES[1:], seed=0)
    assert len(labels) == 2 and all(np.isfinite(x.logprob) and x.num_tokens > 0 for x in labels), labels
    scores = idm.score(FRAMES[0], FRAMES[1:], ACTIONS[0])
    reference = _idm(checkpoints[family], "float32", "cpu").score(FRAMES[0], FRAMES[1:], ACTIONS[0])
    np.testing.assert_allclose(scores, reference, rtol=0.05)  # the CPU's float32 likelihood, to bf16's precision
    _three_lora_steps(idm.training_module(LoRAConfig(enabled=True)), idm.collate(_batch()))


def _world_model(name: str, checkpoints: dict[str, str], **kw: object) -> WorldModelConfig:
    model = checkpoints.get(name, "toy")
    return WorldModelConfig(backend=WORLD_MODELS[name], model=model, num_inference_steps=4, device=DEVICE,
                            resolution=64 if model == "toy" else None, **kw)


@pytest.mark.parametrize("name", list(WORLD_MODELS))
def test_world_model_family_samples_best_of_4_and_trains_on_cuda(checkpoints: dict[str, str], name: str) -> None:
    backend, toy = WORLD_MODELS[name], name.startswith("toy")
    dtype = "float32" if toy else serve_config({"profile": str(REPO / PROFILES[backend])}).world_model.dtype
    token = TokenSamplingConfig(temperature=1.0, guidance_scale=5.0)
    world_model = load_world_model(_world_model(name, checkpoints, dtype=dtype, token=token))
    verifier = _idm(checkpoints["qwen2_vl"], "bfloat16")
    searches = best_of_n(world_model, verifier, FRAMES[:2], ACTIONS, best_of=4, seed=3)
    for search in searches:
        assert len(search.candidates) == 4 and np.isfinite(search.scores).all()
        assert search.scores[search.order[0]] == max(search.scores)
        pixels = [np.asarray(c, dtype=np.float32) for c in search.candidates]
        assert all(np.abs(pixels[0] - p).mean() > 1.0 for p in pixels[1:]), "four seeds, four different candidates"

    trainee = load_world_model(_world_model(name, checkpoints, lora=LoRAConfig(enabled=True)), RecognitionConfig())
    _three_lora_steps(trainee.training_module(), trainee.collate(_batch()))


# -- Serve: best-of-N through the openai client, replicas on the GPU --------------------------------------------------
APPS = {"ip2p-qwen2vl": ("instruct_pix2pix", "qwen2_vl"), "janus-idefics3": ("janus", "idefics3")}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(checkpoints: dict[str, str]) -> dict[str, object]:
    import ray
    from ray import serve

    from cwm_ray.config import to_dict
    from cwm_ray.serve.app import Ingress, VerifierDeployment, WorldModelDeployment, _resolved

    os.environ["RAY_AUTH_MODE"] = "disabled"
    port = _free_port()
    ray.init(num_cpus=max(8, os.cpu_count() or 1), include_dashboard=False)  # logical: 2 apps x 2.1 CPUs
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        for app, (family, verifier) in APPS.items():
            backend = WORLD_MODELS[family]
            cfg = _resolved(serve_config({
                "profile": str(REPO / PROFILES[backend]),  # the profile's serve dtypes, prompt and sampling
                "world_model": {"model": checkpoints[family], "adapter": None, "device": DEVICE,
                                "num_inference_steps": 4},
                "idm": {"model": checkpoints[verifier], "device": DEVICE, "image_size": IDM_SIZE},
                "api_keys_env": "CWM_TEST_GPU_NO_KEYS"}))
            share = {"num_cpus": 1, "num_gpus": GPU_SHARE}
            wm = WorldModelDeployment.options(ray_actor_options=share).bind(to_dict(cfg.world_model),
                                                                             cfg.limits.max_best_of)
            idm = VerifierDeployment.options(ray_actor_options=share).bind(to_dict(cfg.idm), cfg.limits.max_best_of)
            serve.run(Ingress.bind(wm, idm, to_dict(cfg)), name=app, route_prefix=f"/{app}")
        yield {"url": f"http://127.0.0.1:{port}"}
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.mark.parametrize("app", list(APPS))
def test_serve_best_of_n_through_the_openai_client_on_cuda(served: dict[str, object], app: str) -> None:
    import httpx
    from openai import OpenAI

    url = f"{served['url']}/{app}"
    client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)
    result = client.images.edit(image=("frame.png", FRAMES[0], "image/png"), prompt=ACTIONS[0], n=2,
                                response_format="b64_json", extra_body={"best_of": 4, "seed": 5})
    images = [Image.open(io.BytesIO(base64.b64decode(d.b64_json))) for d in result.data]
    assert len(images) == 2 and all(im.size == (96, 96) for im in images)  # the source's size
    health = httpx.get(f"{url}/healthz", timeout=60).json()
    for part in ("world_model", "verifier"):
        assert health[part]["device"].startswith(DEVICE), health  # a replica without its GPU share would say cpu
        assert health[part]["dtype"] in ("float16", "bfloat16"), health
        assert health[part]["calls"] >= 1, health
