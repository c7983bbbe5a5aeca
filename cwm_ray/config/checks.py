"""Checks of a whole resolved config: ranges, toy values where they cannot be meant, placeholder storage."""

from __future__ import annotations

import dataclasses
import os
import re
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cwm_ray.config.annotate import FramesConfig
from cwm_ray.config.base import DEFAULT_OUTPUT_ROOT, ROOT_KEY, ConfigError
from cwm_ray.config.models import TOY, IDMConfig, WorldModelConfig
from cwm_ray.config.toy import ToyWorldConfig

OUTPUT_FIELDS = ("output", "storage_path", "export")
"""Settings a job writes results to: relative ones are refused on a joined cluster. (`judge.cache_dir` is not one:
a lost cache costs judge calls again, not results.)"""
DATA_FIELDS = ("uri", "bench", "triplets")
"""Settings a job reads data from: the toy corpus's paths are refused on a cluster or GPUs."""
MIN_REAL_INPUT = {"image_size": 224, "resolution": 256, "max_side": 224}
"""Input sides (px) below which a real model gets a warning: the toy's 64 px leaking into a real profile starves
a 224–448 px vision tower (CLIP, SigLIP, Qwen2-VL's patches) or a 256-px InstructPix2Pix UNet of detail."""


def _leaves(obj: Any, prefix: str = "") -> typing.Iterator[tuple[str, Any, Any, str]]:
    """(dotted key, value, the dataclass holding it, field name) for every setting, into sections and lists."""
    for f in dataclasses.fields(obj):
        value, key = getattr(obj, f.name), prefix + f.name
        if dataclasses.is_dataclass(value):
            yield from _leaves(value, key + ".")
        elif isinstance(value, list) and value and dataclasses.is_dataclass(value[0]):
            for i, item in enumerate(value):
                yield from _leaves(item, f"{key}.{i}.")
        else:
            yield key, value, obj, f.name


AT_LEAST_ONE = ("batch_size", "k_frames", "grid")
"""Counts (rows per model call or per step, motion peaks per video, board cells): 0 or less is never meant, and
used to fail only inside a worker, after the cluster had started."""


def check_ranges(cfg: Any) -> None:
    """Refuse values outside their range when the config is built, so `--print-config` finds them as a run would.

    Why here and not in each `__post_init__`: `batch_size` sits in several sections (`optim`, every stage), and the
    message must name the key as it is written (`idm_stage.batch_size`), which only the walk over the whole config
    knows. Fixed choices (`deepspeed.zero_stage`, `frames.motion`, ...) stay in `__post_init__`, where `--help` reads
    them.
    """
    for key, value, owner, name in _leaves(cfg):
        if name in AT_LEAST_ONE and isinstance(value, int) and value < 1:
            raise ConfigError(f"bad value for config key '{key}': {value}; use 1 or more")
        if name == "best_of" and isinstance(value, int | list):
            widths = value if isinstance(value, list) else [value]
            if not widths or any(not isinstance(n, int) or n < 1 for n in widths):
                raise ConfigError(f"bad value for config key '{key}': {value}; a search width is a whole number, "
                                  "1 or more (1 = one sample, no search)")
        if isinstance(owner, ToyWorldConfig) and name == "image_size" and owner.grid >= 1 and value % owner.grid:
            prefix = key.rsplit(".", 1)[0] + "." if "." in key else ""
            raise ConfigError(f"bad value for config key '{key}': {value} is not a multiple of {prefix}grid="
                              f"{owner.grid} (the board's cells are whole pixels); e.g. {key}="
                              f"{max(1, round(value / owner.grid)) * owner.grid}")


def _is_toy_model(value: Any) -> bool:
    return isinstance(value, str) and (value == TOY or value.startswith(f"{DEFAULT_OUTPUT_ROOT}/models/toy"))


def joined_cluster(environ: typing.Mapping[str, str] | None = None) -> str:
    """Where this process's `ray.init()` would connect, in words; '' when it would start a private Ray.

    `ray.init()` joins `$RAY_ADDRESS`, else the cluster the last `ray start --head` on this machine recorded (Ray's
    bootstrap-address file under $RAY_TMPDIR, default /tmp/ray): a job started beside such a head without
    RAY_ADDRESS joins it too, so the environment alone does not say. Ray's own lookup answers (imported only when
    RAY_ADDRESS is unset: it imports Ray). With `environ` given, only its RAY_ADDRESS counts (tests, callers that
    know).
    """
    source = os.environ if environ is None else environ
    if source.get("RAY_ADDRESS"):
        return f"a joined cluster (RAY_ADDRESS={source['RAY_ADDRESS']})"
    if environ is not None:
        return ""
    from ray._private.services import find_bootstrap_address

    address = find_bootstrap_address(None)
    return f"a running Ray cluster at {address} (started by `ray start`; ray.init() joins it)" if address else ""


