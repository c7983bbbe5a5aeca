"""The models' settings: the IDM (cwm_ray/idm.py), the world model and its backends (cwm_ray/world_model/),
LoRA, recognition weights."""

from __future__ import annotations

from dataclasses import dataclass, field

from cwm_ray.config.base import ConfigError, check_choice

TOY = "toy"
"""A model name meaning: build the tiny toy config of the architecture, randomly initialised."""
DTYPE_NAMES = ("float32", "bfloat16", "float16")
"""`dtype` settings (cwm_ray.world_model.DTYPES maps them to torch dtypes; this module does not import torch)."""
WORLD_MODEL_BACKENDS = ("diffusion", "token")
"""`world_model.backend` settings (cwm_ray.world_model.BACKENDS, which loads them)."""


TRANSFORMERS_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
"""Attention projections of a transformers language model (Llama, Qwen2, Mistral, SmolLM, Janus's Llama)."""
DIFFUSERS_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
"""Attention projections of a diffusers UNet (diffusers' own LoRA training scripts adapt these)."""


@dataclass
class LoRAConfig:
    """peft LoRA settings (the paper: r=16, alpha=32)."""

    enabled: bool = False
    """Train a LoRA adapter instead of all weights."""
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=list)
    """Module names to adapt; empty = the model family's usual targets (`cwm_ray.lora`): the attention
    projections q_proj/k_proj/v_proj/o_proj of a transformers language model (every IDM, Janus's Llama), and
    to_q/to_k/to_v/to_out.0 of a diffusers UNet (InstructPix2Pix). A name the model lacks is an error."""
    modules_to_save: list[str] = field(default_factory=list)
    """IDM only: modules trained whole beside the adapter and saved with it (peft's `modules_to_save`), named by
    their path in the model or its tail ("model.aligner", "lm_head"). For a base whose understanding path was
    never trained, as the toy Janus that is pretrained only as a world model: LoRA can adapt what a module
    computes, not teach a random one to see."""


IDM_LORA_EXPORTS = ("merged", "adapter")
"""`idm.lora_export` settings: how a LoRA-trained IDM is saved."""


@dataclass
class IDMConfig:
    """The inverse dynamics model: two frames → the action text."""

    model: str = "outputs/models/toy_idm"
    """Hugging Face id, local or s3:// path of an image-text-to-text model; `toy` builds a fresh tiny one."""
    adapter: str | None = None
    """Optional LoRA adapter directory (local or s3://) applied on top of `model`."""
    prompt: str = "{image}{image}what action turns the first image into the second ?"
    """Instruction template; each {image} becomes the processor's image placeholder, in frame order."""
    image_size: int | None = None
    """Frames are resized to this square side before the processor; None = the processor sizes them itself
    (LLaVA's 336 px crop, Qwen2-VL's dynamic resolution, Idefics3's tiles), as the model was trained. The toy
    configs set 64, the toy vision tower's input size."""
    max_new_tokens: int = 16
    do_sample: bool = False
    """Greedy by default; sampling uses `temperature` and the seed given to `label`."""
    temperature: float = 1.0
    dtype: str = "float32"
    """float32, bfloat16 or float16."""
    device: str = "auto"
    """auto = cuda when available, else cpu."""
    attn_implementation: str | None = "sdpa"
    """transformers' attention kernel (`from_pretrained(attn_implementation=...)`): `sdpa` (PyTorch's fused
    scaled-dot-product attention, which every IDM family supports), `eager`, `flash_attention_2` (needs the
    flash-attn package and a GPU), or null for transformers' own choice."""
    cache_implementation: str | None = None
    """`label`'s KV cache in `generate`: null = dynamic (grows each step); `static` = allocated once for the
    prompt and `max_new_tokens`, so on a GPU transformers compiles the decoding step (torch.compile) and every
    step reuses one shape: the fast path for small decoding batches, after one compile per prompt length. On a
    CPU nothing is compiled and it only adds the allocation. Labels and scores are the same either way (tested)."""
    trust_remote_code: bool = False
    """Off unless a model needs it: remote code runs with your credentials."""
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    lora_export: str = "merged"
    """How a LoRA-trained IDM is saved (train_idm's export, each checkpoint's `model/`): `merged` = full weights
    with the adapter folded in, loaded as `idm.model=<export>`; `adapter` = peft's adapter alone (adapter_config.json
    + adapter_model.safetensors: megabytes, not a copy of the base), loaded as `idm.model=<base>` +
    `idm.adapter=<export>`. The paper's single-model setting uses `adapter`: one base checkpoint, an IDM adapter and
    a world-model adapter (configs/real/janus_pro_7b_self.yaml)."""

    def __post_init__(self) -> None:
        check_choice("idm.dtype", self.dtype, DTYPE_NAMES)
        check_choice("idm.lora_export", self.lora_export, IDM_LORA_EXPORTS)
        check_choice("idm.attn_implementation", self.attn_implementation,
                     (None, "sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention"))
        check_choice("idm.cache_implementation", self.cache_implementation, (None, "dynamic", "static"))


