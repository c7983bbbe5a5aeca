"""Tiny real-family IDM checkpoints: built, saved, loaded by path through the Auto classes production uses, then
prompted with two frames through the processor's own chat template, trained one step and sampled."""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from cwm_ray.tiny.idm import IDM_FAMILIES, MODEL_CLASSES, PROMPT, build_tiny_idm, idm_parts

MESSAGES = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": PROMPT}]}]

EXPECTED = {  # class names, processor names, template markers, eos (end of turn), image-token string, tokens per frame
    "llava": ("LlavaForConditionalGeneration", "LlavaProcessor",
              ["USER: <image>\n<image>\nwhat action", "? ASSISTANT:"], "</s>", "<image>", 49),
    "qwen2_vl": ("Qwen2VLForConditionalGeneration", "Qwen2VLProcessor",
                 ["<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n",
                  "<|vision_start|><|image_pad|><|vision_end|>" * 2 + PROMPT + "<|im_end|>\n<|im_start|>assistant\n"],
                 "<|im_end|>", "<|image_pad|>", 36),
    "qwen2_5_vl": ("Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLProcessor",
                   ["<|vision_start|><|image_pad|><|vision_end|>" * 2 + PROMPT + "<|im_end|>\n<|im_start|>assistant\n"],
                   "<|im_end|>", "<|image_pad|>", 36),
    "idefics3": ("Idefics3ForConditionalGeneration", "Idefics3Processor",
                 ["<|im_start|>User:<image><image>" + PROMPT + "<end_of_utterance>\nAssistant:"],
                 "<end_of_utterance>", "<image>", 49),
    "janus": ("JanusForConditionalGeneration", "JanusProcessor",
              ["<|User|>: <image_placeholder>\n\n<image_placeholder>\n" + PROMPT + "\n\n<|Assistant|>:"],
              "<｜end▁of▁sentence｜>", "<image_placeholder>", 36),
}
FAMILY_KEYS = {"llava": set(), "qwen2_vl": {"image_grid_thw"}, "qwen2_5_vl": {"image_grid_thw"},
               "idefics3": {"pixel_attention_mask"}, "janus": set()}


def _frames(n: int) -> list[Image.Image]:
    return [Image.new("RGB", (224, 224), (40 * i, 120, 200 - 40 * i)) for i in range(n)]


@pytest.mark.parametrize("family", IDM_FAMILIES)
def test_tiny_family_loads_by_path_and_trains(family: str, tmp_path) -> None:
    model_name, processor_name, markers, eos, image_token, per_frame = EXPECTED[family]
    path = build_tiny_idm(family, str(tmp_path / family))
    model = AutoModelForImageTextToText.from_pretrained(path)
    processor = AutoProcessor.from_pretrained(path)
    assert type(model).__name__ == model_name and type(processor).__name__ == processor_name
    tok = processor.tokenizer

    prompt = processor.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    for marker in markers:
        assert marker in prompt, (marker, prompt)
    assert tok.convert_ids_to_tokens(tok(PROMPT, add_special_tokens=False)["input_ids"]) == PROMPT.split()

    # The special-token ids the model keys on are the tokenizer's, and eos is the end-of-turn token.
    image_id = tok.convert_tokens_to_ids(image_token)
    assert image_id == getattr(model.config, "image_token_id", getattr(model.config, "image_token_index", None))
    if family.startswith("qwen"):
        for name, token in [("video_token_id", "<|video_pad|>"), ("vision_start_token_id", "<|vision_start|>"),
                            ("vision_end_token_id", "<|vision_end|>")]:
            assert getattr(model.config, name) == tok.convert_tokens_to_ids(token)
    assert tok.eos_token == eos and model.config.get_text_config().eos_token_id == tok.eos_token_id
    gen_eos = model.generation_config.eos_token_id
    assert tok.eos_token_id in (gen_eos if isinstance(gen_eos, list) else [gen_eos])
    assert model.generation_config.pad_token_id == tok.pad_token_id is not None
    assert tok.padding_side == "left"

    frames = _frames(4)
    inputs = processor(text=[prompt, prompt], images=[frames[:2], frames[2:]], return_tensors="pt", padding=True)
    assert {"input_ids", "attention_mask", "pixel_values"} | FAMILY_KEYS[family] <= set(inputs)
    assert ((inputs["input_ids"] == image_id).sum(dim=1) == 2 * per_frame).all()

    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    model.train()
    loss = model(**inputs, labels=labels).loss
    loss.backward()
    assert math.isfinite(loss.item())
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)

    model.eval()
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    prompt_len = inputs["input_ids"].shape[1]
    assert generated.shape[0] == 2 and prompt_len < generated.shape[1] <= prompt_len + 3


def test_unknown_family_and_size_are_refused(tmp_path) -> None:
    with pytest.raises(ValueError, match="llava.*qwen2_vl.*idefics3"):
        build_tiny_idm("blip", str(tmp_path))
    with pytest.raises(ValueError, match="tiny"):
        build_tiny_idm("llava", str(tmp_path), size="huge")


@pytest.mark.parametrize(("family", "billions"), [("llava", 7.06), ("qwen2_vl", 2.21), ("qwen2_5_vl", 3.75),
                                                  ("idefics3", 0.256), ("janus", 2.08)])
def test_real_sizes_have_published_parameter_counts(family: str, billions: float) -> None:
    """Real-size configs, built on the meta device (no memory): the parameter count is the published one."""
    config, processor = idm_parts(family, "real")
    with torch.device("meta"):
        model = MODEL_CLASSES[family](config)
    assert sum(p.numel() for p in model.parameters()) / 1e9 == pytest.approx(billions, rel=0.02)
    assert processor.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "qwen2_5_vl"])
def test_a_resized_language_model_has_the_asked_width_and_depth_and_labels(family: str, tmp_path) -> None:
    """bench/p1_annotation.py sizes a real family's language model to set the IDM's cost per pair."""
    from cwm_ray.config import IDMConfig
    from cwm_ray.idm import InverseDynamicsModel

    path = build_tiny_idm(family, str(tmp_path / family), hidden_size=128, num_layers=3)
    model = AutoModelForImageTextToText.from_pretrained(path)
    text = model.config.get_text_config()
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads) == (128, 3, 2)
    assert len(model.get_decoder().layers) == 3
    idm = InverseDynamicsModel.load(IDMConfig(model=path, prompt="{image}{image}" + PROMPT, image_size=64,
                                              max_new_tokens=3))
    (label,) = idm.label(_frames(1), _frames(1))
    assert 1 <= label.num_tokens <= 3 and math.isfinite(label.logprob)
    with pytest.raises(ValueError, match="both"):
        build_tiny_idm(family, str(tmp_path / "x"), hidden_size=128)
