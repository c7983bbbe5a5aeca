"""P1–P4 and the IDM throughput at real size: the same benches, with random models of real families at published sizes.

    .venv/bin/python bench/real_size.py                                   # on a lent GPU: size=real device=cuda
    .venv/bin/python bench/real_size.py size=tiny device=cpu benches=P2   # the smoke run CI makes

Why: the toy IDM costs a sixth of what decoding does, a real VLM IDM 100-1000x more, so the toy benches
measure the wrong balance for a GPU cluster. This script builds (once, into the bench cache) an IDM of a real
family (`idm_family`, default Qwen2-VL-2B-Instruct's architecture) and each world-model family
(InstructPix2Pix: SD-1.5's UNet/VAE/CLIP-L at 256 px; Janus-Pro-1B) with `cwm_ray.tiny`'s builders at
`size=real`, then runs bench/p1..p4 against them through $BENCH_IDM / $BENCH_WORLD_MODEL / $BENCH_DEVICE
with the model pair's profile from configs/real/ (so sizes and prompts are the production ones) and 224-px
videos. Each bench prints its usual JSON line (a ratio against a baseline in the same process); speed does not
depend on the weights, except that random models never say EOS early and so generate every token.

Budget: written for one H200 in under 8 minutes with `quick=true` (the default): building the models takes
about 2 of them on the host CPU. Nothing here has run at real size yet (no GPU was lent while it was written);
`tests/test_bench_real_size.py` runs the same code at size=tiny on the CPU.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import CACHE, REPO, parse_args

DEFAULTS: dict[str, Any] = {"size": "real", "device": "cuda", "idm_family": "qwen2_vl",
                            "wm_families": "instruct_pix2pix,janus", "benches": "P1,P2,P3,P4,IDM", "quick": True}
PROFILES = {"instruct_pix2pix": "configs/real/qwen25vl7b_ip2p.yaml",
            "janus": "configs/real/qwen25vl7b_janus_pro_1b.yaml"}
"""The model profile of each world-model family: its sizes, prompt and sampling settings."""


def build(args: dict[str, Any]) -> dict[str, str]:
    """{idm, <wm family>...}: checkpoint directories, built once per size into the bench cache."""
    from cwm_ray.tiny.idm import build_tiny_idm
    from cwm_ray.tiny.world_model import build_tiny_world_model

    root = CACHE / "real_size" / args["size"]
    paths = {"idm": root / args["idm_family"]}
    if not (paths["idm"] / "config.json").exists():
        build_tiny_idm(args["idm_family"], str(paths["idm"]), size=args["size"])
    for family in _families(args):
        paths[family] = root / family
        if not (paths[family] / ".built").exists():
            build_tiny_world_model(family, str(paths[family]), size=args["size"])
            (paths[family] / ".built").write_text("ok\n")
    return {k: str(v) for k, v in paths.items()}


def _families(args: dict[str, Any]) -> list[str]:
    return [f for f in args["wm_families"].split(",") if f]


def commands(args: dict[str, Any], models: dict[str, str]) -> list[tuple[str, dict[str, str], list[str]]]:
    """(bench, environment, argv) of every run, in order: P1-P3 once per world-model family, P4 for both models, and
    the IDM's label path (bench/idm_throughput.py, bf16, batch 64) with a dynamic and a static KV cache."""
    from cwm_ray.tiny.world_model import BACKEND

    quick = ["--quick"] if args["quick"] else []
    wanted = {b.strip().upper() for b in args["benches"].split(",")}
    runs: list[tuple[str, dict[str, str], list[str]]] = []
    for family in _families(args):
        env = {"BENCH_IDM": models["idm"], "BENCH_WORLD_MODEL": models[family], "BENCH_WM_BACKEND": BACKEND[family],
               "BENCH_DEVICE": args["device"]}
        profile = PROFILES[family]
        if "IDM" in wanted and family == _families(args)[0]:  # the IDM's label path (issue 32: >= 150 pairs/s)
            dtype = "bfloat16" if args["device"].startswith("cuda") else "float32"
            for cache in ("", "static"):
                runs.append(("IDM", env, ["bench/idm_throughput.py", *quick, f"dtype={dtype}", f"cache={cache}",
                                          "batch=64", "new_tokens=24", "threads=0"]))
        if "P1" in wanted:
            runs.append(("P1", env, ["bench/p1_annotation.py", *quick, f"config={profile}", "video_size=224",
                                     "idm_batch=16", "rec_batch=16"]))
        if "P2" in wanted:
            runs.append(("P2", env, ["bench/p2_best_of_n.py", *quick, "steps=20"]))
        if "P3" in wanted:
            runs.append(("P3", env, ["bench/p3_serving.py", *quick, "clients=8", "steps=20"]))
        if "P4" in wanted:
            gpu = ["variants=ddp", "batch=4", "steps=12", "log_every=4"]
            if family == _families(args)[0]:  # the IDM once, with the first pair's profile
                runs.append(("P4", env, ["bench/p4_training.py", "model=idm", f"model_path={models['idm']}",
                                         "lora=true", f"config={profile}", *gpu]))
            runs.append(("P4", env, ["bench/p4_training.py", "model=world_model", f"model_path={models[family]}",
                                     f"backend={BACKEND[family]}", "lora=true", f"config={profile}", *gpu]))
    return runs


def run(args: dict[str, Any]) -> int:
    t0 = time.perf_counter()
    models = build(args)
    print(f"[bench real_size] models built in {time.perf_counter() - t0:.0f} s: {models}", file=sys.stderr, flush=True)
    failed = 0
    for bench, env, argv in commands(args, models):
        t1 = time.perf_counter()
        proc = subprocess.run([sys.executable, *argv], cwd=REPO, env=dict(os.environ, **env))
        failed += proc.returncode != 0
        print(f"[bench real_size] {bench} {Path(env['BENCH_WORLD_MODEL']).name}: exit {proc.returncode} in "
              f"{time.perf_counter() - t1:.0f} s", file=sys.stderr, flush=True)
    print(f"[bench real_size] total {time.perf_counter() - t0:.0f} s, {failed} failed", file=sys.stderr, flush=True)
    return failed


if __name__ == "__main__":
    raise SystemExit(run(parse_args(DEFAULTS)))
