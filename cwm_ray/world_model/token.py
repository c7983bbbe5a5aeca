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

The toy model (`model: toy`) is the same classes with tiny configs and a constructed VQ-VAE. It is built
beside the toy world, by name through `cwm_ray.builtin_models` (whose token entry names the module that says
how the VQ is constructed), so this backend carries no toy.

Images are resized to the VQ's native side (toy: `resolution`; Janus-Pro: 384) and samples come out at
it; `WorldModelConfig.resolution` only sizes a fresh toy.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
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
from cwm_ray.builtin_models import builtin_model
from cwm_ray.config import TRANSFORMERS_LORA_TARGETS, RecognitionConfig, WorldModelConfig
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
        builder = builtin_model("token", cfg.model) if components is None else None
        if builder is not None:  # a built-in model (`toy`): built in code, cwm_ray.builtin_models
            components = builder(cfg)
        elif components is None:
            path = storage.local_dir(cfg.model)
            processor = _processor(path)  # its tokenizer is the checkpoint's: not loaded twice
            components = {"model": JanusForConditionalGeneration.from_pretrained(path, dtype=self.dtype,
                                                                                 use_safetensors=True),
                          "tokenizer": processor.tokenizer if processor else AutoTokenizer.from_pretrained(path),
                          "processor": processor}
        self.model: JanusForConditionalGeneration = components["model"]
        self.tokenizer: PreTrainedTokenizerBase = components["tokenizer"]
        self.processor = components.get("processor")
        """The checkpoint's `JanusProcessor` (image processor, chat template) when it has one: the world model does
        not use it, but a full fine-tune's export keeps it, so the export still loads as an IDM (one model in both
        roles, as the paper uses Janus)."""
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
        (self.processor or self.tokenizer).save_pretrained(out)  # a processor saves its tokenizer too


def _processor(path: str) -> Any:
    """The checkpoint's processor when it ships one (Janus-Pro's do; transformers 5 writes processor_config.json,
    earlier checkpoints preprocessor_config.json), else None."""
    if not any((Path(path) / f).exists() for f in ("processor_config.json", "preprocessor_config.json")):
        return None
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(path)


def _load_adapter(language_model: nn.Module, directory: str) -> None:
    """Inject a saved peft LoRA adapter into the language model (peft's own file layout)."""
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    config = LoraConfig.from_pretrained(directory)
    inject_adapter_in_model(config, language_model)
    result = set_peft_model_state_dict(language_model, load_file(str(Path(directory) / ADAPTER_WEIGHTS)))
    if result.unexpected_keys:
        raise ValueError(f"adapter {directory} does not fit the model: {result.unexpected_keys[:3]}")
