"""A reduced `jobs/reproduce.py` end to end: every stage runs through the real jobs' code, tiny budgets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_reduced_reproduce_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "repro"
    args = [
        f"output={out}", "best_of=[1,2]",
        "corpus_overrides=[num_videos=4,actions_per_video=3,num_train=64,num_test=10]",
        "idm_overrides=[optim.max_steps=4,optim.batch_size=8,train.eval_every=0,train.checkpoint_every=0]",
        "world_model_overrides=[optim.max_steps=4,optim.batch_size=8,train.eval_every=0,train.checkpoint_every=0]",
        "evaluate_overrides=[max_items=1,world_model.num_inference_steps=2,report_examples=2]",
    ]
    env = os.environ | {"RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "jobs/reproduce.py", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = json.loads((out / "table.json").read_text())
    names = [r["row"] for r in table["rows"]]
    assert names == ["(a) gold only", "(b) + IDM-annotated synthetic", "(c) + recognition weighting",
                     "(c) + recognition weighting + best-of-2", "copy the source"]
    assert all(r["toy_score"] is not None and r["items"] == 5 for r in table["rows"])
    assert (out / "table.md").read_text().count("\n") == len(names) + 2
    for row in "abc":
        assert (out / "eval" / row / "report" / "index.html").exists()
    assert (out / "report" / "index.html").exists()
    assert json.loads((out / "annotated" / "summary.json").read_text())["pairs"] > 0

    # a re-run finds every stage complete and only rebuilds the table
    again = subprocess.run([sys.executable, "jobs/reproduce.py", *args], cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("done already") == 9


class _FakeStages:
    """Stand-ins for the four expensive stage runners: tiny outputs, and a log of what ran with which config."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import cwm_ray.annotate
        import cwm_ray.evaluate.pipeline
        import cwm_ray.toyworld.corpus
        import cwm_ray.train

        self.calls: list[tuple[str, str]] = []
        self.fail_at: str | None = None
        monkeypatch.setattr(cwm_ray.toyworld.corpus, "make_corpus", self.make_corpus)
        monkeypatch.setattr(cwm_ray.train, "train", self.train)
        monkeypatch.setattr(cwm_ray.annotate, "annotate", self.annotate)
        monkeypatch.setattr(cwm_ray.evaluate.pipeline, "evaluate", self.evaluate)

    def make_corpus(self, cfg: Any) -> None:
        self.calls.append(("corpus", cfg.output))
        for name in ("corpus.json", "gold/train.json", "gold/test.json"):
            (Path(cfg.output) / name).parent.mkdir(parents=True, exist_ok=True)
            (Path(cfg.output) / name).write_text("[]")

    def train(self, cfg: Any) -> None:
        self.calls.append(("train", cfg.train.name))
        export = Path(cfg.train.export)
        export.mkdir(parents=True, exist_ok=True)
        (export / f"from_{cfg.train.name}").write_text("")
        (export / "unet").mkdir(exist_ok=True)  # what a real export holds (an IDM's config.json, a UNet's)
        (export / "unet" / "config.json").write_text("{}")
        (export / "config.json").write_text("{}")
        if self.fail_at and cfg.train.name.startswith(self.fail_at):
            raise RuntimeError("worker died")
        (Path(cfg.train.storage_path) / cfg.train.name).mkdir(parents=True, exist_ok=True)

    def annotate(self, cfg: Any) -> None:
        self.calls.append(("annotate", cfg.world_model.backend))
        out = Path(cfg.output)
        (out / "staging").mkdir(parents=True, exist_ok=True)
        (out / "staging" / f"{cfg.world_model.backend}.parquet").write_text("")
        (out / "summary.json").write_text(json.dumps({"pairs": 1}))

    def evaluate(self, cfg: Any) -> None:
        self.calls.append(("evaluate", cfg.output))
        score = {"diffusion": 0.75, "token": 0.25}[cfg.world_model.backend] + 0.01 * (cfg.max_items or 0)
        overall = [{"system": "world_model", "best_of": n, "items": 5, "toy_score": score} for n in cfg.best_of]
        Path(cfg.output).mkdir(parents=True, exist_ok=True)
        (Path(cfg.output) / "results.json").write_text(json.dumps(
            {"summary": {"overall": overall + [{"system": "copy", "best_of": 1, "items": 5, "toy_score": 0.0}]}}))

    def ran(self) -> list[str]:
        kinds = [kind if kind != "train" else arg.split("-")[0] for kind, arg in self.calls]
        self.calls.clear()
        return kinds


