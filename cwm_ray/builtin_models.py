"""Built-in models: values of a config's `model` key that are built in code rather than loaded from files.

Today there is one, `toy` (`cwm_ray.config.TOY`): a fresh random IDM, diffusion or token world model sized for the
toy world, for the CPU loop and the tests. Its builders live beside the toy world (`cwm_ray/toyworld/`).

Why a table of "module:function" strings, imported on first use: the product's loaders (`cwm_ray.idm`,
`cwm_ray.world_model.diffusion`, `cwm_ray.world_model.token`) must not import the toy world, yet `model: toy` has to
work wherever they take a model name. So they ask this module by (kind, name) and get a builder, the way
transformers' auto classes map a model type to a class *name* and import it only when that type is asked for
(`CONFIG_MAPPING_NAMES`). The product knows that built-in models exist, not what any of them is; the dependency
points from the toy to the product (each builder uses the product's classes), never back; and a module that
never sees `model: toy` never imports the toy world.

Each builder takes the component's config (`IDMConfig` for `idm`, `WorldModelConfig` for the world model
backends) and returns what the loader would otherwise read from a checkpoint: `(model, processor)` for `idm`,
the backend's components dict for `diffusion` and `token`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from cwm_ray.config import TOY

BUILTIN_MODELS: dict[tuple[str, str], str] = {
    ("idm", TOY): "cwm_ray.toyworld.idm_model:from_config",
    ("diffusion", TOY): "cwm_ray.toyworld.diffusion_model:components_from_config",
    ("token", TOY): "cwm_ray.toyworld.token_model:components_from_config",
}
"""(kind, model name) → "module:function" of its builder; kind is `idm` or a world model backend."""


def is_builtin(kind: str, name: str) -> bool:
    """Whether `name` is a built-in model of `kind` (no files to read), without importing its builder."""
    return (kind, name) in BUILTIN_MODELS


def builtin_model(kind: str, name: str) -> Callable[[Any], Any] | None:
    """The builder of the built-in model `name` of `kind`, imported now; None when `name` is not built in
    (a hub id or a path, which the caller loads as usual)."""
    target = BUILTIN_MODELS.get((kind, name))
    if target is None:
        return None
    module, function = target.split(":")
    return getattr(importlib.import_module(module), function)


__all__ = ["BUILTIN_MODELS", "builtin_model", "is_builtin"]
