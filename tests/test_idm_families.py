"""The IDM on real model families (LLaVA-1.5, Qwen2-VL, Qwen2.5-VL, SmolVLM/Idefics3, Janus), not only the toy.

Each family is a tiny random checkpoint of its real classes, processor, special tokens and chat template
(`cwm_ray.tiny.idm`), saved and loaded by path through the production code. Checked per family:
- the prompt goes through the processor's chat template, with the family's image markers, two images;
- training labels the answer only (the prompt is masked), and LoRA adapts only the language model;
- after a short fit, `label` returns the trained action and its log-likelihood is exactly what `score`
  gives the same action (the filter and the verifier read one likelihood);
- a LoRA adapter exported alone (`idm.lora_export: adapter`) reloads over the base with the trained scores;
- a row scores the same alone or batched beside frames of another size (Qwen2-VL's dynamic resolution gives
  them other lengths, hence left padding);
- and through the jobs' CLIs with a real model profile (configs/real/): LoRA training, evaluation, and
  annotation of real H.264 video at 224 px, whose stored frames keep their 224 px (Janus: through the jobs of
  its single-model profile, tests/test_single_model.py).
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText

from cwm_ray.config import IDMConfig, LoRAConfig, ToyCorpusConfig, ToyWorldConfig
from cwm_ray.idm import InverseDynamicsModel
from cwm_ray.schema import encode_image
from cwm_ray.tiny.idm import IDM_FAMILIES, MODEL_CLASSES, build_tiny_idm
from cwm_ray.toyworld.corpus import make_corpus
from cwm_ray.world_model.diffusion import build_toy_world_model

REPO = Path(__file__).resolve().parents[1]
PROFILE = REPO / "configs" / "real" / "qwen25vl7b_ip2p.yaml"
MARKERS = {
    "llava": ["USER:", "<image>\n<image>", "ASSISTANT:"],
    "qwen2_vl": ["<|im_start|>user", "<|vision_start|><|image_pad|><|vision_end|>" * 2, "<|im_start|>assistant"],
    "qwen2_5_vl": ["<|im_start|>user", "<|vision_start|><|image_pad|><|vision_end|>" * 2, "<|im_start|>assistant"],
    "idefics3": ["User:", "<image><image>", "Assistant:"],
    "janus": ["<|User|>: <image_placeholder>", "<image_placeholder>\n", "<|Assistant|>:"],
}
ACTIONS = ["move the red circle left", "remove the blue square"]


def _frames(seed: int, size: tuple[int, int], n: int = 2) -> list[bytes]:
    """PNG bytes, as Ray Data batches and the Parquet triplets hold frames."""
    rng = np.random.default_rng(seed)
    return [encode_image(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(n)]


@pytest.fixture(scope="module", params=IDM_FAMILIES)
def family(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    name = request.param
    return name, build_tiny_idm(name, str(tmp_path_factory.mktemp(name)))


def test_the_prompt_is_the_familys_chat_template_with_two_images(family: tuple[str, str]) -> None:
    name, path = family
    idm = InverseDynamicsModel.load(IDMConfig(model=path))
    assert type(idm.model).__name__ == MODEL_CLASSES[name].__name__ and idm.chat_template
    for marker in MARKERS[name]:
        assert marker in idm.prompt, (name, marker, idm.prompt)
    assert "{image}" not in idm.prompt and "what action turns the first image into the second ?" in idm.prompt


def test_training_masks_the_prompt_and_lora_adapts_only_the_language_model(family: tuple[str, str]) -> None:
    name, path = family
    idm = InverseDynamicsModel.load(IDMConfig(model=path))
    batch = idm.collate({"source": np.array(_frames(0, (224, 224)), dtype=object),
                         "target": np.array(_frames(1, (224, 224)), dtype=object), "action": np.array(ACTIONS)})
    for row, action in zip(batch["labels"], ACTIONS, strict=True):
        answer = [*idm.tokenizer(action, add_special_tokens=False)["input_ids"], idm.eos_token_id]
        assert row[row != -100].tolist() == answer  # exactly the answer and EOS; every prompt token masked
    module = idm.training_module(LoRAConfig(enabled=True, r=4, alpha=8))
    trainable = [n for n, p in module.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    decoder = idm.model.get_base_model().get_decoder()
    adapted = {id(p) for n, p in decoder.named_parameters() if "lora_" in n}
    assert adapted == {id(p) for n, p in module.named_parameters() if p.requires_grad}  # no vision-tower adapter
    loss = module(**batch)
    loss.backward()
    assert torch.isfinite(loss)


def test_labels_and_scores_share_one_likelihood_after_a_short_fit(family: tuple[str, str]) -> None:
    name, path = family
    idm = InverseDynamicsModel.load(IDMConfig(model=path, max_new_tokens=8))
    # Pairs a tiny random vision tower tells apart at once (dark vs light), so the fit is a few steps.
    sources = [encode_image(np.full((224, 224, 3), v, np.uint8)) for v in (10, 240)]
    targets = [encode_image(np.full((224, 224, 3), v, np.uint8)) for v in (60, 190)]
    batch = idm.collate({"source": np.array(sources, dtype=object), "target": np.array(targets, dtype=object),
                         "action": np.array(ACTIONS)})
    module = idm.training_module(LoRAConfig(enabled=False))
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-2)
    torch.manual_seed(0)
    for _ in range(100):
        optimizer.zero_grad()
        loss = module(**batch)
        loss.backward()
        optimizer.step()
    assert float(loss) < 0.1, f"{name}: a two-pair fit did not converge ({float(loss):.3f})"
    labels = idm.label(sources, targets)
    assert [lab.action for lab in labels] == ACTIONS
    rescored = idm.score_batch(sources, targets, ACTIONS)
    np.testing.assert_allclose([lab.logprob for lab in labels], rescored, atol=1e-4)
    # The throughput path (issue 32): a static KV cache gives the same labels, and the label's log-likelihood,
    # read from the generation's own logits, is still the teacher-forced score.
    idm.cfg = dataclasses.replace(idm.cfg, cache_implementation="static")
    static = idm.label(sources, targets)
    assert [lab.action for lab in static] == ACTIONS
    np.testing.assert_allclose([lab.logprob for lab in static], rescored, atol=1e-4)


def test_label_runs_the_vision_tower_once_per_batch(family: tuple[str, str]) -> None:
    """Issue 32: the images are encoded once, in the prefill; each decoding step reads the KV cache, never the
    pixels again (a path that passed pixel_values every step would run the tower max_new_tokens times)."""
    _, path = family
    idm = InverseDynamicsModel.load(IDMConfig(model=path, max_new_tokens=4, cache_implementation="static"))
    base = idm.model.model
    tower = next(getattr(base, n) for n in ("vision_tower", "visual", "vision_model") if hasattr(base, n))
    calls: list[int] = []
    hook = tower.register_forward_hook(lambda *_: calls.append(1))
    try:
        labels = idm.label(_frames(8, (224, 224), 3), _frames(9, (224, 224), 3))
    finally:
        hook.remove()
    assert len(labels) == 3 and sum(lab.num_tokens for lab in labels) > 3 and calls == [1]


def test_a_row_scores_the_same_alone_or_beside_frames_of_another_size(family: tuple[str, str]) -> None:
    _, path = family
    idm = InverseDynamicsModel.load(IDMConfig(model=path))
    sources = [*_frames(4, (224, 224), 1), *_frames(5, (320, 180), 1)]
    targets = [*_frames(6, (224, 224), 1), *_frames(7, (320, 180), 1)]
    batched = idm.score_batch(sources, targets, ACTIONS)
    alone = [idm.score_batch([s], [t], [a])[0] for s, t, a in zip(sources, targets, ACTIONS, strict=True)]
    np.testing.assert_allclose(batched, alone, rtol=1e-4, atol=1e-4)


def test_a_lora_adapter_export_reloads_over_the_base_with_the_same_scores(family: tuple[str, str],
                                                                          tmp_path: Path) -> None:
    """`idm.lora_export: adapter` writes peft's adapter alone (no copy of the base), and base + adapter scores as the
    trained model did: the single-model setting's IDM export (configs/real/janus_pro_7b_self.yaml)."""
    _, path = family
    idm = InverseDynamicsModel.load(IDMConfig(model=path, lora_export="adapter"))
    sources, targets = _frames(8, (224, 224)), _frames(9, (224, 224))
    before = idm.score_batch(sources, targets, ACTIONS)
    idm.training_module(LoRAConfig(enabled=True, r=4, alpha=8))
    with torch.no_grad():  # a trained adapter, without the cost of training one
        for name, param in idm.model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    trained = idm.score_batch(sources, targets, ACTIONS)
    idm.save(str(tmp_path / "adapter"))
    assert {p.name for p in (tmp_path / "adapter").iterdir()} == {"adapter_config.json", "adapter_model.safetensors",
                                                                  "README.md"}
    reloaded = InverseDynamicsModel.load(IDMConfig(model=path, adapter=str(tmp_path / "adapter")))
    np.testing.assert_allclose(reloaded.score_batch(sources, targets, ACTIONS), trained, rtol=1e-5, atol=1e-5)
    assert np.abs(trained - before).max() > 0.1  # the adapter is not a no-op


