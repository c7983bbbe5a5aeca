"""The report: report/index.html (overall and per-task tables, plots, image grids) + results.json/.parquet.

Everything is written to a local directory first and uploaded when `output` is s3://, so a report is
either complete or absent. Images are files beside the page (no inline base64), so it opens fast.
"""

from __future__ import annotations

import html
import json
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display on a cluster node or in CI
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from cwm_ray import storage  # noqa: E402
from cwm_ray.config import EvaluateConfig  # noqa: E402
from cwm_ray.evaluate.bench import BenchItem  # noqa: E402
from cwm_ray.evaluate.predict import Prediction  # noqa: E402
from cwm_ray.evaluate.summary import primary_metric  # noqa: E402

NAMES = {"judge_score": "LLM judge (min)", "judge_editing_success": "judge: edit success",
         "judge_minimal_editing": "judge: minimal edit", "toy_score": "toy judge (min)",
         "toy_edit_success": "toy: edit success", "toy_minimal_edit": "toy: minimal edit",
         "idm_agreement": "IDM agreement", "verifier_logp": "verifier log p", "l1": "L1 ↓", "clip_i": "CLIP-I",
         "dino": "DINO"}
CSS = """body{font-family:system-ui,sans-serif;margin:1.5rem auto;max-width:1200px;padding:0 1rem;color:#222}
table{border-collapse:collapse;margin:.5rem 0 1.5rem}td,th{border:1px solid #ccc;padding:.3rem .6rem;text-align:right}
th:first-child,td:first-child{text-align:left}th{background:#f4f4f4}.muted{color:#666;font-size:.9rem}
.grid{display:flex;gap:.6rem;flex-wrap:wrap;align-items:flex-start;margin-bottom:1rem;padding:.5rem;
border:1px solid #eee}
figure{margin:0;text-align:center;font-size:.8rem}figure img{width:128px;height:128px;image-rendering:pixelated}
.chosen img{outline:3px solid #1a7f37}img.plot{max-width:560px;margin-right:1rem}"""


def _plots(summary: dict[str, Any], out: Path) -> list[str]:
    files = []
    wm = [r for r in summary["overall"] if r["system"] == "world_model"]
    baselines = [r for r in summary["overall"] if r["system"] != "world_model"]
    curves = [m for m in ("judge_score", "toy_score", "idm_agreement") if m in summary["metrics"]]
    if wm and curves:
        fig, ax = plt.subplots(figsize=(5.5, 3.6))
        ns = [r["best_of"] for r in wm]
        for m in curves:
            line = ax.plot(ns, [r[m] for r in wm], marker="o", label=NAMES[m])[0]
            for b in baselines:
                if b.get(m) is not None:
                    ax.axhline(b[m], ls="--", lw=1, color=line.get_color(), label=f"{NAMES[m]}: {b['system']}")
        ax.set_xscale("log", base=2)
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.set_xlabel("best-of-N (candidates verified by the IDM)")
        ax.set_ylabel("mean score")
        ax.legend(fontsize=7)
        ax.set_title("score against N")
        fig.tight_layout()
        fig.savefig(out / "score_vs_n.png", dpi=110)
        plt.close(fig)
        files.append("score_vs_n.png")
    metric = primary_metric(summary["metrics"])
    per_task = pd.DataFrame(summary["per_task"])
    if not per_task.empty and metric in per_task:
        biggest = max((r["best_of"] for r in wm), default=None)
        keep = per_task[(per_task["system"] != "world_model") | (per_task["best_of"] == biggest)]
        table = keep.pivot_table(index="task", columns="label", values=metric, aggfunc="mean")
        fig, ax = plt.subplots(figsize=(max(5.5, 0.9 * len(table)), 3.6))
        table.plot.bar(ax=ax, rot=30)
        ax.set_ylabel(NAMES.get(metric, metric))
        ax.set_title(f"{NAMES.get(metric, metric)} per task")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "per_task.png", dpi=110)
        plt.close(fig)
        files.append("per_task.png")
    return files


def _table(rows: Sequence[dict], first: str, metrics: Sequence[str]) -> str:
    head = "".join(f"<th>{html.escape(NAMES.get(m, m))}</th>" for m in metrics)
    body = []
    for r in rows:
        cells = "".join(f"<td>{'–' if r.get(m) is None else f'{r[m]:.3f}'}</td>" for m in metrics)
        body.append(f"<tr><td>{html.escape(str(r[first]))}</td><td>{r['items']}</td>{cells}</tr>")
    return f"<table><tr><th>{first}</th><th>items</th>{head}</tr>{''.join(body)}</table>"


def _headline_table(summary: dict[str, Any]) -> str:
    """Per system: each headline subset's score, their mean (the paper's number) and the all-task mean beside."""
    head = summary["headline"]
    metric = head["metric"]
    overall = {r["label"]: r.get(metric) for r in summary["overall"]}

    def cell(v: float | None) -> str:
        return f"<td>{'–' if v is None else f'{v:.3f}'}</td>"

    heads = "".join(f"<th>{html.escape(t)}</th>" for t in head["tasks"])
    body = "".join(f"<tr><td>{html.escape(r['label'])}</td>{''.join(cell(r['tasks'].get(t)) for t in head['tasks'])}"
                   f"{cell(r['mean'])}{cell(overall.get(r['label']))}</tr>" for r in head["rows"])
    missing = (f"<p class=muted>Not in this run: {html.escape(', '.join(head['missing']))}; the mean needs every "
               "subset.</p>") if head["missing"] else ""
    return (f"<table><tr><th>label</th>{heads}<th>mean</th><th>all tasks</th></tr>{body}</table>{missing}")


