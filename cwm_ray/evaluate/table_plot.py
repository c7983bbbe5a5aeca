"""A picture of the paper's table in miniature: table.png beside table.md / table.json.

`plot_table(table, path)` draws the toy judge per row of the table that `jobs/reproduce.py` builds, as
horizontal bars (mean over seeds, error bars of ± the row's spread where it has one), with the judge's two
parts (edit success, minimal edit) as grouped bars beside it. The "copy the source" row is the reference
every model row is read against (it scores 0 and keeps the scene perfectly): it is drawn greyed, below a
rule, so it is never mistaken for a model.

The table is a dict: {"rows": [{"row": label, "items": int, "seeds": int (optional), metric: float | None,
f"{metric}_spread": float | None (optional)}, ...], "columns": [metric, ...]}. Values may be None (a row
that was not evaluated): the bar is left out and "–" written in its place.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display on a cluster node or in CI
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from cwm_ray import storage  # noqa: E402

TITLE = "The paper's table in miniature (toy world)"
# The toy judge and its two parts share one 0–10 scale; other columns (IDM agreement 0–1, L1) would not.
BARS = {"toy_score": ("toy judge (min)", "#1f77b4"), "toy_edit_success": ("toy: edit success", "#ff7f0e"),
        "toy_minimal_edit": ("toy: minimal edit", "#2ca02c")}
COPY_COLOURS = {"toy_score": "#9e9e9e", "toy_edit_success": "#bdbdbd", "toy_minimal_edit": "#d6d6d6"}


def _number(value: Any) -> float | None:
    """A finite float, or None for a missing / None / NaN value."""
    if value is None:
        return None
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _is_copy(row: Mapping[str, Any]) -> bool:
    return str(row.get("row", "")).lower().startswith("copy")


def _metrics(table: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The toy-judge columns the table has (in the order of BARS); else its first column with a number."""
    columns = list(table.get("columns") or [])
    present = [m for m in BARS if (m in columns or not columns) and any(_number(r.get(m)) is not None for r in rows)]
    if present:
        return present
    for m in columns:
        if any(_number(r.get(m)) is not None for r in rows):
            return [m]
    return ["toy_score"]


def _style(metric: str) -> tuple[str, str]:
    """(legend name, colour) of a metric's bars."""
    return BARS.get(metric, (metric, "#1f77b4"))


def _label(row: Mapping[str, Any]) -> str:
    label = str(row.get("row", "?"))
    seeds = row.get("seeds")
    if isinstance(seeds, int) and seeds > 1:
        label += f"  ({seeds} seeds)"
    return label


def render_table_png(table: Mapping[str, Any]) -> bytes:
    """The picture as PNG bytes (plot_table writes them)."""
    rows = [r for r in table.get("rows") or [] if isinstance(r, Mapping)]
    models = [r for r in rows if not _is_copy(r)]
    copies = [r for r in rows if _is_copy(r)]
    ordered = models + copies
    metrics = _metrics(table, rows)
    on_judge_scale = all(m in BARS for m in metrics)

    height = 0.8 / len(metrics)  # the group's bars fill 0.8 of a row's slot
    fig, ax = plt.subplots(figsize=(8.0, max(3.0, 1.3 + (0.32 * len(metrics) + 0.15) * len(ordered))))
    biggest = 0.0
    for k, metric in enumerate(metrics):
        colour = _style(metric)[1]
        for i, row in enumerate(ordered):
            y = i + (k - (len(metrics) - 1) / 2) * height
            value, spread = _number(row.get(metric)), _number(row.get(f"{metric}_spread"))
            if value is None:
                ax.annotate("–", (0, y), xytext=(3, 0), textcoords="offset points", va="center", fontsize=8,
                            color="#666")
                continue
            copy = _is_copy(row)
            ax.barh(y, value, height=height * 0.92, color=COPY_COLOURS.get(metric, "#bdbdbd") if copy else colour,
                    hatch="//" if copy else None, edgecolor="#888" if copy else "none", linewidth=0.5,
                    xerr=spread if spread else None, error_kw={"elinewidth": 1, "capsize": 2.5, "ecolor": "#333"})
            end = value + (spread or 0.0)
            biggest = max(biggest, end)
            text = f"{value:.2f}" + (f" ± {spread:.2f}" if spread else "")
            ax.annotate(text, (end, y), xytext=(3, 0), textcoords="offset points", va="center", fontsize=6.5,
                        color="#555" if copy else "#222")
    if copies and models:
        ax.axhline(len(models) - 0.5, color="#999", lw=0.8, ls="--")
    ax.set_yticks(range(len(ordered)), [_label(r) for r in ordered], fontsize=8)
    for tick, row in zip(ax.get_yticklabels(), ordered, strict=True):
        if _is_copy(row):
            tick.set_color("#777")
            tick.set_fontstyle("italic")
    ax.set_ylim(len(ordered) - 0.5, -0.5)  # the table's first row on top
    right = max(10.0, biggest) * 1.13 if on_judge_scale else max(biggest * 1.25, 1e-3)  # room for the values
    ax.set_xlim(0, right)
    seeds = any(_number(r.get(f"{m}_spread")) for r in rows for m in metrics)
    scale = "toy judge, 0–10" if on_judge_scale else metrics[0]
    ax.set_xlabel(f"{scale}: " + ("mean over seeds, error bar ± spread" if seeds else "one evaluation per row"),
                  fontsize=8)
    ax.tick_params(axis="x", labelsize=8)
    ax.grid(axis="x", color="#eee")
    ax.set_axisbelow(True)
    handles = [Patch(color=_style(m)[1], label=_style(m)[0]) for m in metrics]
    if copies:
        handles.append(Patch(facecolor="#d6d6d6", hatch="//", edgecolor="#888", label="copy the source (reference)"))
    ax.legend(handles=handles, fontsize=7, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=4, frameon=False)
    ax.set_title(TITLE, fontsize=10, pad=20)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def plot_table(table: dict, path: str | os.PathLike[str]) -> None:
    """Write the table's picture as a PNG to `path` (local, parent directories made, or s3://)."""
    storage.write_bytes(path, render_table_png(table))
