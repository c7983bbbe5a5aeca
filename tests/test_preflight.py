"""Preflight (`cwm_ray.preflight`): what a run needs is checked before any cluster resource is asked for.

Models and inputs: local paths, s3:// prefixes on a moto server, Hugging Face ids against this machine's cache and
a local stand-in for the Hub's auth-check endpoint (gated, missing), offline mode. The judge's key. Resource asks
against what the cluster has or its autoscaler can add: the fit rule on hand-made capacities, and a training job
that asks for a GPU on this GPU-less machine (it used to wait forever; now one line, exit 2).
"""

from __future__ import annotations

import http.server
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from cwm_ray import preflight as preflight_module
from cwm_ray import storage
from cwm_ray.config import (
    AnnotateConfig,
    ConfigError,
    EvaluateConfig,
    JudgeConfig,
    StorageConfig,
    TrainIDMConfig,
    TrainWorldModelConfig,
    load,
)
from cwm_ray.preflight import check_cluster_fits, check_judge_key, job_asks, job_groups, preflight, warn_if_pools_share

REPO = Path(__file__).resolve().parents[1]
PROFILE = REPO / "configs" / "real" / "qwen25vl7b_ip2p.yaml"


def _one_line(exc: pytest.ExceptionInfo[ConfigError]) -> str:
    text = str(exc.value)
    assert "\n" not in text
    return text


# --- models and inputs -----------------------------------------------------------------------------------------


def test_local_models_and_inputs_must_exist(tmp_path: Path) -> None:
    model, data = tmp_path / "idm", tmp_path / "train.json"
    base = [f"data.sources=[{{uri: {data}}}]", "train.storage_path=/tmp/runs", "train.export=/tmp/export"]
    with pytest.raises(ConfigError, match=rf"idm.model: no model at {model} \(a local path\)") as err:
        preflight(load(TrainIDMConfig, None, [f"idm.model={model}", *base]))
    _one_line(err)
    model.mkdir()
    (model / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match=rf"data.sources.0.uri: nothing at {data}.*prepare_aurora"):
        preflight(load(TrainIDMConfig, None, [f"idm.model={model}", *base]))
    data.write_text("[]")
    preflight(load(TrainIDMConfig, None, [f"idm.model={model}", *base]))
    # the toy defaults (outputs/..., `toy`) are the jobs' to explain, with the command that builds them
    preflight(load(TrainIDMConfig, REPO / "configs" / "train_idm.yaml"))


def test_s3_models_need_files_under_the_prefix(s3_bucket: str) -> None:
    """The profile's chain on S3: the world model's training reads AURORA and annotate's triplets under `root`."""
    root = f"{s3_bucket}/cwm"
    cfg = load(TrainWorldModelConfig, PROFILE, [f"root={root}", f"world_model.model={root}/base",
                                                "scaling.use_gpu=false"])  # this machine has none (see below)
    with pytest.raises(ConfigError, match=rf"world_model.model: no files under {root}/base") as err:
        preflight(cfg)
    _one_line(err)
    storage.write_text(f"{root}/base/model_index.json", "{}")
    with pytest.raises(ConfigError, match=rf"data.sources.0.uri: nothing at {root}/aurora/train.json"):
        preflight(cfg)
    storage.write_text(f"{root}/aurora/train.json", "[]")
    with pytest.raises(ConfigError, match=rf"data.sources.1.uri: nothing at {root}/annotated/.*/triplets/"):
        preflight(cfg)
    storage.write_text(f"{root}/annotated/qwen25vl7b_ip2p/triplets/part-0.parquet", "")  # a prefix with a file
    preflight(cfg)
    storage.configure(StorageConfig())


class HubStandIn:
    """The Hub's `/api/models/{id}/auth-check` as huggingface_hub reads it: 200, gated (403) or not found (404)."""

    def __init__(self) -> None:
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                code, error = 200, None
                if "/org/slow/" in self.path:
                    time.sleep(3)  # a network that holds the connection: the check must not wait for it
                if "/org/gated/" in self.path:
                    code, error = 403, "GatedRepo"
                elif "/org/public/" not in self.path:
                    code, error = 404, "RepoNotFound"
                self.send_response(code)
                if error:
                    self.send_header("X-Error-Code", error)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(b'{"error": "stand-in"}')

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()


@pytest.fixture
def empty_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No cached model and no token: this machine's cache and token file replaced by empty ones."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "token"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    return tmp_path / "hub"


def _wm(model: str) -> TrainWorldModelConfig:
    return load(TrainWorldModelConfig, None, [f"world_model.model={model}", "data.sources=[]"])


