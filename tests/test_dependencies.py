"""Declared dependency ranges are the tested ones (issue 31).

pyproject.toml's floors are versions CI runs: constraints.txt pins what scripts/setup.sh installs, and each floor
is its pin, except transformers. Its floor is 5.17.0, the version a GPU box with the usual image has (the first H200
run crashed on an API that 5.17 names otherwise than 5.25, `past_key_values` against `cache`), and setup.sh installs
it beside the venv's own (`.venv/floor/transformers-<floor>`); the model paths of the device guard then run again in
a subprocess with it first on PYTHONPATH.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
PINNED = ("torch", "torchvision", "ray", "diffusers", "accelerate", "deepspeed", "peft")
"""Packages whose floor is the version CI runs."""


def _floors() -> dict[str, Version]:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    floors = {}
    for dep in deps:
        m = re.match(r"^([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?>=([0-9][^,]*)", dep)
        if m:
            floors[m.group(1).lower()] = Version(m.group(2))
    return floors


def _pins() -> dict[str, Version]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        name, sep, version = line.partition("==")
        if sep and not line.startswith("#"):
            pins[name.strip().lower().replace("_", "-")] = Version(version.strip())
    return pins


def test_each_floor_is_the_version_ci_runs() -> None:
    floors, pins = _floors(), _pins()
    for name in PINNED:
        assert floors[name] == pins[name] == Version(metadata.version(name)), (
            f"{name}: pyproject.toml's floor {floors[name]}, constraints.txt's pin {pins.get(name)}, installed "
            f"{metadata.version(name)}: a floor is a version CI runs (raise it with the pin, or test the old one)")
    assert pins["transformers"] == Version(metadata.version("transformers")), "constraints.txt is not what CI runs"


def test_the_transformers_floor_runs_every_model_path_of_the_device_guard() -> None:
    """The guard's IDM, world-model and embedder tests, under the declared transformers floor and its hub client."""
    floor = _floors()["transformers"]
    site = REPO / ".venv" / "floor" / f"transformers-{floor}"
    if not (site / "transformers").is_dir():
        pytest.fail(f"no transformers {floor} at {site}: scripts/setup.sh installs it (make setup)")
    check = (f"import sys, transformers; from packaging.version import Version; "
             f"assert Version(transformers.__version__) == Version('{floor}'), transformers.__file__; "
             f"import pytest; sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', '-p', 'no:warnings', "
             f"'tests/test_device_guard.py']))")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), str(REPO), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, "-c", check], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, f"with transformers {floor}:\n{result.stdout[-6000:]}\n{result.stderr[-3000:]}"
    summary = result.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "skipped" not in summary, summary
