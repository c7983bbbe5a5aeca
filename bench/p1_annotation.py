"""P1 and P7 (and P5): the annotation pipeline against a bare sequential loop, and against PyAV alone.

    .venv/bin/python bench/p1_annotation.py [num_videos=96 repeats=2 idm=balanced ...]   # P1, P7
    .venv/bin/python bench/p5_decode.py                                                  # P5: idm=toy

The balance (issue 22): a real VLM IDM costs far more per pair than decoding a video does, so by default
(`idm=balanced`) the IDM is a randomly initialised checkpoint of a real family (`idm_family`, Qwen2-VL: its
config, processor, chat template and model class; `cwm_ray.tiny.idm`), whose language model is sized
(`idm_hidden` x `idm_layers`) so that one pair costs about 3x what decoding + motion + PNG costs on one core
of the 2-core CPU machine. The bench measures that balance every run, interleaved, and prints it
(`balance`): so the figure says what balance it was taken at, instead of assuming one. `idm=toy` is the
trained toy IDM (a sixth of decoding's cost: the old balance, where P7 is starved by construction), with the
stage settings it was measured with (`TOY`); `idm=<directory>` any checkpoint. $BENCH_IDM (bench/real_size.py)
wins over both.

One private Ray, then `repeats` rounds of: the Ray Data pipeline (`annotate(cfg)` into a fresh output) and the
loop a person would write without Ray (read → PyAV decode + Farneback motion + frame choice → PNG frames →
IDM `label` in batches → recognition weights; torch on every core), in ABBA order; and PyAV decoding alone.

Start-up is reported apart, not in the goals: the loop's is loading its two models; the pipeline's is its
actors starting (process, imports, model load), which the bench makes wait before any work begins (Ray Data's
`wait_for_min_actors_s`), so the time after it is the pipeline's steady state with no decoding done early.
Prints one JSON line per figure in `emit`:

- P1: steady pairs/s of the pipeline / steady pairs/s of the loop (goal >= 1.1 on 2 cores at the balanced IDM);
  the best possible is N(d + m_N) / (d + m_1) on N cores (d: decode s per pair on one core, m_k: the IDM's
  on k threads), about 1.25 at m_1 = 3d with perfect threading: overlapping decode with the IDM is all a
  pipeline can gain on one machine;
- P7: seconds inside `idm.label` over the steady wall time x IDM actors (goal >= 0.9), from summary.json's
  `stages.idm`;
- P5: frames/s of the pipeline / frames/s of PyAV decoding alone (goal >= 0.6 with the toy IDM, issue 32).
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import time
from typing import Any

from common import CACHE, GPUS, emit, median, parse_args, private_ray, toy_corpus, toy_models

DEFAULTS: dict[str, Any] = {
    "num_videos": 96, "repeats": 2, "quick": False, "emit": "P1,P7",
    "idm": "balanced", "idm_family": "qwen2_vl", "idm_hidden": 768, "idm_layers": 6,
    # the pipeline's stage resources (AnnotateConfig keys). Two 1-thread IDM actors on 2 cores: the CPU's
    # stand-in for one actor per accelerator; decode tasks and the recognition actor take the rest.
    "decode_cpus": 0.25, "decode_concurrency": 0, "idm_cpus": 0.5, "idm_threads": 1, "idm_batch": 16,
    "idm_concurrency": 2, "idm_in_flight": 2, "rec_cpus": 0.25, "rec_threads": 1, "rec_batch": 64,
    "config": "configs/annotate.yaml", "video_size": 64, "balance_repeats": 3, "reservation": 0, "full_batches": 1,
}
TOY: dict[str, Any] = {
    "idm": "toy", "num_videos": 96, "emit": "P1,P5,P7", "decode_cpus": 0.5, "idm_cpus": 0.5, "idm_threads": 0,
    "idm_batch": 32, "idm_concurrency": 1,
}
"""The settings of the toy balance (configs/annotate.yaml's stages), applied under any key=value given with idm=toy.
96 videos, as P1 (was 24): each pipeline's decode tasks start in fresh worker processes (Ray ends idle ones between
rounds), which on 24 videos was 2-4 s of a 5-s steady window (docs/benchmarks.md, P5)."""
GOALS = {"P1": 1.1, "P5": 0.6, "P7": 0.9}


def annotate_cfg(args: dict[str, Any], models: dict[str, str], manifest: str, output: str) -> Any:
    from cwm_ray.config import AnnotateConfig, load

    overrides = [
        f"inputs=[{{name: bench, uri: {manifest}}}]", f"output={output}", f"idm.model={models['idm']}",
        f"world_model.model={models['world_model']}", f"world_model.backend={models['backend']}",
        "export_aurora=false", f"idm_stage.num_gpus={GPUS / (args['idm_concurrency'] + 1)}",
        f"recognition_stage.num_gpus={GPUS / (args['idm_concurrency'] + 1)}",
        f"idm_stage.max_tasks_in_flight_per_actor={args['idm_in_flight']}",
        f"decode.num_cpus={args['decode_cpus']}", f"decode.concurrency={args['decode_concurrency']}",
        f"idm_stage.num_cpus={args['idm_cpus']}", f"idm_stage.torch_threads={args['idm_threads']}",
        f"idm_stage.batch_size={args['idm_batch']}", f"idm_stage.concurrency={args['idm_concurrency']}",
        f"recognition_stage.num_cpus={args['rec_cpus']}", f"recognition_stage.torch_threads={args['rec_threads']}",
        f"recognition_stage.batch_size={args['rec_batch']}", f"full_batches={bool(args['full_batches'])}",
        f"op_resource_reservation={bool(args['reservation'])}",
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
    from cwm_ray.world_model import load_world_model

    t = {"load": 0.0, "decode": 0.0, "idm": 0.0, "recognition": 0.0}
    t0 = time.perf_counter()
    idm = InverseDynamicsModel.load(cfg.idm)
    rec = RecognitionWeights(load_world_model(cfg.world_model, cfg.recognition), cfg.recognition)
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


def idm_checkpoint(args: dict[str, Any], models: dict[str, str]) -> str:
    """The IDM the bench runs: $BENCH_IDM, else `idm=toy`'s toy IDM, else the balanced real-family checkpoint
    (built once into the bench cache), else `idm` as a checkpoint directory."""
    if os.environ.get("BENCH_IDM") or args["idm"] == "toy":
        return models["idm"]
    if args["idm"] != "balanced":
        return args["idm"]
    from cwm_ray.tiny.idm import build_tiny_idm

    path = CACHE / "models" / f"balanced_{args['idm_family']}_{args['idm_hidden']}x{args['idm_layers']}"
    if not (path / "config.json").exists():
        build_tiny_idm(args["idm_family"], str(path), hidden_size=args["idm_hidden"], num_layers=args["idm_layers"])
    return str(path)


def measure_balance(cfg: Any, videos: list[str], repeats: int) -> dict[str, Any]:
    """Cost per pair of decoding (+ motion + PNG) and of the IDM's `label` (one batch of `idm_stage.batch_size`
    pairs) on 1 thread, and the IDM's wall time on every core; interleaved `repeats` times, medians.

    Why: the figures are only meaningful at a known balance (issue 22), and the balance moves with the machine,
    so each run measures its own instead of quoting the sizing run's. The 1-thread costs are CPU seconds
    (`time.process_time`), which other work on a shared machine barely moves; the all-core figure can only be
    wall time, so it is the one to distrust under load.
    """
    import torch

    from cwm_ray.annotate import read_video_bytes
    from cwm_ray.idm import InverseDynamicsModel
    from cwm_ray.schema import encode_image
    from cwm_ray.video import choose_pairs, iter_frames

    cores = torch.get_num_threads()
    idm = InverseDynamicsModel.load(cfg.idm)
    sample = videos[: min(len(videos), 6)]

    def decode() -> tuple[list[Any], float]:
        t0, pairs = time.process_time(), []
        for uri in sample:
            chosen, _ = choose_pairs(iter_frames(read_video_bytes(uri, cfg), cfg.frames), cfg.frames)
            for p in chosen:
                encode_image(p.source.rgb, cfg.frames.image_format), encode_image(p.target.rgb, cfg.frames.image_format)
            pairs += chosen
        return pairs, (time.process_time() - t0) / max(1, len(pairs))

    pairs, _ = decode()
    batch = (pairs * (cfg.idm_stage.batch_size // max(1, len(pairs)) + 1))[: cfg.idm_stage.batch_size]
    src, tgt = [p.source.rgb for p in batch], [p.target.rgb for p in batch]

    def label(threads: int) -> float:
        clock = time.process_time if threads == 1 and GPUS == 0 else time.perf_counter  # a GPU's time is wall
        torch.set_num_threads(threads)
        t0 = clock()
        idm.label(src, tgt)
        seconds = (clock() - t0) / len(batch)
        torch.set_num_threads(cores)
        return seconds

    label(1)  # warm-up
    d, m1, mn = [], [], []
    for r in range(repeats):
        steps = [lambda: d.append(decode()[1]), lambda: m1.append(label(1)), lambda: mn.append(label(cores))]
        for step in steps if r % 2 == 0 else steps[::-1]:
            step()
    dec, one, all_ = statistics.median(d), statistics.median(m1), statistics.median(mn)
    return {"decode_cpu_ms_per_pair": round(1000 * dec, 2), "idm_cpu_ms_per_pair_1_thread": round(1000 * one, 2),
            f"idm_wall_ms_per_pair_{cores}_threads": round(1000 * all_, 2), "idm_over_decode": round(one / dec, 2),
            "cores": cores, "p1_bound": round(cores * (dec + all_) / (dec + one), 3),
            "note": "idm_over_decode = m_1/d, CPU seconds per pair on one thread; p1_bound = N(d + m_N)/(d + m_1): "
                    "the best P1 on N cores, every stage on 1 thread, no overhead (m_N: wall, every core)"}


def _with_preset(args: dict[str, Any], argv: list[str]) -> dict[str, Any]:
    """`idm=toy` brings the toy balance's stage settings (TOY), under any key=value given on the command line."""
    if args["idm"] != "toy":
        return args
    given = {item.partition("=")[0] for item in argv if "=" in item}
    return args | {k: v for k, v in TOY.items() if k not in given}


