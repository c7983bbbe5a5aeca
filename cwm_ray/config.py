"""Typed job configs: one dataclass per job, YAML defaults in `configs/`, `key=value` overrides.

Why omegaconf structured configs: they give type checking and "unknown key" errors for free, and the
same dotted override syntax that Hydra users already know. We wrap their exceptions so that the
message names the offending key in plain words.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import os
import re
import sys
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import (
    ConfigAttributeError,
    ConfigKeyError,
    InterpolationResolutionError,
    OmegaConfBaseException,
    ValidationError,
)

T = TypeVar("T")

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT_ROOT = "outputs"


class ConfigError(ValueError):
    """A config file or override that does not fit the job's typed config."""


def check_choice(key: str, value: str | None, choices: Sequence[str]) -> None:
    """Raise ConfigError unless `value` is one of `choices`.

    Why in `__post_init__`: OmegaConf's `to_object` builds every section through its dataclass, so a typo in
    a string setting is one line naming the key when the config is parsed, not an error row per video or a
    dead worker after Ray has started.
    """
    if value not in choices:
        raise ConfigError(f"bad value for config key '{key}': {value!r}; use one of {', '.join(map(str, choices))}")


@dataclass
class StorageConfig:
    """How to reach s3:// URIs. Local paths need nothing."""

    endpoint_url: str | None = None
    """S3 endpoint override (MinIO, moto, ...). Falls back to $AWS_ENDPOINT_URL(_S3)."""
    region: str | None = None
    """AWS region; falls back to $AWS_DEFAULT_REGION, then us-east-1."""
    retries: int = 5
    """Retry attempts for throttled or failed S3 calls (pyarrow's AWS standard retry strategy)."""


@dataclass
class TrackingConfig:
    """Experiment tracking in MLflow, through Ray's own integration (`ray.air.integrations.mlflow.setup_mlflow`):
    a run per job with the resolved config as its parameters, then its metrics (training: every `log_every` steps,
    on the rank-0 worker; evaluation: the summary table)."""

    enabled: bool = True
    """false = metrics only in the log and the job's own files."""
    uri: str | None = None
    """MLflow tracking URI: a tracking server (http://host:5000), `databricks`, or a directory for a local file
    store. None = $MLFLOW_TRACKING_URI, else outputs/mlruns (`mlflow ui --backend-store-uri outputs/mlruns`). On a
    cluster use a server or a directory every node shares: a worker node's disk goes with the node."""
    experiment: str = "cwm_ray"
    """MLflow experiment name (created when missing); each job's run is named after `train.name` or its output."""


@dataclass
class ToyWorldConfig:
    """The procedural world: what scenes look like and how actions animate."""

    image_size: int = 64
    """Frame side in pixels; must be a multiple of `grid`."""
    grid: int = 8
    """Objects sit on a grid x grid board of cells; one object per cell."""
    min_objects: int = 2
    max_objects: int = 4
    move_cells: int = 2
    """How far "move the X left" moves an object, in cells."""
    actions: list[str] = field(
        default_factory=lambda: ["move", "remove", "add", "recolor", "put"]
    )
    """Action kinds to sample; see cwm_ray.toyworld.actions.KINDS."""
    frames_per_action: int = 10
    """Length of each action's animation in video frames."""
    idle_frames_min: int = 12
    idle_frames_max: int = 24
    """Still frames between actions (uniform in [min, max]); keeps actions apart for frame choice."""
    fps: int = 10


