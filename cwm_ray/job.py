"""The entry point of `jobs/*.py`: parse the config, check it, preflight it, run the job's `main`.

Why apart from `cwm_ray.config`: a run needs `cwm_ray.preflight` and `cwm_ray.storage`, which read the config
classes; with these helpers inside the config module the three imported each other. Both are still imported
only when a job runs, so `--help` and a config error stay free of pyarrow, torch and the hub client
(`tests/test_cli.py::test_help_imports_nothing_heavy`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any, TypeVar

from cwm_ray.config import (
    DEFAULT_OUTPUT_ROOT,
    ConfigError,
    check_toy_values,
    find_placeholders,
    parse_cli,
    placeholder_message,
)

T = TypeVar("T")


def run_job(main: Any, cls: type[T], default_config: str | None = None) -> None:
    """Entry point helper for `jobs/*.py`: config errors, and toy values where they cannot be meant
    (`check_toy_values`), are one clear line and exit code 2, before anything starts; so is a ConfigError the
    job's driver raises itself (e.g. annotation's check of the IDM's prompt)."""
    try:
        cfg = parse_cli(cls, default_config=default_config)
        for warning in check_toy_values(cfg):
            print(f"warning: {warning}", file=sys.stderr, flush=True)
        if found := find_placeholders(cfg):
            raise ConfigError(placeholder_message(found))
        from cwm_ray.preflight import preflight  # storage and the hub client: only for a run

        preflight(cfg)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    if not os.environ.get("RAY_ADDRESS"):
        # No cluster to join: `ray.init()` starts a private one on this machine, for which Ray 2.60's
        # token auth only gets in the way. Jobs submitted to a cluster (RAY_ADDRESS set) keep its setting.
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    try:
        main(cfg)
    except ConfigError as exc:  # a check made once connected to Ray (`preflight.check_cluster_fits`, or the
        # driver's own, e.g. the rows a schedule in epochs counts), before any worker starts
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def exit_if_unbuilt(needs: Sequence[tuple[str, str | None, str]], hint: str = "") -> None:
    """Exit with the one command that builds it when a job's default toy input (`outputs/...`) is missing.

    `needs` holds (what, uri, the job that makes it); other URIs (hub ids, s3://, user paths) are the loaders' to check.
    """
    from cwm_ray import storage  # pyarrow: only when a job runs, never for --help

    for what, uri, make in needs:
        if uri and uri.startswith(f"{DEFAULT_OUTPUT_ROOT}/") and not storage.exists(uri):
            sys.exit(f"error: no {what} at {uri}. Build the toy one first: .venv/bin/python {make}"
                     + (f"\n{hint}" if hint else ""))


__all__ = ["exit_if_unbuilt", "run_job"]
