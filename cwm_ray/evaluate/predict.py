"""Predictions for a benchmark: every item's candidates and their verifier scores.

Offline, a Ray Data batch job with two actor stages (world model, then the IDM verifier), sized by
config like the annotation job's; or online, against a running Serve app's `/v1/predict`. Both draw
item i's candidate j from the seed (item_seed(seed, id), 0, j), so they give the same candidates, and
the first N candidates of a run with max(best_of) are exactly what best_of = N would sample.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from cwm_ray import storage
from cwm_ray.config import EvaluateConfig, IDMConfig, StageResources, WorldModelConfig
from cwm_ray.evaluate.bench import BenchItem
from cwm_ray.preflight import check_job_fits


@dataclass
class Prediction:
    id: str
    candidates: list[bytes]
    """PNG bytes, in sampling order."""
    scores: list[float]
    """Verifier log p(action | source, candidate), aligned with `candidates`."""


def item_seed(seed: int, item_id: str) -> int:
    """A per-item seed: items differ, and an item's candidates do not depend on the rest of the run."""
    return int(hashlib.sha1(f"{seed}:{item_id}".encode()).hexdigest()[:15], 16)


def choose(scores: Sequence[float], n: int) -> int:
    """The best-of-n choice: the highest-scoring of the first n candidates (ties: the earliest)."""
    from cwm_ray.verify import rank

    return rank(list(scores)[:n])[0]


class CandidateSampler:
    """Ray Data actor: `n` world-model candidates per item, from one batched sampling call."""

    def __init__(self, cfg: WorldModelConfig, n: int, seed: int, torch_threads: int = 0) -> None:
        _threads(torch_threads)
        from cwm_ray.world_model import load_world_model

        self.model, self.n, self.seed = load_world_model(cfg), n, seed

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        from cwm_ray.schema import encode_image

        seeds = [item_seed(self.seed, i) for i in batch["id"]]
        out = self.model.sample(list(batch["source"]), [str(a) for a in batch["action"]], self.n, seeds)
        return pd.DataFrame({"id": batch["id"], "source": batch["source"], "action": batch["action"],
                             "candidates": [[encode_image(im) for im in cands] for cands in out]})


class CandidateVerifier:
    """Ray Data actor: the IDM's log p(action | source, candidate) for every candidate, one pass per batch."""

    def __init__(self, cfg: IDMConfig, torch_threads: int = 0) -> None:
        _threads(torch_threads)
        from cwm_ray.idm import InverseDynamicsModel

        self.model = InverseDynamicsModel.load(cfg)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        counts = [len(c) for c in batch["candidates"]]
        flat = self.model.score_batch(
            [s for s, k in zip(batch["source"], counts, strict=True) for _ in range(k)],
            [c for cands in batch["candidates"] for c in cands],
            [str(a) for a, k in zip(batch["action"], counts, strict=True) for _ in range(k)]).tolist()
        ends = np.cumsum(counts).tolist()
        return pd.DataFrame({"id": batch["id"], "candidates": batch["candidates"],
                             "scores": [flat[e - k:e] for k, e in zip(counts, ends, strict=True)]})


def _threads(n: int) -> None:
    if n > 0:
        import torch

        torch.set_num_threads(n)


def _actor_kwargs(stage: StageResources) -> dict[str, Any]:
    from cwm_ray.data import actor_stage

    return actor_stage(stage, "pandas")


def predict_offline(items: Sequence[BenchItem], cfg: EvaluateConfig) -> list[Prediction]:
    """max(best_of) candidates per item and their scores, as a Ray Data job (actor pools from config)."""
    import ray
    import ray.data

    if not ray.is_initialized():
        ray.init(runtime_env={"env_vars": {"RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}})
    check_job_fits(cfg)  # actor pools the cluster cannot hold, now or autoscaled: an error, not a wait
    n = max(cfg.best_of)
    wm_cfg, idm_cfg = storage.with_local_paths(cfg.world_model), storage.with_local_paths(cfg.idm)
    ds = ray.data.from_items([{"id": it.id, "source": it.source, "action": it.action} for it in items],
                             override_num_blocks=max(1, min(len(items) // max(1, cfg.world_model_stage.batch_size),
                                                            200)))
    ds = ds.map_batches(CandidateSampler, fn_constructor_args=(wm_cfg, n, cfg.seed,
                                                               cfg.world_model_stage.torch_threads),
                        **_actor_kwargs(cfg.world_model_stage))
    ds = ds.map_batches(CandidateVerifier, fn_constructor_args=(idm_cfg, cfg.verifier_stage.torch_threads),
                        **_actor_kwargs(cfg.verifier_stage))
    rows = {r["id"]: r for r in ds.take_all()}
    return [Prediction(it.id, [bytes(c) for c in rows[it.id]["candidates"]],
                       [float(s) for s in rows[it.id]["scores"]]) for it in items]


def predict_endpoint(items: Sequence[BenchItem], cfg: EvaluateConfig) -> list[Prediction]:
    """The same, from a running Serve app (`endpoint=http://host:8000`): one /v1/predict per item."""
    import httpx

    key = os.environ.get(cfg.endpoint_api_key_env, "")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    n = max(cfg.best_of)

    def one(item: BenchItem) -> Prediction:
        body = {"image": base64.b64encode(item.source).decode(), "action": item.action, "best_of": n,
                "seed": item_seed(cfg.seed, item.id), "return_candidates": True}
        with httpx.Client(base_url=cfg.endpoint or "", headers=headers, timeout=600) as client:
            for attempt in range(3):
                r = client.post("/v1/predict", json=body)
                if r.status_code < 500 or attempt == 2:
                    break
        if r.status_code != 200:
            raise RuntimeError(f"{cfg.endpoint}/v1/predict answered {r.status_code} for item {item.id}: {r.text[:300]}")
        cands = r.json()["candidates"]
        return Prediction(item.id, [base64.b64decode(c["image"]) for c in cands], [float(c["score"]) for c in cands])

    with ThreadPoolExecutor(max(1, cfg.endpoint_concurrency)) as pool:
        return list(pool.map(one, items))


def predict(items: Sequence[BenchItem], cfg: EvaluateConfig) -> list[Prediction]:
    if min(cfg.best_of) < 1:
        raise ValueError(f"best_of values must be >= 1, got {cfg.best_of}")
    cfg = dataclasses.replace(cfg, best_of=sorted(set(cfg.best_of)))
    return predict_endpoint(items, cfg) if cfg.endpoint else predict_offline(items, cfg)
