"""IDM accuracy (`jobs/evaluate_idm.py`): scoring on hand-made toy rows, a tiny real IDM end to end on a toy
test set, annotation's triplets scored as stored, and bad input refused with a clear error."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from cwm_ray.config import EvaluateIDMConfig, IDMConfig, ToyCorpusConfig, ToyWorldConfig
from cwm_ray.evaluate.idm import evaluate_idm, score, summarise
from cwm_ray.idm import InverseDynamicsModel
from cwm_ray.toyworld.corpus import make_corpus
from cwm_ray.toyworld.idm_model import build_toy_idm
from cwm_ray.toyworld.render import render
from cwm_ray.toyworld.world import Obj, Scene, apply, parse_action

REPO = Path(__file__).resolve().parents[1]
WORLD = ToyWorldConfig()


def _png(scene: Scene) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(render(scene, WORLD)).save(buf, "PNG")
    return buf.getvalue()


# A blue square at (2, 1) and a red circle at (2, 4): moving the circle 2 cells left puts it just right of
# the square, so two different sentences describe the same change.
SCENE = Scene((Obj("square", "blue", 2, 1), Obj("circle", "red", 2, 4)))
TRUE = "move the red circle left"
AFTER = apply(SCENE, parse_action(TRUE), WORLD)  # type: ignore[arg-type]


def test_score_counts_exact_text_and_every_action_that_explains_the_frames() -> None:
    actions = [TRUE, "Put the red circle to the right of the blue square.", "move the red circle right",
               "juggle the red circle", "remove the red circle"]
    n = len(actions)
    rows = score([f"r{i}" for i in range(n)], ["move"] * 4 + ["remove"], [_png(SCENE)] * n, [_png(AFTER)] * n,
                 actions, [TRUE] * 4 + [None], WORLD)
    assert [r.exact for r in rows] == [True, False, False, False, None]
    assert [r.explains for r in rows] == [True, True, False, False, False]
    summary = summarise(rows)
    assert summary["items"] == n
    assert summary["exact"] == pytest.approx(1 / 4)  # the row without a reference has no exact score
    assert summary["explains"] == pytest.approx(2 / 5)
    assert summary["per_task"]["move"] == {"items": 4, "exact": 0.25, "explains": 0.5}
    assert summary["per_task"]["remove"] == {"items": 1, "exact": None, "explains": 0.0}
    # Without the toy judge only the text is compared.
    assert all(r.explains is None for r in score(["a"], ["t"], [b""], [b""], [TRUE], [TRUE], None))


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> str:
    from cwm_ray.tiny.text import build_tiny_bert

    return build_tiny_bert(str(tmp_path_factory.mktemp("bert")))


def test_the_papers_text_metrics_score_each_action_against_its_reference(tiny_bert: str) -> None:
    """BLEU (sacrebleu, corpus, 0–1), ROUGE-1 / ROUGE-L F1 (rouge-score) and BERTScore F1 (bert-score, a tiny random
    BERT by path), beside exact match; rows without a reference get none."""
    import sacrebleu

    from cwm_ray.evaluate.idm import bert_scorer, text_metrics

    actions = [TRUE, "move the red circle right", "remove the blue square", "", TRUE]
    refs: list[str | None] = [TRUE, TRUE, "put the green cross above the red circle", TRUE, None]
    rows = score([f"r{i}" for i in range(5)], ["move"] * 5, [b""] * 5, [b""] * 5, actions, refs, None)
    text_metrics(rows, bert_scorer(EvaluateIDMConfig(bertscore_model=tiny_bert)))
    assert rows[2].rouge1 == pytest.approx(1 / 6)  # one shared word ("the"): precision 1/4, recall 1/8
    assert rows[0].rouge1 == rows[0].rougeL == 1.0 and rows[1].rouge1 == rows[1].rougeL == pytest.approx(0.8)
    assert rows[3].rouge1 == 0.0 and rows[4].rouge1 is None and rows[4].bertscore is None
    assert rows[0].bertscore == pytest.approx(1.0, abs=1e-5)  # the same words: every token matches itself
    assert rows[2].bertscore < rows[1].bertscore < rows[0].bertscore and rows[3].bertscore == 0.0
    summary = summarise(rows, text=True)
    expected_bleu = sacrebleu.corpus_bleu(actions[:4], [[r for r in refs[:4] if r]]).score / 100
    assert summary["bleu"] == pytest.approx(expected_bleu) and 0 < summary["bleu"] < 1
    assert summarise(rows[:1], text=True)["bleu"] == pytest.approx(1.0)  # 0–1, the paper's scale
    assert summary["rouge1"] == pytest.approx(np.mean([r.rouge1 for r in rows[:4]]))
    assert summary["per_task"]["move"]["bertscore"] == pytest.approx(np.mean([r.bertscore for r in rows[:4]]))
    with pytest.raises(ValueError, match="no English baseline"):
        bert_scorer(EvaluateIDMConfig(bertscore_model=tiny_bert, bertscore_rescale=True))


@pytest.fixture(scope="module")
def toy_set(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("evidm")
    make_corpus(ToyCorpusConfig(output=str(root / "corpus"), num_videos=1, actions_per_video=1, num_train=2,
                                num_test=6))
    build_toy_idm(str(root / "idm"), hidden_size=32, text_layers=1)
    return {"root": root, "bench": root / "corpus" / "gold" / "test.json", "idm": root / "idm"}


def test_bench_rows_are_the_idms_own_labels(toy_set: dict[str, Path], tiny_bert: str) -> None:
    out = toy_set["root"] / "out"
    cfg = EvaluateIDMConfig(bench=str(toy_set["bench"]), idm=IDMConfig(model=str(toy_set["idm"]), device="cpu"),
                            batch_size=4, output=str(out), bertscore_model=tiny_bert)
    summary = evaluate_idm(cfg)
    saved = json.loads((out / "results.json").read_text())
    assert saved["items"] == summary["items"] == 6
    for key in ("bleu", "rouge1", "rougeL", "bertscore"):  # the paper's metrics, overall and per task
        assert 0.0 <= saved[key] <= 1.0 + 1e-6 and all(key in t for t in saved["per_task"].values())
    assert sum(t["items"] for t in saved["per_task"].values()) == 6
    rows = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
    items = json.loads(toy_set["bench"].read_text())
    assert [r["reference"] for r in rows] == [it["prompt"] for it in items]
    # The scored actions are what the same IDM generates for those pairs, batched or not.
    idm = InverseDynamicsModel.load(IDMConfig(model=str(toy_set["idm"]), device="cpu"))
    base = toy_set["bench"].parent
    labels = idm.label([(base / it["input"]).read_bytes() for it in items],
                       [(base / it["output"]).read_bytes() for it in items])
    assert [r["action"] for r in rows] == [lab.action for lab in labels]
    assert [r["logprob"] for r in rows] == pytest.approx([lab.logprob for lab in labels], abs=1e-4)
    assert saved["exact"] == pytest.approx(np.mean([r["action"] == r["reference"] for r in rows]))


def _triplets(path: Path, actions: list[str], drop: str | None = None) -> Path:
    n = len(actions)
    columns = {"id": [f"t{i}" for i in range(n)], "dataset": ["toy"] * n, "source": [_png(SCENE)] * n,
               "target": [_png(AFTER)] * n, "action": actions, "logprob": [-0.5] * n}
    if drop:
        columns.pop(drop)
    path.mkdir(parents=True)
    pq.write_table(pa.table(columns), path / "part-0.parquet")
    return path


def test_triplets_are_scored_as_stored(tmp_path: Path) -> None:
    src = _triplets(tmp_path / "triplets", [TRUE, "move the red circle up", "remove the blue square", TRUE])
    summary = evaluate_idm(EvaluateIDMConfig(bench=None, triplets=str(src), output=str(tmp_path / "out")))
    assert summary["items"] == 4 and summary["explains"] == 0.5 and summary["exact"] is None
    assert summary["per_task"] == {"toy": {"items": 4, "exact": None, "explains": 0.5}}


@pytest.mark.parametrize("case", ["both", "neither", "no_action_column", "no_toy_judge", "missing_dir"])
def test_bad_input_is_one_clear_error(tmp_path: Path, case: str) -> None:
    good = _triplets(tmp_path / "good", [TRUE])
    kw: dict[str, object] = {"bench": None, "triplets": str(good), "output": str(tmp_path / "out")}
    expect = {"both": "exactly one", "neither": "exactly one", "no_action_column": "'action'",
              "no_toy_judge": "toy judge", "missing_dir": "not a readable Parquet"}[case]
    if case == "both":
        kw["bench"] = "test.json"
    elif case == "neither":
        kw["triplets"] = None
    elif case == "no_action_column":
        kw["triplets"] = str(_triplets(tmp_path / "bad", [TRUE], drop="action"))
    elif case == "no_toy_judge":
        kw["toy_judge"] = False
    else:
        kw["triplets"] = str(tmp_path / "nowhere")
    with pytest.raises(ValueError, match=expect):
        evaluate_idm(EvaluateIDMConfig(**kw))  # type: ignore[arg-type]
    assert not (tmp_path / "out" / "results.json").exists()


def test_cli_reports_a_missing_benchmark_without_a_traceback(tmp_path: Path) -> None:
    env = os.environ | {"RAY_AUTH_MODE": "disabled"}
    proc = subprocess.run([sys.executable, "jobs/evaluate_idm.py", f"bench={tmp_path / 'none.json'}",
                           f"output={tmp_path / 'out'}"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0
    assert "error:" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
