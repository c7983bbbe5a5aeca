"""Serve best-of-N on real families, through the openai client: each model profile's `serve` section with tiny
random checkpoints of its real classes (InstructPix2Pix at 256 px, Janus) and a verifier of each IDM family
(Qwen2-VL, SmolVLM/Idefics3, LLaVA, Qwen2.5-VL).

The app is built as `serve run cwm_ray.serve.app:build_app profile=configs/real/...` builds it, with only the
model paths, device and step count overridden, so the profile's sizes (None = each checkpoint's own), prompt
and sampling settings are the ones served. Best-of-N must return the candidate the real-family verifier,
loaded directly, scores highest.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import os
import random
import socket
from pathlib import Path

import httpx
import numpy as np
import pytest
import ray
from PIL import Image
from ray import serve

from cwm_ray.config import ToyWorldConfig
from cwm_ray.idm import InverseDynamicsModel
from cwm_ray.serve.app import serve_config
from cwm_ray.tiny.idm import build_tiny_idm
from cwm_ray.tiny.world_model import build_tiny_world_model
from cwm_ray.toyworld.render import render
from cwm_ray.toyworld.world import random_scene

REPO = Path(__file__).resolve().parents[1]
PROFILES = {"instruct_pix2pix": ("configs/real/qwen25vl7b_ip2p.yaml", 256),
            "janus": ("configs/real/qwen25vl7b_janus_pro_1b.yaml", 96)}
APPS = {"ip2p-qwen2vl": ("instruct_pix2pix", "qwen2_vl"), "janus-idefics3": ("janus", "idefics3"),
        "ip2p-llava": ("instruct_pix2pix", "llava"), "janus-qwen25vl": ("janus", "qwen2_5_vl")}
"""Each world-model family served, and each IDM family as its verifier: (world model, verifier) per app; the last
is the pair `configs/real/qwen25vl7b_janus_pro_1b.yaml` names."""
ACTION = "remove the red circle"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _png(seed: int, size: int = 224) -> bytes:
    world = ToyWorldConfig(image_size=size)
    buf = io.BytesIO()
    Image.fromarray(render(random_scene(random.Random(seed), world), world)).save(buf, "PNG")
    return buf.getvalue()


def _decode(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    from cwm_ray.serve.app import build_app

    root = tmp_path_factory.mktemp("serve_families")
    models = {f: build_tiny_world_model(f, str(root / f)) for f in PROFILES}
    models |= {f: build_tiny_idm(f, str(root / f)) for _, f in APPS.values()}
    port = _free_port()
    os.environ["RAY_AUTH_MODE"] = "disabled"
    # Four apps of three deployments (1 + 1 + 0.1 CPUs each): logical CPUs for all, whatever the machine's cores.
    ray.init(num_cpus=9, include_dashboard=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        for app, (family, verifier) in APPS.items():
            serve.run(build_app({
                "profile": PROFILES[family][0], "root": str(root),  # not the profile's placeholder root
                "world_model": {"model": models[family], "adapter": None, "dtype": "float32", "device": "cpu",
                                "num_inference_steps": 2},
                "idm": {"model": models[verifier], "dtype": "float32", "device": "cpu"},
                "api_keys_env": "CWM_TEST_FAMILIES_NO_KEYS",
            }), name=app, route_prefix=f"/{app}")
        yield {"url": f"http://127.0.0.1:{port}", "models": models}
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.mark.parametrize("app", list(APPS))
def test_best_of_n_through_the_openai_client_with_a_real_family_verifier(served: dict, app: str) -> None:
    from openai import OpenAI

    family, verifier_family = APPS[app]
    url = f"{served['url']}/{app}"
    client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)
    result = client.images.edit(image=("frame.png", _png(1), "image/png"), prompt=ACTION, n=1,
                                response_format="b64_json", extra_body={"best_of": 3, "seed": 5})
    assert len(result.data) == 1 and _decode(result.data[0].b64_json).size == (224, 224)  # the source's size

    source = _png(2)
    with httpx.Client(base_url=url, timeout=300) as http:
        r = http.post("/v1/predict", json={"image": base64.b64encode(source).decode(), "action": ACTION,
                                           "best_of": 3, "seed": 7, "return_candidates": True})
        assert r.status_code == 200, r.text
        out = r.json()
        info = http.get("/healthz").json()
    native = PROFILES[family][1]
    candidates = [_decode(c["image"]) for c in out["candidates"]]
    assert len(candidates) == 3 and all(c.size == (native, native) for c in candidates), [c.size for c in candidates]
    profile_idm = serve_config({"profile": PROFILES[family][0]}).idm  # the served prompt and settings
    verifier = InverseDynamicsModel.load(dataclasses.replace(profile_idm, model=served["models"][verifier_family],
                                                             dtype="float32", device="cpu"))
    direct = verifier.score(source, candidates, ACTION)
    np.testing.assert_allclose([c["score"] for c in out["candidates"]], direct, rtol=1e-4, atol=1e-3)
    assert out["chosen"] == int(np.argmax(direct))
    assert info, info
