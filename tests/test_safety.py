"""Loading is safe by default: only safetensors weights, and no repository code unless the config allows it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cwm_ray.config import IDMConfig, WorldModelConfig
from cwm_ray.idm import InverseDynamicsModel
from cwm_ray.toyworld.diffusion_model import build_toy_world_model
from cwm_ray.toyworld.idm_model import build_toy_idm
from cwm_ray.world_model import load_world_model

pytestmark = pytest.mark.fault


def test_idm_refuses_pickled_weights(tmp_path: Path) -> None:
    import torch

    model, _ = build_toy_idm(str(tmp_path), image_size=32, hidden_size=32, text_layers=1)
    for f in tmp_path.glob("*.safetensors"):  # the same weights, pickled (transformers 5 only writes safetensors)
        f.unlink()
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    assert list(tmp_path.glob("*.bin")) and not list(tmp_path.glob("*.safetensors"))
    with pytest.raises((OSError, ValueError)):
        InverseDynamicsModel.load(IDMConfig(model=str(tmp_path), image_size=32, device="cpu"))


def test_world_model_refuses_pickled_weights(tmp_path: Path) -> None:
    wm = build_toy_world_model(str(tmp_path), resolution=16, patch_size=1, block_out_channels=(8, 16),
                               text_hidden_size=16)
    for f in (tmp_path / "unet").glob("*.safetensors"):
        f.unlink()
    wm.unet.save_pretrained(tmp_path / "unet", safe_serialization=False)
    assert list((tmp_path / "unet").glob("*.bin"))
    with pytest.raises((OSError, ValueError, EnvironmentError)):
        load_world_model(WorldModelConfig(model=str(tmp_path), resolution=16, device="cpu"))


def test_repository_code_never_runs_unless_trust_remote_code(tmp_path: Path) -> None:
    build_toy_idm(str(tmp_path), image_size=32, hidden_size=32, text_layers=1)
    marker = tmp_path / "code_ran"
    (tmp_path / "evil.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
        "from transformers import LlavaConfig\nclass EvilConfig(LlavaConfig):\n    pass\n")
    config = json.loads((tmp_path / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    try:  # transformers may refuse, or load its own LLaVA class; either way the repository's code must not run
        InverseDynamicsModel.load(IDMConfig(model=str(tmp_path), image_size=32, device="cpu"))
    except ValueError as exc:
        assert "trust_remote_code" in str(exc)
    assert not marker.exists()
    try:  # the same checkpoint with the switch on does run it, so the check above can fail
        InverseDynamicsModel.load(IDMConfig(model=str(tmp_path), image_size=32, device="cpu", trust_remote_code=True))
    except Exception:  # noqa: BLE001 - the stand-in config class need not load fully; it ran, which is the point
        pass
    assert marker.exists()
