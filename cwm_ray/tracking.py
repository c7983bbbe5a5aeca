"""Experiment tracking in MLflow through Ray's integration (`ray.air.integrations.mlflow.setup_mlflow`).

Why `setup_mlflow` and not `MLflowLoggerCallback`: the callback is a Ray Tune `LoggerCallback`, which Ray Train v2
(the default in Ray 2.60) does not take; `setup_mlflow` is the integration Ray documents for a Train loop. It opens
the run on the rank-0 worker only (the others get a no-op module), logs the config as the run's parameters, and
hands back the `mlflow` module. Evaluation runs in the driver and calls the same function there.

A local directory is an MLflow *file store*. MLflow 3.18 keeps that store in maintenance mode behind
MLFLOW_ALLOW_FILE_STORE=true, which is set here for a directory URI: the alternatives are a tracking server or a
SQLite store, which needs SQLAlchemy and the full `mlflow` package instead of `mlflow-skinny`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from pathlib import Path
from typing import Any

from cwm_ray.config import DEFAULT_OUTPUT_ROOT, TrackingConfig

DEFAULT_STORE = f"{DEFAULT_OUTPUT_ROOT}/mlruns"


def resolve(cfg: TrackingConfig) -> TrackingConfig:
    """The tracking URI as every process will use it: set, else $MLFLOW_TRACKING_URI, else outputs/mlruns; a
    directory is made absolute here, in the driver, since Ray's workers start in other directories."""
    uri = cfg.uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_STORE
    if "://" not in uri and not uri.startswith("databricks"):
        uri = Path(uri).expanduser().resolve().as_uri()
    return dataclasses.replace(cfg, uri=uri)


def start(cfg: TrackingConfig, run_name: str, params: dict[str, Any] | None, run_id: str | None = None,
          tags: dict[str, str] | None = None) -> Any:
    """An active MLflow run (Ray's `setup_mlflow`): a new one with `params`, or `run_id` resumed (its params are
    logged already). Returns the `mlflow` module, or Ray's no-op module on a Train worker other than rank 0."""
    from ray.air.integrations.mlflow import setup_mlflow

    cfg = resolve(cfg)
    assert cfg.uri is not None
    if cfg.uri.startswith("file:"):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # see the module docstring
    kwargs = {"tracking_uri": cfg.uri, "experiment_name": cfg.experiment, "run_name": run_name,
              "create_experiment_if_not_exists": True, "tags": tags}
    if run_id:
        os.environ["MLFLOW_RUN_ID"] = run_id  # mlflow.start_run resumes it (and clears the variable)
        try:
            return setup_mlflow(config=None, **kwargs)
        except Exception as exc:  # noqa: BLE001 (the run is gone, e.g. another tracking URI: start a new one)
            os.environ.pop("MLFLOW_RUN_ID", None)
            print(f"[tracking] cannot resume MLflow run {run_id} ({type(exc).__name__}); a new run", flush=True)
    return setup_mlflow(config=params, **kwargs)


def numeric(metrics: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of a metrics dict, under names MLflow accepts (letters, digits, `_-. /`)."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            continue
        out[re.sub(r"[^\w\-. /]", "_", key)] = float(value)
    return out


def log_evaluation(cfg: TrackingConfig, config: dict[str, Any], summary: dict[str, Any], run_name: str) -> str | None:
    """One run for an evaluation: the config as parameters, each system's mean metrics (overall and per task);
    returns the run id."""
    if not cfg.enabled:
        return None
    mlflow = start(cfg, run_name, config, tags={"cwm_ray.job": "evaluate"})
    metrics: dict[str, float] = {}
    for row in summary.get("overall", []):
        name = f"{row['system']}_best_of_{row['best_of']}" if row.get("best_of") is not None else row["system"]
        metrics |= {f"{name}/{k}": v for k, v in numeric({m: row.get(m) for m in summary["metrics"]}).items()}
    for row in summary.get("per_task", []):
        name = f"{row['system']}_best_of_{row['best_of']}" if row.get("best_of") is not None else row["system"]
        metrics |= {f"{name}/{row['task']}/{k}": v
                    for k, v in numeric({m: row.get(m) for m in summary["metrics"]}).items()}
    metrics |= numeric({"items": summary.get("items"), "prediction_seconds": summary.get("prediction_seconds")})
    mlflow.log_metrics(metrics)
    run_id = mlflow.active_run().info.run_id
    mlflow.end_run()
    return str(run_id)
