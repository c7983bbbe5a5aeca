"""Toy corpora: unlabelled H.264 videos (with a ground-truth sidecar) and AURORA-format gold triplets.

Layout under `output` (local or s3://):
    videos/<name>.mp4              what annotation reads
    ground_truth/<name>.json       action text and frame range per segment; only evaluation reads it
    gold/train.json                [{input, output, instruction, task, id}], images under gold/images/
    gold/test.json                 [{input, output, prompt, task, id}] on scenes never seen in train
    corpus.json                    the config and counts
Everything is a pure function of the seed.
"""

from __future__ import annotations

import dataclasses
import io
import random
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import av
import numpy as np
from PIL import Image

from cwm_ray import storage
from cwm_ray.config import FramesConfig, ToyCorpusConfig, ToyWorldConfig, to_dict
from cwm_ray.toyworld.render import animate, render
from cwm_ray.toyworld.world import Action, Scene, apply, check_kind_weights, random_action, random_scene
from cwm_ray.video import iter_frames


def encode_mp4(frames: list[np.ndarray], fps: int, crf: int = 18, pix_fmt: str = "yuv420p") -> bytes:
    """Frames → H.264 MP4 bytes (yuv420p by default, which every player reads; PyAV reads yuv444p too)."""
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = pix_fmt
        stream.options = {"crf": str(crf), "preset": "medium"}
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def through_video(
    src: Scene, action: Action, cfg: ToyWorldConfig, crf: int, pix_fmt: str
) -> tuple[np.ndarray, np.ndarray]:
    """(source, target) frames as a labelled clip of the action yields them: idle, animation, idle, encoded
    and decoded with the corpus's codec, then the last frame before the action and the clip's last frame."""
    idle = 3
    frames = [render(src, cfg)] * idle + animate(src, action, cfg)
    frames += [frames[-1]] * idle
    # Decoded as annotation decodes a video (at the world's size, so no resize).
    decoded = [f.rgb for f in iter_frames(encode_mp4(frames, cfg.fps, crf, pix_fmt),
                                          FramesConfig(motion_size=cfg.image_size, max_side=cfg.image_size))]
    return decoded[idle - 1], decoded[-1]


def png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def make_video(
    rng: random.Random, cfg: ToyWorldConfig, num_actions: int
) -> tuple[list[np.ndarray], list[dict[str, Any]]]:
    """Idle frames, then per action its animation and more idle frames. Returns frames and segments."""
    scene = random_scene(rng, cfg)
    frames = [render(scene, cfg)] * rng.randint(cfg.idle_frames_min, cfg.idle_frames_max)
    segments = []
    for _ in range(num_actions):
        action = random_action(scene, rng, cfg)
        after = apply(scene, action, cfg)
        start = len(frames)
        frames += animate(scene, action, cfg)
        segments.append({
            "action": action.text(), "kind": action.kind,
            "start_frame": start, "end_frame": len(frames) - 1,
            "scene_before": scene.to_dict(), "scene_after": after.to_dict(),
        })
        frames += [frames[-1]] * rng.randint(cfg.idle_frames_min, cfg.idle_frames_max)
        scene = after
    return frames, segments


def gold_triplets(
    rng: random.Random, cfg: ToyWorldConfig, n: int, avoid: set[Scene],
    kind_weights: Mapping[str, float] | None = None,
) -> Iterator[tuple[Scene, Action, Scene]]:
    """n triplets on distinct scenes, none of which is in `avoid` (so test scenes are unseen); the action
    kind of each is drawn by `kind_weights` (uniform when None, see `random_action`)."""
    seen = set(avoid)
    made = 0
    while made < n:
        scene = random_scene(rng, cfg)
        if scene in seen:
            continue
        seen.add(scene)
        action = random_action(scene, rng, cfg, kind_weights)
        yield scene, action, apply(scene, action, cfg)
        made += 1