def _examples(cfg: EvaluateConfig, items: Sequence[BenchItem], predictions: Sequence[Prediction],
              rows: Sequence[dict], out: Path) -> str:
    (out / "images").mkdir(exist_ok=True)
    biggest = max(cfg.best_of)
    chosen = {r["id"]: r for r in rows if r["system"] == "world_model" and r["best_of"] == biggest}
    blocks = []
    for k, (item, pred) in enumerate(zip(items, predictions, strict=True)):
        if k >= cfg.report_examples:
            break

        def put(name: str, data: bytes, caption: str, cls: str = "") -> str:
            (out / "images" / name).write_bytes(data)
            return (f'<figure class="{cls}"><img src="images/{name}" alt="{html.escape(caption)}">'
                    f"<figcaption>{html.escape(caption)}</figcaption></figure>")

        row = chosen[item.id]
        figs = [put(f"{k}_source.png", item.source, "source"),
                put(f"{k}_prediction.png", pred.candidates[row["chosen"]], f"prediction (best of {biggest})",
                    "chosen")]
        if item.reference is not None:
            figs.append(put(f"{k}_reference.png", item.reference, "reference"))
        order = sorted(range(len(pred.scores)), key=lambda j: -pred.scores[j])[:4]
        figs += [put(f"{k}_cand{j}.png", pred.candidates[j], f"#{j} log p {pred.scores[j]:.2f}") for j in order]
        scores = ", ".join(f"{NAMES.get(m, m)} {row[m]:.2f}" for m in ("judge_score", "toy_score")
                           if row.get(m) is not None)
        blocks.append(f"<h3>{html.escape(item.task)}: “{html.escape(item.action)}”"
                      f" <span class=muted>{html.escape(scores)}</span></h3><div class=grid>{''.join(figs)}</div>")
    return "".join(blocks)


def render(cfg: EvaluateConfig, items: Sequence[BenchItem], predictions: Sequence[Prediction],
           rows: Sequence[dict], summary: dict[str, Any], out: Path) -> None:
    """Write the report into local directory `out` (report/ inside it, results beside)."""
    report = out / "report"
    report.mkdir(parents=True, exist_ok=True)
    metrics = summary["metrics"]
    plots = "".join(f'<img class=plot src="{f}" alt="{f}">' for f in _plots(summary, report))
    primary = primary_metric(metrics)
    per_task = pd.DataFrame(summary["per_task"])
    task_table = ""
    if not per_task.empty and primary in per_task:
        pivot = per_task.pivot_table(index="task", columns="label", values=primary, aggfunc="mean")
        task_table = pivot.to_html(float_format=lambda v: f"{v:.3f}", na_rep="–", border=0)
    judge = summary.get("judge_status") or {}
    page = f"""<!doctype html><html lang=en><head><meta charset=utf-8><title>cwm_ray evaluation</title>
<style>{CSS}</style></head><body>
<h1>cwm_ray evaluation</h1>
<p class=muted>{html.escape(summary['bench'])} · {summary['items']} items · world model
{html.escape(str(summary['world_model']))} · verifier {html.escape(str(summary['idm']))}
{'· endpoint ' + html.escape(summary['endpoint']) if summary.get('endpoint') else ''} ·
{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}</p>
<p class=muted>Copying the source scores 0 with a judge but does well on L1, CLIP-I and DINO: read those
beside the copy row. Best-of-N uses the first N of the same candidates for every N.</p>
<h2>Headline: {html.escape(NAMES.get(summary['headline']['metric'], summary['headline']['metric']))}, mean over
{len(summary['headline']['tasks'])} subsets</h2>
<p class=muted>The paper's number: each subset's mean score, averaged over the subsets (on AURORA-Bench its five
judged ones); "all tasks" is every item's mean, for comparison, not the headline.</p>{_headline_table(summary)}
<h2>All tasks</h2>{_table(summary['overall'], 'label', metrics)}
{f"<p class=muted>LLM judge answers: {html.escape(json.dumps(judge))}</p>" if judge else ""}
<h2>Per task: {html.escape(NAMES.get(primary, primary))}</h2>{task_table}
<h2>Plots</h2>{plots or '<p class=muted>no plot for these metrics</p>'}
<h2>Examples</h2>{_examples(cfg, items, predictions, rows, report)}
</body></html>"""
    (report / "index.html").write_text(page, encoding="utf-8")
    (out / "results.json").write_text(json.dumps({"summary": summary, "rows": list(rows)}, indent=1, default=str))
    pd.DataFrame(list(rows)).to_parquet(out / "results.parquet", index=False)


def write_report(cfg: EvaluateConfig, items: Sequence[BenchItem], predictions: Sequence[Prediction],
                 rows: Sequence[dict], summary: dict[str, Any]) -> None:
    if storage.is_s3(cfg.output):
        with tempfile.TemporaryDirectory() as tmp:
            render(cfg, items, predictions, rows, summary, Path(tmp))
            storage.upload_dir(tmp, cfg.output)
        return
    render(cfg, items, predictions, rows, summary, Path(cfg.output))
