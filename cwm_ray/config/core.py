"""Loading: YAML layers and profiles, `key=value` overrides, typed objects (omegaconf structured configs), and
their errors.

Why omegaconf structured configs: they give type checking and "unknown key" errors for free, and the
same dotted override syntax that Hydra users already know. We wrap their exceptions so that the
message names the offending key in plain words."""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import (
    ConfigAttributeError,
    ConfigKeyError,
    InterpolationResolutionError,
    OmegaConfBaseException,
    ValidationError,
)

from cwm_ray.config.annotate import corpus_name
from cwm_ray.config.base import ROOT_KEY, ConfigError, T
from cwm_ray.config.checks import check_ranges


def _format_error(exc: OmegaConfBaseException, source: str) -> str:
    key = getattr(exc, "full_key", None) or getattr(exc, "key", None)
    msg = str(exc).splitlines()[0]
    if isinstance(exc, ConfigKeyError | ConfigAttributeError):
        return f"unknown config key '{key}' (from {source})"
    if isinstance(exc, ValidationError):
        return f"bad value for config key '{key}' (from {source}): {msg}"
    if isinstance(exc, InterpolationResolutionError):
        return f"config key '{key}' (from {source}): {msg}"
    return f"invalid config (from {source}): {msg}"


PROFILE_SECTIONS: dict[str, str] = {
    "AnnotateConfig": "annotate", "TrainIDMConfig": "train_idm", "TrainWorldModelConfig": "train_world_model",
    "ServeConfig": "serve", "EvaluateConfig": "evaluate", "EvaluateIDMConfig": "evaluate_idm",
}
"""A *profile* (configs/real/*.yaml) sets every stage for one model pair in one file: a top-level section per
job, named here; top-level keys starting with `_` hold YAML anchors the sections share. A job given a profile
reads its own section, so the model ids, sizes and prompt are written once for the whole pipeline."""