def check_toy_values(cfg: Any, environ: typing.Mapping[str, str] | None = None) -> list[str]:
    """Refuse the toy setup's values where they cannot be meant; return warnings for doubtful sizes.

    Where: a job on a cluster it joins (`joined_cluster`: RAY_ADDRESS set, as `ray job submit` sets it, or a
    `ray start --head` on this machine that `ray.init()` would join) or one asking for GPUs (`scaling.use_gpu`, or
    a stage's `num_gpus`). What: a `toy` model (a random tiny one: annotation's `world_model.model` defaults to it,
    so recognition weights would come from a random encoder), the toy corpus (outputs/toy_corpus/...), and on a
    cluster relative output paths, which land in the job's temporary working directory and are deleted with it.
    `allow_toy=true` lets them through. A laptop run (neither) is never touched: `make demo`, `make test` and
    jobs/reproduce.py are the toy setup on purpose.
    """
    gpu = [key for key, value, _, name in _leaves(cfg) if (name == "use_gpu" and value is True)
           or (name == "num_gpus" and isinstance(value, float | int) and value > 0)]
    problems: list[tuple[bool, str]] = []  # (only on a cluster?, what and its fix)
    warnings: list[str] = []
    real_model = any(name == "model" and isinstance(owner, IDMConfig | WorldModelConfig) and not _is_toy_model(value)
                     for _, value, owner, name in _leaves(cfg))
    for key, value, owner, name in _leaves(cfg):
        if name == "model" and isinstance(owner, IDMConfig | WorldModelConfig) and _is_toy_model(value):
            problems.append((False, f"{key}={value} is a toy model (random tiny weights, or trained on the toy "
                                    f"world); set a Hugging Face id or an s3:// path, e.g. --config "
                                    f"configs/real/qwen25vl7b_ip2p.yaml"))
        elif name in DATA_FIELDS and isinstance(value, str) and value.startswith(f"{DEFAULT_OUTPUT_ROOT}/toy_corpus"):
            problems.append((False, f"{key}={value} is the toy corpus; point it at your data (s3:// or a shared path)"))
        elif name in OUTPUT_FIELDS and isinstance(value, str) and "://" not in value and not Path(value).is_absolute():
            problems.append((True, f"{key}={value} is relative, so it lands in the job's temporary working directory "
                                   f"and is lost with it; give an s3:// URI or an absolute path on shared storage"))
        elif name in MIN_REAL_INPUT and isinstance(value, int) and value < MIN_REAL_INPUT[name] and (
                (isinstance(owner, IDMConfig | WorldModelConfig) and not _is_toy_model(owner.model))
                or (isinstance(owner, FramesConfig) and real_model)):
            warnings.append(f"{key}={value} px is below {MIN_REAL_INPUT[name]} px, small for a real model's input "
                            f"(a toy size?); None uses the model's own size (docs/models.md)")
    if not warnings and (not problems or getattr(cfg, "allow_toy", False)):
        return []  # nothing to say wherever it runs: no need to ask Ray (whose import costs a second)
    cluster = joined_cluster(environ)
    if not cluster and not gpu:
        return []
    found = [text for cluster_only, text in problems if cluster or not cluster_only]
    if found and not getattr(cfg, "allow_toy", False):
        where = cluster or f"GPUs ({gpu[0]})"
        raise ConfigError(f"toy values on {where}: " + "; ".join(found) + ". If you mean them, add allow_toy=true")
    return warnings


PLACEHOLDER = re.compile(r"^s3://(your-bucket|my-bucket|bucket|example-bucket)(/|$)|<[^<>]*>")
"""Storage a profile or an example ships with for you to replace: `s3://your-bucket/…` (the profiles' root),
the docs' `s3://my-bucket/…` and `s3://bucket/…`, and `<…>` slots such as `<id|path>`."""
PATH_SETTINGS = (ROOT_KEY, *OUTPUT_FIELDS, *DATA_FIELDS, "model", "adapter")


def find_placeholders(cfg: Any) -> list[str]:
    """`key=value` for every storage or model setting still at a placeholder (`PLACEHOLDER`)."""
    return [f"{key}={value}" for key, value, _, name in _leaves(cfg)
            if name in PATH_SETTINGS and isinstance(value, str) and PLACEHOLDER.search(value)]


def placeholder_message(found: Sequence[str]) -> str:
    """One line: what is a placeholder and how to set it (the root first: it moves every path of a profile)."""
    roots = [f for f in found if f.startswith(f"{ROOT_KEY}=")]
    if roots:
        root = roots[0].split("=", 1)[1]
        rest = [f for f in found if not f.split("=", 1)[1].startswith(root)]  # not those that derive from it
        return (f"{roots[0]} is a placeholder: give your storage root, e.g. {ROOT_KEY}=s3://<bucket>/<prefix> (every "
                f"stage's paths derive from it)" + (f"; also a placeholder: {', '.join(rest)}" if rest else ""))
    return (f"placeholder storage in {', '.join(found)}: replace it with your bucket or model "
            f"(s3://<bucket>/..., a Hugging Face id or a path)")
