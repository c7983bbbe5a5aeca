"""The world model p(o_t | o_s, a): one protocol, one backend per model family.

Why a protocol and not a base class: the training loop, the recognition actors and Serve only need
these six methods, and each backend (diffusers InstructPix2Pix, an early-fusion VQ-token model)
keeps the vocabulary of its own library behind them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from PIL import Image

from cwm_ray.builtin_models import is_builtin
from cwm_ray.config import ConfigError, RecognitionConfig, WorldModelConfig

ImageLike = Image.Image | bytes | np.ndarray
"""Anything `cwm_ray.schema.decode_image` accepts: a PIL image, encoded bytes or an HxWx3 uint8 array."""

BACKENDS = ("diffusion", "token")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""Config `dtype` names → torch dtypes, for every model this project loads."""


def resolve_device(name: str) -> torch.device:
    """`auto` = cuda when available, else cpu; anything else as given."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def candidate_seed(seed: int, i: int, j: int) -> int:
    """A 63-bit seed from (seed, input, candidate) that no other triple shares in practice: candidate j of
    input i depends on nothing else in the batch (both backends sample this way)."""
    return int(np.random.SeedSequence([seed, i, j]).generate_state(2, np.uint64)[0] >> np.uint64(1))


@runtime_checkable
class WorldModel(Protocol):
    """What every world-model backend offers (see cwm_ray.world_model.diffusion for the reference one)."""

    def loss(self, batch: dict[str, torch.Tensor], weights: torch.Tensor | None = None) -> torch.Tensor:
        """Scalar recognition-weighted training loss of a collated batch; weights (B, h, w) or None = ones."""
        ...

    def sample(
        self, sources: Sequence[ImageLike], actions: Sequence[str], n: int | Sequence[int] = 1,
        seed: int | Sequence[int] = 0,
    ) -> list[list[Image.Image]]:
        """n candidate next observations per (source, action), from one batched sampling run.

        `n` and `seed` are one value for all inputs or one per input; an input's candidates depend only
        on its own (source, action, seed), never on what else shares the batch.
        """
        ...

    def collate(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        """A Ray Data numpy batch of triplets → the keyword arguments of `training_module().forward`."""
        ...

    def training_module(self) -> torch.nn.Module:
        """The nn.Module a DDP / DeepSpeed engine wraps; `forward(**collate(batch))` is the scalar loss."""
        ...

    def save(self, directory: str) -> None:
        """Write a directory that `load_world_model` reads back (adapter only when training LoRA)."""
        ...

    def encode_features(self, images: Sequence[ImageLike] | torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) encoder features on the grid the loss lives on; recognition weights compare these."""
        ...


def checkpoint_family(directory: str) -> tuple[str | None, str]:
    """(the backend that loads a local checkpoint directory or None, what it is), from the files it holds."""
    path = Path(directory)
    if (path / "model_index.json").exists() or (path / "unet").is_dir():
        return "diffusion", "a diffusers InstructPix2Pix-style pipeline"
    if (path / "config.json").exists():
        model_type = str(json.loads((path / "config.json").read_text()).get("model_type", "unknown"))
        if model_type == "janus":
            return "token", "a Janus checkpoint"
        return None, f"a {model_type!r} transformers checkpoint"
    return None, "no checkpoint this project knows"


def load_world_model(cfg: WorldModelConfig, recognition: RecognitionConfig | None = None) -> WorldModel:
    """The backend named by `cfg.backend`, loaded from `cfg.model` (hub id, local or s3:// path, or a built-in
    model: `toy`, cwm_ray.builtin_models).

    A local directory of another family is a clear error naming what it holds and the backend that loads it,
    rather than the first missing file deep inside diffusers or transformers.
    """
    if not is_builtin(cfg.backend, cfg.model) and Path(cfg.model).is_dir():
        backend, what = checkpoint_family(cfg.model)
        if backend != cfg.backend:
            fix = (f"set world_model.backend={backend}" if backend else
                   "point world_model.model at an InstructPix2Pix pipeline (backend diffusion) or a Janus "
                   "checkpoint (backend token)")
            raise ConfigError(f"world_model.model={cfg.model} holds {what}, which the {cfg.backend!r} backend "
                              f"cannot load; {fix}")
    if cfg.backend == "diffusion":
        from cwm_ray.world_model.diffusion import DiffusionWorldModel

        return DiffusionWorldModel(cfg, recognition)
    if cfg.backend == "token":
        from cwm_ray.world_model.token import TokenWorldModel

        return TokenWorldModel(cfg, recognition)
    raise ValueError(f"unknown world model backend {cfg.backend!r}; known backends: {', '.join(BACKENDS)}")


__all__ = ["BACKENDS", "DTYPES", "ImageLike", "WorldModel", "candidate_seed", "load_world_model", "resolve_device"]


def __getattr__(name: str) -> Any:  # lazy, so importing the protocol does not import diffusers
    if name == "DiffusionWorldModel":
        from cwm_ray.world_model import diffusion

        return getattr(diffusion, name)
    if name == "TokenWorldModel":
        from cwm_ray.world_model import token

        return getattr(token, name)
    raise AttributeError(name)
