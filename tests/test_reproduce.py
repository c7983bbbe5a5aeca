"""A reduced `jobs/reproduce.py` end to end: every stage runs through the real jobs' code, tiny budgets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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
