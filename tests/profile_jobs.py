"""A job's CLI run as a user runs it with a model profile: `python jobs/<script> --config <profile> root=...`.

Shared by the tests that take a real profile through every job (tests/test_idm_families.py,
tests/test_single_model.py): a private Ray per job (no RAY_ADDRESS), token auth off, and a `root` that is not the
profile's placeholder, so every path a job uses is one the test gives.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_job(profile: Path, script: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    """`jobs/<script>` under `profile` with `args`; fails the test with the job's output tails if it exits non-zero."""
    env = dict(os.environ, RAY_AUTH_MODE="disabled", PYTHONUNBUFFERED="1")
    env.pop("RAY_ADDRESS", None)
    root = f"root={tempfile.gettempdir()}/cwm_test_root"
    proc = subprocess.run([sys.executable, f"jobs/{script}", "--config", str(profile), root, *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{script} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc
