"""P2: best-of-N latency, N = 8 candidates in one batched call against N = 1, same models, same steps.

    .venv/bin/python bench/p2_best_of_n.py [n=8 repeats=4 steps=10 threads=0 backend=diffusion|token]

One best-of-N answer is `sample(source, action, n)` (one batched denoising loop over the n candidates, with
3-way guidance) then the verifier's `score(source, candidates, action)` (one teacher-forced pass). Timed
in-process, N = 1 and N = 8 interleaved (ABBA), median of `repeats`. Naively (N calls of N = 1) the ratio
is N; the goal is ≤ 3. Sampling alone is reported too.
"""

from __future__ import annotations

import os
import random
import sys
import time
from typing import Any

from common import CACHE, DEVICE, emit, interleaved, median, parse_args, toy_models

DEFAULTS: dict[str, Any] = {"n": 8, "repeats": 4, "steps": 10, "threads": 0, "quick": False, "backend": "diffusion"}


def token_world_model() -> str:
    """A random toy token world model (Janus architecture), built once into the bench cache: its sampling cost
    does not depend on the weights, since it always draws all of its image tokens."""
    from cwm_ray.toyworld.token_model import build_toy_token_world_model

    path = CACHE / "models" / "toy_token_world_model"
    if not (path / "config.json").exists():
        build_toy_token_world_model(str(path))
    return str(path)


def run(args: dict[str, Any]) -> dict[str, Any]:
    import torch

    from cwm_ray.config import IDMConfig, ToyWorldConfig, WorldModelConfig
    from cwm_ray.idm import InverseDynamicsModel
    from cwm_ray.toyworld.render import render
    from cwm_ray.toyworld.world import random_scene
    from cwm_ray.world_model import load_world_model

    if args["quick"]:
        args |= {"repeats": 2}
    if args["threads"]:
        torch.set_num_threads(args["threads"])
    models = toy_models()
    if args["backend"] == "token" and not os.environ.get("BENCH_WORLD_MODEL"):
        models |= {"backend": "token", "world_model": token_world_model()}
    elif args["backend"] not in ("diffusion", "token"):
        raise SystemExit(f"backend={args['backend']!r}: use diffusion or token")
    wm = load_world_model(WorldModelConfig(backend=models["backend"], model=models["world_model"],
                                           num_inference_steps=args["steps"], device=DEVICE))
    idm = InverseDynamicsModel.load(IDMConfig(model=models["idm"], device=DEVICE))
    source = render(random_scene(random.Random(0), ToyWorldConfig()), ToyWorldConfig())
    action = "move the red circle left"
    sample_s: dict[int, list[float]] = {1: [], args["n"]: []}

    def best_of(n: int) -> None:
        t0 = time.perf_counter()
        candidates = wm.sample([source], [action], n=n, seed=0)[0]
        sample_s[n].append(time.perf_counter() - t0)
        scores = idm.score(source, candidates, action)
        assert len(scores) == n

    one, many = interleaved(lambda: best_of(1), lambda: best_of(args["n"]), args["repeats"])
    base, cand = median(one), median(many)
    ratio = cand / base
    s1, sn = median(sample_s[1][1:]), median(sample_s[args["n"]][1:])  # [1:]: not the warm-up
    return emit("P2", {"n": args["n"], "steps": args["steps"], "repeats": args["repeats"], **models},
                base, cand, ratio, f"latency(N={args['n']}) <= 3x latency(N=1)", ratio <= 3.0,
                unit="seconds per best-of-N answer (sample + verify); ratio = N=8 / N=1",
                naive_ratio=args["n"], sampling_only_ratio=round(sn / s1, 3),
                sampling_s={"1": round(s1, 4), str(args["n"]): round(sn, 4)},
                verify_s={"1": round(base - s1, 4), str(args["n"]): round(cand - sn, 4)})


if __name__ == "__main__":
    run(parse_args(DEFAULTS))
    sys.exit(0)
