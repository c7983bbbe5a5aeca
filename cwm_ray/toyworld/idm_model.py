"""The toy IDM: a fresh random tiny LLaVA over the toy world's words (`IDMConfig(model="toy")`).

It lives beside the toy world, not in `cwm_ray.idm`, so the product's IDM carries no toy: `cwm_ray.idm` loads it
by name through `cwm_ray.builtin_models` (`from_config`), like any checkpoint it is given by path.
"""

from __future__ import annotations

import torch
from PIL import Image
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

from cwm_ray.config import IDMConfig
from cwm_ray.idm import neighbourhood_offsets
from cwm_ray.toyworld.tokenizer import build_word_tokenizer
from cwm_ray.toyworld.world import BACKGROUND


def build_toy_idm(
    directory: str | None = None,
    image_size: int = 64,
    seed: int = 0,
    *,
    patch_size: int = 8,
    hidden_size: int = 128,
    text_layers: int = 4,
    vision_layers: int = 1,
    tubelet: bool = True,
    reach: int = 2,
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """A fresh random tiny LLaVA over the toy world's word vocabulary (`IDMConfig(model="toy")`).

    Chosen by measurement on 2 CPU cores (see docs/experiments.md): patch 8 on 64 px frames, so one
    patch is one cell of the board; pixels centred on the board's colour; `tubelet=True` gives the CLIP
    tower 6 input channels so each token sees a cell before *and* after, and the 4-layer Llama (hidden
    128) only has to find and name the changed cells; `reach=2` widens each token to the cross of cells
    up to 2 away (`patch_neighbourhood`), so where an object went and what it now stands beside are in
    the token too (44 % → 91 % of held-out test pairs explained at 1500 steps). With two separate images
    (`tubelet=False`, the layout real VLMs use) the same model must first learn to align cells 64
    positions apart, and on the same budget it is still far from the tubelet model's accuracy.
    """
    tokenizer = build_word_tokenizer(extra_tokens=["<image>"])
    patch = patch_size
    hidden = hidden_size
    channels = 6 * len(neighbourhood_offsets(reach)) if tubelet else 3
    image_processor = CLIPImageProcessorPil(
        size={"height": image_size, "width": image_size}, crop_size={"height": image_size, "width": image_size},
        # Centred on the board's background colour: empty cells become zero vectors, so the few cells that
        # hold objects dominate every image token from the first step (with the usual mean 0.5 the dark
        # board swamps them and training sits on an image-blind plateau for thousands of steps).
        resample=Image.Resampling.NEAREST, image_mean=[c / 255 for c in BACKGROUND], image_std=[0.25] * 3,
    )
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=patch,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,  # CLS is computed, then dropped
    )
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=vision_layers, num_attention_heads=4,
            image_size=image_size, patch_size=patch, num_channels=channels,
        ),
        text_config=LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=text_layers,
            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        image_token_index=processor.image_token_id, image_seq_length=(image_size // patch) ** 2,
        vision_feature_select_strategy="default", vision_feature_layer=-1, projector_hidden_act="gelu",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config)
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    if directory is not None:
        model.save_pretrained(directory)
        processor.save_pretrained(directory)
    return model, processor


def from_config(cfg: IDMConfig) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """`IDMConfig(model="toy")`: the toy IDM at the config's `image_size` (64 px when unset)."""
    return build_toy_idm(image_size=cfg.image_size or 64)


__all__ = ["build_toy_idm", "from_config"]
