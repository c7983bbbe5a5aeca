"""The diffusion world model: InstructPix2Pix (a UNet with 8 input channels, a VAE, a CLIP text encoder).

The world model is action-centric image editing, so we take the editing model the field already uses
(AURORA is an InstructPix2Pix fine-tune) and diffusers' `train_instruct_pix2pix.py` recipe, word for word
where we can: `noise_scheduler`, `noisy_latents`, `original_image_embeds`, `encoder_hidden_states`,
three-band conditioning dropout, and the 3-way classifier-free guidance of
`StableDiffusionInstructPix2PixPipeline`. Two additions, both from the paper: the loss is
recognition-weighted (§Strategy 1), and sampling draws the N candidates of best-of-N (§Strategy 2) as
one batched denoising run.

Pixel space (the toy model): a checkpoint without `vae/` is a pixel-space model. Its "VAE" is the
lossless space-to-depth map `pixel_unshuffle(image, p)` with p² = unet.out_channels / 3, so a 64 px
image is a 32×32×12 latent. Why: the toy judge needs 64 px to tell shapes apart (at 32 px a 4-pixel
cell cannot hold a circle that differs from a square), and unshuffling keeps the UNet at 32×32, the
cost of a 32 px model. p = 1 is plain pixels.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from diffusers.image_processor import VaeImageProcessor
from PIL import Image
from torch import nn
from transformers import AutoTokenizer, CLIPTextModel, PreTrainedTokenizerBase

from cwm_ray import storage
from cwm_ray.builtin_models import builtin_model
from cwm_ray.config import DIFFUSERS_LORA_TARGETS, RecognitionConfig, WorldModelConfig
from cwm_ray.lora import lora_targets
from cwm_ray.recognition import batch_weights, recognition_weights, stored_weights
from cwm_ray.schema import decode_image
from cwm_ray.world_model import DTYPES, candidate_seed, resolve_device

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
"""diffusers' file name for LoRA weights: an adapter directory also loads with `pipe.load_lora_weights`."""


