"""Stop one test's Ray cluster, and only it: `ray stop --force` kills every Ray process of the user.

A test that starts a cluster with `ray start` puts a marker of its own in the environment; every process of that
cluster (GCS, raylets, workers, the job agent) inherits it, so the cluster is found by the marker and ended alone.
Other Ray instances on the machine (a developer's own cluster, another test's) are left running.
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from pathlib import Path

MARKER_ENV = "CWM_TEST_RAY_CLUSTER"


def new_marker() -> dict[str, str]:
    """The environment entry that marks a cluster's processes: merge it into `ray start`'s environment."""
    return {MARKER_ENV: uuid.uuid4().hex}


def processes(marker: dict[str, str]) -> list[int]:
    """Every live process that carries `marker` in its environment."""
    (tag,) = (f"{k}={v}".encode() for k, v in marker.items())
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                environ = Path(f"/proc/{entry}/environ").read_bytes()
            except OSError:  # gone, or another user's
                continue
            if tag in environ.split(b"\0"):
                pids.append(int(entry))
    return pids


def stop(marker: dict[str, str], grace_s: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after `grace_s`, to the marked processes only."""
    for sig, grace in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        for pid in processes(marker):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while processes(marker) and time.monotonic() < deadline:
            time.sleep(0.2)
