"""Tiny randomly initialised checkpoints of real IDM model families (LLaVA-1.5, Qwen2-VL, Qwen2.5-VL, Idefics3, Janus).

Why: the production IDM (`cwm_ray/idm.py`) loads any image-text-to-text checkpoint by path through
`AutoModelForImageTextToText` / `AutoProcessor`, and each family differs in ways a single toy model cannot show
(Qwen2-VL's `image_grid_thw` and dynamic resolution, Idefics3's `pixel_attention_mask` and image-token
expansion, the chat templates and end-of-turn tokens). There is no network to the Hugging Face hub here, so
these builders construct the *real* config, model, image/video processor and processor classes from scratch,
with the real special tokens and chat templates, and `save_pretrained` them into a directory that production
code loads exactly like a downloaded checkpoint. Only the tokenizer is simplified: a word-level
`PreTrainedTokenizerFast` over the toy world's words, the prompt words and the chat templates' words.

Janus (`JanusForConditionalGeneration`, its understanding path: SigLIP + aligner → Llama → text) is the one family
that is also a world model: its checkpoint is `cwm_ray.tiny.world_model.build_tiny_janus`'s, the same directory
for both roles, as the paper uses one model as IDM and world model (configs/real/janus_pro_7b_self.yaml).

`size="tiny"`: a few layers at hidden 32-64, so a batch of two 224 px frame pairs runs forward+backward on CPU
in well under a second. `size="real"`: the published architecture sizes (LLaVA-1.5-7B, Qwen2-VL-2B-Instruct,
Qwen2.5-VL-3B-Instruct, SmolVLM-256M-Instruct) with random weights and the published processor settings, for
GPU benchmarks; only the vocabulary differs (the embedding matrices keep the published `vocab_size`, the
word-level tokenizer uses the first ~100 ids, and the special-token ids in the configs point at *its* ids,
not the published ones). Real-size models are saved in bfloat16 to halve the disk they take.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    GenerationConfig,
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3ImageProcessor,
    Idefics3Processor,
    Idefics3VisionConfig,
    JanusForConditionalGeneration,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    ProcessorMixin,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
    Qwen2VLVideoProcessor,
)

from cwm_ray.tiny.world_model import build_tiny_janus, janus_parts
from cwm_ray.toyworld.tokenizer import WORDS

IDM_FAMILIES: tuple[str, ...] = ("llava", "qwen2_vl", "qwen2_5_vl", "idefics3", "janus")
"""Families `build_tiny_idm` knows; each is one real `*ForConditionalGeneration` class."""

SIZES: tuple[str, ...] = ("tiny", "real")

PROMPT = "what action turns the first image into the second ?"
"""The IDM question; every word of it is in each family's vocabulary."""

CHAT_WORDS: tuple[str, ...] = ("USER", "ASSISTANT", "User", "Assistant", "system", "user", "assistant",
                               "You", "are", "helpful")
"""Words the chat templates themselves emit (role names, Qwen's default system prompt), so no prompt token is unk."""

OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

# -- chat templates: verbatim from the published checkpoints' chat_template.json ---------------------------

LLAVA_CHAT_TEMPLATE = (
    # llava-hf/llava-1.5-7b-hf: "USER: <image>\n<image>\n<text> ASSISTANT:"; images first, then text.
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

QWEN2_VL_CHAT_TEMPLATE = (
    # Qwen/Qwen2-VL-2B-Instruct (Qwen2.5-VL-Instruct ships the same template).
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

IDEFICS3_CHAT_TEMPLATE = (
    # HuggingFaceTB/SmolVLM-256M-Instruct (Idefics3 family): "<|im_start|>User:<image>...<end_of_utterance>\nAssistant:"
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

QWEN_SPECIALS: tuple[str, ...] = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                                  "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")
IDEFICS3_SPECIALS: tuple[str, ...] = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<fake_token_around_image>", "<image>", "<end_of_utterance>",
    "<global-img>", *(f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)),
)
"""SmolVLM's specials; the 36 `<row_i_col_j>` tags are what the processor writes before each tile when it splits."""


