"""The IDM on real model families (LLaVA-1.5, Qwen2-VL, Qwen2.5-VL, SmolVLM/Idefics3, Janus), not only the toy.

Each family is a tiny random checkpoint of its real classes, processor, special tokens and chat template
(`cwm_ray.tiny.idm`), saved and loaded by path through the production code. Checked per family:
- the prompt goes through the processor's chat template, with the family's image markers, two images;
- training labels the answer only (the prompt is masked), and LoRA adapts only the language model;
- after a short fit, `label` returns the trained action and its log-likelihood is exactly what `score`
  gives the same action (the filter and the verifier read one likelihood);
- a row scores and labels the same alone or batched beside rows whose prompts have other lengths (Qwen's dynamic
  resolution and Idefics3's image splitting give frames of other sizes other lengths, hence left padding; every
  family's answers of other lengths are right-padded), with exactly the padding masked;
- a checkpoint without a chat template prompts with the family's own image markers, and one whose tokenizer
  lacks its image placeholder is one clear error before any video is read;
- a merged LoRA export differs from its base and reloads with the live model's outputs, and a LoRA adapter
  exported alone (`idm.lora_export: adapter`) reloads over the base with the trained scores;
- and through the jobs' CLIs with a real model profile (configs/real/): LoRA training, evaluation, and
  annotation of ordinary H.264 videos of three sizes (one portrait), each stored pair labelled and scored as it
  is alone (Janus: through the jobs of its single-model profile, tests/test_single_model.py).
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from profile_jobs import run_job
from transformers import AutoModelForImageTextToText

from cwm_ray.config import AnnotateConfig, ConfigError, IDMConfig, LoRAConfig, ToyCorpusConfig, ToyWorldConfig, load
from cwm_ray.idm import InverseDynamicsModel, check_prompt
from cwm_ray.schema import encode_image
from cwm_ray.tiny.idm import IDM_FAMILIES, MODEL_CLASSES, build_tiny_idm
from cwm_ray.toyworld.corpus import encode_mp4, make_corpus, make_video
from cwm_ray.toyworld.diffusion_model import build_toy_world_model
from cwm_ray.toyworld.world import BACKGROUND

REPO = Path(__file__).resolve().parents[1]
PROFILE = REPO / "configs" / "real" / "qwen25vl7b_ip2p.yaml"
MARKERS = {
    "llava": ["USER:", "<image>\n<image>", "ASSISTANT:"],
    "qwen2_vl": ["<|im_start|>user", "<|vision_start|><|image_pad|><|vision_end|>" * 2, "<|im_start|>assistant"],
    "qwen2_5_vl": ["<|im_start|>user", "<|vision_start|><|image_pad|><|vision_end|>" * 2, "<|im_start|>assistant"],
    "idefics3": ["User:", "<image><image>", "Assistant:"],
    "janus": ["<|User|>: <image_placeholder>", "<image_placeholder>\n", "<|Assistant|>:"],
}
BARE_MARKERS = {"llava": "<image><image>", "qwen2_vl": "<|vision_start|><|image_pad|><|vision_end|>" * 2,
                "qwen2_5_vl": "<|vision_start|><|image_pad|><|vision_end|>" * 2, "idefics3": "<image><image>",
                "janus": "<image_placeholder>" * 2}
"""What a checkpoint saved without a chat template gets in its raw prompt: its family's image markers."""
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


def _with_image_splitting(path: str, out: Path) -> str:
    """A copy of a tiny Idefics3 checkpoint with image splitting on, as the published SmolVLM has it (tiles of
    224 px after resizing the longest edge to 448): a 2.35:1 frame becomes 2 tiles + the global view, a square
    one 4 + 1, so frames of other shapes give prompts of other lengths."""
    from transformers import AutoProcessor

    shutil.copytree(path, out)
    processor = AutoProcessor.from_pretrained(out)
    processor.image_processor.do_image_splitting = True
    processor.image_processor.size = {"longest_edge": 448}
    processor.save_pretrained(out)
    return str(out)