@dataclass
class ToyCorpusConfig:
    """`jobs/make_toy_corpus.py`: unlabelled videos with a ground-truth sidecar, plus gold triplets."""

    output: str = f"{DEFAULT_OUTPUT_ROOT}/toy_corpus"
    """Local directory or s3:// prefix to write to."""
    seed: int = 0
    num_videos: int = 48
    actions_per_video: int = 8
    num_train: int = 2000
    """Gold training triplets (AURORA format, `instruction` key)."""
    num_test: int = 300
    """Held-out test triplets on scenes never seen in training (AURORA-Bench format, `prompt` key)."""
    crf: int = 18
    """H.264 constant rate factor of the videos (lower = higher quality)."""
    pix_fmt: str = "yuv444p"
    """H.264 pixel format. yuv420p (what most corpora use) halves the chroma resolution, and a toy object is
    only 8 pixels wide: its colour bleeds into its neighbours, and the toy IDM (trained on renders) explained
    91 % of rendered test pairs but 40 % of the same pairs through yuv420p; 91 % through yuv444p."""
    gold_from_video: bool = False
    """Decode gold frames from an H.264 clip of the action (as a labelled video corpus gives them) instead of
    writing lossless renders. Off by default: with yuv444p the codec no longer hurts the toy IDM, and trained
    on codec frames it explained 83 % of test pairs against 91 % trained on renders (one run each)."""
    train_kind_weights: dict[str, float] = field(default_factory=dict)
    """Relative odds of each action kind in the gold *training* set (kinds left out weigh 1; empty = uniform).
    The test set and the videos stay uniform, so accuracy figures compare across settings."""
    world: ToyWorldConfig = field(default_factory=ToyWorldConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    allow_toy: bool = False
    """Let a run on a joined cluster (RAY_ADDRESS set) or on GPUs use toy values: a `toy` model, the toy corpus
    (outputs/toy_corpus/...), relative output paths. Off, `check_toy_values` refuses them there: a random model, or
    outputs lost with the job's temporary working directory, is never what a cluster run means."""


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


ROOT_KEY = "root"
"""A profile's top-level storage root: each section gets it as its own `root` setting, so `${root}` in a section
resolves against the job's config, and `root=...` on the command line (or in Serve's args) moves every path."""


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


def corpus_name(uri: str) -> str:
    """A corpus's name from its URI: the last path part that is not a glob, without its extension
    (`s3://b/ego/` → `ego`, `/data/web.jsonl` → `web`, `/data/shards/*.tar` → `shards`)."""
    parts = [p for p in uri.replace("\\", "/").split("/") if p and not p.endswith(":")]
    while parts and any(c in parts[-1] for c in "*?["):
        parts.pop()
    name = Path(parts[-1]).stem if parts else ""
    if not name:
        raise ConfigError(f"cannot name a corpus after {uri!r}: give inputs=[{{name: NAME, uri: {uri}}}]")
    return name


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


USAGE = """usage: {prog} [--config FILE]... [--print-config] [--help] [key=value ...]

  --config FILE    a YAML layer over the defaults; repeat it to layer several in order (a model profile from
                   configs/real/, then a cluster's wiring from configs/cluster/). Without it the job's toy YAML
                   ({default}) is the only layer.
  --print-config   print the resolved config and exit, starting nothing
  --help           this text, then every setting resolved from the same --config files and overrides, with its
                   description
  key=value        set any setting below (nested keys with dots; lists and mappings in YAML: 'k=[a, b]');
                   a text setting takes the text as written: 'idm.prompt=a: b' is the prompt `a: b`{extra}"""


def parse_cli(cls: type[T], argv: Sequence[str] | None = None, default_config: str | None = None) -> T:
    """`[--config FILE ...] [--print-config] [--help] [key=value ...]` → config. Prints the resolved config, as every
    job does, so a job's log starts with exactly what it ran.

    `default_config` (relative to the repository root) is used only when no `--config` is given, so a job
    run with no arguments uses the embedded toy setup, and the toy sizes in it never leak under a real profile.
    Several `--config` files layer in the order given. `--help` and `--print-config` resolve the same layers and
    exit 0; every error is a `ConfigError` (one line, exit 2 through `run_job`).
    """
    args = list(sys.argv[1:] if argv is None else argv)
    config_files: list[str | Path] = []
    rest: list[str] = []
    want_help = want_print = False
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--config":
            if i + 1 >= len(args):
                raise ConfigError("--config needs a file")
            config_files.append(args[i + 1])
            i += 2
            continue
        if arg.startswith("--config="):
            config_files.append(arg.split("=", 1)[1])
        elif arg in ("-h", "--help"):
            want_help = True
        elif arg == "--print-config":
            want_print = True
        elif arg.startswith("-") and "=" not in arg:
            raise ConfigError(f"unknown option {arg}; options are --config FILE, --print-config and --help, "
                              "and settings are key=value")
        else:
            rest.append(arg)
        i += 1
    if not config_files and (default := _default_path(default_config)) is not None:
        config_files = [default]
    cfg = load(cls, config_files, rest)
    source = f" (from {', '.join(map(str, config_files))})" if config_files else ""
    if want_help:
        extra = "\n  input=PATH       one corpus, named after its path (for inputs=[{name, uri}])" \
            if "inputs" in {f.name for f in dataclasses.fields(cls)} else ""  # type: ignore[arg-type]
        print(USAGE.format(prog=Path(sys.argv[0]).name if argv is None else "job", extra=extra,
                           default=default_config or "none"))
        try:
            print(f"\n# {cls.__name__}: {_class_doc(cls)}\n# resolved{source}\n")
            print(describe(cfg), flush=True)
        except BrokenPipeError:  # `--help | head`: the reader has all it wanted
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (the interpreter flushes it at exit)
        raise SystemExit(0)
    print(f"# resolved {cls.__name__}{source}")
    print(to_yaml(cfg), flush=True)
    if want_print:  # a planned run is checked as it would start: toy values are refused here too
        for warning in check_toy_values(cfg):
            print(f"warning: {warning}", file=sys.stderr, flush=True)
        if found := find_placeholders(cfg):  # a warning here, so a profile can be read before it has a bucket
            print(f"warning: {placeholder_message(found)}; a run stops here", file=sys.stderr, flush=True)
        raise SystemExit(0)
    return cfg


@functools.cache
def _source_docs() -> tuple[dict[str, str], dict[str, dict[str, str]], dict[str, dict[str, tuple[Any, ...]]]]:
    """Class docstrings, field docstrings and fixed choices, read from this file's source.

    Why `ast`: a field's description is the string literal under it (the torchtitan convention), which Python
    keeps nowhere at run time; and the choices are the `check_choice` calls in `__post_init__`, so `--help` shows
    the same lists the validation enforces.
    """
    tree = ast.parse(Path(__file__).read_text())
    class_docs: dict[str, str] = {}
    docs: dict[str, dict[str, str]] = {}
    choices: dict[str, dict[str, tuple[Any, ...]]] = {}
    for node in tree.body:
        if not isinstance(node, ast.ClassDef):
            continue
        class_docs[node.name] = ast.get_docstring(node) or ""
        fields = docs.setdefault(node.name, {})
        for a, b in zip(node.body, node.body[1:], strict=False):
            if isinstance(a, ast.AnnAssign) and isinstance(a.target, ast.Name) and isinstance(b, ast.Expr) \
                    and isinstance(b.value, ast.Constant) and isinstance(b.value.value, str):
                fields[a.target.id] = inspect.cleandoc(b.value.value)
        for call in ast.walk(node):
            if isinstance(call, ast.Call) and getattr(call.func, "id", None) == "check_choice" \
                    and len(call.args) == 3 and isinstance(call.args[1], ast.Attribute):
                options = call.args[2]
                value = globals().get(options.id) if isinstance(options, ast.Name) else ast.literal_eval(options)
                choices.setdefault(node.name, {})[call.args[1].attr] = tuple(value or ())
    return class_docs, docs, choices


def _class_doc(cls: type) -> str:
    return _source_docs()[0].get(cls.__name__, "").split("\n\n")[0].replace("\n", " ")


def _flow(value: Any) -> str:
    """A value as it is written after `key=` (YAML flow style)."""
    if dataclasses.is_dataclass(value) or (isinstance(value, list) and value and dataclasses.is_dataclass(value[0])):
        value = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else [dataclasses.asdict(v) for v in value]
    text = yaml.safe_dump(value, default_flow_style=True, width=10**9, sort_keys=False, allow_unicode=True)
    return text.removesuffix("\n...\n").strip()


def describe(cfg: Any) -> str:
    """Every setting of a resolved config as `key=value`, with its choices and its description beneath."""
    _, docs, choices = _source_docs()
    lines: list[str] = []

    def walk(obj: Any, prefix: str) -> None:
        owner = type(obj).__name__
        for f in dataclasses.fields(obj):
            value, key = getattr(obj, f.name), prefix + f.name
            doc = docs.get(owner, {}).get(f.name, "")
            if dataclasses.is_dataclass(value):
                lines.append(f"\n# {key}: {doc or _class_doc(type(value))}".rstrip())
                walk(value, key + ".")
                continue
            line = f"{key}={_flow(value)}"
            if f.name in choices.get(owner, {}):
                line += f"    (one of: {', '.join(map(str, choices[owner][f.name]))})"
            lines.append(line)
            lines.extend("      " + d for d in doc.splitlines())

    walk(cfg, "")
    return "\n".join(lines)


def _default_path(default_config: str | None) -> Path | None:
    if default_config is None:
        return None
    path = REPO_ROOT / default_config
    return path if path.exists() else None


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


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


@dataclass
class ScalingSection:
    """Maps onto Ray Train's ScalingConfig."""

    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    """CPUs Ray reserves per worker. Keep some free for Ray Data, which feeds the workers."""
    torch_threads: int = 0
    """Torch threads per worker; 0 = this node's cores / workers (Ray would otherwise give it
    `cpus_per_worker` threads, which starves a CPU run)."""
    gpus_per_worker: float = 1.0
    """Used only with use_gpu."""


@dataclass
class DeepSpeedSection:
    enabled: bool = True
    zero_stage: int = 2
    """ZeRO stage 0, 1 or 2 (stage 3 shards parameters, which our export does not gather)."""
    bf16: bool = True
    """bf16 mixed precision; only applied on GPU (CPU trains in fp32 with gloo unless `bf16_cpu`)."""
    bf16_cpu: bool = False
    """On CPU, run the forward pass under torch's bf16 autocast (weights, gradients, all-reduce and AdamW stay
    fp32), as transformers' Trainer does for `bf16=True` on CPU. Pays off on CPUs with AVX512-BF16 or AMX."""
    gradient_clipping: float = 1.0
    """Max global gradient norm (0 = none); also applied when `enabled` is false (DDP)."""

    def __post_init__(self) -> None:
        check_choice("deepspeed.zero_stage", self.zero_stage, (0, 1, 2))


@dataclass
class DataSource:
    """One training source: an AURORA-format JSON (gold) or a Parquet directory of triplets."""

    uri: str = ""
    weight: float = 1.0
    """Sampling weight: the source is repeated (>1) or subsampled (<1) by this factor per epoch."""


@dataclass
class DataSection:
    sources: list[DataSource] = field(
        default_factory=lambda: [DataSource(uri="outputs/toy_corpus/gold/train.json")]
    )
    val_fraction: float = 0.05
    """Share of each source held out (deterministically, by id) for the validation loss."""
    max_rows: int | None = None
    """Cap per source, for quick runs."""
    shuffle_buffer: int = 1024
    materialize: bool = False
    """Read the training and validation sets once into Ray's object store (`Dataset.materialize`) instead of
    on every epoch: for sets that fit in memory, such as the toy gold set; not for streamed corpora."""


@dataclass
class OptimSection:
    lr: float = 1e-3
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    """AdamW's second-moment decay (transformers' `TrainingArguments` name and default). The toy IDM uses
    0.95, as LLaMA and GPT-3 pre-training do: with 0.999 its late tokens (the relation word) learn slowly."""
    adam_epsilon: float = 1e-8
    warmup_steps: int = 20
    batch_size: int = 32
    """Per-worker micro-batch size: the rows one forward pass holds, a cluster wiring's choice (GPU memory)."""
    global_batch_size: int | None = None
    """Rows per optimizer step, summed over workers: the recipe's (the paper: 64 for the IDM, 96 for the world
    model). Each worker accumulates gradients over global_batch_size / (scaling.num_workers × batch_size)
    micro-batches (DeepSpeed's `gradient_accumulation_steps`, or DDP's `no_sync`), so a wiring with more or fewer
    workers changes the speed, never the recipe; it must divide evenly. None = num_workers × batch_size, no
    accumulation (the toy configs)."""
    epochs: float | None = None
    """Passes over the training set. Set, it derives `max_steps` = ceil(epochs × training rows / global batch),
    the rows counted in the driver before training starts (gold items and Parquet ids, each source times its
    weight, without reading an image), and `max_steps` must be null. The real profiles set it (the paper's 10
    for the IDM, 40 for the world model), since their data size is not known when the profile is written."""
    max_steps: int | None = 1000
    """Total optimizer steps, or null with `epochs`; a resumed run continues to exactly this count."""
    schedule: str = "cosine"
    """Learning rate after warm-up: `cosine` (decays to 0 at max_steps) or `constant`."""
    seed: int = 0

    def __post_init__(self) -> None:
        check_choice("optim.schedule", self.schedule, ("cosine", "constant"))  # cwm_ray.train.SCHEDULES
        if (self.epochs is None) == (self.max_steps is None):
            raise ConfigError("set exactly one of optim.epochs and optim.max_steps (the other null): got "
                              f"epochs={self.epochs}, max_steps={self.max_steps}")
        for key in ("epochs", "max_steps", "batch_size", "global_batch_size"):
            value = getattr(self, key)
            if value is not None and value <= 0:
                least = "a positive number" if key == "epochs" else "1 or more"  # epochs may be fractional
                raise ConfigError(f"bad value for config key 'optim.{key}': {value}; use {least}")


def accumulation_steps(optim: OptimSection, scaling: ScalingSection) -> int:
    """Micro-batches each worker accumulates per optimizer step, so the global batch is `optim.global_batch_size`
    whatever the worker count; a ConfigError naming both ways out when it does not divide evenly."""
    per_step = scaling.num_workers * optim.batch_size
    if optim.global_batch_size is None:
        return 1
    steps, rest = divmod(optim.global_batch_size, per_step)
    if rest or steps < 1:
        fits = [b for b in range(1, optim.batch_size + 1)
                if optim.global_batch_size % (scaling.num_workers * b) == 0]
        hint = f"optim.batch_size={fits[-1]}" if fits else f"a worker count that divides {optim.global_batch_size}"
        raise ConfigError(
            f"optim.global_batch_size={optim.global_batch_size} is not a whole number of micro-batches of "
            f"scaling.num_workers={scaling.num_workers} x optim.batch_size={optim.batch_size} = {per_step}: "
            f"use {hint}, or change the global batch (the recipe) on purpose")
    return steps


@dataclass
class TrainSection:
    name: str = "toy"
    """Run name: a re-run with the same name and storage_path resumes from its latest checkpoint."""
    storage_path: str = "outputs/runs"
    """Local directory or s3:// prefix for Ray Train's checkpoints."""
    export: str = "outputs/models/toy"
    """Where the final model directory goes (local or s3://), loadable by path."""
    overwrite_export: bool = False
    """Let the export replace a model directory of another kind (an IDM, the other world-model backend, or one
    whose kind cannot be told). Off, that is an error before training starts: a trained model is never lost to
    a run that was meant to write elsewhere. Replacing a model of the same kind needs no setting."""
    log_every: int = 25
    eval_every: int = 250
    checkpoint_every: int = 250
    num_to_keep: int = 2
    max_failures: int = 2
    """Worker failures survived by restarting from the latest checkpoint."""
    fail_at_step: int | None = None
    """Fault injection for tests: the rank-0 worker stalls 5 s, then its process dies, at this step of its
    first attempt (the 5 s let Ray Train register the checkpoint reported just before)."""


@dataclass
class TrainIDMConfig:
    """`jobs/train_idm.py`: fine-tune (or, for `toy`, train from scratch) the IDM on triplets."""

    root: str | None = None
    """The storage root of a model profile (configs/real/): its sections write every path as `${root}/…`, so each
    stage reads what the one before it wrote. Set it once per run (`root=s3://<bucket>/<prefix>`); a placeholder
    bucket (s3://your-bucket/…) is refused before anything starts. Unused (None) by the toy YAMLs."""
    idm: IDMConfig = field(default_factory=lambda: IDMConfig(model=TOY))
    train: TrainSection = field(
        default_factory=lambda: TrainSection(name="toy_idm", export="outputs/models/toy_idm")
    )
    optim: OptimSection = field(default_factory=OptimSection)
    data: DataSection = field(default_factory=DataSection)
    scaling: ScalingSection = field(default_factory=ScalingSection)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    storage: StorageConfig = field(default_factory=StorageConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    allow_toy: bool = False
    """Let a run on a joined cluster (RAY_ADDRESS set) or on GPUs use toy values: a `toy` model, the toy corpus
    (outputs/toy_corpus/...), relative output paths. Off, `check_toy_values` refuses them there: a random model, or
    outputs lost with the job's temporary working directory, is never what a cluster run means."""

    def __post_init__(self) -> None:
        if self.idm.lora_export == "adapter" and not self.idm.lora.enabled:
            raise ConfigError("idm.lora_export=adapter exports a LoRA adapter, but idm.lora.enabled is false (all "
                              "weights train): set idm.lora.enabled=true, or idm.lora_export=merged")
        accumulation_steps(self.optim, self.scaling)


@dataclass
class TrainWorldModelConfig:
    """`jobs/train_world_model.py`: the world model with the recognition-weighted loss."""

    root: str | None = None
    """The storage root of a model profile (configs/real/): its sections write every path as `${root}/…`, so each
    stage reads what the one before it wrote. Set it once per run (`root=s3://<bucket>/<prefix>`); a placeholder
    bucket (s3://your-bucket/…) is refused before anything starts. Unused (None) by the toy YAMLs."""
    world_model: WorldModelConfig = field(default_factory=lambda: WorldModelConfig(model=TOY))
    recognition: RecognitionConfig = field(default_factory=RecognitionConfig)
    train: TrainSection = field(
        default_factory=lambda: TrainSection(name="toy_world_model", export="outputs/models/toy_world_model")
    )
    """`train.name` and `train.export` left at the diffusion toy's (`toy_world_model`) become the backend's own
    (`toy_token_world_model` for `token`, as configs/train_token_world_model.yaml sets): else switching the backend
    would resume the other backend's run and replace its model."""
    optim: OptimSection = field(default_factory=OptimSection)
    data: DataSection = field(default_factory=DataSection)
    scaling: ScalingSection = field(default_factory=ScalingSection)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    storage: StorageConfig = field(default_factory=StorageConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    allow_toy: bool = False
    """Let a run on a joined cluster (RAY_ADDRESS set) or on GPUs use toy values: a `toy` model, the toy corpus
    (outputs/toy_corpus/...), relative output paths. Off, `check_toy_values` refuses them there: a random model, or
    outputs lost with the job's temporary working directory, is never what a cluster run means."""

    def __post_init__(self) -> None:
        accumulation_steps(self.optim, self.scaling)
        backend = self.world_model.backend
        if backend != "diffusion":
            for key, default in (("name", "toy_world_model"), ("export", "outputs/models/toy_world_model")):
                if getattr(self.train, key) == default:
                    setattr(self.train, key, default.replace("toy_world_model", f"toy_{backend}_world_model"))


# ---------------------------------------------------------------------------------------------
# Annotation
# ---------------------------------------------------------------------------------------------


@dataclass
class FramesConfig:
    """Decoding and frame choice (the paper: top K_f = 6 frames by optical flow, at least I_f = 20 apart)."""

    motion_size: int = 64
    """Motion is measured on frames downscaled so their longer side is this many pixels. Farneback flow is most of
    the CPU a pair costs and grows with the pixels: on 224-px H.264 (the toy world at a VLM's input size, clean and
    with sensor noise) a 64-px copy chose pairs that show one whole action as often as a 128-px one (70/70 and
    71/71 against 65/65 and 67/67) at a quarter of the flow's cost (docs/benchmarks.md, decode CPU)."""
    max_side: int = 512
    """Stored frames keep the source resolution, downscaled only so their longer side is at most this (the
    IDM and the world model resize to their own input sizes later). The toy configs set 64."""
    motion: str = "farneback"
    """`farneback` (OpenCV dense optical flow magnitude) or `diff` (mean absolute frame difference, cheaper)."""
    k_frames: int = 6
    """K_f: motion peaks kept per video (non-maximum suppression, highest first)."""
    min_spacing: int = 20
    """I_f: kept peaks are at least this many frames apart."""
    pairing: str = "bracket"
    """`bracket`: each peak gives the pair (last still frame before it, first still frame after it), so a
    pair spans one movement; `consecutive`: consecutive kept peaks form pairs, the paper's rule."""
    max_span: int = 20
    """`bracket` looks at most this many frames either side of a peak."""
    quiet: float = 0.05
    """`bracket`: motion below this fraction of the peak counts as still."""
    still_frames: int = 2
    """`bracket`: the motion must stay still this many frames in a row to end a bracket (1: the first still
    frame ends it). 2 bridges one repeated frame inside an action, e.g. a frame the encoder skipped in a
    slow fade, which otherwise cut the pair short mid-action."""
    min_motion: float = 0.005
    """Peaks with less motion than this (mean flow in pixels, or mean |difference| in 0–255) are ignored;
    a fading toy object moves ~0.01 flow pixels per frame at 64 px, camera noise much less."""
    min_frames: int = 8
    """Videos with fewer decodable frames are an error row ("too short")."""
    max_frames: int = 100_000
    """Decoding stops after this many frames (guards against endless streams)."""
    image_format: str = "PNG"
    """Encoding of the stored frames: PNG or JPEG."""
    decode_threads: int = 1
    """FFmpeg threads decoding each video; 0 = FFmpeg's choice (one per core). Decode tasks already run one video
    each, in parallel, so 1 spends the least CPU per frame (224-px H.264: 0.08 ms a frame against 0.17 with
    FFmpeg's threads, docs/benchmarks.md); more helps only a machine with cores to spare and few videos."""
    shot_cuts: bool = True
    """Detect hard cuts (PySceneDetect's ContentDetector on the frames already decoded): a cut is never a motion
    peak, and no pair spans one, since a pair across a cut shows two scenes, not an action."""
    cut_threshold: float = 27.0
    """ContentDetector's threshold (its default): the mean change of hue, saturation and value (0-255) between
    two frames, at `motion_size`, at or above which the second frame starts a new shot."""

    def __post_init__(self) -> None:
        check_choice("frames.motion", self.motion, ("farneback", "diff"))
        check_choice("frames.pairing", self.pairing, ("bracket", "consecutive"))
        check_choice("frames.image_format", self.image_format, ("PNG", "JPEG", "png", "jpeg"))


@dataclass
class FilterConfig:
    """The stratified top-K filter (paper §Strategy 1): per corpus, round-robin over action classes."""

    budget: int = 7000
    """Triplets kept per corpus (the paper: 7K per source dataset)."""
    score: str = "sum"
    """Rank by the IDM's `sum` log-likelihood or its per-token `mean`."""
    class_rule: str = "verb_phrase"
    """`verb_phrase`: the first word plus `keep_words` in order ("put the cup on the table" → "put on");
    `first_word`; or `full` (the whole action text)."""
    keep_words: list[str] = field(default_factory=lambda: [
        "up", "down", "left", "right", "in", "into", "on", "onto", "off", "out", "over", "under", "above",
        "below", "behind", "next", "to", "from", "of", "away", "back", "open", "close", "closed",
    ])

    def __post_init__(self) -> None:
        check_choice("filter.score", self.score, ("sum", "mean"))
        check_choice("filter.class_rule", self.class_rule, ("verb_phrase", "first_word", "full"))


@dataclass
class CorpusInput:
    """One named corpus; the triplet budget applies per corpus, as in the paper."""

    name: str = ""
    """The corpus's name in the outputs and the budget; empty = taken from `uri` (`corpus_name`), so an
    unnamed input is never silently called `toy`."""
    uri: str = "outputs/toy_corpus/videos"
    """A directory, a glob (`videos/*.mp4`), a manifest (.csv / .jsonl / .parquet with a `video_uri`
    column and an optional `dataset` column), an s3:// prefix, or webdataset .tar shards of videos."""

    def __post_init__(self) -> None:
        self.name = self.name or corpus_name(self.uri)


@dataclass
class StageResources:
    """Ray Data resources of one pipeline stage."""

    concurrency: int = 1
    """Actor pool size (model stages) or max parallel tasks (CPU stages, 0 = Ray's default)."""
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    batch_size: int = 32
    torch_threads: int = 0
    """Torch threads in each actor; 0 = num_cpus (Ray's default), at least 1."""
    max_tasks_in_flight_per_actor: int = 2
    """Model stages: batches Ray Data hands each actor before it finishes one (Ray's
    `ActorPoolStrategy(max_tasks_in_flight_per_actor=…)`). 2 = the batch the model is on plus the next, whose
    rows are fetched to the actor while the model runs, so a GPU never waits on the transfer; more only queues
    batches behind a busy actor while another may sit idle at the end of the run."""


@dataclass
class DecodeResources(StageResources):
    """The decode stage: Ray Data tasks, one video each (read, decode, motion, cuts, frame choice, PNG)."""

    concurrency: int | str = 0
    """Most decode tasks at once: 0 = Ray's default (as many as free CPUs fit), a number, or `auto`: sized from
    measured costs so decoding keeps every IDM actor fed and no more, ceil(`headroom` x IDM actors x decode
    seconds per pair / IDM seconds per pair) tasks (docs/annotation.md, "Sizing the decode pool")."""
    pair_seconds: float | None = None
    """`auto`: one decode task's seconds per pair; None = measured in the driver on the first two videos to do
    (CPU seconds of one thread: a decode task's)."""
    idm_pair_seconds: float | None = None
    """`auto`: one IDM actor's seconds per pair; None = the last run's in this output (summary.json
    `stages.idm`, the StageClock's seconds inside the model per pair), else unknown: Ray's default this run."""
    headroom: float = 1.5
    """`auto`: decode capacity over the IDM's need, for videos that cost more than the sample and reads that
    wait on storage."""

    def __post_init__(self) -> None:
        if isinstance(self.concurrency, str) and self.concurrency != "auto":
            raise ConfigError(f"bad value for config key 'decode.concurrency': {self.concurrency!r}; use a number "
                              "of tasks, 0 for Ray's default, or auto")


@dataclass
class AnnotateConfig:
    """`jobs/annotate.py`: videos → IDM-labelled, recognition-weighted, stratified triplets (Parquet)."""

    root: str | None = None
    """The storage root of a model profile (configs/real/): its sections write every path as `${root}/…`, so each
    stage reads what the one before it wrote. Set it once per run (`root=s3://<bucket>/<prefix>`); a placeholder
    bucket (s3://your-bucket/…) is refused before anything starts. Unused (None) by the toy YAMLs."""
    inputs: list[CorpusInput] = field(default_factory=lambda: [CorpusInput(name="toy")])
    """The corpora, each `{name, uri}`; on the command line `input=PATH` is one corpus named after its path."""
    output: str = f"{DEFAULT_OUTPUT_ROOT}/annotated"
    """Local directory or s3:// prefix; re-running into the same output resumes."""
    video_extensions: list[str] = field(default_factory=lambda: [".mp4", ".avi", ".mov", ".mkv", ".webm"])
    frames: FramesConfig = field(default_factory=FramesConfig)
    idm: IDMConfig = field(default_factory=IDMConfig)
    world_model: WorldModelConfig = field(default_factory=lambda: WorldModelConfig(model=TOY))
    """Only its encoder is used, for recognition weights: the base checkpoint's (frozen) encoder."""
    recognition: RecognitionConfig = field(default_factory=RecognitionConfig)
    """Maps stored with each triplet (`weights`), which a weighted world-model run then uses as stored; with
    `enabled` false the recognition stage does not run and no map is stored (a weighted run computes its own)."""
    filter: FilterConfig = field(default_factory=FilterConfig)
    decode: DecodeResources = field(default_factory=lambda: DecodeResources(concurrency=0, num_cpus=0.5))
    """CPU tasks, one video each. Fractional CPUs so decode tasks run beside the actors on small machines."""
    idm_stage: StageResources = field(default_factory=lambda: StageResources(concurrency=1, batch_size=32))
    recognition_stage: StageResources = field(default_factory=lambda: StageResources(
        concurrency=1, num_cpus=0.25, batch_size=64, torch_threads=1))
    """The encoder pass is cheap next to the IDM's generation; give it a sliver of a CPU (or of a GPU)."""
    full_batches: bool = True
    """Re-block the decoded pairs into blocks of exactly `idm_stage.batch_size` rows before the IDM (Ray Data's
    strict streaming repartition), so every model call but the last gets a full batch. One video's pairs are one
    block; without it an IDM task took whole blocks up to a batch and called the model with a batch and then a
    remainder (59 calls for 554 pairs at batch 16), and a GPU call of 2 pairs costs nearly one of 16."""
    op_resource_reservation: bool = True
    """Ray Data's per-operator resource reservation (`DataContext.op_resource_reservation_enabled`, on by
    default in Ray), set on the pipeline's dataset only. It keeps a share of the cluster for each operator; on
    a small node whose model actors hold most CPUs, the decode tasks' share is a quarter CPU, so one video
    decodes at a time and the IDM waits (2 CPUs: IDM busy 0.50 of the steady time with it, 0.83 without;
    docs/benchmarks.md). Large clusters can keep Ray's default."""
    export_aurora: bool = True
    """Also write triplets as AURORA-format `aurora/train.json` + PNGs, which the trainers read."""
    storage: StorageConfig = field(default_factory=StorageConfig)
    read_attempts: int = 3
    """Reads of a video (or a staging file) before a transient failure (storage, network) is given up for this run,
    with exponential backoff from `retry_backoff_s`; each read already has `storage.retries` S3 attempts. A video
    still failing becomes a transient error row, which the next run retries; a staging file fails the run."""
    retry_backoff_s: float = 1.0
    fail_once_in: str | None = None
    """Fault injection (tests, bench/): `idm` kills the IDM actor's process once, mid-run."""
    allow_toy: bool = False
    """Let a run on a joined cluster (RAY_ADDRESS set) or on GPUs use toy values: a `toy` model, the toy corpus
    (outputs/toy_corpus/...), relative output paths. Off, `check_toy_values` refuses them there: a random model, or
    outputs lost with the job's temporary working directory, is never what a cluster run means."""

    def __post_init__(self) -> None:
        check_choice("fail_once_in", self.fail_once_in, (None, "idm"))


# ---------------------------------------------------------------------------------------------
# Serving
# ---------------------------------------------------------------------------------------------


@dataclass
class ServeLimits:
    """Per-request limits: a request beyond one is a 4xx naming the parameter, never work for a replica."""

    max_image_bytes: int = 4 * 1024 * 1024
    """Upload size of one image (multipart file or base64-decoded JSON field)."""
    max_pixels: int = 1024 * 1024
    """Width × height of an uploaded image and of a requested output `size`."""
    max_n: int = 8
    """Images returned per request (OpenAI's `n`)."""
    max_best_of: int = 16
    """Candidates sampled and verified per request: the search width of best-of-N."""
    max_prompt_chars: int = 1000
    max_rollout_actions: int = 16


@dataclass
class ServeConfig:
    """The `args` of the Serve application (`applications[].args` in configs/serve.yaml).

    Replicas, autoscaling, `num_gpus` and `@serve.batch` sizes are not here: they are Ray Serve's own
    per-deployment settings (`deployments:` with `user_config`), in the same file.
    """

    root: str | None = None
    """The storage root of a model profile (configs/real/): its sections write every path as `${root}/…`, so each
    stage reads what the one before it wrote. Set it once per run (`root=s3://<bucket>/<prefix>`); a placeholder
    bucket (s3://your-bucket/…) is refused before anything starts. Unused (None) by the toy YAMLs."""
    world_model: WorldModelConfig = field(default_factory=WorldModelConfig)
    idm: IDMConfig = field(default_factory=IDMConfig)
    """The verifier: best-of-N keeps the candidate under which the IDM finds the action most likely."""
    served_model_name: str = "cwm-world-model"
    """The model id clients see (`GET /v1/models`, OpenAI's `model` field)."""
    best_of: int = 4
    """Default search width when a request gives none (at least the request's `n`)."""
    api_keys_env: str = "CWM_API_KEYS"
    """Environment variable with comma-separated bearer keys; unset or empty = open: a warning is logged, and on a
    non-loopback host the app refuses to start unless `allow_open_endpoint`."""
    retries: int = 2
    """Times the ingress re-sends a call whose replica died (sampling is seeded, so a retry is identical)."""
    allow_open_endpoint: bool = False
    """Serve with no API keys on a non-loopback host (`http_options.host`, e.g. 0.0.0.0). Off, `build_app` refuses
    to start such an app: anyone who can reach the node could then run the GPUs."""
    limits: ServeLimits = field(default_factory=ServeLimits)
    storage: StorageConfig = field(default_factory=StorageConfig)


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


def serve_config(args: dict[str, Any] | None) -> ServeConfig:
    """The Serve application's `args` as a typed ServeConfig; `profile: PATH` lays them over a model profile's
    `serve` section (configs/real/), so the pair's models, sizes and sampling are written once for every stage, and
    `root:` moves its paths as on a job's command line. Here, not in cwm_ray.serve.app, so that a dry run of the
    args (`python -m cwm_ray.serve --print-config`) needs neither Ray Serve nor torch."""
    args = dict(args or {})
    profile = args.pop("profile", None)
    if profile is not None and not Path(profile).exists() and (REPO_ROOT / profile).exists():
        profile = str(REPO_ROOT / profile)  # a path relative to the repository, wherever `serve` runs
    return from_dict(ServeConfig, args, source="serve application args", config_file=profile)


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------


@dataclass
class MetricsConfig:
    """Automatic metrics. Copying the source wins L1 / CLIP-I / DINO, so they are reported, never trusted alone."""

    l1: bool = True
    """Mean absolute pixel difference to the reference (0 = identical), at the reference's size."""
    clip_model: str | None = None
    """CLIP-I: cosine of CLIP image embeddings, by Hugging Face id or path (e.g. openai/clip-vit-base-patch32)."""
    dino_model: str | None = None
    """DINO: cosine of DINO [CLS] features, by id or path (e.g. facebook/dinov2-small)."""
    toy_judge: bool = False
    """The toy world's exact judge (edit success, minimal edit, min; 0–10): only for toy-world sets."""
    idm_agreement: bool = True
    """Does the IDM, shown source → prediction, say the instruction back (exact match after normalising)?"""
    device: str = "auto"


@dataclass
class JudgeConfig:
    """The VIEScore-style LLM judge through any OpenAI-compatible chat-completions endpoint."""

    enabled: bool = False
    base_url: str | None = None
    """e.g. https://api.openai.com/v1 or a local vLLM server; None = the openai client's default."""
    model: str = "gpt-4o"
    api_key_env: str = "OPENAI_API_KEY"
    """Environment variable holding the key (never the key itself in a config)."""
    max_concurrency: int = 4
    max_retries: int = 4
    """Retries with exponential backoff on connection errors, 429 and 5xx (the openai client's own)."""
    timeout_s: float = 120.0
    temperature: float = 0.0
    cache_dir: str = f"{DEFAULT_OUTPUT_ROOT}/judge_cache"
    """Answers cached by a hash of (model, prompt, images): re-running an evaluation costs nothing."""


AURORA_JUDGED_TASKS = ("magicbrush", "ag", "something", "whatsup", "kubric")
"""AURORA-Bench's `task` names of the paper's five judged subsets (MagicBrush, Action-Genome, Something-Something,
WhatsUp, Kubric): the ones with a reference frame. Its other three (clevr, emu, epic) have none."""


@dataclass
class EvaluateConfig:
    """`jobs/evaluate.py`: AURORA-format benchmark → predictions (best-of-N) → metrics, judge, report."""

    root: str | None = None
    """The storage root of a model profile (configs/real/): its sections write every path as `${root}/…`, so each
    stage reads what the one before it wrote. Set it once per run (`root=s3://<bucket>/<prefix>`); a placeholder
    bucket (s3://your-bucket/…) is refused before anything starts. Unused (None) by the toy YAMLs."""
    bench: str = f"{DEFAULT_OUTPUT_ROOT}/toy_corpus/gold/test.json"
    """AURORA-format JSON (local or s3://): a list of {input, output?, prompt | instruction, task, ...}."""
    tasks: list[str] = field(default_factory=list)
    """Only these tasks (empty = all)."""
    headline_tasks: list[str] = field(default_factory=lambda: list(AURORA_JUDGED_TASKS))
    """The headline score is the primary metric (the LLM judge's min(edit success, minimal edit)) averaged over
    these tasks, each task's mean weighing alike, as the paper reports AURORA-Bench: its five judged subsets.
    Empty = every task in the bench (the toy configs). The mean over all items stays in the report as "all tasks"."""
    max_items: int | None = None
    world_model: WorldModelConfig = field(default_factory=WorldModelConfig)
    idm: IDMConfig = field(default_factory=IDMConfig)
    """The verifier of best-of-N (and of the `idm_agreement` metric)."""
    best_of: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    """Search widths to evaluate. Candidate j's noise depends only on (seed, item, j), so one run of
    max(best_of) candidates gives every smaller N exactly: N uses the first N candidates."""
    seed: int = 0
    endpoint: str | None = None
    """http://host:8000 of a running Serve app: predictions come from its /v1/predict instead."""
    endpoint_api_key_env: str = "CWM_API_KEY"
    endpoint_concurrency: int = 4
    world_model_stage: StageResources = field(default_factory=lambda: StageResources(concurrency=1, batch_size=8))
    verifier_stage: StageResources = field(default_factory=lambda: StageResources(concurrency=1, batch_size=8))
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    toy: ToyWorldConfig = field(default_factory=ToyWorldConfig)
    """The toy world's geometry, for `metrics.toy_judge`."""
    baselines: list[str] = field(default_factory=lambda: ["copy"])
    """`copy` scores the source itself as the prediction: the paper's reminder that L1 favours doing nothing."""
    output: str = f"{DEFAULT_OUTPUT_ROOT}/eval"
    """Local directory or s3:// prefix: report/index.html, plots, results.json, results.parquet."""
    report_examples: int = 12
    storage: StorageConfig = field(default_factory=StorageConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    allow_toy: bool = False
    """Let a run on a joined cluster (RAY_ADDRESS set) or on GPUs use toy values: a `toy` model, the toy corpus
    (outputs/toy_corpus/...), relative output paths. Off, `check_toy_values` refuses them there: a random model, or
    outputs lost with the job's temporary working directory, is never what a cluster run means."""


@dataclass
class EvaluateIDMConfig:
    """`jobs/evaluate_idm.py`: the IDM's accuracy on an AURORA-format test set, or of annotation's kept actions."""

    root: str | None = None
    """The storage root of a model profile (configs/real/): its sections write every path as `${root}/…`, so each
    stage reads what the one before it wrote. Set it once per run (`root=s3://<bucket>/<prefix>`); a placeholder
    bucket (s3://your-bucket/…) is refused before anything starts. Unused (None) by the toy YAMLs."""
    bench: str | None = f"{DEFAULT_OUTPUT_ROOT}/toy_corpus/gold/test.json"
    """AURORA-format JSON (local or s3://) with both frames per item; the IDM labels every pair."""
    triplets: str | None = None
    """Instead of `bench`: a Parquet directory from `jobs/annotate.py` (triplets/ or pairs/), scored as stored."""
    tasks: list[str] = field(default_factory=list)
    max_items: int | None = None
    """First items per task (as in `jobs/evaluate.py`)."""
    idm: IDMConfig = field(default_factory=IDMConfig)
    batch_size: int = 100
    """Pairs per `label` call."""
    toy_judge: bool = True
    """Also score `explains` with the toy world's exact parser (turn off for real benchmarks)."""
    text_metrics: bool = True
    """Score each action against its reference text as the paper scores its IDM: corpus BLEU (sacrebleu's
    defaults, on a 0–1 scale), ROUGE-1 and ROUGE-L F1 (rouge-score, Porter stemming) and, with `bertscore_model`,
    BERTScore F1 (bert-score), beside `exact`. Bench only: annotation's triplets have no reference."""
    bertscore_model: str | None = None
    """BERTScore's encoder by Hugging Face id or local / s3:// path (bert-score's English default is
    `roberta-large`, as the real profiles set); None = no BERTScore."""
    bertscore_layers: int | None = None
    """The encoder layer whose features are matched; None = bert-score's tuned layer for a model it knows (17 for
    roberta-large), else the model's last layer."""
    bertscore_rescale: bool = False
    """Rescale with bert-score's English baseline for `bertscore_model` (shipped for its known models), which spreads
    the raw scores (0.8–1 for most English pairs) over about 0–1; the real profiles set it."""
    toy: ToyWorldConfig = field(default_factory=ToyWorldConfig)
    output: str = f"{DEFAULT_OUTPUT_ROOT}/eval_idm"
    """Local directory or s3:// prefix: results.json (rates overall and per task) and rows.jsonl."""
    storage: StorageConfig = field(default_factory=StorageConfig)
    allow_toy: bool = False
    """Let a run on a joined cluster (RAY_ADDRESS set) or on GPUs use toy values: a `toy` model, the toy corpus
    (outputs/toy_corpus/...), relative output paths. Off, `check_toy_values` refuses them there: a random model, or
    outputs lost with the job's temporary working directory, is never what a cluster run means."""


REPRODUCE_ROWS = ("a", "b", "b_oracle", "c")
"""The table's rows, as `best_of_rows` names them (`ROWS` in cwm_ray/evaluate/reproduce.py says what each trains on;
this module cannot import the evaluate package)."""


@dataclass
class ReproduceConfig:
    """`jobs/reproduce.py`: the paper's ablation table in miniature on the toy world, from nothing.

    Each stage loads its own job's YAML (configs/toy.yaml, train_idm.yaml, annotate.yaml,
    `world_model_config`, evaluate.yaml) and applies the `*_overrides` below, so the stages run
    exactly as the jobs do; only paths move under `output`.
    """

    output: str = f"{DEFAULT_OUTPUT_ROOT}/reproduce"
    seeds: int = 1
    """Seeds 0..seeds−1: each trains the IDM, annotates, trains every row's world model and evaluates again on one
    corpus; the table gives each figure's mean ± spread (sample standard deviation) over seeds, and a difference
    between rows counts only beyond the spread. 3 to judge the table's claims."""
    best_of: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    best_of_rows: list[str] = field(default_factory=lambda: ["b", "c"])
    """Rows (a, b, b_oracle, c) whose world model is also evaluated at best-of-N for N in `best_of`; the others with
    one sample. (b) as well as the paper's (c): while recognition weighting costs the scene (row c's minimal edit),
    best-of-N over (c) has nothing to choose from, and what N adds shows on (b)."""
    synthetic_weight: float = 1.0
    """Sampling weight of the synthetic triplets beside the gold set (rows b, b′ and c)."""
    reuse: bool = True
    """Skip a stage finished under the same fingerprint (its resolved config and its inputs' fingerprints, kept in
    `stages/` under `output`) and resume one that crashed; false redoes every stage from nothing."""
    corpus_overrides: list[str] = field(default_factory=list)
    idm_overrides: list[str] = field(default_factory=list)
    annotate_overrides: list[str] = field(default_factory=list)
    world_model_config: str = "train_world_model.yaml"
    """The YAML in configs/ every row's world model trains from: train_world_model.yaml (the diffusion toy) or
    train_token_world_model.yaml (the token toy, the paper's kind). Its backend also reaches annotation (whose
    encoder gives the recognition weights) and evaluation."""
    world_model_overrides: list[str] = field(default_factory=list)
    evaluate_overrides: list[str] = field(default_factory=lambda: ["max_items=20"])
    """Default: 20 test items per action kind (100 items), judged for every row and N."""
    allow_toy: bool = False
    """Let a run on a joined cluster (RAY_ADDRESS set) or on GPUs use toy values: a `toy` model, the toy corpus
    (outputs/toy_corpus/...), relative output paths. Off, `check_toy_values` refuses them there: a random model, or
    outputs lost with the job's temporary working directory, is never what a cluster run means."""

    def __post_init__(self) -> None:
        if self.seeds < 1:
            raise ConfigError(f"bad value for config key 'seeds': {self.seeds}; use 1 or more")
        unknown = [r for r in self.best_of_rows if r not in REPRODUCE_ROWS]
        if unknown:
            raise ConfigError(f"bad value for config key 'best_of_rows': {unknown}; rows are "
                              f"{', '.join(REPRODUCE_ROWS)}")
        if not (REPO_ROOT / "configs" / self.world_model_config).is_file():
            raise ConfigError(f"bad value for config key 'world_model_config': {self.world_model_config!r}; "
                              f"no such file in {REPO_ROOT / 'configs'}")
        # Each stage's overrides are checked against that stage's job config now, as the stage will load them:
        # a typo in evaluate_overrides used to surface only after the IDM had trained and the videos were annotated.
        stages = {"corpus_overrides": (ToyCorpusConfig, "toy.yaml"),
                  "idm_overrides": (TrainIDMConfig, "train_idm.yaml"),
                  "annotate_overrides": (AnnotateConfig, "annotate.yaml"),
                  "world_model_overrides": (TrainWorldModelConfig, self.world_model_config),
                  "evaluate_overrides": (EvaluateConfig, "evaluate.yaml")}
        for key, (cls, yaml_name) in stages.items():
            overrides = getattr(self, key)
            try:
                load(cls, REPO_ROOT / "configs" / yaml_name, overrides)
            except ConfigError as exc:
                raise ConfigError(f"{key}, checked against {cls.__name__} (configs/{yaml_name}): "
                                  + str(exc).replace("(from command line)", f"(in {key})")) from None
