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
SIZE_KEYS = {"image_size", "resolution", "max_side"}
"""Sizes that are 64 only in the toy world (`frames.motion_size` is 64 for real video too: flow on a 64-px copy)."""
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


PAPER_RECIPE = {  # arXiv 2506.06006: (epochs, global batch, lr, warm-up steps)
    TrainIDMConfig: (10, 64, 2e-4, 500),
    TrainWorldModelConfig: (40, 96, 5e-4, 400),
}


@pytest.mark.parametrize("wiring", [None, *sorted((ROOT / "configs" / "cluster").glob("[at]*.yaml"))],
                         ids=lambda p: "alone" if p is None else p.stem)
@pytest.mark.parametrize("profile", REAL, ids=lambda p: p.stem)
def test_every_profile_and_wiring_trains_the_papers_recipe(profile: Path, wiring: Path | None) -> None:
    """Epochs and the global batch are the profile's (the paper's), whatever cluster wiring is layered on: the
    wiring sets workers and the micro-batch, and gradient accumulation makes up the rest."""
    from cwm_ray.config import accumulation_steps

    files = [profile] if wiring is None else [profile, wiring]
    for cls, (epochs, batch, lr, warmup) in PAPER_RECIPE.items():
        if wiring is not None and not wiring.name.startswith(PROFILE_SECTIONS[cls.__name__] + "_"):
            continue
        cfg = load(cls, files)
        o, s = cfg.optim, cfg.scaling
        assert (o.epochs, o.global_batch_size, o.max_steps) == (epochs, batch, None), f"{profile.name} {wiring}"
        assert s.num_workers * o.batch_size * accumulation_steps(o, s) == batch
        assert (o.lr, o.warmup_steps, o.schedule) == (pytest.approx(lr), warmup, "cosine")
        assert cfg.deepspeed.bf16
        lora = cfg.idm.lora if cls is TrainIDMConfig else cfg.world_model.lora
        assert (lora.r, lora.alpha, lora.dropout) == (16, 32, 0.05)
    if wiring is None or wiring.name.startswith("annotate_"):  # the data mix: three corpora, a budget each
        annotate = load(AnnotateConfig, files)
        assert [c.name for c in annotate.inputs] == ["moments_in_time", "ucf101", "kinetics700"]
        assert annotate.filter.budget == 7000


@pytest.mark.parametrize("profile", REAL, ids=lambda p: p.stem)
def test_the_world_model_trains_each_synthetic_triplet_once_with_its_stored_map(profile: Path) -> None:
    annotate, wm = load(AnnotateConfig, profile), load(TrainWorldModelConfig, profile)
    sources = wm.data.sources
    assert [s.weight for s in sources] == [1.0, 1.0]  # not 3.0: three budgets give 3 x 7K, each trained once
    assert sources[1].uri.rstrip("/") == f"{annotate.output}/triplets"  # Parquet: the stored maps come along


@pytest.mark.parametrize("profile", REAL, ids=lambda p: p.stem)
def test_recognition_weighting_is_pinned_off_with_its_twin_one_flag_away(profile: Path) -> None:
    import yaml

    raw = yaml.safe_load(profile.read_text())
    for section in ("annotate", "train_world_model"):
        assert set(raw[section]["recognition"]) >= {"enabled", "floor", "uniform_by"}, section  # set, not defaulted
    unweighted = load(TrainWorldModelConfig, profile)
    weighted = load(TrainWorldModelConfig, profile, ["recognition.enabled=true"])
    assert not unweighted.recognition.enabled and weighted.recognition.enabled
    assert dataclasses.replace(weighted, recognition=unweighted.recognition) == unweighted  # the only difference
    annotate = load(AnnotateConfig, profile)
    assert annotate.recognition.enabled and annotate.recognition.floor == weighted.recognition.floor  # maps stored


def test_a_schedule_is_epochs_or_steps_and_the_global_batch_must_divide() -> None:
    with pytest.raises(ConfigError, match="exactly one of optim.epochs and optim.max_steps"):
        load(TrainIDMConfig, None, ["optim.epochs=2"])
    with pytest.raises(ConfigError, match=r"global_batch_size=96 .*num_workers=16 x optim.batch_size=12 = 192: "
                                          r"use optim\.batch_size=6"):
        load(TrainWorldModelConfig, [REAL[0], ROOT / "configs/cluster/train_world_model_p4d.yaml"],
             ["scaling.num_workers=16"])


def test_the_single_model_profile_is_one_base_with_an_idm_adapter_and_a_world_model_adapter() -> None:
    """configs/real/janus_pro_7b_self.yaml, the paper's setting: every stage loads the same base; train_idm exports
    the IDM's adapter, which annotate, evaluate, evaluate_idm and Serve's verifier load over the base; train_world_model
    exports the world model's, which evaluate and Serve sample with."""
    profile = ROOT / "configs" / "real" / "janus_pro_7b_self.yaml"
    train_idm, train_wm = load(TrainIDMConfig, profile), load(TrainWorldModelConfig, profile)
    base = train_idm.idm.model
    assert base == train_wm.world_model.model == "deepseek-community/Janus-Pro-7B"
    assert train_idm.idm.lora.enabled and train_idm.idm.lora_export == "adapter" and train_idm.idm.adapter is None
    assert train_wm.world_model.backend == "token" and train_wm.world_model.lora.enabled
    annotate, evaluate, serve = load(AnnotateConfig, profile), load(EvaluateConfig, profile), serve_config(
        {"profile": str(profile)})
    for cfg in (annotate, evaluate, load(EvaluateIDMConfig, profile), serve):
        assert (cfg.idm.model, cfg.idm.adapter) == (base, train_idm.train.export), type(cfg).__name__
        if hasattr(cfg, "world_model"):
            assert cfg.world_model.model == base and cfg.world_model.backend == "token", type(cfg).__name__
    assert evaluate.world_model.adapter == serve.world_model.adapter == train_wm.train.export


def test_an_idm_adapter_export_needs_lora() -> None:
    with pytest.raises(ConfigError, match="idm.lora_export=adapter.*idm.lora.enabled is false"):
        load(TrainIDMConfig, REAL[0], ["idm.lora.enabled=false", "idm.lora_export=adapter"])
    with pytest.raises(ConfigError, match="idm.lora_export.*merged, adapter"):
        load(TrainIDMConfig, REAL[0], ["idm.lora_export=peft"])


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
    assert [c.uri for c in annotate.inputs] == [f"{root}/videos/{c.name}/" for c in annotate.inputs]
    for cfg in (annotate, evaluate, evaluate_idm, serve):  # merged, or an adapter over the base (single-model)
        assert train_idm.train.export in (cfg.idm.model, cfg.idm.adapter), type(cfg).__name__
    # annotation's triplets (Parquet, with their stored maps) are a source of the world model's training
    assert f"{annotate.output}/triplets" in [s.uri.rstrip("/") for s in train_wm.data.sources]
    # serve and evaluate: the base world model plus the adapter its LoRA training exported, never the adapter alone
    assert train_wm.world_model.lora.enabled
    for cfg in (serve, evaluate):
        assert cfg.world_model.model == train_wm.world_model.model and "://" not in cfg.world_model.model
        assert cfg.world_model.adapter == train_wm.train.export
    # the shipped profile: one placeholder, the root, and every path moves with it
    shipped = [f.split("=")[0] for f in find_placeholders(load(TrainWorldModelConfig, profile))]
    assert shipped[0] == "root" and all(k != "root" for k in shipped[1:])
