"""The annotation pipeline (paper §Strategy 1) on Ray Data: videos → labelled, weighted, filtered triplets.

    list inputs ─► decode + motion + frame choice (CPU tasks) ─► IDM actors ─► recognition actors
        ─► staging/ (Parquet, the durable log) ─► finalize: dedupe, stratified top-K ─►
        pairs/  triplets/  errors/  aurora/train.json  summary.json

Why a staging log: Ray Data writes blocks, and one video's pairs may straddle blocks, so a killed run can
leave a video half written. Each staged row carries `video_pairs` (how many pairs its video produced);
a video counts as finished only when all of them are readable in staging, and finalize rebuilds the
output directories from staging with each id exactly once. Re-running into the same output therefore
skips finished videos and never duplicates an id, even after a crash halfway.

Why two classes of error: a permanent one (undecodable, too short, not a video, missing) is a fact about the
file, so its error row finishes the video; a transient one (storage or network still failing after
`read_attempts` reads) is a fact about this run, so its row (`transient` true) is reported but finishes
nothing, and the next run retries the video. A staging file is only set aside when it is proven incomplete
(no Parquet footer: a write that never finished), and then renamed, never deleted.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import glob as globlib
import hashlib
import io
import json
import math
import os
import tarfile
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq
import ray
import ray.data
from ray.data.datasource import FilenameProvider

from cwm_ray import storage
from cwm_ray.config import AnnotateConfig, StageResources
from cwm_ray.data import actor_stage
from cwm_ray.filtering import action_class, stratified_top_k_mask
from cwm_ray.preflight import check_job_fits
from cwm_ray.schema import ERROR_SCHEMA, LABEL_FIELDS, PAIR_FIELDS, WEIGHT_FIELDS, encode_image, pair_id
from cwm_ray.video import Frame, VideoError, choose_pairs, iter_frames

STAGING_SCHEMA = pa.schema(
    PAIR_FIELDS
    + [pa.field("video_pairs", pa.int64()), pa.field("error_type", pa.string()), pa.field("message", pa.string()),
       pa.field("stage", pa.string()), pa.field("transient", pa.bool_()), pa.field("video_cuts", pa.int64())]
    + LABEL_FIELDS + WEIGHT_FIELDS
)
OUTPUT_COLUMNS = [f.name for f in PAIR_FIELDS + LABEL_FIELDS + WEIGHT_FIELDS]
ERRORS_SCHEMA = ERROR_SCHEMA.append(pa.field("transient", pa.bool_()))
"""errors/errors.parquet: a `transient` row's video is retried by the next run; the others are final."""
RAY_DATA_STATS = "ray_data_stats.txt"
"""output/ray_data_stats.txt: Ray Data's per-operator stats of the last run (wall and CPU time, blocks, rows, and
how long each operator was blocked or backpressured)."""
DROP_STAGE = "idm"
"""`stage` of a staged pair row the IDM stage dropped (its `error_type` is the reason, e.g. EMPTY_ACTION): counted in
summary.json's `dropped`, never written to pairs/ or triplets/, and not an error of its video (errors/)."""
EMPTY_ACTION = "EmptyAction"
"""The reason for a pair whose generated action is empty after decoding (the IDM stopped at once, or generated only
special tokens): a pair without an action cannot train a world model."""
TAR_SEP = "#"
T = TypeVar("T")
INCOMPLETE = ".incomplete"
"""Suffix a proven-incomplete staging file is renamed with: kept for inspection, ignored by every later run."""


# ---------------------------------------------------------------------------------------------- inputs


def _is_glob(uri: str) -> bool:
    return any(ch in uri for ch in "*?[")


def _resolve(base_dir: str, uri: str) -> str:
    if storage.is_s3(uri) or os.path.isabs(uri):
        return uri
    return storage.join(base_dir, uri)


def _read_manifest(uri: str, cfg: AnnotateConfig) -> list[tuple[str, str | None]]:
    data = storage.read_bytes(uri, cfg.storage)
    low = uri.lower()
    if low.endswith(".csv"):
        table = pacsv.read_csv(io.BytesIO(data))
    elif low.endswith((".jsonl", ".json")):
        table = pajson.read_json(io.BytesIO(data))
    else:
        table = pq.read_table(io.BytesIO(data))
    if "video_uri" not in table.column_names:
        raise ValueError(f"manifest {uri} has no 'video_uri' column (columns: {table.column_names})")
    base = uri.rsplit("/", 1)[0] if "/" in uri else "."
    videos = [_resolve(base, str(v)) for v in table.column("video_uri").to_pylist()]
    names = table.column("dataset").to_pylist() if "dataset" in table.column_names else [None] * len(videos)
    return list(zip(videos, names, strict=True))


def _tar_members(uri: str, cfg: AnnotateConfig) -> list[str]:
    with tarfile.open(fileobj=io.BytesIO(storage.read_bytes(uri, cfg.storage))) as tar:
        exts = tuple(cfg.video_extensions)
        names = [m.name for m in tar.getmembers() if m.isfile() and m.name.lower().endswith(exts)]
    return sorted(f"{uri}{TAR_SEP}{name}" for name in names)


