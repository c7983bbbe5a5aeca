"""The annotation pipeline end to end on a small toy corpus, with tiny random models loaded by path.

The IDM here is untrained (its labels are noise); what is checked is the pipeline: frame choice against
the ground truth, bad inputs as error rows, per-corpus budgets, weights, the AURORA export, resume
exactly-once after a crash, a killed IDM actor, manifests, tar shards and S3 in and out.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray
import torch

from cwm_ray import storage
from cwm_ray.annotate import (
    INDEX_COLUMNS,
    RAY_DATA_STATS,
    annotate,
    decode_tasks,
    finished_videos,
    list_videos,
    read_staging,
    size_decode_pool,
)
from cwm_ray.config import AnnotateConfig, StageResources, ToyCorpusConfig, ToyWorldConfig, load
from cwm_ray.data import actor_stage, read_aurora
from cwm_ray.schema import decode_image, weights_from_bytes
from cwm_ray.toyworld.corpus import encode_mp4, make_corpus
from cwm_ray.toyworld.diffusion_model import build_toy_world_model
from cwm_ray.toyworld.idm_model import build_toy_idm
from cwm_ray.toyworld.parser import parse_scene
from cwm_ray.toyworld.world import Scene

WORLD = ToyWorldConfig()
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ray_local(moto_server: str) -> None:
    # moto's fake credentials are in the environment before the workers start, as a user's would be
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled"}})
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("annotate")
    make_corpus(ToyCorpusConfig(output=str(root / "corpus"), num_videos=4, actions_per_video=3, num_train=0,
                                num_test=0, seed=3))
    build_toy_idm(str(root / "idm"), hidden_size=32, text_layers=1)
    build_toy_world_model(str(root / "wm"), resolution=32, block_out_channels=(8, 16), text_hidden_size=16)
    # The "clips" corpus: two good videos in a tar shard, and four broken files beside it.
    clips = root / "clips"
    clips.mkdir()
    videos = sorted((root / "corpus" / "videos").glob("*.mp4"))
    with tarfile.open(clips / "shard-000.tar", "w") as tar:
        for v in videos[:2]:
            tar.add(v, arcname=f"clips/{v.name}")
    (clips / "empty.mp4").write_bytes(b"")
    (clips / "noise.mp4").write_bytes(bytes(range(256)) * 40)
    (clips / "text.mp4").write_text("not a video\n")
    data = videos[2].read_bytes()
    (clips / "truncated.mp4").write_bytes(data[: len(data) // 3])
    (clips / "short.mp4").write_bytes(encode_mp4([np.zeros((64, 64, 3), np.uint8)] * 3, fps=10))
    return {"root": root, "corpus": root / "corpus", "idm": root / "idm", "wm": root / "wm", "clips": clips}


def _args(assets: dict[str, Path], output: str, inputs: str | None = None, *extra: str) -> list[str]:
    inputs = inputs or f"[{{name: toy, uri: {assets['corpus'] / 'videos'}}}, {{name: clips, uri: {assets['clips']}}}]"
    return [
        f"inputs={inputs}", f"output={output}", f"idm.model={assets['idm']}", "idm.max_new_tokens=6",
        f"world_model.model={assets['wm']}", "world_model.resolution=32", "filter.budget=5",
        "idm_stage.batch_size=8", "recognition_stage.batch_size=8", *extra,
    ]


def _cfg(assets: dict[str, Path], output: str, inputs: str | None = None, *extra: str) -> AnnotateConfig:
    return load(AnnotateConfig, None, _args(assets, output, inputs, *extra))


def _table(path: Path | str) -> list[dict]:
    return pq.read_table(str(path)).to_pylist()


@pytest.fixture(scope="module")
def first_run(ray_local: None, assets: dict[str, Path]) -> tuple[dict, Path]:
    out = assets["root"] / "out"
    # The decode pool sized from measured costs (decode: on the first videos; the IDM's: given).
    return annotate(_cfg(assets, str(out), None, "decode.concurrency=auto", "decode.idm_pair_seconds=0.01")), out


def test_lists_directories_tar_shards_and_globs(assets: dict[str, Path]) -> None:
    videos = list_videos(_cfg(assets, "unused"))
    by_corpus = {}
    for v in videos:
        by_corpus.setdefault(v["dataset"], []).append(v["video_uri"])
    assert len(by_corpus["toy"]) == 4
    assert sum("shard-000.tar#clips/" in u for u in by_corpus["clips"]) == 2
    assert len(by_corpus["clips"]) == 7
    glob = list_videos(_cfg(assets, "unused", f"[{{name: g, uri: '{assets['corpus']}/videos/toy_0000[01].mp4'}}]"))
    assert [Path(v["video_uri"]).name for v in glob] == ["toy_00000.mp4", "toy_00001.mp4"]
    with pytest.raises(FileNotFoundError, match="nothing at"):
        list_videos(_cfg(assets, "unused", "[{name: x, uri: /no/such/dir}]"))


def test_pairs_are_real_action_segments(first_run: tuple[dict, Path], assets: dict[str, Path]) -> None:
    summary, out = first_run
    pairs = _table(out / "pairs")
    assert len(pairs) == summary["pairs"] > 0
    assert len({p["id"] for p in pairs}) == len(pairs)
    exact = 0
    for p in pairs:
        name = Path(p["video_uri"].split("#")[-1]).stem
        gt = json.loads((assets["corpus"] / "ground_truth" / f"{name}.json").read_text())
        assert p["src_index"] < p["tgt_index"] and p["action"] and p["num_tokens"] >= 1 and p["logprob"] <= 0
        # the source shows the scene before one action and the target the scene after it (exact toy parse)
        before = parse_scene(np.asarray(decode_image(p["source"])), WORLD)
        after = parse_scene(np.asarray(decode_image(p["target"])), WORLD)
        exact += any(before == Scene.from_dict(s["scene_before"]) and after == Scene.from_dict(s["scene_after"])
                     for s in gt["segments"])
    assert exact / len(pairs) >= 0.9, (exact, len(pairs))


def test_summary_times_each_model_stage_and_ray_datas_stats_are_kept(first_run: tuple[dict, Path]) -> None:
    """summary.json's `stages` (bench P7): every pair went through each model stage once, each stage's actor
    was ready before its first call, and the busy fractions are shares of the wall time; the run's Ray Data
    stats (where the time went, per operator) are kept beside the summary."""
    summary, out = first_run
    dropped = sum(summary["dropped"].values())  # pairs whose generated action was empty never reach recognition
    for name in ("idm", "recognition"):
        stage = summary["stages"][name]
        expected = summary["pairs"] + (dropped if name == "idm" else 0)
        assert stage["pairs"] == expected and stage["actors_ready"] == 1, (name, stage)
        assert 0 <= stage["first_ready_s"] <= stage["ready_s"] <= stage["first_call_s"], (name, stage)
        assert 0 < stage["busy_fraction"] <= stage["steady_busy_fraction"] <= 1, (name, stage)
    # full_batches: the pairs reach the IDM re-blocked to its batch size, so it is called with full batches and
    # one remainder (rows of failed videos ride along and are skipped); whole-video blocks gave a batch and a
    # remainder per task.
    rows = summary["pairs"] + summary["errors"]
    assert summary["stages"]["idm"]["calls"] <= math.ceil(rows / 8), (summary["stages"]["idm"], rows)
    stats = (out / RAY_DATA_STATS).read_text()
    assert "IDMLabeler" in stats and "RecognitionStage" in stats
    pool = summary["decode_pool"]  # decode.concurrency=auto: the pool the pipeline ran with, and why
    assert pool["from"] == {"decode": "measured", "idm": "config"} and pool["idm_pair_seconds"] == 0.01
    assert pool["tasks"] == decode_tasks(pool["decode_pair_seconds"], 0.01, 1, 1.5) >= 1


def test_the_decode_pool_is_sized_from_the_measured_costs(assets: dict[str, Path], tmp_path: Path) -> None:
    """decode.concurrency=auto (issue 32): tasks = ceil(headroom x IDM actors x decode s per pair / IDM s per
    pair), with the decode cost measured on the first videos and the IDM's from config or the last run's
    StageClock (summary.json), so the pool follows the costs instead of a constant."""
    assert decode_tasks(0.040, 0.064, 8, 1.5) == 8  # issue 32's H200 IDM with this session's decode cost
    assert decode_tasks(0.080, 0.064, 8, 1.5) == 15 == decode_tasks(0.040, 0.032, 8, 1.5)
    assert decode_tasks(0.424, 0.064, 1, 1.5) == 10 and decode_tasks(0.001, 1.0, 1, 1.5) == 1

    out = tmp_path / "out"
    cfg = _cfg(assets, str(out), None, "decode.concurrency=auto", "idm_stage.concurrency=2")
    todo = list_videos(cfg)
    assert size_decode_pool(cfg, todo)[0] == 0  # no IDM cost known: Ray's default, and said so
    out.mkdir()
    (out / "summary.json").write_text(json.dumps({"stages": {"idm": {"model_seconds": 3.0, "pairs": 100}}}))
    tasks, info = size_decode_pool(cfg, todo)  # the last run's StageClock: 30 ms a pair
    assert info["from"] == {"decode": "measured", "idm": "last run"} and info["idm_pair_seconds"] == 0.03
    assert 0 < info["decode_pair_seconds"] < 5 and tasks == decode_tasks(info["decode_pair_seconds"], 0.03, 2, 1.5)
    slower = dataclasses.replace(cfg, decode=dataclasses.replace(cfg.decode, pair_seconds=0.3, idm_pair_seconds=0.01))
    assert size_decode_pool(slower, todo)[0] == 90  # 1.5 x 2 x 0.3 / 0.01
    fixed = dataclasses.replace(cfg, decode=dataclasses.replace(cfg.decode, concurrency=7))
    assert size_decode_pool(fixed, todo)[0] == 7


def test_model_stage_pools_are_fixed_and_prefetch_as_configured() -> None:
    pool = actor_stage(StageResources(concurrency=3, max_tasks_in_flight_per_actor=4), "pyarrow")["compute"]
    assert (pool.min_size, pool.max_size, pool.max_tasks_in_flight_per_actor) == (3, 3, 4)
    assert actor_stage(StageResources(), "pyarrow")["compute"].max_tasks_in_flight_per_actor == 2


@pytest.mark.fault
def test_bad_inputs_become_error_rows(first_run: tuple[dict, Path]) -> None:
    summary, out = first_run
    errors = {Path(e["video_uri"]).name: e for e in _table(out / "errors" / "errors.parquet")}
    assert set(errors) == {"empty.mp4", "noise.mp4", "text.mp4", "truncated.mp4", "short.mp4"}
    assert errors["empty.mp4"]["error_type"] == "EmptyFile"
    assert errors["text.mp4"]["error_type"] == "NotAVideo"
    assert errors["short.mp4"]["error_type"] == "TooShort"
    assert all(e["stage"] == "decode" and e["message"] for e in errors.values())
    assert summary["errors"] == 5 and summary["videos"] == 11


def test_per_corpus_budget_weights_and_aurora_export(first_run: tuple[dict, Path]) -> None:
    summary, out = first_run
    pairs = {p["id"]: p for p in _table(out / "pairs")}
    triplets = _table(out / "triplets")
    assert {t["id"] for t in triplets} <= set(pairs)
    for name in ("toy", "clips"):
        n = sum(t["dataset"] == name for t in triplets)
        assert n == min(5, sum(p["dataset"] == name for p in pairs.values())) == summary["corpora"][name]["triplets"]
    for t in triplets:
        w = weights_from_bytes(t["weights"], t["weights_shape"])
        assert w.shape == (16, 16) and abs(float(w.mean()) - 1) < 0.02  # 32 px, pixel-space patch 2
    items = read_aurora(str(out / "aurora" / "train.json"))
    assert sorted(i["id"] for i in items) == sorted(t["id"] for t in triplets)
    assert all(storage.exists(i["input"]) and storage.exists(i["output"]) for i in items)
    assert all(i["action"] == pairs[i["id"]]["action"] for i in items)
    assert json.loads((out / "summary.json").read_text())["triplets"] == len(triplets)


@pytest.mark.fault
def test_resume_after_a_crash_redoes_only_what_was_lost(first_run: tuple[dict, Path], assets: dict[str, Path],
                                                        tmp_path: Path) -> None:
    summary, out = first_run
    crashed = tmp_path / "out"
    shutil.copytree(out, crashed)
    staged = sorted((crashed / "staging").glob("*.parquet"))
    assert len(staged) >= 2
    staged[0].unlink()  # never written
    staged[1].write_bytes(staged[1].read_bytes()[:100])  # half written when the node died
    again = annotate(_cfg(assets, str(crashed)))
    assert 0 < again["videos_skipped"] < again["videos"]
    assert sorted(p["id"] for p in _table(crashed / "pairs")) == sorted(p["id"] for p in _table(out / "pairs"))
    assert again["pairs"] == summary["pairs"] and again["errors"] == summary["errors"]
    # and a second re-run has nothing left to do
    assert annotate(_cfg(assets, str(crashed)))["videos_skipped"] == again["videos"]


@pytest.mark.fault
def test_a_killed_idm_actor_loses_nothing(first_run: tuple[dict, Path], assets: dict[str, Path],
                                          tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    summary, out = first_run
    faulty = tmp_path / "faulty"
    # without Ray Data's per-operator reservation (docs/benchmarks.md, P7), as small nodes run it: the pipeline's
    # dataset carries the setting, the process's DataContext keeps Ray's default
    made = []
    from_items = ray.data.from_items
    monkeypatch.setattr(ray.data, "from_items", lambda *a, **k: made.append(from_items(*a, **k)) or made[-1])
    got = annotate(_cfg(assets, str(faulty), None, "fail_once_in=idm", "op_resource_reservation=false"))
    assert made and not made[0].context.op_resource_reservation_enabled
    assert ray.data.DataContext.get_current().op_resource_reservation_enabled
    assert (faulty / "_fault_idm").exists()  # the actor really was killed
    assert sorted(p["id"] for p in _table(faulty / "pairs")) == sorted(p["id"] for p in _table(out / "pairs"))
    assert got["errors"] == summary["errors"]


def test_manifest_on_s3_in_and_out(ray_local: None, assets: dict[str, Path], s3_bucket: str) -> None:
    videos = sorted((assets["corpus"] / "videos").glob("*.mp4"))[:2]
    for v in videos:
        storage.write_bytes(f"{s3_bucket}/videos/{v.name}", v.read_bytes())
    lines = [json.dumps({"video_uri": f"videos/{v.name}", "dataset": f"set{i}"}) for i, v in enumerate(videos)]
    storage.write_text(f"{s3_bucket}/manifest.jsonl", "\n".join(lines) + "\n")
    out = f"{s3_bucket}/annotated"
    summary = annotate(_cfg(assets, out, f"[{{name: m, uri: {s3_bucket}/manifest.jsonl}}]"))
    assert set(summary["corpora"]) == {"set0", "set1"} and summary["errors"] == 0
    assert storage.read_json(f"{out}/summary.json")["pairs"] == summary["pairs"] > 0
    fs, path = storage.filesystem(f"{out}/pairs")
    assert pq.read_table(path, filesystem=fs).num_rows == summary["pairs"]
    assert storage.exists(f"{out}/aurora/train.json")


def test_a_manifest_without_video_uri_is_a_clear_error(assets: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "m.csv").write_text("path\nx.mp4\n")
    with pytest.raises(ValueError, match="no 'video_uri' column"):
        list_videos(_cfg(assets, "unused", f"[{{name: m, uri: {tmp_path / 'm.csv'}}}]"))


def test_tar_member_bytes_match_the_file(assets: dict[str, Path]) -> None:
    from cwm_ray.annotate import read_video_bytes

    cfg = _cfg(assets, "unused")
    uri = next(v["video_uri"] for v in list_videos(cfg) if "#" in v["video_uri"])
    with tarfile.open(assets["clips"] / "shard-000.tar") as tar:
        expected = tar.extractfile(uri.split("#")[1]).read()
    assert read_video_bytes(uri, cfg) == expected != b""


@pytest.mark.fault
def test_a_half_written_staging_file_is_dropped_and_its_videos_redone(first_run: tuple[dict, Path],
                                                                     assets: dict[str, Path], tmp_path: Path) -> None:
    """What a kill during a staging write leaves: a Parquet file without its footer."""
    summary, out = first_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    victim = sorted((copy / "staging").glob("*.parquet"))[0]
    lost = pq.read_table(victim, columns=["video_uri"]).column("video_uri").to_pylist()
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    victim_size = victim.stat().st_size
    again = annotate(load(AnnotateConfig, None, _args(assets, str(copy))))
    assert not victim.exists()  # set aside, not read as empty or left to fail the next run ...
    assert victim.with_name(victim.name + ".incomplete").stat().st_size == victim_size  # ... and never deleted
    assert again["videos_skipped"] == again["videos"] - len(set(lost))  # only its videos are redone
    assert sorted(p["id"] for p in _table(copy / "pairs")) == sorted(p["id"] for p in _table(out / "pairs"))
    assert again["pairs"] == summary["pairs"] and again["errors"] == summary["errors"]


def test_resume_after_the_job_process_is_killed_halfway(first_run: tuple[dict, Path], assets: dict[str, Path],
                                                        tmp_path: Path) -> None:
    """SIGKILL the whole job (driver and its Ray processes) once staging has begun, then run it again."""
    summary, out = first_run
    killed = tmp_path / "killed"
    # Staging files trickle: one video decoded at a time and two rows a model batch, so the files after the first
    # are seconds away when the kill lands. With recognition's batch of 8 the last two files once came in the
    # same 0.1 s as the first, every video was finished when the kill landed, and nothing was left to resume.
    cfg_args = _args(assets, str(killed), None, "idm_stage.batch_size=2", "recognition_stage.batch_size=2",
                     "decode.concurrency=1")
    proc = subprocess.Popen([sys.executable, str(REPO / "jobs" / "annotate.py"), *cfg_args], cwd=REPO,
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while not list((killed / "staging").glob("*.parquet")) and time.monotonic() < deadline:
            assert proc.poll() is None, "the job ended before it could be killed"
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    # Really killed halfway: staging has begun, finalize has not run. The kill may land while a staging file
    # is being written (it did in CI): such a file is unreadable here, and the resumed run must drop it.
    files = list((killed / "staging").glob("*.parquet"))
    assert files and not (killed / "summary.json").exists()
    cfg = load(AnnotateConfig, None, cfg_args)
    finished = finished_videos(read_staging(cfg, INDEX_COLUMNS)[0])  # what the killed run completed
    again = annotate(cfg)
    assert again["videos_skipped"] == len(finished) < again["videos"]  # skipped exactly those, redid the rest
    assert sorted(p["id"] for p in _table(killed / "pairs")) == sorted(p["id"] for p in _table(out / "pairs"))
    assert again["pairs"] == summary["pairs"] and again["errors"] == summary["errors"]


@pytest.mark.fault
def test_a_transient_read_failure_is_retried_never_dropped(ray_local: None, assets: dict[str, Path],
                                                           moto_server: str, tmp_path: Path) -> None:
    """S3 reads of one video fail past every retry of a run (503 SlowDown from a proxy in front of moto), and
    another's fail in a short burst. Before, both became error rows that counted as finished: the corrected
    re-run skipped them and their pairs were lost for good."""
    import boto3
    import pyarrow as pa
    from test_storage_faults import FaultProxy

    from cwm_ray.annotate import extract_pairs
    from cwm_ray.config import StorageConfig

    boto3.client("s3", endpoint_url=moto_server).create_bucket(Bucket="transient-reads")
    videos = sorted((assets["corpus"] / "videos").glob("*.mp4"))[:3]
    for v in videos:
        storage.write_bytes(f"s3://transient-reads/videos/{v.name}", v.read_bytes(),
                            StorageConfig(endpoint_url=moto_server))
    uris = [f"s3://transient-reads/videos/{v.name}" for v in videos]
    # Every good video's pair ids, straight from the decode stage over a healthy connection.
    clean = extract_pairs(pa.table({"video_uri": uris, "dataset": ["s3"] * 3}),
                          _cfg(assets, "unused", None, f"storage.endpoint_url={moto_server}"))
    expected = sorted(r["id"] for r in clean.to_pylist() if r["error_type"] is None)
    assert {r["video_uri"] for r in clean.to_pylist()} == set(uris) and expected

    proxy = FaultProxy(moto_server)
    out = tmp_path / "out"
    args = (f"storage.endpoint_url={proxy.url}", "storage.retries=1", "read_attempts=3", "retry_backoff_s=0.05")
    try:
        proxy.fail_gets = {videos[0].name: 10_000, videos[1].name: 2}  # a lasting failure; a burst retried
        first = annotate(_cfg(assets, str(out), "[{name: s3, uri: s3://transient-reads/videos}]", *args))
        assert proxy.fail_gets[videos[1].name] == 0 and proxy.injected >= 5
        assert first["transient_errors"] == 1 and first["errors"] == 0
        assert first["transient_error_types"] == {"OSError": 1}
        errors = _table(out / "errors" / "errors.parquet")
        assert [(Path(e["video_uri"]).name, e["transient"]) for e in errors] == [(videos[0].name, True)]
        assert {p["video_uri"] for p in _table(out / "pairs")} == set(uris[1:])

        proxy.fail_gets = {}  # the storage recovered: the re-run retries the transient failure, and only it
        again = annotate(_cfg(assets, str(out), "[{name: s3, uri: s3://transient-reads/videos}]", *args))
    finally:
        proxy.close()
        storage.configure(StorageConfig())
    assert again["videos_skipped"] == 2 and again["transient_errors"] == again["errors"] == 0
    assert _table(out / "errors" / "errors.parquet") == []
    assert sorted(p["id"] for p in _table(out / "pairs")) == expected  # every good video's pairs, exactly once


def test_the_decode_stage_counts_each_videos_shot_cuts(assets: dict[str, Path], tmp_path: Path) -> None:
    """Every row of a video carries its cut count (`video_cuts`), which finalize sums into summary.json's
    `shot_cuts`: the motion peaks dropped because they were cuts (tests/test_finalize.py checks the sum)."""
    import pyarrow as pa
    from test_video import _shot

    from cwm_ray.annotate import extract_pairs

    cut = tmp_path / "cut.mp4"
    cut.write_bytes(encode_mp4(_shot(1, 40, 32, (255, 255, 255)) + _shot(2, 40, 0, (0, 0, 0)), fps=10))
    toy = sorted((assets["corpus"] / "videos").glob("*.mp4"))[0]
    rows = extract_pairs(pa.table({"video_uri": [str(cut), str(toy)], "dataset": ["d", "d"]}),
                         _cfg(assets, "unused")).to_pylist()
    cuts = {(Path(r["video_uri"]).name, r["video_cuts"]) for r in rows}
    assert cuts == {("cut.mp4", 1), (toy.name, 0)} and all(r["error_type"] is None for r in rows)


def test_a_pair_whose_action_is_empty_is_dropped_and_counted_never_stored(ray_local: None, assets: dict[str, Path],
                                                                          tmp_path: Path) -> None:
    """An IDM whose generation decodes to nothing (here every token is `<pad>`: its LM head is zeroed, so greedy
    picks id 0, a special token) labels no pair: each is dropped with its reason counted in summary.json, none is
    written to pairs/ or triplets/, and the videos are finished (a re-run skips them). A random LLaVA once
    stored such a pair, with action ''."""
    from safetensors.torch import load_file, save_file

    mute = tmp_path / "mute_idm"
    shutil.copytree(assets["idm"], mute)
    weights = load_file(mute / "model.safetensors")
    [head] = [k for k in weights if k.endswith("lm_head.weight")]
    weights[head] = torch.zeros_like(weights[head])
    save_file(weights, mute / "model.safetensors", metadata={"format": "pt"})
    videos = tmp_path / "videos"
    videos.mkdir()
    video = sorted((assets["corpus"] / "videos").glob("*.mp4"))[0]
    shutil.copy(video, videos / video.name)
    out = tmp_path / "out"
    args = (f"idm.model={mute}",)
    summary = annotate(_cfg(assets, str(out), f"[{{name: toy, uri: {videos}}}]", *args))
    labelled = summary["stages"]["idm"]["pairs"]
    assert labelled > 0 and summary["dropped"] == {"EmptyAction": labelled}, summary
    assert summary["pairs"] == summary["triplets"] == summary["errors"] == 0
    assert not (out / "pairs").exists() and not (out / "triplets").exists()
    assert json.loads((out / "summary.json").read_text())["dropped"] == {"EmptyAction": labelled}
    again = annotate(_cfg(assets, str(out), f"[{{name: toy, uri: {videos}}}]", *args))
    assert again["videos_skipped"] == 1 and again["dropped"] == summary["dropped"]


def test_a_dropped_pair_does_not_finish_its_video_alone() -> None:
    """A video is finished by a permanent error of the video, not by one of its pairs the IDM dropped: if the
    staging file with its other pairs was lost (a killed run), the video must be redone."""
    import pyarrow as pa

    from cwm_ray.annotate import DROP_STAGE, EMPTY_ACTION, STAGING_SCHEMA, finished_mask

    rows = [{"id": "a1", "video_uri": "a.mp4", "video_pairs": 2, "error_type": EMPTY_ACTION, "stage": DROP_STAGE,
             "transient": False},  # its sibling a2 was in a staging file that never got written
            {"id": "b1", "video_uri": "b.mp4", "video_pairs": 2, "error_type": EMPTY_ACTION, "stage": DROP_STAGE,
             "transient": False},
            {"id": "b2", "video_uri": "b.mp4", "video_pairs": 2},
            {"id": "c", "video_uri": "c.mp4", "video_pairs": 0, "error_type": "NotAVideo", "stage": "decode",
             "transient": False}]
    index = pa.Table.from_pylist(rows, schema=STAGING_SCHEMA).select(INDEX_COLUMNS)
    assert finished_mask(index).to_pylist() == [False, True, True, True]
