"""Tiny random checkpoints of the real families (InstructPix2Pix, Janus), loaded by path through production code.

The toy models are pixel-space or constructed at 64 px; these are the published classes (a VAE, a CLIP-style
tokenizer, Janus's 16× VQ and special tokens) at their own native sides, through the real CLIs: LoRA training
(`jobs/train_world_model.py`) and best-of-N evaluation of the exported adapter (`jobs/evaluate.py`).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cwm_ray.config import ConfigError, LoRAConfig, ToyCorpusConfig, WorldModelConfig
from cwm_ray.tiny.world_model import BACKEND, JANUS_TINY_SIDE, WORLD_MODEL_FAMILIES, build_tiny_world_model
from cwm_ray.world_model import load_world_model

REPO = Path(__file__).resolve().parents[1]
NATIVE = {"instruct_pix2pix": 256, "janus": JANUS_TINY_SIDE}
ACTION = "move the red circle left"


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The tiny checkpoints of both families, a small toy gold set and a toy verifier IDM."""
    from cwm_ray.toyworld.corpus import make_corpus
    from cwm_ray.toyworld.idm_model import build_toy_idm

    root = tmp_path_factory.mktemp("families")
    out = {family: build_tiny_world_model(family, str(root / family)) for family in WORLD_MODEL_FAMILIES}
    make_corpus(ToyCorpusConfig(output=str(root / "corpus"), num_videos=0, num_train=12, num_test=3))
    out["gold"] = str(root / "corpus" / "gold")
    build_toy_idm(str(root / "idm"), image_size=64)
    out["idm"] = str(root / "idm")
    return out


def _gold_png(assets: dict[str, str]) -> bytes:
    item = json.loads(Path(assets["gold"], "test.json").read_text())[0]
    return Path(assets["gold"], item["input"]).read_bytes()


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, f"jobs/{script}", *args], cwd=REPO, capture_output=True, text=True,
                          env=os.environ | {"RAY_AUTH_MODE": "disabled"}, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


@pytest.mark.parametrize("family", WORLD_MODEL_FAMILIES)
def test_lora_training_and_evaluation_through_the_clis(family: str, assets: dict[str, str], tmp_path: Path) -> None:
    """Train a LoRA adapter for 2 steps with the default (family) targets, then evaluate it with best-of-N.

    `resolution: null` means the checkpoint's native side; the 64 px toy frames are resized to it.
    """
    backend, model = BACKEND[family], assets[family]
    export = tmp_path / "export"
    _run("train_world_model.py", "--config", "configs/train_world_model.yaml", f"world_model.backend={backend}",
         f"world_model.model={model}", "world_model.resolution=null", "world_model.lora.enabled=true",
         "world_model.lora.r=4", "world_model.lora.alpha=8", "world_model.train_text_encoder=false",
         "optim.max_steps=2", "optim.batch_size=2", "optim.warmup_steps=1", "train.log_every=1",
         "train.eval_every=2", "train.checkpoint_every=2", f"train.storage_path={tmp_path / 'runs'}",
         f"train.export={export}", "train.name=family", "data.val_fraction=0.25",
         f"data.sources=[{{uri: {assets['gold']}/train.json}}]", "scaling.num_workers=1",
         "scaling.cpus_per_worker=0.5", "deepspeed.enabled=false")
    adapter = {"instruct_pix2pix": "pytorch_lora_weights.safetensors", "janus": "adapter_model.safetensors"}[family]
    assert (export / adapter).is_file(), sorted(p.name for p in export.iterdir())

    wm = load_world_model(WorldModelConfig(backend=backend, model=model, adapter=str(export), device="cpu",
                                           num_inference_steps=2))
    assert wm.resolution == NATIVE[family]
    [candidates] = wm.sample([_gold_png(assets)], [ACTION], n=1, seed=0)
    assert candidates[0].size == (NATIVE[family], NATIVE[family])

    out = tmp_path / "eval"
    _run("evaluate.py", f"bench={assets['gold']}/test.json", f"world_model.backend={backend}",
         f"world_model.model={model}", f"world_model.adapter={export}", "world_model.resolution=null",
         "world_model.num_inference_steps=2", f"idm.model={assets['idm']}", "idm.image_size=64", "best_of=[1,2]",
         f"output={out}", "world_model_stage.batch_size=4", "verifier_stage.batch_size=4", "report_examples=2")
    results = json.loads((out / "results.json").read_text())
    model_rows = [r for r in results["rows"] if r["system"] != "copy"]
    assert len(model_rows) == 2 * 3 and all(isinstance(r["verifier_logp"], float) for r in model_rows)


