"""evaluate(cfg): benchmark → predictions (best-of-N for every N) → metrics + judge → results and report."""

from __future__ import annotations

import hashlib
import io
import json
import time
from collections.abc import Sequence
from typing import Any

from cwm_ray import storage
from cwm_ray.config import EvaluateConfig, to_dict
from cwm_ray.evaluate.bench import BenchItem, load_bench
from cwm_ray.evaluate.predict import Prediction, choose, predict
from cwm_ray.evaluate.summary import print_table, summarise


def _systems(cfg: EvaluateConfig) -> list[tuple[str, int | None]]:
    unknown = set(cfg.baselines) - {"copy"}
    if unknown:
        raise ValueError(f"unknown baselines {sorted(unknown)}; known: copy")
    return [("world_model", n) for n in sorted(set(cfg.best_of))] + [(b, None) for b in cfg.baselines]


def score_rows(items: Sequence[BenchItem], predictions: Sequence[Prediction], cfg: EvaluateConfig) -> list[dict]:
    """One row per (system, best_of, item) with every configured metric; each distinct image is scored once."""
    from cwm_ray.evaluate.metrics import Metrics

    idm = None
    if cfg.metrics.idm_agreement:
        from cwm_ray.idm import InverseDynamicsModel

        idm = InverseDynamicsModel.load(storage.with_local_paths(cfg.idm))
    # Which image each row shows: ("cand", item, j) or ("copy", item, None).
    picks: dict[tuple[str, int | None, int], tuple[str, int, int | None]] = {}
    for system, n in _systems(cfg):
        for i, pred in enumerate(predictions):
            wm = system == "world_model"
            picks[(system, n, i)] = ("cand", i, choose(pred.scores, n)) if wm else ("copy", i, None)
    unique = sorted(set(picks.values()), key=lambda k: (k[1], k[0], -1 if k[2] is None else k[2]))

    def image(key: tuple[str, int, int | None]) -> bytes:
        kind, i, j = key
        return items[i].source if kind == "copy" else predictions[i].candidates[j]

    values = Metrics(cfg.metrics, cfg.toy, idm)(
        [items[k[1]].source for k in unique], [items[k[1]].action for k in unique], [image(k) for k in unique],
        [items[k[1]].reference for k in unique])
    by_key = dict(zip(unique, values, strict=True))
    if cfg.judge.enabled:
        from cwm_ray.evaluate.judge import LLMJudge

        verdicts = LLMJudge(cfg.judge).judge_many([(items[k[1]].source, image(k), items[k[1]].action) for k in unique])
        for k, v in zip(unique, verdicts, strict=True):
            by_key[k] |= {"judge_score": v.score, "judge_editing_success": v.editing_success,
                          "judge_minimal_editing": v.minimal_editing, "judge_status": v.status,
                          "judge_reasoning": v.reasoning or v.raw[:500]}
    rows = []
    for (system, n, i), key in picks.items():
        item, pred = items[i], predictions[i]
        row = {"system": system, "best_of": n, "id": item.id, "task": item.task, "action": item.action,
               "chosen": key[2], "verifier_logp": pred.scores[key[2]] if key[2] is not None else None}
        rows.append(row | by_key[key])
    return rows


PREDICTIONS = "predictions"
"""Under `output`: `predictions.parquet` (every item's candidates and verifier scores) and `fingerprint.json`."""


def predictions_fingerprint(items: Sequence[BenchItem], cfg: EvaluateConfig) -> dict[str, Any]:
    """What decides the candidates and their scores: the items, both models' settings, the seed and the source of
    predictions. Search widths are left out: candidate j depends only on (seed, item, j), so a store with more
    candidates per item serves any smaller max(best_of)."""
    return {"items": hashlib.sha256("\n".join(it.id for it in items).encode()).hexdigest(), "bench": cfg.bench,
            "world_model": to_dict(cfg.world_model), "idm": to_dict(cfg.idm), "seed": cfg.seed,
            "endpoint": cfg.endpoint}