@dataclass
class RecognitionConfig:
    """Recognition weights: squared L2 distance of encoder features of source and target per position."""

    enabled: bool = True
    """False = all-ones weights (the unweighted ablation), through the same code path."""
    floor: float = 0.1
    """After normalising to mean 1, weights are at least this, so unchanged regions still count. A map annotation
    stored was made with annotation's floor (a profile shares one `_recognition` anchor between the two)."""
    uniform_by: float | None = None
    """Fraction of `optim.max_steps` over which the weights fade linearly to uniform (w → 1 + s·(w − 1), s from 1
    to 0), then stay uniform; None keeps them throughout, as the paper does. Why: a loss weight that depends on
    the target tilts the trained distribution towards the heavy targets (the optimum of Σ p(y)·w(y)·−log q(y) is
    q ∝ p·w), and on the toy, trained from scratch, that makes every unchanged token a likely change
    (docs/experiments.md, "Recognition weighting on the token toy"); uniform at the end restores the optimum."""

    def __post_init__(self) -> None:
        if self.uniform_by is not None and not 0.0 < self.uniform_by <= 1.0:
            raise ConfigError(f"bad value for config key 'uniform_by': {self.uniform_by}; use a fraction of "
                              f"training in (0, 1], or null to keep the weights throughout")


@dataclass
class TokenSamplingConfig:
    """How the `token` backend samples image tokens (the paper: temperature 1, non-image tokens masked)."""

    temperature: float = 1.0
    """Softmax temperature of each image token; 0 = greedy (argmax), which makes all n candidates equal."""
    top_k: int = 0
    """Sample among the k likeliest codes only; 0 = the whole codebook."""
    guidance_scale: float = 1.0
    """Classifier-free guidance over the action text (Janus uses 5); 1 = none, > 1 also runs the batch with
    the action dropped, which training teaches through `conditioning_dropout`."""


@dataclass
class WorldModelConfig:
    """The world model: source image + action → next image."""

    backend: str = "diffusion"
    """`diffusion` (InstructPix2Pix architecture) or `token` (an early-fusion VQ-token model: Janus, see
    cwm_ray.world_model.token)."""
    model: str = "outputs/models/toy_world_model"
    """Hugging Face id, local or s3:// path of an InstructPix2Pix-style checkpoint; `toy` builds a tiny one."""
    adapter: str | None = None
    resolution: int | None = None
    """Images are resized to this side for training and sampling; None = the checkpoint's native side
    (InstructPix2Pix: the UNet's sample_size × the VAE's factor, 512 for SD-1.5-based checkpoints such as
    timbrooks/instruct-pix2pix, though AURORA trains and samples it at 256, as configs/real/ sets; Janus-Pro: its
    VQ's 384). The toy configs set 64. The token backend always works at its VQ's side."""
    num_inference_steps: int = 10
    guidance_scale: float = 3.0
    """Classifier-free guidance over the action text."""
    image_guidance_scale: float = 1.5
    """Classifier-free guidance over the source image."""
    conditioning_dropout: float = 0.05
    """Training-time dropout of text / image / both conditionings (InstructPix2Pix's three bands)."""
    pixel_shift_factor: float = -0.76
    pixel_scaling_factor: float = 7.0
    """Pixel-space models only (no VAE): latents are (unshuffled pixels − shift) · scale, the pixel analogue
    of AutoencoderKL's shift_factor / scaling_factor, so the diffusion space has about unit variance. Toy
    frames are a flat background at −0.76 with std 0.145 in [−1, 1]; unscaled, unit noise drowns them for
    all but the smallest timesteps and the 10-step sampler never sees the content form (measured)."""
    train_text_encoder: bool = False
    """Train the CLIP text encoder with the unet (diffusers' DreamBooth / text-to-image `--train_text_encoder`).
    Off for real checkpoints, whose encoder is pretrained; on for the from-scratch toy (its encoder is random;
    configs/train_world_model.yaml). Ignored with LoRA (only the unet adapter trains). `save` always writes it."""
    dtype: str = "float32"
    device: str = "auto"
    trust_remote_code: bool = False
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    token: TokenSamplingConfig = field(default_factory=TokenSamplingConfig)
    """Sampling of the `token` backend (the diffusion settings above do not apply to it)."""

    def __post_init__(self) -> None:
        check_choice("world_model.backend", self.backend, WORLD_MODEL_BACKENDS)
        check_choice("world_model.dtype", self.dtype, DTYPE_NAMES)
        if self.lora.modules_to_save:
            raise ConfigError(f"world_model.lora.modules_to_save={self.lora.modules_to_save}: only the IDM trains "
                              "whole modules beside its adapter; a world model's LoRA adapts its attention "
                              "projections (world_model.lora.target_modules), or set world_model.lora.enabled=false "
                              "to train every weight")
