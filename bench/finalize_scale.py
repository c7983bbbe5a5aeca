"""Finalize at scale: dedupe, stratified top-K and the AURORA export over 100K and 1M staged pairs.

    .venv/bin/python bench/finalize_scale.py [small=100000 rows=1000000 per_file=5000 keep=0.01]

A synthetic staging log like annotation's (no models): videos of 1-8 pairs with small PNGs, three corpora,
realistic ids (`pair_id`) and a skewed spread over 40 action classes, 1% of videos as error rows and 2%
staged twice (a video redone after a crash). Each size is finalized (`read_staging` + `finalize`, what
`annotate` runs after its pipeline) in a fresh process on a private Ray, which reports its seconds and the
driver's peak RSS. Goals: time grows linearly from `small` to `rows` (ratio <= rows/small) and the driver's
peak RSS stays under 2 GiB at `rows`. The budget is `keep` of each corpus, so the export grows with it.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import CACHE, REPO, emit, parse_args

DEFAULTS: dict[str, Any] = {"small": 100_000, "rows": 1_000_000, "per_file": 5000, "keep": 0.01, "quick": False}
CORPORA = ["ego", "web", "sim"]
VERBS = ["move", "put", "pick up", "open", "close", "push", "pull", "turn", "remove", "add"]
PARTICLES = ["", " left", " right", " above", " on"]


def make_staging(output: Path, rows: int, per_file: int, seed: int = 0) -> None:
    """`rows` staged rows in files of `per_file`, built column-wise (numpy + Arrow), written like Ray Data does."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from cwm_ray.annotate import STAGING_SCHEMA
    from cwm_ray.schema import encode_image, pair_id

    rng = np.random.default_rng(seed)
    pngs = [encode_image(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8) // 64 * 64) for _ in range(64)]
    classes = [v + p for v in VERBS for p in PARTICLES][:40]
    weights = 1.0 / np.arange(1, len(classes) + 1)  # a few frequent actions, a long tail
    sizes = rng.integers(1, 9, rows)  # pairs per video; trimmed to `rows` below
    video = np.repeat(np.arange(rows), sizes)[:rows]
    first = np.r_[True, video[1:] != video[:-1]]
    k = np.arange(rows) - np.maximum.accumulate(np.where(first, np.arange(rows), 0))
    pairs = np.bincount(video)[video]
    uris = np.array([f"s3://corpus/{CORPORA[v % 3]}/clips/{v // 1000:04d}/video_{v:07d}.mp4"
                     for v in range(video[-1] + 1)])
    error = (rng.random(video[-1] + 1) < 0.01)[video]
    cls = rng.choice(len(classes), rows, p=weights / weights.sum())
    ids = [pair_id(uris[v], 2 * j, 2 * j + 1) for v, j in zip(video.tolist(), k.tolist(), strict=True)]
    table = pa.table({
        "id": ids,
        "dataset": np.array(CORPORA)[video % 3], "video_uri": uris[video],
        "src_index": 2 * k, "tgt_index": 2 * k + 1, "src_time": k * 0.2, "tgt_time": k * 0.2 + 0.1,
        "motion": rng.random(rows), "source": pa.array([pngs[i] for i in rng.integers(0, 64, rows)], pa.binary()),
        "target": pa.array([pngs[i] for i in rng.integers(0, 64, rows)], pa.binary()),
        "width": np.full(rows, 16), "height": np.full(rows, 16), "video_pairs": np.where(error, 0, pairs),
        "error_type": pa.array(np.where(error, "NotAVideo", None)), "action": np.array(classes)[cls],
        "action_class": np.array(classes)[cls], "logprob": np.round(-rng.exponential(3.0, rows), 2),
        "num_tokens": rng.integers(3, 9, rows),
    })
    # An error video keeps one row, its error, whose images and labels are null as extract_pairs writes them.
    keep = ~error | (k == 0)
    table, error = table.filter(pa.array(keep)), pa.array(error[keep])
    columns = {}
    for f in STAGING_SCHEMA:
        if f.name not in table.column_names:
            columns[f.name] = pa.nulls(table.num_rows, f.type)
        elif f.name in ("source", "target", "action", "action_class", "logprob", "num_tokens"):
            columns[f.name] = pc.if_else(error, pa.scalar(None, f.type), table.column(f.name).cast(f.type))
        else:
            columns[f.name] = table.column(f.name).cast(f.type)
    table = pa.table(columns, schema=STAGING_SCHEMA)
    redone = table.filter(pa.array(np.isin(table.column("video_uri").to_numpy(zero_copy_only=False),
                                           uris[rng.random(len(uris)) < 0.02])))
    staging = output / "staging"
    staging.mkdir(parents=True)
    for n, start in enumerate(range(0, table.num_rows, per_file)):
        pq.write_table(table.slice(start, per_file), staging / f"run0_{n:06d}_000000.parquet")
    pq.write_table(redone, staging / "run1_000000_000000.parquet")  # a later run redid these videos


def child(output: str, keep: float) -> None:
    """Finalize one staging log, then print {seconds, peak_rss_mib, summary counts} as JSON."""
    import ray

    from cwm_ray.annotate import INDEX_COLUMNS, finalize, read_staging
    from cwm_ray.config import AnnotateConfig, FilterConfig

    meta = json.loads((Path(output) / "bench.json").read_text())
    budget = max(1, int(meta["rows"] * keep / len(CORPORA)))
    cfg = AnnotateConfig(output=output, filter=FilterConfig(budget=budget))
    # address="local": a Ray of this process's own, even when another is running on the machine.
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled"}})
    try:
        t0 = time.perf_counter()
        summary = finalize(cfg, *read_staging(cfg, INDEX_COLUMNS))
        seconds = time.perf_counter() - t0
    finally:
        ray.shutdown()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps({"seconds": seconds, "peak_rss_mib": round(peak, 1), "budget": budget,
                      **{k: summary[k] for k in ("pairs", "triplets", "errors", "videos_done")}}), flush=True)