def list_videos(cfg: AnnotateConfig) -> list[dict[str, str]]:
    """Every input video as {video_uri, dataset}, sorted and de-duplicated (deterministic sharding)."""
    exts = tuple(e.lower() for e in cfg.video_extensions)
    rows: dict[str, str] = {}
    for corpus in cfg.inputs:
        found: list[tuple[str, str | None]] = []
        uri = corpus.uri
        low = uri.lower()
        if low.endswith((".csv", ".jsonl", ".parquet")) or (low.endswith(".json") and not _is_glob(uri)):
            found = _read_manifest(uri, cfg)
        elif _is_glob(uri):
            if storage.is_s3(uri):
                prefix = uri[: min(uri.index(ch) for ch in "*?[" if ch in uri)].rsplit("/", 1)[0]
                found = [(u, None) for u in storage.list_files(prefix, None, cfg.storage) if fnmatch.fnmatch(u, uri)]
            else:
                found = [(u, None) for u in sorted(globlib.glob(uri, recursive=True)) if os.path.isfile(u)]
        elif storage.is_dir(uri, cfg.storage):
            found = [(u, None) for u in storage.list_files(uri, (*exts, ".tar"), cfg.storage)]
        elif storage.exists(uri, cfg.storage):
            found = [(uri, None)]
        else:
            raise FileNotFoundError(f"input {corpus.name!r}: nothing at {uri}")
        for video, name in found:
            members = _tar_members(video, cfg) if video.lower().endswith(".tar") else [video]
            for m in members:
                rows.setdefault(m, name or corpus.name)
    if not rows:
        raise FileNotFoundError(f"no videos found in inputs {[c.uri for c in cfg.inputs]} (extensions {exts})")
    return [{"video_uri": u, "dataset": d} for u, d in sorted(rows.items())]


def is_transient(exc: BaseException) -> bool:
    """Storage and network failures (pyarrow's S3 errors and socket errors are OSErrors) may pass; a missing
    file does not. Everything else a video raises here (VideoError, a malformed tar or file) is permanent."""
    return isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError)


def with_retries(fn: Callable[[], T], what: str, cfg: AnnotateConfig) -> T:
    """`fn()`, called again with exponential backoff while it fails transiently, `cfg.read_attempts` times in all.

    pyarrow's S3 retry strategy already retries each request (`storage.retries`) over a few seconds; this
    outer layer re-reads the whole object, so an outage longer than that window still passes within the run.
    """
    for attempt in range(max(1, cfg.read_attempts)):
        try:
            return fn()
        except Exception as exc:
            if not is_transient(exc) or attempt + 1 >= max(1, cfg.read_attempts):
                raise
            delay = cfg.retry_backoff_s * 2**attempt
            print(f"[annotate] {what}: {type(exc).__name__}: {str(exc)[:200]}; retrying in {delay:g} s", flush=True)
            time.sleep(delay)
    raise AssertionError("unreachable")


def read_video_bytes(video_uri: str, cfg: AnnotateConfig) -> bytes:
    if TAR_SEP in video_uri and video_uri.split(TAR_SEP, 1)[0].lower().endswith(".tar"):
        shard, member = video_uri.split(TAR_SEP, 1)
        with tarfile.open(fileobj=io.BytesIO(storage.read_bytes(shard, cfg.storage))) as tar:
            f = tar.extractfile(member)
            if f is None:
                raise FileNotFoundError(f"{member} is not a file in {shard}")
            return f.read()
    return storage.read_bytes(video_uri, cfg.storage)


# ---------------------------------------------------------------------------------------------- stages


def extract_pairs(batch: pa.Table, cfg: AnnotateConfig) -> pa.Table:
    """CPU stage: each video → its chosen pairs, or one error row (permanent, or `transient`: retried next run).

    Never raises for a bad video or a read that keeps failing; anything else (a bug) fails the task, which Ray
    Data retries and then reports, rather than being written down as a property of the video.
    """
    rows: list[dict[str, Any]] = []  # columns a row leaves out (labels, weights, ...) are null
    for video_uri, dataset in zip(batch.column("video_uri").to_pylist(), batch.column("dataset").to_pylist(),
                                  strict=True):
        frames = None
        try:
            data = with_retries(lambda uri=video_uri: read_video_bytes(uri, cfg), f"reading {video_uri}", cfg)
            frames = _CountingCuts(iter_frames(data, cfg.frames))
            pairs, _ = choose_pairs(iter(frames), cfg.frames)
            if not pairs:
                raise VideoError("NoMotion", "no frame pair has enough motion (frames.min_motion)")
        except (VideoError, OSError, ValueError, tarfile.TarError) as exc:
            rows.append({"id": hashlib.sha1(f"{video_uri}#error".encode()).hexdigest()[:20], "dataset": dataset,
                         "video_uri": video_uri, "video_pairs": 0, "stage": "decode", "transient": is_transient(exc),
                         "error_type": getattr(exc, "kind", type(exc).__name__), "message": str(exc)[:2000],
                         "video_cuts": None if frames is None else frames.cuts})
            continue
        fmt = cfg.frames.image_format
        for p in pairs:
            h, w = p.source.rgb.shape[:2]
            rows.append({
                "id": pair_id(video_uri, p.source.index, p.target.index), "dataset": dataset,
                "video_uri": video_uri, "src_index": p.source.index, "tgt_index": p.target.index,
                "src_time": p.source.time, "tgt_time": p.target.time, "motion": p.motion,
                "source": encode_image(p.source.rgb, fmt), "target": encode_image(p.target.rgb, fmt),
                "width": w, "height": h, "video_pairs": len(pairs), "video_cuts": frames.cuts,
            })
    return pa.Table.from_pylist(rows, schema=STAGING_SCHEMA)


class _CountingCuts:
    """A video's frames passed through, counting its shot cuts (`frames.shot_cuts`): each is a motion peak that
    frame choice dropped, reported as summary.json's `shot_cuts`."""

    def __init__(self, frames: Iterator[Frame]) -> None:
        self.frames = frames
        self.cuts = 0

    def __iter__(self) -> Iterator[Frame]:
        for frame in self.frames:
            self.cuts += frame.cut
            yield frame


def _replace_columns(batch: pa.Table, columns: dict[str, list[Any]]) -> pa.Table:
    """`batch` with these staging columns replaced by new values (typed as STAGING_SCHEMA says)."""
    for name, values in columns.items():
        field = STAGING_SCHEMA.field(name)
        batch = batch.set_column(batch.schema.get_field_index(name), field, pa.array(values, field.type))
    return batch


def _set_threads(res: StageResources) -> None:
    import torch

    torch.set_num_threads(max(1, res.torch_threads or int(res.num_cpus) or 1))


