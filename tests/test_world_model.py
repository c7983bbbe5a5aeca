"""The diffusion world model, built tiny, saved with save_pretrained and loaded by path (never mocked)."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cwm_ray.config import LoRAConfig, ToyWorldConfig, WorldModelConfig
from cwm_ray.schema import encode_image, weights_to_bytes
from cwm_ray.toyworld.diffusion_model import build_toy_world_model
from cwm_ray.toyworld.render import render
from cwm_ray.toyworld.world import random_scene
from cwm_ray.world_model import WorldModel, load_world_model
from cwm_ray.world_model.diffusion import LORA_WEIGHT_NAME

TINY = {"resolution": 16, "patch_size": 2, "block_out_channels": (8, 16), "text_hidden_size": 16}
ACTIONS = ["move the red circle left", "remove the blue square", "make the green cross red"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("toy_world_model")
    build_toy_world_model(str(path), seed=0, **TINY)
    return str(path)


def _load(model: str, **kw: object) -> WorldModel:
    return load_world_model(WorldModelConfig(model=model, resolution=16, num_inference_steps=3, device="cpu", **kw))


def _images(n: int, seed: int = 0) -> list[bytes]:
    rng = random.Random(seed)
    return [encode_image(render(random_scene(rng, ToyWorldConfig()), ToyWorldConfig())) for _ in range(n)]


def _batch(n: int = 3) -> dict[str, np.ndarray]:
    """A Ray Data numpy batch, as `iter_torch_batches(collate_fn=...)` hands it over."""
    return {"source": np.array(_images(n, 0), dtype=object), "target": np.array(_images(n, 1), dtype=object),
            "action": np.array(ACTIONS[:n], dtype=object)}


def test_loads_by_path_as_a_pixel_space_instruct_pix2pix(tiny_dir: str) -> None:
    wm = _load(tiny_dir)
    assert isinstance(wm, WorldModel)
    assert wm.vae is None and wm.unet.config.in_channels == 2 * wm.unet.config.out_channels == 24
    assert wm.noise_scheduler.config.prediction_type == "v_prediction"
    assert wm.encode_features(_images(2)).shape == (2, 12, 8, 8)


def test_unknown_backend_is_named() -> None:
    with pytest.raises(ValueError, match="'tokens'"):
        load_world_model(WorldModelConfig(backend="tokens", model="toy"))


def test_all_ones_weights_are_exactly_the_plain_mse(tiny_dir: str) -> None:
    wm = _load(tiny_dir)
    batch = wm.collate(_batch())
    inputs = {k: v for k, v in batch.items() if k != "weights"}
    torch.manual_seed(0)
    weighted = wm.loss(inputs, torch.ones(3, 4, 4))  # any grid: pooled to the 8×8 latent grid
    torch.manual_seed(0)
    model_pred, target = wm.module.predict(**inputs)
    plain = F.mse_loss(model_pred.float(), target.float(), reduction="mean")
    torch.testing.assert_close(weighted, plain, rtol=1e-6, atol=0)
    torch.manual_seed(0)
    assert torch.equal(wm.loss(inputs, None), weighted)
    torch.manual_seed(0)
    assert not torch.allclose(wm.loss(inputs, batch["weights"]), plain)  # recognition weights do change it


def test_gradient_concentrates_where_the_weights_are(tiny_dir: str) -> None:
    wm = _load(tiny_dir)
    module = wm.training_module()
    batch = wm.collate(_batch())
    weights = torch.zeros(3, 4, 4)
    weights[:, 0, 0] = 16.0  # the top-left quarter-by-quarter block: latent positions [0:2, 0:2]
    captured: list[torch.Tensor] = []

    def keep(_module: torch.nn.Module, _args: object, out: tuple[torch.Tensor, ...]) -> None:
        out[0].retain_grad()
        captured.append(out[0])

    handle = wm.unet.register_forward_hook(keep)
    try:
        module(**{**batch, "weights": weights}).backward()
    finally:
        handle.remove()
    grad = captured[0].grad.abs()
    assert grad[..., :2, :2].min() > 0
    inside = torch.zeros_like(grad, dtype=torch.bool)
    inside[..., :2, :2] = True
    assert grad[~inside].max() == 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in wm.unet.parameters())
    assert all(p.grad is None for p in wm.text_encoder.parameters())


def test_sample_is_one_batched_seeded_run(tiny_dir: str) -> None:
    wm = _load(tiny_dir)
    sources, actions = _images(2), ACTIONS[:2]
    batch_sizes: list[int] = []
    handle = wm.unet.register_forward_pre_hook(lambda _m, args: batch_sizes.append(args[0].shape[0]))
    try:
        out = wm.sample(sources, actions, n=3, seed=7)
    finally:
        handle.remove()
    assert [len(c) for c in out] == [3, 3]
    assert all(im.size == (16, 16) and im.mode == "RGB" for c in out for im in c)
    assert batch_sizes == [3 * 2 * 3] * 3  # (text+image, image, neither) × inputs × n, once per DDIM step

    arrays = lambda cands: np.stack([np.asarray(im, np.int16) for c in cands for im in c])  # noqa: E731
    assert np.array_equal(arrays(out), arrays(wm.sample(sources, actions, n=3, seed=7)))
    assert not np.array_equal(arrays(out), arrays(wm.sample(sources, actions, n=3, seed=8)))
    assert not np.array_equal(arrays([out[0][:1]]), arrays([out[0][1:2]]))  # candidates differ
    alone = wm.sample(sources[:1], actions[:1], n=1, seed=7)  # candidate (0, 0) ignores the rest of the batch
    assert np.abs(arrays(alone) - arrays([out[0][:1]])).max() <= 1


def test_sample_takes_n_and_seed_per_input(tiny_dir: str) -> None:
    """Serve batches requests that differ in n and seed: each input must come out as if sampled alone."""
    wm = _load(tiny_dir)
    sources, actions = _images(2), ACTIONS[:2]
    arrays = lambda cands: np.stack([np.asarray(im, np.int16) for im in cands])  # noqa: E731
    mixed = wm.sample(sources, actions, n=[1, 3], seed=[5, 9])
    assert [len(c) for c in mixed] == [1, 3]
    first = wm.sample(sources[:1], actions[:1], n=1, seed=5)[0]
    second = wm.sample(sources[1:], actions[1:], n=3, seed=9)[0]
    assert np.abs(arrays(mixed[0]) - arrays(first)).max() <= 1  # float sums may differ by batch size
    assert np.abs(arrays(mixed[1]) - arrays(second)).max() <= 1
    assert not np.array_equal(arrays(second[:1]), arrays(wm.sample(sources[1:], actions[1:], n=1, seed=10)[0]))
    with pytest.raises(ValueError, match="one n"):
        wm.sample(sources, actions, n=[1], seed=0)


def test_full_fine_tuning_trains_the_unet_and_round_trips(tiny_dir: str, tmp_path: Path) -> None:
    wm = _load(tiny_dir)
    module = wm.training_module()
    assert all(p.requires_grad for p in wm.unet.parameters())
    assert not any(p.requires_grad for p in wm.text_encoder.parameters())
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-2)
    module(**wm.collate(_batch())).backward()
    opt.step()
    wm.save(str(tmp_path / "ft"))
    assert {p.name for p in (tmp_path / "ft").iterdir()} == {"unet", "text_encoder", "tokenizer", "scheduler"}
    assert (tmp_path / "ft" / "unet" / "diffusion_pytorch_model.safetensors").exists()
    again = _load(str(tmp_path / "ft"))
    for (name, a), b in zip(wm.unet.state_dict().items(), again.unet.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    base = _load(tiny_dir)
    assert not torch.equal(base.unet.conv_in.weight, again.unet.conv_in.weight)


def test_lora_trains_only_the_adapter_and_round_trips(tiny_dir: str, tmp_path: Path) -> None:
    lora = LoRAConfig(enabled=True, r=4, alpha=8, dropout=0.0)  # no targets: diffusers' to_q, to_k, to_v, to_out.0
    wm = _load(tiny_dir, lora=lora)
    assert set(wm.unet.peft_config["default"].target_modules) == {"to_q", "to_k", "to_v", "to_out.0"}
    module = wm.training_module()
    trainable = [n for n, p in module.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-1)
    module(**wm.collate(_batch())).backward()
    opt.step()
    wm.save(str(tmp_path / "adapter"))
    assert [p.name for p in (tmp_path / "adapter").iterdir()] == [LORA_WEIGHT_NAME]  # adapter only

    x = torch.randn(2, 24, 8, 8, generator=torch.Generator().manual_seed(0))
    text = torch.randn(2, 16, 16, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([10, 500])
    wm.unet.eval()
    with torch.no_grad():
        trained = wm.unet(x, t, text).sample
        merged = _load(tiny_dir, adapter=str(tmp_path / "adapter")).unet(x, t, text).sample
        resumed = _load(tiny_dir, adapter=str(tmp_path / "adapter"), lora=lora).unet.eval()(x, t, text).sample
        base = _load(tiny_dir).unet(x, t, text).sample
    torch.testing.assert_close(merged, trained, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(resumed, trained, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(base, trained, atol=1e-4)


def test_collate_takes_precomputed_weights_at_any_grid(tiny_dir: str) -> None:
    wm = _load(tiny_dir)
    batch = _batch(2)
    maps = [np.full((4, 4), 1.0), np.arange(16.0).reshape(4, 4) / 7.5]
    encoded = [weights_to_bytes(m) for m in maps]
    batch["weights"] = np.array([b for b, _ in encoded], dtype=object)
    batch["weights_shape"] = np.array([s for _, s in encoded])
    out = wm.collate(batch)
    assert out["original_pixel_values"].shape == out["edited_pixel_values"].shape == (2, 3, 16, 16)
    assert out["input_ids"].shape == (2, wm.tokenizer.model_max_length)
    assert out["weights"].shape == (2, 8, 8)
    assert torch.all(out["weights"][0] == 1)
    torch.testing.assert_close(out["weights"][1, :2, :2], torch.full((2, 2), 0.0))
    computed = wm.collate(_batch(2))["weights"]  # no weights column: recognition from encode_features
    assert computed.shape == (2, 8, 8) and computed.min() >= 0.1 - 1e-6
    torch.testing.assert_close(computed.mean(dim=(1, 2)), torch.ones(2))
    # a gold + synthetic batch: the stored map where there is one, the encoder's for the row without
    batch["weights"] = np.array([encoded[1][0], None], dtype=object)
    batch["weights_shape"] = np.array([encoded[1][1], None], dtype=object)
    mixed = wm.collate(batch)["weights"]
    torch.testing.assert_close(mixed[0], out["weights"][1])
    torch.testing.assert_close(mixed[1], computed[1])


def test_loads_from_s3(tiny_dir: str, s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CWM_RAY_CACHE", str(tmp_path / "cache"))
    _load(tiny_dir).save(f"{s3_bucket}/models/wm")
    wm = _load(f"{s3_bucket}/models/wm")
    assert torch.equal(wm.unet.conv_in.weight, _load(tiny_dir).unet.conv_in.weight)
    assert [len(c) for c in wm.sample(_images(1), ACTIONS[:1], n=2, seed=0)] == [2]


def test_loads_a_latent_instruct_pix2pix_pipeline_directory(tmp_path: Path) -> None:
    """A real checkpoint's layout (model_index.json, vae/ ...): latents come from the VAE, scaled as diffusers does."""
    from diffusers import AutoencoderKL, StableDiffusionInstructPix2PixPipeline

    toy = build_toy_world_model(None, resolution=16, patch_size=1, block_out_channels=(8, 16), text_hidden_size=16)
    unet = type(toy.unet).from_config({**toy.unet.config, "in_channels": 8, "out_channels": 4, "sample_size": 8})
    vae = AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
                        scaling_factor=0.5)
    StableDiffusionInstructPix2PixPipeline(
        vae=vae, text_encoder=toy.text_encoder, tokenizer=toy.tokenizer, unet=unet, scheduler=toy.noise_scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    ).save_pretrained(tmp_path / "ip2p")
    wm = _load(str(tmp_path / "ip2p"))
    assert wm.vae is not None and wm.vae_scale_factor == 2
    batch = wm.collate(_batch(2))
    features = wm.encode_features(batch["original_pixel_values"])
    assert features.shape == (2, 4, 8, 8)
    torch.testing.assert_close(features, wm.vae.encode(batch["original_pixel_values"]).latent_dist.mean)
    assert batch["weights"].shape == (2, 8, 8)
    assert torch.isfinite(wm.training_module()(**batch))
    assert [[im.size for im in c] for c in wm.sample(_images(1), ACTIONS[:1], n=2)] == [[(16, 16)] * 2]
    wm.save(str(tmp_path / "saved"))
    assert (tmp_path / "saved" / "model_index.json").exists() and (tmp_path / "saved" / "vae").is_dir()
    pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(tmp_path / "saved")  # diffusers reads it too
    assert pipe.unet.config.in_channels == 8