def _word_tokenizer(
    specials: tuple[str, ...], *, unk: str, pad: str, eos: str, bos: str | None, add_bos: bool,
    model_max_length: int,
) -> PreTrainedTokenizerFast:
    """Word-level tokenizer: the family's special tokens first (so their ids are small and fixed), then the words.

    Why word-level: one token per toy word keeps the tiny models tiny, and the special tokens, which are what
    the processors and models key on, are the real strings. `add_bos` mimics Llama's tokenizer, which puts
    `<s>` before every encoded text (LLaVA's template relies on it); Qwen's and SmolVLM's tokenizers add nothing.
    Left padding, as batched generation with a decoder-only model needs.
    """
    tokens = list(dict.fromkeys([*specials, *WORDS, *CHAT_WORDS]))
    tok = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(tokens)}, unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    if add_bos and bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokens.index(bos))],
        )
    named = {unk, pad, eos, bos}
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token=unk, pad_token=pad, eos_token=eos, bos_token=bos,
        additional_special_tokens=[t for t in specials if t not in named], clean_up_tokenization_spaces=False,
        padding_side="left", model_max_length=model_max_length,
    )
    return fast


def _check_size(size: str) -> None:
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; known: {SIZES}")


# -- LLaVA-1.5 ----------------------------------------------------------------------------------------------


def llava_parts(size: str = "tiny") -> tuple[LlavaConfig, LlavaProcessor]:
    """Config and processor of a LLaVA-1.5 (`llava-hf/llava-1.5-7b-hf` layout): CLIP tower, 2-layer GELU projector,
    Llama, `<image>` expanded to one token per patch (the CLS token is computed, then dropped: "default").

    tiny: 224 px CLIP-B/32-like tower (7 x 7 = 49 image tokens per frame), Llama hidden 64, 2+2 layers.
    real: CLIP ViT-L/14-336 (576 image tokens per frame) + Vicuna-7B (Llama-2-7B shape), vocab 32064.
    """
    _check_size(size)
    tokenizer = _word_tokenizer(("<unk>", "<s>", "</s>", "<pad>", "<image>"), unk="<unk>", pad="<pad>", eos="</s>",
                                bos="<s>", add_bos=True, model_max_length=4096)
    real = size == "real"
    px, patch = (336, 14) if real else (224, 32)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": px}, crop_size={"height": px, "width": px}, do_center_crop=True, resample=3,
        image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD,
    )
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=patch,
        vision_feature_select_strategy="default", num_additional_image_tokens=1, chat_template=LLAVA_CHAT_TEMPLATE,
    )
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    if real:  # llava-hf/llava-1.5-7b-hf config.json
        vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                  num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768,
                                  hidden_act="quick_gelu")
        text = LlamaConfig(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                           num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                           rms_norm_eps=1e-5, **ids)
    else:
        vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  image_size=224, patch_size=32, projection_dim=32, hidden_act="quick_gelu")
        text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024, **ids)
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=processor.image_token_id,
        image_seq_length=(px // patch) ** 2, vision_feature_select_strategy="default", vision_feature_layer=-2,
        projector_hidden_act="gelu",
    )
    return config, processor


# -- Qwen2-VL and Qwen2.5-VL --------------------------------------------------------------------------------

TINY_QWEN_MAX_PIXELS = 168 * 168
"""Tiny Qwen processors cap images at 168 x 168 px: a 224 px frame becomes a 12 x 12 grid of 14 px patches, merged
2 x 2 into 36 vision tokens (the published cap, 12845056 px, leaves it at 224 px: 256 patches, 64 tokens). Small
so the tiny model's sequence stays short; the real size keeps the published min/max pixels."""


def _qwen_processor(family: str, size: str) -> Qwen2VLProcessor:
    """The Qwen2-VL/2.5-VL processor: dynamic-resolution image processor, the video processor it requires,
    the `<|...|>` special tokens, eos `<|im_end|>` (end of turn, as the instruct checkpoints set it)."""
    tokenizer = _word_tokenizer(("<unk>", *QWEN_SPECIALS), unk="<unk>", pad="<|endoftext|>", eos="<|im_end|>",
                                bos=None, add_bos=False, model_max_length=32768)
    pixels = {} if size == "real" else {"min_pixels": 56 * 56, "max_pixels": TINY_QWEN_MAX_PIXELS}
    image_processor = Qwen2VLImageProcessor(patch_size=14, temporal_patch_size=2, merge_size=2,
                                            image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD, **pixels)
    video_processor = Qwen2VLVideoProcessor(patch_size=14, temporal_patch_size=2, merge_size=2, **pixels)
    cls = Qwen2VLProcessor if family == "qwen2_vl" else Qwen2_5_VLProcessor
    return cls(image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor,
               chat_template=QWEN2_VL_CHAT_TEMPLATE)


