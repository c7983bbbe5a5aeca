"""Gold (AURORA-format) and synthetic (Parquet) triplets as Ray Datasets for training and evaluation.

AURORA's training files say `instruction`; AURORA-Bench's test.json says `prompt`. We accept both,
keep every unknown field, and allow a missing or empty `output` (benchmark items without a reference).
Every training row carries `id`, `source`, `target` (encoded image bytes) and `action`; synthetic
rows may also carry `weights` / `weights_shape` from the annotation job.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import ray
import ray.data

from cwm_ray import storage
from cwm_ray.config import DataSection, DataSource, StorageConfig

TRAIN_COLUMNS = ["id", "source", "target", "action"]


def read_aurora(uri: str, cfg: StorageConfig | None = None) -> list[dict[str, Any]]:
    """Items of an AURORA-format JSON, with `input` / `output` made absolute URIs and `action` set."""
    items = storage.read_json(uri, cfg)
    if not isinstance(items, list):
        raise ValueError(f"{uri}: expected a JSON list of items, got {type(items).__name__}")
    base = uri.rsplit("/", 1)[0] if "/" in uri else "."
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or "input" not in item:
            raise ValueError(f"{uri}: item {i} has no 'input'")
        text = item.get("prompt", item.get("instruction"))
        if not isinstance(text, str):
            raise ValueError(f"{uri}: item {i} has neither 'prompt' nor 'instruction'")
        row = dict(item)
        row["action"] = text
        row["input"] = storage.join(base, item["input"])
        row["output"] = storage.join(base, item["output"]) if item.get("output") else None
        row.setdefault("id", hashlib.sha1(f"{uri}#{i}".encode()).hexdigest()[:20])
        row["id"] = str(row["id"])
        out.append(row)
    return out


def _in_val(item_id: str, val_fraction: float) -> bool:
    h = int(hashlib.sha1(item_id.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return h < val_fraction


def _load_images(batch: dict[str, np.ndarray], cfg: StorageConfig | None) -> dict[str, np.ndarray]:
    """Ray Data batch UDF: gold URIs → image bytes. I/O bound, so it asks for a fraction of a CPU."""
    return {
        "id": batch["id"],
        "action": batch["action"],
        "source": np.array([storage.read_bytes(u, cfg) for u in batch["input"]], dtype=object),
        "target": np.array([storage.read_bytes(u, cfg) for u in batch["output"]], dtype=object),
    }


LOAD_TASK_CPUS = 0.25
"""CPU of each Ray Data task that reads a training source's images: what must stay free beside the Train workers."""


def _source_dataset(src: DataSource, section: DataSection, cfg: StorageConfig | None) -> tuple[Any, Any]:
    """(train, val) Ray Datasets of one source, with its weight applied to the train part."""
    if src.uri.endswith(".json"):
        items = [it for it in read_aurora(src.uri, cfg) if it["output"]]
        if section.max_rows:
            items = items[: section.max_rows]
        rows = [{"id": it["id"], "action": it["action"], "input": it["input"], "output": it["output"]} for it in items]
        train = [r for r in rows if not _in_val(r["id"], section.val_fraction)]
        val = [r for r in rows if _in_val(r["id"], section.val_fraction)]

        def load(rs: list[dict[str, Any]]) -> Any:
            if not rs:
                return None
            return ray.data.from_items(rs).map_batches(_load_images, fn_kwargs={"cfg": cfg}, batch_size=64,
                                                       num_cpus=LOAD_TASK_CPUS)

        train_ds, val_ds = load(train), load(val)
    else:  # a Parquet directory of triplets (annotation output)
        fs, path = storage.filesystem(src.uri, cfg)
        ds = ray.data.read_parquet(path, filesystem=fs)
        keep = [c for c in ds.schema().names if c in (*TRAIN_COLUMNS, "weights", "weights_shape")]
        ds = ds.select_columns(keep)
        if section.max_rows:
            ds = ds.limit(section.max_rows)
        frac = section.val_fraction
        train_ds = ds.filter(lambda r: not _in_val(r["id"], frac))
        val_ds = ds.filter(lambda r: _in_val(r["id"], frac))
    if train_ds is not None and src.weight != 1.0:
        whole, part = int(src.weight), src.weight - int(src.weight)
        copies = [train_ds] * whole
        if part > 0:
            copies.append(train_ds.random_sample(part, seed=0))
        train_ds = copies[0].union(*copies[1:]) if len(copies) > 1 else copies[0]
    return train_ds, val_ds


def training_datasets(section: DataSection, cfg: StorageConfig | None = None) -> tuple[Any, Any]:
    """The mixed train dataset and the validation dataset over every configured source."""
    if not section.sources:
        raise ValueError("data.sources is empty: give at least one gold JSON or triplet Parquet directory")
    trains, vals = [], []
    for src in section.sources:
        if not storage.exists(src.uri, cfg):
            raise FileNotFoundError(f"training source not found: {src.uri}")
        t, v = _source_dataset(src, section, cfg)
        trains += [t] if t is not None else []
        vals += [v] if v is not None else []
    if not trains:
        raise ValueError("no training rows in data.sources")
    # Columns differ between gold (no weights) and synthetic rows (weights): keep what all share.
    # (Rows without stored weights get them from the model's own encoder at collate time.)
    if len(trains) > 1:
        trains = [t.select_columns(TRAIN_COLUMNS) for t in trains]
        vals = [v.select_columns(TRAIN_COLUMNS) for v in vals]
    train = trains[0].union(*trains[1:]) if len(trains) > 1 else trains[0]
    val = (vals[0].union(*vals[1:]) if len(vals) > 1 else vals[0]) if vals else None
    if section.materialize:
        train, val = train.materialize(), val.materialize() if val is not None else None
    return train, val


def actor_stage(res: Any, batch_format: str) -> dict[str, Any]:
    """`map_batches` keyword arguments of a model stage (a StageResources): a fixed actor pool, resources
    and batch size from config. One helper so annotation and evaluation size their pools alike."""
    pool = ray.data.ActorPoolStrategy(size=max(1, res.concurrency),
                                      max_tasks_in_flight_per_actor=max(1, res.max_tasks_in_flight_per_actor))
    return {"compute": pool, "num_cpus": res.num_cpus,
            "num_gpus": res.num_gpus or None, "batch_size": res.batch_size, "batch_format": batch_format}
