"""The token world model: an early-fusion VLM that writes the next image as VQ tokens (the paper's model kind).

Why Janus and not Chameleon / Anole: in transformers, `ChameleonForConditionalGeneration` masks the
image-token logits and `ChameleonVQVAE` has no decoder, so it cannot write an image without a ported VQGAN
decoder and its weights. `JanusForConditionalGeneration` ships all the parts: a VQ-VAE with encoder,
quantizer and decoder (`model.vqmodel`), an image-token input path (`generation_embeddings` →
`generation_aligner`, i.e. `prepare_embeddings_for_image_generation`) and an image-token output head
(`generation_head`). Its `generate(generation_mode="image")` is text-to-image only, so the image-conditioned
training step and sampler are built here from those parts:

    [bos] <boi> source image tokens <eoi> action text <boi> target image tokens

Source and target tokens are embedded by the same generation path, the Llama runs once, and the loss is
the generation head's cross-entropy on the target image tokens only, each multiplied by its recognition
weight (§Strategy 1). The weights come from the model's own VQ encoder before quantization
(`quant_conv(encoder(x))`, as the paper does for Chameleon), one per token. Sampling (§Strategy 2) is an
autoregressive loop over the image-token positions with a KV cache, batched over inputs × candidates
(× 2 with classifier-free guidance, the action text replaced by padding as Janus does), one seeded
`torch.Generator` per candidate, decoded by the VQ decoder.

Tokenization normalises both the pre-quantization features and the codebook (cosine nearest code), as the
original Janus / LlamaGen quantizer (`codebook_l2_norm`) does and as `get_codebook_entry` (the decoder's
input) does; transformers' `JanusVQVAEVectorQuantizer.forward` skips that normalisation.

The toy model (`build_toy_token_world_model`, `model: toy`) is the same classes with tiny configs: a
4-layer Llama and a VQ-VAE with one token per 8-pixel toy cell (64 tokens at 64 px). A VQ-VAE learns its
codebook in a training of its own, so the toy's VQ is *constructed*, not trained, and frozen:
- encoder: the conv stack is set to a linear patch codec (2×2 average pooling, then space-to-depth), so a
  token's pre-quantization feature is its cell's 4×4 grid of pooled colours minus the background, plus one
  constant channel (`_TOY_PAD`). Residual branches and attention outputs are zero (identities), and the
  GroupNorm before `conv_out` is made a fixed scale by filler channels that dominate each group's variance.
- codebook: the features of the toy palette (background, and each shape × colour), so a still toy frame
  tokenizes exactly, and the squared feature distance of two tokens is their pooled-pixel distance.
- decoder: draws each code as its palette cell, pixel-exact (`_construct_toy_decoder`): a ReLU unit per
  code reads its shape and colour off the entry, the zero padding at the image's edges gives each pixel
  its offset inside its token (a VQGAN decoder is otherwise translation-invariant), and the last res
  block turns offset + shape into the cell's mask. So tokenize → decode reproduces a still toy frame, and
  sampled toy images can be judged like the diffusion backend's.

Images are resized to the VQ's native side (toy: `resolution`; Janus-Pro: 384) and samples come out at
it; `WorldModelConfig.resolution` only sizes a fresh toy.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import math
import tempfile
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from transformers import AutoTokenizer, JanusForConditionalGeneration, PreTrainedTokenizerBase

from cwm_ray import storage
from cwm_ray.config import TOY, TRANSFORMERS_LORA_TARGETS, RecognitionConfig, WorldModelConfig
from cwm_ray.lora import lora_targets, target_regex
from cwm_ray.recognition import batch_weights, recognition_weights, stored_weights
from cwm_ray.schema import decode_image
from cwm_ray.world_model import DTYPES, candidate_seed, resolve_device

BOI, EOI, IMAGE = "<begin_of_image>", "<end_of_image>", "<image_placeholder>"
"""Janus's image delimiters and placeholder, by name (the toy tokenizer adds the same three)."""
_CODE_CACHE_SIZE = 100_000
"""Images whose VQ codes `TokenWorldModel.codes` keeps: ~0.5 GB at Janus-Pro's 576 codes per image."""
ADAPTER_WEIGHTS = "adapter_model.safetensors"
"""peft's file name: with adapter_config.json, a LoRA directory in peft's own layout."""


