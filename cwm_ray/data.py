"""Gold (AURORA-format) and synthetic (Parquet) triplets as Ray Datasets for training and evaluation.

AURORA's training files say `instruction`; AURORA-Bench's test.json says `prompt`. We accept both,
keep every unknown field, and allow a missing or empty `output` (benchmark items without a reference).
Every training row carries `id`, `source`, `target` (encoded image bytes), `action` and `weights` /
`weights_shape`: the recognition map the annotation job stored with a synthetic triplet, null on gold rows (the
world model computes theirs from its own encoder at collate time), so a map is computed once and used as stored.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import ray.data

from cwm_ray import storage
from cwm_ray.config import DataSection, DataSource, StorageConfig
from cwm_ray.schema import WEIGHT_FIELDS

TRAIN_COLUMNS = ["id", "source", "target", "action"]
WEIGHT_COLUMNS = [f.name for f in WEIGHT_FIELDS]
TRAIN_SCHEMA = pa.schema([pa.field("id", pa.string()), pa.field("source", pa.binary()),
                          pa.field("target", pa.binary()), pa.field("action", pa.string()), *WEIGHT_FIELDS])
"""Every source's rows, gold and synthetic alike, so they union without dropping the stored weight maps."""


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


def _load_images(batch: dict[str, np.ndarray], cfg: StorageConfig | None) -> pa.Table:
    """Ray Data batch UDF: gold URIs → image bytes, no weight map. I/O bound, so it asks for a fraction of a CPU."""
    n = len(batch["id"])
    return pa.table({
        "id": [str(i) for i in batch["id"]],
        "source": [storage.read_bytes(u, cfg) for u in batch["input"]],
        "target": [storage.read_bytes(u, cfg) for u in batch["output"]],
        "action": [str(a) for a in batch["action"]],
        "weights": pa.nulls(n, pa.binary()), "weights_shape": pa.nulls(n, pa.list_(pa.int64())),
    }, schema=TRAIN_SCHEMA)


def _as_train_rows(batch: pa.Table) -> pa.Table:
    """Ray Data batch UDF: a triplet block in TRAIN_SCHEMA (null maps where the Parquet has none)."""
    columns = {f.name: batch.column(f.name).cast(f.type) if f.name in batch.column_names
               else pa.nulls(batch.num_rows, f.type) for f in TRAIN_SCHEMA}
    return pa.table(columns, schema=TRAIN_SCHEMA)


LOAD_TASK_CPUS = 0.25
"""CPU of each Ray Data task that reads a training source's images: what must stay free beside the Train workers."""


def _source_dataset(src: DataSource, section: DataSection, cfg: StorageConfig | None) -> tuple[Any, Any, int]:
    """(train, val, train rows) of one source, with its weight applied to the train part.

    The row count is taken without reading an image (the JSON's items; the Parquet's `id` column), so the driver
    can derive `max_steps` from `optim.epochs` before training; a fractional weight's share is its expectation
    (Ray Data's `random_sample` keeps each row with that probability).
    """
    frac = section.val_fraction
    if src.uri.endswith(".json"):
        items = [it for it in read_aurora(src.uri, cfg) if it["output"]]
        if section.max_rows:
            items = items[: section.max_rows]
        rows = [{"id": it["id"], "action": it["action"], "input": it["input"], "output": it["output"]} for it in items]
        train = [r for r in rows if not _in_val(r["id"], frac)]
        val = [r for r in rows if _in_val(r["id"], frac)]

        def load(rs: list[dict[str, Any]]) -> Any:
            if not rs:
                return None
            return ray.data.from_items(rs).map_batches(_load_images, fn_kwargs={"cfg": cfg}, batch_size=64,
                                                       num_cpus=LOAD_TASK_CPUS)

        train_ds, val_ds, n_train = load(train), load(val), len(train)
    else:  # a Parquet directory of triplets (annotation output), its stored weight maps kept
        fs, path = storage.filesystem(src.uri, cfg)
        ids = pq.ParquetDataset(path, filesystem=fs).read(columns=["id"]).column("id").to_pylist()
        ids = ids[: section.max_rows] if section.max_rows else ids
        n_train = sum(1 for i in ids if not _in_val(i, frac))
        ds = ray.data.read_parquet(path, filesystem=fs)
        ds = ds.select_columns([c for c in ds.schema().names if c in TRAIN_SCHEMA.names])
        if section.max_rows:
            ds = ds.limit(section.max_rows)
        ds = ds.map_batches(_as_train_rows, batch_format="pyarrow", batch_size=None, num_cpus=LOAD_TASK_CPUS)
        train_ds = ds.filter(lambda r: not _in_val(r["id"], frac))
        val_ds = ds.filter(lambda r: _in_val(r["id"], frac))
    if train_ds is not None and src.weight != 1.0:
        whole, part = int(src.weight), src.weight - int(src.weight)
        copies = [train_ds] * whole
        if part > 0:
            copies.append(train_ds.random_sample(part, seed=0))
        train_ds = copies[0].union(*copies[1:]) if len(copies) > 1 else copies[0]
        n_train = round(n_train * src.weight)
    return train_ds, val_ds, n_train if train_ds is not None else 0


@dataclass
class TrainingSets:
    """The mixed training set, the validation set (None when every source holds out nothing), and the training
    set's row count per epoch (exact for whole source weights)."""

    train: Any
    val: Any
    train_rows: int


def training_sets(section: DataSection, cfg: StorageConfig | None = None) -> TrainingSets:
    """The mixed train dataset, the validation dataset and the train rows, over every configured source.

    Every source's rows come in TRAIN_SCHEMA, so gold and synthetic rows union with the synthetic rows' stored
    weight maps kept (before, a mix dropped them and the world model recomputed every map at collate time).
    """
    if not section.sources:
        raise ValueError("data.sources is empty: give at least one gold JSON or triplet Parquet directory")
    trains, vals, rows = [], [], 0
    for src in section.sources:
        if not storage.exists(src.uri, cfg):
            raise FileNotFoundError(f"training source not found: {src.uri}")
        t, v, n = _source_dataset(src, section, cfg)
        trains += [t] if t is not None else []
        vals += [v] if v is not None else []
        rows += n
    if not trains:
        raise ValueError("no training rows in data.sources")
    train = trains[0].union(*trains[1:]) if len(trains) > 1 else trains[0]
    val = (vals[0].union(*vals[1:]) if len(vals) > 1 else vals[0]) if vals else None
    if section.materialize:
        train, val = train.materialize(), val.materialize() if val is not None else None
    return TrainingSets(train, val, rows)


def training_datasets(section: DataSection, cfg: StorageConfig | None = None) -> tuple[Any, Any]:
    """(train, val) of `training_sets`."""
    sets = training_sets(section, cfg)
    return sets.train, sets.val


def actor_stage(res: Any, batch_format: str) -> dict[str, Any]:
    """`map_batches` keyword arguments of a model stage (a StageResources): a fixed actor pool, resources
    and batch size from config. One helper so annotation and evaluation size their pools alike."""
    pool = ray.data.ActorPoolStrategy(size=max(1, res.concurrency),
                                      max_tasks_in_flight_per_actor=max(1, res.max_tasks_in_flight_per_actor))
    return {"compute": pool, "num_cpus": res.num_cpus,
            "num_gpus": res.num_gpus or None, "batch_size": res.batch_size, "batch_format": batch_format}