def _inject_fault(cfg: AnnotateConfig, stage: str) -> None:
    """`fail_once_in=<stage>`: kill this worker process on its first batch, once per output directory.

    A test and bench aid that stands for a lost node or an OOM kill; Ray Data restarts the actor and
    retries the task, and the run must still produce every pair exactly once.
    """
    if cfg.fail_once_in != stage or storage.is_s3(cfg.output):
        return
    marker = storage.join(cfg.output, f"_fault_{stage}")
    if not storage.exists(marker):
        storage.write_text(marker, "killed once\n")
        os._exit(1)


@ray.remote(num_cpus=0)
class StageClock:
    """Seconds a model stage's actors spend inside the model call, summed over actors and batches, and when
    each actor was ready (its model loaded).

    `summary.json`'s `stages` comes from it: how busy the IDM stage was (bench P7: decoding must never
    starve the model stage) and how long the stage took to start. One tiny actor per run; each batch
    reports (start, end, pairs) to it, without waiting for the answer (`report`), so the clock never holds
    up the model.
    """

    def __init__(self) -> None:
        self.stats: dict[str, dict[str, float]] = {}

    def ready(self, stage: str, at: float) -> None:
        s = self.stats.setdefault(stage, {"model_seconds": 0.0, "calls": 0, "pairs": 0})
        s["actors_ready"] = s.get("actors_ready", 0) + 1
        s["first_ready"], s["last_ready"] = min(s.get("first_ready", at), at), max(s.get("last_ready", at), at)

    def add(self, stage: str, start: float, end: float, pairs: int) -> None:
        s = self.stats.setdefault(stage, {"model_seconds": 0.0, "calls": 0, "pairs": 0})
        s["model_seconds"] += end - start
        s["calls"] += 1
        s["pairs"] += pairs
        s["first"], s["last"] = min(s.get("first", start), start), max(s.get("last", end), end)

    def get(self) -> dict[str, dict[str, float]]:
        return self.stats


def report(clock: Any, method: str, *args: Any) -> None:
    """Tell the StageClock, fire and forget: a blocking `ray.get` here would put a round trip to another
    process (slow on a loaded node) between every two batches of the model. Ray runs an actor's calls from
    one caller in order, and the driver reads the clock only after the last batch has been written, long
    after its report was sent."""
    if clock is not None:
        getattr(clock, method).remote(*args)


class IDMLabeler:
    """Actor stage: the IDM names the action of each pair, with its log-likelihood (paper §Strategy 1.3)."""

    def __init__(self, cfg: AnnotateConfig, clock: Any = None) -> None:
        from cwm_ray.idm import InverseDynamicsModel

        _set_threads(cfg.idm_stage)
        self.idm = InverseDynamicsModel.load(cfg.idm)
        self.cfg = cfg
        self.filter_cfg = cfg.filter
        self.clock = clock
        report(clock, "ready", "idm", time.time())

    def __call__(self, batch: pa.Table) -> pa.Table:
        _inject_fault(self.cfg, "idm")
        ok = pc.is_null(batch.column("error_type")).to_pylist()
        rows = [i for i, good in enumerate(ok) if good]
        cols = {name: batch.column(name).to_pylist() for name in ("action", "logprob", "num_tokens", "action_class",
                                                                  "error_type", "stage", "message", "transient")}
        if rows:
            src, tgt = batch.column("source").to_pylist(), batch.column("target").to_pylist()
            start = time.time()
            labels = self.idm.label([src[i] for i in rows], [tgt[i] for i in rows])
            report(self.clock, "add", "idm", start, time.time(), len(rows))
            for i, lab in zip(rows, labels, strict=True):
                if not lab.action:  # EOS first, or only special tokens: no action to learn from; dropped, counted
                    cols["error_type"][i], cols["stage"][i], cols["transient"][i] = EMPTY_ACTION, DROP_STAGE, False
                    cols["message"][i] = f"the IDM generated no action text ({lab.num_tokens} tokens)"
                    continue
                cols["action"][i], cols["logprob"][i], cols["num_tokens"][i] = lab.action, lab.logprob, lab.num_tokens
                cols["action_class"][i] = action_class(lab.action, self.filter_cfg)
        return _replace_columns(batch, cols)


class RecognitionStage:
    """Actor stage: per-position recognition weights from the world model's own encoder (paper §Strategy 1.6)."""

    def __init__(self, cfg: AnnotateConfig, res: StageResources, clock: Any = None) -> None:
        from cwm_ray.recognition import RecognitionWeights
        from cwm_ray.world_model import load_world_model

        _set_threads(res)
        self.weights = RecognitionWeights(load_world_model(cfg.world_model, cfg.recognition), cfg.recognition)
        self.clock = clock
        report(clock, "ready", "recognition", time.time())

    def __call__(self, batch: pa.Table) -> pa.Table:
        ok = pc.is_null(batch.column("error_type")).to_pylist()
        rows = [i for i, good in enumerate(ok) if good]
        w = batch.column("weights").to_pylist()
        shapes = batch.column("weights_shape").to_pylist()
        if rows:
            sub = {"source": np.array([batch.column("source")[i].as_py() for i in rows], dtype=object),
                   "target": np.array([batch.column("target")[i].as_py() for i in rows], dtype=object)}
            start = time.time()
            got = self.weights(sub)
            report(self.clock, "add", "recognition", start, time.time(), len(rows))
            for k, i in enumerate(rows):
                w[i], shapes[i] = got["weights"][k], [int(s) for s in got["weights_shape"][k]]
        return _replace_columns(batch, {"weights": w, "weights_shape": shapes})


