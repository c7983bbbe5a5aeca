"""P1 (and P5, P7): the annotation pipeline against a bare sequential loop, and against PyAV alone.

    .venv/bin/python bench/p1_annotation.py [num_videos=24 repeats=2 decode_cpus=0.25 ...]

One private Ray, then `repeats` rounds of: the Ray Data pipeline (`annotate(cfg)` into a fresh output; its
`pipeline_seconds` excludes Ray start-up, which is reported apart) and the loop a person would write
without Ray (read → PyAV decode + Farneback motion + frame choice → PNG frames → IDM `label` in batches →
recognition weights), in ABBA order; and PyAV decoding alone of the same files. Prints three JSON lines:

- P1: pairs/s of the pipeline / pairs/s of the loop (goal ≥ 1.15), with per-stage seconds of the loop,
  from which the stage throughputs (and how pairs/s scales with decode CPUs and IDM GPUs) follow;
- P5: frames/s of the pipeline / frames/s of PyAV decoding alone (goal ≥ 0.5);
- P7: seconds inside `idm.label` over the pipeline's wall time × IDM actors (goal ≥ 0.8), from the
  `stages.idm` figures `annotate()` writes into summary.json.
"""

from __future__ import annotations

import shutil
import sys
import time
from typing import Any

from common import CACHE, GPUS, emit, median, parse_args, private_ray, toy_corpus, toy_models

DEFAULTS: dict[str, Any] = {
    "num_videos": 24, "repeats": 2, "quick": False,
    # the pipeline's stage resources (AnnotateConfig keys); defaults = configs/annotate.yaml's
    "decode_cpus": 0.5, "decode_concurrency": 0, "idm_cpus": 1.0, "idm_threads": 0, "idm_batch": 32,
    "idm_concurrency": 1, "rec_cpus": 0.25, "rec_threads": 1, "rec_batch": 64,
    "config": "configs/annotate.yaml", "emit": "P1,P5,P7", "video_size": 64,
}


def annotate_cfg(args: dict[str, Any], models: dict[str, str], manifest: str, output: str) -> Any:
    from cwm_ray.config import AnnotateConfig, load

    overrides = [
        f"inputs=[{{name: bench, uri: {manifest}}}]", f"output={output}", f"idm.model={models['idm']}",
        f"world_model.model={models['world_model']}", f"world_model.backend={models['backend']}",
        "export_aurora=false", f"idm_stage.num_gpus={GPUS / 2}", f"recognition_stage.num_gpus={GPUS / 2}",
        f"decode.num_cpus={args['decode_cpus']}", f"decode.concurrency={args['decode_concurrency']}",
        f"idm_stage.num_cpus={args['idm_cpus']}", f"idm_stage.torch_threads={args['idm_threads']}",
        f"idm_stage.batch_size={args['idm_batch']}", f"idm_stage.concurrency={args['idm_concurrency']}",
        f"recognition_stage.num_cpus={args['rec_cpus']}", f"recognition_stage.torch_threads={args['rec_threads']}",
        f"recognition_stage.batch_size={args['rec_batch']}",
    ]
    return load(AnnotateConfig, args["config"], overrides)


def sequential_loop(cfg: Any, videos: list[str]) -> dict[str, Any]:
    """The same work without Ray, in one process whose torch uses every core: {pairs, frames, seconds...}."""
    import torch

    from cwm_ray.annotate import read_video_bytes
    from cwm_ray.idm import InverseDynamicsModel
    from cwm_ray.recognition import RecognitionWeights, recognition_weights
    from cwm_ray.schema import encode_image
    from cwm_ray.video import choose_pairs, iter_frames

    t = {"load": 0.0, "decode": 0.0, "idm": 0.0, "recognition": 0.0}
    t0 = time.perf_counter()
    idm = InverseDynamicsModel.load(cfg.idm)
    rec = RecognitionWeights(cfg.world_model, cfg.recognition)
    t["load"] = time.perf_counter() - t0
    frames = pairs = 0
    pending: list[Any] = []

    def label_and_weigh(batch: list[Any]) -> None:
        t1 = time.perf_counter()
        idm.label([p.source.rgb for p in batch], [p.target.rgb for p in batch])
        t2 = time.perf_counter()
        with torch.no_grad():
            src = rec.world_model.encode_features([p.source.rgb for p in batch])
            tgt = rec.world_model.encode_features([p.target.rgb for p in batch])
        recognition_weights(src, tgt, cfg.recognition.floor)
        t["idm"] += t2 - t1
        t["recognition"] += time.perf_counter() - t2

    size = cfg.idm_stage.batch_size
    for uri in videos:
        t1 = time.perf_counter()
        chosen, n = choose_pairs(iter_frames(read_video_bytes(uri, cfg), cfg.frames), cfg.frames)
        for p in chosen:  # the stored form of a pair, as the pipeline writes it
            encode_image(p.source.rgb, cfg.frames.image_format), encode_image(p.target.rgb, cfg.frames.image_format)
        t["decode"] += time.perf_counter() - t1
        frames += n
        pairs += len(chosen)
        pending += chosen
        while len(pending) >= size:
            label_and_weigh(pending[:size])
            pending = pending[size:]
    if pending:
        label_and_weigh(pending)
    return {"pairs": pairs, "frames": frames, "seconds": time.perf_counter() - t0} | {
        f"{k}_s": round(v, 3) for k, v in t.items()}


