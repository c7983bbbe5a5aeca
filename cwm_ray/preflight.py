"""Preflight: what a run needs, checked before it asks a cluster for anything.

Each check here used to fail late and long: a missing IDM path started Ray, then printed 443 lines and four
tracebacks 36 s in; a GPU ask on a cluster without GPUs waited forever ("The job may hang forever"); a missing
judge key was found after every prediction and metric had been computed. Here each is one `ConfigError` line
(`run_job` prints it and exits 2):

- `preflight(cfg)`, from `run_job` before the job's `main`: every model exists (a local directory, an s3:// prefix
  with files in it, or a Hugging Face id this machine can fetch: cached, or reachable with a token where the
  repository is gated), every input file or prefix exists, and the judge has its key;
- `check_cluster_fits(asks)`, from each job once it is connected to Ray and before it schedules anything: every
  actor or worker fits one node the cluster has or its autoscaler can start, and all of them fit together.

The toy defaults (`outputs/...`, `toy`) are left to the jobs, which answer with the command that builds them.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cwm_ray import storage
from cwm_ray.config import (
    DEFAULT_OUTPUT_ROOT,
    TOY,
    AnnotateConfig,
    ConfigError,
    EvaluateConfig,
    EvaluateIDMConfig,
    IDMConfig,
    JudgeConfig,
    MetricsConfig,
    StageResources,
    TrainIDMConfig,
    TrainWorldModelConfig,
    WorldModelConfig,
    _leaves,
    joined_cluster,
)

HUB_TIMEOUT_S = 20.0
"""How long the Hub may take to say whether a model can be fetched; past it, the run stops with the reason (a
network that drops packets would otherwise hold the check as long as the model's download would have)."""
MODEL_FILES = ("config.json", "model_index.json", "adapter_config.json")
"""A model's top-level file in the Hub cache: transformers and peft write config.json / adapter_config.json,
diffusers pipelines model_index.json."""


def preflight(cfg: Any, environ: dict[str, str] | None = None) -> None:
    """Models, inputs and keys of a run, checked where the job starts (see the module docstring)."""
    environ = dict(os.environ) if environ is None else environ
    storage_cfg = getattr(cfg, "storage", None)
    for key, uri, kind in needed(cfg):
        if kind == "model":
            check_model(key, uri, storage_cfg)
        else:
            check_input(key, uri, storage_cfg)
    if isinstance(cfg, EvaluateConfig) and cfg.judge.enabled:
        check_judge_key(cfg.judge, environ)
    if isinstance(cfg, TrainIDMConfig | TrainWorldModelConfig | AnnotateConfig | EvaluateConfig) \
            and not (isinstance(cfg, EvaluateConfig) and cfg.endpoint) and not joined_cluster():
        # No cluster to join: the job's `ray.init()` will start a private Ray on this machine, whose resources Ray
        # can say now, before it starts (a joined cluster is asked once connected: `check_job_fits`).
        capacity, groups = private_capacity(), job_groups(cfg)
        for group in groups:
            check_cluster_fits(group, capacity)
        warn_if_pools_share(groups, capacity)


def needed(cfg: Any) -> Iterator[tuple[str, str, str]]:
    """(key, uri, `model` or `input`) for what this run reads; toy defaults and unused models left out."""
    skip: tuple[str, ...] = ()
    if isinstance(cfg, EvaluateConfig) and cfg.endpoint:  # the Serve app samples and verifies
        skip = ("world_model.",) if cfg.metrics.idm_agreement else ("world_model.", "idm.")
    for key, value, owner, name in _leaves(cfg):
        if not isinstance(value, str) or not value or value == TOY or key.startswith(skip) \
                or value.startswith(f"{DEFAULT_OUTPUT_ROOT}/"):
            continue
        if (isinstance(owner, IDMConfig | WorldModelConfig) and name in ("model", "adapter")) \
                or (isinstance(owner, MetricsConfig) and name in ("clip_model", "dino_model")):
            yield key, value, "model"
        elif name in ("uri", "bench", "triplets") and not any(c in value for c in "*?[{"):
            yield key, value, "input"


def _looks_local(value: str) -> bool:
    """A path, not a Hub id: hub ids are `name` or `org/name`."""
    return value.startswith((".", "/", "~")) or value.count("/") >= 2


def _has_files(uri: str, storage_cfg: Any) -> bool:
    try:
        return bool(storage.list_files(uri, cfg=storage_cfg))
    except FileNotFoundError:
        return False


def check_model(key: str, value: str, storage_cfg: Any = None) -> None:
    if storage.is_s3(value):
        if not _has_files(value, storage_cfg):
            raise ConfigError(f"{key}: no files under {value}: train or upload the model there first (the stage that "
                              f"writes it: docs/real-run.md), or fix the path")
        return
    if Path(value).expanduser().exists():
        return
    if _looks_local(value):
        raise ConfigError(f"{key}: no model at {value} (a local path): fix the path, or give a Hugging Face id or an "
                          "s3:// URI")
    check_hub_model(key, value)


def check_input(key: str, value: str, storage_cfg: Any = None) -> None:
    if not storage.exists(value, storage_cfg) and not (storage.is_s3(value) and _has_files(value, storage_cfg)):
        raise ConfigError(f"{key}: nothing at {value}: write it first (for AURORA and AURORA-Bench: "
                          f"scripts/prepare_aurora.py, docs/real-run.md), or fix the path")


def check_hub_model(key: str, repo_id: str) -> None:
    """A Hugging Face id: in this machine's cache, or fetchable (the Hub's own auth check, with the token if any)."""
    from huggingface_hub import HfApi, constants, get_token, try_to_load_from_cache
    from huggingface_hub.errors import GatedRepoError, HFValidationError, RepositoryNotFoundError

    try:
        if any(isinstance(try_to_load_from_cache(repo_id, f), str) for f in MODEL_FILES):
            return
    except HFValidationError:
        raise ConfigError(f"{key}: {repo_id!r} is neither a path that exists nor a Hugging Face id "
                          "(org/name)") from None
    cache = f"the Hugging Face cache at {constants.HF_HUB_CACHE} (HF_HOME)"
    fetch_first = (f"download it first (`hf download {repo_id}` into a cache the nodes share, docs/real-run.md), or "
                   "give a local or s3:// path")
    if constants.is_offline_mode():
        raise ConfigError(f"{key}: {repo_id} is not in {cache} and HF_HUB_OFFLINE is set: {fetch_first}")
    token = get_token()
    # The Hub client waits without limit, and the run should not: the check runs in a daemon thread, which a
    # network that drops packets cannot keep from exiting.
    outcome: list[BaseException | None] = []
    thread = threading.Thread(target=lambda: outcome.append(_auth_check(HfApi(), repo_id)), daemon=True)
    thread.start()
    thread.join(HUB_TIMEOUT_S)
    error = outcome[0] if outcome else TimeoutError(f"no answer within {HUB_TIMEOUT_S:g} s")
    if error is None:
        return
    if isinstance(error, GatedRepoError):
        if token is None:
            raise ConfigError(f"{key}: {repo_id} is gated and no Hugging Face token is set: accept its terms on "
                              "huggingface.co, then set HF_TOKEN (for a cluster job in runtime_env.env_vars, "
                              "docs/real-run.md)")
        raise ConfigError(f"{key}: the Hugging Face token set here has no access to the gated {repo_id}: accept "
                          "its terms on huggingface.co with that account")
    if isinstance(error, RepositoryNotFoundError):
        who = "no Hugging Face token is set" if token is None else "the token set here cannot see it"
        raise ConfigError(f"{key}: no model {repo_id} on the Hugging Face Hub (or it is private and {who}): "
                          "check the id, set HF_TOKEN, or give a local or s3:// path")
    reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}".rstrip(": ")
    raise ConfigError(f"{key}: cannot reach the Hugging Face Hub to check {repo_id} ({reason}) and it is not in "
                      f"{cache}: check the network (HF_ENDPOINT), or {fetch_first}")