def full_batches(ds: ray.data.Dataset, rows: int, num_cpus: float) -> ray.data.Dataset:
    """`ds` re-blocked to exactly `rows` rows per block (the last block holds the rest), in a streaming pass.

    Ray Data's strict streaming repartition does it, but Ray 2.60 gives `repartition` no way to ask for less
    than its tasks' default of 1 CPU; on a node whose model actors hold the rest (2 CPUs: the IDM's 1, the
    recognition encoder's 0.25) its tasks never started and the pipeline hung. Its logical operator carries
    `ray_remote_args` like any map, so the re-blocking tasks are given the decode tasks' share instead.
    """
    out = ds.repartition(target_num_rows_per_block=rows, strict=True)
    op = out._logical_plan.dag
    if not hasattr(op, "ray_remote_args"):
        raise RuntimeError(f"this Ray's repartition operator ({type(op).__name__}) takes no ray_remote_args; "
                           "set full_batches=false")
    object.__setattr__(op, "ray_remote_args", {**op.ray_remote_args, "num_cpus": num_cpus})
    return out


def _actor_kwargs(res: StageResources) -> dict[str, Any]:
    return actor_stage(res, "pyarrow")


# ---------------------------------------------------------------------------------------------- staging


def _staging(cfg: AnnotateConfig) -> str:
    return storage.join(cfg.output, "staging")


def _has_footer(uri: str, cfg: AnnotateConfig) -> bool:
    """Does the file end in a Parquet footer? A writer killed mid-file leaves none (the footer goes last)."""
    fs, path = storage.filesystem(uri, cfg.storage)
    with fs.open_input_file(path) as f:
        size = f.size()
        return size >= 12 and f.read_at(4, size - 4) == b"PAR1"


def _read_staging_file(uri: str, columns: list[str], cfg: AnnotateConfig) -> pa.Table:
    """The columns of one staging file; a column an older version did not write comes back null."""
    fs, path = storage.filesystem(uri, cfg.storage)
    with fs.open_input_file(path) as f:
        pf = pq.ParquetFile(f)
        present = [c for c in columns if c in pf.schema_arrow.names]
        t = pf.read(columns=present)
    for c in columns:
        if c not in present:
            t = t.append_column(STAGING_SCHEMA.field(c), pa.nulls(len(t), STAGING_SCHEMA.field(c).type))
    return t.select(columns)


def read_staging(cfg: AnnotateConfig, columns: list[str]) -> tuple[pa.Table, list[str]]:
    """Readable staging rows (selected columns + `_file`) and the files they came from.

    A file a killed run left half-written has no footer: it is renamed aside (`*.parquet.incomplete`, which no
    run reads) and its videos are redone. Any other failure to read a file (a storage error that outlasts
    the retries, a corrupt file with its footer) raises: dropping a good file would shrink the output.
    """
    staging = _staging(cfg)
    if not storage.exists(staging, cfg.storage):
        return pa.table({c: pa.array([], STAGING_SCHEMA.field(c).type) for c in columns} | {"_file": []}), []
    tables, good = [], []
    for uri in storage.list_files(staging, (".parquet",), cfg.storage):
        try:
            t = with_retries(lambda uri=uri: _read_staging_file(uri, columns, cfg), f"reading {uri}", cfg)
        except pa.ArrowInvalid as exc:
            if with_retries(lambda uri=uri: _has_footer(uri, cfg), f"reading {uri}", cfg):
                raise RuntimeError(f"staging file {uri} has its Parquet footer but cannot be read ({exc}); it was "
                                   "written completely, so it is not dropped: inspect it, or move it aside and "
                                   "re-run to redo its videos") from exc
            print(f"[annotate] staging file {uri} is incomplete (no Parquet footer: a write that never finished); "
                  f"renamed to {uri}{INCOMPLETE}, its videos are redone", flush=True)
            storage.move(uri, uri + INCOMPLETE, cfg.storage)
            continue
        except OSError as exc:
            raise OSError(f"staging file {uri} could not be read ({exc}); it is kept, and nothing was written: "
                          "re-run when the storage answers again") from exc
        tables.append(t.append_column("_file", pa.array([uri] * len(t), pa.string())))
        good.append(uri)
    if not tables:
        return pa.table({c: pa.array([], STAGING_SCHEMA.field(c).type) for c in columns} | {"_file": []}), []
    return pa.concat_tables(tables), good


def finished_videos(index: pa.Table) -> set[str]:
    """Videos whose every pair (or whose permanent error row) is readable in staging (`finished_mask`).

    A transient error row finishes nothing: the next run retries its video.
    """
    return set(index.filter(finished_mask(index)).column("video_uri").to_pylist()) if index.num_rows else set()


# ---------------------------------------------------------------------------------------------- finalize

INDEX_COLUMNS = ["id", "video_uri", "dataset", "video_pairs", "error_type", "stage", "message", "transient",
                 "action", "action_class", "logprob", "num_tokens", "video_cuts"]


def _write_table(table: pa.Table, uri: str, cfg: AnnotateConfig) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    storage.write_bytes(uri, buf.getvalue(), cfg.storage)


SELECTION = "_selection"
"""output/_selection/: per staging file, the ids finalize takes from it and which are kept; removed when done."""


def finished_mask(index: pa.Table) -> pa.ChunkedArray:
    """Per staged row: is its video finished? `finished_videos` as Arrow group-bys, for finalize at scale.

    A video is finished when it has a permanent error row, or as many distinct pair ids as it produced
    (`video_pairs`); a transient error row finishes nothing. A pair the IDM stage dropped (`DROP_STAGE`) is one
    of its video's pairs, not an error of the video: its siblings in a lost staging file are still redone.
    """
    dropped = pc.equal(pc.fill_null(index.column("stage"), ""), DROP_STAGE)
    ok = pc.or_(pc.is_null(index.column("error_type")), dropped)
    permanent = pc.and_(pc.invert(ok), pc.invert(pc.fill_null(index.column("transient"), False)))
    pairs = index.filter(ok).group_by("video_uri", use_threads=False).aggregate(
        [("id", "count_distinct"), ("video_pairs", "max")])
    complete = pairs.filter(pc.greater_equal(pairs.column("id_count_distinct"), pairs.column("video_pairs_max")))
    done = pa.concat_arrays([complete.column("video_uri").combine_chunks().cast(pa.string()),
                             index.filter(permanent).column("video_uri").combine_chunks().cast(pa.string())])
    return pc.is_in(index.column("video_uri"), value_set=pc.unique(done))


