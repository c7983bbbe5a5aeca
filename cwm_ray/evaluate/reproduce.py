"""The paper's ablation table in miniature (PAPER.md §Strategy 1–2), on the toy world, from nothing.

    corpus ─► IDM on gold ─► annotate the unlabelled videos ─► world models
        (a) gold only   (b) gold + synthetic   (c) gold + synthetic + recognition weighting
    ─► evaluate each on the toy test set with best-of-N, N ∈ best_of ─► table.md / table.json / report

Each stage is the same library call its job makes, configured from that job's YAML plus overrides, in
one process and one Ray instance.

A re-run redoes exactly the stages whose fingerprint changed, and every stage downstream of them. A stage's
fingerprint hashes its resolved config and its inputs' fingerprints, and is kept in `stages/<stage>.json`
under `output`. A stage whose output exists but whose record is another config's is redone, not reused:
before, a changed backend retrained the world models but kept their old evaluations, and the table showed
them. A redone stage starts from nothing. Its outputs (and the run directory of a training stage it replaces)
are deleted, and a training stage's run name carries the fingerprint, since a redo under the old name would
resume the old checkpoint and annotation into the old output would resume its staging. A stage that crashed
under the same fingerprint is run again in place, so it resumes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import html
import json
import time
from collections.abc import Callable, Sequence
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
    to_dict,
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


def fingerprint(cfg: Any, inputs: Sequence[str]) -> str:
    """A stage's identity: its resolved config and what it read (its inputs' fingerprints), hashed.

    Hashing the resolved config rather than the overrides makes a change in a job's YAML count too.
    """
    payload = json.dumps({"config": to_dict(cfg), "inputs": list(inputs)}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _with_run_name(cfg: Any, name: str) -> Any:
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, name=name))


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

    def stage(key: str, label: str, job_cfg: Any, inputs: Sequence[str], outputs: Sequence[str], done_marker: str,
              run: Callable[[Any], Any], fp: str | None = None) -> str:
        """`run(job_cfg)` unless this fingerprint's run finished (stages/<key>.json says); returns the fingerprint."""
        fp = fp or fingerprint(job_cfg, inputs)
        record_path = storage.join(root, "stages", f"{key}.json")
        record = storage.read_json(record_path) if storage.exists(record_path) else None
        same = cfg.reuse and record is not None and record.get("fingerprint") == fp
        if same and record.get("status") == "done" and storage.exists(done_marker):
            _log(f"{label}: done already ({done_marker})")
            return fp
        if same:
            _log(f"{label}: resuming (same config, unfinished)")
        else:
            # Another config's output (or one of unknown origin) must not be resumed or counted as done.
            for old in sorted({*outputs, *(record or {}).get("outputs", [])}):
                storage.delete(old)
        entry = {"fingerprint": fp, "inputs": list(inputs), "outputs": list(outputs), "config": to_dict(job_cfg)}
        storage.write_json(record_path, entry | {"status": "started"})
        _log(f"{label} ...")
        t = time.perf_counter()
        run(job_cfg)
        timings[label] = round(time.perf_counter() - t, 1)
        storage.write_json(record_path, entry | {"status": "done"})
        _log(f"{label}: {timings[label]} s")
        return fp

    def train_stage(key: str, label: str, job_cfg: TrainIDMConfig | TrainWorldModelConfig,
                    inputs: Sequence[str]) -> str:
        """A training stage: its run is named after its fingerprint, so a changed config starts a fresh run."""
        fp = fingerprint(job_cfg, inputs)  # of the config with the plain run name, so the name can carry it
        job_cfg = _with_run_name(job_cfg, f"{job_cfg.train.name}-{fp[:8]}")
        export, run_dir = job_cfg.train.export, storage.join(job_cfg.train.storage_path, job_cfg.train.name)
        return stage(key, label, job_cfg, inputs, [export, run_dir], export, train, fp)

    corpus = storage.join(root, "corpus")
    gold = storage.join(corpus, "gold", "train.json")
    corpus_cfg = load(ToyCorpusConfig, _yaml("toy.yaml"), [f"output={corpus}", *cfg.corpus_overrides])
    corpus_fp = stage("corpus", "corpus", corpus_cfg, [], [corpus_cfg.output], storage.join(corpus, "corpus.json"),
                      make_corpus)

    runs, models = storage.join(root, "runs"), storage.join(root, "models")
    idm = storage.join(models, "idm")
    idm_fp = train_stage("idm", "IDM on gold", load(TrainIDMConfig, _yaml("train_idm.yaml"), [
        f"data.sources=[{{uri: '{gold}'}}]", f"train.storage_path={runs}", "train.name=idm",
        f"train.export={idm}", *cfg.idm_overrides]), [corpus_fp])

    # The world model's backend (e.g. world_model.backend=token) also decides whose encoder gives the
    # recognition weights at annotation, and how the models are evaluated.
    backend = [o for o in cfg.world_model_overrides if o.startswith("world_model.backend=")]
    annotated = storage.join(root, "annotated")
    annotate_cfg = load(AnnotateConfig, _yaml("annotate.yaml"), [
        f"inputs=[{{name: toy, uri: '{storage.join(corpus, 'videos')}'}}]", f"output={annotated}",
        f"idm.model={idm}", *backend, *cfg.annotate_overrides])
    annotate_fp = stage("annotate", "annotate", annotate_cfg, [corpus_fp, idm_fp], [annotate_cfg.output],
                        storage.join(annotated, "summary.json"), annotate)

    synthetic = f"{{uri: '{storage.join(annotated, 'triplets')}', weight: {cfg.synthetic_weight}}}"
    results: dict[str, dict[str, Any]] = {}
    for row, (use_synthetic, weighted) in ROWS.items():
        wm, out = storage.join(models, f"world_model_{row}"), storage.join(root, "eval", row)
        sources = f"[{{uri: '{gold}'}}" + (f", {synthetic}]" if use_synthetic else "]")
        wm_fp = train_stage(f"world_model_{row}", f"world model ({row}) {ROW_NAMES[row]}", load(
            TrainWorldModelConfig, _yaml("train_world_model.yaml"), [
                f"data.sources={sources}", f"recognition.enabled={str(weighted).lower()}",
                f"train.storage_path={runs}", f"train.name=world_model_{row}", f"train.export={wm}",
                *cfg.world_model_overrides]),
            [corpus_fp, annotate_fp] if use_synthetic else [corpus_fp])
        best_of = cfg.best_of if row == "c" else [1]
        eval_cfg = load(EvaluateConfig, _yaml("evaluate.yaml"), [
            f"bench={storage.join(corpus, 'gold', 'test.json')}", f"world_model.model={wm}", f"idm.model={idm}",
            f"best_of=[{','.join(str(n) for n in best_of)}]", f"output={out}", *backend, *cfg.evaluate_overrides])
        stage(f"evaluate_{row}", f"evaluate ({row})", eval_cfg, [corpus_fp, idm_fp, wm_fp], [eval_cfg.output],
              storage.join(out, "results.json"), evaluate)
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