def test_a_row_scores_and_labels_the_same_alone_or_padded_in_a_batch(family: tuple[str, str],
                                                                      tmp_path: Path) -> None:
    """Rows whose prompts differ in length (frames of other shapes: Qwen's dynamic resolution, Idefics3's image
    splitting) are left-padded for `generate` and the prompt, and answers of other lengths right-padded: each row
    must label and score as it does alone, with exactly its padding masked. LLaVA-1.5 crops every frame to one
    size and Janus resizes it to one, so their prompts never differ and only the answers pad; causal attention
    hides right padding by itself, so for them only the mask check can see a broken mask."""
    name, path = family
    if name == "idefics3":
        path = _with_image_splitting(path, tmp_path / "split")
    idm = InverseDynamicsModel.load(IDMConfig(model=path, max_new_tokens=4))
    sources = [*_frames(4, (224, 224), 1), *_frames(5, (320, 136), 1)]
    targets = [*_frames(6, (224, 224), 1), *_frames(7, (320, 136), 1)]
    actions = ["remove the blue square", "put the red circle to the left of the green cross"]
    rows = list(zip(sources, targets, actions, strict=True))
    batched = idm.score_batch(sources, targets, actions)
    alone = [idm.score_batch([s], [t], [a])[0] for s, t, a in rows]
    np.testing.assert_allclose(batched, alone, rtol=1e-4, atol=1e-4)
    labels = idm.label(sources, targets)
    alone_labels = [idm.label([s], [t])[0] for s, t, _ in rows]
    assert [lab.action for lab in labels] == [lab.action for lab in alone_labels]
    np.testing.assert_allclose([lab.logprob for lab in labels], [lab.logprob for lab in alone_labels], atol=1e-4)

    prompt_lengths = [idm._prompt_inputs([s], [t])["input_ids"].shape[1] for s, t, _ in rows]
    if name not in ("llava", "janus"):  # both resize every frame to one size (Janus: its SigLIP's 384 px)
        assert prompt_lengths[0] != prompt_lengths[1], prompt_lengths  # the prompts really are padded
    answer_lengths = [len(idm._answer_ids(a)) for a in actions]
    assert answer_lengths[0] != answer_lengths[1]
    prompt_mask = idm._prompt_inputs(sources, targets)["attention_mask"]
    assert prompt_mask.sum(dim=1).tolist() == prompt_lengths
    mask = idm._teacher_forced_inputs(sources, targets, actions)["attention_mask"]
    assert mask.sum(dim=1).tolist() == [p + a for p, a in zip(prompt_lengths, answer_lengths, strict=True)]


def _without_chat_template(path: str, out: Path) -> str:
    shutil.copytree(path, out)
    (out / "chat_template.jinja").unlink()
    return str(out)


def test_a_checkpoint_without_a_chat_template_prompts_with_the_familys_image_markers(family: tuple[str, str],
                                                                                      tmp_path: Path) -> None:
    """Each `{image}` of the raw prompt becomes the family's own markers. Qwen2-VL and Qwen2.5-VL find images by
    `<|vision_start|>`: with a bare `<|image_pad|>` their `generate` failed in `get_rope_index` (shape mismatch)."""
    name, path = family
    bare = _without_chat_template(path, tmp_path / "bare")
    cfg = IDMConfig(model=bare, max_new_tokens=4)
    assert check_prompt(cfg) == BARE_MARKERS[name] + "what action turns the first image into the second ?"
    idm = InverseDynamicsModel.load(cfg)
    assert not idm.chat_template and idm.prompt == check_prompt(cfg)
    sources = [*_frames(8, (224, 224), 1), *_frames(9, (320, 136), 1)]
    targets = [*_frames(10, (224, 224), 1), *_frames(11, (320, 136), 1)]
    labels = idm.label(sources, targets)  # Qwen's generate used to fail here
    assert len(labels) == 2 and all(lab.num_tokens >= 1 for lab in labels)
    tokens = idm._prompt_inputs(sources, targets)["input_ids"]  # each frame expanded where its marker is
    image_id = getattr(idm.processor, "image_token_id", None) or idm.model.config.image_token_id  # Janus: config
    assert all(int((row == image_id).sum()) > 2 for row in tokens)


def test_a_checkpoint_that_cannot_mark_its_images_is_one_clear_error_before_any_video_is_read(
        tmp_path: Path) -> None:
    """No chat template, and a tokenizer that does not know the processor's `<image>` (a LLaVA saved with a
    tokenizer missing its added token): the IDM could not be shown the frames. Loading it, annotating with it
    (in the driver, before the inputs are even listed: here they do not exist) and the job's CLI all say so in
    one line that names the fix."""
    from transformers import AutoProcessor, LlavaProcessor

    from cwm_ray.annotate import annotate
    from cwm_ray.tiny.idm import _word_tokenizer

    bare = Path(_without_chat_template(build_tiny_idm("llava", str(tmp_path / "llava")), tmp_path / "bare"))
    image_processor = AutoProcessor.from_pretrained(bare).image_processor
    tokenizer = _word_tokenizer(("<unk>", "<s>", "</s>", "<pad>"), unk="<unk>", pad="<pad>", eos="</s>", bos="<s>",
                                add_bos=True, model_max_length=4096)
    LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=32,
                   vision_feature_select_strategy="default", num_additional_image_tokens=1).save_pretrained(bare)
    message = r"has no chat template and its tokenizer does not know the image placeholder '<image>'.*chat_template"
    with pytest.raises(ConfigError, match=message):
        check_prompt(IDMConfig(model=str(bare)))
    with pytest.raises(ConfigError, match=message):
        InverseDynamicsModel.load(IDMConfig(model=str(bare)))
    missing = tmp_path / "no_videos_here"
    args = [f"idm.model={bare}", f"inputs=[{{name: x, uri: {missing}}}]", f"output={tmp_path / 'out'}"]
    with pytest.raises(ConfigError, match=message):
        annotate(load(AnnotateConfig, None, args))
    assert not (tmp_path / "out").exists()
    # The job's preflight refuses a missing input first (its own one line): give it one it never gets to read.
    missing.mkdir()
    (missing / "never_read.mp4").write_bytes(b"not a video")
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "jobs/annotate.py", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "image placeholder '<image>'" in errors[0] and "chat_template" in errors[0]


