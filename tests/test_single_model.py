"""The paper's single-model setting, end to end on a tiny Janus: one base checkpoint is the IDM and the world model.

The profile configs/real/janus_pro_7b_self.yaml runs every job, with only the paths, sizes and CPU resources
overridden: train_idm exports the IDM's LoRA adapter (not a merged copy of the base), annotate labels real H.264
video with base + IDM adapter, train_world_model trains the world model's adapter on gold + annotated triplets
over the same base, and evaluate samples best-of-N with base + world-model adapter and verifies with base + IDM
adapter. Serve's replicas, built from the profile's `serve` section, do the same.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import subprocess
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from profile_jobs import run_job
from safetensors import safe_open

from cwm_ray.config import EvaluateConfig, IDMConfig, ToyCorpusConfig, load, to_dict
from cwm_ray.idm import InverseDynamicsModel
from cwm_ray.tiny.idm import build_tiny_idm
from cwm_ray.tiny.world_model import parameter_count
from cwm_ray.toyworld.corpus import make_corpus

REPO = Path(__file__).resolve().parents[1]
PROFILE = REPO / "configs" / "real" / "janus_pro_7b_self.yaml"
CPU = ["scaling.use_gpu=false", "deepspeed.enabled=false", "deepspeed.bf16=false", "scaling.cpus_per_worker=1"]
ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors"}


def _job(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    return run_job(PROFILE, script, *args)


def _verifier(pipeline: dict[str, Path]) -> InverseDynamicsModel:
    """The profile's IDM (its prompt, sizes) as the base + train_idm's adapter, loaded here, apart from any job."""
    idm = load(EvaluateConfig, PROFILE).idm
    return InverseDynamicsModel.load(dataclasses.replace(idm, model=str(pipeline["base"]), adapter=str(pipeline["idm"]),
                                                         dtype="float32", device="cpu"))


def _adapter_params(directory: Path) -> int:
    with safe_open(str(directory / "adapter_model.safetensors"), "pt") as f:
        return sum(int(np.prod(f.get_slice(k).get_shape())) for k in f.keys())


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Run the four jobs once: train_idm → annotate → train_world_model → evaluate."""
    root = tmp_path_factory.mktemp("single_model")
    base = Path(build_tiny_idm("janus", str(root / "base")))  # the tiny Janus: IDM family and world-model family
    corpus = root / "corpus"
    make_corpus(ToyCorpusConfig(output=str(corpus), num_videos=1, actions_per_video=3, num_train=16, num_test=3,
                                seed=7))
    gold = corpus / "gold"
    paths = {"root": root, "base": base, "gold": gold, "idm": root / "idm_adapter", "wm": root / "wm_adapter",
             "annotated": root / "annotated", "eval": root / "eval"}
    train = ["optim.warmup_steps=1", "train.log_every=1", f"train.storage_path={root / 'runs'}", *CPU]
    _job("train_idm.py", f"idm.model={base}", "idm.dtype=float32", f"train.export={paths['idm']}",
         f"data.sources=[{{uri: {gold / 'train.json'}}}]", "optim.epochs=null",
         "optim.global_batch_size=null", "optim.max_steps=4", "optim.batch_size=4",
         "optim.lr=5.0e-3", *train)
    idm = [f"idm.model={base}", f"idm.adapter={paths['idm']}", "idm.dtype=float32", "idm.max_new_tokens=4"]
    _job("annotate.py", f"inputs=[{{name: toy, uri: {corpus / 'videos'}}}]", f"output={paths['annotated']}", *idm,
         f"world_model.model={base}", "world_model.dtype=float32", "idm_stage.num_gpus=0", "idm_stage.batch_size=4",
         "recognition_stage.num_gpus=0", "decode.num_cpus=0.5")
    annotated = paths["annotated"] / "triplets"  # Parquet, with annotation's recognition maps
    _job("train_world_model.py", f"world_model.model={base}", "world_model.dtype=float32",
         f"train.export={paths['wm']}", f"data.sources=[{{uri: {gold / 'train.json'}}}, {{uri: {annotated}}}]",
         "optim.epochs=null", "optim.global_batch_size=null", "optim.max_steps=2", "optim.batch_size=2", *train)
    _job("evaluate.py", f"bench={gold / 'test.json'}", f"world_model.model={base}",
         f"world_model.adapter={paths['wm']}", "world_model.dtype=float32", *idm, "best_of=[1,2]",
         f"output={paths['eval']}", "judge.enabled=false", "metrics.clip_model=null", "metrics.dino_model=null",
         "headline_tasks=[]",
         "world_model_stage.num_gpus=0", "world_model_stage.batch_size=4", "verifier_stage.num_gpus=0",
         "verifier_stage.batch_size=4", "report_examples=3")
    return paths