def _write_gold(
    cfg: ToyCorpusConfig, split: str, triplets: list[tuple[Scene, Action, Scene]], pool: ThreadPoolExecutor
) -> None:
    gold = storage.join(cfg.output, "gold")
    # AURORA's train.json says `instruction`; AURORA-Bench's test.json says `prompt`.
    text_key = "instruction" if split == "train" else "prompt"
    def frames(triplet: tuple[Scene, Action, Scene]) -> tuple[np.ndarray, np.ndarray]:
        src, action, tgt = triplet
        if cfg.gold_from_video:
            return through_video(src, action, cfg.world, cfg.crf, cfg.pix_fmt)
        return render(src, cfg.world), render(tgt, cfg.world)

    rows, writes = [], []
    for i, ((_, action, _), (before, after)) in enumerate(zip(triplets, pool.map(frames, triplets), strict=True)):
        item_id = f"{split}_{i:06d}"
        rows.append({"input": f"images/{item_id}_src.png", "output": f"images/{item_id}_tgt.png",
                     text_key: action.text(), "task": action.kind, "id": item_id})
        writes += [(storage.join(gold, rows[-1]["input"]), png_bytes(before)),
                   (storage.join(gold, rows[-1]["output"]), png_bytes(after))]
    list(pool.map(lambda w: storage.write_bytes(w[0], w[1], cfg.storage), writes))
    # The index is written last, so a crash never leaves a JSON pointing at missing images.
    storage.write_json(storage.join(gold, f"{split}.json"), rows, cfg.storage)


def gold_sets(cfg: ToyCorpusConfig) -> tuple[list[tuple[Scene, Action, Scene]], list[tuple[Scene, Action, Scene]]]:
    """The corpus's gold (train, test) triplets, from its seed: the test scenes are none of the training ones."""
    train = list(gold_triplets(random.Random(f"{cfg.seed}/train"), cfg.world, cfg.num_train, set(),
                               cfg.train_kind_weights))
    seen = {t[0] for t in train}
    return train, list(gold_triplets(random.Random(f"{cfg.seed}/test"), cfg.world, cfg.num_test, seen))


def make_pretraining_gold(cfg: ToyCorpusConfig, output: str, num_train: int) -> dict[str, Any]:
    """A broad gold set to pretrain a toy world model on: `num_train` triplets, every action kind equally likely,
    on scenes that neither the gold training set nor the test set of the corpus `cfg` describes uses. Written as
    `output`/gold/train.json (AURORA's layout, like the corpus's own gold); returns the summary also written to
    `output`/corpus.json.

    Why: the paper LoRA-fine-tunes a world model that can already copy and render scenes. A model pretrained on
    the table's own test scenes would be judged on what it memorised, so those scenes (regenerated from the
    corpus's seed, not read back) are kept out, and so are the gold training scenes: fine-tuning then brings the
    table's gold as new data, as it does in the paper.
    """
    t0 = time.perf_counter()
    storage.configure(cfg.storage)
    train, test = gold_sets(cfg)
    avoid = {t[0] for t in train} | {t[0] for t in test}
    triplets = list(gold_triplets(random.Random(f"{cfg.seed}/pretrain"), cfg.world, num_train, avoid))
    with ThreadPoolExecutor(8) as pool:
        _write_gold(dataclasses.replace(cfg, output=output), "train", triplets, pool)
    kinds: dict[str, int] = {}
    for _, action, _ in triplets:
        kinds[action.kind] = kinds.get(action.kind, 0) + 1
    summary = {"output": output, "gold_train": len(triplets), "kinds": kinds, "scenes_avoided": len(avoid),
               "corpus_seed": cfg.seed, "seconds": round(time.perf_counter() - t0, 1)}
    storage.write_json(storage.join(output, "corpus.json"), summary, cfg.storage)
    return summary