def measure(rows: int, args: dict[str, Any]) -> dict[str, Any]:
    root = CACHE / f"finalize_scale_{rows}_{args['per_file']}"
    if not (root / "bench.json").exists():
        t0 = time.perf_counter()
        make_staging(root, rows, args["per_file"])
        (root / "bench.json").write_text(json.dumps({"rows": rows, "build_s": time.perf_counter() - t0}))
    for out in ("pairs", "triplets", "errors", "aurora"):
        subprocess.run(["rm", "-rf", str(root / out)], check=True)
    done = subprocess.run([sys.executable, __file__, "--child", str(root), str(args["keep"])], cwd=REPO,
                          check=True, capture_output=True, text=True, env=os.environ | {"RAY_AUTH_MODE": "disabled"})
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(args: dict[str, Any]) -> dict[str, Any]:
    if args["quick"]:
        args |= {"small": 10_000, "rows": 100_000}
    small, large = measure(args["small"], args), measure(args["rows"], args)
    ratio = large["seconds"] / small["seconds"]
    linear = args["rows"] / args["small"]
    rss_ok = large["peak_rss_mib"] < 2048
    return emit("finalize_scale", {k: args[k] for k in ("small", "rows", "per_file", "keep")},
                small["seconds"], large["seconds"], ratio,
                f"time({args['rows']})/time({args['small']}) <= {linear:g} (linear) and driver peak RSS < 2 GiB",
                ratio <= linear and rss_ok, unit="seconds to finalize (read_staging + finalize)",
                linear_ratio=linear, driver_peak_rss_mib={str(args["small"]): small["peak_rss_mib"],
                                                          str(args["rows"]): large["peak_rss_mib"]},
                small=small, large=large)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        child(sys.argv[2], float(sys.argv[3]))
    else:
        run(parse_args(DEFAULTS))
    sys.exit(0)