def run(args: dict[str, Any]) -> list[dict[str, Any]]:
    import ray.data
    import torch

    from cwm_ray.annotate import RAY_DATA_STATS, annotate

    if args["quick"]:
        args |= {"num_videos": min(args["num_videos"], 16), "repeats": 1, "balance_repeats": 1}
    videos = toy_corpus(args["num_videos"], args["video_size"])
    models = toy_models()
    models["idm"] = idm_checkpoint(args, models)
    work = CACHE / "p1"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    manifest = work / "videos.csv"
    manifest.write_text("video_uri\n" + "\n".join(videos) + "\n")
    torch.set_num_threads(torch.get_num_threads())  # the loop's torch: every core, as a plain script gets
    # Start-up apart: no operator runs until every actor pool is up, so no decoding is done during start-up.
    ray.data.DataContext.get_current().wait_for_min_actors_s = 600
    balance = measure_balance(annotate_cfg(args, models, str(manifest), str(work / "balance")), videos,
                              args["balance_repeats"])
    print(f"[bench p1] balance: {balance}", file=sys.stderr, flush=True)

    rounds: list[dict[str, Any]] = []
    with private_ray() as ray_startup_s:
        for r in range(args["repeats"]):
            cfg = annotate_cfg(args, models, str(manifest), str(work / f"out{r}"))
            entry: dict[str, Any] = {}
            order = ["pipeline", "loop"] if r % 2 == 0 else ["loop", "pipeline"]
            for side in order:
                if side == "pipeline":
                    s = annotate(cfg)
                    stages = s.get("stages", {})
                    startup = max([st.get("ready_s", 0.0) for st in stages.values()] or [0.0])
                    # The pairs it worked through: stored ones and those the IDM stage dropped (an empty action,
                    # summary.json's `dropped`), which the loop counts as it has no such rule.
                    worked = s["pairs"] + sum((s.get("dropped") or {}).values())
                    entry["pipeline"] = {"pairs": worked, "seconds": s["pipeline_seconds"], "startup_s": startup,
                                         "steady_s": s["pipeline_seconds"] - startup, "idm": stages.get("idm", {}),
                                         "recognition": stages.get("recognition", {})}
                    print(f"[bench p1] Ray Data stats of round {r}: {cfg.output}/{RAY_DATA_STATS}", file=sys.stderr)
                else:
                    loop = sequential_loop(cfg, videos)
                    entry["loop"] = loop | {"startup_s": loop["load_s"], "steady_s": loop["seconds"] - loop["load_s"]}
            entry["decode"] = decode_only(videos)
            rounds.append(entry)
            print(f"[bench p1] round {r}: {entry}", file=sys.stderr, flush=True)
    return figures(args, rounds, videos, models, balance, ray_startup_s)