def make_corpus(cfg: ToyCorpusConfig) -> dict[str, Any]:
    """Write the whole toy corpus; returns the summary also written to corpus.json."""
    check_kind_weights(cfg.train_kind_weights)  # a bad weight stops the job before any video is written
    t0 = time.perf_counter()
    storage.configure(cfg.storage)
    pool = ThreadPoolExecutor(8)  # I/O bound on S3; harmless locally
    num_frames = 0
    for v in range(cfg.num_videos):
        rng = random.Random(f"{cfg.seed}/video/{v}")
        frames, segments = make_video(rng, cfg.world, cfg.actions_per_video)
        name = f"toy_{v:05d}"
        storage.write_bytes(storage.join(cfg.output, "videos", f"{name}.mp4"),
                            encode_mp4(frames, cfg.world.fps, cfg.crf, cfg.pix_fmt), cfg.storage)
        storage.write_json(storage.join(cfg.output, "ground_truth", f"{name}.json"), {
            "video": f"videos/{name}.mp4", "fps": cfg.world.fps, "num_frames": len(frames),
            "size": cfg.world.image_size, "segments": segments}, cfg.storage)
        num_frames += len(frames)
    train, test = gold_sets(cfg)
    _write_gold(cfg, "train", train, pool)
    _write_gold(cfg, "test", test, pool)
    pool.shutdown()
    summary = {
        "output": cfg.output, "videos": cfg.num_videos, "frames": num_frames,
        "video_hours": round(num_frames / cfg.world.fps / 3600, 4),
        "gold_train": len(train), "gold_test": len(test),
        "seconds": round(time.perf_counter() - t0, 1), "config": to_dict(cfg),
    }
    storage.write_json(storage.join(cfg.output, "corpus.json"), summary, cfg.storage)
    return summary


def ground_truth_action(segments: list[dict[str, Any]], src_index: int, tgt_index: int) -> str | None:
    """The action a frame pair of a corpus video shows, from its sidecar: the one segment whose motion the pair
    overlaps; None if it overlaps none (nothing happens between its frames) or two (two actions).

    A segment's frames are its animation, `start_frame` (already eased 2 % of the way) to `end_frame` (exact);
    the frame before `start_frame` is the still scene before. Annotation picks the quietest frames around a
    motion, so its pairs often start on `start_frame` or end one frame short of `end_frame`, frames that still
    render as the scenes before and after: 78 % of one run's 2,311 pairs did, and a rule that wanted the pair to
    bracket the whole segment dropped them, leaving the oracle row a fifth of the IDM row's data.
    """
    overlapping = [s for s in segments if src_index < s["end_frame"] and tgt_index >= s["start_frame"]]
    return str(overlapping[0]["action"]) if len(overlapping) == 1 else None


def relabel_with_ground_truth(triplets: str, corpus: str, output: str) -> dict[str, int]:
    """Annotation's triplets with each IDM action replaced by the ground truth (the oracle row of the table).

    The same pairs, frames and recognition weights, so a world model trained on them differs from one trained on
    the IDM's labels only by the labels' noise. Pairs with no single ground-truth action (`ground_truth_action`)
    are dropped and counted. Written as one Parquet file under `output`.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    fs, path = storage.filesystem(triplets)
    table = pq.ParquetDataset(path, filesystem=fs).read()
    sidecars: dict[str, list[dict[str, Any]]] = {}
    actions: list[str | None] = []
    for uri, src, tgt in zip(*(table.column(c).to_pylist() for c in ("video_uri", "src_index", "tgt_index")),
                             strict=True):
        name = uri.rstrip("/").rsplit("/", 1)[-1].rsplit(".", 1)[0]
        if name not in sidecars:
            sidecars[name] = storage.read_json(storage.join(corpus, "ground_truth", f"{name}.json"))["segments"]
        actions.append(ground_truth_action(sidecars[name], int(src), int(tgt)))
    keep = pa.array([a is not None for a in actions])
    labels = pa.array([a for a in actions if a is not None], pa.string())
    kept = table.filter(keep)
    relabelled = kept.set_column(kept.schema.get_field_index("action"), "action", labels)
    out_fs, out_path = storage.filesystem(output)
    out_fs.create_dir(out_path, recursive=True)
    pq.write_table(relabelled, f"{out_path}/part-00000.parquet", filesystem=out_fs)
    changed = sum(a != b for a, b in zip(kept.column("action").to_pylist(), labels.to_pylist(), strict=True))
    return {"rows": table.num_rows, "kept": relabelled.num_rows, "dropped": table.num_rows - relabelled.num_rows,
            "relabelled": changed}
