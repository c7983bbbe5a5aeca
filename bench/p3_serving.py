"""P3: Serve requests/s at 32 concurrent clients, `@serve.batch` on against off; p50/p99 latency, errors.

    .venv/bin/python bench/p3_serving.py [clients=32 requests_per_client=2 best_of=2 batch=16 repeats=2]

The application is `build_app`'s graph (Ingress → WorldModel, Verifier) on the toy models, on a private
local Ray, with one replica per model deployment (no autoscaling, so only batching differs). "Off" is
`user_config.max_batch_size = best_of`: each model call serves exactly one request. "On" is
`max_batch_size = batch` candidates: one call serves up to batch / best_of requests. Both settings are
applied to the same running replicas through `user_config` (Serve's in-place `reconfigure`), alternating
off, on, on, off, ... Each setting sends `clients` × `requests_per_client` /v1/predict requests from
`clients` concurrent clients.
"""

from __future__ import annotations

import asyncio
import base64
import io
import random
import socket
import sys
import time
from typing import Any

from common import DEVICE, GPUS, emit, median, parse_args, private_ray, toy_models

DEFAULTS: dict[str, Any] = {"clients": 32, "requests_per_client": 2, "best_of": 2, "batch": 16, "wait_s": 0.02,
                            "repeats": 2, "steps": 10, "quick": False}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _app(models: dict[str, str], args: dict[str, Any], max_batch: int) -> Any:
    """build_app's graph with fixed replicas and the batching `user_config` of both model deployments."""
    from cwm_ray.config import ServeConfig, from_dict, to_dict
    from cwm_ray.serve.app import Ingress, VerifierDeployment, WorldModelDeployment, _resolved

    cfg = _resolved(from_dict(ServeConfig, {
        "world_model": {"backend": models["backend"], "model": models["world_model"],
                        "num_inference_steps": args["steps"], "device": DEVICE},
        "idm": {"model": models["idm"], "device": DEVICE}, "best_of": args["best_of"],
        "api_keys_env": "CWM_BENCH_NO_KEYS", "limits": {"max_best_of": args["best_of"]}}))
    user_config = {"max_batch_size": max_batch, "batch_wait_timeout_s": args["wait_s"]}
    wm = WorldModelDeployment.options(num_replicas=1, user_config=user_config, max_ongoing_requests=64,
                                      ray_actor_options={"num_cpus": 1, "num_gpus": GPUS / 2})
    verifier = VerifierDeployment.options(num_replicas=1, user_config=user_config, max_ongoing_requests=64,
                                          ray_actor_options={"num_cpus": 0.5, "num_gpus": GPUS / 2})
    return Ingress.bind(wm.bind(to_dict(cfg.world_model), cfg.limits.max_best_of),
                        verifier.bind(to_dict(cfg.idm), cfg.limits.max_best_of), to_dict(cfg))


async def _load(url: str, args: dict[str, Any], images: list[str]) -> dict[str, Any]:
    import httpx

    latencies: list[float] = []
    errors: list[str] = []

    async def client(c: int, http: httpx.AsyncClient) -> None:
        for k in range(args["requests_per_client"]):
            body = {"image": images[(c + k) % len(images)], "action": "remove the red circle",
                    "best_of": args["best_of"], "seed": c * 1000 + k}
            t0 = time.perf_counter()
            try:
                r = await http.post("/v1/predict", json=body)
                if r.status_code != 200:
                    errors.append(f"{r.status_code}: {r.text[:200]}")
                    continue
            except httpx.HTTPError as exc:
                errors.append(repr(exc))
                continue
            latencies.append(time.perf_counter() - t0)

    limits = httpx.Limits(max_connections=args["clients"] + 4, max_keepalive_connections=args["clients"] + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(c, http) for c in range(args["clients"])))
        wall = time.perf_counter() - t0
    latencies.sort()

    def pct(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] if latencies else float("nan")

    return {"seconds": wall, "ok": len(latencies), "errors": len(errors), "error_samples": errors[:3],
            "rps": len(latencies) / wall, "p50_s": pct(0.5), "p99_s": pct(0.99)}


def run(args: dict[str, Any]) -> dict[str, Any]:
    from PIL import Image
    from ray import serve

    from cwm_ray.config import ToyWorldConfig
    from cwm_ray.toyworld.render import render
    from cwm_ray.toyworld.world import random_scene

    if args["quick"]:
        args |= {"requests_per_client": 1, "repeats": 1}
    models = toy_models()
    world = ToyWorldConfig()
    images = []
    for seed in range(8):
        buf = io.BytesIO()
        Image.fromarray(render(random_scene(random.Random(seed), world), world)).save(buf, "PNG")
        images.append(base64.b64encode(buf.getvalue()).decode())
    port = _free_port()
    runs: dict[str, list[dict[str, Any]]] = {"off": [], "on": []}
    with private_ray(num_cpus=2):
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        try:
            url = f"http://127.0.0.1:{port}"
            sizes = {"off": args["best_of"], "on": args["batch"]}
            for r in range(args["repeats"]):
                for mode in ("off", "on") if r % 2 == 0 else ("on", "off"):
                    serve.run(_app(models, args, sizes[mode]), name="cwm", route_prefix="/")
                    asyncio.run(_load(url, args | {"requests_per_client": 1}, images))  # warm-up, untimed
                    got = asyncio.run(_load(url, args, images))
                    runs[mode].append(got)
                    print(f"[bench p3] {mode}: {got}", file=sys.stderr, flush=True)
        finally:
            serve.shutdown()

    def summary(mode: str) -> dict[str, Any]:
        rs = runs[mode]
        return {"rps": round(median([x["rps"] for x in rs]), 3), "p50_s": round(median([x["p50_s"] for x in rs]), 3),
                "p99_s": round(median([x["p99_s"] for x in rs]), 3), "errors": sum(x["errors"] for x in rs),
                "requests": sum(x["ok"] + x["errors"] for x in rs)}

    off, on = summary("off"), summary("on")
    ratio = on["rps"] / off["rps"]
    errors = off["errors"] + on["errors"]
    n = args["clients"] * args["requests_per_client"]
    return emit("P3", {k: args[k] for k in DEFAULTS if k != "quick"} | models,
                n / off["rps"], n / on["rps"], ratio, "requests/s with @serve.batch >= 2.5x without, zero errors",
                ratio >= 2.5 and errors == 0,
                unit="seconds for clients x requests_per_client requests; ratio = rps(on) / rps(off)",
                off=off, on=on, errors=errors,
                error_samples=[e for m in runs.values() for x in m for e in x["error_samples"]][:3])


if __name__ == "__main__":
    run(parse_args(DEFAULTS))
    sys.exit(0)
