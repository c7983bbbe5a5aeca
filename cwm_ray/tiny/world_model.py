"""Tiny random checkpoints of the real world-model classes, saved the way the hub ships them.

Why: the `toy` models are built in code at 64 px (a pixel-space UNet, a constructed VQ), so they never go
through the paths a real checkpoint takes: a VAE, a CLIP tokenizer's specials, an IP2P UNet's native side, a
Janus VQ with its 16× downsampling, the family's LoRA target names, loading by path. These builders write
directories of the published classes (`StableDiffusionInstructPix2PixPipeline`, `JanusForConditionalGeneration`
+ `JanusProcessor`) with random weights and tiny configs, so tests load them through production code exactly
as they would load timbrooks/instruct-pix2pix or deepseek-community/Janus-Pro-1B.

`size="real"` gives the published sizes' configs (SD-1.5 / InstructPix2Pix; Janus-Pro-1B), for GPU benches:
building one instantiates about a billion random parameters, so nothing here does that on CPU. The sizes are
written from the models' published config files as we know them, unchecked against the hub (unreachable here).

Tokenizers are word-level over the toy words (a real BPE vocabulary would be a download), with each family's
real special tokens, so the toy gold sets tokenize without unknown words.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

WORLD_MODEL_FAMILIES = ("instruct_pix2pix", "janus")
"""Checkpoint families the world model loads: `backend: diffusion` and `backend: token` respectively."""
BACKEND = {"instruct_pix2pix": "diffusion", "janus": "token"}
"""The `world_model.backend` that loads each family."""
SIZES = ("tiny", "real")

# CLIP's and Janus's (DeepSeek-LLM's) special tokens, spelled as their tokenizers spell them.
CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"
JANUS_BOS, JANUS_EOS, JANUS_PAD = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"
BOI, EOI, IMAGE = "<begin_of_image>", "<end_of_image>", "<image_placeholder>"

JANUS_TINY_SIDE = 96
"""The tiny Janus VQ's native side: 96 px at Janus-Pro's 16× downsampling is a 6×6 grid (36 tokens per
image), cheap to sample autoregressively on CPU while keeping the real factor (Janus-Pro: 384 px, 24×24)."""


def _word_tokenizer(bos: str, eos: str, pad: str, unk: str, extra: list[str], add_eos: bool,
                    model_max_length: int, words: list[str] | None = None, padding_side: str = "right",
                    **named: str) -> PreTrainedTokenizerFast:
    """A word-level fast tokenizer over the toy words (and `words`) with the given specials and post-processor.

    `add_eos`: CLIP wraps text as bos … eos (its text model pools at eos); Llama-style tokenizers prepend bos.
    `named` are model-specific special tokens (Janus's processor reads `tokenizer.image_token`, …); every `extra`
    token is special, so it stays one token (`<|User|>` is not split at its punctuation).
    """
    from cwm_ray.toyworld.tokenizer import WORDS

    specials = list(dict.fromkeys([pad, unk, bos, eos, *extra]))
    vocab = {tok: i for i, tok in enumerate(specials + [w for w in dict.fromkeys(WORDS + (words or []))
                                                        if w not in specials])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    ids = [(bos, vocab[bos]), (eos, vocab[eos])]
    template = f"{bos} $A {eos}" if add_eos else f"{bos} $A"
    tok.post_processor = processors.TemplateProcessing(single=template, special_tokens=ids)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad, unk_token=unk,
                                   extra_special_tokens=named or extra or None, clean_up_tokenization_spaces=False,
                                   padding_side=padding_side)
    fast.model_max_length = model_max_length
    if named:  # the unnamed extras as special tokens too (their ids are already in the vocabulary)
        fast.add_tokens([t for t in extra if t not in named.values()], special_tokens=True)
    return fast


# -- InstructPix2Pix ---------------------------------------------------------------------------------------
def instruct_pix2pix_configs(size: str = "tiny", resolution: int = 256, vocab_size: int = 49408) -> dict[str, Any]:
    """Constructor kwargs of the IP2P components: {"unet", "vae", "text_encoder", "scheduler"}.

    The UNet's `sample_size` is `resolution` / 8 (the VAE's three 2× downsamplings), so the checkpoint's native
    side (`sample_size × vae_scale_factor`, what the diffusion backend uses for `resolution: null`) is
    `resolution`. IP2P trained at 256; SD-1.5's own UNet config says 64 (512 px).
    """
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}; got {size!r}")
    if resolution % 8:
        raise ValueError(f"resolution must be a multiple of the VAE's factor 8; got {resolution}")
    if size == "real":  # SD-1.5 (runwayml) as InstructPix2Pix ships it, with conv_in widened to 8 channels
        unet = {"block_out_channels": (320, 640, 1280, 1280), "layers_per_block": 2, "cross_attention_dim": 768,
                "attention_head_dim": 8,
                "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3}
        vae = {"block_out_channels": (128, 256, 512, 512), "layers_per_block": 2, "sample_size": 512}
        text = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
                "projection_dim": 768, "hidden_act": "quick_gelu"}
    else:  # diffusers' own tiny test sizes: every block type of the real UNet, one layer each
        unet = {"block_out_channels": (32, 64), "layers_per_block": 1, "cross_attention_dim": 32,
                "attention_head_dim": 8, "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
                "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D")}
        # four levels, as SD's VAE: the 8× factor is what sets the latent grid (32×32 at 256 px)
        vae = {"block_out_channels": (8, 8, 16, 16), "layers_per_block": 1, "norm_num_groups": 8,
               "sample_size": resolution}
        text = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                "projection_dim": 32, "hidden_act": "quick_gelu"}
    unet |= {"sample_size": resolution // 8, "in_channels": 8, "out_channels": 4}
    vae |= {"in_channels": 3, "out_channels": 3, "latent_channels": 4, "scaling_factor": 0.18215,
            "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4}
    text |= {"vocab_size": vocab_size, "max_position_embeddings": 77}
    # Stable Diffusion's training noise schedule (IP2P's scheduler_config, whatever sampler class it names)
    scheduler = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                 "beta_schedule": "scaled_linear", "prediction_type": "epsilon", "steps_offset": 1,
                 "timestep_spacing": "leading"}
    return {"unet": unet, "vae": vae, "text_encoder": text, "scheduler": scheduler}


def build_tiny_instruct_pix2pix(directory: str, *, resolution: int = 256, size: str = "tiny", seed: int = 0) -> str:
    """A random `StableDiffusionInstructPix2PixPipeline` saved to `directory`; returns the directory.

    Real classes throughout: AutoencoderKL (4 latent channels, factor 8), UNet2DConditionModel with 8 input
    channels, CLIPTextModel, a CLIP-style tokenizer (bos/eos = <|startoftext|>/<|endoftext|>, padded to 77)
    and the EulerAncestralDiscreteScheduler IP2P samples with. Tiny: 0.9 M parameters.
    """
    from diffusers import (
        AutoencoderKL,
        EulerAncestralDiscreteScheduler,
        StableDiffusionInstructPix2PixPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = _word_tokenizer(CLIP_BOS, CLIP_EOS, pad=CLIP_EOS, unk="<unk>", extra=[], add_eos=True,
                                model_max_length=77)
    vocab = 49408 if size == "real" else len(tokenizer)
    cfg = instruct_pix2pix_configs(size, resolution, vocab)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**cfg["unet"])
        vae = AutoencoderKL(**cfg["vae"])
        text_encoder = CLIPTextModel(CLIPTextConfig(
            **cfg["text_encoder"], bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id))
    pipe = StableDiffusionInstructPix2PixPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=EulerAncestralDiscreteScheduler(**cfg["scheduler"]), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.save_pretrained(directory, safe_serialization=True)
    return str(directory)


# -- Janus -------------------------------------------------------------------------------------------------
def janus_config(size: str = "tiny", vocab_size: int = 102400, image_token_id: int = 100581,
                 token_ids: dict[str, int] | None = None) -> Any:
    """The `JanusConfig` of Janus-Pro-1B (`real`) or of a tiny Janus with the same VQ factor (`tiny`).

    Janus-Pro: a 24-layer Llama of width 2048, SigLIP-L at 384 px / patch 16, and a VQ with five levels (four
    2× downsamplings: 16×) and a 16384-entry codebook of dim 8, so 384 px is a 24×24 grid. Tiny: a 2-layer
    Llama of width 64 and a VQ of the same five levels at 32-128 channels over 256 codes, at
    `JANUS_TINY_SIDE` px. JanusConfig sets the VQ grid from the SigLIP side / patch, so both share the side.
    `token_ids`: the tokenizer's bos/eos/pad ids for the Llama's config.
    """
    from transformers import JanusConfig, LlamaConfig

    ids = token_ids or {}
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}; got {size!r}")
    if size == "real":
        text = LlamaConfig(vocab_size=vocab_size, hidden_size=2048, intermediate_size=5632, num_hidden_layers=24,
                           num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=16384, **ids)
        vision = {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "image_size": 384,
                  "patch_size": 16, "projection_dim": 2048, "depth": 2, "num_image_tokens": 576}
        vq = {"embed_dim": 8, "num_embeddings": 16384, "latent_channels": 256, "base_channels": 128,
              "channel_multiplier": [1, 1, 2, 2, 4], "num_res_blocks": 2, "projection_dim": 2048,
              "image_token_embed_dim": 2048}
    else:
        side, hidden = JANUS_TINY_SIDE, 64
        text = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                           max_position_embeddings=512, **ids)
        vision = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "image_size": side,
                  "patch_size": 16, "projection_dim": hidden, "mlp_ratio": 1.0, "depth": 1,
                  "num_image_tokens": (side // 16) ** 2}
        vq = {"embed_dim": 8, "num_embeddings": 256, "latent_channels": 32, "base_channels": 32,
              "channel_multiplier": [1, 1, 2, 2, 4], "num_res_blocks": 1, "projection_dim": hidden,
              "image_token_embed_dim": hidden}
    # Janus-Pro's lm_head is its own matrix (2.08 B parameters untied, near the 2.09 B the hub lists; tied: 1.87 B)
    return JanusConfig(text_config=text.to_dict(), vision_config=vision, vq_config=vq, image_token_id=image_token_id,
                       tie_word_embeddings=size != "real")


JANUS_CHAT_TEMPLATE = (
    # deepseek-community/Janus-Pro-1B / -7B, as transformers' convert_janus_weights_to_hf.py writes it (the original
    # repo's "deepseek" conversation format): "<|User|>: <image_placeholder>\n...\n\n<|Assistant|>:", the
    # assistant's turn closed by <｜end▁of▁sentence｜>, which is also the tokenizer's eos.
    "{%set seps=['\n\n','<\uff5cend\u2581of\u2581sentence\uff5c>']%}"
    "{%set i=0%}"
    "{%for message in messages%}"
    "{%if message['role']|lower=='user'%}"
    "<|User|>: "
    "{%elif message['role']|lower=='assistant'%}"
    "<|Assistant|>:{%if not (loop.last and not add_generation_prompt and message['content'][0]['type']=='text' and "
    "message['content'][0]['text']=='')%} {%endif%}"
    "{%else%}"
    "{{message['role'].capitalize()}}: "
    "{%endif%}"
    "{%for content in message['content']%}"
    "{%if content['type']=='image'%}"
    "{%if not loop.first%}{{'\n'}}{%endif%}"
    "<image_placeholder>"
    "{%if not loop.last%}{{'\n'}}{%endif%}"
    "{%elif content['type']=='text'%}"
    "{%set text=content['text']%}"
    "{%if loop.first%}{%set text=text.lstrip()%}{%endif%}"
    "{%if loop.last%}{%set text=text.rstrip()%}{%endif%}"
    "{%if not loop.first and message['content'][loop.index0-1]['type']=='text'%}"
    "{{' '+text}}"
    "{%else%}"
    "{{text}}"
    "{%endif%}"
    "{%endif%}"
    "{%endfor%}"
    "{%if not loop.last or add_generation_prompt%}"
    "{%if message['role']|lower=='user'%}"
    "{{seps[0]}}"
    "{%else%}"
    "{{seps[1]}}"
    "{%endif%}"
    "{%endif%}"
    "{%endfor%}"
    "{%if add_generation_prompt%}<|Assistant|>:{%endif%}"
)
JANUS_ROLES = ("<|User|>", "<|Assistant|>")
"""The chat roles, special tokens of Janus-Pro's tokenizer (with `<image_placeholder>`, as its special_tokens_map
lists them)."""


def janus_parts(size: str = "tiny") -> tuple[Any, Any]:
    """`JanusConfig` and `JanusProcessor` of a tiny (or Janus-Pro-1B-sized) Janus, as deepseek-community ships them.

    The processor has the published chat template (`JANUS_CHAT_TEMPLATE`) and `use_default_system_prompt=True`
    (text-mode prompts start with Janus's system prompt, whose words are in the tiny vocabulary), so the
    understanding path (SigLIP + aligner → Llama → text: the IDM) gets Janus-Pro's own prompt; the text config
    carries the tokenizer's bos/eos/pad ids. One checkpoint serves both roles (world model and IDM).
    """
    import re

    from transformers import JanusImageProcessor, JanusProcessor
    from transformers.models.janus.processing_janus import DEFAULT_SYSTEM_PROMPT

    system_words = list(dict.fromkeys(re.findall(r"\w+|[^\w\s]", DEFAULT_SYSTEM_PROMPT)))
    tokenizer = _word_tokenizer(JANUS_BOS, JANUS_EOS, pad=JANUS_PAD, unk="<unk>", extra=[IMAGE, BOI, EOI, *JANUS_ROLES],
                                add_eos=False, model_max_length=16384, words=system_words, padding_side="left",
                                image_token=IMAGE, boi_token=BOI, eoi_token=EOI)
    real = size == "real"
    config = janus_config(size, vocab_size=102400 if real else len(tokenizer),
                          image_token_id=tokenizer.convert_tokens_to_ids(IMAGE),
                          token_ids={"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                                     "pad_token_id": tokenizer.pad_token_id})
    side = config.vision_config.image_size
    processor = JanusProcessor(image_processor=JanusImageProcessor(size={"height": side, "width": side}),
                               tokenizer=tokenizer, chat_template=JANUS_CHAT_TEMPLATE, use_default_system_prompt=True,
                               num_image_tokens=config.vision_config.num_image_tokens)
    return config, processor


def build_tiny_janus(directory: str, *, size: str = "tiny", seed: int = 0) -> str:
    """A random `JanusForConditionalGeneration` + `JanusProcessor` saved to `directory`; returns the directory.

    The VQ is random (a codebook is learnt in a training of its own; the toy token model constructs one, this
    one is a stand-in for a real checkpoint's), so decoded images are noise at the native side. The tokenizer
    has Janus's special tokens: bos/eos/pad as DeepSeek-LLM spells them, <begin_of_image>, <end_of_image>,
    <image_placeholder> and the chat roles; the processor has Janus-Pro's chat template (`janus_parts`), so the
    same directory loads as the token world model and as an IDM. Tiny: 3.5 M parameters (most in the VQ), 96 px
    (`JANUS_TINY_SIDE`).
    """
    from transformers import GenerationConfig, JanusForConditionalGeneration

    config, processor = janus_parts(size)
    tok = processor.tokenizer
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = JanusForConditionalGeneration(config)
    model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                               pad_token_id=tok.pad_token_id)
    model.save_pretrained(directory, safe_serialization=True)
    processor.save_pretrained(directory)
    return str(directory)


def build_tiny_world_model(family: str, directory: str, **kw: Any) -> str:
    """`build_tiny_instruct_pix2pix` or `build_tiny_janus` by family name (`WORLD_MODEL_FAMILIES`)."""
    builders = {"instruct_pix2pix": build_tiny_instruct_pix2pix, "janus": build_tiny_janus}
    if family not in builders:
        raise ValueError(f"unknown world-model family {family!r}; known: {', '.join(WORLD_MODEL_FAMILIES)}")
    return builders[family](directory, **kw)


__all__ = ["BACKEND", "JANUS_TINY_SIDE", "WORLD_MODEL_FAMILIES", "build_tiny_instruct_pix2pix", "build_tiny_janus",
           "build_tiny_world_model", "instruct_pix2pix_configs", "janus_config", "parameter_count"]


def parameter_count(directory: str | Path) -> int:
    """Parameters stored in a checkpoint directory's safetensors files (read from headers, nothing loaded)."""
    from safetensors import safe_open

    total = 0
    for f in Path(directory).rglob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            total += sum(math.prod(st.get_slice(k).get_shape()) for k in st.keys())
    return total
