"""finalize at scale: dedupe, stratified top-K and the AURORA export as Arrow / Ray Data operations.

A synthetic staging log (no models) with what crashes and retries leave in it: a video redone in a later
file, a half-staged video, permanent and transient error rows. finalize's outputs must equal what the
row-by-row reference (`_finished_reference`, first-copy dedupe, `filtering.select`) makes of the same log.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray

from cwm_ray.annotate import INDEX_COLUMNS, STAGING_SCHEMA, finalize, finished_mask, finished_videos, read_staging
from cwm_ray.config import AnnotateConfig, FilterConfig
from cwm_ray.filtering import select
from cwm_ray.schema import encode_image, pair_id

CLASSES = ["move left", "put above", "remove", "make", "open", "pick up"]


@pytest.fixture(scope="module")
def ray_local() -> None:
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled"}})
    yield
    ray.shutdown()


def _video_rows(rng: random.Random, uri: str, dataset: str, png: bytes) -> list[dict]:
    n = rng.randrange(1, 5)
    return [{"id": pair_id(uri, 2 * k, 2 * k + 1), "dataset": dataset, "video_uri": uri, "src_index": 2 * k,
             "tgt_index": 2 * k + 1, "source": png, "target": png, "width": 8, "height": 8, "video_pairs": n,
             "video_cuts": n % 3,
             "action": f"{rng.choice(CLASSES)} the cup", "action_class": rng.choice(CLASSES),
             "logprob": -rng.randrange(0, 8) / 4, "num_tokens": rng.randrange(1, 4)} for k in range(n)]


def _error_row(uri: str, dataset: str, transient: bool) -> dict:
    return {"id": pair_id(uri, -1, -1), "dataset": dataset, "video_uri": uri, "video_pairs": 0, "stage": "decode",
            "error_type": "OSError" if transient else "NotAVideo", "message": "x", "transient": transient}


def make_staging(output: Path, seed: int) -> None:
    """Three 'runs' of staging files over one corpus of 60 videos, as crashes and retries leave them."""
    rng = random.Random(seed)
    png = encode_image(np.full((8, 8, 3), 7, np.uint8))
    videos = [(f"s3://b/{d}/v{i:03d}.mp4", d) for d in ("ego", "web") for i in range(30)]
    files: list[list[dict]] = [[], [], []]
    for uri, d in videos:
        kind = rng.random()
        rows = _video_rows(rng, uri, d, png)
        if kind < 0.1:
            files[0].append(_error_row(uri, d, transient=False))
        elif kind < 0.2:  # half staged by a killed run, never redone: unfinished, left out
            files[0].extend(rows[: len(rows) - 1] if len(rows) > 1 else [])
        elif kind < 0.35:  # staged twice: a crash lost track of it, and a later run redid it
            files[0].extend(rows)
            files[2].extend(rows)
        elif kind < 0.45:  # failed transiently, then read by a later run
            files[0].append(_error_row(uri, d, transient=True))
            files[1].extend(rows)
        elif kind < 0.5:  # still failing transiently: reported, not finished
            files[1].append(_error_row(uri, d, transient=True))
        else:
            files[rng.randrange(3)].extend(rows)
    (output / "staging").mkdir(parents=True)
    for k, rows in enumerate(files):
        pq.write_table(pa.Table.from_pylist(rows, schema=STAGING_SCHEMA), output / "staging" / f"run{k}_0.parquet")


def _finished_reference(index: pa.Table) -> set[str]:
    """Finished videos as the row-by-row loop that `annotate.finished_videos` was before it used `finished_mask`."""
    seen: dict[str, set[str]] = {}
    expected: dict[str, int] = {}
    columns = (index.column(c).to_pylist() for c in ("video_uri", "id", "video_pairs", "error_type", "transient"))
    for vid, rid, n, err, transient in zip(*columns, strict=True):
        if err is not None:
            if not transient:
                expected[vid], seen[vid] = 0, {rid}
            continue
        seen.setdefault(vid, set()).add(rid)
        expected[vid] = int(n)
    return {v for v, ids in seen.items() if expected[v] == 0 or len(ids) >= expected[v]}


def _reference(index: pa.Table, cfg: FilterConfig) -> tuple[set[str], set[str], set[str]]:
    """(pair ids, kept ids, error video uris) as the row-by-row finalize computed them."""
    done = _finished_reference(index)
    rows = index.to_pylist()
    pairs = {r["id"]: r for r in rows if r["error_type"] is None and r["video_uri"] in done}
    errors = {r["video_uri"] for r in rows if r["error_type"] is not None and (r["video_uri"] in done) != bool(
        r["transient"])}
    return set(pairs), select(pairs.values(), cfg), errors


@pytest.mark.parametrize(("seed", "budget", "score"), [(0, 7, "sum"), (1, 3, "mean"), (2, 1000, "sum")])
def test_finalize_equals_the_row_by_row_reference(ray_local: None, tmp_path: Path, seed: int, budget: int,
                                                  score: str) -> None:
    make_staging(tmp_path, seed)
    cfg = AnnotateConfig(output=str(tmp_path), filter=FilterConfig(budget=budget, score=score))
    index, files = read_staging(cfg, INDEX_COLUMNS)
    assert set(index.filter(finished_mask(index)).column("video_uri").to_pylist()) == _finished_reference(index)
    assert finished_videos(index) == _finished_reference(index)
    pair_ids, kept, error_videos = _reference(index, cfg.filter)
    summary = finalize(cfg, index, files)

    pairs = pq.read_table(tmp_path / "pairs").column("id").to_pylist()
    triplets = pq.read_table(tmp_path / "triplets")
    assert sorted(pairs) == sorted(pair_ids)  # every finished pair, exactly once
    assert sorted(triplets.column("id").to_pylist()) == sorted(kept)
    assert triplets.column_names == pq.read_table(tmp_path / "pairs").column_names
    assert {e["video_uri"] for e in pq.read_table(tmp_path / "errors" / "errors.parquet").to_pylist()} == error_videos
    items = json.loads((tmp_path / "aurora" / "train.json").read_text())
    assert [i["id"] for i in items] == sorted(kept)  # sorted by id, as before
    assert all((tmp_path / "aurora" / i["input"]).exists() and (tmp_path / "aurora" / i["output"]).exists()
               for i in items)
    assert summary["pairs"] == len(pair_ids) and summary["triplets"] == len(kept)
    assert summary["videos_done"] == len(_finished_reference(index))
    cuts = {r["video_uri"]: r["video_cuts"] for r in index.to_pylist() if r["video_uri"] in _finished_reference(index)}
    assert summary["shot_cuts"] == sum(c or 0 for c in cuts.values()) > 0  # each finished video's cuts, once
    assert sum(c["triplets"] for c in summary["corpora"].values()) == len(kept)
    assert sum(sum(c["classes"].values()) for c in summary["corpora"].values()) == len(kept)
    assert not (tmp_path / "_selection").exists()


def test_finalize_of_nothing_but_errors(ray_local: None, tmp_path: Path) -> None:
    (tmp_path / "staging").mkdir()
    rows = [_error_row("a.mp4", "d", transient=False), _error_row("b.mp4", "d", transient=True)]
    pq.write_table(pa.Table.from_pylist(rows, schema=STAGING_SCHEMA), tmp_path / "staging" / "r.parquet")
    cfg = AnnotateConfig(output=str(tmp_path))
    summary = finalize(cfg, *read_staging(cfg, INDEX_COLUMNS))
    assert summary["pairs"] == summary["triplets"] == 0 and summary["errors"] == summary["transient_errors"] == 1
    assert summary["error_types"] == {"NotAVideo": 1} and summary["corpora"] == {}


def test_three_corpora_get_three_budgets_and_train_once_each(ray_local: None, tmp_path: Path) -> None:
    """The paper's mix (issue 33): 7K triplets from *each* of three corpora, each kept triplet trained on once per
    epoch beside the gold set (weight 1.0), with its stored recognition map."""
    from cwm_ray.config import DataSection, DataSource
    from cwm_ray.data import training_sets
    from cwm_ray.schema import weights_to_bytes

    rng = random.Random(0)
    png = encode_image(np.full((8, 8, 3), 7, np.uint8))
    wmap, shape = weights_to_bytes(np.full((2, 2), 1.0))
    corpora = {"moments": 40, "ucf101": 40, "kinetics700": 3}  # videos; the last corpus has fewer pairs than its budget
    rows = [r | {"weights": wmap, "weights_shape": shape} for name, n in corpora.items() for i in range(n)
            for r in _video_rows(rng, f"s3://b/{name}/v{i:03d}.mp4", name, png)]
    (tmp_path / "ann" / "staging").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=STAGING_SCHEMA), tmp_path / "ann" / "staging" / "r.parquet")
    budget = 20
    cfg = AnnotateConfig(output=str(tmp_path / "ann"), filter=FilterConfig(budget=budget), export_aurora=False)
    summary = finalize(cfg, *read_staging(cfg, INDEX_COLUMNS))
    pairs = {name: sum(r["dataset"] == name for r in rows) for name in corpora}
    assert pairs["moments"] > budget and pairs["ucf101"] > budget and pairs["kinetics700"] < budget
    assert {name: c["triplets"] for name, c in summary["corpora"].items()} == {
        name: min(budget, n) for name, n in pairs.items()}  # one budget per corpus, not one for the mix

    gold = tmp_path / "gold"
    (gold / "images").mkdir(parents=True)
    (gold / "images" / "a.png").write_bytes(png)
    (gold / "train.json").write_text(json.dumps([{"input": "images/a.png", "output": "images/a.png",
                                                  "instruction": f"act {k}", "id": f"g{k}"} for k in range(3)]))
    sets = training_sets(DataSection(sources=[DataSource(uri=str(gold / "train.json")),
                                              DataSource(uri=str(tmp_path / "ann" / "triplets"))], val_fraction=0))
    train = sets.train.take_all()
    ids = [r["id"] for r in train]
    kept = pq.read_table(tmp_path / "ann" / "triplets").column("id").to_pylist()
    assert len(ids) == len(set(ids)) == sets.train_rows == 3 + len(kept) == 3 + summary["triplets"]
    with_map = {r["id"] for r in train if r["weights"] is not None}
    assert with_map == set(kept)  # the synthetic rows keep annotation's maps through the mix
