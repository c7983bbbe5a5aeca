"""The model replicas: `WorldModel` samples candidates, `Verifier` scores them with the IDM.

Both batch across requests with `@serve.batch`, counting *candidates*, not requests (`batch_size_fn`),
so one request for 16 candidates and sixteen requests for one fill a batch alike. Batch size and wait
are Ray Serve `user_config` (`reconfigure`), so they change without a restart. The model call runs in a
thread: the replica's event loop keeps taking requests (and answering health checks) meanwhile, and
those requests form the next batch.

That thread is one per replica (`ModelThread`), never asyncio's shared pool: torch's intra-op thread count is
per OS thread under OpenMP, and a float sum split over 1 or 2 threads can round a pixel the other way. With calls
spread over the pool's threads, one seeded request could come back one level off in a pixel depending on which
thread ran it (seen as a flaky "same answer after a replica was killed"). One thread, with the thread count set in
it, gives every call of every replica the same arithmetic.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from ray import serve

from cwm_ray.config import IDMConfig, WorldModelConfig, from_dict

logger = logging.getLogger("ray.serve")


@dataclass
class BatchingConfig:
    """`user_config` of both model deployments."""

    max_batch_size: int = 16
    """Candidates (not requests) per model call."""
    batch_wait_timeout_s: float = 0.01
    """How long a batch waits to fill after its first request."""
    torch_threads: int = 0
    """Torch threads in the replica; 0 = leave Ray's default (the replica's num_cpus)."""


@dataclass
class SampleRequest:
    image: bytes
    """PNG/JPEG bytes of the source frame."""
    action: str
    n: int
    seed: int


@dataclass
class ScoreRequest:
    source: bytes
    candidates: list[bytes]
    action: str


class ModelThread:
    """The replica's one model thread, with its torch thread count set in it (see the module's docstring)."""

    def __init__(self) -> None:
        threads = torch.get_num_threads()  # Ray's default for the replica: its num_cpus (OMP_NUM_THREADS)
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="model", initializer=torch.set_num_threads,
                                       initargs=(threads,))

    def set_threads(self, threads: int) -> None:
        self.pool.submit(torch.set_num_threads, threads).result()

    async def run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)


def _configure(batched: Any, user_config: dict[str, Any] | None, largest_request: int, name: str,
               thread: ModelThread) -> None:
    cfg = from_dict(BatchingConfig, user_config, source=f"{name} user_config")
    size = cfg.max_batch_size
    if size < largest_request:  # a request larger than a batch would be refused by @serve.batch
        logger.warning("%s: max_batch_size %d < limits.max_best_of %d; using %d", name, size, largest_request,
                       largest_request)
        size = largest_request
    batched.set_max_batch_size(size)
    batched.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)
    if cfg.torch_threads > 0:
        thread.set_threads(cfg.torch_threads)


@serve.deployment(name="WorldModel", ray_actor_options={"num_cpus": 1}, max_ongoing_requests=32)
class WorldModelDeployment:
    """World-model replicas: all candidates of all batched requests come from one `sample` call."""

    def __init__(self, world_model: dict[str, Any], max_candidates: int = 16) -> None:
        from cwm_ray.world_model import load_world_model

        self.cfg = from_dict(WorldModelConfig, world_model, source="world_model")
        self.model = load_world_model(self.cfg)
        self.thread = ModelThread()
        self.max_candidates = max_candidates
        self.calls = 0  # model calls made, for tests and the benchmarks (batching on vs off)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        _configure(self.sample, user_config, self.max_candidates, "WorldModel", self.thread)

    def info(self) -> dict[str, Any]:
        return {"model": self.cfg.model, "adapter": self.cfg.adapter, "backend": self.cfg.backend,
                "resolution": self.model.resolution,
                "device": str(self.model.device), "dtype": self.cfg.dtype, "calls": self.calls}

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01, batch_size_fn=lambda reqs: sum(r.n for r in reqs))
    async def sample(self, requests: list[SampleRequest]) -> list[list[bytes]]:
        """Each request's n candidates as PNG bytes (lossless, so the verifier sees exactly these pixels)."""
        from cwm_ray.schema import encode_image

        self.calls += 1
        out = await self.thread.run(
            self.model.sample, [r.image for r in requests], [r.action for r in requests],
            [r.n for r in requests], [r.seed for r in requests])
        return [[encode_image(im) for im in cands] for cands in out]


@serve.deployment(name="Verifier", ray_actor_options={"num_cpus": 1}, max_ongoing_requests=32)
class VerifierDeployment:
    """IDM replicas: log p(action | source, candidate) for every candidate of every batched request."""

    def __init__(self, idm: dict[str, Any], max_candidates: int = 16) -> None:
        from cwm_ray.idm import InverseDynamicsModel

        self.cfg = from_dict(IDMConfig, idm, source="idm")
        self.model = InverseDynamicsModel.load(self.cfg)
        self.thread = ModelThread()
        self.max_candidates = max_candidates
        self.calls = 0

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        _configure(self.score, user_config, self.max_candidates, "Verifier", self.thread)

    def info(self) -> dict[str, Any]:
        return {"model": self.cfg.model, "adapter": self.cfg.adapter, "device": str(self.model.device),
                "dtype": self.cfg.dtype, "calls": self.calls}

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01,
                 batch_size_fn=lambda reqs: sum(len(r.candidates) for r in reqs))
    async def score(self, requests: list[ScoreRequest]) -> list[list[float]]:
        self.calls += 1
        sources = [r.source for r in requests for _ in r.candidates]
        targets = [c for r in requests for c in r.candidates]
        actions = [r.action for r in requests for _ in r.candidates]
        flat = (await self.thread.run(self.model.score_batch, sources, targets, actions)).tolist()
        out, i = [], 0
        for r in requests:
            out.append(flat[i:i + len(r.candidates)])
            i += len(r.candidates)
        return out
