"""Built-in models (`model: toy`) resolve by name, and the product's modules do not carry the toy world."""

from __future__ import annotations

from pathlib import Path

import pytest

from cwm_ray.builtin_models import BUILTIN_MODELS, builtin_model, is_builtin
from cwm_ray.config import TOY

ROOT = Path(__file__).resolve().parent.parent
PRODUCT = ["cwm_ray/world_model", "cwm_ray/idm.py", "cwm_ray/serve", "cwm_ray/annotate.py", "cwm_ray/train.py"]
"""The modules that load and run models: they reach the toy world only through `cwm_ray.builtin_models`."""


@pytest.mark.parametrize("kind", ["idm", "diffusion", "token"])
def test_the_toy_resolves_to_a_builder_of_the_toy_world(kind: str) -> None:
    assert is_builtin(kind, TOY)
    builder = builtin_model(kind, TOY)
    assert callable(builder) and builder.__module__.startswith("cwm_ray.toyworld.")


def test_a_path_or_hub_id_is_not_built_in() -> None:
    assert builtin_model("idm", "llava-hf/llava-1.5-7b-hf") is None
    assert builtin_model("token", "/models/toy") is None
    assert not is_builtin("diffusion", "toy/") and not is_builtin("judge", TOY)


def test_every_entry_names_an_importable_function() -> None:
    for kind, name in BUILTIN_MODELS:
        assert callable(builtin_model(kind, name)), (kind, name)


def test_no_product_module_names_the_toy_world() -> None:
    """Issue 35's check (`grep -rn toyworld <PRODUCT>` prints nothing): the toy's builders live beside the toy
    world, and a product module reaches them only through `cwm_ray.builtin_models`' table of strings."""
    files = [p for entry in PRODUCT for p in ([ROOT / entry] if entry.endswith(".py") else
                                               sorted((ROOT / entry).rglob("*.py")))]
    assert len(files) > 8
    offenders = [f"{p.relative_to(ROOT)}:{i}" for p in files
                 for i, line in enumerate(p.read_text().splitlines(), 1)
                 if "toyworld" in line]
    assert not offenders, f"product modules name the toy world: {offenders}"
