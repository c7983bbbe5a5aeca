"""The inverse dynamics model (IDM): p(action | source, target), over any transformers image-text-to-text model.

The paper bootstraps a world model from an IDM (arXiv 2506.06006, §3): the IDM `label`s unlabelled frame pairs
with an action and its log-likelihood (the stratified top-K filter ranks by it), and at inference it `score`s
the world model's N candidates by p(action | source, candidate) for best-of-N. Both are the same conditional
likelihood; this file computes it one way (teacher forcing, right padding) so the verifier and the filter agree.

The sequence is `prompt(source, target) + action + EOS`. An instruction-tuned VLM gets its prompt through its
processor's chat template (`apply_chat_template` with one user turn: two image entries, then the question, and
the generation prompt), which puts each image where the model expects it (Qwen2-VL:
`<|vision_start|><|image_pad|><|vision_end|>`; LLaVA-1.5: `USER: <image>...ASSISTANT:`; SmolVLM:
`<fake_token_around_image>...`). A processor without a template (the toy) gets `IDMConfig.prompt` with each
`{image}` replaced by the processor's image placeholder. Either way the processor expands the placeholders to
the vision tower's token count. Only the action tokens and EOS carry labels, so the loss and the scores are over
the answer alone: training masks the prompt, and `label` and `score` read the same likelihood.

Nothing here knows about distribution: `training_module()` is a plain `nn.Module` that Ray Train / DeepSpeed
wrap, and `collate()` turns a Ray Data batch into its inputs.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from PIL import Image
from transformers import (
    AutoConfig,
    AutoModelForImageTextToText,
    AutoProcessor,
    PretrainedConfig,
    PreTrainedModel,
    ProcessorMixin,
)

from cwm_ray import storage
from cwm_ray.builtin_models import builtin_model, is_builtin
from cwm_ray.config import TRANSFORMERS_LORA_TARGETS, ConfigError, IDMConfig, LoRAConfig
from cwm_ray.lora import lora_targets, missing_modules, target_regex
from cwm_ray.schema import decode_image
from cwm_ray.world_model import DTYPES, resolve_device

ImageLike = bytes | Image.Image | np.ndarray


@dataclass(frozen=True)
class Label:
    """One IDM annotation of a frame pair."""

    action: str
    logprob: float
    """Sum of the log-probabilities of the generated tokens (EOS included when emitted), at temperature 1."""
    num_tokens: int


class InverseDynamicsModel:
    """An image-text-to-text model + its processor, asked "what action turns the first image into the second?"."""

    def __init__(self, model: PreTrainedModel, processor: ProcessorMixin, cfg: IDMConfig) -> None:
        self.model = model
        self.processor = processor
        self.cfg = cfg
        self.tokenizer = processor.tokenizer
        vision = getattr(model.config, "vision_config", None)
        self.reach = tubelet_reach(getattr(vision, "num_channels", 3))
        self.patch_size: int = getattr(vision, "patch_size", 1)
        self.chat_template = uses_chat_template(processor, model.config)
        self.prompt = build_prompt(cfg.prompt, processor, model.config, cfg.model)
        self.eos_token_id: int = self.tokenizer.eos_token_id
        pad = self.tokenizer.pad_token_id
        self.pad_token_id: int = self.eos_token_id if pad is None else pad

    @property
    def tubelet(self) -> bool:
        """The frame pair goes in as one image (channel-stacked), not as two."""
        return self.reach is not None

    # -- loading and saving ---------------------------------------------------------------------------------

    @classmethod
    def load(cls, cfg: IDMConfig) -> InverseDynamicsModel:
        """`cfg.model` is a hub id, a local or s3:// directory, or a built-in model (`toy`: a fresh random tiny
        LLaVA, cwm_ray.builtin_models)."""
        dtype = DTYPES[cfg.dtype]
        builder = builtin_model("idm", cfg.model)
        if builder is not None:
            model, processor = builder(cfg)
            model = model.to(dtype)
        else:
            path = storage.local_dir(cfg.model)
            try:
                model = AutoModelForImageTextToText.from_pretrained(
                    path, dtype=dtype, use_safetensors=True, trust_remote_code=cfg.trust_remote_code,
                    **({"attn_implementation": cfg.attn_implementation} if cfg.attn_implementation else {}),
                )
            except ValueError as exc:
                if "Unrecognized configuration class" not in str(exc):
                    raise
                kind = type(AutoConfig.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)).__name__
                raise ConfigError(
                    f"idm.model={cfg.model} is a {kind}, not an image-text-to-text model transformers can load "
                    "(AutoModelForImageTextToText): the IDM must read two images. Use a VLM such as LLaVA, Qwen2-VL, "
                    "Qwen2.5-VL or SmolVLM/Idefics3 (docs/models.md), or trust_remote_code=true for one that ships "
                    "its own code") from None
            processor = AutoProcessor.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
        if cfg.adapter:
            model = PeftModel.from_pretrained(model, storage.local_dir(cfg.adapter))
        device = resolve_device(cfg.device)
        return cls(model.to(device).eval(), processor, cfg)

    def save(self, directory: str) -> None:
        """Full safetensors weights + processor, loadable by `load(IDMConfig(model=directory))`; or, for a LoRA
        model with `lora_export: adapter`, peft's adapter alone, loadable by `load(IDMConfig(model=<base>,
        adapter=directory))`.

        A LoRA model is saved merged by default (base + B·A per adapted layer), computed without touching the live
        weights, so training can go on after a checkpoint and every consumer (annotate, serve) loads one
        format with no adapter bookkeeping. The adapter export is for a base too large to copy per role, shared
        with the world model (the paper's single-model setting). `directory` may be s3://.
        """
        with contextlib.ExitStack() as stack:
            local = stack.enter_context(tempfile.TemporaryDirectory()) if storage.is_s3(directory) else directory
            adapter_only = isinstance(self.model, PeftModel) and self.cfg.lora_export == "adapter"
            if adapter_only:  # adapter_config.json + adapter_model.safetensors; the processor stays the base's
                self.model.save_pretrained(local)
            elif isinstance(self.model, PeftModel):
                base = self.model.get_base_model()
                base.save_pretrained(local, state_dict=_merged_state_dict(self.model))
            else:
                self.model.save_pretrained(local)
            if not adapter_only:
                self.processor.save_pretrained(local)
            if storage.is_s3(directory):
                storage.upload_dir(local, directory)

    # -- inputs ---------------------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _frames(self, images: Sequence[ImageLike]) -> list[Image.Image]:
        """Decoded frames; resized to `image_size` only when the config asks (else the processor sizes them)."""
        frames = [decode_image(image) for image in images]
        if self.cfg.image_size is None:
            return frames
        size = (self.cfg.image_size, self.cfg.image_size)
        return [f if f.size == size else f.resize(size, Image.Resampling.BICUBIC) for f in frames]

    def _prompt_inputs(self, sources: Sequence[ImageLike], targets: Sequence[ImageLike]) -> dict[str, torch.Tensor]:
        """The processor's encoding of prompt + both frames. Left padding, for `generate`.

        One template and one image size give every row the same length, so usually there is no padding and
        the prompt occupies columns [0, P) of every row. Models with dynamic resolution (Qwen2-VL) give frames
        of other sizes other lengths; the left padding then sits before the shorter prompts, masked.
        """
        if len(sources) != len(targets):
            raise ValueError(f"{len(sources)} sources but {len(targets)} targets")
        src, tgt = self._frames(sources), self._frames(targets)
        # A pair the IDM trains on shares one size (two frames of a clip, an AURORA pair), but the verifier gets a
        # world model's candidate at the model's own square (InstructPix2Pix's 256 px, Janus's 384) beside a
        # native-aspect source; with a dynamic-resolution processor (Qwen2-VL) the two would even become different
        # token grids. So a target is brought to its source's size, and verification sees what training saw.
        tgt = [t if t.size == s.size else t.resize(s.size, Image.Resampling.BICUBIC) for s, t in zip(src, tgt,
                                                                                                   strict=True)]
        images = [[s] for s in src] if self.tubelet else [[s, t] for s, t in zip(src, tgt, strict=True)]
        enc = self.processor(
            text=[self.prompt] * len(images), images=images, return_tensors="pt", padding=True, padding_side="left"
        )
        out = {k: v for k, v in enc.items() if isinstance(v, torch.Tensor)}
        if self.tubelet:  # channels 0-2: the source frame, 3-5: the target frame, each normalised alike
            target_pixels = self.processor.image_processor(tgt, return_tensors="pt")["pixel_values"]
            pair = torch.cat([out["pixel_values"], target_pixels], dim=1)
            out["pixel_values"] = patch_neighbourhood(pair, self.reach or 0, self.patch_size)
        return out

    def _answer_ids(self, action: str) -> list[int]:
        """The label tokens: the action without special tokens, then EOS (so the IDM learns to stop)."""
        return [*self.tokenizer(action, add_special_tokens=False)["input_ids"], self.eos_token_id]

    def _teacher_forced_inputs(
        self, sources: Sequence[ImageLike], targets: Sequence[ImageLike], actions: Sequence[str]
    ) -> dict[str, torch.Tensor]:
        """prompt + action + EOS, right-padded, with labels on the answer only.

        Right padding keeps each row's positions 0..n-1 whatever the batch, so a row scores the same alone
        or batched (left padding would shift positions for models that take them from the cache).
        """
        if len(actions) != len(sources):
            raise ValueError(f"{len(sources)} pairs but {len(actions)} actions")
        enc = self._prompt_inputs(sources, targets)
        prompt_ids = enc["input_ids"]
        batch, p = prompt_ids.shape
        answers = [self._answer_ids(a) for a in actions]
        a = max(len(x) for x in answers)
        input_ids = torch.full((batch, p + a), self.pad_token_id, dtype=prompt_ids.dtype)
        labels = torch.full_like(input_ids, -100)
        attention_mask = torch.zeros_like(input_ids)
        input_ids[:, :p] = prompt_ids
        attention_mask[:, :p] = enc["attention_mask"]
        for i, ans in enumerate(answers):
            input_ids[i, p : p + len(ans)] = torch.tensor(ans)
            labels[i, p : p + len(ans)] = torch.tensor(ans)
            attention_mask[i, p : p + len(ans)] = 1
        out = dict(enc, input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        for key, value in enc.items():  # other per-token inputs (token types, ...): answer tokens are text, 0
            if key not in out or value.shape != prompt_ids.shape or key in ("input_ids", "attention_mask"):
                continue
            out[key] = torch.cat([value, value.new_zeros(batch, a)], dim=1)
        return out

    def _to_device(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        dtype = next(self.model.parameters()).dtype
        return {
            k: v.to(self.device, dtype=dtype if v.is_floating_point() else v.dtype) for k, v in inputs.items()
        }

    # -- the IDM --------------------------------------------------------------------------------------------

    @torch.no_grad()
    def label(self, sources: Sequence[ImageLike], targets: Sequence[ImageLike], seed: int | None = None) -> list[Label]:
        """Generate one action per (source, target) pair, with the model's log-likelihood of it.

        The log-likelihood is from the raw logits (temperature 1), whatever the sampling temperature, so
        labels from greedy and sampled runs rank on one scale.
        """
        if len(sources) == 0:
            return []
        inputs = self._to_device(self._prompt_inputs(sources, targets))
        p = inputs["input_ids"].shape[1]
        sampling = {"do_sample": True, "temperature": self.cfg.temperature} if self.cfg.do_sample else {
            "do_sample": False}
        with _eval_mode(self.model), _seeded(seed, self.device):
            out = self.model.generate(
                **inputs, **sampling, max_new_tokens=self.cfg.max_new_tokens, return_dict_in_generate=True,
                output_logits=True, eos_token_id=self.eos_token_id, pad_token_id=self.pad_token_id,
                **({"cache_implementation": self.cfg.cache_implementation} if self.cfg.cache_implementation else {}),
            )
            token_logprobs = self.model.compute_transition_scores(out.sequences, out.logits, normalize_logits=True)
        generated = out.sequences[:, p:]
        # A token counts if no EOS came before it: the EOS itself counts, the padding after it does not.
        is_eos = (generated == self.eos_token_id).long()
        keep = (is_eos.cumsum(dim=1) - is_eos) == 0
        logprobs = torch.where(keep, token_logprobs.float(), 0.0).sum(dim=1)
        texts = self.tokenizer.batch_decode(generated, skip_special_tokens=True)
        return [
            Label(" ".join(t.split()), float(lp), int(n))
            for t, lp, n in zip(texts, logprobs.tolist(), keep.sum(dim=1).tolist(), strict=True)
        ]

    @torch.no_grad()
    def score_batch(
        self, sources: Sequence[ImageLike], targets: Sequence[ImageLike], actions: Sequence[str]
    ) -> np.ndarray:
        """log p(action_i | source_i, target_i) for each row, in one teacher-forced forward pass."""
        inputs = self._to_device(self._teacher_forced_inputs(sources, targets, actions))
        labels = inputs.pop("labels")
        a = int((labels != -100).sum(dim=1).max())
        labels = labels[:, -a:]  # answers sit at the end (right padding), so only the last a+1 logits matter
        if "logits_to_keep" in inspect.signature(_unwrap(self.model).forward).parameters:
            inputs["logits_to_keep"] = a + 1  # vocab x image-token logits would dominate memory on real VLMs
        with _eval_mode(self.model):
            logits = self.model(**inputs).logits[:, -(a + 1) : -1].float()
        logprobs = torch.log_softmax(logits, dim=-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return torch.where(labels != -100, logprobs, 0.0).sum(dim=1).cpu().numpy()

    def score(self, source: ImageLike, candidates: Sequence[ImageLike], action: str) -> np.ndarray:
        """The best-of-N verifier: log p(action | source, candidate) per candidate, one batched pass."""
        return self.score_batch([source] * len(candidates), candidates, [action] * len(candidates))

    # -- training -------------------------------------------------------------------------------------------

    def collate(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        """A Ray Data numpy batch (`source`, `target`: PNG bytes; `action`: str) → model inputs with `labels`."""
        return self._teacher_forced_inputs(list(batch["source"]), list(batch["target"]), [
            str(a) for a in batch["action"]])

    def training_module(self, lora: LoRAConfig | None = None) -> torch.nn.Module:
        """The module a training loop optimises: `forward(**collate(batch))` → mean answer-token cross-entropy.

        With `lora.enabled` the language model gets peft LoRA adapters (the paper: r=16, alpha=32) and only
        they train, with the modules of `lora.modules_to_save` trained whole beside them; otherwise every weight
        trains. `self.model` becomes the trained model, so `label`, `score` and `save` see the training as it goes.
        """
        lora = self.cfg.lora if lora is None else lora
        if lora.enabled:
            if not isinstance(self.model, PeftModel):
                self.model = get_peft_model(self.model, LoraConfig(
                    r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                    target_modules=_language_model_targets(self.model, lora.target_modules),
                    modules_to_save=_modules_to_save(self.model, lora.modules_to_save),
                ))
            for name, param in self.model.named_parameters():  # also resumes a loaded (frozen) adapter
                param.requires_grad_("lora_" in name or ".modules_to_save." in name)
        else:
            if isinstance(self.model, PeftModel):
                self.model = self.model.merge_and_unload()
            self.model.requires_grad_(True)
        return _IDMLoss(self.model.train())


class _IDMLoss(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, **batch: torch.Tensor) -> torch.Tensor:
        return self.model(**batch).loss  # transformers' causal-LM loss: shifted, mean over labels != -100


# -- the prompt -------------------------------------------------------------------------------------------


def _tubelet_config(config: PretrainedConfig) -> bool:
    """A vision tower with 6·(1 + 4r) input channels embeds the frame pair as one tubelet (as video ViTs embed 2
    frames per tubelet), widened to a cross of patches r away (`patch_neighbourhood`): the pair is one image."""
    return tubelet_reach(getattr(getattr(config, "vision_config", None), "num_channels", 3)) is not None


def uses_chat_template(processor: ProcessorMixin, config: PretrainedConfig) -> bool:
    return bool(getattr(processor, "chat_template", None)) and not _tubelet_config(config)


def image_marker(processor: ProcessorMixin, config: PretrainedConfig, model: str) -> str:
    """What each `{image}` of a raw prompt (no chat template) becomes: the processor's placeholder (LLaVA's and
    Idefics3's `<image>`, which their processors expand), wrapped in the model's vision start and end tokens when
    its config names them, as the family's chat template writes them.

    Why the wrapping: Qwen2-VL and Qwen2.5-VL find each image by its `<|vision_start|>`; a bare `<|image_pad|>`
    made `generate` fail deep in `get_rope_index` ("shape mismatch: value tensor of shape [3, 74] cannot be
    broadcast to indexing result of shape [3, 138]"). A placeholder the tokenizer does not know is a ConfigError
    naming the fix, raised when the IDM loads (and, for annotation, in the driver before any video is read).
    """
    token = getattr(processor, "image_token", None) or "<image>"
    token = str(getattr(token, "content", token))  # Idefics3 keeps an AddedToken
    tok = processor.tokenizer
    if tok.convert_tokens_to_ids(token) in (None, tok.unk_token_id):
        raise ConfigError(
            f"idm.model={model} has no chat template and its tokenizer does not know the image placeholder {token!r}, "
            "so the prompt cannot mark where the two frames go: use a checkpoint whose processor has its family's "
            "chat template (the published instruct checkpoints ship chat_template.jinja), or save one with it "
            "(processor.chat_template = <the family's template>; processor.save_pretrained(<dir>))")
    start, end = (getattr(config, f"vision_{k}_token_id", None) for k in ("start", "end"))
    if start is not None and end is not None:
        token = f"{tok.convert_ids_to_tokens(start)}{token}{tok.convert_ids_to_tokens(end)}"
    return token


def build_prompt(template: str, processor: ProcessorMixin, config: PretrainedConfig, model: str) -> str:
    """The prompt text before the processor expands image placeholders.

    With a chat template, `{image}` markers only say how many images there are: each becomes an image entry of
    the user turn, in order, and the rest of the template is the question. Without one the template is used as
    written, each `{image}` replaced by `image_marker`; a tubelet model (the toy) takes the pair as one image,
    so only the first `{image}` is kept.
    """
    tubelet = _tubelet_config(config)
    if uses_chat_template(processor, config):
        question = " ".join(template.replace("{image}", " ").split())
        content = [{"type": "image"}] * max(1, template.count("{image}")) + [{"type": "text", "text": question}]
        return processor.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False)
    if tubelet:
        head, sep, tail = template.partition("{image}")
        template = head + sep + tail.replace("{image}", "")
    return template.replace("{image}", image_marker(processor, config, model))


def _small_files_dir(uri: str, directory: str) -> str:
    """An s3:// checkpoint's files without its weights, copied into `directory` (config, processor, tokenizer)."""
    prefix = uri.rstrip("/") + "/"
    for file in storage.list_files(uri):
        if file.endswith((".safetensors", ".bin", ".pt", ".pth", ".gguf")):
            continue
        local = os.path.join(directory, file[len(prefix):])
        os.makedirs(os.path.dirname(local), exist_ok=True)
        with open(local, "wb") as f:
            f.write(storage.read_bytes(file))
    return directory


def check_prompt(cfg: IDMConfig) -> str:
    """The IDM's prompt for `cfg.model`, built from its config and processor alone (no weights), and encoded once
    with two small frames: a ConfigError naming the fix when it cannot be (no chat template and no image marker
    the tokenizer knows; a processor that rejects the raw prompt; a prompt whose placeholders it does not expand).

    Annotation calls it in the driver, so a checkpoint that cannot prompt fails in a second, before any video is
    read, and not in the IDM actors after decoding has started.
    """
    if is_builtin("idm", cfg.model):  # built in code with the prompt it was made for, no files to read
        return cfg.prompt
    with tempfile.TemporaryDirectory() as tmp:
        path = _small_files_dir(cfg.model, tmp) if storage.is_s3(cfg.model) else storage.local_dir(cfg.model)
        config = AutoConfig.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
        processor = AutoProcessor.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    prompt = build_prompt(cfg.prompt, processor, config, cfg.model)
    if _tubelet_config(config):
        return prompt
    frame = Image.new("RGB", (64, 64), (128, 128, 128))
    images = max(1, cfg.prompt.count("{image}"))
    how = ("give the checkpoint its family's chat template (processor.chat_template = <template>; "
           "processor.save_pretrained(<dir>))" if not uses_chat_template(processor, config) else
           "check idm.prompt's {image} markers")
    try:
        ids = processor(text=[prompt], images=[[frame] * images], return_tensors="pt")["input_ids"]
    except (ValueError, RuntimeError, IndexError, TypeError) as exc:
        raise ConfigError(f"idm.model={cfg.model}: its processor cannot encode the IDM prompt {prompt!r} with "
                          f"{images} images ({str(exc).splitlines()[0]}): {how}") from None
    image_id = getattr(processor, "image_token_id", None)
    image_id = getattr(config, "image_token_id", None) if image_id is None else image_id
    if image_id is not None and not bool((ids == image_id).any()):
        raise ConfigError(f"idm.model={cfg.model}: the IDM prompt {prompt!r} holds no image placeholder its "
                          f"processor expands, so the model would never see the frames: {how}")
    return prompt


# -- helpers ------------------------------------------------------------------------------------------------


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.get_base_model() if isinstance(model, PeftModel) else model


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Inference without dropout, restoring train mode after (label/score may run mid-training)."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@contextlib.contextmanager
def _seeded(seed: int | None, device: torch.device) -> Iterator[None]:
    """A seeded RNG for sampling, without disturbing the caller's global RNG state."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def _language_model_targets(model: PreTrainedModel, names: Sequence[str]) -> str | list[str]:
    """A peft `target_modules` regex limited to the language model (vision towers also have q_proj, ...).

    Empty `names` = the attention projections every transformers LM names alike; a name the language model
    lacks is a clear error naming the family, not peft's "target modules not found".
    """
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    prefix = next((n for n, m in model.named_modules() if m is decoder and n), None)
    names = lora_targets(decoder if prefix is not None else model, names, TRANSFORMERS_LORA_TARGETS,
                         type(model).__name__, "idm.lora.target_modules")
    return names if prefix is None else target_regex(prefix, names)


def _modules_to_save(model: PreTrainedModel, names: Sequence[str]) -> list[str] | None:
    """`idm.lora.modules_to_save`, each checked to name a module (peft would silently train nothing for a typo)."""
    missing = missing_modules(model, names)
    if missing:
        present = [n for n, _ in model.named_modules() if n]
        top = sorted({n.split(".")[0] for n in present} | {".".join(n.split(".")[:2]) for n in present if "." in n})
        raise ConfigError(f"idm.lora.modules_to_save: {type(model).__name__} has no module named "
                          f"{', '.join(missing)} (its top-level modules: {', '.join(top[:16])})")
    return list(names) or None


def _merged_state_dict(model: PeftModel) -> dict[str, torch.Tensor]:
    """The base model's state dict with each LoRA delta folded in and each module of `modules_to_save` replaced by
    its trained copy, leaving the live model untouched."""
    base = model.get_base_model()
    adapter = model.active_adapter
    state: dict[str, torch.Tensor] = {}
    for k, v in base.state_dict().items():
        if "lora_" in k or ".original_module." in k:
            continue
        if ".modules_to_save." in k:  # `<module>.modules_to_save.<adapter>.<rest>`: the trained copy
            head, _, tail = k.partition(".modules_to_save.")
            name, _, rest = tail.partition(".")
            if name != adapter:
                continue
            k = f"{head}.{rest}"
        state[k.replace(".base_layer.", ".")] = v
    for name, module in base.named_modules():
        if isinstance(module, LoraLayer) and not module.merged:
            weight = module.get_base_layer().weight
            delta = sum(module.get_delta_weight(a) for a in module.active_adapters if a in module.lora_A)
            state[f"{name}.weight"] = (weight + delta).detach()
    return state


# -- tubelets -------------------------------------------------------------------------------------------------


def neighbourhood_offsets(reach: int) -> list[tuple[int, int]]:
    """(rows, cols) offsets of the patches a tubelet token sees: itself, then ±k rows and ±k cols, k = 1..reach."""
    out = [(0, 0)]
    for k in range(1, reach + 1):
        out += [(k, 0), (-k, 0), (0, k), (0, -k)]
    return out


def tubelet_reach(num_channels: int) -> int | None:
    """The reach r of a tubelet vision tower (6·(1 + 4r) input channels), or None for a plain RGB tower."""
    groups, rest = divmod(num_channels, 6)
    if rest or groups < 1 or (groups - 1) % 4:
        return None
    return (groups - 1) // 4


def patch_neighbourhood(pixel_values: torch.Tensor, reach: int, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) → (B, C·(1 + 4·reach), H, W): channel group g holds the image shifted so that each patch
    shows the patch `neighbourhood_offsets(reach)[g]` away from it (zeros, i.e. the normalised board colour,
    beyond the edge).

    Why: a ViT patch embedding sees one patch, and a tiny tower trained from scratch on a few thousand pairs
    does not learn to relate patches a few cells apart in a CPU budget: the toy IDM confused `move` with
    `put` and named the wrong reference object (44 % of test pairs explained). Stacking the cross of
    neighbours into the channels gives every token the cells one action can reach (the toy world moves 2
    cells and puts beside, 1 cell), as an overlapping stem would, without changing the model class.
    """
    if reach == 0:
        return pixel_values
    pad = reach * patch_size
    h, w = pixel_values.shape[-2:]
    padded = torch.nn.functional.pad(pixel_values, (pad, pad, pad, pad))
    shifted = []
    for dr, dc in neighbourhood_offsets(reach):
        top, left = pad + dr * patch_size, pad + dc * patch_size
        shifted.append(padded[..., top : top + h, left : left + w])
    return torch.cat(shifted, dim=1)


__all__ = [
    "DTYPES", "InverseDynamicsModel", "Label", "build_prompt", "check_prompt", "image_marker",
    "neighbourhood_offsets", "patch_neighbourhood", "tubelet_reach",
]
