"""Which modules LoRA adapts: the family's usual targets by default, and a clear error for a wrong name.

peft raises a bare "Target modules {...} not found in the base model" (or, with a regex, silently adapts
nothing and training then has no parameters). A user who copied diffusers names into a Janus config, or
the other way round, needs to hear which family the model is and what its modules are called.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from torch import nn

from cwm_ray.config import ConfigError


def lora_targets(module: nn.Module, names: Sequence[str], default: Sequence[str], family: str,
                 setting: str) -> list[str]:
    """`names` (or `default` when empty), each checked to name at least one module inside `module`.

    `family` names the model in the error ("LlavaForConditionalGeneration", "InstructPix2Pix UNet"), and
    `setting` the config key to fix ("idm.lora.target_modules").
    """
    wanted = list(names) or list(default)
    missing = missing_modules(module, wanted)
    if missing:
        # Named as target_modules takes them: the attribute name, with a Sequential's index kept ("to_out.0").
        linear = sorted({".".join(n.split(".")[-2:]) if n.rsplit(".", 1)[-1].isdigit() else n.rsplit(".", 1)[-1]
                         for n, m in module.named_modules() if isinstance(m, nn.Linear)})
        hint = f"its linear layers are named {', '.join(linear[:16])}" if linear else "it has no linear layers"
        raise ConfigError(
            f"{setting}: {family} has no module named {', '.join(missing)} ({hint}). Leave {setting} empty "
            f"for the family's usual targets ({', '.join(default)}), or name modules it has.")
    return wanted


def missing_modules(module: nn.Module, names: Sequence[str]) -> list[str]:
    """The `names` that name no module inside `module`, by full path or its tail (peft's matching)."""
    present = {name for name, _ in module.named_modules() if name}
    return [t for t in names if not any(n == t or n.endswith("." + t) for n in present)]


def target_regex(prefix: str, names: Sequence[str]) -> str:
    """A peft `target_modules` regex for `names` under the module path `prefix` ("" = anywhere)."""
    alternatives = "|".join(re.escape(n) for n in names)
    return rf"{re.escape(prefix)}\..*\.({alternatives})" if prefix else rf".*\.({alternatives})"