def _auth_check(api: Any, repo_id: str) -> BaseException | None:
    """The Hub's answer to whether this token may fetch `repo_id`: None, or the error it raised."""
    try:
        api.auth_check(repo_id)
    except Exception as exc:  # noqa: BLE001 (every kind is reported: gated, missing, the network's)
        return exc
    return None


def check_judge_key(cfg: JudgeConfig, environ: dict[str, str] | None = None) -> None:
    """The LLM judge's key, before any prediction: without it the judge could only fail after the GPU work."""
    environ = dict(os.environ) if environ is None else environ
    if not environ.get(cfg.api_key_env) and cfg.base_url is None:
        raise ConfigError(f"judge.enabled needs an API key in ${cfg.api_key_env} (judge.api_key_env), or "
                          "judge.base_url of a server that takes none; on a cluster pass it in runtime_env.env_vars "
                          "(docs/real-run.md), or set judge.enabled=false")


# --------------------------------------------------------------------------------------------- cluster resources


@dataclass
class Ask:
    """`count` actors, tasks or workers of `resources` each (Ray's resource names), and the settings that size them."""

    what: str
    count: int
    resources: dict[str, float]
    settings: str
    """What to lower, named as the user sets it."""


def _stage_ask(name: str, stage: StageResources, min_count: int = 1) -> Ask:
    res = {"CPU": stage.num_cpus, "GPU": stage.num_gpus}
    return Ask(name, max(min_count, stage.concurrency), res,
               f"{name}.concurrency, {name}.num_cpus or {name}.num_gpus")


