"""The IDM on a tiny random LLaVA saved to disk and loaded by path, as production loads a hub id."""

from __future__ import annotations

import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from cwm_ray import storage
from cwm_ray.config import IDMConfig, LoRAConfig, ToyWorldConfig
from cwm_ray.idm import (
    InverseDynamicsModel,
    check_prompt,
    neighbourhood_offsets,
    patch_neighbourhood,
    tubelet_reach,
)
from cwm_ray.schema import encode_image
from cwm_ray.toyworld.idm_model import build_toy_idm
from cwm_ray.toyworld.render import render
from cwm_ray.toyworld.world import apply, parse_action, random_action, random_scene


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    out = tmp_path_factory.mktemp("tiny_idm")
    build_toy_idm(str(out), hidden_size=32, text_layers=1)
    return str(out)


def _cfg(path: str, **kw: object) -> IDMConfig:
    return IDMConfig(model=path, device="cpu", max_new_tokens=16, **kw)  # the longest toy action + EOS: 12


def _pairs(n: int, seed: int = 0) -> tuple[list[bytes], list[bytes], list[str]]:
    rng = random.Random(seed)
    world = ToyWorldConfig()
    sources, targets, actions = [], [], []
    while len(actions) < n:
        scene = random_scene(rng, world)
        action = random_action(scene, rng, world)
        sources.append(encode_image(render(scene, world)))
        targets.append(encode_image(render(apply(scene, action, world), world)))
        actions.append(action.text())
    return sources, targets, actions


@pytest.fixture(scope="module")
def trained(tiny_dir: str) -> tuple[InverseDynamicsModel, tuple[list[bytes], list[bytes], list[str]]]:
    """The tiny IDM after 150 steps through `training_module` + `collate` on four labelled pairs.

    That is enough to learn the action language (it answers with toy actions and stops), not to read
    the images: a model this small needs the full toy run for that (see tests/test_toy_training.py).
    """
    idm = InverseDynamicsModel.load(_cfg(tiny_dir))
    data = _pairs(4)
    batch = {"source": np.array(data[0], dtype=object), "target": np.array(data[1], dtype=object),
             "action": np.array(data[2], dtype=object)}
    module = idm.training_module()
    optim = torch.optim.AdamW(module.parameters(), lr=5e-3)
    torch.manual_seed(0)
    losses = []
    for _ in range(150):
        loss = module(**idm.collate(batch))
        optim.zero_grad()
        loss.backward()
        optim.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 5
    return idm, data


def test_labels_are_actions_scored_as_the_verifier_scores_them(trained: tuple) -> None:
    idm, (sources, targets, actions) = trained
    labels = idm.label(sources, targets)
    assert all(parse_action(lab.action) is not None for lab in labels)  # it speaks the toy language
    assert all(lab.action in actions for lab in labels)
    rescored = idm.score_batch(sources, targets, [lab.action for lab in labels])
    for lab, score in zip(labels, rescored, strict=True):
        assert lab.num_tokens == len(lab.action.split()) + 1  # the words, then EOS
        # the filter's log-likelihood (from generate) and the verifier's (teacher-forced) are one number
        assert lab.logprob == pytest.approx(float(score), abs=1e-4)
        assert lab.logprob < 0.0
    truth = idm.score_batch(sources, targets, actions)
    assert np.all(truth > -10) and np.all(truth < 0)


def test_scores_do_not_depend_on_the_batch(tiny_dir: str) -> None:
    idm = InverseDynamicsModel.load(_cfg(tiny_dir))
    sources, targets, actions = _pairs(5, seed=1)
    batched = idm.score_batch(sources, targets, actions)  # actions of different lengths: right padding
    alone = np.array([idm.score_batch([s], [t], [a])[0] for s, t, a in zip(sources, targets, actions, strict=True)])
    np.testing.assert_allclose(batched, alone, rtol=1e-4, atol=1e-4)
    assert np.all(batched < 0)


def test_sampled_labels_are_seeded(tiny_dir: str) -> None:
    idm = InverseDynamicsModel.load(_cfg(tiny_dir, do_sample=True, temperature=1.5))
    sources, targets, _ = _pairs(3, seed=2)
    a, b = idm.label(sources, targets, seed=7), idm.label(sources, targets, seed=7)
    assert a == b
    assert all(lab.num_tokens >= 1 and np.isfinite(lab.logprob) for lab in a)
    assert idm.label([], []) == []


def test_mismatched_inputs_are_errors(tiny_dir: str) -> None:
    idm = InverseDynamicsModel.load(_cfg(tiny_dir))
    sources, targets, actions = _pairs(2)
    with pytest.raises(ValueError, match="2 sources but 1 targets"):
        idm.label(sources, targets[:1])
    with pytest.raises(ValueError, match="2 pairs but 1 actions"):
        idm.score_batch(sources, targets, actions[:1])