def test_a_merged_lora_export_differs_from_its_base_and_reloads_with_the_same_outputs(
        family: tuple[str, str], tmp_path: Path) -> None:
    """`save` folds each adapter into its base weight (B·A·alpha/r): the export is the family's own class with the
    base's keys, only the adapted language-model projections changed, and it scores as the live adapted model."""
    from safetensors.torch import load_file

    name, path = family
    idm = InverseDynamicsModel.load(IDMConfig(model=path))
    module = idm.training_module(LoRAConfig(enabled=True, r=4, alpha=8, dropout=0.0))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # B starts at zero (the adapter is a no-op); a trained adapter is not
        for param_name, param in module.named_parameters():
            if "lora_B" in param_name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    sources, targets = _frames(12, (224, 224)), _frames(13, (224, 224))
    live = idm.score_batch(sources, targets, ACTIONS)
    idm.save(str(tmp_path / "merged"))
    merged = InverseDynamicsModel.load(IDMConfig(model=str(tmp_path / "merged")))
    assert type(merged.model) is MODEL_CLASSES[name]
    np.testing.assert_allclose(merged.score_batch(sources, targets, ACTIONS), live, rtol=1e-4, atol=1e-4)
    base_scores = InverseDynamicsModel.load(IDMConfig(model=path)).score_batch(sources, targets, ACTIONS)
    assert np.abs(base_scores - live).max() > 1e-2, (base_scores, live)
    base, export = load_file(Path(path) / "model.safetensors"), load_file(tmp_path / "merged" / "model.safetensors")
    assert export.keys() == base.keys()
    changed = sorted(k for k in base if not torch.equal(base[k], export[k]))
    projections = tuple(f"{p}.weight" for p in ("q_proj", "k_proj", "v_proj", "o_proj"))
    assert changed and all(k.endswith(projections) and "vision" not in k for k in changed), changed


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

CLI_FAMILIES = tuple(f for f in IDM_FAMILIES if f != "janus")
"""Every family through the jobs (Qwen2.5-VL is the IDM two real profiles name); Janus runs through the same jobs
in tests/test_single_model.py, with its own profile (IDM adapter export)."""
VIDEO_SIZES = ((320, 136), (176, 144), (144, 256))
"""(width, height) of the annotated videos: 2.35:1 (640 x 272 halved), QCIF, and a 9:16 portrait."""