def job_asks(cfg: Any) -> list[Ask]:
    """What a job holds at once: Train workers, or the actor pools of a Ray Data pipeline plus one CPU task."""
    if isinstance(cfg, TrainIDMConfig | TrainWorldModelConfig):
        s = cfg.scaling
        res = {"CPU": s.cpus_per_worker} | ({"GPU": s.gpus_per_worker} if s.use_gpu else {})
        return [Ask("scaling", s.num_workers, res, "scaling.num_workers, scaling.cpus_per_worker or "
                    "scaling.gpus_per_worker (or scaling.use_gpu=false)")]
    if isinstance(cfg, AnnotateConfig):
        decode = Ask("decode", 1, {"CPU": cfg.decode.num_cpus, "GPU": cfg.decode.num_gpus}, "decode.num_cpus")
        return [decode, _stage_ask("idm_stage", cfg.idm_stage),
                _stage_ask("recognition_stage", cfg.recognition_stage)]
    if isinstance(cfg, EvaluateConfig):
        return [_stage_ask("world_model_stage", cfg.world_model_stage),
                _stage_ask("verifier_stage", cfg.verifier_stage)]
    if isinstance(cfg, EvaluateIDMConfig):
        return []
    raise TypeError(f"no resource asks known for {type(cfg).__name__}")


def job_groups(cfg: Any) -> list[list[Ask]]:
    """The asks that must be granted at once, group by group: Train's workers start together (one placement
    group); each Ray Data actor pool starts its `concurrency` actors together, but the pools of one pipeline can
    run one after the other, so only a pool that cannot fit alone is certain to wait forever."""
    asks = job_asks(cfg)
    return [asks] if isinstance(cfg, TrainIDMConfig | TrainWorldModelConfig) else [[a] for a in asks]


