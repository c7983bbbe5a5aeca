import subprocess
import sys
from pathlib import Path

import pytest

from cwm_ray.config import REPO_ROOT, ConfigError, ToyCorpusConfig, load, parse_cli


def test_defaults_file_and_overrides_layer(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("num_videos: 3\nworld:\n  grid: 4\n")
    cfg = load(ToyCorpusConfig, f, ["world.grid=16", "output=s3://b/x", "world.actions=[move,add]"])
    assert cfg.num_videos == 3  # from the file
    assert cfg.world.grid == 16  # override beats file
    assert cfg.output == "s3://b/x"
    assert cfg.world.actions == ["move", "add"]
    assert cfg.num_train == ToyCorpusConfig().num_train  # untouched default
    assert isinstance(cfg, ToyCorpusConfig)


@pytest.mark.parametrize("override, key", [("num_vidoes=3", "num_vidoes"), ("world.gird=3", "world.gird")])
def test_unknown_key_is_named(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=f"unknown config key '{key}'"):
        load(ToyCorpusConfig, None, [override])


def test_unknown_key_in_file_is_named(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("world:\n  colour: red\n")
    with pytest.raises(ConfigError, match="world.colour"):
        load(ToyCorpusConfig, f)


def test_wrong_type_is_named() -> None:
    with pytest.raises(ConfigError, match="bad value for config key 'world.grid'"):
        load(ToyCorpusConfig, None, ["world.grid=many"])


def test_malformed_override_and_missing_file() -> None:
    with pytest.raises(ConfigError, match="key=value"):
        load(ToyCorpusConfig, None, ["num_videos"])
    with pytest.raises(ConfigError, match="not found"):
        load(ToyCorpusConfig, "/nonexistent.yaml")


def test_cli_uses_repo_default_and_prints_config(capsys: pytest.CaptureFixture[str]) -> None:
    cfg = parse_cli(ToyCorpusConfig, ["seed=7"], default_config="configs/toy.yaml")
    out = capsys.readouterr().out
    assert cfg.seed == 7 and "seed: 7" in out and "configs/toy.yaml" in out


def test_job_exits_2_with_clear_error_on_bad_key() -> None:
    proc = subprocess.run([sys.executable, "jobs/make_toy_corpus.py", "num_vidoes=1"], cwd=REPO_ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "unknown config key 'num_vidoes'" in proc.stderr


def test_dict_fields_take_new_keys_but_keep_their_value_type() -> None:
    cfg = load(ToyCorpusConfig, None, ["train_kind_weights={add: 2, put: 2.5}"])
    assert cfg.train_kind_weights == {"add": 2.0, "put": 2.5}
    with pytest.raises(ConfigError, match="train_kind_weights.add"):
        load(ToyCorpusConfig, None, ["train_kind_weights={add: lots}"])
    with pytest.raises(ConfigError, match="unknown config key 'world.nope'"):  # dataclass sections stay closed
        load(ToyCorpusConfig, None, ["world.nope=1"])


def test_exit_if_unbuilt_names_the_job_that_builds_a_missing_default(tmp_path: Path, monkeypatch) -> None:
    from cwm_ray.job import exit_if_unbuilt

    monkeypatch.chdir(tmp_path)
    exit_if_unbuilt([("IDM", "org/some-model", "jobs/train_idm.py"), ("IDM", None, "jobs/train_idm.py")])  # not ours
    with pytest.raises(SystemExit, match=r"no IDM at outputs/models/x\. .*jobs/train_idm\.py\nhint"):
        exit_if_unbuilt([("IDM", "outputs/models/x", "jobs/train_idm.py")], hint="hint")
    (tmp_path / "outputs" / "models" / "x").mkdir(parents=True)
    exit_if_unbuilt([("IDM", "outputs/models/x", "jobs/train_idm.py")])  # built: nothing happens


@pytest.mark.parametrize("name, cls", [
    ("annotate", "AnnotateConfig"), ("evaluate", "EvaluateConfig"), ("evaluate_idm", "EvaluateIDMConfig"),
    ("toy", "ToyCorpusConfig"), ("reproduce", "ReproduceConfig"), ("train_idm", "TrainIDMConfig"),
    ("train_world_model", "TrainWorldModelConfig"), ("train_token_world_model", "TrainWorldModelConfig")])
def test_every_job_config_in_configs_loads(name: str, cls: str) -> None:
    """A typo'd key or a wrong type in a shipped config is a ConfigError here, not at a user's first run."""
    import cwm_ray.config as config

    repo = Path(__file__).resolve().parents[1]
    cfg = config.load(getattr(config, cls), repo / "configs" / f"{name}.yaml")
    if name == "train_token_world_model":
        assert cfg.world_model.backend == "token" and cfg.train.export.endswith("toy_token_world_model")


@pytest.mark.parametrize("cls, override", [
    ("AnnotateConfig", "frames.motion=flow"), ("AnnotateConfig", "frames.pairing=brackets"),
    ("AnnotateConfig", "frames.image_format=webp"), ("AnnotateConfig", "filter.score=max"),
    ("AnnotateConfig", "filter.class_rule=verb"), ("AnnotateConfig", "idm.dtype=fp16"),
    ("AnnotateConfig", "fail_once_in=decode"), ("TrainWorldModelConfig", "world_model.backend=tokens"),
    ("TrainWorldModelConfig", "world_model.dtype=half"), ("TrainIDMConfig", "optim.schedule=linear"),
    ("ServeConfig", "world_model.backend=gan")])
def test_a_typo_in_a_string_setting_is_named_when_the_config_is_parsed(cls: str, override: str) -> None:
    """Before, `frames.pairing=brackets` passed here and turned every video into an error row at run time."""
    import cwm_ray.config as config

    key, value = override.split("=")
    with pytest.raises(ConfigError, match=rf"'{key}': '{value}'; use one of"):
        config.load(getattr(config, cls), None, [override])
    section, name = key.split(".", 1) if "." in key else (None, key)
    values = {section: {name: value}} if section else {name: value}
    with pytest.raises(ConfigError, match=rf"'{key}'"):
        config.from_dict(getattr(config, cls), values)


def test_a_job_with_a_typo_in_a_string_setting_exits_2_before_ray_starts() -> None:
    proc = subprocess.run([sys.executable, "jobs/annotate.py", "frames.pairing=brackets"], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "error: bad value for config key 'frames.pairing': 'brackets'; use one of bracket, consecutive"]