def weighted_nll(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Mean over tokens of weight × NLL: (B, N, V) logits, (B, N) codes, (B, N) weights or None = ones.

    Recognition maps have mean 1 per image, so the mean keeps the loss on the cross-entropy's scale, and
    all-ones weights give exactly `F.cross_entropy(..., reduction="mean")`: one code path for both.
    """
    nll = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none").view(targets.shape)
    return nll.mean() if weights is None else (weights.to(nll) * nll).mean()


class JanusWorldModule(nn.Module):
    """Janus with the frozen VQ-VAE: what a DDP / DeepSpeed engine wraps; `forward(**collated)` is the loss."""

    def __init__(self, model: JanusForConditionalGeneration, special_ids: dict[str, int],
                 conditioning_dropout: float = 0.0) -> None:
        super().__init__()
        self.model = model
        self.ids = special_ids  # bos, boi, eoi, pad
        self.conditioning_dropout = conditioning_dropout
        self.vq.requires_grad_(False).eval()

    @property
    def vq(self) -> nn.Module:
        return self.model.model.vqmodel

    @property
    def grid(self) -> int:
        return self.vq.quantize.quant_state_dims[0]

    def train(self, mode: bool = True) -> JanusWorldModule:
        super().train(mode)
        self.vq.eval()  # frozen, as Janus's own VQ model is
        return self

    # -- the VQ side -------------------------------------------------------------------------------------
    def pre_quant(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) features just before quantization: `quant_conv(encoder(x))`."""
        return self.vq.quant_conv(self.vq.encoder(pixel_values.to(self.vq.quant_conv.weight)))

    def tokenize(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, h·w) image codes of pixel values (see `quantize`)."""
        return self.quantize(self.pre_quant(pixel_values))

    def quantize(self, features: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) pre-quantization features → (B, h·w) codes: the entry of highest cosine (module doc)."""
        z = features.flatten(2).transpose(1, 2).double()
        book = self.vq.quantize.embedding.weight.double()
        return (F.normalize(z, dim=-1) @ F.normalize(book, dim=-1).T).argmax(-1)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, h·w) codes → (B, 3, H, W) pixels in [-1, 1] through the VQ decoder."""
        return self.vq.decode(codes).float().clamp(-1, 1)

    # -- the language model side -------------------------------------------------------------------------
    @property
    def text_positions(self) -> int:
        """Position ids the action text spans (`text_positions` in the model's config; 0 = its length).

        With a fixed span every target token sits the same distance after its source token whatever the
        action's length, so copying the unchanged cells is one relative offset under RoPE.
        """
        return int(getattr(self.model.config, "text_positions", 0) or 0)

    @property
    def copy_logit(self) -> float:
        """Logit added to each target token's own source code (`source_copy_logit` in the config; 0 = none).

        A copy prior, as a pointer-generator's copy path: every cell the action leaves alone starts out right, so
        learning goes to the cells the action changes. Without it a from-scratch model first has to discover the
        attention that copies each source token across the prompt, which took the toy ~1000 steps on its own.
        """
        return float(getattr(self.model.config, "source_copy_logit", 0.0) or 0.0)

    @property
    def source_fusion(self) -> float:
        """Scale of each target position's own source token embedding added to its input (`source_fusion` in
        the config; 0 = none).

        ControlAR's conditional decoding (Li et al., 2024), with the source image as the control: the position
        that predicts cell p also reads the source's code at p, so whether the action touches that cell is
        one lookup away instead of an attention across the prompt that has to be learnt first. The copy prior
        gives copying without that attention, and with it no reason to learn it: the changed cells then had
        nothing to go on (toy, 1785 steps, teacher-forced: `recolor` 0 % without fusion, 95 % with it; whole
        images right 7 % and 86 %; docs/experiments.md).
        """
        return float(getattr(self.model.config, "source_fusion", 0.0) or 0.0)

    def fuse(self, embeds: torch.Tensor, source_codes: torch.Tensor) -> torch.Tensor:
        """(B, L, H) input embeddings whose last k positions predict cells i..i+k, with `source_fusion` × the
        embeddings of the source codes (B, k) at those cells added there; unchanged when `source_fusion` is 0."""
        if not self.source_fusion:
            return embeds
        k = source_codes.shape[1]
        source = self.model.prepare_embeddings_for_image_generation(source_codes.to(embeds.device))
        return torch.cat([embeds[:, :-k], embeds[:, -k:] + self.source_fusion * source.to(embeds.dtype)], dim=1)

    def copy_prior(self, logits: torch.Tensor, source_codes: torch.Tensor) -> torch.Tensor:
        """`logits` (..., V) plus `copy_logit` on the aligned source codes (...), or `logits` as they are."""
        if not self.copy_logit:
            return logits
        return logits + self.copy_logit * F.one_hot(source_codes.to(logits.device), logits.shape[-1]).to(logits)

    def layout(self, source_codes: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               target_codes: torch.Tensor | None = None, drop_text: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Left-padded `[bos] <boi> src <eoi> text <boi> tgt[:-1]` → (ids, is_image, attention mask, positions).

        Dropped text (conditioning dropout, the unconditional half of guidance) becomes pad tokens that
        stay attended, as Janus's own image generation builds its unconditional prompt. Positions count
        up from 0 at each row's first real token, skipping to `text_positions` after the text if set.
        """
        rows = []
        span = self.text_positions
        for b in range(source_codes.shape[0]):
            text = input_ids[b][attention_mask[b].bool()]
            if span and len(text) > span:
                raise ValueError(f"the action has {len(text)} tokens; this model places at most {span} "
                                 f"(text_positions in its config)")
            if drop_text is not None and bool(drop_text[b]):
                text = torch.full_like(text, self.ids["pad"])
            special = {k: torch.tensor([v], dtype=torch.long, device=text.device) for k, v in self.ids.items()}
            parts = [(special["bos"], False), (special["boi"], False), (source_codes[b], True),
                     (special["eoi"], False), (text, False), (special["boi"], False)]
            if target_codes is not None:
                parts.append((target_codes[b, :-1], True))
            flags = [torch.full((len(p),), img, dtype=torch.bool, device=p.device) for p, img in parts]
            row = torch.cat([p for p, _ in parts])
            pos = torch.arange(len(row), device=row.device)
            after_text = 3 + len(source_codes[b]) + len(text)
            if span:
                pos[after_text:] += span - len(text)
            rows.append((row, torch.cat(flags), pos))
        length = max(len(ids) for ids, _, _ in rows)
        device = source_codes.device
        ids = torch.full((len(rows), length), self.ids["pad"], dtype=torch.long, device=device)
        is_image = torch.zeros(len(rows), length, dtype=torch.bool, device=device)
        mask = torch.zeros(len(rows), length, dtype=torch.long, device=device)
        positions = torch.zeros(len(rows), length, dtype=torch.long, device=device)
        for b, (row, img, pos) in enumerate(rows):
            n = len(row)
            ids[b, length - n:], is_image[b, length - n:], mask[b, length - n:] = row, img, 1
            positions[b, length - n:] = pos
        return ids, is_image, mask, positions

    def embed(self, ids: torch.Tensor, is_image: torch.Tensor) -> torch.Tensor:
        """Text tokens through the LM's embeddings, image codes through Janus's generation embeddings."""
        text = self.model.get_input_embeddings()(torch.where(is_image, 0, ids))
        image = self.model.prepare_embeddings_for_image_generation(torch.where(is_image, ids, 0))
        return torch.where(is_image[..., None], image.to(text.dtype), text)

    def run(self, embeds: torch.Tensor, mask: torch.Tensor, position_ids: torch.Tensor,
            cache: Any = None) -> tuple[torch.Tensor, Any]:
        """(last hidden states, the KV cache) of the language model over `embeds`, extending `cache`."""
        language_model = self.model.model.language_model
        name = cache_keyword(type(language_model))
        out = language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids,
                             use_cache=cache is not None or not self.training, **{name: cache})
        return out.last_hidden_state, getattr(out, name)

    def image_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.model.generation_head(hidden)

    def forward(self, source_codes: torch.Tensor, target_codes: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        drop = (torch.rand(source_codes.shape[0]) < self.conditioning_dropout) if self.training else None
        logits = self.target_logits(source_codes, target_codes, input_ids, attention_mask, drop)
        return weighted_nll(logits, target_codes, None if weights is None else weights.flatten(1))

    def target_logits(self, source_codes: torch.Tensor, target_codes: torch.Tensor, input_ids: torch.Tensor,
                      attention_mask: torch.Tensor, drop_text: torch.Tensor | None = None) -> torch.Tensor:
        """(B, n, V) teacher-forced logits of the n target codes: what the sampler sees at each step."""
        ids, is_image, mask, positions = self.layout(source_codes, input_ids, attention_mask, target_codes,
                                                     drop_text)
        n = target_codes.shape[1]  # left padding: the last n positions predict the n target codes
        embeds = self.fuse(self.embed(ids, is_image), source_codes)
        hidden = self.model.model.language_model(inputs_embeds=embeds, attention_mask=mask,
                                                 position_ids=positions, use_cache=False).last_hidden_state
        return self.copy_prior(self.image_logits(hidden[:, -n:]), source_codes)


@functools.cache
def cache_keyword(model_class: type) -> str:
    """The name a transformers decoder's `forward` takes the KV cache by, which is also its output's field.

    transformers renamed `past_key_values` to `cache` inside the range this project admits (5.17, the GPU
    image's, has the old name; 5.25 the new one, the old still accepted with a deprecation warning), so it is
    read once per class from the signature rather than guessed per call.
    """
    parameters = inspect.signature(model_class.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def _digest(image: bytes) -> bytes:
    """An encoded image's cache key: its content hash."""
    return hashlib.sha1(image).digest()


def _keep(cache: OrderedDict[bytes, torch.Tensor], items: Any) -> None:
    """Put (key, tensor) pairs into a per-content cache (keys None: not cacheable), the oldest out past
    `_CODE_CACHE_SIZE`."""
    for key, value in items:
        if key is not None:
            cache[key] = value
    while len(cache) > _CODE_CACHE_SIZE:
        cache.popitem(last=False)


class TokenWorldModel:
    """The `token` backend of the WorldModel protocol (see cwm_ray.world_model)."""

    def __init__(self, cfg: WorldModelConfig, recognition: RecognitionConfig | None = None,
                 components: dict[str, Any] | None = None) -> None:
        self.cfg = cfg
        self.recognition = recognition or RecognitionConfig()
        self.device = resolve_device(cfg.device)
        self.dtype = DTYPES[cfg.dtype]
        if components is None and cfg.model == TOY:
            components = toy_components(cfg.resolution or 64)
        elif components is None:
            path = storage.local_dir(cfg.model)
            components = {"model": JanusForConditionalGeneration.from_pretrained(path, dtype=self.dtype,
                                                                                 use_safetensors=True),
                          "tokenizer": AutoTokenizer.from_pretrained(path)}
        self.model: JanusForConditionalGeneration = components["model"]
        self.tokenizer: PreTrainedTokenizerBase = components["tokenizer"]
        self.is_lora = bool(cfg.adapter or cfg.lora.enabled)
        if cfg.adapter:
            _load_adapter(self.language_model, storage.local_dir(cfg.adapter))
        elif cfg.lora.enabled:
            from peft import LoraConfig, inject_adapter_in_model

            targets = lora_targets(self.language_model, cfg.lora.target_modules, TRANSFORMERS_LORA_TARGETS,
                                   "Janus's language model (the Llama of JanusForConditionalGeneration)",
                                   "world_model.lora.target_modules")
            inject_adapter_in_model(LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                                               target_modules=target_regex("", targets)), self.language_model)
        tok = self.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        ids = {"bos": tok.bos_token_id, "boi": tok.convert_tokens_to_ids(BOI), "eoi": tok.convert_tokens_to_ids(EOI),
               "pad": pad}
        if any(v is None or v == tok.unk_token_id for v in ids.values()):
            raise ValueError(f"{cfg.model}: the tokenizer lacks one of bos, pad, {BOI}, {EOI}: {ids}")
        # `dtype` holds for given components too (the toy), as the diffusion backend casts its module
        self.module = JanusWorldModule(self.model, ids, cfg.conditioning_dropout).to(self.device, self.dtype)
        self.module.eval()
        vq = self.model.config.vq_config
        self.resolution = self.module.grid * 2 ** (len(vq.channel_multiplier) - 1)
        """The VQ's native image side: inputs are resized to it and samples come out at it."""
        self._code_cache: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self._weight_cache: OrderedDict[bytes, torch.Tensor] = OrderedDict()

    @property
    def language_model(self) -> nn.Module:
        """The Llama inside Janus: where LoRA goes (the SigLIP tower also has q_proj, ... and stays out)."""
        return self.model.model.language_model

    # -- helpers -----------------------------------------------------------------------------------------
    def _pixels(self, images: Sequence[Any]) -> torch.Tensor:
        """Images → (B, 3, r, r) in [-1, 1] at the VQ's native resolution (Janus: mean = std = 0.5)."""
        r = self.resolution
        arrays = []
        for im in images:
            pil = decode_image(im)
            if pil.size != (r, r):
                pil = pil.resize((r, r), Image.Resampling.BICUBIC)
            arrays.append(np.asarray(pil, dtype=np.float32))
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1.0

    def _tokenize_text(self, actions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids of the actions, cut to `text_positions` tokens when the model sets it (as CLIP cuts at 77),
        so one long request cannot fail a batch it shares."""
        span = self.module.text_positions
        enc = self.tokenizer([str(a) for a in actions], padding=True, add_special_tokens=False, return_tensors="pt",
                             truncation=bool(span), max_length=span or None)
        return enc.input_ids, enc.attention_mask

    # -- the protocol ------------------------------------------------------------------------------------
    def loss(self, batch: dict[str, torch.Tensor], weights: torch.Tensor | None = None) -> torch.Tensor:
        """Recognition-weighted image-token NLL of a collated batch (see `weighted_nll`)."""
        return self.module(**{k: v for k, v in batch.items() if k != "weights"}, weights=weights)

    @torch.no_grad()
    def encode_features(self, images: Sequence[Any] | torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) VQ-encoder features before quantization, one position per image token.

        A tensor is taken as pixel values in [-1, 1] already at the native resolution.
        """
        pixels = images if isinstance(images, torch.Tensor) else self._pixels(images)
        return self.module.pre_quant(pixels.to(self.device)).float()

    @torch.no_grad()
    def codes(self, images: Sequence[Any], features: torch.Tensor | None = None) -> torch.Tensor:
        """(B, h·w) VQ codes of images (PNG bytes, arrays or PIL images), on the CPU.

        The VQ is frozen, so the codes of encoded images are kept (by content hash, up to
        `_CODE_CACHE_SIZE`): a training run pays the VQ encoder, about half of a toy step on CPU, once per
        distinct image instead of once per epoch. `features` (`encode_features` of the same images, when
        the caller has them) are quantized instead of encoding the images again.
        """
        keys = [_digest(im) if isinstance(im, bytes) else None for im in images]
        missing = [i for i, k in enumerate(keys) if k is None or k not in self._code_cache]
        fresh: dict[int, torch.Tensor] = {}
        if missing:
            if features is None:
                features = self.encode_features([images[i] for i in missing])
            else:
                features = features[missing]
            fresh = dict(zip(missing, self.module.quantize(features).cpu(), strict=True))
            _keep(self._code_cache, ((keys[i], row) for i, row in fresh.items()))
        return torch.stack([fresh[i] if i in fresh else self._code_cache[k] for i, k in enumerate(keys)])

    def collate(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        """A Ray Data numpy batch (source, target PNG bytes; action; optional weights) → forward's kwargs.

        Images become VQ codes here (`codes`). Rows with a stored map (annotation's) use it; the others (gold
        rows) get recognition weights from this model's own VQ encoder; with recognition disabled every map is all
        ones, so the ablation runs through the same code path.
        """
        sources, targets = list(batch["source"]), list(batch["target"])
        grid = (self.module.grid, self.module.grid)
        features: dict[str, torch.Tensor] = {}
        stored = stored_weights(batch)
        if not self.recognition.enabled:
            weights = torch.ones(len(sources), *grid)
        elif all(m is not None for m in stored):
            weights = batch_weights(stored, grid, lambda rows: torch.empty(0))
        else:
            # A map depends only on the frozen VQ and its two images, so it is kept per pair like the codes: a
            # training run pays the encoder for it once per pair, not once per epoch (without this, the table's
            # row (c) trained in 384 s against about 250 s for the unweighted rows).
            pairs = [_digest(s) + _digest(t) if isinstance(s, bytes) and isinstance(t, bytes) else None
                     for s, t in zip(sources, targets, strict=True)]

            def compute(rows: list[int]) -> torch.Tensor:
                keys = [pairs[i] for i in rows]
                if all(k is not None and k in self._weight_cache for k in keys):
                    return torch.stack([self._weight_cache[k] for k in keys])
                if len(rows) == len(sources):  # the whole batch: its features also give the codes below
                    features["source"], features["target"] = self.encode_features(sources), self.encode_features(
                        targets)
                    src, tgt = features["source"], features["target"]
                else:
                    src = self.encode_features([sources[i] for i in rows])
                    tgt = self.encode_features([targets[i] for i in rows])
                maps = recognition_weights(src, tgt, self.recognition.floor).cpu()
                _keep(self._weight_cache, zip(keys, maps, strict=True))
                return maps

            weights = batch_weights(stored, grid, compute)
        input_ids, attention_mask = self._tokenize_text(list(batch["action"]))
        return {"source_codes": self.codes(sources, features.get("source")),
                "target_codes": self.codes(targets, features.get("target")), "input_ids": input_ids,
                "attention_mask": attention_mask, "weights": weights}

    def training_module(self) -> nn.Module:
        """LoRA parameters only with an adapter; else the LM with the image-token embeddings and head.

        The VQ-VAE and the understanding encoder (SigLIP + aligner, unused here) stay frozen.
        """
        m = self.model.model
        self.model.requires_grad_(False)
        if self.is_lora:
            for name, param in self.model.named_parameters():
                if "lora_" in name:
                    param.requires_grad_(True)
        else:
            for part in (m.language_model, m.generation_embeddings, m.generation_aligner, m.generation_head):
                part.requires_grad_(True)
        for param in self.model.parameters():
            if param.requires_grad:
                param.data = param.data.float()  # fp32 master weights under fp16/bf16
        return self.module.train()

    @torch.no_grad()
    def sample(self, sources: Sequence[Any], actions: Sequence[str], n: int | Sequence[int] = 1,
               seed: int | Sequence[int] = 0) -> list[list[Image.Image]]:
        """n candidates per (source, action): one batched autoregressive loop over all image tokens.

        Candidate j of input i draws every token from its own generator seeded by (seed, i, j), or by
        (seed[i], 0, j) when seeds are per input (Serve), so it does not depend on the rest of the batch.
        Guidance (`token.guidance_scale` > 1) mixes the logits with those of the action-dropped prompt.

        The n candidates of an input share its prompt (source tokens and action), so the prompt runs once
        per input and its KV cache is branched, one copy per candidate (`DynamicCache.batch_select_indices`
        with repeated rows): best-of-N pays for the prompt once, and for the image tokens n times.
        """

        if len(sources) != len(actions):
            raise ValueError(f"{len(sources)} sources but {len(actions)} actions")
        counts = [n] * len(sources) if isinstance(n, int) else [int(k) for k in n]
        seeds = [(seed, i) for i in range(len(sources))] if isinstance(seed, int) else [(int(s), 0) for s in seed]
        if len(counts) != len(sources) or len(seeds) != len(sources) or min(counts, default=1) < 1:
            raise ValueError(f"need one n >= 1 and one seed per source; got n={n!r}, seed={seed!r}")
        if not sources:
            return []
        m, opts, was_training = self.module, self.cfg.token, self.module.training
        m.eval()
        source = self.codes(sources).to(self.device)
        input_ids, text_mask = (t.to(self.device) for t in self._tokenize_text(actions))
        inputs = source.shape[0]
        # The prompt row of each candidate, in the order the generators are listed (input-major).
        rows = torch.arange(inputs).repeat_interleave(torch.tensor(counts))
        guided = opts.guidance_scale != 1.0
        drop = torch.tensor([False] * inputs + [True] * inputs) if guided else None
        if guided:
            source, input_ids, text_mask = (torch.cat([t, t]) for t in (source, input_ids, text_mask))
            rows = torch.cat([rows, rows + inputs])  # (cond, uncond) halves, as the logits are chunked
        ids, is_image, mask, positions = m.layout(source, input_ids, text_mask, None, drop)
        gens = [torch.Generator().manual_seed(candidate_seed(s, i, j))
                for (s, i), k in zip(seeds, counts, strict=True) for j in range(k)]

        from transformers import DynamicCache

        embeds = m.fuse(m.embed(ids, is_image), source[:, :1])  # the final <boi> predicts cell 0
        hidden, cache = m.run(embeds, mask, positions, cache=DynamicCache(config=self.model.config.text_config))
        rows = rows.to(self.device)
        cache.batch_select_indices(rows)  # branch: every candidate continues from its own copy of the prompt
        hidden, mask, positions = hidden[rows, -1], mask[rows], positions[rows]
        codes = []
        aligned = source[rows].cpu()  # each candidate row's source codes, for the copy prior and fusion
        cells = m.grid**2
        for p in range(cells):
            logits = m.copy_prior(m.image_logits(hidden).float().cpu(), aligned[:, p])
            if guided:
                cond, uncond = logits.chunk(2)
                logits = uncond + opts.guidance_scale * (cond - uncond)
            code = self._draw(logits, gens, opts.temperature, opts.top_k)
            codes.append(code)
            if p + 1 == cells:
                break
            step = torch.cat([code, code]) if guided else code
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            positions = positions[:, -1:] + 1
            embeds = m.fuse(self.model.prepare_embeddings_for_image_generation(step[:, None].to(self.device)),
                            aligned[:, p + 1:p + 2])
            hidden, cache = m.run(embeds, mask, positions, cache=cache)
            hidden = hidden[:, -1]
        pixels = m.decode(torch.stack(codes, 1).to(self.device))
        arrays = ((pixels.permute(0, 2, 3, 1).cpu().numpy() + 1.0) * 127.5).round().clip(0, 255).astype(np.uint8)
        images = [Image.fromarray(a) for a in arrays]
        m.train(was_training)
        ends = np.cumsum(counts).tolist()
        return [images[end - k:end] for k, end in zip(counts, ends, strict=True)]

    @staticmethod
    def _draw(logits: torch.Tensor, gens: list[torch.Generator], temperature: float, top_k: int) -> torch.Tensor:
        """One code per row: greedy at temperature 0, else a seeded draw from the (top-k) softmax."""
        if temperature <= 0:
            return logits.argmax(-1)
        logits = logits / temperature
        if 0 < top_k < logits.shape[-1]:
            kth = logits.topk(top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = logits.softmax(-1)
        return torch.cat([torch.multinomial(p, 1, generator=g) for p, g in zip(probs, gens, strict=True)])

    def save(self, directory: str) -> None:
        """Write a directory `load_world_model` reads (local or s3://).

        Full fine-tuning: `save_pretrained` of the Janus model (safetensors) and its tokenizer, so
        `JanusForConditionalGeneration.from_pretrained(directory)` works too. LoRA: the peft adapter only
        (adapter_config.json + adapter_model.safetensors); load it with `model=<base> adapter=<directory>`.
        """
        if storage.is_s3(directory):
            with tempfile.TemporaryDirectory() as tmp:
                self.save(tmp)
                storage.upload_dir(tmp, directory)
            return
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        if self.is_lora:
            from peft.utils import get_peft_model_state_dict
            from safetensors.torch import save_file

            self.language_model.peft_config["default"].save_pretrained(str(out))
            state = get_peft_model_state_dict(self.language_model)
            save_file({k: v.detach().contiguous() for k, v in state.items()}, str(out / ADAPTER_WEIGHTS))
            return
        self.model.save_pretrained(out, safe_serialization=True)
        self.tokenizer.save_pretrained(out)


def _load_adapter(language_model: nn.Module, directory: str) -> None:
    """Inject a saved peft LoRA adapter into the language model (peft's own file layout)."""
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    config = LoraConfig.from_pretrained(directory)
    inject_adapter_in_model(config, language_model)
    result = set_peft_model_state_dict(language_model, load_file(str(Path(directory) / ADAPTER_WEIGHTS)))
    if result.unexpected_keys:
        raise ValueError(f"adapter {directory} does not fit the model: {result.unexpected_keys[:3]}")


# -- the toy model --------------------------------------------------------------------------------------
_TOY_CELL = 8
"""Pixels per token side: the toy world's 8-pixel cells at 64 px (three 2× downsamplings)."""
_TOY_FILL = 1e4
"""Filler channel magnitude: dominates each GroupNorm group's variance, so the norm is a fixed scale."""
_TOY_DECODER_FILL = 1024.0
"""The decoder's filler: smaller, since torch's running GroupNorm mean errs by ~F·1e-7 per step, and the
decoder needs its values to 1e-4 (at 1e4 the error reached 1e-3 at odd sizes); its content stays ≤ 8, so
the std still moves by < 3e-5."""
_TOY_PAD = 100.0
"""Constant feature channel: with it, cosine nearest code ≈ L2 nearest, and the decoder's normalised
codebook entries keep their scale to 1e-3 (an entry is [a, PAD] / |[a, PAD]| with |a|² ≲ 40)."""
_TOY_SWISH = 20.0
"""Offset that puts SiLU in its linear range (sigmoid(20 ± 2) = 1 − 1e-8; the decoder's values stay ≲ 8)."""


def _toy_vq_config(resolution: int, hidden: int) -> dict[str, Any]:
    pooled = 3 * (_TOY_CELL // 2) ** 2  # the 4×4 pooled colours of a cell
    return {"embed_dim": pooled + 1, "latent_channels": pooled, "base_channels": 128,
            "channel_multiplier": [1, 1, 1, 1], "num_res_blocks": 0, "projection_dim": hidden,
            "image_token_embed_dim": hidden, "num_hidden_layers": 2}


def _kinds() -> list[tuple[str, str]]:
    """(shape, colour) of codes 1, 2, ...: the codebook's order (code 0 is the background)."""
    from cwm_ray.toyworld.world import COLORS, SHAPES

    return [(s, c) for c in COLORS for s in SHAPES]


def _palette(resolution: int) -> list[np.ndarray]:
    """Toy frames holding every cell kind once: the background cell first, then each shape × colour."""
    from cwm_ray.config import ToyWorldConfig
    from cwm_ray.toyworld.render import render
    from cwm_ray.toyworld.world import Obj, Scene

    grid = resolution // _TOY_CELL
    world = ToyWorldConfig(image_size=resolution, grid=grid)
    kinds = _kinds()
    per = grid * grid - 1  # cell 0 stays background
    frames = []
    for start in range(0, len(kinds), per):
        objs = [Obj(s, c, (k + 1) // grid, (k + 1) % grid) for k, (s, c) in enumerate(kinds[start:start + per])]
        frames.append(render(Scene(tuple(objs)), world))
    return frames


@torch.no_grad()
def _construct_toy_vq(vq: nn.Module, resolution: int) -> None:
    """Set the toy VQ-VAE's weights to the patch codec of the module docstring (everything else zero)."""
    from cwm_ray.toyworld.world import BACKGROUND

    for p in vq.parameters():
        p.zero_()
    enc = vq.encoder
    bg = torch.tensor(BACKGROUND, dtype=torch.float32) / 127.5 - 1.0
    fill, pad, swish = _TOY_FILL, _TOY_PAD, _TOY_SWISH
    sigma = fill / math.sqrt(2.0)  # std of a group [x, y, F, −(x+y+F)] when F dominates
    c = enc.conv_in.out_channels
    groups = c // 4
    pooled = vq.config.latent_channels
    for ch in range(3):  # conv_in: the pixels into channels 0–2
        enc.conv_in.weight[ch, ch, 1, 1] = 1.0
    down = [enc.down[i].downsample.conv for i in range(3)]
    for ch in range(3):  # 2×2 average pooling (taps 0–1: the block, given the right/bottom padding)
        down[0].weight[ch, ch, :2, :2] = 0.25
    for dy in range(2):  # space-to-depth: 3 → 12 channels
        for dx in range(2):
            for ch in range(3):
                down[1].weight[3 * (2 * dy + dx) + ch, ch, dy, dx] = 1.0
    # space-to-depth 12 → 48, written straight into the GroupNorm layout [x, y, F, −(x+y+F)] per group
    for dy in range(2):
        for dx in range(2):
            for m in range(12):
                k = 12 * (2 * dy + dx) + m
                g, slot = divmod(k, 2)
                down[2].weight[4 * g + slot, m, dy, dx] = 1.0
                down[2].weight[4 * g + 3, m, dy, dx] = -1.0
    for g in range(groups):
        down[2].bias[4 * g + 2], down[2].bias[4 * g + 3] = fill, -fill
    content = [4 * (k // 2) + k % 2 for k in range(pooled)]
    enc.norm_out.weight.fill_(1.0)
    enc.norm_out.weight[content], enc.norm_out.bias[content] = sigma, swish
    for k, ch in enumerate(content):  # back out of the norm's offset and centre on the background colour
        enc.conv_out.weight[k, ch, 1, 1] = 1.0
        enc.conv_out.bias[k] = -swish - bg[k % 3]
    for k in range(pooled):
        vq.quant_conv.weight[k, k, 0, 0] = 1.0
    vq.quant_conv.bias[pooled] = pad

    # codebook: the palette's features, background first
    frames = torch.from_numpy(np.stack(_palette(resolution))).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    feats = vq.quant_conv(enc(frames)).flatten(2).transpose(1, 2)  # (frames, cells, C)
    per = feats.shape[1] - 1
    book = [feats[0, 0]] + [feats[f, 1 + i] for f in range(len(frames)) for i in range(per)]
    vq.quantize.embedding.weight.copy_(torch.stack(book[:vq.config.num_embeddings]))

    _construct_toy_decoder(vq, _kinds(), resolution // _TOY_CELL)


_TOY_TEXT_POSITIONS = 24
"""The toy's `text_positions` (its actions have ≤ 11 words): the fixed source → target offset let copying the
unchanged cells emerge by step 1000 of a 4000-step run (teacher-forced copy of unchanged objects 72 %), where
the text-length-dependent offset had 5 % (GPU sweep, same seed and data order)."""
_TOY_RELU = 200.0
"""Gain that makes SiLU a ReLU: SiLU(200·x) / 200 = max(x, 0) to 1e-9 for |x| ≥ 0.09 (the smallest colour step)."""
_TOY_MASK_GAIN = 3.0
"""Drives a colour channel below zero where the shape is off (colour steps are at most 1.66)."""


class _Slots:
    """Named content channels of a decoder feature map, laid out for GroupNorm as [x, −x, F, −F] per group.

    Each group of 4 channels (Janus: 32 groups) holds one value x with its negation and two filler channels
    ±F, so the group's mean is 0 and its std F/√2 to 3e-5 whatever x is: the norm is a fixed per-channel
    scale, and the decoder's nonlinear blocks become linear (SiLU offset) or ReLU (SiLU gain) at will.
    """

    def __init__(self, names: Sequence[str], channels: int) -> None:
        if 4 * len(names) > channels:
            raise ValueError(f"{len(names)} slots need {4 * len(names)} channels, the decoder has {channels}")
        self.index = {n: 4 * k for k, n in enumerate(names)}
        self.channels = channels

    def __getitem__(self, name: str) -> int:
        return self.index[name]

    def fill(self, conv: nn.Conv2d) -> None:
        """The ±F filler of every group, as the bias of the conv that writes this map."""
        for g in range(self.channels // 4):
            conv.bias[4 * g + 2], conv.bias[4 * g + 3] = _TOY_DECODER_FILL, -_TOY_DECODER_FILL

    def norm(self, norm: nn.GroupNorm, names: Sequence[str], gain: float = 1.0, offset: float = 0.0) -> None:
        """The GroupNorm after this map: `gain·x + offset` on the named slots, 0 (so SiLU gives 0) elsewhere."""
        norm.weight.zero_()
        norm.bias.zero_()
        self.scale(norm, names, gain, offset)

    def scale(self, norm: nn.GroupNorm, names: Sequence[str], gain: float = 1.0, offset: float = 0.0) -> None:
        """`gain·x + offset` on the named slots of a GroupNorm after this map, the others as they are."""
        for n in names:
            norm.weight[self[n]], norm.bias[self[n]] = gain * _TOY_DECODER_FILL / math.sqrt(2.0), offset


def _tap(conv: nn.Conv2d, out: int, inp: int, w: float, dy: int = 0, dx: int = 0) -> None:
    """Add `w · input[y + dy, x + dx]` to output slot `out` and its negation to `out + 1`."""
    k = conv.kernel_size[0] // 2
    conv.weight[out, inp, k + dy, k + dx] += w
    conv.weight[out + 1, inp, k + dy, k + dx] -= w


def _bias(conv: nn.Conv2d, out: int, b: float) -> None:
    conv.bias[out] += b
    conv.bias[out + 1] -= b


def _read(conv: nn.Conv2d, out: int, inp: int, one: int, w: float, dy: int = 0, dx: int = 0) -> None:
    """`_tap` of a map that passed a linear-range SiLU (x + offset inside the image, 0 in the padding).

    The offset is cancelled through the constant slot `one` (1 + offset inside, 0 in the padding), so a
    tap outside the image reads 0, as on a raw map.
    """
    _tap(conv, out, inp, w, dy, dx)
    _tap(conv, out, one, -w * _TOY_SWISH / (1.0 + _TOY_SWISH), dy, dx)


def _integer_basis(values: Sequence[float], n: int) -> tuple[float, np.ndarray]:
    """(a, b) with a + Σ_m b[m]·max(t − m, 0) = values[t] for t = 0..n−1: any function of a cell coordinate."""
    t = np.arange(n, dtype=np.float64)
    basis = np.column_stack([np.ones(n)] + [np.maximum(t - m, 0.0) for m in range(n - 1)])
    coef = np.linalg.solve(basis, np.asarray(values, dtype=np.float64))
    return float(coef[0]), coef[1:]


def _exposing_unit(points: np.ndarray, k: int, iters: int = 500) -> tuple[np.ndarray, float]:
    """(w, b) with w·points[k] + b = 1 and w·points[j] + b ≤ −1 for every other j: a ReLU that flags point k.

    w is the minimum-norm point of the convex hull of {points[k] − points[j]} (Frank–Wolfe, exact line
    search): the hard-margin direction separating point k from the rest, which exists when point k is a
    vertex of the set's hull (every toy code is: margins ≥ 0.28 against ~1e-6 of float32 noise).
    """
    diffs = points[k] - np.delete(points, k, axis=0)
    x = diffs.mean(axis=0)
    for _ in range(iters):
        d = diffs[np.argmin(diffs @ x)] - x
        if (dd := float(d @ d)) == 0.0:
            break
        x = x + min(max(-float(x @ d) / dd, 0.0), 1.0) * d
    top, rest = float(points[k] @ x), float(np.max(np.delete(points, k, axis=0) @ x))
    if top - rest < 1e-3 * float(np.linalg.norm(x)):
        raise ValueError(f"toy code {k} is not separable from the others by one ReLU")
    scale = 2.0 / (top - rest)  # 1 at point k, −1 at the nearest other
    return x * scale, 1.0 - top * scale


@torch.no_grad()
def _construct_toy_decoder(vq: nn.Module, kinds: Sequence[tuple[str, str]], grid: int) -> None:
    """Set the VQ decoder to draw each code as its palette cell: the shape in its colour, pixel-exact.

    The entries are shape ⊗ colour (pooled colours), so no linear map reads the code off them: the first
    mid block has one ReLU unit per code (`_exposing_unit`) and writes the code's shape flags and colour
    step into the map. A VQGAN decoder is nearest upsampling + convolutions, translation-invariant, so it
    cannot know where inside its token a pixel lies without knowing where the token is. The zero padding
    at the image's edges is the one thing that does: seven left/up-looking convolutions at token
    resolution count the tokens to the edge (a ramp 1..grid, hence grid ≤ 8), and each upsampling conv
    keeps it a ramp (R(X) + R(X − 1) = X + 1 after nearest upsampling), so at full resolution a pixel's
    offset in its cell is linear in the maps. The last res block turns offsets into the cell's shape mask
    with two ReLU layers (one AND of a row set, a column set and the code's shape per distinct mask row),
    and the output conv adds the code's colour under the mask to the background. All blocks are made
    linear or ReLU by the `_Slots` layout; attention outputs stay zero.
    """
    from cwm_ray.toyworld.render import shape_mask
    from cwm_ray.toyworld.world import BACKGROUND, COLORS, SHAPES

    if grid > 8:
        raise ValueError(f"the toy VQ decoder counts at most 8 tokens to the edge; got a {grid}×{grid} grid")
    dec, cell = vq.decoder, _TOY_CELL
    width = dec.conv_in.out_channels
    bg = np.asarray(BACKGROUND, np.float64) / 127.5 - 1.0
    shapes, colours = [f"shape_{s}" for s in SHAPES], ["dp0", "dp1", "dp2", "dm0", "dm1", "dm2"]

    # per-code descriptors: the shape flags and the colour's step from the background, split by sign
    carried = [*shapes, *colours]
    book = F.normalize(vq.quantize.embedding.weight.detach().double(), dim=-1).numpy()[: len(kinds) + 1]
    descriptors = np.zeros((len(book), len(carried)))  # code 0 is the background: all zero
    for k, (shape, colour) in enumerate(kinds, start=1):
        descriptors[k, SHAPES.index(shape)] = 1.0
        delta = np.asarray(COLORS[colour], np.float64) / 127.5 - 1.0 - bg
        descriptors[k, 4:7], descriptors[k, 7:10] = np.maximum(delta, 0), np.maximum(-delta, 0)
    # post_quant_conv: the entries' pooled colours (× PAD, so O(1)) on their principal axes. The entries
    # are shape ⊗ colour, so no linear map gives the descriptors: a ReLU unit per code does (below).
    pooled = book[:, :-1] * _TOY_PAD
    _, sv, axes = np.linalg.svd(pooled, full_matrices=False)
    axes = axes[sv > 1e-3 * sv[0]]
    latent = ["one", *[f"z{d}" for d in range(len(axes))]]
    vq.post_quant_conv.weight[1:len(latent), :-1, 0, 0] = torch.from_numpy(axes * _TOY_PAD).float()
    vq.post_quant_conv.bias[0] = 1.0  # "one": 1 on every token, 0 in conv_in's padding
    z = pooled @ axes.T
    units = [_exposing_unit(z, k) for k in range(1, len(book))]  # (w, b): w·z + b is 1 at code k, ≤ −1 elsewhere

    # token resolution: the constant, the left/up ramps s (accumulated) and v (the current shift)
    s8 = _Slots(["one", "sx", "vx", "sy", "vy", *latent[1:], *carried], width)
    conv = dec.conv_in
    for n in latent:
        _tap(conv, s8[n], latent.index(n), 1.0)
    for s, v, dy, dx in (("sx", "vx", 0, -1), ("sy", "vy", -1, 0)):
        _tap(conv, s8[v], 0, 1.0, dy, dx)
        _tap(conv, s8[s], 0, 1.0)
        _tap(conv, s8[s], 0, 1.0, dy, dx)
    s8.fill(conv)
    codes = [f"code{k}" for k in range(1, len(book))]
    hidden = _Slots(["one", "ax", "bx", "ay", "by", *codes], width)
    for block in (dec.mid.block_1, dec.mid.block_2, dec.up[0].block[0]):  # each adds two shifts to the ramps
        first = block is dec.mid.block_1
        s8.norm(block.norm1, ["one", "vx", "vy", *(latent[1:] if first else [])], offset=_TOY_SWISH)
        _read(block.conv1, hidden["one"], s8["one"], s8["one"], 1.0)
        for a, b, v, dy, dx in (("ax", "bx", "vx", 0, -1), ("ay", "by", "vy", -1, 0)):
            _read(block.conv1, hidden[a], s8[v], s8["one"], 1.0, dy, dx)  # a = z·v
            _read(block.conv1, hidden[b], s8[v], s8["one"], 1.0)  # b = v
        hidden.fill(block.conv1)
        hidden.norm(block.norm2, ["one", "ax", "bx", "ay", "by"], offset=_TOY_SWISH)
        for a, b, s, v, dy, dx in (("ax", "bx", "sx", "vx", 0, -1), ("ay", "by", "sy", "vy", -1, 0)):
            _read(block.conv2, s8[s], hidden[a], hidden["one"], 1.0)  # s += z·a + z²·a
            _read(block.conv2, s8[s], hidden[a], hidden["one"], 1.0, dy, dx)
            _read(block.conv2, s8[v], hidden[a], hidden["one"], 1.0, dy, dx)  # v ← z²·v
            _read(block.conv2, s8[v], hidden[b], hidden["one"], -1.0)
        if first:  # the code's ReLU unit, then its descriptors into the (zero) carried slots
            for unit, (w, b) in zip(codes, units, strict=True):
                for d, wd in enumerate(w):
                    _read(block.conv1, hidden[unit], s8[f"z{d}"], s8["one"], float(wd))
                _bias(block.conv1, hidden[unit], float(b))
            hidden.scale(block.norm2, codes, gain=_TOY_RELU)
            for k, unit in enumerate(codes, start=1):
                for n, value in zip(carried, descriptors[k], strict=True):
                    if value:
                        _tap(block.conv2, s8[n], hidden[unit], float(value) / _TOY_RELU)

    # upsampling: R(X) = R(X) + R(X − 1) on the nearest-upsampled map is X + 1 again; r is the token's ramp
    fine = _Slots(["Rx", "Ry", "rx", "ry", *carried], width)
    for level, source in ((0, s8), (1, fine)):
        conv = dec.up[level].upsample.conv
        ramp = {"Rx": "sx", "Ry": "sy"} if source is s8 else {"Rx": "Rx", "Ry": "Ry"}
        token = {"rx": "sx", "ry": "sy"} if source is s8 else {"rx": "rx", "ry": "ry"}
        for (out, inp), (dy, dx) in zip(ramp.items(), ((0, -1), (-1, 0)), strict=True):
            _tap(conv, fine[out], source[inp], 1.0)
            _tap(conv, fine[out], source[inp], 1.0, dy, dx)
        for out, inp in token.items():
            _tap(conv, fine[out], source[inp], 1.0)
        for n in carried:
            _tap(conv, fine[n], source[n], 1.0)
        fine.fill(conv)

    # full resolution: offsets in the cell, i − m and j − m for m = 0..cell−2, straight from the last upsampling
    offsets = [f"{a}{m}" for a in "ij" for m in range(cell - 1)]
    full = _Slots([*offsets, *carried], width)
    conv = dec.up[2].upsample.conv
    for a, ramp, token, dy, dx in (("i", "Ry", "ry", -1, 0), ("j", "Rx", "rx", 0, -1)):
        for m in range(cell - 1):  # offset = R − cell·r + cell − 1
            _tap(conv, full[f"{a}{m}"], fine[ramp], 1.0)
            _tap(conv, full[f"{a}{m}"], fine[ramp], 1.0, dy, dx)
            _tap(conv, full[f"{a}{m}"], fine[token], -float(cell))
            _bias(conv, full[f"{a}{m}"], cell - 1.0 - m)
    for n in carried:
        _tap(conv, full[n], fine[n], 1.0)
    full.fill(conv)

    # the last res block: ReLU(i − m), ReLU(j − m), shape flags → one AND unit per (shape, distinct mask row)
    block = dec.up[3].block[0]
    full.norm(block.norm1, [*offsets, *shapes], gain=_TOY_RELU)
    units: list[tuple[str, np.ndarray, np.ndarray]] = []  # (shape slot, row set, column set)
    for s, shape in enumerate(SHAPES):
        mask = shape_mask(shape, cell).astype(np.float64)
        for row in sorted({tuple(r) for r in mask if r.any()}):
            rows = np.array([tuple(r) == row for r in mask], np.float64)
            units.append((shapes[s], rows, np.array(row)))
    ands = _Slots([f"and{u}" for u in range(len(units))], width)
    for u, (flag, rows, cols) in enumerate(units):  # rows(i) + cols(j) + flag − 2 > 0 only when all hold
        out, bias = ands[f"and{u}"], -2.0
        for axis, values in (("i", rows), ("j", cols)):
            const, coef = _integer_basis(values, cell)
            bias += const
            for m, c in enumerate(coef):
                _tap(block.conv1, out, full[f"{axis}{m}"], float(c) / _TOY_RELU)
        _tap(block.conv1, out, full[flag], 1.0 / _TOY_RELU)
        _bias(block.conv1, out, bias)
    ands.fill(block.conv1)
    ands.norm(block.norm2, list(ands.index), gain=_TOY_RELU)
    for n in colours:  # colour slot += K·(mask − 1), mask = Σ units (disjoint rows): below zero off the shape
        for u in range(len(units)):
            _tap(block.conv2, full[n], ands[f"and{u}"], _TOY_MASK_GAIN / _TOY_RELU)
        _bias(block.conv2, full[n], -_TOY_MASK_GAIN)

    # out: background + ReLU(colour up) − ReLU(colour down)
    full.norm(dec.norm_out, colours, gain=_TOY_RELU)
    k = dec.conv_out.kernel_size[0] // 2
    for ch in range(3):
        dec.conv_out.weight[ch, full[f"dp{ch}"], k, k] = 1.0 / _TOY_RELU
        dec.conv_out.weight[ch, full[f"dm{ch}"], k, k] = -1.0 / _TOY_RELU
        dec.conv_out.bias[ch] = float(bg[ch])


def toy_components(resolution: int = 64, seed: int = 0, hidden_size: int = 128, num_layers: int = 4,
                   num_heads: int = 4, rope_theta: float = 10000.0,
                   copy_logit: float = 0.0, source_fusion: float = 1.0) -> dict[str, Any]:
    """A fresh tiny Janus (Llama LM, constructed VQ-VAE, a one-layer SigLIP it never uses) + word tokenizer."""
    from transformers import JanusConfig, LlamaConfig

    from cwm_ray.toyworld.tokenizer import build_word_tokenizer
    from cwm_ray.toyworld.world import COLORS, SHAPES

    if resolution % _TOY_CELL or not 2 * _TOY_CELL <= resolution <= 8 * _TOY_CELL:
        raise ValueError(f"the toy token model needs a resolution that is a multiple of {_TOY_CELL}, {2 * _TOY_CELL} "
                         f"to {8 * _TOY_CELL} (its decoder counts at most 8 tokens to the edge); got {resolution}")
    tokenizer = build_word_tokenizer([BOI, EOI, IMAGE])
    grid = resolution // _TOY_CELL
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                       num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_heads,
                       max_position_embeddings=2 * grid * grid + _TOY_TEXT_POSITIONS + 40,
                       pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, rope_theta=rope_theta,
                       initializer_range=hidden_size**-0.5)
    vq = _toy_vq_config(resolution, hidden_size) | {"num_embeddings": 1 + len(COLORS) * len(SHAPES)}
    vision = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "image_size": resolution,
              "patch_size": _TOY_CELL, "projection_dim": hidden_size, "mlp_ratio": 1.0, "depth": 1,
              "num_image_tokens": grid * grid}
    config = JanusConfig(text_config=text.to_dict(), vision_config=vision, vq_config=vq,
                         image_token_id=tokenizer.convert_tokens_to_ids(IMAGE), text_positions=_TOY_TEXT_POSITIONS,
                         source_copy_logit=copy_logit, source_fusion=source_fusion)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = JanusForConditionalGeneration(config)
    _construct_toy_vq(model.model.vqmodel, resolution)
    _balance_image_embeddings(model)
    return {"model": model.eval(), "tokenizer": tokenizer}


@torch.no_grad()
def _balance_image_embeddings(model: JanusForConditionalGeneration) -> None:
    """Start the image-token input path (`generation_embeddings` → the two-layer `generation_aligner`) at the
    text embeddings' scale, by scaling the aligner's last layer.

    At a standard init (std 0.02) three small matrices in a row put the image embeddings at RMS 3e-4, under
    the Llama's RMSNorm epsilon (1e-6, i.e. 1e-3 in RMS): the norm then crushed every image token to nearly
    the same small vector, so the model could barely tell one source code from another. With the source fused
    in but that init the toy's loss still stood at 0.085 after 700 steps; with this one it was 0.042 by step
    500. A pretrained Janus has no such problem; only a fresh one does.
    """
    codes = torch.arange(model.config.vq_config.num_embeddings)[None]
    text = model.get_input_embeddings().weight.float().pow(2).mean().sqrt()
    image = model.prepare_embeddings_for_image_generation(codes).float().pow(2).mean().sqrt()
    last = model.model.generation_aligner.hidden_layers[-1]
    last.weight.mul_(text / image)
    last.bias.mul_(text / image)


def build_toy_token_world_model(directory: str | None = None, resolution: int = 64, seed: int = 0,
                                **hyper: Any) -> TokenWorldModel:
    """A fresh tiny Janus-architecture world model, saved to `directory` (local or s3://) if given.

    `hyper` overrides `toy_components` (hidden_size, num_layers, num_heads); tests make it smaller still.
    The saved directory loads by path through `load_world_model` with `backend: token`.
    """
    components = toy_components(resolution, seed, **hyper)
    if directory is not None:
        wm = TokenWorldModel(WorldModelConfig(backend="token", model=TOY, device="cpu"), components=components)
        wm.save(directory)
    return TokenWorldModel(WorldModelConfig(backend="token", model=directory or TOY, resolution=resolution),
                           components=components)