def _fmt(resources: dict[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in resources.items() if v) + "}"


def cluster_capacity() -> tuple[list[dict[str, float]], dict[str, float], dict[str, float], bool]:
    """(node shapes, resources now, resources at most, whether the node types of an autoscaler are included).

    Ray's own answers: the live nodes (`ray.nodes()`), and, where the cluster publishes them, the autoscaler's
    node types with their maximum counts (the GCS's cluster config: what Ray Train's own worker-group check reads).
    Ray's open-source autoscaler (`ray up`, KubeRay) publishes none; `check_job_fits` then asks it directly.
    """
    import ray
    from ray._private.state import state

    shapes = [{k: float(v) for k, v in n["Resources"].items()} for n in ray.nodes() if n.get("Alive")]
    now = {k: float(v) for k, v in ray.cluster_resources().items()}
    most = dict(now)
    config = state.get_cluster_config()
    published = config is not None and any(g.max_count != 0 for g in config.node_group_configs)
    if published:
        shapes += [{k: float(v) for k, v in g.resources.items()} for g in config.node_group_configs if g.max_count != 0]
        for k, v in (state.get_max_resources_from_cluster_config() or {}).items():
            most[k] = max(most.get(k, 0.0), float(v))
    return shapes, now, most, published


def _autoscaler_status() -> Any:
    """The GCS's autoscaling report (`ray status` reads the same): the autoscaler's last state, if one runs."""
    import ray
    from ray._raylet import GcsClient
    from ray.core.generated.autoscaler_pb2 import GetClusterStatusReply

    address = ray.get_runtime_context().gcs_address
    return GetClusterStatusReply.FromString(GcsClient(address=address).get_cluster_status())


def autoscaler_can_hold(bundles: list[dict[str, float]], timeout_s: float = 60.0) -> bool | None:
    """Ask the cluster's autoscaler whether it could hold all `bundles` at once: True, False, or None when there is
    no autoscaler (a cluster of fixed size). No answer within `timeout_s` counts as True, with a note: the check
    must never be what stops a job that fits.

    How: the bundles go in as a cluster constraint (what Ray's `request_resources` sets), and the autoscaler (v2)
    reports a constraint that no mix of its node types, up to their maximum counts, can hold as infeasible. A
    feasible one makes it start the nodes the job is about to ask for anyway; the constraint is then set back to
    what it was. The constraint is set through the v2 SDK's call on this cluster's GCS, not `request_resources`:
    that one picks v1 or v2 by a flag Ray caches per process, so after another Ray in the same process (one
    without an autoscaler) it wrote v1's format, which a v2 autoscaler never reads, and every ask "fitted".
    """
    import time

    import ray
    from ray.autoscaler.v2.sdk import request_cluster_resources

    before = _autoscaler_status()
    if not before.HasField("autoscaling_state") or before.autoscaling_state.autoscaler_state_version == 0:
        return None  # no v2 autoscaler reports to this cluster's GCS
    gcs = ray.get_runtime_context().gcs_address

    def request_resources(bundles: list[dict[str, float]]) -> None:
        request_cluster_resources(gcs, [{"resources": b, "label_selector": {}} for b in bundles])

    previous = [dict(r.request.resources_bundle) for c in before.cluster_resource_state.cluster_resource_constraints
                for r in c.resource_requests for _ in range(r.count)]
    request_resources(bundles=bundles)
    try:
        version = _autoscaler_status().cluster_resource_state.cluster_resource_state_version
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            status = _autoscaler_status()
            if status.autoscaling_state.last_seen_cluster_resource_state_version >= version:
                return not status.autoscaling_state.infeasible_cluster_resource_constraints
            time.sleep(0.5)
        print(f"[preflight] the autoscaler gave no answer within {timeout_s:g} s; resources not checked", flush=True)
        return True
    finally:
        request_resources(bundles=previous)


def private_capacity() -> tuple[list[dict[str, float]], dict[str, float], dict[str, float], bool]:
    """What a private `ray.init()` on this machine will have: Ray's own resolution of a head node's CPUs and GPUs
    (cgroup limits, CUDA_VISIBLE_DEVICES), without starting it."""
    from ray._private.resource_and_label_spec import ResourceAndLabelSpec

    spec = ResourceAndLabelSpec().resolve(is_head=True)
    node = {"CPU": float(spec.num_cpus or 0), "GPU": float(spec.num_gpus or 0)}
    return [node], node, dict(node), False


def check_cluster_fits(asks: Sequence[Ask], capacity: tuple[list[dict[str, float]], dict[str, float],
                                                              dict[str, float], bool] | None = None) -> None:
    """Refuse asks that must be granted together (`job_groups`) and that the cluster cannot hold now nor after its
    autoscaler has grown it: each actor or worker must fit one node (Ray places it whole), and all of them the
    cluster at its largest. Otherwise the job would wait forever for resources that never come.
    """
    shapes, now, most, autoscaling = cluster_capacity() if capacity is None else capacity
    grows = "its autoscaler's node types" if autoscaling else "no autoscaler (a cluster of fixed size)"
    for ask in asks:
        unit = {k: v for k, v in ask.resources.items() if v > 0}
        if unit and not any(all(shape.get(k, 0.0) >= v for k, v in unit.items()) for shape in shapes):
            largest = ", ".join(sorted({_fmt({k: s.get(k, 0.0) for k in unit}) for s in shapes})) or "none"
            raise ConfigError(f"{ask.what}: one actor or worker asks {_fmt(unit)}, more than any node has "
                              f"(nodes: {largest}; {grows}): lower {ask.settings}, or add a node type that large")
    need: dict[str, float] = {}
    for ask in asks:
        for k, v in ask.resources.items():
            need[k] = need.get(k, 0.0) + ask.count * v
    for k, total in need.items():
        if total > most.get(k, 0.0) + 1e-9:
            parts = " + ".join(f"{a.what} {a.count} x {a.resources[k]:g}" for a in asks if a.resources.get(k))
            limit = f"at most {most.get(k, 0.0):g} with {grows}" if autoscaling else f"{now.get(k, 0.0):g} and {grows}"
            raise ConfigError(f"the job asks for {total:g} {k} at once ({parts}), and the cluster has {limit}: lower "
                              + " / ".join(a.settings for a in asks if a.resources.get(k))
                              + (" (or use a cluster with GPUs)" if k == "GPU" else ""))


def _bundles(asks: Sequence[Ask]) -> list[dict[str, float]]:
    bundles = [{k: v for k, v in a.resources.items() if v > 0} for a in asks for _ in range(a.count)]
    return [b for b in bundles if b]


def check_job_fits(cfg: Any) -> None:
    """A job's asks against the cluster it is connected to, before its first actor or task: the published node
    types (`cluster_capacity`), else the autoscaler's own answer (`autoscaler_can_hold`: all the job's asks at
    once, then group by group only if they do not fit together), else the nodes there are (a cluster without an
    autoscaler cannot grow). Pools that fit one by one but not together get a warning.

    Groups are asked one at a time and the first refused one ends the check: a group the autoscaler can hold makes
    it start nodes, so asking past a refusal would only start nodes for a job that is refused (and while nodes
    come and go, the autoscaler may count a node that is being removed)."""
    groups = job_groups(cfg)
    try:
        capacity = cluster_capacity()
        together = None if capacity[3] else autoscaler_can_hold(_bundles([a for g in groups for a in g]))
    except Exception as exc:  # noqa: BLE001 (a cluster that cannot say what it holds: go on, Ray will tell)
        _not_checked(exc)
        return
    for group in groups:
        verdict = together
        if together is False:
            try:
                verdict = autoscaler_can_hold(_bundles(group)) if len(groups) > 1 else False
            except Exception as exc:  # noqa: BLE001
                _not_checked(exc)
                return
        if verdict is False:
            need = " + ".join(f"{a.what} {a.count} x {_fmt({k: v for k, v in a.resources.items() if v > 0})}"
                              for a in group)
            raise ConfigError(f"the cluster's autoscaler cannot hold {need} at once (no mix of its node types up to "
                              "their max_workers fits it): lower " + " / ".join(a.settings for a in group)
                              + ", or add a node type (or raise its max_workers)")
        if verdict is None:
            check_cluster_fits(group, capacity)
    if together is False:
        print("[preflight] warning: the pipeline's stages do not fit the cluster together, even autoscaled, so they "
              "will take turns (slower)", file=sys.stderr, flush=True)
    elif together is None:
        warn_if_pools_share(groups, capacity)


def _not_checked(exc: Exception) -> None:
    print(f"[preflight] could not read the cluster's resources ({type(exc).__name__}: {exc}); not checked",
          file=sys.stderr, flush=True)


def warn_if_pools_share(groups: list[list[Ask]], capacity: tuple[list[dict[str, float]], dict[str, float],
                                                                   dict[str, float], bool]) -> None:
    """Ray Data pools that fit one by one but not together: they run one after the other at best. A warning, since
    that still ends."""
    if len(groups) < 2:
        return
    try:
        check_cluster_fits([a for g in groups for a in g], capacity)
    except ConfigError as exc:
        print(f"[preflight] warning: the pipeline's stages do not fit the cluster together, so they will take turns "
              f"(slower): {exc}", file=sys.stderr, flush=True)