def _qwen_token_ids(processor: Qwen2VLProcessor) -> dict[str, int]:
    tok = processor.tokenizer
    return {
        "image_token_id": tok.convert_tokens_to_ids("<|image_pad|>"),
        "video_token_id": tok.convert_tokens_to_ids("<|video_pad|>"),
        "vision_start_token_id": tok.convert_tokens_to_ids("<|vision_start|>"),
        "vision_end_token_id": tok.convert_tokens_to_ids("<|vision_end|>"),
    }


def _qwen_text(processor: Qwen2VLProcessor, real: dict[str, object] | None) -> dict[str, object]:
    """Text config as a dict (the Qwen configs build their own text-config class from it). bos is
    `<|endoftext|>` as in the published config; eos `<|im_end|>`; pad `<|endoftext|>`."""
    tok = processor.tokenizer
    ids = {"bos_token_id": tok.convert_tokens_to_ids("<|endoftext|>"), "eos_token_id": tok.eos_token_id,
           "pad_token_id": tok.pad_token_id}
    if real is not None:
        return {**real, **ids}
    # head_dim 16 -> 8 rotary frequencies split over (time, height, width) like the published [16, 24, 24] of 64.
    return {"vocab_size": len(tok), "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-6, "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0,
                                                      "mrope_section": [2, 3, 3]}, **ids}


def qwen2_vl_parts(size: str = "tiny") -> tuple[Qwen2VLConfig, Qwen2VLProcessor]:
    """Config and processor of a Qwen2-VL (`Qwen/Qwen2-VL-2B-Instruct` layout): ViT with 2-D rotary embeddings
    over 14 px patches, 2 x 2 patch merger, Qwen2 LM with multimodal (t, h, w) rotary positions.

    tiny: vision depth 2, width 32; LM hidden 64, 2 layers. real: the 2B-Instruct numbers.
    """
    _check_size(size)
    processor = _qwen_processor("qwen2_vl", size)
    if size == "real":  # Qwen/Qwen2-VL-2B-Instruct config.json
        text = _qwen_text(processor, {
            "vocab_size": 151936, "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
            "num_attention_heads": 12, "num_key_value_heads": 2, "max_position_embeddings": 32768,
            "rms_norm_eps": 1e-6, "sliding_window": 32768, "max_window_layers": 28, "use_sliding_window": False,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [16, 24, 24]},
        })
        vision = {"depth": 32, "embed_dim": 1280, "hidden_size": 1536, "mlp_ratio": 4, "num_heads": 16,
                  "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "hidden_act": "quick_gelu"}
        tie = True
    else:
        text = _qwen_text(processor, None)
        vision = {"depth": 2, "embed_dim": 32, "hidden_size": 64, "mlp_ratio": 2, "num_heads": 4, "patch_size": 14,
                  "spatial_merge_size": 2, "temporal_patch_size": 2, "hidden_act": "quick_gelu"}
        tie = False
    config = Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=tie,
                           **_qwen_token_ids(processor))
    return config, processor


def qwen2_5_vl_parts(size: str = "tiny") -> tuple[Qwen2_5_VLConfig, Qwen2_5_VLProcessor]:
    """Config and processor of a Qwen2.5-VL (`Qwen/Qwen2.5-VL-3B-Instruct` layout): as Qwen2-VL, but a SwiGLU ViT
    with RMSNorm and windowed attention (full attention only in `fullatt_block_indexes`).

    tiny: vision depth 2 (block 1 full, block 0 windowed), width 32; LM hidden 64, 2 layers.
    real: the 3B-Instruct numbers (the smallest Qwen2.5-VL).
    """
    _check_size(size)
    processor = _qwen_processor("qwen2_5_vl", size)
    if size == "real":  # Qwen/Qwen2.5-VL-3B-Instruct config.json
        text = _qwen_text(processor, {
            "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36,
            "num_attention_heads": 16, "num_key_value_heads": 2, "max_position_embeddings": 128000,
            "rms_norm_eps": 1e-6, "sliding_window": 32768, "max_window_layers": 70, "use_sliding_window": False,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [16, 24, 24]},
        })
        vision = {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "out_hidden_size": 2048,
                  "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112,
                  "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2, "hidden_act": "silu"}
        tie = True
    else:
        text = _qwen_text(processor, None)
        vision = {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 4, "out_hidden_size": 64,
                  "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112,
                  "fullatt_block_indexes": [1], "tokens_per_second": 2, "hidden_act": "silu"}
        tie = False
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=tie,
                              **_qwen_token_ids(processor))
    return config, processor


# -- Idefics3 (SmolVLM) -------------------------------------------------------------------------------------


