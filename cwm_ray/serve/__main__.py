"""A dry run of the Serve application's `args`: what `build_app` will serve, without Ray, Serve or a model.

    python -m cwm_ray.serve --print-config configs/serve.yaml                      # the toy models
    python -m cwm_ray.serve --print-config configs/cluster/serve_g5.yaml root=s3://my-bucket/cwm
    python -m cwm_ray.serve --print-config profile=configs/real/qwen25vl7b_ip2p.yaml root=s3://my-bucket/cwm

An optional Serve config file (what `serve run` / `serve deploy` take) gives its first application's `args`;
`key=value` overrides go on top in the args' own keys (`profile=`, `root=`, `world_model.adapter=`, ...). It prints
the resolved `ServeConfig` (a profile's base model and adapter, with `root` filled in); a placeholder is a warning
here and an error in `build_app`; a config error is one line and exit code 2, as for the jobs.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from cwm_ray.config import ConfigError, ServeConfig, find_placeholders, placeholder_message, serve_config, to_yaml

USAGE = "usage: python -m cwm_ray.serve --print-config [SERVE_CONFIG.yaml] [key=value ...]"


def resolve(argv: Sequence[str]) -> tuple[ServeConfig, str]:
    """The ServeConfig `build_app` would get from these arguments, and where its args came from."""
    files = [a for a in argv if a.endswith((".yaml", ".yml")) and "=" not in a]
    overrides = [a for a in argv if a not in files]
    if len(files) > 1:
        raise ConfigError(f"give at most one Serve config file, got {' '.join(files)}")
    bad = [o for o in overrides if "=" not in o or o.startswith("=")]
    if bad:
        raise ConfigError(f"unknown argument(s) {' '.join(bad)}; give a Serve config file and key=value overrides")
    args: dict = {}
    if files:
        path = Path(files[0])
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            apps = (yaml.safe_load(path.read_text()) or {}).get("applications") or []
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: invalid YAML: {str(exc).splitlines()[0]}") from None
        if not apps:
            raise ConfigError(f"{path}: no `applications:` (a Serve config file, e.g. configs/serve.yaml)")
        args = apps[0].get("args") or {}
    try:  # values as YAML, as `key=value` on a job's command line (profile= is the app's key, not a field)
        layer = OmegaConf.from_dotlist(list(overrides))
        merged = OmegaConf.to_container(OmegaConf.merge(OmegaConf.create(args), layer))
    except (OmegaConfBaseException, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read the overrides: {str(exc).splitlines()[0]}") from None
    source = " + ".join(filter(None, [files[0] if files else "", "command line" if overrides else ""]))
    return serve_config(merged), source or "defaults"  # type: ignore[arg-type]


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--print-config" not in argv or any(a in ("-h", "--help") for a in argv):
        print(USAGE + "\n\n" + (__doc__ or "").strip())
        raise SystemExit(0 if any(a in ("-h", "--help") for a in argv) else 2)
    try:
        cfg, source = resolve([a for a in argv if a != "--print-config"])
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"# resolved ServeConfig (the application's args, from {source})")
    print(to_yaml(cfg), flush=True)
    if found := find_placeholders(cfg):
        print(f"warning: {placeholder_message(found)}; build_app refuses to start with it", file=sys.stderr)


if __name__ == "__main__":
    main()