def test_the_verifier_sees_a_candidate_at_its_sources_size_as_training_saw_pairs(family: tuple[str, str]) -> None:
    """A world model's candidate is its own square (256 px for InstructPix2Pix); the source keeps its aspect, and
    every pair the IDM trained on shared one size. The candidate is scored as if brought to the source's size, the
    geometry of training, not as a square beside a 16:9 frame (two token grids for Qwen2-VL)."""
    from PIL import Image

    name, path = family
    idm = InverseDynamicsModel.load(IDMConfig(model=path))
    source = _frames(8, (320, 180), 1)[0]
    square = Image.open(io.BytesIO(_frames(9, (320, 180), 1)[0])).resize((96, 96), Image.Resampling.BICUBIC)
    as_trained = square.resize((320, 180), Image.Resampling.BICUBIC)
    np.testing.assert_allclose(idm.score_batch([source], [encode_image(square)], ACTIONS[:1]),
                               idm.score_batch([source], [encode_image(as_trained)], ACTIONS[:1]), rtol=1e-5)
    inputs = idm._prompt_inputs([source], [encode_image(square)])
    if "image_grid_thw" in inputs:  # Qwen2-VL / 2.5-VL: the two frames are one token grid, as in training
        assert inputs["image_grid_thw"][0].tolist() == inputs["image_grid_thw"][1].tolist()


