"""A job's command line: `--config`, `--print-config`, `--help` (every setting with the docstring under its
field), overrides."""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from cwm_ray.config.base import REPO_ROOT, ConfigError, T
from cwm_ray.config.checks import check_toy_values, find_placeholders, placeholder_message
from cwm_ray.config.core import load, to_yaml

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
    """Class docstrings, field docstrings and fixed choices, read from the source of every module of this package.

    Why `ast`: a field's description is the string literal under it (the torchtitan convention), which Python
    keeps nowhere at run time; and the choices are the `check_choice` calls in `__post_init__`, so `--help` shows
    the same lists the validation enforces. A choice list named by a constant is looked up in the package, which
    re-exports every module's names.
    """
    namespace = vars(sys.modules[__package__])
    nodes = [node for path in sorted(Path(__file__).parent.glob("*.py")) for node in ast.parse(path.read_text()).body]
    class_docs: dict[str, str] = {}
    docs: dict[str, dict[str, str]] = {}
    choices: dict[str, dict[str, tuple[Any, ...]]] = {}
    for node in nodes:
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
                value = namespace.get(options.id) if isinstance(options, ast.Name) else ast.literal_eval(options)
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