def read_layer(cls: type, config_file: str | Path) -> DictConfig:
    """One YAML layer for `cls`: the file itself, or the job's section when the file is a profile."""
    path = Path(config_file)
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    try:
        node = OmegaConf.load(path)
    except yaml.MarkedYAMLError as exc:  # a syntax error: where it is and what, not PyYAML's 25-line report
        mark = exc.problem_mark or exc.context_mark
        where = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{where}: invalid YAML: {exc.problem or exc.context}") from None
    except (OmegaConfBaseException, OSError, ValueError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read {path}: {str(exc).splitlines()[0]}") from None
    if not isinstance(node, DictConfig):
        raise ConfigError(f"{path}: a config file must be a YAML mapping")
    stages = [k for k in node if str(k) in PROFILE_SECTIONS.values()]
    if not stages:
        return node
    section = PROFILE_SECTIONS.get(cls.__name__)
    if section not in node:
        raise ConfigError(f"{path} is a profile with sections {', '.join(map(str, stages))}, none for "
                          f"{cls.__name__} (its section is named {section!r})")
    known = (*PROFILE_SECTIONS.values(), ROOT_KEY)
    stray = [str(k) for k in node if str(k) not in known and not str(k).startswith("_")]
    if stray:
        raise ConfigError(f"{path}: unknown profile section(s) {', '.join(stray)}; sections are "
                          f"{', '.join(PROFILE_SECTIONS.values())}, `{ROOT_KEY}` is the storage root, and keys "
                          "starting with _ hold shared anchors")
    layer = node[section] if node[section] is not None else OmegaConf.create({})
    if ROOT_KEY in node and ROOT_KEY not in layer:  # the profile's one root, which its sections' ${root} paths use
        layer[ROOT_KEY] = node[ROOT_KEY]
    return layer


def load(cls: type[T], config_file: str | Path | Sequence[str | Path] | None = None,
         overrides: Sequence[str] = ()) -> T:
    """Build a `cls` from its defaults, then each config file (YAML) in order, then `key=value` overrides.

    Every layer is checked against the dataclass: unknown keys and wrongly typed values raise
    `ConfigError` naming the key. Several files layer left to right (a model profile, then a cluster's
    resource wiring); a profile file contributes its section for `cls` (`PROFILE_SECTIONS`).
    """
    cfg = OmegaConf.structured(cls)
    OmegaConf.set_struct(cfg, True)
    _open_dicts(cfg)
    files = [] if config_file is None else [config_file] if isinstance(config_file, str | Path) else config_file
    for config_path in files:
        layer = read_layer(cls, config_path)
        try:
            cfg = OmegaConf.merge(cfg, layer)
        except OmegaConfBaseException as exc:
            raise ConfigError(_format_error(exc, str(config_path))) from None
    bad = [o for o in overrides if "=" not in o or o.startswith("=")]
    if bad:
        raise ConfigError(f"overrides must look like key=value, got: {' '.join(bad)}")
    for override in expand_shorthands(cls, overrides):
        try:
            layer = OmegaConf.from_dotlist([_quote_string_value(cls, override)])
        except yaml.YAMLError as exc:
            raise ConfigError(f"cannot parse the value of {override!r}: {str(exc).splitlines()[0]}; a value with "
                              f"YAML syntax in it (': ', '[', '{{') must be valid YAML, or quoted") from None
        _check_list_value(cls, override, layer)
        try:
            cfg = OmegaConf.merge(cfg, layer)
        except OmegaConfBaseException as exc:
            raise ConfigError(_format_error(exc, "command line")) from None
    return _to_object(cfg, "command line")


def _to_object(cfg: DictConfig, source: str) -> Any:
    """The typed config, interpolations resolved (`${root}`), then range-checked (`check_ranges`)."""
    if OmegaConf.select(cfg, ROOT_KEY, default="") is None and "${" + ROOT_KEY in str(
            OmegaConf.to_container(cfg, resolve=False)):
        raise ConfigError(f"the config's paths use ${{{ROOT_KEY}}} but {ROOT_KEY} is not set: give "
                          f"{ROOT_KEY}=s3://<bucket>/<prefix> (or an absolute path on shared storage)")
    try:
        obj = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as exc:
        raise ConfigError(_format_error(exc, source)) from None
    check_ranges(obj)
    return obj


def _leaf_type(cls: type, key: str) -> Any:
    """The annotated type of a dotted `key` in dataclass `cls` (list items by index); None when there is none."""
    tp: Any = cls
    for part in key.split("."):
        if part.isdigit() and typing.get_origin(tp) is list:
            tp = typing.get_args(tp)[0]
            continue
        if not dataclasses.is_dataclass(tp):
            return None
        hints = typing.get_type_hints(tp)
        if part not in hints:
            return None
        tp = hints[part]
    return tp


def _is_string_type(tp: Any) -> bool:
    if tp is str:
        return True
    return typing.get_origin(tp) in (typing.Union, types.UnionType) and set(typing.get_args(tp)) == {str, type(None)}


def _quote_string_value(cls: type, override: str) -> str:
    """A string setting takes the text after `=` as it is, so `idm.prompt='a: b'` on the shell is the prompt
    `a: b`, not a YAML mapping (which OmegaConf would make of it). Values the user quoted for YAML, and null,
    keep their YAML meaning; every other type is parsed as YAML as before."""
    key, value = override.split("=", 1)
    if value in ("null", "~") or value[:1] in ("'", '"') or not _is_string_type(_leaf_type(cls, key)):
        return override
    return f"{key}='" + value.replace("'", "''") + "'"


def _check_list_value(cls: type, override: str, layer: DictConfig) -> None:
    """`inputs=PATH` used to fail with OmegaConf's 'AnyNode is not a ListConfig': say what a list setting takes."""
    key = override.split("=", 1)[0]
    if typing.get_origin(_leaf_type(cls, key)) is not list:
        return
    value = OmegaConf.select(layer, key)
    if value is not None and not OmegaConf.is_list(value):
        hint = "; for one corpus write input=PATH" if key == "inputs" else ""
        raise ConfigError(f"bad value for config key '{key}': {override.split('=', 1)[1]!r} is not a list; "
                          f"write {key}=[...]{hint}")


def expand_shorthands(cls: type, overrides: Sequence[str]) -> list[str]:
    """`input=PATH` (for a config with `inputs`): one corpus named after its path, as the README promises; given
    several times, one corpus each. Every other override passes through unchanged."""
    if "inputs" not in {f.name for f in dataclasses.fields(cls)}:
        return list(overrides)
    paths = [o.split("=", 1)[1] for o in overrides if o.startswith("input=")]
    rest = [o for o in overrides if not o.startswith("input=")]
    if not paths:
        return rest
    if any(o.startswith("inputs=") for o in rest):
        raise ConfigError("give either input=PATH or inputs=[...], not both")
    names = [corpus_name(p) for p in paths]
    if len(set(names)) < len(names):
        raise ConfigError(f"input=PATH names each corpus after its path, and two are named alike ({', '.join(names)}):"
                          " give inputs=[{name: A, uri: PATH}, {name: B, uri: PATH}]")

    def q(text: str) -> str:
        return "'" + text.replace("'", "''") + "'"

    corpora = ", ".join(f"{{name: {q(n)}, uri: {q(p)}}}" for n, p in zip(names, paths, strict=True))
    return [f"inputs=[{corpora}]", *rest]


def _open_dicts(node: Any) -> None:
    """Struct mode rejects unknown keys, as it should for dataclass sections, but a `dict[str, ...]` field's
    keys are data (e.g. `train_kind_weights={add: 2}`): leave those nodes open."""
    for key in node:
        child = node._get_node(key)
        if isinstance(child, DictConfig):
            if OmegaConf.get_type(child) is dict:
                OmegaConf.set_struct(child, False)
            else:
                _open_dicts(child)


def to_yaml(cfg: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def from_dict(cls: type[T], values: dict[str, Any] | None, source: str = "arguments",
              config_file: str | Path | None = None) -> T:
    """A typed config from a plain dict (Serve application `args`), with `load`'s checks and errors, laid over
    `config_file` (a YAML or a profile's section) when given."""
    cfg = OmegaConf.structured(cls)
    OmegaConf.set_struct(cfg, True)
    if config_file is not None:
        try:
            cfg = OmegaConf.merge(cfg, read_layer(cls, config_file))
        except OmegaConfBaseException as exc:
            raise ConfigError(_format_error(exc, str(config_file))) from None
    try:
        cfg = OmegaConf.merge(cfg, OmegaConf.create(values or {}))
    except OmegaConfBaseException as exc:
        raise ConfigError(_format_error(exc, source)) from None
    return _to_object(cfg, source)  # type: ignore[no-any-return]
