"""The paper's ablation table in miniature (PAPER.md §Strategy 1–2), on the toy world, from nothing.

    corpus ─► IDM on gold ─► annotate the unlabelled videos ─► world models
        (a) gold only   (b) gold + synthetic   (c) gold + synthetic + recognition weighting
    ─► evaluate each on the toy test set with best-of-N, N ∈ best_of ─► table.md / table.json / report

Each stage is the same library call its job makes, configured from that job's YAML plus overrides, in
one process and one Ray instance. A stage whose output is complete is skipped on a re-run.
"""

from __future__ import annotations

import html
import json
import time
from functools import partial
from pathlib import Path
from typing import Any

from cwm_ray import storage
from cwm_ray.config import (
    REPO_ROOT,
    AnnotateConfig,
    EvaluateConfig,
    ReproduceConfig,
    ToyCorpusConfig,
    TrainIDMConfig,
    TrainWorldModelConfig,
    load,
)

ROWS = {  # row → (uses synthetic triplets, recognition weighting)
    "a": (False, False),
    "b": (True, False),
    "c": (True, True),
}
ROW_NAMES = {"a": "gold only", "b": "+ IDM-annotated synthetic", "c": "+ recognition weighting"}
COLUMNS = ["toy_score", "toy_edit_success", "toy_minimal_edit", "idm_agreement", "l1"]


def _yaml(name: str) -> Path:
    return REPO_ROOT / "configs" / name


def _done(path: str) -> bool:
    return storage.exists(path)


def _log(msg: str) -> None:
    print(f"[reproduce] {msg}", flush=True)


def reproduce(cfg: ReproduceConfig) -> dict[str, Any]:
    from cwm_ray.annotate import annotate
    from cwm_ray.evaluate.pipeline import evaluate
    from cwm_ray.toyworld.corpus import make_corpus
    from cwm_ray.train import train

    t0 = time.perf_counter()
    root = str(Path(cfg.output).resolve()) if not storage.is_s3(cfg.output) else cfg.output
    timings: dict[str, float] = {}

    def stage(name: str, done_marker: str, fn: Any) -> None:
        if cfg.reuse and _done(done_marker):
            _log(f"{name}: done already ({done_marker})")
            return
        _log(f"{name} ...")
        t = time.perf_counter()
        fn()
        timings[name] = round(time.perf_counter() - t, 1)
        _log(f"{name}: {timings[name]} s")

    corpus = storage.join(root, "corpus")
    gold = storage.join(corpus, "gold", "train.json")
    stage("corpus", storage.join(corpus, "corpus.json"), lambda: make_corpus(
        load(ToyCorpusConfig, _yaml("toy.yaml"), [f"output={corpus}", *cfg.corpus_overrides])))

    runs, models = storage.join(root, "runs"), storage.join(root, "models")
    idm = storage.join(models, "idm")
    stage("IDM on gold", storage.join(idm, "config.json"), lambda: train(load(TrainIDMConfig, _yaml("train_idm.yaml"), [
        f"data.sources=[{{uri: '{gold}'}}]", f"train.storage_path={runs}", "train.name=idm",
        f"train.export={idm}", *cfg.idm_overrides])))

    # The world model's backend (e.g. world_model.backend=token) also decides whose encoder gives the
    # recognition weights at annotation, and how the models are evaluated.
    backend = [o for o in cfg.world_model_overrides if o.startswith("world_model.backend=")]
    annotated = storage.join(root, "annotated")
    stage("annotate", storage.join(annotated, "summary.json"), lambda: annotate(load(
        AnnotateConfig, _yaml("annotate.yaml"), [
            f"inputs=[{{name: toy, uri: '{storage.join(corpus, 'videos')}'}}]", f"output={annotated}",
            f"idm.model={idm}", *backend, *cfg.annotate_overrides])))

    synthetic = f"{{uri: '{storage.join(annotated, 'triplets')}', weight: {cfg.synthetic_weight}}}"

    def train_world_model(row: str, wm: str, use_synthetic: bool, weighted: bool) -> None:
        sources = f"[{{uri: '{gold}'}}" + (f", {synthetic}]" if use_synthetic else "]")
        train(load(TrainWorldModelConfig, _yaml("train_world_model.yaml"), [
            f"data.sources={sources}", f"recognition.enabled={str(weighted).lower()}", f"train.storage_path={runs}",
            f"train.name=world_model_{row}", f"train.export={wm}", *cfg.world_model_overrides]))

    def evaluate_row(wm: str, out: str, best_of: list[int]) -> None:
        evaluate(load(EvaluateConfig, _yaml("evaluate.yaml"), [
            f"bench={storage.join(corpus, 'gold', 'test.json')}", f"world_model.model={wm}", f"idm.model={idm}",
            f"best_of=[{','.join(str(n) for n in best_of)}]", f"output={out}", *backend, *cfg.evaluate_overrides]))

    results: dict[str, dict[str, Any]] = {}
    for row, (use_synthetic, weighted) in ROWS.items():
        wm, out = storage.join(models, f"world_model_{row}"), storage.join(root, "eval", row)
        stage(f"world model ({row}) {ROW_NAMES[row]}", storage.join(wm, "unet", "config.json"),
              partial(train_world_model, row, wm, use_synthetic, weighted))
        stage(f"evaluate ({row})", storage.join(out, "results.json"),
              partial(evaluate_row, wm, out, cfg.best_of if row == "c" else [1]))
        results[row] = storage.read_json(storage.join(out, "results.json"))["summary"]

    table = build_table(results)
    table |= {"seconds": round(time.perf_counter() - t0, 1), "stage_seconds": timings}
    write_table(root, table)
    return table