def _unique_rows(index: pa.Table) -> tuple[pa.Table, int]:
    """The staged rows finalize writes, each id once, and how many videos are finished.

    A finished video's rows, without the transient error rows of earlier runs that failed to read it; an
    unfinished video's transient error row, so the failure is reported (it is retried, not forgotten). Of
    duplicate ids (a video redone after a crash; the copies are identical) the first staged row is kept.
    """
    finished = finished_mask(index)
    wanted = pc.not_equal(finished, pc.fill_null(index.column("transient"), False))
    rows = pa.table({"id": index.column("id"), "row": pa.array(np.arange(index.num_rows))}).filter(wanted)
    first = rows.group_by("id", use_threads=False).aggregate([("row", "min")]).column("row_min").to_numpy()
    videos_done = pc.count_distinct(index.filter(finished).column("video_uri")).as_py()
    return index.take(pa.array(np.sort(first))), videos_done


def _selection_uri(cfg: AnnotateConfig, path: str) -> str:
    """Where the selection of the staging file at `path` (its path inside its filesystem, as Ray Data
    reports it in `path`) is written: named by a hash of the path, so a task finds it from the row alone."""
    return storage.join(cfg.output, SELECTION, hashlib.sha1(path.encode()).hexdigest()[:20] + ".parquet")


def _write_selection(pairs: pa.Table, cfg: AnnotateConfig) -> list[str]:
    """One small Parquet file of (id, kept) per staging file; returns the staging paths that have one.

    This is how finalize's decisions reach the Ray Data tasks that copy pairs (with their images) out of
    staging: each task reads the selection of the file its block came from, a file's worth of ids, instead
    of a set of every kept id shipped inside its closure.
    """
    by_file = pairs.select(["_file", "id", "kept"])
    by_file = by_file.take(pc.sort_indices(by_file, [("_file", "ascending"), ("id", "ascending")]))
    if by_file.num_rows == 0:
        return []
    files = by_file.column("_file").combine_chunks()
    starts = np.flatnonzero(np.r_[True, pc.not_equal(files[1:], files[:-1]).to_numpy(zero_copy_only=False)])
    paths = []
    for start, end in zip(starts, [*starts[1:], len(files)], strict=True):
        path = storage.filesystem(files[int(start)].as_py(), cfg.storage)[1]
        part = by_file.slice(int(start), int(end - start)).select(["id", "kept"])
        _write_table(part, _selection_uri(cfg, path), cfg)
        paths.append(path)
    return paths


_SELECTIONS: dict[str, pa.Table] = {}


def _read_selection(uri: str, cfg: AnnotateConfig) -> pa.Table:
    """A staging file's selection, kept for the next few blocks of the same file (one read per file, mostly)."""
    if uri not in _SELECTIONS:
        if len(_SELECTIONS) >= 8:
            _SELECTIONS.pop(next(iter(_SELECTIONS)))
        try:
            _SELECTIONS[uri] = pq.read_table(io.BytesIO(storage.read_bytes(uri, cfg.storage)))
        except FileNotFoundError as exc:  # never drop rows silently: a missing selection is a bug
            raise RuntimeError(f"finalize: no selection {uri} for a staged block") from exc
    return _SELECTIONS[uri]


def select_staged(batch: pa.Table, cfg: AnnotateConfig, triplets: bool) -> pa.Table:
    """A staged block → its rows that finalize selected (`triplets`: only the kept ones), as OUTPUT_COLUMNS.

    A lookup join against the selection of the block's file (Ray Data reports the file in `path`): a row
    is taken when its id is in that selection, so of duplicate ids only the copy in the chosen file is.
    """
    parts = []
    for path in pc.unique(batch.column("path")).to_pylist():
        part = batch.filter(pc.equal(batch.column("path"), path))
        sel = _read_selection(_selection_uri(cfg, path), cfg)
        at = pc.index_in(part.column("id"), value_set=sel.column("id"))
        keep = pc.is_valid(at)
        if triplets:
            keep = pc.and_(keep, pc.fill_null(pc.take(sel.column("kept"), at), False))
        parts.append(part.filter(keep).select(OUTPUT_COLUMNS))
    if not parts:
        return pa.table({c: pa.array([], STAGING_SCHEMA.field(c).type) for c in OUTPUT_COLUMNS})
    return pa.concat_tables(parts)


def _corpora(pairs: pa.Table, kept: pa.BooleanArray) -> dict[str, Any]:
    """summary.json's per-corpus counts: pairs, triplets and triplets per action class (Arrow group-bys)."""
    per_corpus: dict[str, Any] = {}
    for row in pairs.group_by("dataset").aggregate([("id", "count")]).to_pylist():
        per_corpus[row["dataset"]] = {"pairs": row["id_count"], "triplets": 0, "classes": {}}
    chosen = pairs.filter(kept).group_by(["dataset", "action_class"]).aggregate([("id", "count")])
    for row in chosen.to_pylist():
        c = per_corpus[row["dataset"]]
        c["triplets"] += row["id_count"]
        c["classes"][row["action_class"]] = row["id_count"]
    return dict(sorted(per_corpus.items()))


def _counts(column: pa.ChunkedArray) -> dict[str, int]:
    return {str(v["values"]): int(v["counts"]) for v in pc.value_counts(column).to_pylist()}