@pytest.mark.parametrize("family", WORLD_MODEL_FAMILIES)
def test_a_lora_export_is_an_adapter_that_reloads_with_the_same_outputs_and_differs_from_the_base(
        family: str, assets: dict[str, str], tmp_path: Path) -> None:
    """A LoRA world model exports its adapter alone; base + adapter loads back with the live model's loss and
    samples, and the base alone scores otherwise (the adapter is neither lost nor a no-op)."""
    import numpy as np
    import torch

    backend, model = BACKEND[family], assets[family]
    small = {"resolution": 64} if family == "instruct_pix2pix" else {}  # the tiny UNet at 64 px: 1/16 of the work
    lora = load_world_model(WorldModelConfig(backend=backend, model=model, device="cpu", num_inference_steps=2,
                                             lora=LoRAConfig(enabled=True, r=4, alpha=8, dropout=0.0), **small))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # B starts at zero (the adapter is a no-op); a trained adapter is not
        for name, param in lora.training_module().named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    lora.save(str(tmp_path / "adapter"))
    assert not list((tmp_path / "adapter").glob("*/")), "an adapter export holds no base model"
    adapted = load_world_model(WorldModelConfig(backend=backend, model=model, adapter=str(tmp_path / "adapter"),
                                                device="cpu", num_inference_steps=2, **small))
    base = load_world_model(WorldModelConfig(backend=backend, model=model, device="cpu", num_inference_steps=2,
                                             **small))
    gold = json.loads(Path(assets["gold"], "train.json").read_text())[:2]
    batch = {"source": np.array([Path(assets["gold"], it["input"]).read_bytes() for it in gold], dtype=object),
             "target": np.array([Path(assets["gold"], it["output"]).read_bytes() for it in gold], dtype=object),
             "action": np.array([it["instruction"] for it in gold], dtype=object)}

    def outputs(wm: object) -> tuple[float, np.ndarray]:
        collated = wm.collate(batch)
        torch.manual_seed(0)  # the diffusion loss draws noise, timesteps and conditioning dropout
        with torch.no_grad():
            loss = float(wm.loss({k: v for k, v in collated.items() if k != "weights"}))
        [candidates] = wm.sample([batch["source"][0]], [ACTION], n=1, seed=0)
        return loss, np.asarray(candidates[0], dtype=np.float32)

    (live_loss, live_image), (loss, image), (base_loss, _) = (outputs(m) for m in (lora, adapted, base))
    assert loss == pytest.approx(live_loss, rel=1e-5) and np.abs(image - live_image).mean() < 0.5
    # The base alone scores otherwise (measured: 0.28 % for IP2P, whose samples also differ, 27 of 255 per pixel; 0.06 %
    # for the tiny Janus, whose greedy-enough samples do not change): 10x and more the reloaded copy's difference.
    assert abs(base_loss - live_loss) > 1e-4 * abs(live_loss), (base_loss, live_loss)


@pytest.mark.parametrize(("family", "wrong", "named"), [
    ("instruct_pix2pix", ["q_proj", "v_proj"], "InstructPix2Pix UNet"),
    ("janus", ["to_q", "to_out.0"], "Janus"),
])
def test_a_lora_target_of_the_other_family_is_a_config_error(family: str, wrong: list[str], named: str,
                                                             assets: dict[str, str]) -> None:
    cfg = WorldModelConfig(backend=BACKEND[family], model=assets[family], device="cpu",
                           lora=LoRAConfig(enabled=True, target_modules=wrong))
    with pytest.raises(ConfigError, match=rf"{named}.*no module named {wrong[0]}.*usual targets"):
        load_world_model(cfg)


def test_the_instruct_pix2pix_directory_is_a_diffusers_pipeline(assets: dict[str, str]) -> None:
    """diffusers itself loads and runs it, at the native side (`sample_size` 32 × the VAE's 8)."""
    from diffusers import StableDiffusionInstructPix2PixPipeline
    from PIL import Image

    pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(assets["instruct_pix2pix"])
    assert pipe.vae_scale_factor == 8 and pipe.unet.config.in_channels == 8
    image = Image.open(io.BytesIO(_gold_png(assets))).convert("RGB").resize((256, 256))
    out = pipe(ACTION, image=image, num_inference_steps=1, output_type="pil").images[0]
    assert out.size == (256, 256)


def test_the_janus_directory_has_janus_special_tokens_and_processor(assets: dict[str, str]) -> None:
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(assets["janus"])
    assert type(processor).__name__ == "JanusProcessor"
    tok = processor.tokenizer
    assert (tok.image_token, tok.boi_token, tok.eoi_token) == ("<image_placeholder>", "<begin_of_image>",
                                                               "<end_of_image>")
    assert tok.bos_token == "<｜begin▁of▁sentence｜>" and tok.pad_token == "<｜▁pad▁｜>"
    wm = load_world_model(WorldModelConfig(backend="token", model=assets["janus"], device="cpu"))
    assert wm.module.grid == JANUS_TINY_SIDE // 16 and wm.resolution == JANUS_TINY_SIDE


def test_the_real_sizes_are_the_published_ones() -> None:
    """On the meta device (nothing allocated): SD-1.5's parameter counts, with IP2P's 8-channel conv_in, and
    Janus-Pro-1B's 384 px VQ side (24×24 tokens at 16×)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, JanusForConditionalGeneration

    from cwm_ray.tiny.world_model import instruct_pix2pix_configs, janus_config

    cfg = instruct_pix2pix_configs("real", resolution=512)
    with torch.device("meta"):
        parts = (UNet2DConditionModel(**cfg["unet"]), AutoencoderKL(**cfg["vae"]),
                 CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"])))
        janus = JanusForConditionalGeneration(janus_config("real"))
    assert [sum(p.numel() for p in m.parameters()) for m in parts] == [859_532_484, 83_653_863, 123_060_480]
    vq = janus.config.vq_config
    assert vq.num_patches * 2 ** (len(vq.channel_multiplier) - 1) == 384 and vq.num_patches**2 == 576
    assert 2.0e9 < sum(p.numel() for p in janus.parameters()) < 2.1e9
