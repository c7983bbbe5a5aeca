"""Shared helpers of the speed benchmarks: inputs, interleaved timing, one JSON line per figure.

Every figure is a ratio of two timings taken in the same process, interleaved where both sides can be
repeated (baseline, candidate, baseline, candidate, ...; the median of each), so a machine shared with
other work shifts both sides alike. Absolute seconds are printed too, but only the ratio is the figure.

    .venv/bin/python bench/p2_best_of_n.py [key=value ...]     # one JSON line on stdout

With $BENCH_RESULTS set (the Makefile's `bench` target sets bench/results.jsonl) the line is also appended
to that file.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # `python bench/pN.py` from anywhere imports this checkout's cwm_ray
os.chdir(REPO)
os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private local Ray: token auth only gets in the way

TOY_CORPUS = REPO / "outputs" / "toy_corpus"
TRAINED_IDM = REPO / "outputs" / "models" / "toy_idm"
TRAINED_WM = REPO / "outputs" / "models" / "toy_world_model"
CACHE = Path(os.environ.get("BENCH_CACHE", Path(tempfile.gettempdir()) / "cwm_bench"))
DEVICE = os.environ.get("BENCH_DEVICE", "cpu")
"""Where the benches' models run: `cpu` (this machine), or `cuda` (bench/real_size.py on a lent GPU)."""
GPUS = 1.0 if DEVICE.startswith("cuda") else 0.0
"""GPUs each model actor / Serve replica / Train worker asks Ray for."""


# ---------------------------------------------------------------------------------------------- arguments


def parse_args(defaults: dict[str, Any], argv: Sequence[str] | None = None) -> dict[str, Any]:
    """`key=value` overrides of `defaults`, each converted to the default's type; `--quick` sets quick=True."""
    args = dict(defaults)
    for item in sys.argv[1:] if argv is None else argv:
        if item in ("-h", "--help"):
            print("usage: [--quick] [key=value ...]\n" + "\n".join(f"  {k}={v}" for k, v in defaults.items()))
            raise SystemExit(0)
        if item == "--quick":
            args["quick"] = True
            continue
        key, sep, value = item.partition("=")
        if not sep or key not in defaults:
            raise SystemExit(f"error: unknown argument {item!r}; keys: {', '.join(defaults)}")
        kind = type(defaults[key])
        if kind is bool:
            args[key] = value.lower() in ("1", "true", "yes", "on")
        elif defaults[key] is None:
            args[key] = value
        else:
            args[key] = kind(value)
    return args


# ---------------------------------------------------------------------------------------------- timing


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def interleaved(baseline: Callable[[], Any], candidate: Callable[[], Any], repeats: int,
                warmup: bool = True) -> tuple[list[float], list[float]]:
    """Seconds of `repeats` runs of each, alternating (B, C, C, B, B, C, ...: an ABBA order, so a drift in
    machine load during the run weighs on both sides alike). One untimed warm-up of each first."""
    if warmup:
        baseline()
        candidate()
    base, cand = [], []
    for r in range(repeats):
        order = [(baseline, base), (candidate, cand)]
        for fn, out in order if r % 2 == 0 else order[::-1]:
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return base, cand


def machine() -> dict[str, Any]:
    import torch

    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "gpus": torch.cuda.device_count(),
            "load_avg_1m": round(load[0], 2) if load else None, "platform": platform.platform(terse=True),
            "python": platform.python_version(), "torch": torch.__version__, "ray": _version("ray"),
            "shared": "other jobs may run beside the bench: compare ratios, not seconds"}