def test_lora_adapts_only_the_language_model_and_saves_merged(tiny_dir: str, tmp_path: Path) -> None:
    idm = InverseDynamicsModel.load(_cfg(tiny_dir))
    module = idm.training_module(LoRAConfig(enabled=True, r=4, alpha=8, dropout=0.0))
    trainable = [n for n, p in module.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert not any("vision_tower" in n for n in trainable)  # the vision tower also has q_proj; it stays frozen
    sources, targets, actions = _pairs(4, seed=3)
    batch = {"source": np.array(sources, dtype=object), "target": np.array(targets, dtype=object),
             "action": np.array(actions, dtype=object)}
    optim = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        loss = module(**idm.collate(batch))
        optim.zero_grad()
        loss.backward()
        optim.step()
    live = idm.score_batch(sources, targets, actions)
    idm.save(str(tmp_path / "merged"))
    reloaded = InverseDynamicsModel.load(_cfg(str(tmp_path / "merged")))
    np.testing.assert_allclose(reloaded.score_batch(sources, targets, actions), live, rtol=1e-4, atol=1e-4)
    base = InverseDynamicsModel.load(_cfg(tiny_dir)).score_batch(sources, targets, actions)
    assert not np.allclose(base, live, atol=1e-3)  # the adapter did change the model


def test_loads_and_saves_on_s3(tiny_dir: str, s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CWM_RAY_CACHE", str(tmp_path / "cache"))  # a fresh download cache
    storage.upload_dir(tiny_dir, f"{s3_bucket}/idm")
    idm = InverseDynamicsModel.load(_cfg(f"{s3_bucket}/idm"))
    assert check_prompt(_cfg(f"{s3_bucket}/idm")) == idm.prompt  # the driver's check reads config and processor only
    sources, targets, actions = _pairs(2, seed=4)
    expected = InverseDynamicsModel.load(_cfg(tiny_dir)).score_batch(sources, targets, actions)
    np.testing.assert_allclose(idm.score_batch(sources, targets, actions), expected, rtol=1e-5)
    idm.save(f"{s3_bucket}/idm_copy")
    assert storage.exists(f"{s3_bucket}/idm_copy/model.safetensors")


def test_a_missing_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    """A path that is not there says so and names it (from_pretrained would take it for a malformed hub id)."""
    missing = str(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=rf"^no model directory at {re.escape(missing)}$"):
        InverseDynamicsModel.load(_cfg(missing))


def test_the_tubelet_neighbourhood_shows_each_patch_its_cross_of_neighbours() -> None:
    """Group g of the widened tubelet holds, at patch (r, c), the pixels of patch (r, c) + offset g."""
    patch, reach = 4, 2
    pixels = torch.zeros(1, 6, 8 * patch, 8 * patch)
    pixels[0, 4, 3 * patch : 4 * patch, 5 * patch : 6 * patch] = 1.0  # one mark, target frame, patch (3, 5)
    out = patch_neighbourhood(pixels, reach, patch)
    offsets = neighbourhood_offsets(reach)
    assert out.shape == (1, 6 * len(offsets), 8 * patch, 8 * patch) and len(offsets) == 9
    for g, (dr, dc) in enumerate(offsets):
        group = out[0, 6 * g : 6 * (g + 1)]
        marked = {(int(r) // patch, int(c) // patch) for _, r, c in group.nonzero()}
        assert marked == {(3 - dr, 5 - dc)}, (dr, dc)  # the patch that sees (3, 5) at this offset
        assert int(group.nonzero()[:, 0].unique().item()) == 4  # channels move as a block
    edge = patch_neighbourhood(torch.ones(1, 6, 8 * patch, 8 * patch), reach, patch)
    assert edge[0, 6 * offsets.index((0, 2)), :, -2 * patch :].abs().sum() == 0  # beyond the border: zeros
    assert tubelet_reach(6 * 9) == 2 and tubelet_reach(6) == 0 and tubelet_reach(3) is None
    assert tubelet_reach(12) is None  # 2 groups is no cross


def test_the_toy_idm_feeds_its_vision_tower_the_widened_tubelet(tiny_dir: str) -> None:
    idm = InverseDynamicsModel.load(_cfg(tiny_dir))
    assert idm.reach == 2 and idm.model.config.vision_config.num_channels == 54
    sources, targets, _ = _pairs(2)
    enc = idm._prompt_inputs(sources, targets)
    assert enc["pixel_values"].shape == (2, 54, 64, 64)
    assert (enc["input_ids"] == idm.processor.image_token_id).sum(1).tolist() == [64, 64]  # one image


def test_a_missing_model_directory_is_named_plainly(tmp_path: Path) -> None:
    # Without the check, transformers reads the path as a hub repo id and fails with an unrelated message.
    with pytest.raises(FileNotFoundError, match="no model directory at .*missing"):
        InverseDynamicsModel.load(IDMConfig(model=str(tmp_path / "missing"), device="cpu"))