def test_a_hub_id_offline_and_not_cached_is_one_line(empty_hub_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConfigError, match=r"world_model.model: timbrooks/instruct-pix2pix is not in the Hugging Face "
                                          r"cache .* HF_HUB_OFFLINE is set: download it first") as err:
        preflight(_wm("timbrooks/instruct-pix2pix"))
    _one_line(err)
    # in the cache (the layout huggingface_hub writes: refs/main names the snapshot): fine, offline or not
    repo = empty_hub_cache / "models--timbrooks--instruct-pix2pix"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    (repo / "snapshots" / "abc123" / "model_index.json").write_text("{}")
    preflight(_wm("timbrooks/instruct-pix2pix"))


def test_a_gated_or_missing_hub_id_without_a_token_is_one_line(empty_hub_cache: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    with HubStandIn() as endpoint:
        monkeypatch.setattr(constants, "ENDPOINT", endpoint)
        preflight(_wm("org/public"))  # the Hub says yes: nothing to download now, the loader fetches it
        with pytest.raises(ConfigError, match=r"org/gated is gated and no Hugging Face token is set: .*HF_TOKEN"):
            preflight(_wm("org/gated"))
        monkeypatch.setenv("HF_TOKEN", "hf_test")
        with pytest.raises(ConfigError, match=r"the Hugging Face token set here has no access to the gated org/gated"):
            preflight(_wm("org/gated"))
        with pytest.raises(ConfigError, match=r"no model org/typo on the Hugging Face Hub .*cannot see it") as err:
            preflight(_wm("org/typo"))
        _one_line(err)
        monkeypatch.setattr(preflight_module, "HUB_TIMEOUT_S", 0.5)
        with pytest.raises(ConfigError, match=r"cannot reach the Hugging Face Hub to check org/slow \(TimeoutError: "
                                              r"no answer within 0.5 s\)"):
            preflight(_wm("org/slow"))
    # the Hub unreachable (the stand-in is gone): the reason, and what to do
    with pytest.raises(ConfigError, match=r"cannot reach the Hugging Face Hub to check org/public \(.*\) and it is "
                                          r"not in the Hugging Face cache"):
        preflight(_wm("org/public"))


def test_the_judge_key_is_checked_before_anything(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match=r"judge.enabled needs an API key in \$CWM_TEST_NO_KEY"):
        check_judge_key(JudgeConfig(enabled=True, api_key_env="CWM_TEST_NO_KEY"), environ={})
    check_judge_key(JudgeConfig(enabled=True, api_key_env="CWM_TEST_NO_KEY"), environ={"CWM_TEST_NO_KEY": "k"})
    check_judge_key(JudgeConfig(enabled=True, base_url="http://127.0.0.1:1/v1"), environ={})  # a local server
    cfg = load(EvaluateConfig, REPO / "configs" / "evaluate.yaml", ["judge.enabled=true",
                                                                   "judge.api_key_env=CWM_TEST_NO_KEY"])
    with pytest.raises(ConfigError, match="CWM_TEST_NO_KEY"):
        preflight(cfg, environ={})


# --- resources ---------------------------------------------------------------------------------------------------

CPU_ONLY = ([{"CPU": 2.0}], {"CPU": 2.0}, {"CPU": 2.0}, False)
"""(node shapes, resources now, at most, autoscaling): this machine as a private Ray sees it."""
AUTOSCALING = ([{"CPU": 0.0}, {"CPU": 8.0, "GPU": 1.0}, {"CPU": 96.0, "GPU": 8.0}],  # head, g5 and p4d types
               {"CPU": 0.0}, {"CPU": 8 * 8 + 96.0, "GPU": 8 + 8.0}, True)


def test_gpu_asks_on_a_cluster_without_gpus_are_refused_not_waited_for() -> None:
    cfg = load(TrainIDMConfig, PROFILE, ["root=s3://acme/cwm"])
    with pytest.raises(ConfigError, match=r"scaling: one actor or worker asks \{CPU: 1, GPU: 1\}, more than any node "
                                          r"has .*no autoscaler.*lower scaling.num_workers") as err:
        check_cluster_fits(job_asks(cfg), CPU_ONLY)
    _one_line(err)
    check_cluster_fits(job_asks(cfg), AUTOSCALING)  # the autoscaler can start GPU nodes for it
    wired = load(TrainIDMConfig, [PROFILE, REPO / "configs" / "cluster" / "train_idm_p4d.yaml"], ["root=s3://a/b"])
    check_cluster_fits(job_asks(wired), AUTOSCALING)  # 8 x {CPU 10, GPU 1}: one p4d node
    with pytest.raises(ConfigError, match=r"the job asks for 24 GPU at once \(scaling 24 x 1\), and the cluster has "
                                          r"at most 16 with its autoscaler's node types"):
        check_cluster_fits(job_asks(load(TrainIDMConfig, [PROFILE], ["root=s3://a/b", "scaling.num_workers=24",
                                                                            "optim.global_batch_size=96"])),
                           AUTOSCALING)


def test_an_actor_pool_must_fit_and_pools_that_fit_only_in_turn_get_a_warning(
        capsys: pytest.CaptureFixture[str]) -> None:
    """A pool's actors start together (a pool that cannot fit waits forever: an error); a pipeline's pools may take
    turns (slower, but it ends: a warning). Train's workers always start together (the GPU test above)."""
    wired = load(AnnotateConfig, [PROFILE, REPO / "configs" / "cluster" / "annotate_g5_8x.yaml"], ["root=s3://a/b"])
    groups = job_groups(wired)
    assert [[a.what for a in g] for g in groups] == [["decode"], ["idm_stage"], ["recognition_stage"]]
    for group in groups:  # 8 IDM actors x 0.75 GPU and 8 recognition actors x 0.25: on the g5 type
        check_cluster_fits(group, AUTOSCALING)
    three = load(AnnotateConfig, REPO / "configs" / "annotate.yaml",
                 ["idm_stage.concurrency=3", "idm_stage.num_cpus=1"])
    with pytest.raises(ConfigError, match=r"the job asks for 3 CPU at once \(idm_stage 3 x 1\), and the cluster has 2 "
                                          r"and no autoscaler.*lower idm_stage.concurrency") as err:
        for group in job_groups(three):
            check_cluster_fits(group, CPU_ONLY)
    _one_line(err)
    two = load(AnnotateConfig, REPO / "configs" / "annotate.yaml", ["idm_stage.num_cpus=1.5"])
    for group in job_groups(two):  # 0.5 + 1.5 + 0.25 CPUs: each fits 2, not all three
        check_cluster_fits(group, CPU_ONLY)
    warn_if_pools_share(job_groups(two), CPU_ONLY)
    assert "warning: the pipeline's stages do not fit the cluster together" in capsys.readouterr().err


def test_the_autoscaler_is_asked_group_by_group_and_no_further_than_the_first_refusal(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A group the autoscaler can hold makes it start nodes, so nothing is asked past a refused group (those nodes
    would serve a job that is refused, and their churn is what the autoscaler then counts). The autoscaler here is
    scripted: the whole job does not fit, decode alone does, the IDM pool does not; the real one answers in
    tests/test_autoscaling.py."""
    wired = load(AnnotateConfig, [PROFILE, REPO / "configs" / "cluster" / "annotate_g5_8x.yaml"], ["root=s3://a/b"])
    asked: list[list[dict[str, float]]] = []
    answers = iter([False, True, False])

    def can_hold(bundles: list[dict[str, float]]) -> bool:
        asked.append(bundles)
        return next(answers)

    monkeypatch.setattr(preflight_module, "cluster_capacity", lambda: ([], {}, {}, False))
    monkeypatch.setattr(preflight_module, "autoscaler_can_hold", can_hold)
    with pytest.raises(ConfigError, match=r"autoscaler cannot hold idm_stage 8 x \{CPU: \d+, GPU: 0.75\}"):
        preflight_module.check_job_fits(wired)
    assert len(asked) == 3  # the whole job, decode, the IDM pool; never the recognition pool after the refusal
    assert len(asked[0]) == sum(len(b) for b in asked[1:]) + 8  # the recognition pool's 8 actors only in the first


def test_a_training_job_asking_for_a_gpu_here_exits_2_instead_of_hanging(tmp_path: Path) -> None:
    """This machine has no GPU: the job connects to its private Ray, sees that, and says so in one line."""
    from cwm_ray.config import ToyCorpusConfig
    from cwm_ray.toyworld.corpus import make_corpus

    make_corpus(ToyCorpusConfig(output=str(tmp_path / "corpus"), num_videos=0, num_train=8, num_test=0))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_AUTH_MODE": "disabled"}
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "jobs/train_idm.py", "scaling.use_gpu=true", "allow_toy=true",
                           f"data.sources=[{{uri: {tmp_path / 'corpus' / 'gold' / 'train.json'}}}]",
                           f"train.storage_path={tmp_path / 'runs'}", f"train.export={tmp_path / 'export'}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: scaling: one actor or worker asks {CPU: 0.5, GPU: 1}, more than any node has"), last
    assert "Traceback" not in proc.stderr and not (tmp_path / "runs").exists()
    print(f"refused in {time.monotonic() - t0:.1f} s, before Ray started")


def test_a_missing_idm_is_one_line_before_ray_starts(tmp_path: Path) -> None:
    """It used to start Ray, then print 443 lines and four tracebacks 36 s in."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_AUTH_MODE": "disabled"}
    proc = subprocess.run([sys.executable, "jobs/annotate.py", f"input={tmp_path}", "idm.model=/nowhere/idm",
                           f"output={tmp_path / 'out'}"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [
        "error: idm.model: no model at /nowhere/idm (a local path): fix the path, or give a Hugging Face id or an "
        "s3:// URI"]
    assert "Started a local Ray instance" not in proc.stdout + proc.stderr
