"""Recognition weights: the maps themselves, and the map_batches actor on a tiny world model loaded by path."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cwm_ray.config import ConfigError, RecognitionConfig, ToyWorldConfig, WorldModelConfig
from cwm_ray.recognition import RecognitionWeights, fade_to_uniform, recognition_weights
from cwm_ray.schema import encode_image, weights_from_bytes
from cwm_ray.toyworld.diffusion_model import build_toy_world_model
from cwm_ray.toyworld.render import render
from cwm_ray.toyworld.world import Obj, Scene
from cwm_ray.world_model import load_world_model


def test_mean_one_and_floor() -> None:
    g = torch.Generator().manual_seed(0)
    src, tgt = torch.randn(3, 4, 6, 5, generator=g), torch.randn(3, 4, 6, 5, generator=g)
    w = recognition_weights(src, tgt, floor=0.3)
    assert w.shape == (3, 6, 5)
    torch.testing.assert_close(w.mean(dim=(1, 2)), torch.ones(3))
    assert w.min() >= 0.3 - 1e-6
    assert torch.all(recognition_weights(src, tgt, floor=1.0) == 1)  # floor 1 = the unweighted loss


def test_high_where_source_and_target_differ() -> None:
    src = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    tgt = src.clone()
    tgt[0, :, 2:4, 5:7] += 3.0  # image 0 changes in a 2×2 region; image 1 does not change at all
    w = recognition_weights(src, tgt, floor=0.1)
    changed = torch.zeros(8, 8, dtype=torch.bool)
    changed[2:4, 5:7] = True
    assert w[0][changed].min() > 10 * w[0][~changed].max()
    torch.testing.assert_close(w[0][~changed], torch.full((60,), 0.1))  # unchanged positions get the floor
    assert torch.all(w[1] == 1)  # identical images: all ones


def test_fade_to_uniform_keeps_the_mean_and_reaches_uniform_at_its_fraction_of_training() -> None:
    src, tgt = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)), torch.zeros(2, 4, 8, 8)
    w = recognition_weights(src, tgt, floor=0.1)
    fade = RecognitionConfig(uniform_by=0.5)
    torch.testing.assert_close(fade_to_uniform(w, fade, 0, 1000), w)  # the paper's weights at the start
    half = fade_to_uniform(w, fade, 250, 1000)  # halfway to uniform: halfway between w and 1
    torch.testing.assert_close(half, (w + 1) / 2)
    torch.testing.assert_close(half.mean(dim=(1, 2)), torch.ones(2))
    assert torch.all(fade_to_uniform(w, fade, 500, 1000) == 1) and torch.all(fade_to_uniform(w, fade, 999, 1000) == 1)
    assert torch.equal(fade_to_uniform(w, RecognitionConfig(), 999, 1000), w)  # None: weighted throughout
    assert torch.equal(fade_to_uniform(w, RecognitionConfig(enabled=False, uniform_by=0.5), 0, 1000), w)
    for bad in (0.0, 1.5):
        with pytest.raises(ConfigError, match="uniform_by"):
            RecognitionConfig(uniform_by=bad)


def test_shape_mismatch_is_an_error() -> None:
    with pytest.raises(ValueError, match="features"):
        recognition_weights(torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 2, 2), 0.1)


def _png(*objects: Obj) -> bytes:
    return encode_image(render(Scene(objects), ToyWorldConfig()))


@pytest.mark.parametrize("enabled", [True, False])
def test_map_batches_actor_adds_weight_columns(tmp_path: str, enabled: bool) -> None:
    build_toy_world_model(str(tmp_path), resolution=16, patch_size=2, block_out_channels=(8, 16), text_hidden_size=16)
    wm_cfg = WorldModelConfig(model=str(tmp_path), resolution=16, device="cpu")
    rec_cfg = RecognitionConfig(enabled=enabled, floor=0.1)
    actor = RecognitionWeights(load_world_model(wm_cfg, rec_cfg), rec_cfg)
    red, blue = Obj("square", "red", 0, 0), Obj("circle", "blue", 7, 7)
    batch = {
        "source": np.array([_png(red, blue), _png(red)], dtype=object),
        "target": np.array([_png(blue), _png(red)], dtype=object),  # row 0: the red square is removed
        "action": np.array(["remove the red square", "wait"], dtype=object),
    }
    out = actor(batch)
    assert set(out) == {"source", "target", "action", "weights", "weights_shape"}
    assert [list(s) for s in out["weights_shape"]] == [[8, 8], [8, 8]]
    maps = [weights_from_bytes(b, s) for b, s in zip(out["weights"], out["weights_shape"], strict=True)]
    assert all(len(b) == 2 * 8 * 8 for b in out["weights"])  # float16
    assert np.all(maps[1] == 1)
    if enabled:
        assert maps[0].mean() == pytest.approx(1.0, abs=1e-2)
        assert maps[0][0, 0] == maps[0].max() > 5 and maps[0][7, 7] == pytest.approx(0.1, abs=1e-3)
    else:
        assert np.all(maps[0] == 1)
    collated = actor.world_model.collate(out)  # the training side reads the columns back
    assert collated["weights"].shape == (2, 8, 8)