def test_both_exports_are_adapters_over_the_one_base(pipeline: dict[str, Path]) -> None:
    base = pipeline["base"]
    for role in ("idm", "wm"):
        files = {p.name for p in pipeline[role].iterdir()}
        assert ADAPTER_FILES <= files and not {"config.json", "model.safetensors"} & files, (role, files)
        assert _adapter_params(pipeline[role]) < parameter_count(base) / 50, role  # megabytes, not a copy
    info = json.loads((pipeline["idm"] / "cwm_ray_model.json").read_text())
    assert info["kind"] == "idm" and info["layout"]["model"] == str(base)
    # The IDM adapter is one: base + adapter scores differently from the bare base.
    frames = [p.read_bytes() for p in sorted((pipeline["gold"] / "images").glob("*.png"))[:2]]
    bare = InverseDynamicsModel.load(IDMConfig(model=str(base), device="cpu"))
    tuned = InverseDynamicsModel.load(IDMConfig(model=str(base), adapter=str(pipeline["idm"]), device="cpu"))
    action = "move the red circle left"
    assert abs(tuned.score(frames[0], frames[1:], action)[0] - bare.score(frames[0], frames[1:], action)[0]) > 0.01


def test_annotate_labels_with_the_base_and_the_idm_adapter(pipeline: dict[str, Path]) -> None:
    pairs = pq.read_table(str(pipeline["annotated"] / "pairs")).to_pylist()
    good = [p for p in pairs if p.get("error_type") is None and p.get("action")]
    assert good, pairs
    triplets = pq.read_table(str(pipeline["annotated"] / "triplets")).num_rows
    assert triplets >= 1  # and train_world_model trained on them beside the gold set


def test_best_of_n_is_verified_by_the_same_base_with_the_idm_adapter(pipeline: dict[str, Path]) -> None:
    """evaluate's verifier scores equal base + IDM adapter's, recomputed here on the report's images."""
    out = pipeline["eval"]
    results = json.loads((out / "results.json").read_text())
    config = results["summary"]["config"]
    assert config["world_model"]["model"] == config["idm"]["model"] == str(pipeline["base"])
    assert (config["world_model"]["adapter"], config["idm"]["adapter"]) == (str(pipeline["wm"]), str(pipeline["idm"]))
    idm = _verifier(pipeline)
    best = [r for r in results["rows"] if r["system"] == "world_model" and r["best_of"] == 2]
    assert len(best) == 3
    images = out / "report" / "images"
    for k, row in enumerate(best[:3]):  # the report shows the first items, in order, with every candidate
        source = (images / f"{k}_source.png").read_bytes()
        chosen = (images / f"{k}_cand{row['chosen']}.png").read_bytes()
        assert idm.score(source, [chosen], row["action"])[0] == pytest.approx(row["verifier_logp"], abs=1e-3)


def test_serve_runs_the_base_twice_with_one_adapter_each(pipeline: dict[str, Path]) -> None:
    """The replica classes (no Ray), as the profile's `serve` section builds them, answer one best-of-3 request."""
    from cwm_ray.serve.app import serve_config
    from cwm_ray.serve.deployments import SampleRequest, ScoreRequest, VerifierDeployment, WorldModelDeployment

    base = str(pipeline["base"])
    cfg = serve_config({"profile": str(PROFILE),
                        "world_model": {"model": base, "adapter": str(pipeline["wm"]), "dtype": "float32",
                                        "device": "cpu"},
                        "idm": {"model": base, "adapter": str(pipeline["idm"]), "dtype": "float32", "device": "cpu"}})
    world_model = WorldModelDeployment.func_or_class(to_dict(cfg.world_model), 4)
    verifier = VerifierDeployment.func_or_class(to_dict(cfg.idm), 4)
    assert world_model.info()["adapter"] == str(pipeline["wm"]) and verifier.info()["adapter"] == str(pipeline["idm"])
    source = sorted((pipeline["gold"] / "images").glob("*.png"))[0].read_bytes()
    action = "remove the red circle"

    async def best_of() -> tuple[list[bytes], list[float]]:
        [cands] = await WorldModelDeployment.func_or_class.sample.__wrapped__(
            world_model, [SampleRequest(source, action, 3, 1)])
        [scores] = await VerifierDeployment.func_or_class.score.__wrapped__(
            verifier, [ScoreRequest(source, cands, action)])
        return cands, scores

    candidates, scores = asyncio.run(best_of())
    direct = _verifier(pipeline)
    np.testing.assert_allclose(scores, direct.score(source, candidates, action), atol=1e-4)
