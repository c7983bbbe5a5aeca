"""The jobs' command line as a newcomer meets it: --help, --print-config, layering, quoting, input=PATH, one-line
errors with exit code 2, and the toy-value guard on a cluster or GPUs (`check_toy_values`)."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import cwm_ray.config as config
from cwm_ray.config import (
    AnnotateConfig,
    ConfigError,
    CorpusInput,
    EvaluateConfig,
    EvaluateIDMConfig,
    ReproduceConfig,
    ServeConfig,
    ToyCorpusConfig,
    TrainIDMConfig,
    TrainWorldModelConfig,
    check_toy_values,
    load,
    parse_cli,
)

REPO = Path(__file__).resolve().parents[1]
PROFILE = "configs/real/qwen25vl7b_ip2p.yaml"
CLUSTER = {"RAY_ADDRESS": "http://127.0.0.1:8265"}
JOBS = {  # job script → (config class, its default YAML), as each script passes them to run_job
    "make_toy_corpus": (ToyCorpusConfig, "configs/toy.yaml"), "annotate": (AnnotateConfig, "configs/annotate.yaml"),
    "train_idm": (TrainIDMConfig, "configs/train_idm.yaml"),
    "train_world_model": (TrainWorldModelConfig, "configs/train_world_model.yaml"),
    "evaluate": (EvaluateConfig, "configs/evaluate.yaml"),
    "evaluate_idm": (EvaluateIDMConfig, "configs/evaluate_idm.yaml"),
    "reproduce": (ReproduceConfig, "configs/reproduce.yaml"),
}


def _job(script: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_AUTH_MODE": "disabled"}
    return subprocess.run([sys.executable, f"jobs/{script}.py", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env=environ | (env or {}))


# --- --help and --print-config -------------------------------------------------------------------------------


def test_help_resolves_configs_and_overrides_and_describes_every_field(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        parse_cli(AnnotateConfig, ["--help", "--config", PROFILE, "frames.k_frames=3"],
                  default_config="configs/annotate.yaml")
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "frames.k_frames=3" in out  # the override, resolved
    assert "K_f: motion peaks kept per video" in out  # the field's docstring, from config.py's source
    assert "idm.model=" in out and "toy_idm" not in out  # the profile's IDM
    assert "frames.max_side=64" not in out  # the profile replaced the toy YAML, it did not layer on it
    assert "frames.motion=farneback    (one of: farneback, diff)" in out  # fixed choices are shown
    assert "world_model.backend=diffusion    (one of: diffusion, token)" in out
    assert "input=PATH" in out


def test_every_documented_field_has_its_description_in_help() -> None:
    """Every field with a docstring in config.py shows it: the parse of the source found them all."""
    _, docs, choices = config._source_docs()
    assert docs["FramesConfig"]["k_frames"].startswith("K_f")
    assert docs["LoRAConfig"]["target_modules"].startswith("Module names to adapt")
    assert choices["OptimSection"]["schedule"] == ("cosine", "constant")
    assert choices["WorldModelConfig"]["dtype"] == config.DTYPE_NAMES
    text = config.describe(TrainWorldModelConfig())
    for key in ("world_model.pixel_scaling_factor=7.0", "optim.adam_beta2=0.999", "allow_toy=false"):
        assert key in text


def test_help_and_print_config_through_a_job_start_nothing() -> None:
    proc = _job("train_idm", "--help", "optim.lr=0.5")
    assert proc.returncode == 0, proc.stderr
    assert "optim.lr=0.5" in proc.stdout and "Total optimizer steps" in proc.stdout
    # a corpus that does not exist: a real run would fail on it, --print-config only resolves
    proc = _job("annotate", "--print-config", "input=/nonexistent/videos", "output=/nonexistent/out")
    assert proc.returncode == 0, proc.stderr
    resolved = yaml.safe_load(proc.stdout.split("\n", 1)[1])
    assert resolved["inputs"] == [{"name": "videos", "uri": "/nonexistent/videos"}]
    assert not Path("/nonexistent/out").exists()


def test_config_files_layer_in_order_and_the_toy_yaml_only_without_any() -> None:
    wiring = "configs/cluster/train_idm_p4d.yaml"
    alone, layered = load(TrainIDMConfig, [REPO / PROFILE]), load(TrainIDMConfig, [REPO / PROFILE, REPO / wiring])
    wired = yaml.safe_load((REPO / wiring).read_text())
    assert layered.scaling.num_workers == wired["scaling"]["num_workers"] != TrainIDMConfig().scaling.num_workers
    assert layered.idm.model == alone.idm.model  # the wiring leaves the model pair alone
    toy = parse_cli(TrainIDMConfig, [], default_config="configs/train_idm.yaml")
    real = parse_cli(TrainIDMConfig, ["--config", str(REPO / PROFILE)], default_config="configs/train_idm.yaml")
    assert toy.idm.model == "toy" and real.idm.model != "toy" and real.idm.image_size != 64


# --- values ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("override, prompt", [
    ("idm.prompt=a: b", "a: b"),  # the shell's 'idm.prompt=a: b' (quotes removed by the shell)
    ("idm.prompt=what: {image} then {image}?", "what: {image} then {image}?"),
    ("idm.prompt='a: b'", "a: b"),  # quoted for YAML: the YAML meaning
    ("idm.prompt=it's [odd], {x: 1}", "it's [odd], {x: 1}"),
])
def test_a_text_setting_takes_the_text_as_written(override: str, prompt: str) -> None:
    assert load(AnnotateConfig, None, [override]).idm.prompt == prompt


def test_other_values_keep_their_yaml_meaning() -> None:
    cfg = load(EvaluateIDMConfig, None, ["bench=null", "idm.adapter=null", "max_items=3", "tasks=[a, b]",
                                         "output=s3://b/x"])
    assert cfg.bench is None and cfg.idm.adapter is None and cfg.max_items == 3 and cfg.tasks == ["a", "b"]
    assert cfg.output == "s3://b/x"


@pytest.mark.parametrize("override, name", [
    ("input=s3://bucket/ego/", "ego"), ("input=/data/web.jsonl", "web"), ("input=/data/shards/*.tar", "shards"),
    ("input=videos/*.mp4", "videos"), ("input=s3://bucket", "bucket"),
])
def test_input_is_one_corpus_named_after_its_path(override: str, name: str) -> None:
    cfg = load(AnnotateConfig, None, [override])
    assert cfg.inputs == [CorpusInput(name=name, uri=override.split("=", 1)[1])]


def test_input_shorthand_errors_and_unnamed_inputs() -> None:
    cfg = load(AnnotateConfig, None, ["input=s3://b/ego/", "input=s3://b/web.jsonl"])
    assert [c.name for c in cfg.inputs] == ["ego", "web"]
    with pytest.raises(ConfigError, match="named alike"):
        load(AnnotateConfig, None, ["input=/a/videos", "input=/b/videos"])
    with pytest.raises(ConfigError, match="either input=PATH or inputs"):
        load(AnnotateConfig, None, ["input=/a/videos", "inputs=[{uri: /b}]"])
    with pytest.raises(ConfigError, match=r"'inputs': 'foo' is not a list; write inputs=\[...\]; for one corpus"):
        load(AnnotateConfig, None, ["inputs=foo"])
    with pytest.raises(ConfigError, match="unknown config key 'input'"):
        load(TrainIDMConfig, None, ["input=/a/videos"])  # only jobs that read corpora take it
    # an unnamed corpus is named after its path, never silently `toy`
    assert load(AnnotateConfig, None, ["inputs=[{uri: s3://b/kinetics/}]"]).inputs[0].name == "kinetics"
    assert AnnotateConfig().inputs[0].name == "toy"


@pytest.mark.parametrize("args, message", [
    (["inputs=[{name: a"], "cannot parse the value of 'inputs=[{name: a'"),
    (["inputs=foo"], "is not a list"),
    (["--conifg", "x.yaml"], "unknown option --conifg"),
    (["--config"], "--config needs a file"),
    (["--config", "nowhere.yaml"], "config file not found: nowhere.yaml"),
    (["frames.motion=flow"], "use one of farneback, diff"),
    (["idm.image_size=big"], "bad value for config key 'idm.image_size'"),
    (["frames.nope=1"], "unknown config key 'frames.nope'"),
])
def test_every_parse_error_is_one_line_and_exit_2(args: list[str], message: str) -> None:
    proc = _job("annotate", *args)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("error: ") and message in line, line


# --- the toy-value guard -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("script", sorted(JOBS))
def test_the_toy_setup_is_untouched_on_a_laptop(script: str) -> None:
    cls, default = JOBS[script]
    assert check_toy_values(load(cls, REPO / default), environ={}) == []


@pytest.mark.parametrize("script", sorted(JOBS))
def test_the_toy_setup_is_refused_on_a_cluster_unless_allowed(script: str) -> None:
    cls, default = JOBS[script]
    with pytest.raises(ConfigError, match="allow_toy=true") as err:
        check_toy_values(load(cls, REPO / default), environ=CLUSTER)
    assert "\n" not in str(err.value)
    check_toy_values(load(cls, REPO / default, ["allow_toy=true"]), environ=CLUSTER)


def test_the_guard_names_each_setting_and_its_fix() -> None:
    with pytest.raises(ConfigError) as err:
        check_toy_values(load(AnnotateConfig, None, ["output=s3://b/out", "input=s3://b/ego/", "idm.model=org/idm"]),
                         environ=CLUSTER)
    # annotation's recognition encoder defaults to a random toy world model: the one toy value left here
    assert str(err.value).startswith("toy values on a joined cluster (RAY_ADDRESS=http://127.0.0.1:8265): "
                                     "world_model.model=toy is a toy model")
    assert "configs/real/qwen25vl7b_ip2p.yaml" in str(err.value) and "idm.model" not in str(err.value)
    with pytest.raises(ConfigError, match="output=outputs/annotated is relative.*lost with it"):
        check_toy_values(load(AnnotateConfig, None, ["input=s3://b/ego/", "idm.model=org/idm",
                                                     "world_model.model=org/wm"]), environ=CLUSTER)


def test_gpus_refuse_toy_models_and_data_but_not_local_relative_outputs() -> None:
    with pytest.raises(ConfigError, match=r"on GPUs \(scaling.use_gpu\): idm.model=toy .*data.sources.0.uri="
                                          r"outputs/toy_corpus/gold/train.json is the toy corpus"):
        check_toy_values(load(TrainIDMConfig, None, ["scaling.use_gpu=true"]), environ={})
    with pytest.raises(ConfigError, match=r"on GPUs \(idm_stage.num_gpus\)"):
        check_toy_values(load(AnnotateConfig, None, ["idm_stage.num_gpus=1"]), environ={})
    real = load(TrainIDMConfig, None, ["scaling.use_gpu=true", "idm.model=org/idm",
                                       "data.sources=[{uri: /data/train.json}]"])
    assert real.train.export.startswith("outputs/") and check_toy_values(real, environ={}) == []


def test_a_real_model_below_a_sensible_input_size_gets_a_warning() -> None:
    cfg = load(TrainIDMConfig, REPO / PROFILE, ["idm.image_size=64"])
    (warning,) = check_toy_values(cfg, environ=CLUSTER)
    assert warning.startswith("idm.image_size=64 px is below 224 px")
    assert check_toy_values(load(TrainIDMConfig, REPO / PROFILE), environ=CLUSTER) == []


def test_a_job_on_a_cluster_with_toy_values_exits_2_before_ray_starts() -> None:
    proc = _job("annotate", env=CLUSTER)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert "world_model.model=toy" in line and "allow_toy=true" in line
    proc = _job("train_idm", "--print-config", "scaling.use_gpu=true")  # a planned run is checked the same way
    assert proc.returncode == 2 and "idm.model=toy" in proc.stderr


def _rayjob_entrypoints() -> list[str]:
    docs = [d for p in sorted((REPO / "cluster" / "kuberay").glob("rayjob-*.yaml"))
            for d in yaml.safe_load_all(p.read_text()) if d and d.get("kind") == "RayJob"]
    return [d["spec"]["entrypoint"] for d in docs]


@pytest.mark.parametrize("entrypoint", _rayjob_entrypoints())
def test_the_shipped_cluster_jobs_pass_the_guard(entrypoint: str) -> None:
    argv = shlex.split(entrypoint)
    cls, _ = JOBS[Path(argv[1]).stem]
    files = [REPO / a for a, prev in zip(argv[2:], argv[1:], strict=False) if prev == "--config"]
    overrides = [a for a, prev in zip(argv[2:], argv[1:], strict=False) if a != "--config" and prev != "--config"]
    assert check_toy_values(load(cls, files, overrides), environ=CLUSTER) == []


@pytest.mark.parametrize("profile", sorted((REPO / "configs" / "real").glob("*.yaml")), ids=lambda p: p.name)
def test_every_profile_section_passes_the_guard(profile: Path) -> None:
    for name in config.PROFILE_SECTIONS:
        cls = getattr(config, name)
        if cls is not ServeConfig:
            assert check_toy_values(load(cls, [profile]), environ=CLUSTER) == [], name


# --- Serve: an open endpoint beyond loopback -------------------------------------------------------------------


def test_an_open_endpoint_beyond_loopback_is_refused_unless_allowed() -> None:
    from cwm_ray.serve.app import check_open_endpoint, is_loopback

    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("head.internal")
    cfg = ServeConfig()
    for host in (None, "127.0.0.1", "localhost"):
        check_open_endpoint(cfg, host, environ={})
    with pytest.raises(ConfigError, match=r"host is 0.0.0.0.*\$CWM_API_KEYS is empty.*allow_open_endpoint"):
        check_open_endpoint(cfg, "0.0.0.0", environ={"CWM_API_KEYS": " , "})
    check_open_endpoint(cfg, "0.0.0.0", environ={"CWM_API_KEYS": "k1,k2"})
    check_open_endpoint(ServeConfig(allow_open_endpoint=True), "0.0.0.0", environ={})
    check_open_endpoint(ServeConfig(api_keys_env="MY_KEYS"), "10.0.0.5", environ={"MY_KEYS": "k"})


def test_build_app_reads_the_proxies_host_from_serve_and_refuses(monkeypatch: pytest.MonkeyPatch) -> None:
    """`serve run`/`serve deploy` call build_app where Serve already runs with the file's http_options."""
    import ray
    from ray import serve

    from cwm_ray.serve.app import build_app, serve_http_host

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("CWM_API_KEYS", "")
    args = {"world_model": {"model": "toy"}, "idm": {"model": "toy"}}
    build_app(args)  # no Ray: nothing to ask, nothing refused
    ray.init(num_cpus=1, include_dashboard=False)
    try:
        serve.start(http_options={"host": "0.0.0.0", "port": 0})
        assert serve_http_host() == "0.0.0.0"
        with pytest.raises(ConfigError, match="allow_open_endpoint"):
            build_app(args)
        build_app(args | {"allow_open_endpoint": True})
        monkeypatch.setenv("CWM_API_KEYS", "k")
        build_app(args)
    finally:
        serve.shutdown()
        ray.shutdown()