def load_predictions(items: Sequence[BenchItem], cfg: EvaluateConfig) -> list[Prediction] | None:
    """The predictions a run with this config saved in `output` before judging; None when there are none to reuse
    (none saved, another config, or fewer candidates per item than max(best_of) needs)."""
    import pyarrow.parquet as pq

    base = storage.join(cfg.output, PREDICTIONS)
    meta_uri, data_uri = storage.join(base, "fingerprint.json"), storage.join(base, "predictions.parquet")
    if not storage.exists(meta_uri) or not storage.exists(data_uri):
        return None
    meta = storage.read_json(meta_uri)
    n = max(cfg.best_of)
    if meta.get("fingerprint") != json.loads(json.dumps(predictions_fingerprint(items, cfg))) or meta.get("n", 0) < n:
        print(f"[evaluate] predictions in {base} were made with another config: predicting anew", flush=True)
        return None
    table = pq.read_table(io.BytesIO(storage.read_bytes(data_uri)))
    by_id = {r["id"]: r for r in table.to_pylist()}
    return [Prediction(it.id, [bytes(c) for c in by_id[it.id]["candidates"][:n]],
                       [float(x) for x in by_id[it.id]["scores"][:n]]) for it in items]


def save_predictions(items: Sequence[BenchItem], predictions: Sequence[Prediction], cfg: EvaluateConfig) -> None:
    """Candidates and scores into `output` before any judging, the fingerprint last (it marks the data complete):
    a judge that fails, or a job that dies after sampling, costs no GPU time again."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    base = storage.join(cfg.output, PREDICTIONS)
    table = pa.table({"id": [p.id for p in predictions],
                      "candidates": pa.array([p.candidates for p in predictions], pa.list_(pa.binary())),
                      "scores": pa.array([p.scores for p in predictions], pa.list_(pa.float64()))})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    storage.write_bytes(storage.join(base, "predictions.parquet"), buf.getvalue(), cfg.storage)
    storage.write_json(storage.join(base, "fingerprint.json"),
                       {"fingerprint": predictions_fingerprint(items, cfg), "n": max(cfg.best_of)}, cfg.storage)


def evaluate(cfg: EvaluateConfig) -> dict[str, Any]:
    from cwm_ray.evaluate.report import write_report

    t0 = time.perf_counter()
    if cfg.judge.enabled:  # before any prediction: the judge's key missing must not cost the GPU work
        from cwm_ray.preflight import check_judge_key

        check_judge_key(cfg.judge)
    storage.configure(cfg.storage)
    items = load_bench(cfg.bench, cfg.tasks, cfg.max_items, cfg.storage)
    print(f"[evaluate] {len(items)} items from {cfg.bench}; best_of {sorted(set(cfg.best_of))}", flush=True)
    t_pred = time.perf_counter()
    predictions = load_predictions(items, cfg)
    reused = predictions is not None
    if predictions is None:
        predictions = predict(items, cfg)
        save_predictions(items, predictions, cfg)
    else:
        print(f"[evaluate] reusing the saved predictions in {storage.join(cfg.output, PREDICTIONS)}", flush=True)
    pred_seconds = time.perf_counter() - t_pred
    rows = score_rows(items, predictions, cfg)
    summary = summarise(rows, cfg.headline_tasks) | {"bench": cfg.bench, "items": len(items), "endpoint": cfg.endpoint,
                                 "world_model": cfg.world_model.model, "idm": cfg.idm.model,
                                 "predictions_reused": reused, "prediction_seconds": round(pred_seconds, 1),
                                 "seconds": round(time.perf_counter() - t0, 1), "config": to_dict(cfg)}
    write_report(cfg, items, predictions, rows, summary)
    print_table(summary)
    print(f"[evaluate] report: {storage.join(cfg.output, 'report', 'index.html')}", flush=True)
    if failed := summary["judge_status"].get("error"):
        print(f"[evaluate] warning: the judge failed on {failed} row(s) (judge_status 'error' in results.json): run "
              "the same command again; the saved predictions and the judge's cached answers are reused, and only "
              "the failed calls are made again", flush=True)
    _track(cfg, summary)
    return summary


def _track(cfg: EvaluateConfig, summary: dict[str, Any]) -> None:
    """The summary into MLflow (`cfg.tracking`), after the results are written: a tracking server that is down
    costs the run its MLflow entry, never its results."""
    from cwm_ray import tracking

    try:
        summary["mlflow_run_id"] = tracking.log_evaluation(cfg.tracking, to_dict(cfg), summary,
                                                           run_name=f"evaluate {cfg.output}")
    except Exception as exc:  # noqa: BLE001
        print(f"[evaluate] warning: MLflow tracking failed ({type(exc).__name__}: {exc}); results are in "
              f"{cfg.output}", flush=True)


__all__ = ["evaluate", "load_predictions", "predictions_fingerprint", "save_predictions", "score_rows"]
