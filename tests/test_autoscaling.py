"""Autoscaling seen working: Ray's own autoscaler adds the node types a job asks for and removes them when idle.

A fake multi-node cluster (`ray.cluster_utils.AutoscalingCluster`: a real head, real raylets started by the real
autoscaler, v2 as `ray up` runs it since Ray 2.50) on this machine, with node types shaped like
cluster/aws.yaml's: `gpu_infer` advertises a GPU (the resource only; torch still runs on the CPU, since
`device: auto` takes CUDA only when torch sees it) and `cpu_decode` does not. Every worker type starts at zero.

- The annotation job's library entry, with configs/cluster/annotate_g5_8x.yaml's stage wiring (IDM actor 0.75
  GPU + recognition actor 0.25 GPU, as on one g5), makes the autoscaler start a `gpu_infer` node that was not
  there before the job; the job writes its pairs, triplets and summary; the idle node is then removed.
- configs/serve.yaml's application, deployed through its own `deployments:` section (Serve's
  `autoscaling_config` on WorldModel, with short delays), scales WorldModel from 1 to 2 replicas under a
  bounded burst; the second replica does not fit on the head, so the autoscaler adds a worker node for it; after
  the burst Serve scales back to 1 and the node goes away.

Isolation (other Ray users share this machine): AutoscalingCluster.start() and .shutdown() run
`ray stop --force`, which kills every Ray process of the user, and its head takes the default GCS port, temp
dir and `ray_current_cluster` file, which a plain `ray.init()` elsewhere would find. Here the head has its own
free ports and its own temp dir (fake worker nodes inherit the head's), and shutdown ends only the processes
that carry this cluster's marker in their environment (every Ray process of the cluster inherits it).
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pyarrow.parquet as pq
import pytest
import ray
import ray_processes
import yaml
from PIL import Image
from ray import serve
from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_ID
from ray.autoscaler.v2.sdk import get_cluster_status
from ray.cluster_utils import AutoscalingCluster
from ray.serve.context import _get_global_client
from ray.serve.schema import ServeDeploySchema

from cwm_ray.annotate import annotate
from cwm_ray.config import AnnotateConfig, ConfigError, ToyCorpusConfig, ToyWorldConfig, load
from cwm_ray.preflight import check_job_fits, cluster_capacity
from cwm_ray.toyworld.corpus import make_corpus
from cwm_ray.toyworld.diffusion_model import build_toy_world_model
from cwm_ray.toyworld.idm_model import build_toy_idm
from cwm_ray.toyworld.render import render
from cwm_ray.toyworld.world import random_scene

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
IDLE_TIMEOUT_MIN = 0.1  # 6 s; cluster/aws.yaml has 10 min
MB = 2**20
HEAD_CPUS = 2  # cluster/aws.yaml's head has 0 CPUs; here it also runs the CPU stages, to start fewer raylets
NODE_TYPES = {  # cluster/aws.yaml's worker types, scaled down (a g5.2xlarge has 8 vCPUs, a c6i.8xlarge 32)
    "cpu_decode": {"resources": {"CPU": 1, "object_store_memory": 100 * MB}, "node_config": {},
                   "min_workers": 0, "max_workers": 1},
    "gpu_infer": {"resources": {"CPU": 2, "GPU": 1, "object_store_memory": 100 * MB}, "node_config": {},
                  "min_workers": 0, "max_workers": 1},
}
# The fake provider loaded as an `external` one: Ray 2.60's wheel lacks fake_multi_node/example.yaml, the
# defaults file `type: fake_multinode` reads, so that type fails in the autoscaler's prepare_config.
FAKE_PROVIDER = "ray.autoscaler._private.fake_multi_node.node_provider.FakeMultiNodeProvider"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrivateAutoscalingCluster(AutoscalingCluster):
    """AutoscalingCluster with autoscaler v2, on private ports and a private temp dir, stopped by marker only."""

    def __init__(self, head_resources: dict[str, Any], worker_node_types: dict[str, Any], **config: Any) -> None:
        super().__init__(head_resources, worker_node_types, autoscaler_v2=True, **config)
        self.marker = ray_processes.new_marker()
        self.temp_dir = tempfile.mkdtemp(prefix="cwmas", dir="/tmp")  # short: Unix socket paths live under it
        self.address = f"{ray.util.get_node_ip_address()}:{_free_port()}"
        self._config["provider"]["gcs_address"] = self.address  # where the fake provider's nodes join

    def _generate_config(self, head_resources: dict[str, Any], worker_node_types: dict[str, Any],
                         autoscaler_v2: bool = False, **config_kwargs: Any) -> dict[str, Any]:
        # What AutoscalingCluster builds from fake_multi_node/example.yaml, without that file.
        config = {
            "cluster_name": "cwm-autoscaling-test", "max_workers": 4, "upscaling_speed": 1.0,
            "idle_timeout_minutes": IDLE_TIMEOUT_MIN,
            "provider": {"type": "external", "module": FAKE_PROVIDER, "use_node_id_as_ip": True,
                         "disable_node_updaters": True, "disable_launch_config_check": True},
            "available_node_types": {**worker_node_types, "ray.head.default": {
                "resources": head_resources, "node_config": {}, "max_workers": 0}},
            "head_node_type": "ray.head.default", "auth": {}, "docker": {}, "file_mounts": {},
            "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
            "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
            "cluster_synced_files": [], "file_mounts_sync_continuously": False, "rsync_exclude": [],
            "rsync_filter": [],
        }
        if autoscaler_v2:
            config["provider"] |= {"launch_multiple": True, "head_node_id": FAKE_HEAD_NODE_ID}
        config.update(config_kwargs)
        return config

    def start(self, _system_config: dict[str, Any] | None = None, override_env: dict[str, str] | None = None) -> None:
        """AutoscalingCluster.start's `ray start --head`, without its `ray stop --force` of every Ray process."""
        config_file = Path(self.temp_dir) / "autoscaling.json"
        config_file.write_text(json.dumps(self._config))
        res = dict(self._head_resources)
        cmd = [str(BIN / "ray"), "start", "--head", f"--port={self.address.rsplit(':', 1)[1]}",
               f"--temp-dir={self.temp_dir}", f"--autoscaling-config={config_file}",
               f"--num-cpus={res.pop('CPU', 0)}", f"--num-gpus={res.pop('GPU', 0)}",
               f"--object-store-memory={res.pop('object_store_memory', 200 * MB)}",
               "--include-dashboard=false", f"--dashboard-port={_free_port()}",
               f"--ray-client-server-port={_free_port()}", "--disable-usage-stats"]
        if res:
            cmd.append(f"--resources={json.dumps(res)}")
        if _system_config:
            cmd.append(f"--system-config={json.dumps(_system_config, separators=(',', ':'))}")
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {
            "AUTOSCALER_UPDATE_INTERVAL_S": "1", "RAY_FAKE_CLUSTER": "1", "RAY_AUTH_MODE": "disabled",
            "RAY_enable_autoscaler_v2": "1", "RAY_CLOUD_INSTANCE_ID": FAKE_HEAD_NODE_ID,
            "RAY_OVERRIDE_NODE_ID_FOR_TESTING": FAKE_HEAD_NODE_ID, **self.marker,
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", **(override_env or {})}
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        if done.returncode:
            raise RuntimeError(f"`ray start --head` failed ({done.returncode}):\n{done.stdout[-3000:]}\n"
                               f"{done.stderr[-3000:]}")

    def processes(self) -> list[int]:
        """Every live process of this cluster: the head's, the worker nodes' and their workers."""
        return ray_processes.processes(self.marker)

    def shutdown(self) -> None:
        """SIGTERM, then SIGKILL after a grace period, to this cluster's processes only; then its temp dir."""
        ray_processes.stop(self.marker)
        if not os.environ.get("CWM_KEEP_CLUSTER_LOGS"):  # set it to read the cluster's logs after a failure
            shutil.rmtree(self.temp_dir, ignore_errors=True)

    def nodes(self) -> list[dict[str, Any]]:
        """The autoscaler's view of the running nodes: [{id, type, resources}] (v2 cluster status)."""
        status = get_cluster_status(self.address)
        return [{"id": n.node_id, "type": n.ray_node_type_name, "resources": n.total_resources()}
                for n in status.active_nodes + status.idle_nodes]

    def workers(self) -> list[dict[str, Any]]:
        return [n for n in self.nodes() if n["id"] != FAKE_HEAD_NODE_ID]


class Timeline:
    """Samples the cluster's worker nodes in a thread: [(seconds since start, [(type, resources), ...])]."""

    def __init__(self, cluster: PrivateAutoscalingCluster, every_s: float = 0.5) -> None:
        self.cluster, self.every_s, self.t0 = cluster, every_s, time.monotonic()
        self.samples: list[tuple[float, list[tuple[str, dict[str, float]]]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                workers = [(w["type"], w["resources"]) for w in self.cluster.workers()]
                self.samples.append((round(time.monotonic() - self.t0, 1), workers))
            except Exception:  # noqa: BLE001 (a missed sample is no result; the assertions read the others)
                pass
            self._stop.wait(self.every_s)

    def __enter__(self) -> Timeline:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def first(self, pred: Callable[[list[tuple[str, dict[str, float]]]], bool]) -> float | None:
        return next((t for t, workers in self.samples if pred(workers)), None)

    def counts(self) -> list[tuple[float, int]]:
        """(time, number of workers) at each change."""
        out: list[tuple[float, int]] = []
        for t, workers in self.samples:
            if not out or out[-1][1] != len(workers):
                out.append((t, len(workers)))
        return out


def _wait(what: str, cond: Callable[[], bool], timeout_s: float, every_s: float = 0.5,
          state: Callable[[], Any] | None = None) -> float:
    """Seconds until `cond()` holds; fails the test after `timeout_s`, with `state()` in the message."""
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout_s:
            pytest.fail(f"{what}: not within {timeout_s:.0f} s" + (f"; now: {state()}" if state else ""))
        time.sleep(every_s)
    return time.monotonic() - t0


@pytest.fixture(scope="module")
def cluster() -> Iterator[PrivateAutoscalingCluster]:
    ray.shutdown()  # a test module before this one may have left Ray initialised in this process
    c = PrivateAutoscalingCluster({"CPU": HEAD_CPUS}, NODE_TYPES)
    try:
        # Patience for a loaded machine, where a Python process can take many seconds to start: Ray kills a
        # raylet whose agents take over 30 s, and Serve restarts a proxy not ready within 3 x 5 s.
        c.start(_system_config={"agent_register_timeout_ms": 180_000},
                override_env={"RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "120",
                              "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "60"})
        ray.init(address=c.address, include_dashboard=False)
        yield c
    finally:
        try:
            ray.shutdown()
        finally:
            c.shutdown()
            left = c.processes()
            assert not left, f"cluster processes still running after shutdown: {left}"


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("autoscaling")
    make_corpus(ToyCorpusConfig(output=str(root / "corpus"), num_videos=2, actions_per_video=2, num_train=0,
                                num_test=0, seed=5))
    build_toy_idm(str(root / "idm"), image_size=32, hidden_size=32, text_layers=1)
    build_toy_world_model(str(root / "wm"), resolution=32, patch_size=1, block_out_channels=(8, 16),
                          text_hidden_size=16)
    return {"root": root, "videos": root / "corpus" / "videos", "idm": root / "idm", "wm": root / "wm"}


def _has_gpu(workers: list[tuple[str, dict[str, float]]]) -> bool:
    return any(res.get("GPU", 0) >= 1 for _, res in workers)


@pytest.mark.timeout(420)
def test_preflight_asks_the_autoscaler_what_it_could_hold(cluster: PrivateAutoscalingCluster,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """No GPU runs now and the open-source autoscaler publishes no node types, so the job's asks go to the
    autoscaler itself (`request_resources` as a constraint, which it reports infeasible when no mix of its node
    types can hold it): two IDM actors need 1.5 GPUs of gpu_infer's at most 1, and a 3-CPU IDM actor fits no node
    type. Each is one line where Ray Data would have waited forever; the wiring's one of each fits.

    As in a full run, where test_annotate's Ray (no autoscaler) came first in this process: Ray caches per process
    whether the autoscaler is v2, and `request_resources` then wrote v1's format, which this v2 autoscaler never
    read, so every ask "fitted" (CI's DID NOT RAISE, twice). The preflight sets its constraint through the v2 call.

    First in the module, on the fresh cluster: run after the scale-up tests in two loaded runs, a refused ask was
    answered as fitting; the autoscaler counting a node that is being removed (its resources still there, no
    longer counted against max_workers) is the likely reason, not shown. The preflight also stops at the first
    refused pool now, so its own asks start no node for a job it refuses."""
    from ray.autoscaler.v2 import utils as autoscaler_v2_utils

    monkeypatch.setattr(autoscaler_v2_utils, "cached_is_autoscaler_v2", False)  # what that earlier Ray leaves
    cfg = load(AnnotateConfig, [REPO / "configs" / "cluster" / "annotate_g5_8x.yaml"], [
        "idm_stage.concurrency=1", "recognition_stage.concurrency=1", "decode.num_cpus=0.5"])
    assert sum(n["resources"].get("GPU", 0) for n in cluster.nodes()) == 0
    assert not cluster_capacity()[3]  # nothing published: the autoscaler is asked
    two = dataclasses.replace(cfg, idm_stage=dataclasses.replace(cfg.idm_stage, concurrency=2),
                              recognition_stage=dataclasses.replace(cfg.recognition_stage, concurrency=2))
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match=r"the cluster's autoscaler cannot hold idm_stage 2 x \{CPU: 1, GPU: 0.75\} "
                                          r"at once .*lower idm_stage.concurrency"):
        check_job_fits(two)
    with pytest.raises(ConfigError, match=r"cannot hold idm_stage 1 x \{CPU: 3, GPU: 0.75\} at once"):
        check_job_fits(dataclasses.replace(cfg, idm_stage=dataclasses.replace(cfg.idm_stage, num_cpus=3.0)))
    check_job_fits(cfg)
    print(f"\n[autoscaling] three preflight answers in {time.monotonic() - t0:.1f} s")
    from ray.autoscaler.v2.sdk import get_cluster_status

    constraints = get_cluster_status(cluster.address).resource_demands.cluster_constraint_demand
    assert all(not c.bundles_by_count for c in constraints)  # set back to what it was: nothing asked
    # The ask that fits made the autoscaler start a gpu_infer node (for the job that would follow); with nothing
    # asked it goes away idle. The next tests start from no worker node: none pending, none up, for 10 s on end
    # (two of the autoscaler's rounds), since a launch shows first as pending and only later as a node.
    def settled() -> bool:
        status = get_cluster_status(cluster.address)
        return not status.pending_launches and not status.pending_nodes and cluster.workers() == []

    quiet_since: list[float] = []

    def quiet_for_10_s() -> bool:
        if not settled():
            quiet_since.clear()
            return False
        quiet_since[:] = quiet_since or [time.monotonic()]
        return time.monotonic() - quiet_since[0] >= 10

    _wait("the node the fitting ask started is removed", quiet_for_10_s, 240, every_s=1, state=cluster.workers)


@pytest.mark.timeout(600)
def test_annotation_starts_a_gpu_node_and_the_idle_node_is_removed(cluster: PrivateAutoscalingCluster,
                                                                   toy: dict[str, Path]) -> None:
    head = [n for n in cluster.nodes() if n["id"] == FAKE_HEAD_NODE_ID]
    assert head and head[0]["resources"].get("GPU", 0) == 0  # only an autoscaled node can hold the IDM actor
    assert cluster.workers() == [], "worker nodes before the job: every type must start from zero"
    out = toy["root"] / "annotated"
    # The cluster wiring (IDM 0.75 GPU + recognition 0.25 GPU per g5) with one actor each and toy sizes.
    cfg = load(AnnotateConfig, [REPO / "configs" / "cluster" / "annotate_g5_8x.yaml"], [
        f"inputs=[{{name: toy, uri: {toy['videos']}}}]", f"output={out}", f"idm.model={toy['idm']}",
        "idm.image_size=32", "idm.max_new_tokens=4", "idm.dtype=float32", f"world_model.model={toy['wm']}",
        "world_model.resolution=32", "idm_stage.concurrency=1", "recognition_stage.concurrency=1",
        "idm_stage.batch_size=8", "recognition_stage.batch_size=8", "decode.concurrency=2", "decode.num_cpus=0.5",
        "filter.budget=5", "export_aurora=false"])
    assert cfg.idm_stage.num_gpus == 0.75 and cfg.recognition_stage.num_gpus == 0.25
    with Timeline(cluster) as timeline:
        t_job = time.monotonic() - timeline.t0
        summary = annotate(cfg)
        t_done = time.monotonic() - timeline.t0
        removed_after = _wait("idle worker nodes removed after the job", lambda: cluster.workers() == [], 120,
                              state=cluster.workers)
    gpu_at = timeline.first(_has_gpu)
    print(f"\n[autoscaling] annotate: job started at {t_job:.1f} s, GPU node up at {gpu_at} s, job done at "
          f"{t_done:.1f} s, workers gone {removed_after:.1f} s later; worker counts {timeline.counts()}; "
          f"pairs {summary['pairs']}, triplets {summary['triplets']}")
    assert gpu_at is not None and gpu_at >= t_job, f"no GPU node was launched for the job: {timeline.counts()}"
    assert any(kind == "gpu_infer" for _, workers in timeline.samples for kind, _ in workers)
    # the job's output, as the pipeline promises it
    assert summary["errors"] == 0 and summary["videos"] == 2 and summary["pairs"] > 0
    assert summary["stages"]["idm"]["pairs"] == summary["pairs"]  # every pair went through the IDM actor
    assert pq.read_table(str(out / "pairs")).num_rows == summary["pairs"]
    assert pq.read_table(str(out / "triplets")).num_rows == summary["triplets"] > 0
    assert json.loads((out / "summary.json").read_text())["pairs"] == summary["pairs"]
    assert cluster.workers() == []


def _serve_config(toy: dict[str, Path], port: int) -> dict[str, Any]:
    """configs/serve.yaml with the toy models, a free port, and WorldModel's autoscaling delays made short."""
    raw = yaml.safe_load((REPO / "configs" / "serve.yaml").read_text())
    raw["http_options"]["port"] = port
    raw["proxy_location"] = "HeadOnly"  # fake nodes share this machine's ports: one proxy binds the port
    (app,) = raw["applications"]
    app["args"]["world_model"] = {"model": str(toy["wm"]), "resolution": 32, "num_inference_steps": 2,
                                  "device": "cpu"}
    app["args"]["idm"] = {"model": str(toy["idm"]), "image_size": 32, "device": "cpu"}
    app["args"]["best_of"] = 2
    app["args"]["api_keys_env"] = "CWM_AUTOSCALING_TEST_KEYS"  # unset: an open loopback endpoint
    deployments = {d["name"]: d for d in app["deployments"]}
    auto = deployments["WorldModel"]["autoscaling_config"]
    assert auto["min_replicas"] == 1 and auto["max_replicas"] >= 2  # what configs/serve.yaml ships
    auto.update(max_replicas=2, target_ongoing_requests=1, upscale_delay_s=0.5, downscale_delay_s=3,
                metrics_interval_s=0.5, look_back_period_s=2)
    verifier = deployments["Verifier"]
    verifier.pop("autoscaling_config")
    verifier["num_replicas"] = 1  # one model scales here, so one extra node is enough
    return raw


def _replicas(deployment: str) -> int:
    status = serve.status().applications["cwm"].deployments[deployment]
    return status.replica_states.get("RUNNING", 0)


@pytest.mark.timeout(600)
def test_serve_world_model_scales_up_onto_a_new_node_and_back_down(cluster: PrivateAutoscalingCluster,
                                                                   toy: dict[str, Path]) -> None:
    assert cluster.workers() == [], "worker nodes before the app: every type must start from zero"
    port = _free_port()
    schema = ServeDeploySchema.model_validate(_serve_config(toy, port))
    try:
        serve.start(http_options=schema.http_options.model_dump(), proxy_location=schema.proxy_location)
        _get_global_client().deploy_apps(schema)  # what `serve deploy` / `serve run <config>` do
        _wait("the app is RUNNING", lambda: serve.status().applications.get("cwm") is not None
              and serve.status().applications["cwm"].status == "RUNNING", 240, state=serve.status)
        assert _replicas("WorldModel") == 1 and cluster.workers() == []  # the app fits on the head

        world = ToyWorldConfig(image_size=32)
        buf = io.BytesIO()
        Image.fromarray(render(random_scene(random.Random(0), world), world)).save(buf, "PNG")
        body = {"image": base64.b64encode(buf.getvalue()).decode(), "action": "remove the red circle",
                "best_of": 2}
        stop, codes = threading.Event(), []

        def client() -> None:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as c:
                while not stop.is_set():
                    codes.append(c.post("/v1/predict", json=body).status_code)

        with Timeline(cluster) as timeline, ThreadPoolExecutor(6) as pool:
            for _ in range(6):
                pool.submit(client)
            try:  # the burst lasts until WorldModel runs 2 replicas, at most 150 s
                up_after = _wait("WorldModel scaled to 2 replicas under the burst",
                                 lambda: _replicas("WorldModel") == 2, 150,
                                 state=lambda: (serve.status(), timeline.counts()))
            finally:
                stop.set()
            t_burst_end = time.monotonic() - timeline.t0
            pool.shutdown(wait=True)
            workers_during = timeline.first(lambda w: len(w) >= 1)
            down_after = _wait("WorldModel back to 1 replica after the burst",
                               lambda: _replicas("WorldModel") == 1, 120, state=serve.status)
            gone_after = _wait("the worker node removed after the scale-down", lambda: cluster.workers() == [], 120,
                               state=cluster.workers)
        print(f"\n[autoscaling] serve: 2 replicas after {up_after:.1f} s of burst ({len(codes)} requests), worker "
              f"node up at {workers_during} s, burst ended at {t_burst_end:.1f} s, back to 1 replica "
              f"{down_after:.1f} s later, worker gone {gone_after:.1f} s after that; worker counts "
              f"{timeline.counts()}")
        assert codes and set(codes) == {200}, f"failed requests during the burst: {set(codes)}"
        assert workers_during is not None, f"no worker node was added for the second replica: {timeline.counts()}"
        # a CPU replica gets the CPU node type: the autoscaler keeps GPU nodes for work that asks for GPUs
        assert {kind for _, workers in timeline.samples for kind, _ in workers} == {"cpu_decode"}
    finally:
        serve.shutdown()