def _version(name: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:  # noqa: BLE001 - a missing package is just "unknown"
        return None


def emit(bench: str, inputs: dict[str, Any], baseline_s: float, candidate_s: float, ratio: float, goal: str,
         met: bool, **extra: Any) -> dict[str, Any]:
    """Print the figure as one JSON line (and append it to $BENCH_RESULTS when set)."""
    line = {"bench": bench, "inputs": inputs, "baseline_s": round(baseline_s, 4), "candidate_s": round(candidate_s, 4),
            "ratio": round(ratio, 3), "goal": goal, "met": bool(met), **extra, "machine": machine(),
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
    text = json.dumps(line, default=_jsonable)
    print(text, flush=True)
    results = os.environ.get("BENCH_RESULTS")
    if results:
        with open(REPO / results if not os.path.isabs(results) else results, "a") as f:
            f.write(text + "\n")
    return line


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    return str(value)


# ---------------------------------------------------------------------------------------------- inputs


def toy_models() -> dict[str, str]:
    """{idm, world_model, backend}: the trained toy models when outputs/models/ has them, else random ones of the
    default toy sizes (built once into the bench cache). Speed does not depend on the weights, except that a
    random IDM rarely says EOS early, so it generates all `max_new_tokens` (the costlier case).

    $BENCH_IDM / $BENCH_WORLD_MODEL (+ $BENCH_WM_BACKEND) replace them with checkpoints of real families at
    real sizes (bench/real_size.py builds those), so every bench measures the balance real models have."""
    from cwm_ray.toyworld.diffusion_model import build_toy_world_model
    from cwm_ray.toyworld.idm_model import build_toy_idm

    if os.environ.get("BENCH_IDM") and os.environ.get("BENCH_WORLD_MODEL"):
        return {"idm": os.environ["BENCH_IDM"], "world_model": os.environ["BENCH_WORLD_MODEL"],
                "backend": os.environ.get("BENCH_WM_BACKEND", "diffusion")}
    out = {"backend": "diffusion"}
    idm = TRAINED_IDM if (TRAINED_IDM / "config.json").exists() else CACHE / "models" / "toy_idm"
    if not (idm / "config.json").exists():
        build_toy_idm(str(idm))
    out["idm"] = str(idm)
    wm = TRAINED_WM if (TRAINED_WM / "unet" / "config.json").exists() else CACHE / "models" / "toy_world_model"
    if not (wm / "unet" / "config.json").exists():
        build_toy_world_model(str(wm))
    out["world_model"] = str(wm)
    return out


def toy_corpus(num_videos: int, size: int = 64) -> list[str]:
    """The first `num_videos` videos of the toy corpus (outputs/toy_corpus, or one made in the bench cache);
    `size` other than 64 makes toy videos of that side (224 for real VLM IDMs)."""
    videos = sorted((TOY_CORPUS / "videos").glob("*.mp4")) if size == 64 else []
    if len(videos) < num_videos:
        root = CACHE / (f"corpus_{num_videos}" if size == 64 else f"corpus_{num_videos}_{size}px")
        if not (root / "corpus.json").exists():
            subprocess.run([sys.executable, "jobs/make_toy_corpus.py", f"output={root}", f"num_videos={num_videos}",
                            "num_train=64", "num_test=16", f"world.image_size={size}"], check=True, cwd=REPO,
                           stdout=subprocess.DEVNULL)
        videos = sorted((root / "videos").glob("*.mp4"))
    return [str(v) for v in videos[:num_videos]]


def gold_train(num_rows: int) -> str:
    """An AURORA-format gold train.json with at least `num_rows` items (the toy corpus's, or a bench-made one)."""
    path = TOY_CORPUS / "gold" / "train.json"
    if path.exists() and len(json.loads(path.read_text())) >= num_rows:
        return str(path)
    root = CACHE / f"gold_{num_rows}"
    if not (root / "corpus.json").exists():
        subprocess.run([sys.executable, "jobs/make_toy_corpus.py", f"output={root}", "num_videos=1",
                        f"num_train={num_rows}", "num_test=8"], check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    return str(root / "gold" / "train.json")


@contextlib.contextmanager
def private_ray(num_cpus: int | None = None) -> Iterator[float]:
    """A private local Ray for the block (`address="local"`: never a cluster someone else started on this
    machine); yields its start-up seconds."""
    import ray

    os.environ.pop("RAY_ADDRESS", None)
    t0 = time.perf_counter()
    ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled"}})
    try:
        yield time.perf_counter() - t0
    finally:
        ray.shutdown()