def figures(args: dict[str, Any], rounds: list[dict[str, Any]], videos: list[str], models: dict[str, str],
            balance: dict[str, Any], ray_startup_s: float) -> list[dict[str, Any]]:
    """The JSON lines of the figures in `args["emit"]`, from the rounds' medians."""
    pairs = rounds[0]["loop"]["pairs"]
    frames = rounds[0]["loop"]["frames"]
    assert all(e["pipeline"]["pairs"] == pairs for e in rounds), "pipeline and loop disagree on the pairs"

    def med(side: str, key: str) -> float:
        return median([e[side][key] for e in rounds])

    pipe_s, loop_s = med("pipeline", "steady_s"), med("loop", "steady_s")
    dec_s = median([e["decode"]["seconds"] for e in rounds])
    stage = {k: median([e["loop"][f"{k}_s"] for e in rounds]) for k in ("load", "decode", "idm", "recognition")}
    startup = {"pipeline_s": round(med("pipeline", "startup_s"), 2), "loop_s": round(med("loop", "startup_s"), 2),
               "ray_s": round(ray_startup_s, 2),
               "note": "excluded from the figures: the pipeline's = until its last actor had loaded its model "
                       "(from the pipeline's start; the bench holds all work until then), the loop's = loading "
                       "its models, Ray's = ray.init"}
    whole = {"pipeline_s": round(med("pipeline", "seconds"), 2), "loop_s": round(med("loop", "seconds"), 2)}
    inputs = {"videos": len(videos), "pairs": pairs, "frames": frames, "repeats": args["repeats"],
              "idm": models["idm"], "world_model": models["world_model"],
              "stages": {k: args[k] for k in DEFAULTS
                         if k.split("_")[0] in ("decode", "idm", "rec", "reservation", "full")}}
    out = []
    wanted = args["emit"].split(",")
    if "P1" in wanted:
        ratio = loop_s / pipe_s  # pairs/s ratio = inverse time ratio (same pairs)
        out.append(emit(
            "P1", inputs, loop_s, pipe_s, ratio,
            f"pipeline pairs/s >= {GOALS['P1']}x the sequential loop's (torch on every core), start-up excluded",
            ratio >= GOALS["P1"],
            unit="steady seconds for the same pairs; ratio = pairs/s(pipeline) / pairs/s(loop)",
            balance=balance, startup=startup,
            pairs_per_s={"pipeline": round(pairs / pipe_s, 2), "loop": round(pairs / loop_s, 2)},
            with_startup={**whole, "ratio": round(whole["loop_s"] / whole["pipeline_s"], 3)},
            loop_stage_s={k: round(v, 3) for k, v in stage.items()},
            stage_pairs_per_s={k: round(pairs / v, 1) for k, v in stage.items() if k != "load" and v > 0},
            idm_first_call_s=median([e["pipeline"]["idm"].get("first_call_s", float("nan")) for e in rounds]),
            rounds=[{k: round(e[k]["steady_s"], 2) for k in ("pipeline", "loop")} for e in rounds]))
    if "P5" in wanted:
        ratio = dec_s / pipe_s  # frames/s(pipeline) / frames/s(PyAV alone); same frames
        out.append(emit(
            "P5", inputs, dec_s, pipe_s, ratio,
            f"pipeline frames/s >= {GOALS['P5']}x PyAV decoding alone (toy IDM), start-up excluded",
            ratio >= GOALS["P5"], unit="seconds for the same frames; ratio = frames/s(pipeline) / frames/s(PyAV alone)",
            balance=balance, startup=startup,
            frames_per_s={"pipeline": round(frames / pipe_s, 1), "pyav": round(frames / dec_s, 1)}))
    if "P7" in wanted:
        actors = args["idm_concurrency"]
        model_s = median([e["pipeline"]["idm"].get("model_seconds", float("nan")) for e in rounds])
        busy = median([e["pipeline"]["idm"].get("model_seconds", float("nan")) / (actors * e["pipeline"]["steady_s"])
                       for e in rounds])
        out.append(emit(
            "P7", inputs, pipe_s * actors, model_s, busy,
            f"IDM actors inside idm.label >= {GOALS['P7']} of the pipeline's wall time, start-up excluded",
            busy >= GOALS["P7"],
            unit="baseline = steady pipeline wall s x IDM actors, candidate = s inside idm.label; ratio = quotient",
            balance=balance, startup=startup,
            with_startup=median([e["pipeline"]["idm"].get("busy_fraction", float("nan")) for e in rounds]),
            active_fraction=median([e["pipeline"]["idm"].get("active_fraction", float("nan")) for e in rounds]),
            recognition_busy=median([e["pipeline"]["recognition"].get("model_seconds", float("nan"))
                                     / e["pipeline"]["steady_s"] for e in rounds]),
            note="active_fraction: from the first idm.label call to the last; recognition_busy: the recognition "
                 "actor's seconds in its model over the steady wall time"))
    return out


def main(argv: list[str]) -> list[dict[str, Any]]:
    return run(_with_preset(parse_args(DEFAULTS, argv), argv))


if __name__ == "__main__":
    main(sys.argv[1:])
    sys.exit(0)


__all__ = ["DEFAULTS", "GOALS", "TOY", "annotate_cfg", "decode_only", "figures", "main", "measure_balance", "run",
           "sequential_loop"]