def test_a_rerun_redoes_exactly_the_changed_stages_and_what_depends_on_them(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """Issue 20, finding 4: a stage once counted as done when its output existed, so a changed backend retrained
    the world models but kept the old evaluations, and the table showed the old numbers."""
    from cwm_ray.config import ReproduceConfig, load
    from cwm_ray.evaluate.reproduce import reproduce

    fake = _FakeStages(monkeypatch)
    out = tmp_path / "repro"

    def run(*overrides: str) -> list[float]:
        table = reproduce(load(ReproduceConfig, None, [f"output={out}", "best_of=[1,2]", *overrides]))
        return [r["toy_score"] for r in table["rows"] if r["row"] != "copy the source"]

    wm, evals = ["world_model_a", "world_model_b", "world_model_c"], ["evaluate"] * 3
    assert run() == [0.95, 0.95, 0.95, 0.95]  # evaluate.yaml's max_items=20
    assert fake.ran() == ["corpus", "idm", "annotate", "world_model_a", "evaluate", "world_model_b", "evaluate",
                          "world_model_c", "evaluate"]
    capsys.readouterr()
    assert run() == [0.95] * 4 and fake.ran() == []  # unchanged: every stage skipped
    assert capsys.readouterr().out.count("done already") == 9
    old_runs = sorted(p.name for p in (out / "runs").iterdir())

    token = "world_model_overrides=[world_model.backend=token]"
    assert run(token) == [0.45] * 4  # the new backend's numbers, not the old ones
    ran = fake.ran()  # the backend also reaches annotation (its recognition encoder); corpus and IDM stay
    assert sorted(ran) == sorted(["annotate", *wm, *evals]) and ran[0] == "annotate"
    # Fresh runs and outputs: nothing of the diffusion runs is resumed, kept or counted.
    new_runs = sorted(p.name for p in (out / "runs").iterdir())
    assert [r.split("-")[0] for r in new_runs] == ["idm", *wm] and set(new_runs) & set(old_runs) == {new_runs[0]}
    assert [p.name for p in (out / "annotated" / "staging").iterdir()] == ["token.parquet"]
    assert [p.name for p in (out / "models" / "world_model_a").glob("from_*")] == [f"from_{new_runs[1]}"]
    assert run(token) == [0.45] * 4 and fake.ran() == []

    assert run(token, "evaluate_overrides=[max_items=30]") == [0.55] * 4 and fake.ran() == evals
    steps = "world_model_overrides=[world_model.backend=token,optim.max_steps=7]"
    assert run(steps, "evaluate_overrides=[max_items=30]") == [0.55] * 4
    assert fake.ran() == [wm[0], "evaluate", wm[1], "evaluate", wm[2], "evaluate"]
    assert run("reuse=false") == [0.95] * 4 and len(fake.ran()) == 9

    # A stage that crashed is resumed under the same config: same run name, its output kept.
    fake.fail_at = "world_model_b"
    with pytest.raises(RuntimeError, match="worker died"):
        run(steps)
    crashed = [arg for kind, arg in fake.calls if arg.startswith("world_model_b")]
    assert fake.ran() == ["annotate", wm[0], "evaluate", wm[1]]  # back to the token backend from diffusion
    fake.fail_at = None
    assert run(steps) == [0.45] * 4
    assert fake.calls[0] == ("train", crashed[0]) and fake.ran() == [wm[1], "evaluate", wm[2], "evaluate"]
    assert (out / "models" / "world_model_b" / f"from_{crashed[0]}").exists()
