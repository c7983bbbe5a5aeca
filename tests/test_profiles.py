"""Model profiles (configs/real/) and cluster wiring (configs/cluster/) carry no toy value.

The toy's 64 px once sat in every production profile (through config.py's defaults), so a real IDM would
have labelled 64-px thumbnails. Each shipped non-toy profile is resolved as a user runs it (a model profile,
then a cluster wiring layered on it) and walked: no size is the toy's, no model is `toy`, no path is a toy
output. Loading is the jobs' own (`cwm_ray.config.load`, `cwm_ray.serve.app.serve_config`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from cwm_ray.config import (
    PATH_SETTINGS,
    PROFILE_SECTIONS,
    TOY,
    AnnotateConfig,
    ConfigError,
    EvaluateConfig,
    EvaluateIDMConfig,
    ServeConfig,
    TrainIDMConfig,
    TrainWorldModelConfig,
    _leaves,
    find_placeholders,
    load,
    to_dict,
)
from cwm_ray.serve.app import serve_config

ROOT = Path(__file__).resolve().parent.parent
REAL = sorted((ROOT / "configs" / "real").glob("*.yaml"))
CLUSTER = {"annotate_": AnnotateConfig, "train_idm_": TrainIDMConfig, "train_world_model_": TrainWorldModelConfig}
JOBS = (AnnotateConfig, TrainIDMConfig, TrainWorldModelConfig, ServeConfig, EvaluateConfig, EvaluateIDMConfig)
SIZE_KEYS = {"image_size", "resolution", "motion_size", "max_side"}
TOY_SIZE = 64


def toy_values(cfg: Any) -> list[str]:
    """Every setting of a resolved config that only makes sense for the toy world, as `path=value`."""
    found: list[str] = []

    def walk(node: Any, path: str) -> None:
        if path == "toy":  # the toy world's geometry, read only by the toy judge (checked off below)
            return
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{path}.{key}" if path else str(key))
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{path}[{i}]")
        else:
            key = path.rsplit(".", 1)[-1]
            if key in SIZE_KEYS and node == TOY_SIZE:
                found.append(f"{path}={node}")
            elif key in ("model", "adapter") and node == TOY:
                found.append(f"{path}={node}")
            elif isinstance(node, str) and node.startswith("outputs/") and not path.endswith("cache_dir"):
                found.append(f"{path}={node}")
            elif path == "toy_judge" or path.endswith("metrics.toy_judge"):
                if node:
                    found.append(f"{path}={node}")

    walk(to_dict(cfg) if dataclasses.is_dataclass(cfg) else cfg, "")
    return found


def test_there_are_profiles_for_both_world_model_families() -> None:
    backends = {load(TrainWorldModelConfig, p).world_model.backend for p in REAL}
    assert len(REAL) >= 2 and backends == {"diffusion", "token"}


@pytest.mark.parametrize("profile", REAL, ids=lambda p: p.stem)
def test_a_model_profile_sets_every_stage_without_toy_values(profile: Path) -> None:
    for cls in JOBS:
        cfg = serve_config({"profile": str(profile)}) if cls is ServeConfig else load(cls, profile)
        assert toy_values(cfg) == [], f"{profile.name} [{PROFILE_SECTIONS[cls.__name__]}]"
    train_idm, train_wm = load(TrainIDMConfig, profile), load(TrainWorldModelConfig, profile)
    # The paper's hyperparameters (arXiv 2506.06006): LoRA r 16 / alpha 32, IDM lr 2e-4, world model lr 5e-4.
    for lora in (train_idm.idm.lora, train_wm.world_model.lora):
        assert lora.enabled and (lora.r, lora.alpha) == (16, 32)
    assert train_idm.optim.lr == pytest.approx(2e-4) and train_wm.optim.lr == pytest.approx(5e-4)


@pytest.mark.parametrize("wiring", sorted((ROOT / "configs" / "cluster").glob("[at]*.yaml")), ids=lambda p: p.stem)
def test_cluster_wiring_layered_on_each_model_profile_has_no_toy_values(wiring: Path) -> None:
    (cls,) = [c for prefix, c in CLUSTER.items() if wiring.name.startswith(prefix)]
    assert [v for v in toy_values(load(cls, wiring)) if v.split("=")[0].rsplit(".", 1)[-1] in SIZE_KEYS] == []
    for profile in REAL:
        layered = load(cls, [profile, wiring])
        assert toy_values(layered) == [], f"{profile.name} + {wiring.name}"
        # The wiring only adds resources: the profile's models survive the layering.
        assert to_dict(layered).get("idm", {}).get("model") == to_dict(load(cls, profile)).get("idm", {}).get("model")


def test_the_check_finds_a_toy_size_a_toy_model_and_a_toy_path() -> None:
    profile = REAL[0]
    cfg = load(TrainWorldModelConfig, profile, ["world_model.resolution=64", "train.export=outputs/models/x"])
    assert toy_values(cfg) == ["world_model.resolution=64", "train.export=outputs/models/x"]
    assert toy_values(load(EvaluateIDMConfig, profile, ["idm.model=toy"])) == ["idm.model=toy"]


def test_a_profile_without_the_jobs_section_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("train_idm:\n  optim: {lr: 0.1}\n")
    with pytest.raises(ConfigError, match="none for AnnotateConfig"):
        load(AnnotateConfig, path)
    path.write_text("train_idm: {}\ntrian_world_model: {}\n")
    with pytest.raises(ConfigError, match="unknown profile section.*trian_world_model"):
        load(TrainIDMConfig, path)


@pytest.mark.parametrize("profile", REAL, ids=lambda p: p.stem)
def test_one_root_chains_every_stage(profile: Path) -> None:
    """Each stage reads what the one before wrote, with `root=` the only setting given (no hand-edited path)."""
    root = "s3://acme/cwm"
    train_idm, annotate, train_wm, evaluate, evaluate_idm = (
        load(cls, profile, [f"root={root}"])
        for cls in (TrainIDMConfig, AnnotateConfig, TrainWorldModelConfig, EvaluateConfig, EvaluateIDMConfig))
    serve = serve_config({"profile": str(profile), "root": root})
    stages = {"train_idm": train_idm, "annotate": annotate, "train_world_model": train_wm, "serve": serve,
              "evaluate": evaluate, "evaluate_idm": evaluate_idm}
    for name, cfg in stages.items():  # every storage path is under the root (the models' bases are hub ids)
        paths = [(k, v) for k, v, _, field_name in _leaves(cfg) if field_name in PATH_SETTINGS and isinstance(v, str)
                 and "://" in v]
        assert paths and all(v.startswith(f"{root}/") or k == "root" for k, v in paths), (name, paths)
        assert find_placeholders(cfg) == [], name
    # AURORA (scripts/prepare_aurora.py writes it there) → the IDM → its export, which every later stage loads
    assert train_idm.data.sources[0].uri == f"{root}/aurora/train.json"
    assert evaluate.bench == evaluate_idm.bench == f"{root}/aurora-bench/test.json"
    assert annotate.inputs[0].uri == f"{root}/videos/"
    for cfg in (annotate, evaluate, evaluate_idm, serve):
        assert cfg.idm.model == train_idm.train.export
    # annotation's AURORA-format export is a source of the world model's training
    assert f"{annotate.output}/aurora/train.json" in [s.uri for s in train_wm.data.sources]
    # serve and evaluate: the base world model plus the adapter its LoRA training exported, never the adapter alone
    assert train_wm.world_model.lora.enabled
    for cfg in (serve, evaluate):
        assert cfg.world_model.model == train_wm.world_model.model and "://" not in cfg.world_model.model
        assert cfg.world_model.adapter == train_wm.train.export
    # the shipped profile: one placeholder, the root, and every path moves with it
    shipped = [f.split("=")[0] for f in find_placeholders(load(TrainWorldModelConfig, profile))]
    assert shipped[0] == "root" and all(k != "root" for k in shipped[1:])