# -- through the jobs' CLIs, with a real model profile ---------------------------------------------------------

CLI_FAMILIES = ("llava", "qwen2_vl", "idefics3")
"""Janus runs through the same jobs in tests/test_single_model.py, with its own profile (IDM adapter export)."""


@pytest.fixture(scope="module")
def corpus224(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Toy-world H.264 videos and gold triplets at 224 px (a real codec at a real VLM input size)."""
    out = tmp_path_factory.mktemp("corpus224")
    make_corpus(ToyCorpusConfig(output=str(out), num_videos=2, actions_per_video=3, num_train=24, num_test=6,
                                seed=5, world=ToyWorldConfig(image_size=224)))
    return out


def _job(script: str, *args: str, timeout: int = 420) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, RAY_AUTH_MODE="disabled", PYTHONUNBUFFERED="1")
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, f"jobs/{script}", "--config", str(PROFILE), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{script} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


@pytest.mark.parametrize("name", CLI_FAMILIES)
def test_train_evaluate_and_annotate_through_the_jobs(name: str, corpus224: Path, tmp_path: Path) -> None:
    base = build_tiny_idm(name, str(tmp_path / "base"))
    export = tmp_path / "idm"
    cpu = ["scaling.use_gpu=false", "deepspeed.enabled=false", "deepspeed.bf16=false", "scaling.cpus_per_worker=1"]
    _job("train_idm.py", f"idm.model={base}", "idm.dtype=float32", f"train.storage_path={tmp_path / 'runs'}",
         f"train.export={export}", f"data.sources=[{{uri: {corpus224 / 'gold' / 'train.json'}}}]",
         "optim.max_steps=2", "optim.batch_size=4", "optim.warmup_steps=1", "train.log_every=1", *cpu)
    exported = AutoModelForImageTextToText.from_pretrained(export)
    assert type(exported).__name__ == MODEL_CLASSES[name].__name__  # LoRA merged into the family's own class

    idm_args = [f"idm.model={export}", "idm.dtype=float32", "idm.max_new_tokens=4"]
    _job("evaluate_idm.py", f"bench={corpus224 / 'gold' / 'test.json'}", *idm_args, "batch_size=4",
         f"output={tmp_path / 'eval_idm'}")
    results = json.loads((tmp_path / "eval_idm" / "results.json").read_text())
    assert results["items"] == 6

    build_toy_world_model(str(tmp_path / "wm"), resolution=32, block_out_channels=(8, 16), text_hidden_size=16)
    _job("annotate.py", f"inputs=[{{name: toy, uri: {corpus224 / 'videos'}}}]", f"output={tmp_path / 'annotated'}",
         *idm_args, f"world_model.model={tmp_path / 'wm'}", "world_model.resolution=32", "world_model.dtype=float32",
         "idm_stage.num_gpus=0", "idm_stage.batch_size=4", "recognition_stage.num_gpus=0", "decode.num_cpus=0.5")
    pairs = pq.read_table(str(tmp_path / "annotated" / "pairs")).to_pylist()
    good = [p for p in pairs if p.get("error_type") is None]
    assert good, pairs
    assert {(p["width"], p["height"]) for p in good} == {(224, 224)}  # stored at the source resolution
    assert all(p["action"] is not None and p["num_tokens"] >= 1 for p in good)
    assert Image.open(io.BytesIO(good[0]["source"])).size == (224, 224)


def test_an_unsupported_family_is_a_clear_error_naming_it_and_the_fix(tmp_path: Path) -> None:
    """A text-only checkpoint as the IDM, and each world-model family under the other backend (or an IDM as the
    world model): one ConfigError naming what the directory holds and the fix, before any weights load."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from cwm_ray.config import ConfigError, WorldModelConfig
    from cwm_ray.tiny.world_model import build_tiny_world_model
    from cwm_ray.world_model import load_world_model

    LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2)).save_pretrained(tmp_path / "llama")
    with pytest.raises(ConfigError, match=r"is a LlamaConfig, not an image-text-to-text model.*Qwen2-VL"):
        InverseDynamicsModel.load(IDMConfig(model=str(tmp_path / "llama")))
    ip2p = build_tiny_world_model("instruct_pix2pix", str(tmp_path / "ip2p"))
    janus = build_tiny_world_model("janus", str(tmp_path / "janus"))
    idm = build_tiny_idm("qwen2_vl", str(tmp_path / "idm"))
    with pytest.raises(ConfigError, match="InstructPix2Pix-style pipeline.*set world_model.backend=diffusion"):
        load_world_model(WorldModelConfig(backend="token", model=ip2p))
    with pytest.raises(ConfigError, match="a Janus checkpoint.*set world_model.backend=token"):
        load_world_model(WorldModelConfig(backend="diffusion", model=janus))
    with pytest.raises(ConfigError, match="'qwen2_vl' transformers checkpoint.*point world_model.model at"):
        load_world_model(WorldModelConfig(backend="diffusion", model=idm))
