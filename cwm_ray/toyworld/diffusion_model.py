"""The toy diffusion world model: a fresh tiny InstructPix2Pix-architecture model in pixel space, over the toy
world's words (`WorldModelConfig(model="toy")`, backend diffusion).

It lives beside the toy world, not in `cwm_ray.world_model.diffusion`, so the product's backend carries no toy:
the backend builds it by name through `cwm_ray.builtin_models` (`components_from_config`).
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from cwm_ray import storage
from cwm_ray.config import TOY, WorldModelConfig
from cwm_ray.toyworld.tokenizer import build_word_tokenizer
from cwm_ray.world_model.diffusion import DiffusionWorldModel, save_components

TOY_RESOLUTION = 64
"""A fresh `toy` model's side when `resolution` is None (the toy world's frames)."""


def toy_components(resolution: int = TOY_RESOLUTION, seed: int = 0, patch_size: int = 2,
                    block_out_channels: Sequence[int] = (32, 64, 64), layers_per_block: int = 1,
                    text_hidden_size: int = 64, max_length: int = 16) -> dict[str, Any]:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        tokenizer = build_word_tokenizer()
        tokenizer.model_max_length = max_length
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=text_hidden_size, intermediate_size=2 * text_hidden_size,
            num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=max_length,
            pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, projection_dim=text_hidden_size,
        ))
        c = 3 * patch_size**2
        k = len(block_out_channels)
        unet = UNet2DConditionModel(
            sample_size=resolution // patch_size, in_channels=2 * c, out_channels=c,
            block_out_channels=tuple(block_out_channels), layers_per_block=layers_per_block,
            # attention only at the coarsest level (8×8 for 64 px with p = 2: one position per toy cell)
            down_block_types=("DownBlock2D",) * (k - 1) + ("CrossAttnDownBlock2D",),
            up_block_types=("CrossAttnUpBlock2D",) + ("UpBlock2D",) * (k - 1),
            cross_attention_dim=text_hidden_size, attention_head_dim=4, norm_num_groups=8,
        )
    # clip_sample off, as in Stable Diffusion: latents are scaled to unit variance, not to [-1, 1]
    noise_scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type="v_prediction",
                                    timestep_spacing="trailing", clip_sample=False)
    return {"unet": unet, "vae": None, "text_encoder": text_encoder, "tokenizer": tokenizer,
            "noise_scheduler": noise_scheduler}


def build_toy_world_model(directory: str | None = None, resolution: int = 64, seed: int = 0,
                          **hyper: Any) -> DiffusionWorldModel:
    """A fresh tiny InstructPix2Pix-architecture world model (pixel space), saved to `directory` if given.

    Defaults: 64 px with p = 2 (why: `cwm_ray.world_model.diffusion`'s docstring), so the UNet works on
    32×32×12 latents; three levels of (32, 64, 64) channels, one block each, cross-attention only at the
    coarsest (8×8, one position per toy cell); a 2-layer CLIP text encoder of width 64 over the toy words.
    Sized so that 600 steps train on 2 CPU cores in about 4 minutes and beat copying the source on the toy
    judge (README). `hyper` overrides `toy_components` (patch_size, block_out_channels, layers_per_block, ...), which
    tests use to make it smaller still. The saved directory loads by path through `load_world_model`.
    """
    components = toy_components(resolution, seed, **hyper)
    if directory is not None:
        if storage.is_s3(directory):
            with tempfile.TemporaryDirectory() as tmp:
                save_components(Path(tmp), **components)
                storage.upload_dir(tmp, directory)
        else:
            save_components(Path(directory), **components)
    return DiffusionWorldModel(WorldModelConfig(model=directory or TOY, resolution=resolution), components=components)


def components_from_config(cfg: WorldModelConfig) -> dict[str, Any]:
    """`WorldModelConfig(model="toy")`: the toy's components at the config's `resolution` (`TOY_RESOLUTION` when
    unset)."""
    return toy_components(cfg.resolution or TOY_RESOLUTION)


__all__ = ["TOY_RESOLUTION", "build_toy_world_model", "components_from_config", "toy_components"]