def idefics3_parts(size: str = "tiny") -> tuple[Idefics3Config, Idefics3Processor]:
    """Config and processor of an Idefics3 (`HuggingFaceTB/SmolVLM-256M-Instruct` layout): SigLIP tower, pixel
    shuffle by `scale_factor` then a linear connector, Llama (SmolLM2) LM; eos `<end_of_utterance>`.

    tiny: 224 px, 16 px patches (14 x 14), pixel shuffle 2 -> 49 `<image>` tokens per frame (+ the
    `<fake_token_around_image><global-img>` ... `<fake_token_around_image>` wrapper: 52 tokens), image splitting
    OFF: each frame is squashed to one 224 px square, because splitting (the published default) upscales the
    longest edge to `size` and cuts it into `max_image_size` tiles plus a global view, which for a 224 px frame
    at the tiny settings would only multiply the sequence without adding information.
    real: SmolVLM-256M: 512 px tiles, 16 px patches, scale factor 4 -> 64 tokens per tile, splitting ON with the
    published `size` 2048 / `max_image_size` 512 (a 224 px frame is upscaled to 2048 px: 16 tiles + global =
    17 x 64 image tokens; pass `do_image_splitting=False` to the processor for 64). The SmolVLM numbers are from
    memory of its config.json (vision 768 x 12 layers, SmolLM2-135M text, vocab 49280); treat them as close, not
    byte-exact.
    """
    _check_size(size)
    real = size == "real"
    tokenizer = _word_tokenizer(IDEFICS3_SPECIALS, unk="<|endoftext|>", pad="<|im_end|>", eos="<end_of_utterance>",
                                bos="<|im_start|>", add_bos=False, model_max_length=8192)
    tile, patch, scale = (512, 16, 4) if real else (224, 16, 2)
    seq_len = (tile // patch) ** 2 // scale**2
    image_processor = Idefics3ImageProcessor(
        do_image_splitting=real, size={"longest_edge": 4 * tile if real else tile},
        max_image_size={"longest_edge": tile}, resample=1, image_mean=[0.5] * 3, image_std=[0.5] * 3,
    )
    processor = Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=seq_len,
                                  chat_template=IDEFICS3_CHAT_TEMPLATE)
    tok = processor.tokenizer
    ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    if real:
        vision = Idefics3VisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                      num_attention_heads=12, image_size=512, patch_size=16)
        text = LlamaConfig(vocab_size=49280, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                           num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
                           rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=False, **ids)
        tie = False  # untied lm_head: 256.4M parameters in all, the published "256M" (tied would be 228M)
    else:
        vision = Idefics3VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      image_size=224, patch_size=16)
        text = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024,
                           rms_norm_eps=1e-5, **ids)
        tie = False
    config = Idefics3Config(vision_config=vision, text_config=text, scale_factor=scale,
                            image_token_id=processor.image_token_id, tie_word_embeddings=tie,
                            pad_token_id=tok.pad_token_id)
    return config, processor


# -- building and saving ------------------------------------------------------------------------------------

_PARTS: dict[str, Callable[[str], tuple[PretrainedConfig, ProcessorMixin]]] = {
    "llava": llava_parts, "qwen2_vl": qwen2_vl_parts, "qwen2_5_vl": qwen2_5_vl_parts, "idefics3": idefics3_parts,
    "janus": janus_parts,
}
MODEL_CLASSES: dict[str, type[PreTrainedModel]] = {
    "llava": LlavaForConditionalGeneration, "qwen2_vl": Qwen2VLForConditionalGeneration,
    "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration, "idefics3": Idefics3ForConditionalGeneration,
    "janus": JanusForConditionalGeneration,
}
"""The real class each family's checkpoint loads as through `AutoModelForImageTextToText`."""


def idm_parts(family: str, size: str = "tiny") -> tuple[PretrainedConfig, ProcessorMixin]:
    """Config and processor only, without building the model: cheap even for `size="real"`."""
    if family not in _PARTS:
        raise ValueError(f"unknown IDM family {family!r}; known: {IDM_FAMILIES}")
    return _PARTS[family](size)