def decode_only(videos: list[str]) -> dict[str, Any]:
    """PyAV decoding alone (every frame to RGB at its own size), one process: {frames, seconds}."""
    import av

    t0 = time.perf_counter()
    frames = 0
    for uri in videos:
        with av.open(uri) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for frame in container.decode(stream):
                frame.to_ndarray(format="rgb24")
                frames += 1
    return {"frames": frames, "seconds": time.perf_counter() - t0}


def run(args: dict[str, Any]) -> list[dict[str, Any]]:
    import torch

    from cwm_ray.annotate import annotate

    if args["quick"]:
        args |= {"num_videos": min(args["num_videos"], 8), "repeats": 1}
    videos = toy_corpus(args["num_videos"], args["video_size"])
    models = toy_models()
    work = CACHE / "p1"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    manifest = work / "videos.csv"
    manifest.write_text("video_uri\n" + "\n".join(videos) + "\n")
    torch.set_num_threads(torch.get_num_threads())  # the loop's torch: every core, as a plain script gets

    rounds: list[dict[str, Any]] = []
    with private_ray() as ray_startup_s:
        for r in range(args["repeats"]):
            cfg = annotate_cfg(args, models, str(manifest), str(work / f"out{r}"))
            entry: dict[str, Any] = {}
            order = ["pipeline", "loop"] if r % 2 == 0 else ["loop", "pipeline"]
            for side in order:
                if side == "pipeline":
                    s = annotate(cfg)
                    entry["pipeline"] = {"pairs": s["pairs"], "seconds": s["pipeline_seconds"],
                                         "idm": s.get("stages", {}).get("idm", {})}
                else:
                    entry["loop"] = sequential_loop(cfg, videos)
            entry["decode"] = decode_only(videos)
            rounds.append(entry)
            print(f"[bench p1] round {r}: {entry}", file=sys.stderr, flush=True)

    pairs = rounds[0]["loop"]["pairs"]
    frames = rounds[0]["loop"]["frames"]
    assert all(e["pipeline"]["pairs"] == pairs for e in rounds), "pipeline and loop disagree on the pairs"
    pipe_s = median([e["pipeline"]["seconds"] for e in rounds])
    loop_s = median([e["loop"]["seconds"] for e in rounds])
    dec_s = median([e["decode"]["seconds"] for e in rounds])
    stage = {k: median([e["loop"][f"{k}_s"] for e in rounds]) for k in ("load", "decode", "idm", "recognition")}
    inputs = {"videos": len(videos), "pairs": pairs, "frames": frames, "repeats": args["repeats"],
              "idm": models["idm"], "world_model": models["world_model"],
              "stages": {k: args[k] for k in DEFAULTS if k.split("_")[0] in ("decode", "idm", "rec")}}
    out = []
    wanted = args["emit"].split(",")
    if "P1" in wanted:
        ratio = loop_s / pipe_s  # pairs/s ratio = inverse time ratio (same pairs)
        out.append(emit(
            "P1", inputs, loop_s, pipe_s, ratio, "pipeline pairs/s >= 1.15x the sequential loop's", ratio >= 1.15,
            unit="seconds for the same pairs; ratio = pairs/s(pipeline) / pairs/s(loop)",
            pairs_per_s={"pipeline": round(pairs / pipe_s, 2), "loop": round(pairs / loop_s, 2)},
            ray_startup_s=round(ray_startup_s, 2),
            loop_stage_s={k: round(v, 3) for k, v in stage.items()},
            stage_pairs_per_s={k: round(pairs / v, 1) for k, v in stage.items() if k != "load" and v > 0},
            idm_first_call_s=median([e["pipeline"]["idm"].get("first_call_s", float("nan")) for e in rounds]),
            rounds=[{k: e[k]["seconds"] for k in ("pipeline", "loop")} for e in rounds]))
    if "P5" in wanted:
        ratio = dec_s / pipe_s  # frames/s(pipeline) / frames/s(PyAV alone); same frames
        out.append(emit(
            "P5", inputs, dec_s, pipe_s, ratio, "pipeline frames/s >= 0.5x PyAV decoding alone (toy IDM)",
            ratio >= 0.5, unit="seconds for the same frames; ratio = frames/s(pipeline) / frames/s(PyAV alone)",
            frames_per_s={"pipeline": round(frames / pipe_s, 1), "pyav": round(frames / dec_s, 1)}))
    if "P7" in wanted:
        busy = [e["pipeline"]["idm"].get("busy_fraction", float("nan")) for e in rounds]
        active = [e["pipeline"]["idm"].get("active_fraction", float("nan")) for e in rounds]
        model_s = median([e["pipeline"]["idm"].get("model_seconds", float("nan")) for e in rounds])
        out.append(emit(
            "P7", inputs, pipe_s * args["idm_concurrency"], model_s, median(busy),
            "IDM actors inside idm.label >= 0.8 of the pipeline's wall time", median(busy) >= 0.8,
            unit="baseline = pipeline wall s x IDM actors, candidate = s inside idm.label; ratio = their quotient",
            active_fraction=round(median(active), 3),
            note="active_fraction: the same over the window from the first idm.label call to the last"))
    return out


if __name__ == "__main__":
    run(parse_args(DEFAULTS))
    sys.exit(0)


__all__ = ["DEFAULTS", "annotate_cfg", "decode_only", "run", "sequential_loop"]
