"""A reduced `jobs/reproduce.py` end to end: every stage runs through the real jobs' code, tiny budgets."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(1500)  # the suite's 900 s per test is too tight beside the gates' background training
def test_reduced_reproduce_end_to_end(tmp_path: Path) -> None:
    """configs/reproduce.yaml's table in miniature through the CLI, its three regimes: rows (a) and (b) from
    scratch and LoRA-fine-tuned from the pretrained world model, and row (b) in the single-model setting, where that
    pretrained model's own IDM adapter labels the videos and verifies (issue 36); then a re-run that only rebuilds
    the table. Rows (b′) and (c) train like (b) with another source or `recognition.enabled=true` (both trained in
    tests/test_train.py and tests/test_token_world_model.py), and every row and claim of the table is built from
    fake stages below, so here they would only add four trainings and four evaluations; (b′)'s relabelling stage
    still runs and is checked."""
    out = tmp_path / "repro"
    # Each of the eight trainings on one Ray Train worker, at the global batch two workers had (16): the table's
    # stages are under test here, not data parallelism (tests/test_train.py trains on two), and a second worker
    # costs each training about 15 s of CPU.
    one = "scaling.num_workers=1,scaling.cpus_per_worker=1,optim.batch_size=16"
    args = [
        f"output={out}", "best_of=[1,2]", "rows=[a,b]",
        "corpus_overrides=[num_videos=4,actions_per_video=3,num_train=64,num_test=10]",
        f"idm_overrides=[optim.max_steps=4,train.eval_every=0,train.checkpoint_every=0,{one}]",
        "world_model_overrides=[optim.max_steps=4,train.eval_every=0,train.checkpoint_every=0,"
        f"train.log_every=1,{one}]",
        "evaluate_overrides=[max_items=1,world_model.num_inference_steps=2,report_examples=2]",
        # the shipped file's regimes, with a pretraining long enough to move the loss
        "pretrain_gold=256", "pretrain_overrides=[optim.max_steps=30,train.eval_every=0,"
        f"train.checkpoint_every=0,train.log_every=10,{one}]",
        "finetune_overrides=[world_model.lora.enabled=true,optim.lr=5e-4]",
    ]
    env = os.environ | {"RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "jobs/reproduce.py", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=1400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = json.loads((out / "table.json").read_text())
    names = [r["row"] for r in table["rows"]]
    rows = ["(a) gold only", "(b) + IDM-labelled synthetic", "(b) + IDM-labelled synthetic + best-of-2"]
    tuned = [r.replace(" + best-of", " (fine-tuned) + best-of") if "best-of" in r else r + " (fine-tuned)"
             for r in rows]
    single = ["(b) + IDM-labelled synthetic (single model)", "(b) + IDM-labelled synthetic (single model) + best-of-2"]
    assert names == [*rows, *tuned, *single, "copy the source"]
    assert [r["regime"] for r in table["rows"]] == ["from scratch"] * 3 + ["fine-tuned"] * 3 + ["single model"] * 2 \
        + [None]
    assert all(r["toy_score"] is not None and r["items"] == 5 and r["seeds"] == 1 for r in table["rows"])
    assert table["regimes"] == ["scratch", "finetuned", "single"] and table["pretrained"]["steps"] == 30
    # Fine-tuning starts from the pretrained weights: each fine-tuned row's first step has a lower loss than the
    # same row's fresh model (the same data, batches and seed: 0.24-0.29 against 2.42-2.43 in one run), and trains
    # a LoRA adapter over that model.
    training = table["training"]["0"]
    assert set(training) == {"a", "b", "ft_a", "ft_b", "self_b"}, training
    for row in ("a", "b"):
        assert training[row]["first_loss_step"] == training[f"ft_{row}"]["first_loss_step"] == 1
        assert training[f"ft_{row}"]["first_loss"] < 0.5 * training[row]["first_loss"], (row, training)
        adapter = out / "seeds" / "0" / "models" / "finetuned" / f"world_model_{row}"
        assert (adapter / "adapter_config.json").exists() and not (adapter / "config.json").exists()
        assert (out / "seeds" / "0" / "eval" / "finetuned" / row / "report" / "index.html").exists()
    assert any(c["claim"].startswith("fine-tuning the pretrained model beats") for c in table["comparisons"])
    assert "Fine-tuned rows: LoRA on one world model pretrained on 256 gold triplets" in (out / "table.md").read_text()
    assert table["idm_explains"] is not None
    assert (out / "table.md").read_text().startswith("| world model |")
    seed = out / "seeds" / "0"
    for row in ("a", "b"):
        assert (seed / "eval" / row / "report" / "index.html").exists()
    assert (out / "report" / "index.html").exists()
    assert (out / "table.png").stat().st_size > 1000  # the table's picture, which the report page shows
    assert json.loads((seed / "annotated" / "summary.json").read_text())["pairs"] > 0
    # The single model: its IDM is an adapter over the pretrained world model, with the understanding path the
    # world model never trained saved beside it, and that adapter labelled the videos its row trained on.
    from safetensors import safe_open

    with safe_open(str(seed / "models" / "idm_self" / "adapter_model.safetensors"), "pt") as f:
        saved = {k.split(".")[3] for k in f.keys() if k.startswith("base_model.model.model.")}
    assert {"language_model", "vision_model", "aligner"} <= saved
    assert not (seed / "models" / "idm_self" / "config.json").exists()  # no copy of the base
    assert json.loads((seed / "annotated_self" / "summary.json").read_text())["pairs"] > 0
    assert table["idm_self_explains"] is not None
    assert (seed / "eval" / "single" / "b" / "report" / "index.html").exists()
    assert any(c["claim"] == "the single model's own IDM against a separate IDM: (b)" for c in table["comparisons"])
    # Row (b′)'s labels are the ground truth: every one explains its pair exactly, as no IDM label must.
    import pyarrow.parquet as pq

    from cwm_ray.config import ToyWorldConfig
    from cwm_ray.schema import decode_image
    from cwm_ray.toyworld.parser import explains

    oracle = pq.read_table(seed / "oracle" / "triplets").to_pylist()
    annotated = pq.read_table(seed / "annotated" / "triplets", columns=["id"]).num_rows
    assert 0 < len(oracle) <= annotated
    assert all(explains(decode_image(r["source"]), r["action"], decode_image(r["target"]), ToyWorldConfig())
               for r in oracle)

    # a re-run finds every stage complete and only rebuilds the table
    again = subprocess.run([sys.executable, "jobs/reproduce.py", *args], cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    # corpus, pretraining gold and model, then per seed: IDM, its accuracy, annotate, oracle, 2 regimes x 2 rows x 2,
    # and the single model's IDM adapter, its accuracy, its annotation and row (b) x 2
    assert again.stdout.count("done already") == 20


class _FakeStages:
    """Stand-ins for the four expensive stage runners: tiny outputs, and a log of what ran with which config."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import cwm_ray.annotate
        import cwm_ray.evaluate.idm
        import cwm_ray.evaluate.pipeline
        import cwm_ray.toyworld.corpus
        import cwm_ray.train

        self.calls: list[tuple[str, str]] = []
        self.fail_at: str | None = None
        monkeypatch.setattr(cwm_ray.toyworld.corpus, "make_corpus", self.make_corpus)
        monkeypatch.setattr(cwm_ray.train, "train", self.train)
        monkeypatch.setattr(cwm_ray.annotate, "annotate", self.annotate)
        monkeypatch.setattr(cwm_ray.evaluate.pipeline, "evaluate", self.evaluate)
        monkeypatch.setattr(cwm_ray.evaluate.idm, "evaluate_idm", self.evaluate_idm)
        monkeypatch.setattr(cwm_ray.toyworld.corpus, "relabel_with_ground_truth", self.relabel)

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

    def evaluate_idm(self, cfg: Any) -> None:
        self.calls.append(("eval_idm", cfg.output))
        Path(cfg.output).mkdir(parents=True, exist_ok=True)
        (Path(cfg.output) / "results.json").write_text(json.dumps({"explains": 0.9}))

    def relabel(self, triplets: str, corpus: str, output: str) -> None:
        self.calls.append(("oracle", output))
        Path(output).mkdir(parents=True, exist_ok=True)
        (Path(output) / "part-00000.parquet").write_text("")

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

    wm = ["world_model_a", "world_model_b", "world_model_b_oracle", "world_model_c"]
    evals = ["evaluate"] * 4
    per_row = [step for pair in zip(wm, evals, strict=True) for step in pair]
    assert run() == [0.95] * 6  # evaluate.yaml's max_items=20
    assert fake.ran() == ["corpus", "idm", "eval_idm", "annotate", "oracle", *per_row]
    capsys.readouterr()
    assert run() == [0.95] * 6 and fake.ran() == []  # unchanged: every stage skipped
    assert capsys.readouterr().out.count("done already") == 13
    runs = out / "seeds" / "0" / "runs"
    old_runs = sorted(p.name for p in runs.iterdir())

    token = "world_model_overrides=[world_model.backend=token]"
    assert run(token) == [0.45] * 6  # the new backend's numbers, not the old ones
    ran = fake.ran()  # the backend also reaches annotation (its recognition encoder); corpus and IDM stay
    assert sorted(ran) == sorted(["annotate", "oracle", *wm, *evals]) and ran[0] == "annotate"
    # Fresh runs and outputs: nothing of the diffusion runs is resumed, kept or counted.
    new_runs = sorted(p.name for p in runs.iterdir())
    assert [r.split("-")[0] for r in new_runs] == ["idm", *wm] and set(new_runs) & set(old_runs) == {new_runs[0]}
    assert [p.name for p in (out / "seeds" / "0" / "annotated" / "staging").iterdir()] == ["token.parquet"]
    assert [p.name for p in (out / "seeds" / "0" / "models" / "world_model_a").glob("from_*")] == [
        f"from_{new_runs[1]}"]
    assert run(token) == [0.45] * 6 and fake.ran() == []

    assert run(token, "evaluate_overrides=[max_items=30]") == [0.55] * 6 and fake.ran() == evals
    steps = "world_model_overrides=[world_model.backend=token,optim.max_steps=7]"
    assert run(steps, "evaluate_overrides=[max_items=30]") == [0.55] * 6
    assert fake.ran() == per_row
    assert run("reuse=false") == [0.95] * 6 and len(fake.ran()) == 13

    # A stage that crashed is resumed under the same config: same run name, its output kept.
    fake.fail_at = "world_model_b"
    with pytest.raises(RuntimeError, match="worker died"):
        run(steps)
    crashed = [arg for kind, arg in fake.calls if arg.startswith("world_model_b")]
    assert fake.ran() == ["annotate", "oracle", wm[0], "evaluate", wm[1]]  # back to the token backend from diffusion
    fake.fail_at = None
    assert run(steps) == [0.45] * 6
    assert fake.calls[0] == ("train", crashed[0]) and fake.ran() == per_row[2:]
    assert (out / "seeds" / "0" / "models" / "world_model_b" / f"from_{crashed[0]}").exists()