def resized_language_model(config: PretrainedConfig, hidden_size: int, num_layers: int) -> PretrainedConfig:
    """`config` with its language model `num_layers` deep and `hidden_size` wide (heads of 64, as Qwen2-VL-2B's
    head dim halved; MLP 4x wide), the vision tower unchanged but for the width it hands the language model.

    Why: a random IDM of a real family whose cost per pair is chosen, not fixed by a published size, so a CPU
    bench can put the model stage where a real VLM puts it relative to decoding (bench/p1_annotation.py sizes
    it to about 3x decoding's cost per pair). Per-pair cost grows with width^2 x depth.
    """
    if hidden_size % 64:
        raise ValueError(f"hidden_size {hidden_size} is not a multiple of the head size 64")
    heads = hidden_size // 64
    data = config.to_dict()
    text = data["text_config"]
    text.pop("layer_types", None)  # one per layer: the config derives it again for the new depth
    text.update(hidden_size=hidden_size, intermediate_size=4 * hidden_size, num_hidden_layers=num_layers,
                num_attention_heads=heads, num_key_value_heads=heads, head_dim=64)
    if "mrope_section" in (text.get("rope_parameters") or {}):  # Qwen's (t, h, w) split of the 32 rotary pairs
        text["rope_parameters"] = dict(text["rope_parameters"], mrope_section=[8, 12, 12])
    if isinstance(config, Qwen2_5_VLConfig):  # the patch merger projects into the LM's width
        data["vision_config"]["out_hidden_size"] = hidden_size
    elif isinstance(config, Qwen2VLConfig):
        data["vision_config"]["hidden_size"] = hidden_size
    return type(config).from_dict(data)


def _save(family: str, directory: str, size: str, seed: int, lm: tuple[int, int] | None = None) -> str:
    """Random-init the family's model (seeded, without disturbing the global RNG), set the generation ids, save
    model + processor. Real sizes are cast to bfloat16 before saving (a 7B checkpoint is 14 GB instead of 28).
    `lm` = (hidden_size, num_layers) resizes the language model (`resized_language_model`)."""
    config, processor = idm_parts(family, size)
    if lm is not None:
        config = resized_language_model(config, *lm)
    tok = processor.tokenizer
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MODEL_CLASSES[family](config)
    eos: int | list[int] = tok.eos_token_id
    if family.startswith("qwen"):  # the published generation_config stops on end-of-turn or end-of-text
        eos = [tok.eos_token_id, tok.pad_token_id]
    bos = tok.convert_tokens_to_ids("<|endoftext|>") if family.startswith("qwen") else tok.bos_token_id
    model.generation_config = GenerationConfig(bos_token_id=bos, eos_token_id=eos, pad_token_id=tok.pad_token_id)
    if size == "real":
        model = model.to(torch.bfloat16)
    model.eval()
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def build_tiny_llava(directory: str, *, size: str = "tiny", seed: int = 0) -> str:
    """Save a random `LlavaForConditionalGeneration` + `LlavaProcessor` (with llava-1.5's chat template)."""
    return _save("llava", directory, size, seed)


def build_tiny_qwen2_vl(directory: str, *, size: str = "tiny", seed: int = 0) -> str:
    """Save a random `Qwen2VLForConditionalGeneration` + `Qwen2VLProcessor` (with Qwen2-VL-Instruct's template)."""
    return _save("qwen2_vl", directory, size, seed)


def build_tiny_qwen2_5_vl(directory: str, *, size: str = "tiny", seed: int = 0) -> str:
    """Save a random `Qwen2_5_VLForConditionalGeneration` + `Qwen2_5_VLProcessor`."""
    return _save("qwen2_5_vl", directory, size, seed)


def build_tiny_idefics3(directory: str, *, size: str = "tiny", seed: int = 0) -> str:
    """Save a random `Idefics3ForConditionalGeneration` + `Idefics3Processor` (with SmolVLM's chat template)."""
    return _save("idefics3", directory, size, seed)


def build_tiny_idm(family: str, directory: str, *, size: str = "tiny", seed: int = 0,
                   hidden_size: int | None = None, num_layers: int | None = None) -> str:
    """Save a random checkpoint of `family` (one of `IDM_FAMILIES`) into `directory` and return `directory`,
    which `AutoModelForImageTextToText.from_pretrained` / `AutoProcessor.from_pretrained` then load by path.

    `hidden_size` and `num_layers` (both or neither) resize the language model (`resized_language_model`): the
    processor, vision tower and tokens stay those of `size`."""
    if family not in _PARTS:
        raise ValueError(f"unknown IDM family {family!r}; known: {IDM_FAMILIES}")
    _check_size(size)
    if (hidden_size is None) != (num_layers is None):
        raise ValueError("give both hidden_size and num_layers, or neither")
    lm = None if hidden_size is None or num_layers is None else (hidden_size, num_layers)
    if family == "janus":  # one checkpoint for both roles: the world model's builder writes it
        if lm is not None:
            raise ValueError("hidden_size / num_layers do not resize janus (its aligners project into the LM's width)")
        return build_tiny_janus(directory, size=size, seed=seed)
    return _save(family, directory, size, seed, lm)
