"""Scored rows → the tables: means per system and task, the headline, and the metric a table leads with.

Why its own module: the pipeline (which scores rows) and the report (which draws them) both read these, and with
them inside the pipeline the two imported each other. Pure Python, so the report pulls in no model code.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

METRIC_ORDER = ["judge_score", "judge_editing_success", "judge_minimal_editing", "toy_score", "toy_edit_success",
                "toy_minimal_edit", "idm_agreement", "verifier_logp", "l1", "clip_i", "dino"]
HIGHER_IS_BETTER = {m: m != "l1" for m in METRIC_ORDER}


def _mean(values: list[Any]) -> float | None:
    xs = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(xs) / len(xs) if xs else None


def primary_metric(metrics: Sequence[str]) -> str:
    """The score a table leads with: the LLM judge's min(edit success, minimal edit) when there is one."""
    for m in ("judge_score", "toy_score", "idm_agreement", "clip_i", "l1"):
        if m in metrics:
            return m
    return metrics[0] if metrics else "verifier_logp"


def headline(per_task: Sequence[dict], metrics: Sequence[str], tasks: Sequence[str]) -> dict[str, Any]:
    """The paper's headline: the primary metric's mean over `tasks` (AURORA-Bench's five judged subsets), each
    subset's own mean weighing alike, per (system, best_of); None where a subset has no score (left out of the run,
    or nothing judged), since a mean over fewer subsets is another number. Empty `tasks`: every task present."""
    metric = primary_metric(metrics)
    present = sorted({r["task"] for r in per_task})
    chosen = list(tasks) or present
    rows: dict[str, dict[str, Any]] = {}
    for r in per_task:
        row = rows.setdefault(r["label"], {"label": r["label"], "system": r["system"], "best_of": r["best_of"],
                                           "tasks": {}})
        if r["task"] in chosen:
            row["tasks"][r["task"]] = r.get(metric)
    for row in rows.values():
        values = [row["tasks"].get(t) for t in chosen]
        row["mean"] = None if any(v is None for v in values) else sum(values) / len(values)
    return {"metric": metric, "tasks": chosen, "missing": [t for t in chosen if t not in present],
            "rows": list(rows.values())}


def summarise(rows: Sequence[dict], headline_tasks: Sequence[str] = ()) -> dict[str, Any]:
    """Means per (system, best_of), overall and per task, for every metric present, and the `headline`."""
    metrics = [m for m in METRIC_ORDER if any(r.get(m) is not None for r in rows)]
    groups: dict[tuple[str, int | None], list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["system"], r["best_of"])].append(r)
    overall, per_task = [], []
    for (system, n), rs in groups.items():
        label = f"{system} (best of {n})" if n is not None else system
        overall.append({"system": system, "best_of": n, "label": label, "items": len(rs),
                        **{m: _mean([r.get(m) for r in rs]) for m in metrics}})
        tasks: dict[str, list[dict]] = defaultdict(list)
        for r in rs:
            tasks[r["task"]].append(r)
        for task, ts in sorted(tasks.items()):
            per_task.append({"system": system, "best_of": n, "label": label, "task": task, "items": len(ts),
                             **{m: _mean([r.get(m) for r in ts]) for m in metrics}})
    judge_status: dict[str, int] = defaultdict(int)
    for r in rows:
        if "judge_status" in r:
            judge_status[r["judge_status"]] += 1
    return {"metrics": metrics, "headline": headline(per_task, metrics, headline_tasks), "overall": overall,
            "per_task": per_task, "judge_status": dict(judge_status)}


def print_table(summary: dict[str, Any]) -> None:
    metrics = summary["metrics"]
    print(f"\nall tasks\n{'system':<28}" + "".join(f"{m:>22}" for m in metrics))
    for row in summary["overall"]:
        print(f"{row['label']:<28}" + "".join(f"{_fmt(row.get(m)):>22}" for m in metrics))
    if summary.get("judge_status"):
        print(f"judge answers: {summary['judge_status']}")
    head = summary["headline"]
    overall = {r["label"]: r.get(head["metric"]) for r in summary["overall"]}
    print(f"\nheadline: {head['metric']}, the mean over {len(head['tasks'])} subsets"
          + (f" (missing from this run: {', '.join(head['missing'])})" if head["missing"] else ""))
    print(f"{'system':<28}" + "".join(f"{t[:12]:>13}" for t in head["tasks"]) + f"{'mean':>10}{'all tasks':>11}")
    for row in head["rows"]:
        print(f"{row['label']:<28}" + "".join(f"{_fmt(row['tasks'].get(t)):>13}" for t in head["tasks"])
              + f"{_fmt(row['mean']):>10}{_fmt(overall.get(row['label'])):>11}")


def _fmt(v: float | None) -> str:
    return "–" if v is None else f"{v:.3f}"


__all__ = ["HIGHER_IS_BETTER", "METRIC_ORDER", "headline", "primary_metric", "print_table", "summarise"]
