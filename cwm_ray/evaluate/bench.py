"""Benchmark loading: AURORA format (AURORA-Bench's test.json and AURORA's training files alike)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from cwm_ray import storage
from cwm_ray.config import StorageConfig
from cwm_ray.data import read_aurora

KNOWN = {"input", "output", "prompt", "instruction", "task", "id", "action"}


@dataclass
class BenchItem:
    id: str
    task: str
    action: str
    source: bytes
    reference: bytes | None
    """The reference next frame; None for tasks without one (reference-free metrics only)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Every field the loader does not interpret (`pos`, `neg`, `mask`, `caption`, ...), kept as is."""


def load_bench(uri: str, tasks: Sequence[str] = (), max_items: int | None = None,
               cfg: StorageConfig | None = None) -> list[BenchItem]:
    """Items of an AURORA-format JSON (local or s3://), images read; `prompt` or `instruction` is the action.

    `tasks` keeps only those tasks; `max_items` takes the first items *per task* in file order, so a
    reduced run still covers every task.
    """
    rows = read_aurora(uri, cfg)
    if tasks:
        unknown = set(tasks) - {str(r.get("task", "default")) for r in rows}
        if unknown:
            raise ValueError(f"{uri}: no items of task(s) {sorted(unknown)}")
    per_task: dict[str, int] = {}
    items = []
    for r in rows:
        task = str(r.get("task") or "default")
        if tasks and task not in tasks:
            continue
        if max_items is not None and per_task.get(task, 0) >= max_items:
            continue
        per_task[task] = per_task.get(task, 0) + 1
        items.append(BenchItem(
            id=str(r["id"]), task=task, action=r["action"], source=storage.read_bytes(r["input"], cfg),
            reference=storage.read_bytes(r["output"], cfg) if r["output"] else None,
            extra={k: v for k, v in r.items() if k not in KNOWN},
        ))
    if not items:
        raise ValueError(f"{uri}: no items to evaluate")
    return items