@pytest.fixture(scope="module")
def corpus224(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Toy-world H.264 videos and gold triplets at 224 px (a real codec at a real VLM input size)."""
    out = tmp_path_factory.mktemp("corpus224")
    make_corpus(ToyCorpusConfig(output=str(out), num_videos=2, actions_per_video=3, num_train=24, num_test=6,
                                seed=5, world=ToyWorldConfig(image_size=224)))
    return out


@pytest.fixture(scope="module")
def mixed_videos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Ordinary H.264 videos (yuv420p, written with PyAV) of three sizes, one portrait, 7 s each: two toy-world
    actions each, letterboxed into the frame, so frame choice finds two pairs per video (no recolours: a colour
    fade has no optical flow, so frame choice finds no pair in it)."""
    out = tmp_path_factory.mktemp("mixed_videos")
    for i, (w, h) in enumerate(VIDEO_SIZES):
        side = min(w, h) // 8 * 8
        world = ToyWorldConfig(image_size=side, actions=["move", "remove", "add", "put"])
        frames, _ = make_video(random.Random(f"mixed/{i}"), world, num_actions=2)
        top, left = (h - side) // 2, (w - side) // 2
        canvas = np.empty((len(frames), h, w, 3), np.uint8)
        canvas[:] = BACKGROUND
        canvas[:, top:top + side, left:left + side] = np.stack(frames)
        (out / f"clip_{w}x{h}.mp4").write_bytes(encode_mp4(list(canvas), world.fps, pix_fmt="yuv420p"))
    return out


def _job(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    return run_job(PROFILE, script, *args, timeout=420)


@pytest.mark.parametrize("name", CLI_FAMILIES)
def test_train_evaluate_and_annotate_through_the_jobs(name: str, corpus224: Path, mixed_videos: Path,
                                                      tmp_path: Path) -> None:
    """LoRA training exports a merged model of the family's class that differs from its base; evaluation; and
    annotation of videos of three sizes in one IDM batch (so Qwen's and split Idefics3's prompts are padded), each
    stored pair labelled exactly as the same IDM labels it alone."""
    from safetensors.torch import load_file

    # Seed 0's random Qwen2-VL generates only `<|vision_end|>` for these frames: every pair would be dropped as
    # empty (as it should), leaving no label to compare; seed 2's generates words.
    base = build_tiny_idm(name, str(tmp_path / "base"), seed=2 if name == "qwen2_vl" else 0)
    export = tmp_path / "idm"
    cpu = ["scaling.use_gpu=false", "deepspeed.enabled=false", "deepspeed.bf16=false", "scaling.cpus_per_worker=1"]
    _job("train_idm.py", f"idm.model={base}", "idm.dtype=float32", f"train.storage_path={tmp_path / 'runs'}",
         f"train.export={export}", f"data.sources=[{{uri: {corpus224 / 'gold' / 'train.json'}}}]",
         "optim.epochs=null", "optim.global_batch_size=null", "optim.max_steps=2", "optim.batch_size=4",
         "optim.warmup_steps=1", "train.log_every=1", *cpu)
    exported = AutoModelForImageTextToText.from_pretrained(export)
    assert type(exported).__name__ == MODEL_CLASSES[name].__name__  # LoRA merged into the family's own class
    before, after = load_file(Path(base) / "model.safetensors"), load_file(export / "model.safetensors")
    assert before.keys() == after.keys() and any(not torch.equal(before[k], after[k]) for k in before)

    idm_args = [f"idm.model={export}", "idm.dtype=float32", "idm.max_new_tokens=4"]
    _job("evaluate_idm.py", f"bench={corpus224 / 'gold' / 'test.json'}", *idm_args, "batch_size=4",
         f"output={tmp_path / 'eval_idm'}", "bertscore_model=null", "bertscore_rescale=false")  # no hub here
    results = json.loads((tmp_path / "eval_idm" / "results.json").read_text())
    assert results["items"] == 6

    if name == "idefics3":  # the published SmolVLM splits images into tiles: frames of other shapes, other lengths
        _with_image_splitting(str(export), tmp_path / "idm_split")
        idm_args[0] = f"idm.model={tmp_path / 'idm_split'}"
    build_toy_world_model(str(tmp_path / "wm"), resolution=32, block_out_channels=(8, 16), text_hidden_size=16)
    out = tmp_path / "annotated"
    _job("annotate.py", f"inputs=[{{name: mixed, uri: {mixed_videos}}}]", f"output={out}", *idm_args,
         f"world_model.model={tmp_path / 'wm'}", "world_model.resolution=32", "world_model.dtype=float32",
         "idm_stage.num_gpus=0", "idm_stage.batch_size=16", "recognition_stage.num_gpus=0", "decode.num_cpus=0.5")
    summary = json.loads((out / "summary.json").read_text())
    pairs = pq.read_table(str(out / "pairs")).to_pylist()
    assert summary["errors"] == 0 and summary["stages"]["idm"]["calls"] == 1, summary  # all sizes in one batch
    assert summary["stages"]["idm"]["pairs"] == len(pairs) + sum(summary["dropped"].values()) == 6, summary
    assert {(p["width"], p["height"]) for p in pairs} == set(VIDEO_SIZES)  # stored at the source resolution
    for p in pairs:
        assert Image.open(io.BytesIO(p["source"])).size == (p["width"], p["height"])
    idm = InverseDynamicsModel.load(load(AnnotateConfig, PROFILE, idm_args).idm)  # the job's IDM settings
    for p in pairs:
        [alone] = idm.label([p["source"]], [p["target"]])
        assert p["action"] and (alone.action, alone.num_tokens) == (p["action"], p["num_tokens"]), (p["id"], alone)
        assert alone.logprob == pytest.approx(p["logprob"], abs=1e-4), (p["id"], alone)
    staged = pq.read_table(str(out / "staging")).to_pylist()
    for p in (row for row in staged if row["error_type"] == "EmptyAction"):  # a pair dropped: empty alone too
        assert idm.label([p["source"]], [p["target"]])[0].action == "", p["id"]


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
