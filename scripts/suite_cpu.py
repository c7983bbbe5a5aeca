"""A pytest plugin: the CPU time each test costs the whole machine, to find where the suite's time goes.

The suite is CPU-bound on CI's 2 cores (the toy gates' background training fills every gap the other tests
leave), so its wall time follows the CPU seconds it uses, not each test's wall time: a test that waits on a
server costs little, a job that starts Ray, two Train workers and an actor pool costs several times its wall.
pytest's `--durations` shows wall only, and a test's own process does not see its subprocesses' and Ray
workers' CPU. This reads the machine's busy time from /proc/stat around each test (setup, call, teardown), so
run it on an otherwise quiet machine and without the gates, whose background training would be counted in
every test it overlaps:

    PYTHONPATH=scripts .venv/bin/python -m pytest -p suite_cpu --deselect tests/test_toy_training.py

It prints CPU and wall seconds per file at the end, and writes one JSON line per test to
`outputs/suite_cpu.jsonl` (`SUITE_CPU_OUT` moves it). docs/reliability.md §The suite has a run's figures.
"""

from __future__ import annotations

import json
import os
import time
from collections import defaultdict
from pathlib import Path

import pytest

_TICKS = os.sysconf("SC_CLK_TCK")
_ROWS: list[dict] = []


def _busy_seconds() -> float:
    """CPU seconds the machine has spent busy since boot: every field of /proc/stat's `cpu` line but idle, iowait
    and the guest fields (already counted in user and nice)."""
    with open("/proc/stat") as stat:
        user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, stat.readline().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / _TICKS


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    cpu, wall = _busy_seconds(), time.monotonic()
    yield
    _ROWS.append({"test": item.nodeid, "cpu_s": round(_busy_seconds() - cpu, 1),
                  "wall_s": round(time.monotonic() - wall, 1)})


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not _ROWS:
        return
    out = Path(os.environ.get("SUITE_CPU_OUT", "outputs/suite_cpu.jsonl"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(row) + "\n" for row in _ROWS))
    files: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for row in _ROWS:
        totals = files[row["test"].split("::")[0]]
        totals[0] += row["cpu_s"]
        totals[1] += row["wall_s"]
    cpu = sum(t[0] for t in files.values())
    wall = sum(t[1] for t in files.values())
    terminalreporter.write_line(f"CPU seconds (wall) per file, {cpu:.0f} ({wall:.0f}) in all, per test in {out}: "
                                + ", ".join(f"{Path(f).stem.removeprefix('test_')} {c:.0f} ({w:.0f})"
                                            for f, (c, w) in sorted(files.items(), key=lambda kv: -kv[1][0])))