def test_world_model_config_chooses_the_rows_yaml_and_its_backend_reaches_every_stage(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`world_model_config=train_token_world_model.yaml` trains every row from the token job's YAML, and its
    backend reaches annotation (the recognition encoder) and evaluation without a `world_model.backend` override."""
    from cwm_ray.config import ConfigError, ReproduceConfig, load
    from cwm_ray.evaluate.reproduce import reproduce

    fake = _FakeStages(monkeypatch)
    seen: list[tuple[str, int]] = []

    def train(cfg: Any) -> None:
        if cfg.train.name.startswith("world_model"):
            seen.append((cfg.world_model.backend, cfg.optim.max_steps))
        fake.train(cfg)

    monkeypatch.setattr("cwm_ray.train.train", train)
    table = reproduce(load(ReproduceConfig, None, [f"output={tmp_path / 'repro'}", "best_of=[1]",
                                                   "world_model_config=train_token_world_model.yaml"]))
    assert ("annotate", "token") in fake.calls
    assert [r["toy_score"] for r in table["rows"] if r["row"] != "copy the source"] == [0.45] * 4  # token evaluation
    assert seen == [("token", 1350)] * 4  # the token YAML's own steps
    with pytest.raises(ConfigError, match="world_model_config"):
        load(ReproduceConfig, None, ["world_model_config=no_such.yaml"])
    with pytest.raises(ConfigError, match="best_of_rows.*rows are a, b, b_oracle, c"):
        load(ReproduceConfig, None, ["best_of_rows=[b,d]"])
    from cwm_ray.config import REPRODUCE_ROWS
    from cwm_ray.evaluate.reproduce import ROWS

    assert tuple(ROWS) == REPRODUCE_ROWS  # the config checks the names the job trains


def test_the_table_gives_mean_and_spread_over_seeds_and_judges_each_claim_against_it() -> None:
    from cwm_ray.evaluate.reproduce import build_table, markdown

    def summary(scores: dict[str, list[float]]) -> dict[str, Any]:
        rows = {row: {"overall": [{"system": "world_model", "best_of": n + 1, "items": 100, "toy_score": v,
                                   "toy_edit_success": v + 1, "toy_minimal_edit": 9.0}
                                  for n, v in enumerate(values)]} for row, values in scores.items()}
        rows["a"]["overall"].append({"system": "copy", "best_of": 1, "items": 100, "toy_score": 0.0})
        return rows

    per_seed = {
        0: {"rows": summary({"a": [2.0], "b": [4.0, 6.0], "b_oracle": [4.1], "c": [3.0, 3.5]}), "idm_explains": 0.9},
        1: {"rows": summary({"a": [3.0], "b": [5.0, 7.1], "b_oracle": [4.9], "c": [4.0, 4.4]}), "idm_explains": 1.0},
    }
    table = build_table(per_seed)
    row = {r["row"]: r for r in table["rows"]}
    assert row["(a) gold only"]["toy_score"] == 2.5 and row["(a) gold only"]["seeds"] == 2
    assert abs(row["(a) gold only"]["toy_score_spread"] - 0.5 ** 0.5) < 1e-12  # sample std of 2 and 3
    assert row["(b) + IDM-labelled synthetic"]["toy_score_per_seed"] == [4.0, 5.0]
    assert list(row)[-1] == "copy the source"
    claims = {c["claim"]: c for c in table["comparisons"]}
    assert claims["synthetic data helps"]["difference"] == 2.0 and claims["synthetic data helps"]["beyond_spread"]
    assert claims["label noise costs"]["beyond_spread"] is False  # 4.5 vs 4.5: no difference
    # Paired by seed: +0.5 and +0.4 differ by less than they exceed 0, although the rows' own spreads
    # (0.71 and 0.64) are larger than the difference: the seed moves both rows alike.
    assert claims["(c) best-of-2 beats best-of-1"]["per_seed"] == [0.5, pytest.approx(0.4)]
    assert claims["(c) best-of-2 beats best-of-1"]["beyond_spread"]
    assert abs(claims["(b) best-of-2 beats best-of-1"]["difference"] - 2.05) < 1e-12  # each row on its own
    assert claims["(b) best-of-2 beats best-of-1"]["beyond_spread"]
    assert claims["label noise costs"]["per_seed"] == [pytest.approx(0.1), pytest.approx(-0.1)]
    assert abs(table["idm_explains"] - 0.95) < 1e-12
    text = markdown(table)
    assert "2.50 ± 0.71" in text and "synthetic data helps" in text and "beyond the spread" in text
    assert "per seed +2.00 / +2.00" in text
    # A seed in which a row is missing: the differences pair only the seeds both rows have.
    per_seed[2] = {"rows": summary({"a": [0.0], "c": [9.0, 9.0]}), "idm_explains": 0.9}
    claims = {c["claim"]: c for c in build_table(per_seed)["comparisons"]}
    assert claims["synthetic data helps"]["per_seed"] == [2.0, 2.0]
    assert claims["synthetic data helps"]["difference"] == 2.0
    one = build_table({0: per_seed[0]})  # one seed: no spread, and no verdict on any difference
    assert all(r["toy_score_spread"] is None for r in one["rows"])
    assert all(c["beyond_spread"] is None for c in one["comparisons"])


def test_the_single_model_regime_makes_the_pretrained_world_model_its_own_idm_and_verifier(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 36, item 2 (the paper's single-model setting): `regimes=[finetuned,single]` trains an IDM adapter over the
    pretrained world model, annotates the videos with base + adapter, fine-tunes row (b) on those labels, and
    evaluates it with base + adapter as the verifier; the separate IDM's rows stay as they were."""
    import cwm_ray.toyworld.corpus
    from cwm_ray.config import ConfigError, ReproduceConfig, load
    from cwm_ray.evaluate.reproduce import reproduce

    fake = _FakeStages(monkeypatch)
    configs: dict[str, Any] = {}

    def pretraining_gold(corpus: Any, output: str, n: int) -> None:
        fake.calls.append(("pretrain_gold", output))
        fake.make_corpus(dataclasses.replace(corpus, output=output))

    def record(kind: str, run: Any) -> Any:
        def wrapped(cfg: Any) -> Any:
            name = cfg.train.name.split("-")[0] if kind == "train" else Path(cfg.output).name
            configs[f"{kind}:{name}"] = cfg
            return run(cfg)
        return wrapped

    monkeypatch.setattr(cwm_ray.toyworld.corpus, "make_pretraining_gold", pretraining_gold)
    monkeypatch.setattr("cwm_ray.train.train", record("train", fake.train))
    monkeypatch.setattr("cwm_ray.annotate.annotate", record("annotate", fake.annotate))
    monkeypatch.setattr("cwm_ray.evaluate.pipeline.evaluate", record("evaluate", fake.evaluate))
    monkeypatch.setattr("cwm_ray.evaluate.idm.evaluate_idm", record("eval_idm", fake.evaluate_idm))
    out = tmp_path / "repro"
    table = reproduce(load(ReproduceConfig, None, [
        f"output={out}", "best_of=[1,2]", "world_model_config=train_token_world_model.yaml",
        "regimes=[finetuned,single]"]))
    pretrained, seed = str(out / "pretrain" / "world_model"), out / "seeds" / "0"
    idm_self = configs["train:idm_self"]
    assert idm_self.idm.model == pretrained and idm_self.idm.lora.enabled and idm_self.idm.lora_export == "adapter"
    assert idm_self.idm.lora.modules_to_save == ["model.vision_model", "model.aligner", "lm_head"]
    assert idm_self.train.export == str(seed / "models" / "idm_self")
    for cfg in (configs["annotate:annotated_self"], configs["eval_idm:eval_idm_self"], configs["evaluate:b"]):
        assert (cfg.idm.model, cfg.idm.adapter) == (pretrained, str(seed / "models" / "idm_self")), cfg.output
    assert configs["annotate:annotated"].idm.adapter is None
    assert configs["evaluate:b"].output == str(seed / "eval" / "single" / "b")
    wm = configs["train:world_model_self_b"]  # fine-tuned as ft_b is, on the single model's own labels
    assert wm.world_model.model == pretrained and wm.world_model.lora.enabled
    assert [s.uri for s in wm.data.sources] == [str(out / "corpus" / "gold" / "train.json"),
                                                 str(seed / "annotated_self" / "triplets")]
    names = [r["row"] for r in table["rows"]]
    assert "(b) + IDM-labelled synthetic (single model)" in names
    assert "(b) + IDM-labelled synthetic (single model) + best-of-2" in names
    assert {r["regime"] for r in table["rows"] if r["key"].startswith("self_")} == {"single model"}
    claims = {c["claim"] for c in table["comparisons"]}
    assert {"the single model's own IDM against a separate IDM: (b)",
            "the single model's own IDM against a separate IDM: (b) best-of-2",
            "(b) best-of-2 beats best-of-1 (single model)"} <= claims
    assert table["idm_self_explains"] == 0.9
    assert "The single model's IDM adapter on the held-out gold pairs" in (out / "table.md").read_text()
    # The toy Janus's understanding path is no setting: a pretrained export from before it was added has another
    # fingerprint, so it is retrained, not reused as the IDM's base.
    from cwm_ray.evaluate.reproduce import TOY_JANUS

    assert TOY_JANUS in json.loads((out / "stages" / "pretrain" / "world_model.json").read_text())["inputs"]

    # `rows` trains only the rows a question needs: here the single model against the separate IDM, on row (b).
    fake.calls.clear()
    small = reproduce(load(ReproduceConfig, None, [
        f"output={tmp_path / 'small'}", "best_of=[1,2]", "world_model_config=train_token_world_model.yaml",
        "regimes=[finetuned,single]", "rows=[b]"]))
    assert sorted(name.split("-")[0] for kind, name in fake.calls if kind == "train") == [
        "idm", "idm_self", "pretrained_world_model", "world_model_ft_b", "world_model_self_b"]
    assert [c["claim"] for c in small["comparisons"]] == [
        "(b) best-of-2 beats best-of-1 (fine-tuned)", "(b) best-of-2 beats best-of-1 (single model)",
        "the single model's own IDM against a separate IDM: (b)",
        "the single model's own IDM against a separate IDM: (b) best-of-2"]
    for bad in ("rows=[d]", "rows=[]", "rows=[b,b]"):
        with pytest.raises(ConfigError, match="'rows'.*a, b, b_oracle, c"):
            load(ReproduceConfig, None, [bad])
    with pytest.raises(ConfigError, match="single_model_rows.*b, c"):
        load(ReproduceConfig, None, ["single_model_rows=[a]"])
    with pytest.raises(ConfigError, match="regimes: `single`.*backend=token"):
        load(ReproduceConfig, None, ["regimes=[single]"])  # the default world_model_config is the diffusion toy


def test_a_setting_added_later_leaves_a_finished_run_reusable_at_its_default() -> None:
    """`idm.lora.modules_to_save` came after runs were made: at its default a stage's fingerprint is what it was
    before the setting existed (the config without it), so an upgrade does not retrain a finished table; set, it
    is another stage."""
    import hashlib

    from cwm_ray.config import REPO_ROOT, TrainIDMConfig, load, to_dict
    from cwm_ray.evaluate.reproduce import fingerprint

    cfg = load(TrainIDMConfig, REPO_ROOT / "configs" / "train_idm.yaml")
    before = to_dict(cfg)
    del before["idm"]["lora"]["modules_to_save"]
    payload = json.dumps({"config": before, "inputs": ["x"]}, sort_keys=True, default=str)
    assert fingerprint(cfg, ["x"]) == hashlib.sha256(payload.encode()).hexdigest()[:16]
    lora = dataclasses.replace(cfg.idm.lora, modules_to_save=["lm_head"])
    assert fingerprint(dataclasses.replace(cfg, idm=dataclasses.replace(cfg.idm, lora=lora)), ["x"]) \
        != fingerprint(cfg, ["x"])