def finalize(cfg: AnnotateConfig, index: pa.Table, files: list[str]) -> dict[str, Any]:
    """Rebuild pairs/, triplets/, errors/, the AURORA export and summary.json from staging.

    Dedupe and selection are Arrow compute over the index (no images, no Python object per row); the pairs
    themselves only pass through Ray Data tasks, which find what to keep in per-file selections. So the
    driver's memory grows with the index's columns, and nothing of the corpus's size rides in a closure.
    """
    unique, videos_done = _unique_rows(index)
    is_err = pc.invert(pc.is_null(unique.column("error_type")))
    is_drop = pc.and_(is_err, pc.equal(pc.fill_null(unique.column("stage"), ""), DROP_STAGE))
    pairs_idx = unique.filter(pc.invert(is_err))
    dropped = unique.filter(is_drop)
    all_errors = unique.filter(pc.and_(is_err, pc.invert(is_drop))).select(
        ["video_uri", "stage", "error_type", "message", "transient"])
    all_errors = all_errors.set_column(4, "transient", pc.fill_null(all_errors.column("transient"), False))
    errors = all_errors.filter(pc.invert(all_errors.column("transient")))
    retry = all_errors.filter(all_errors.column("transient"))
    kept = stratified_top_k_mask(pairs_idx, cfg.filter)
    pairs_idx = pairs_idx.append_column("kept", kept)

    errors_dir = storage.join(cfg.output, "errors")
    storage.delete(errors_dir, cfg.storage)
    _write_table(all_errors.cast(ERRORS_SCHEMA), storage.join(errors_dir, "errors.parquet"), cfg)

    selection = storage.join(cfg.output, SELECTION)
    storage.delete(selection, cfg.storage)
    paths = _write_selection(pairs_idx, cfg) if files else []
    fs, _ = storage.filesystem(cfg.output, cfg.storage)
    if paths:
        staged = ray.data.read_parquet(paths, filesystem=fs, include_paths=True, columns=OUTPUT_COLUMNS,
                                       schema=pa.schema([STAGING_SCHEMA.field(c) for c in OUTPUT_COLUMNS]))
        for name, triplets in (("pairs", False), ("triplets", True)):
            out = storage.join(cfg.output, name)
            storage.delete(out, cfg.storage)
            staged.map_batches(select_staged, fn_kwargs={"cfg": cfg, "triplets": triplets}, batch_size=None,
                               batch_format="pyarrow", num_cpus=0.25
                               ).write_parquet(storage.filesystem(out, cfg.storage)[1], filesystem=fs)
        if cfg.export_aurora:
            triplets_dir = storage.join(cfg.output, "triplets")
            has_triplets = storage.exists(triplets_dir, cfg.storage) and storage.list_files(
                triplets_dir, (".parquet",), cfg.storage)
            export_aurora(ray.data.read_parquet(storage.filesystem(triplets_dir, cfg.storage)[1], filesystem=fs)
                          if has_triplets else None, cfg)
    storage.delete(selection, cfg.storage)

    cuts = unique.group_by("video_uri", use_threads=False).aggregate([("video_cuts", "max")])
    return {"videos_done": videos_done, "pairs": pairs_idx.num_rows, "triplets": pc.sum(kept).as_py() or 0,
            "shot_cuts": pc.sum(cuts.column("video_cuts_max")).as_py() or 0,
            "errors": errors.num_rows, "error_types": _counts(errors.column("error_type")),
            "transient_errors": retry.num_rows, "transient_error_types": _counts(retry.column("error_type")),
            "dropped": _counts(dropped.column("error_type")), "corpora": _corpora(pairs_idx, kept)}


def _write_items(uri: str, batches: Any, cfg: AnnotateConfig) -> None:
    """Stream JSON items, batch by batch, into the list `storage.write_json` would write (indent 1).

    Readers never see half a file: a local file is written beside and renamed, an S3 object (a multipart
    upload) appears when the stream closes.
    """
    fs, path = storage.filesystem(uri, cfg.storage)
    tmp = path if storage.is_s3(uri) else f"{path}.{uuid.uuid4().hex[:8]}.tmp"
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(tmp) as f:
        f.write(b"[")
        sep = b"\n"
        for batch in batches:
            for item in batch:
                f.write(sep + (" " + json.dumps(item, indent=1).replace("\n", "\n ")).encode())
                sep = b",\n"
        f.write(b"\n]\n" if sep != b"\n" else b"]\n")
    if tmp != path:
        fs.move(tmp, path)


def export_aurora(triplets: ray.data.Dataset | None, cfg: AnnotateConfig) -> None:
    """Triplets as AURORA format ({input, output, instruction, ...} + PNGs), which the trainers read.

    Ray Data tasks write the images; train.json is sorted by id in Ray Data and streamed into the file,
    so neither the images nor the list of items is ever gathered in the driver.
    """
    base = storage.join(cfg.output, "aurora")
    scfg = cfg.storage

    def write_images(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        for rid, src, tgt in zip(batch["id"], batch["source"], batch["target"], strict=True):
            storage.write_bytes(storage.join(base, "images", f"{rid}_src.png"), bytes(src), scfg)
            storage.write_bytes(storage.join(base, "images", f"{rid}_tgt.png"), bytes(tgt), scfg)
        return {"id": batch["id"], "action": batch["action"], "dataset": batch["dataset"],
                "video_uri": batch["video_uri"], "action_class": batch["action_class"], "logprob": batch["logprob"]}

    def items(rows: Any) -> Any:
        for batch in rows:
            yield [{"input": f"images/{r['id']}_src.png", "output": f"images/{r['id']}_tgt.png",
                    "instruction": r["action"], "task": r["action_class"], "id": r["id"], "dataset": r["dataset"],
                    "video_uri": r["video_uri"], "logprob": float(r["logprob"])} for r in batch.to_pylist()]

    rows = [] if triplets is None else triplets.map_batches(write_images, batch_format="numpy", num_cpus=0.25) \
        .sort("id").iter_batches(batch_format="pyarrow", batch_size=4096)
    _write_items(storage.join(base, "train.json"), items(rows), cfg)


# ---------------------------------------------------------------------------------------------- decode pool


def decode_tasks(pair_seconds: float, idm_pair_seconds: float, idm_actors: int, headroom: float) -> int:
    """Decode tasks that keep `idm_actors` IDM actors fed: each actor takes a pair every `idm_pair_seconds`, each
    task makes one every `pair_seconds`, and `headroom` covers videos costlier than the sample and slow reads."""
    return max(1, math.ceil(headroom * idm_actors * pair_seconds / idm_pair_seconds))


def measure_decode_seconds(cfg: AnnotateConfig, videos: list[dict[str, str]], sample: int = 2) -> float | None:
    """CPU seconds of one thread per pair that the decode stage spends (read, decode, motion, cuts, frame choice,
    PNG), as one decode task spends them, on the first `sample` videos that give pairs (a broken file costs
    little and says nothing; at most 4 x `sample` are tried); None if none gave a pair."""
    import cv2

    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)  # one task's view: the OpenCV calls inside a decode task share its one core
    try:
        t0, pairs, good = time.process_time(), 0, 0
        for video in videos[: 4 * sample]:
            rows = extract_pairs(pa.table({"video_uri": [video["video_uri"]], "dataset": [video["dataset"]]}), cfg)
            found = pc.sum(pc.is_null(rows.column("error_type"))).as_py() or 0
            pairs, good = pairs + found, good + (found > 0)
            if good >= sample:
                break
        return (time.process_time() - t0) / pairs if pairs else None
    finally:
        cv2.setNumThreads(threads)