def weighted_mse(model_pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """The recognition-weighted loss of the paper's §Strategy 1 (recognition-weighted loss).

    The paper weights each target token's NLL by how much the action changed it; for a diffusion model
    the per-token NLL is the per-element MSE of the denoising target, so the loss is diffusers' MSE with
    one multiplication by the weight map pooled to the latent grid. Weight maps have mean 1 per image
    (cwm_ray.recognition), so the plain `.mean()` keeps the loss on the MSE's scale; `weights=None` is
    all ones, and all ones is exactly diffusers' `F.mse_loss(model_pred, target, reduction="mean")`.
    """
    if weights is None:
        weights = torch.ones(model_pred.shape[0], *model_pred.shape[-2:], device=model_pred.device)
    weights = pool_to_latent_grid(weights.to(model_pred.device), model_pred.shape[-2:])
    return (weights * F.mse_loss(model_pred.float(), target.float(), reduction="none")).mean()


def pool_to_latent_grid(weights: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """(B, h, w) weights at any grid → (B, 1, H, W) on the latent grid by area averaging (keeps mean 1)."""
    w = weights.float()
    w = w[:, None] if w.ndim == 3 else w
    if tuple(w.shape[-2:]) != tuple(size):
        w = F.interpolate(w, size=tuple(size), mode="area")
    return w


class InstructPix2PixModule(nn.Module):
    """The trainable unet with its frozen vae and text_encoder: what a DDP / DeepSpeed engine wraps.

    It knows nothing of distribution or data loading; `forward(**collated_batch)` is the scalar loss.
    """

    def __init__(self, unet: UNet2DConditionModel, vae: AutoencoderKL | None, text_encoder: CLIPTextModel,
                 noise_scheduler: DDPMScheduler, null_input_ids: torch.Tensor, conditioning_dropout: float,
                 train_text_encoder: bool = False, pixel_shift: float = 0.0, pixel_scale: float = 1.0) -> None:
        super().__init__()
        self.unet = unet
        self.vae = vae
        self.text_encoder = text_encoder
        self.noise_scheduler = noise_scheduler
        self.conditioning_dropout = conditioning_dropout
        self.train_text_encoder = train_text_encoder
        self.pixel_shift, self.pixel_scale = pixel_shift, pixel_scale  # pixel space only (see WorldModelConfig)
        # The tokenized empty prompt: the "null" text conditioning of dropout and guidance.
        self.register_buffer("null_input_ids", null_input_ids, persistent=False)
        for frozen in self._frozen():
            frozen.requires_grad_(False).eval()
        c = unet.config.out_channels
        self.patch_size = 1 if vae is not None else math.isqrt(c // 3)
        if vae is None and (3 * self.patch_size**2 != c or unet.config.in_channels != 2 * c):
            raise ValueError(f"a pixel-space unet needs out_channels = 3·p² and in_channels = 2·out_channels; "
                             f"got in={unet.config.in_channels}, out={c}")

    def train(self, mode: bool = True) -> InstructPix2PixModule:
        super().train(mode)
        for frozen in self._frozen():  # frozen parts stay in eval mode (no dropout)
            frozen.eval()
        return self

    def _frozen(self) -> list[nn.Module]:
        return [m for m in (self.vae, None if self.train_text_encoder else self.text_encoder) if m is not None]

    # -- encoders: VAE latents for real checkpoints, unshuffled pixels for the pixel-space toy -------------
    def encode_target(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.vae is None:
            return (F.pixel_unshuffle(pixel_values, self.patch_size) - self.pixel_shift) * self.pixel_scale
        latents = self.vae.encode(pixel_values.to(self.vae.dtype)).latent_dist.sample()
        return latents * self.vae.config.scaling_factor

    def encode_original(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`original_image_embeds`: the VAE's latent mean, unscaled, as diffusers' recipe and pipeline do.

        In pixel space it is the same map as the target's, so copying the source is the identity."""
        if self.vae is None:
            return (F.pixel_unshuffle(pixel_values, self.patch_size) - self.pixel_shift) * self.pixel_scale
        return self.vae.encode(pixel_values.to(self.vae.dtype)).latent_dist.mode()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        if self.vae is None:
            return F.pixel_shuffle(latents / self.pixel_scale + self.pixel_shift, self.patch_size).clamp(-1, 1)
        return self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False)[0]

    def encode_prompt(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.text_encoder(input_ids.to(self.text_encoder.device), return_dict=False)[0]

    # -- training ----------------------------------------------------------------------------------------
    def predict(self, original_pixel_values: torch.Tensor, edited_pixel_values: torch.Tensor,
                input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(model_pred, target) of one denoising step: diffusers' `train_instruct_pix2pix.py` step."""
        device = self.unet.device
        with torch.no_grad():
            latents = self.encode_target(edited_pixel_values.to(device))
            original_image_embeds = self.encode_original(original_pixel_values.to(device))
        with torch.set_grad_enabled(self.train_text_encoder and torch.is_grad_enabled()):
            encoder_hidden_states = self.encode_prompt(input_ids)
            null_conditioning = self.encode_prompt(self.null_input_ids)

        noise = torch.randn_like(latents)
        bsz = latents.shape[0]
        timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (bsz,), device=device).long()
        noisy_latents = self.noise_scheduler.add_noise(latents, noise, timesteps)

        # Three bands of conditioning dropout: text only, both, image only (so guidance has all three terms).
        p = self.conditioning_dropout
        random_p = torch.rand(bsz, device=device)
        prompt_mask = (random_p < 2 * p).reshape(bsz, 1, 1)
        encoder_hidden_states = torch.where(prompt_mask, null_conditioning, encoder_hidden_states)
        image_mask_dtype = original_image_embeds.dtype
        image_mask = 1 - ((random_p >= p).to(image_mask_dtype) * (random_p < 3 * p).to(image_mask_dtype))
        original_image_embeds = image_mask.reshape(bsz, 1, 1, 1) * original_image_embeds

        concatenated_noisy_latents = torch.cat([noisy_latents, original_image_embeds], dim=1)
        prediction_type = self.noise_scheduler.config.prediction_type
        if prediction_type == "epsilon":
            target = noise
        elif prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            raise ValueError(f"unsupported prediction_type {prediction_type!r}")
        model_pred = self.unet(concatenated_noisy_latents.to(self.unet.dtype), timesteps,
                               encoder_hidden_states.to(self.unet.dtype), return_dict=False)[0]
        return model_pred, target

    def forward(self, original_pixel_values: torch.Tensor, edited_pixel_values: torch.Tensor,
                input_ids: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        model_pred, target = self.predict(original_pixel_values, edited_pixel_values, input_ids)
        return weighted_mse(model_pred, target, weights)


class DiffusionWorldModel:
    """The `diffusion` backend of the WorldModel protocol (see cwm_ray.world_model)."""

    def __init__(self, cfg: WorldModelConfig, recognition: RecognitionConfig | None = None,
                 components: dict[str, Any] | None = None) -> None:
        self.cfg = cfg
        self.recognition = recognition or RecognitionConfig()
        self.device = resolve_device(cfg.device)
        self.dtype = DTYPES[cfg.dtype]
        builder = builtin_model("diffusion", cfg.model) if components is None else None
        if builder is not None:  # a built-in model (`toy`): built in code, cwm_ray.builtin_models
            components = builder(cfg)
        elif components is None:
            components = _load_components(cfg.model, self.dtype)
        self.unet: UNet2DConditionModel = components["unet"]
        self.vae: AutoencoderKL | None = components["vae"]
        self.text_encoder: CLIPTextModel = components["text_encoder"]
        self.tokenizer: PreTrainedTokenizerBase = components["tokenizer"]
        self.noise_scheduler: DDPMScheduler = components["noise_scheduler"]

        if cfg.adapter:
            self.unet.load_lora_adapter(storage.local_dir(cfg.adapter), prefix="unet", adapter_name="default",
                                        weight_name=LORA_WEIGHT_NAME)
            if not cfg.lora.enabled:  # inference or full fine-tuning on top: merge the adapter away
                self.unet.fuse_lora()
                self.unet.unload_lora()
        elif cfg.lora.enabled:
            from peft import LoraConfig

            targets = lora_targets(self.unet, cfg.lora.target_modules, DIFFUSERS_LORA_TARGETS,
                                   "the InstructPix2Pix UNet (diffusers UNet2DConditionModel)",
                                   "world_model.lora.target_modules")
            self.unet.add_adapter(LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                                             target_modules=targets, init_lora_weights="gaussian"))
        self.module = InstructPix2PixModule(self.unet, self.vae, self.text_encoder, self.noise_scheduler,
                                            self._tokenize([""]), cfg.conditioning_dropout,
                                            train_text_encoder=cfg.train_text_encoder and not self.is_lora,
                                            pixel_shift=cfg.pixel_shift_factor, pixel_scale=cfg.pixel_scaling_factor)
        self.module.to(self.device, self.dtype).eval()
        self.vae_scale_factor = (2 ** (len(self.vae.config.block_out_channels) - 1) if self.vae is not None
                                 else self.module.patch_size)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)
        self.resolution: int = cfg.resolution or self.native_resolution
        """The side images are resized to and sampled at: `cfg.resolution`, or the checkpoint's native side."""

    @property
    def native_resolution(self) -> int:
        """The side the checkpoint was built for: the UNet's `sample_size` × the VAE's factor (× the patch in
        pixel space), as `StableDiffusionInstructPix2PixPipeline` sizes its default output."""
        sample_size = self.unet.config.sample_size
        side = sample_size if isinstance(sample_size, int) else sample_size[0]
        return int(side) * self.vae_scale_factor

    @property
    def is_lora(self) -> bool:
        return bool(getattr(self.unet, "peft_config", None))

    # -- inputs ------------------------------------------------------------------------------------------
    def _tokenize(self, actions: Sequence[str]) -> torch.Tensor:
        return self.tokenizer(list(actions), max_length=self.tokenizer.model_max_length, padding="max_length",
                              truncation=True, return_tensors="pt").input_ids

    def _pixels(self, images: Sequence[Any]) -> torch.Tensor:
        """Images → (B, 3, r, r) in [-1, 1] at `self.resolution` (diffusers' VaeImageProcessor)."""
        r = self.resolution
        return self.image_processor.preprocess([decode_image(im) for im in images], height=r, width=r)

    @property
    def latent_size(self) -> int:
        return self.resolution // self.vae_scale_factor

    # -- the protocol ------------------------------------------------------------------------------------
    def loss(self, batch: dict[str, torch.Tensor], weights: torch.Tensor | None = None) -> torch.Tensor:
        """Recognition-weighted diffusion loss of a collated batch (see `weighted_mse`)."""
        inputs = {k: v for k, v in batch.items() if k != "weights"}
        return self.module(**inputs, weights=weights)

    @torch.no_grad()
    def encode_features(self, images: Sequence[Any] | torch.Tensor) -> torch.Tensor:
        """The VAE encoder's latent mean (pre-sampling), or the unshuffled, shifted and scaled pixels in pixel space.

        A tensor is taken as pixel values in [-1, 1] already at `self.resolution`.
        """
        pixels = images if isinstance(images, torch.Tensor) else self._pixels(images)
        return self.module.encode_original(pixels.to(self.device, self.dtype)).float()

    def collate(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        """A Ray Data numpy batch (source, target PNG bytes; action; optional weights) → forward's kwargs.

        Rows with a stored map (annotation's) use it; the others (gold rows) get recognition weights from this
        model's own encoder; with recognition disabled every map is all ones, so the ablation runs through the same
        code path.
        """
        original = self._pixels(list(batch["source"]))
        edited = self._pixels(list(batch["target"]))
        grid = (self.latent_size, self.latent_size)
        if not self.recognition.enabled:  # the unweighted ablation ignores any precomputed maps
            weights = torch.ones(len(original), *grid)
        else:
            weights = batch_weights(stored_weights(batch), grid, lambda rows: recognition_weights(
                self.encode_features(original[rows]), self.encode_features(edited[rows]), self.recognition.floor))
        return {"original_pixel_values": original, "edited_pixel_values": edited,
                "input_ids": self._tokenize([str(a) for a in batch["action"]]), "weights": weights}

    def training_module(self) -> nn.Module:
        """The module to optimise: LoRA parameters only when the unet has an adapter, else the whole unet,
        plus the text encoder when `train_text_encoder` (the from-scratch toy: its encoder is random)."""
        from diffusers.training_utils import cast_training_params

        self.unet.requires_grad_(not self.is_lora)
        if self.is_lora:
            for name, param in self.unet.named_parameters():
                if "lora_" in name:
                    param.requires_grad_(True)
        cast_training_params(self.unet, dtype=torch.float32)  # fp32 master weights under fp16/bf16
        if self.module.train_text_encoder:
            self.text_encoder.requires_grad_(True)
            cast_training_params(self.text_encoder, dtype=torch.float32)
        return self.module.train()

    @torch.no_grad()
    def sample(self, sources: Sequence[Any], actions: Sequence[str], n: int | Sequence[int] = 1,
               seed: int | Sequence[int] = 0) -> list[list[Image.Image]]:
        """n candidates per (source, action): one batched DDIM loop over all of them.

        Guidance is StableDiffusionInstructPix2PixPipeline's: a 3-way batch (text+image, image only,
        neither) combined as uncond + s_T·(text − image) + s_I·(image − uncond). Candidate j of input i
        starts from noise seeded by (seed, i, j) alone, so it does not depend on n or on the other inputs.
        `n` and `seed` may also be given per input (Serve batches requests that differ in both): input i
        then draws its candidates from (seed[i], 0, j), exactly as if it had been sampled alone.
        """
        if len(sources) != len(actions):
            raise ValueError(f"{len(sources)} sources but {len(actions)} actions")
        counts = [n] * len(sources) if isinstance(n, int) else [int(k) for k in n]
        seeds = [(seed, i) for i in range(len(sources))] if isinstance(seed, int) else [(int(s), 0) for s in seed]
        if len(counts) != len(sources) or len(seeds) != len(sources) or min(counts, default=1) < 1:
            raise ValueError(f"need one n >= 1 and one seed per source; got n={n!r}, seed={seed!r}")
        if not sources:
            return []
        m, cfg, was_training = self.module, self.cfg, self.module.training
        m.eval()
        repeats = torch.tensor(counts, device=self.device)  # an index on the latents' device, as CUDA requires
        image_latents = self.encode_features(self._pixels(sources)).to(self.dtype).repeat_interleave(repeats, 0)
        prompt_embeds = m.encode_prompt(self._tokenize(actions)).repeat_interleave(repeats, 0)
        total = image_latents.shape[0]

        scheduler = DDIMScheduler.from_config(self.noise_scheduler.config)
        scheduler.set_timesteps(cfg.num_inference_steps, device=self.device)
        shape = (self.unet.config.out_channels, *image_latents.shape[-2:])
        noise = [torch.randn(shape, generator=torch.Generator().manual_seed(candidate_seed(s, i, j)))
                 for (s, i), k in zip(seeds, counts, strict=True) for j in range(k)]
        latents = torch.stack(noise).to(self.device, self.dtype) * scheduler.init_noise_sigma

        guided = cfg.guidance_scale > 1.0 and cfg.image_guidance_scale >= 1.0
        if guided:
            null = m.encode_prompt(m.null_input_ids).expand(total, -1, -1)
            prompt_embeds = torch.cat([prompt_embeds, null, null])
            image_latents = torch.cat([image_latents, image_latents, torch.zeros_like(image_latents)])
        for t in scheduler.timesteps:
            latent_model_input = torch.cat([latents] * 3) if guided else latents
            scaled_latent_model_input = scheduler.scale_model_input(latent_model_input, t)
            scaled_latent_model_input = torch.cat([scaled_latent_model_input, image_latents], dim=1)
            noise_pred = self.unet(scaled_latent_model_input, t, encoder_hidden_states=prompt_embeds,
                                   return_dict=False)[0]
            if guided:
                noise_pred_text, noise_pred_image, noise_pred_uncond = noise_pred.chunk(3)
                noise_pred = (noise_pred_uncond + cfg.guidance_scale * (noise_pred_text - noise_pred_image)
                              + cfg.image_guidance_scale * (noise_pred_image - noise_pred_uncond))
            latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0]

        images = self.image_processor.postprocess(m.decode(latents).float().cpu(), output_type="pil")
        m.train(was_training)  # sampling mid-training (validation) leaves the training module as it was
        ends = np.cumsum(counts).tolist()
        return [images[end - k:end] for k, end in zip(counts, ends, strict=True)]

    def save(self, directory: str) -> None:
        """Write a directory `load_world_model` reads (local or s3://).

        Full fine-tuning: a diffusers-pipeline layout, one `save_pretrained` per subfolder (unet/, vae/ when
        there is one, text_encoder/, tokenizer/, scheduler/; safetensors), plus model_index.json when there
        is a VAE, so `StableDiffusionInstructPix2PixPipeline.from_pretrained(directory)` works too.
        LoRA: the adapter only, as diffusers' `pytorch_lora_weights.safetensors` (keys prefixed `unet.`,
        LoRA config in the metadata); load it with `WorldModelConfig(model=<base>, adapter=directory)`.
        """
        if storage.is_s3(directory):
            with tempfile.TemporaryDirectory() as tmp:
                self.save(tmp)
                storage.upload_dir(tmp, directory)
            return
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        if self.is_lora:
            from diffusers import StableDiffusionInstructPix2PixPipeline
            from peft.utils import get_peft_model_state_dict

            StableDiffusionInstructPix2PixPipeline.save_lora_weights(
                out, unet_lora_layers=get_peft_model_state_dict(self.unet), weight_name=LORA_WEIGHT_NAME,
                unet_lora_adapter_metadata=self.unet.peft_config["default"].to_dict())
            return
        save_components(out, unet=self.unet, vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer,
                        noise_scheduler=self.noise_scheduler)


def save_components(out: Path, unet: UNet2DConditionModel, vae: AutoencoderKL | None, text_encoder: CLIPTextModel,
                    tokenizer: PreTrainedTokenizerBase, noise_scheduler: DDPMScheduler) -> None:
    if vae is not None:
        from diffusers import StableDiffusionInstructPix2PixPipeline

        StableDiffusionInstructPix2PixPipeline(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=noise_scheduler,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        ).save_pretrained(out, safe_serialization=True)
        return
    unet.save_pretrained(out / "unet", safe_serialization=True)
    text_encoder.save_pretrained(out / "text_encoder", safe_serialization=True)
    tokenizer.save_pretrained(out / "tokenizer")
    noise_scheduler.save_pretrained(out / "scheduler")


def _load_components(model: str, dtype: torch.dtype) -> dict[str, Any]:
    """A pipeline-layout checkpoint by hub id, local or s3:// path; no `vae/` locally means pixel space."""
    path = storage.local_dir(model)
    has_vae = not Path(path).is_dir() or (Path(path) / "vae").is_dir()
    return {
        # safetensors only: a pickled .bin can run code when loaded
        "unet": UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=dtype, use_safetensors=True),
        "vae": AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=dtype,
                                             use_safetensors=True) if has_vae else None,
        "text_encoder": CLIPTextModel.from_pretrained(path, subfolder="text_encoder", dtype=dtype,
                                                      use_safetensors=True),
        "tokenizer": AutoTokenizer.from_pretrained(path, subfolder="tokenizer"),
        "noise_scheduler": DDPMScheduler.from_pretrained(path, subfolder="scheduler"),
    }