def build_table(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    rows = []
    for row, summary in results.items():
        for r in summary["overall"]:
            if r["system"] == "copy" and row != "a":
                continue
            name = "copy the source" if r["system"] == "copy" else (
                f"({row}) {ROW_NAMES[row]}" + (f" + best-of-{r['best_of']}" if r["best_of"] > 1 else ""))
            rows.append({"row": name, "items": r["items"], **{c: r.get(c) for c in COLUMNS}})
    copy = [r for r in rows if r["row"] == "copy the source"]
    return {"rows": [r for r in rows if r["row"] != "copy the source"] + copy, "columns": COLUMNS}


def markdown(table: dict[str, Any]) -> str:
    cols = table["columns"]
    lines = ["| world model | items | " + " | ".join(cols) + " |", "|---|---:|" + "---:|" * len(cols)]
    for r in table["rows"]:
        cells = " | ".join("–" if r[c] is None else f"{r[c]:.2f}" for c in cols)
        lines.append(f"| {r['row']} | {r['items']} | {cells} |")
    return "\n".join(lines)


def write_table(root: str, table: dict[str, Any]) -> None:
    md = markdown(table)
    print("\n" + md + f"\n\n(total {table['seconds']} s)", flush=True)
    storage.write_text(storage.join(root, "table.md"), md + "\n")
    storage.write_json(storage.join(root, "table.json"), table)
    links = "".join(f'<li><a href="../eval/{r}/report/index.html">row ({r}) report</a></li>' for r in ROWS)
    body = "".join(f"<tr><td>{html.escape(r['row'])}</td><td>{r['items']}</td>" + "".join(
        f"<td>{'–' if r[c] is None else f'{r[c]:.2f}'}</td>" for c in table["columns"]) + "</tr>"
        for r in table["rows"])
    head = "".join(f"<th>{c}</th>" for c in table["columns"])
    page = (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>cwm_ray: the table in miniature</title>"
            f"<style>body{{font-family:system-ui,sans-serif;margin:2rem}}td,th{{border:1px solid #ccc;"
            f"padding:.3rem .6rem}}table{{border-collapse:collapse}}</style></head><body>"
            f"<h1>The paper's table in miniature (toy world)</h1><table><tr><th>world model</th><th>items</th>{head}"
            f"</tr>{body}</table><p>{json.dumps(table['stage_seconds'])}</p><ul>{links}</ul></body></html>")
    storage.write_text(storage.join(root, "report", "index.html"), page)