def last_idm_pair_seconds(cfg: AnnotateConfig) -> float | None:
    """One IDM actor's seconds per pair in the last run into this output: its StageClock's time inside the model
    (summed over actors) over the pairs labelled, from summary.json; None if there is no such run."""
    uri = storage.join(cfg.output, "summary.json")
    if not storage.exists(uri, cfg.storage):
        return None
    idm = (storage.read_json(uri, cfg.storage).get("stages") or {}).get("idm") or {}
    return idm["model_seconds"] / idm["pairs"] if idm.get("pairs") and idm.get("model_seconds") else None


def size_decode_pool(cfg: AnnotateConfig, todo: list[dict[str, str]]) -> tuple[int, dict[str, Any]]:
    """(decode tasks at most, 0 = Ray's default; how the number was found, for summary.json `decode_pool`).

    `decode.concurrency: auto` sizes the pool from two measured costs instead of a constant: a decode task's
    seconds per pair (config, or measured here on the first videos) and an IDM actor's (config, or the last run's
    StageClock). Too few decode tasks starve the accelerators; too many take CPUs (and memory) that the model
    actors' nodes need, and on an autoscaling cluster start decode nodes that would only wait.
    """
    if cfg.decode.concurrency != "auto":
        return int(cfg.decode.concurrency), {"concurrency": cfg.decode.concurrency}
    actors = max(1, cfg.idm_stage.concurrency)
    decode_s = cfg.decode.pair_seconds or measure_decode_seconds(cfg, todo)
    idm_s = cfg.decode.idm_pair_seconds or last_idm_pair_seconds(cfg)
    info: dict[str, Any] = {"concurrency": "auto", "decode_pair_seconds": decode_s, "idm_pair_seconds": idm_s,
                            "idm_actors": actors, "headroom": cfg.decode.headroom,
                            "from": {"decode": "config" if cfg.decode.pair_seconds else "measured",
                                     "idm": "config" if cfg.decode.idm_pair_seconds else "last run"}}
    if not decode_s or not idm_s:
        print("[annotate] decode.concurrency=auto: no IDM cost per pair yet (decode.idm_pair_seconds unset and no "
              "earlier run in this output): Ray's default pool this run; the next run into this output is sized "
              "from this one's StageClock", flush=True)
        return 0, info | {"tasks": 0}
    tasks = decode_tasks(decode_s, idm_s, actors, cfg.decode.headroom)
    cpus = ray.cluster_resources().get("CPU", 0) if ray.is_initialized() else 0
    free = cpus - actors * cfg.idm_stage.num_cpus - cfg.recognition_stage.concurrency * cfg.recognition_stage.num_cpus
    fit = int(max(0.0, free) // max(cfg.decode.num_cpus, 1e-9))
    print(f"[annotate] decode.concurrency=auto: {tasks} decode tasks (decode {decode_s * 1000:.0f} ms a pair, IDM "
          f"{idm_s * 1000:.0f} ms a pair x {actors} actors, headroom {cfg.decode.headroom:g})"
          + (f"; the cluster's free CPUs fit {fit} now: add CPU nodes, or the IDM waits on decoding"
             if cpus and fit < tasks else ""), flush=True)
    return tasks, info | {"tasks": tasks, "cpus_fit_now": fit}


# ---------------------------------------------------------------------------------------------- main


def annotate(cfg: AnnotateConfig) -> dict[str, Any]:
    """Run (or resume) the pipeline into `cfg.output`; returns the summary also written to summary.json."""
    t0 = time.perf_counter()
    # Workers get the driver's resolved endpoint (e.g. from $AWS_ENDPOINT_URL), not their own environment.
    cfg = dataclasses.replace(cfg, storage=dataclasses.replace(
        cfg.storage, endpoint_url=storage.endpoint_url(cfg.storage)))
    # ... and absolute model paths, whatever directory an actor starts in.
    cfg = dataclasses.replace(cfg, idm=storage.with_local_paths(cfg.idm),
                              world_model=storage.with_local_paths(cfg.world_model))
    storage.configure(cfg.storage)
    from cwm_ray.idm import check_prompt  # torch and transformers: only in the driver that runs the pipeline

    check_prompt(cfg.idm)  # a checkpoint that cannot prompt fails here, not in the IDM actors after decoding began
    videos = list_videos(cfg)
    index, _ = read_staging(cfg, INDEX_COLUMNS)
    done = finished_videos(index)
    todo = [v for v in videos if v["video_uri"] not in done]
    print(f"[annotate] {len(videos)} videos, {len(videos) - len(todo)} already done, {len(todo)} to do", flush=True)
    if not ray.is_initialized():
        ray.init(runtime_env={"env_vars": {"RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}})
    if todo:
        check_job_fits(cfg)  # actor pools the cluster cannot hold, now or autoscaled: an error, not a wait
    t_pipe, wall_pipe = time.perf_counter(), time.time()
    clock, stages, pool = None, {}, None
    if todo:
        decode_pool, pool = size_decode_pool(cfg, todo)
        run_id = uuid.uuid4().hex[:8]
        clock = StageClock.remote()
        ds = ray.data.from_items(todo, override_num_blocks=min(len(todo), 1000))
        # The dataset's own context (a snapshot every derived dataset shares), so the setting is this pipeline's
        # and leaves the process's DataContext, which later Ray Data work in the same driver reads, as it was.
        ds.context.op_resource_reservation_enabled = cfg.op_resource_reservation
        ds = ds.map_batches(extract_pairs, fn_kwargs={"cfg": cfg}, batch_size=1, batch_format="pyarrow",
                            num_cpus=cfg.decode.num_cpus,
                            **({"compute": ray.data.TaskPoolStrategy(size=decode_pool)} if decode_pool else {}))
        if cfg.full_batches:
            ds = full_batches(ds, cfg.idm_stage.batch_size, cfg.decode.num_cpus)
        ds = ds.map_batches(IDMLabeler, fn_constructor_args=(cfg, clock),
                            **_actor_kwargs(cfg.idm_stage))
        if cfg.recognition.enabled:  # off: no map is stored, and a weighted training run computes its own
            ds = ds.map_batches(RecognitionStage, fn_constructor_args=(cfg, cfg.recognition_stage, clock),
                                **_actor_kwargs(cfg.recognition_stage))
        fs, path = storage.filesystem(_staging(cfg), cfg.storage)
        # File names carry the run id, so a resumed run never overwrites an earlier run's files.
        names = FilenameProvider(dataset_uuid=run_id, file_format="parquet")
        ds.write_parquet(path, filesystem=fs, filename_provider=names)
        # Where the time went, per operator (Ray Data's own stats of this execution): for a run's post-mortem.
        storage.write_text(storage.join(cfg.output, RAY_DATA_STATS), ds.stats(), cfg.storage)
    pipe_seconds = time.perf_counter() - t_pipe
    if clock is not None:
        stages = _stage_summary(ray.get(clock.get.remote()), wall_pipe, pipe_seconds, cfg)
        ray.kill(clock)
    index, files = read_staging(cfg, INDEX_COLUMNS)
    summary = finalize(cfg, index, files)
    todo_uris = {t["video_uri"] for t in todo}
    new_pairs = sum(1 for v, e in zip(index.column("video_uri").to_pylist(), index.column("error_type").to_pylist(),
                                      strict=True) if e is None and v in todo_uris)
    summary |= {"output": cfg.output, "videos": len(videos), "videos_skipped": len(videos) - len(todo),
                "pairs_per_s": round(new_pairs / pipe_seconds, 2) if todo and pipe_seconds > 0 else None,
                "pipeline_seconds": round(pipe_seconds, 1), "seconds": round(time.perf_counter() - t0, 1),
                "stages": stages, "decode_pool": pool}
    storage.write_json(storage.join(cfg.output, "summary.json"), summary, cfg.storage)
    print_summary(summary)
    return summary


def _stage_summary(stats: dict[str, dict[str, float]], wall_start: float, seconds: float,
                   cfg: AnnotateConfig) -> dict[str, Any]:
    """Per model stage: seconds inside the model call, and the share of the pipeline's wall time (times its
    actors) that this is (`busy_fraction`), also over the first-to-last-call window (`active_fraction`) and
    from the moment its last actor was ready to the end (`steady_busy_fraction`: start-up excluded).
    `first_ready_s` / `ready_s`: when the stage's first / last actor had loaded its model, from the pipeline's
    start (a fixed pool starts all its actors at once, so they are close)."""
    out: dict[str, Any] = {}
    for stage, s in stats.items():
        actors = max(1, (cfg.idm_stage if stage == "idm" else cfg.recognition_stage).concurrency)
        row: dict[str, Any] = {"model_seconds": round(s["model_seconds"], 3), "calls": int(s["calls"]),
                               "pairs": int(s["pairs"]), "actors_ready": int(s.get("actors_ready", 0))}
        if "first" in s:
            window = s["last"] - s["first"]
            row |= {"first_call_s": round(s["first"] - wall_start, 3),
                    "busy_fraction": round(s["model_seconds"] / (actors * seconds), 3) if seconds > 0 else None,
                    "active_fraction": round(s["model_seconds"] / (actors * window), 3) if window > 0 else None}
        if "last_ready" in s:
            ready = s["last_ready"] - wall_start
            steady = seconds - ready
            row |= {"first_ready_s": round(s["first_ready"] - wall_start, 3), "ready_s": round(ready, 3),
                    "steady_busy_fraction": round(s["model_seconds"] / (actors * steady), 3) if steady > 0 else None}
        out[stage] = row
    return out


def print_summary(summary: dict[str, Any]) -> None:
    print(f"\n[annotate] {summary['videos']} videos ({summary['videos_skipped']} skipped as done), "
          f"{summary['pairs']} pairs, {summary['triplets']} triplets kept, {summary['errors']} errors "
          f"{summary['error_types'] or ''}; {summary['shot_cuts']} shot cuts (never a pair); "
          f"{summary['pairs_per_s']} pairs/s")
    if summary["dropped"]:
        print(f"[annotate] pairs dropped by the IDM stage, by reason: {summary['dropped']}")
    if summary["transient_errors"]:
        print(f"[annotate] {summary['transient_errors']} videos failed transiently {summary['transient_error_types']}"
              " and are not finished: re-run into the same output to retry them (errors/errors.parquet, transient)")
    print(f"{'corpus':<16} {'class':<28} {'kept':>6}")
    for name, c in summary["corpora"].items():
        for cls, n in sorted(c["classes"].items(), key=lambda kv: -kv[1]):
            print(f"{name:<16} {cls:<28} {n:>6}")
        print(f"{name:<16} {'(total: pairs → triplets)':<28} {c['pairs']:>6} → {c['triplets']}")
    print(f"outputs under {summary['output']}: pairs/ triplets/ errors/ aurora/train.json summary.json", flush=True)
