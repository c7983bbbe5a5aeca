"""The paper's ablation table in miniature (PAPER.md §Strategy 1–2), on the toy world, from nothing.

    corpus ─► IDM on gold ─► annotate the unlabelled videos ─► world models
        (a) gold only   (b) gold + synthetic   (b′) the same, true labels   (c) (b) + recognition weighting
    ─► evaluate each on the toy test set (rows in best_of_rows with best-of-N, N ∈ best_of) ─► table.md / .json / report

Each row in one or two regimes (`regimes`): its world model trained from scratch, and/or LoRA-fine-tuned from one
world model pretrained once on a broad toy gold set of scenes the table never uses (the paper's regime).

Each stage is the same library call its job makes, configured from that job's YAML plus overrides, in
one process and one Ray instance.

A re-run redoes exactly the stages whose fingerprint changed, and every stage downstream of them. A stage's
fingerprint hashes its resolved config and its inputs' fingerprints, and is kept in `stages/<stage>.json`
under `output`. A stage whose output exists but whose record is another config's is redone, not reused:
before, a changed backend retrained the world models but kept their old evaluations, and the table showed
them. A redone stage starts from nothing. Its outputs (and the run directory of a training stage it replaces)
are deleted, and a training stage's run name carries the fingerprint, since a redo under the old name would
resume the old checkpoint and annotation into the old output would resume its staging. A stage that crashed
under the same fingerprint is run again in place, so it resumes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import html
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from cwm_ray import storage
from cwm_ray.config import (
    REPO_ROOT,
    TOY,
    AnnotateConfig,
    EvaluateConfig,
    EvaluateIDMConfig,
    ReproduceConfig,
    ToyCorpusConfig,
    TrainIDMConfig,
    TrainWorldModelConfig,
    load,
    to_dict,
)

ROWS = {  # row → (synthetic triplets: None, the IDM's labels or the ground truth's; recognition weighting)
    "a": (None, False),
    "b": ("idm", False),
    "b_oracle": ("oracle", False),
    "c": ("idm", True),
}
ROW_NAMES = {"a": "(a) gold only", "b": "(b) + IDM-labelled synthetic",
             "b_oracle": "(b′) + the same synthetic, true labels", "c": "(c) + recognition weighting"}
COLUMNS = ["toy_score", "toy_edit_success", "toy_minimal_edit", "idm_agreement", "l1"]
COMPARISONS = [("b", "a", "synthetic data helps"), ("b_oracle", "b", "label noise costs"),
               ("c", "b", "recognition weighting helps")]
"""(row, baseline, what a positive difference means): the table's claims, each judged against the seed spread."""
FINETUNED = "ft_"
"""Key prefix of a row's fine-tuned twin (`ft_b` is row (b) LoRA-fine-tuned from the pretrained world model)."""
SINGLE = "self_"
"""Key prefix of a row in the single-model regime (`self_b`: row (b) fine-tuned as `ft_b`, on the pretrained
model's own IDM adapter's labels, and verified by that adapter)."""
REGIMES = {"scratch": ("", "", "from scratch", ""),
           "finetuned": (FINETUNED, "finetuned/", "fine-tuned", " (fine-tuned)"),
           "single": (SINGLE, "single/", "single model", " (single model)")}
"""regime → (row-key prefix, directory under models/ and eval/, its name in the table, its row-name suffix)."""


def row_key(regime: str, row: str) -> str:
    return REGIMES[regime][0] + row


def _regime(key: str) -> str:
    return next((r for r, (prefix, *_) in REGIMES.items() if prefix and key.startswith(prefix)), "scratch")


def _base_row(key: str) -> str:
    return key.removeprefix(REGIMES[_regime(key)][0])


def row_name(key: str) -> str:
    """A table row's label: the row's name, and `(fine-tuned)` or `(single model)` for those regimes."""
    return ROW_NAMES[_base_row(key)] + REGIMES[_regime(key)][3]


def regime_of(key: str) -> str:
    return REGIMES[_regime(key)][2]


@dataclasses.dataclass
class PretrainStage:
    """The pretraining gold set (`make_pretraining_gold`): `num_train` triplets off the corpus's scenes."""

    corpus: ToyCorpusConfig
    output: str
    num_train: int


@dataclasses.dataclass
class OracleStage:
    """Row (b′)'s input: annotation's triplets relabelled by the corpus's ground truth (`relabel_with_ground_truth`)."""

    triplets: str
    corpus: str
    output: str


def _yaml(name: str) -> Path:
    return REPO_ROOT / "configs" / name


TOY_JANUS = "toy-janus-with-understanding-path"
"""An input of the pretraining stage when it builds the toy Janus: its architecture gained the understanding path the
single model's IDM adapter trains (b3113cd), which a config does not show, so a pretrained export from before is
not reused (its fine-tuned rows retrain with it; the from-scratch rows, whose models are unchanged, stay)."""
LATER_SETTINGS = {"modules_to_save": []}
"""Settings added after runs were made, left out of a fingerprint while at their default: a run made before a
setting existed is the run it would make now, so its finished stages stay reusable."""


def _without_later_defaults(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_later_defaults(v) for k, v in value.items()
                if not (k in LATER_SETTINGS and v == LATER_SETTINGS[k])}
    if isinstance(value, list):
        return [_without_later_defaults(v) for v in value]
    return value


def fingerprint(cfg: Any, inputs: Sequence[str]) -> str:
    """A stage's identity: its resolved config and what it read (its inputs' fingerprints), hashed.

    Hashing the resolved config rather than the overrides makes a change in a job's YAML count too.
    """
    config = _without_later_defaults(to_dict(cfg))
    payload = json.dumps({"config": config, "inputs": list(inputs)}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _with_run_name(cfg: Any, name: str) -> Any:
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, name=name))


def _log(msg: str) -> None:
    print(f"[reproduce] {msg}", flush=True)


def reproduce(cfg: ReproduceConfig) -> dict[str, Any]:
    from cwm_ray.annotate import annotate
    from cwm_ray.evaluate.idm import evaluate_idm
    from cwm_ray.evaluate.pipeline import evaluate
    from cwm_ray.toyworld.corpus import make_corpus, make_pretraining_gold, relabel_with_ground_truth
    from cwm_ray.train import train

    t0 = time.perf_counter()
    root = str(Path(cfg.output).resolve()) if not storage.is_s3(cfg.output) else cfg.output
    timings: dict[str, float] = {}

    def stage(key: str, label: str, job_cfg: Any, inputs: Sequence[str], outputs: Sequence[str], done_marker: str,
              run: Callable[[Any], Any], fp: str | None = None) -> str:
        """`run(job_cfg)` unless this fingerprint's run finished (stages/<key>.json says); returns the fingerprint."""
        fp = fp or fingerprint(job_cfg, inputs)
        record_path = storage.join(root, "stages", f"{key}.json")
        record = storage.read_json(record_path) if storage.exists(record_path) else None
        same = cfg.reuse and record is not None and record.get("fingerprint") == fp
        if same and record.get("status") == "done" and storage.exists(done_marker):
            _log(f"{label}: done already ({done_marker})")
            return fp
        if same:
            _log(f"{label}: resuming (same config, unfinished)")
        else:
            # Another config's output (or one of unknown origin) must not be resumed or counted as done.
            for old in sorted({*outputs, *(record or {}).get("outputs", [])}):
                storage.delete(old)
        entry = {"fingerprint": fp, "inputs": list(inputs), "outputs": list(outputs), "config": to_dict(job_cfg)}
        storage.write_json(record_path, entry | {"status": "started"})
        _log(f"{label} ...")
        t = time.perf_counter()
        result = run(job_cfg)
        timings[label] = round(time.perf_counter() - t, 1)
        # What the run returned (a training's summary: its loss history), for the table's training columns.
        kept = {"result": result} if isinstance(result, dict) else {}
        storage.write_json(record_path, entry | {"status": "done"} | kept)
        _log(f"{label}: {timings[label]} s")
        return fp

    def train_stage(key: str, label: str, job_cfg: TrainIDMConfig | TrainWorldModelConfig,
                    inputs: Sequence[str]) -> str:
        """A training stage: its run is named after its fingerprint, so a changed config starts a fresh run."""
        fp = fingerprint(job_cfg, inputs)  # of the config with the plain run name, so the name can carry it
        job_cfg = _with_run_name(job_cfg, f"{job_cfg.train.name}-{fp[:8]}")
        export, run_dir = job_cfg.train.export, storage.join(job_cfg.train.storage_path, job_cfg.train.name)
        return stage(key, label, job_cfg, inputs, [export, run_dir], export, train, fp)

    corpus = storage.join(root, "corpus")
    gold = storage.join(corpus, "gold", "train.json")
    test = storage.join(corpus, "gold", "test.json")
    corpus_cfg = load(ToyCorpusConfig, _yaml("toy.yaml"), [f"output={corpus}", *cfg.corpus_overrides])
    corpus_fp = stage("corpus", "corpus", corpus_cfg, [], [corpus_cfg.output], storage.join(corpus, "corpus.json"),
                      make_corpus)
    # The world model's backend (its YAML's, or world_model.backend=token) also decides whose encoder gives the
    # recognition weights at annotation, and how the models are evaluated.
    world_model_yaml = _yaml(cfg.world_model_config)
    backend = [f"world_model.backend="
               f"{load(TrainWorldModelConfig, world_model_yaml, cfg.world_model_overrides).world_model.backend}"]

    pretrained = None
    if {"finetuned", "single"} & set(cfg.regimes):
        # Once for every seed: a broad gold set of scenes the table never uses, and a world model trained on it.
        pre_root = storage.join(root, "pretrain")
        pre_gold = PretrainStage(corpus_cfg, storage.join(pre_root, "corpus"), cfg.pretrain_gold)
        pre_gold_fp = stage("pretrain/corpus", "pretraining gold", pre_gold, [corpus_fp], [pre_gold.output],
                            storage.join(pre_gold.output, "corpus.json"),
                            lambda g: make_pretraining_gold(g.corpus, g.output, g.num_train))
        pretrained = storage.join(pre_root, "world_model")
        pre_cfg = load(TrainWorldModelConfig, world_model_yaml, [
            f"data.sources=[{{uri: '{storage.join(pre_gold.output, 'gold', 'train.json')}'}}]",
            f"train.storage_path={storage.join(pre_root, 'runs')}", "train.name=pretrained_world_model",
            f"train.export={pretrained}", "optim.seed=0", *cfg.pretrain_overrides])
        toy_janus = pre_cfg.world_model.backend == "token" and pre_cfg.world_model.model == TOY
        pretrained_fp = train_stage("pretrain/world_model", "pretrained world model", pre_cfg,
                                    [pre_gold_fp, *([TOY_JANUS] if toy_janus else [])])

    per_seed: dict[int, dict[str, Any]] = {}
    for seed in range(cfg.seeds):
        # One corpus; each seed trains the IDM, annotates, trains every row's world model and evaluates anew.
        base, tag = storage.join(root, "seeds", str(seed)), f"[seed {seed}] "
        runs, models = storage.join(base, "runs"), storage.join(base, "models")
        idm = storage.join(models, "idm")
        idm_fp = train_stage(f"seed{seed}/idm", f"{tag}IDM on gold", load(TrainIDMConfig, _yaml("train_idm.yaml"), [
            f"data.sources=[{{uri: '{gold}'}}]", f"train.storage_path={runs}", "train.name=idm",
            f"train.export={idm}", f"optim.seed={seed}", *cfg.idm_overrides]), [corpus_fp])
        idm_eval = load(EvaluateIDMConfig, _yaml("evaluate_idm.yaml"), [
            f"bench={test}", f"idm.model={idm}", f"output={storage.join(base, 'eval_idm')}"])
        stage(f"seed{seed}/eval_idm", f"{tag}IDM accuracy", idm_eval, [corpus_fp, idm_fp], [idm_eval.output],
              storage.join(idm_eval.output, "results.json"), evaluate_idm)

        annotated = storage.join(base, "annotated")
        annotate_cfg = load(AnnotateConfig, _yaml("annotate.yaml"), [
            f"inputs=[{{name: toy, uri: '{storage.join(corpus, 'videos')}'}}]", f"output={annotated}",
            f"idm.model={idm}", *backend, *cfg.annotate_overrides])
        annotate_fp = stage(f"seed{seed}/annotate", f"{tag}annotate", annotate_cfg, [corpus_fp, idm_fp],
                            [annotate_cfg.output], storage.join(annotated, "summary.json"), annotate)
        triplets = storage.join(annotated, "triplets")
        oracle = OracleStage(triplets, corpus, storage.join(base, "oracle", "triplets"))
        oracle_fp = stage(f"seed{seed}/oracle", f"{tag}ground-truth labels", oracle, [corpus_fp, annotate_fp],
                          [oracle.output], storage.join(oracle.output, "part-00000.parquet"),
                          lambda o: relabel_with_ground_truth(o.triplets, o.corpus, o.output))
        synthetic = {"idm": (triplets, annotate_fp), "oracle": (oracle.output, oracle_fp)}
        verifier = {"scratch": ([f"idm.model={idm}"], idm_fp), "finetuned": ([f"idm.model={idm}"], idm_fp)}
        idm_self_result = None
        if "single" in cfg.regimes:
            # The paper's single-model setting: the pretrained world model learns to be the IDM too, as a LoRA
            # adapter over the same weights, then labels the videos and verifies its own samples.
            idm_self = storage.join(models, "idm_self")
            self_cfg = load(TrainIDMConfig, _yaml("train_idm.yaml"), [
                f"data.sources=[{{uri: '{gold}'}}]", f"train.storage_path={runs}", "train.name=idm_self",
                f"train.export={idm_self}", f"optim.seed={seed}", f"idm.model={pretrained}", *cfg.idm_overrides,
                *cfg.single_model_idm_overrides])
            self_fp = train_stage(f"seed{seed}/idm_self", f"{tag}IDM adapter on the pretrained world model", self_cfg,
                                  [corpus_fp, pretrained_fp])
            self_idm = [f"idm.model={pretrained}", f"idm.adapter={idm_self}"]
            self_eval = load(EvaluateIDMConfig, _yaml("evaluate_idm.yaml"), [
                f"bench={test}", *self_idm, f"output={storage.join(base, 'eval_idm_self')}"])
            stage(f"seed{seed}/eval_idm_self", f"{tag}IDM adapter accuracy", self_eval, [corpus_fp, self_fp],
                  [self_eval.output], storage.join(self_eval.output, "results.json"), evaluate_idm)
            annotated_self = storage.join(base, "annotated_self")
            annotate_self_cfg = load(AnnotateConfig, _yaml("annotate.yaml"), [
                f"inputs=[{{name: toy, uri: '{storage.join(corpus, 'videos')}'}}]", f"output={annotated_self}",
                *self_idm, *backend, *cfg.annotate_overrides])
            annotate_self_fp = stage(f"seed{seed}/annotate_self", f"{tag}annotate with the IDM adapter",
                                     annotate_self_cfg, [corpus_fp, self_fp], [annotate_self_cfg.output],
                                     storage.join(annotated_self, "summary.json"), annotate)
            synthetic["self"] = (storage.join(annotated_self, "triplets"), annotate_self_fp)
            verifier["single"] = (self_idm, self_fp)
            idm_self_result = storage.read_json(storage.join(self_eval.output, "results.json")).get("explains")

        results: dict[str, dict[str, Any]] = {}
        training: dict[str, dict[str, Any]] = {}
        for regime in cfg.regimes:
            for row, (kind, weighted) in ROWS.items():
                if row not in (cfg.single_model_rows if regime == "single" else cfg.rows):
                    continue
                if regime == "single":
                    kind = "self"
                key = row_key(regime, row)
                where = REGIMES[regime][1]
                wm, out = storage.join(models, f"{where}world_model_{row}"), storage.join(base, f"eval/{where}{row}")
                sources, inputs = f"[{{uri: '{gold}'}}]", [corpus_fp]
                if kind is not None:
                    uri, fp = synthetic[kind]
                    sources = f"[{{uri: '{gold}'}}, {{uri: '{uri}', weight: {cfg.synthetic_weight}}}]"
                    inputs = [corpus_fp, fp]
                start: list[str] = []
                if regime in ("finetuned", "single"):
                    start = [f"world_model.model={pretrained}", *cfg.finetune_overrides]
                    inputs = [*inputs, pretrained_fp]
                wm_cfg = load(TrainWorldModelConfig, world_model_yaml, [
                    f"data.sources={sources}", f"recognition.enabled={str(weighted).lower()}",
                    f"train.storage_path={runs}", f"train.name=world_model_{key}", f"train.export={wm}",
                    f"optim.seed={seed}", *cfg.world_model_overrides, *start])
                wm_key = f"seed{seed}/world_model_{key}"
                wm_fp = train_stage(wm_key, f"{tag}world model {row_name(key)}", wm_cfg, inputs)
                training[key] = _training_record(storage.join(root, "stages", f"{wm_key}.json"))
                # A LoRA row's export is its adapter: evaluation loads it over the model it was trained from.
                model = ([f"world_model.model={wm_cfg.world_model.model}", f"world_model.adapter={wm}"]
                         if wm_cfg.world_model.lora.enabled else [f"world_model.model={wm}"])
                best_of = cfg.best_of if row in cfg.best_of_rows else [1]
                verifier_args, verifier_fp = verifier[regime]
                eval_cfg = load(EvaluateConfig, _yaml("evaluate.yaml"), [
                    f"bench={test}", *model, *verifier_args,
                    f"best_of=[{','.join(str(n) for n in best_of)}]", f"output={out}", f"seed={seed}", *backend,
                    *cfg.evaluate_overrides])
                stage(f"seed{seed}/evaluate_{key}", f"{tag}evaluate {row_name(key)}", eval_cfg,
                      [corpus_fp, verifier_fp, wm_fp], [eval_cfg.output], storage.join(out, "results.json"), evaluate)
                results[key] = storage.read_json(storage.join(out, "results.json"))["summary"]
        idm_result = storage.read_json(storage.join(idm_eval.output, "results.json"))
        per_seed[seed] = {"rows": results, "idm_explains": idm_result.get("explains"), "training": training,
                          "idm_self_explains": idm_self_result}

    table = build_table(per_seed)
    table |= {"seconds": round(time.perf_counter() - t0, 1), "stage_seconds": timings, "regimes": list(cfg.regimes),
              "training": {str(seed): s["training"] for seed, s in per_seed.items()}}
    if pretrained is not None:
        table["pretrained"] = {"export": pretrained, "gold": cfg.pretrain_gold,
                               **_training_record(storage.join(root, "stages", "pretrain/world_model.json"))}
    write_table(root, table)
    return table


def _training_record(record_path: str) -> dict[str, Any]:
    """A training stage's first and last logged loss and its steps (from its stage record), for the table: the
    first says where a run started (a fine-tuned row from the pretrained model, below a fresh one)."""
    result = (storage.read_json(record_path) if storage.exists(record_path) else {}).get("result") or {}
    history = result.get("history") or []
    return {"steps": result.get("steps"), "first_loss": history[0].get("loss") if history else None,
            "first_loss_step": history[0].get("step") if history else None,
            "last_loss": history[-1].get("loss") if history else None}


def _mean_spread(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    """Mean over seeds and the spread: the sample standard deviation (None with one seed or a missing value)."""
    if not values or any(v is None for v in values):
        return None, None
    xs = [float(v) for v in values if v is not None]
    mean = sum(xs) / len(xs)
    if len(xs) < 2:
        return mean, None
    return mean, (sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5


def build_table(per_seed: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Per row (and best-of-N): each column's mean and spread over seeds, the per-seed values, and the comparisons.

    A difference between two rows counts (`beyond_spread`) only when it exceeds the spread of its own per-seed
    values (see `compare`).
    """
    keyed: dict[tuple[str, int], list[tuple[int, dict[str, Any]]]] = {}
    for seed, seed_result in per_seed.items():
        for row, summary in seed_result["rows"].items():
            for r in summary["overall"]:
                if r["system"] == "copy" and row != next(iter(seed_result["rows"])):
                    continue  # the same for every row: taken once
                key = ("copy", 1) if r["system"] == "copy" else (row, int(r["best_of"]))
                keyed.setdefault(key, []).append((seed, r))
    rows = []
    for (row, n), pairs_found in keyed.items():
        found = [r for _, r in pairs_found]
        name = "copy the source" if row == "copy" else row_name(row) + (f" + best-of-{n}" if n > 1 else "")
        entry: dict[str, Any] = {"row": name, "key": row, "regime": None if row == "copy" else regime_of(row),
                                 "best_of": n, "items": found[0]["items"],
                                 "seeds": len(found), "seed_ids": [seed for seed, _ in pairs_found]}
        for c in COLUMNS:
            values = [r.get(c) for r in found]
            entry[c], entry[f"{c}_spread"] = _mean_spread(values)
            entry[f"{c}_per_seed"] = values
        rows.append(entry)
    rows = [r for r in rows if r["key"] != "copy"] + [r for r in rows if r["key"] == "copy"]

    def find(row: str, n: int = 1) -> dict[str, Any] | None:
        return next((r for r in rows if r["key"] == row and r["best_of"] == n), None)

    pairs = []
    for prefix, _, _, suffix in REGIMES.values():
        pairs += [(find(prefix + a), find(prefix + b), claim + suffix) for a, b, claim in COMPARISONS]
        for key in ROWS:
            ns = sorted({r["best_of"] for r in rows if r["key"] == prefix + key})
            pairs += [(find(prefix + key, n), find(prefix + key, m),
                       f"{ROW_NAMES[key].split()[0]} best-of-{n} beats best-of-{m}{suffix}")
                      for m, n in zip(ns, ns[1:], strict=False)]
    pairs += [(find(FINETUNED + key), find(key), f"fine-tuning the pretrained model beats training from scratch: "
                                                 f"{ROW_NAMES[key].split()[0]}") for key in ROWS]
    pairs += [(r, find(FINETUNED + _base_row(r["key"]), r["best_of"]),
               f"the single model's own IDM against a separate IDM: {ROW_NAMES[_base_row(r['key'])].split()[0]}"
               + (f" best-of-{r['best_of']}" if r["best_of"] > 1 else "")) for r in rows if r["key"].startswith(SINGLE)]
    comparisons = [compare(x, y, claim) for x, y, claim in pairs if x is not None and y is not None]
    table = {"rows": rows, "columns": COLUMNS, "seeds": len(per_seed), "comparisons": comparisons}
    for name in ("idm_explains", "idm_self_explains"):
        values = [s.get(name) for s in per_seed.values()]
        if name == "idm_self_explains" and all(v is None for v in values):
            continue
        table[name], table[f"{name}_spread"] = _mean_spread(values)
        table[f"{name}_per_seed"] = values
    return table


def compare(x: dict[str, Any], y: dict[str, Any], claim: str, column: str = "toy_score") -> dict[str, Any]:
    """x − y on `column` (mean over the seeds both rows have), and whether it is beyond the spread: the sample
    standard deviation of the per-seed differences (None with fewer than two seeds in common).

    Paired by seed, because the rows of one seed share everything but the row's own change: the gold, the
    corpus, the IDM and its labels, the test items and the sampling seeds (best-of-N's first candidates are
    best-of-M's). What a seed does to both rows cancels in its difference, so the spread of the differences is
    the noise of the claim itself. Adding the two rows' spreads instead counts that shared seed-to-seed
    variation twice: on the token toy's three seeds (docs/experiments.md) it called best-of-4 over best-of-2
    within the spread although it was higher in every seed (+0.63 / +0.96 / +0.52).
    """
    mine, theirs = _by_seed(x, column), _by_seed(y, column)
    seeds = [s for s in mine if s in theirs and mine[s] is not None and theirs[s] is not None]
    diffs = [float(mine[s]) - float(theirs[s]) for s in seeds]
    diff, spread = _mean_spread(diffs)
    if diff is None:
        diff = None if x[column] is None or y[column] is None else x[column] - y[column]
    return {"claim": claim, "rows": [x["row"], y["row"]], "difference": diff, "spread": spread,
            "per_seed": diffs, "beyond_spread": None if spread is None or diff is None else abs(diff) > spread}


def _by_seed(row: dict[str, Any], column: str) -> dict[int, float | None]:
    """{seed: value} of a table row (rows written before `seed_ids` existed count their seeds from 0)."""
    values = row.get(f"{column}_per_seed", [])
    return dict(zip(row.get("seed_ids") or range(len(values)), values, strict=True))


def _cell(mean: float | None, spread: float | None) -> str:
    if mean is None:
        return "–"
    return f"{mean:.2f}" if spread is None else f"{mean:.2f} ± {spread:.2f}"


def markdown(table: dict[str, Any]) -> str:
    cols = table["columns"]
    lines = ["| world model | items | " + " | ".join(cols) + " |", "|---|---:|" + "---:|" * len(cols)]
    for r in table["rows"]:
        cells = " | ".join(_cell(r[c], r.get(f"{c}_spread")) for c in cols)
        lines.append(f"| {r['row']} | {r['items']} | {cells} |")
    seeds = table.get("seeds", 1)
    lines.append("")
    lines.append(f"Seeds: {seeds}" + (" (mean ± sample standard deviation over seeds)." if seeds > 1 else
                                      " (no spread: run with seeds=3 to judge differences)."))
    for name, what in (("idm_explains", "IDM"), ("idm_self_explains", "The single model's IDM adapter")):
        if table.get(name) is not None:
            spread = table.get(f"{name}_spread")
            lines.append(f"{what} on the held-out gold pairs: "
                         f"{_cell(100 * table[name], None if spread is None else 100 * spread)} % explained.")
    pre = table.get("pretrained")
    if pre:
        first = {regime: [t["first_loss"] for seed in table.get("training", {}).values() for k, t in seed.items()
                          if regime_of(k) == regime and t.get("first_loss") is not None]
                 for regime in ("fine-tuned", "from scratch")}
        started = "; ".join(f"{regime} {sum(v) / len(v):.3f}" for regime, v in first.items() if v)
        lines.append(f"Fine-tuned rows: LoRA on one world model pretrained on {pre['gold']} gold triplets of scenes "
                     f"the table never uses ({pre.get('steps')} steps, last logged loss "
                     f"{pre['last_loss'] if pre.get('last_loss') is None else round(pre['last_loss'], 3)})."
                     + (f" First logged training loss, mean over rows: {started}." if started else ""))
    for c in table.get("comparisons", []):
        if c["difference"] is None:
            continue
        verdict = {True: "beyond the spread", False: "within the spread", None: "spread unknown"}[c["beyond_spread"]]
        spread = "" if c["spread"] is None else (f" (spread {c['spread']:.2f}; per seed "
                                                  + " / ".join(f"{d:+.2f}" for d in c["per_seed"]) + ")")
        lines.append(f"- {c['claim']}: {c['rows'][0]} − {c['rows'][1]} = {c['difference']:+.2f}{spread}: {verdict}")
    return "\n".join(lines)


def write_table(root: str, table: dict[str, Any]) -> None:
    md = markdown(table)
    print("\n" + md + f"\n\n(total {table['seconds']} s)", flush=True)
    storage.write_text(storage.join(root, "table.md"), md + "\n")
    storage.write_json(storage.join(root, "table.json"), table)
    from cwm_ray.evaluate.table_plot import plot_table

    plot_table(table, storage.join(root, "table.png"))
    keys = [r["key"] for r in table["rows"] if r["key"] != "copy" and r["best_of"] == 1]
    links = "".join(f'<li><a href="../seeds/{s}/eval/{REGIMES[_regime(k)][1]}'
                    f'{_base_row(k)}/report/index.html">seed {s}, row {html.escape(row_name(k))}</a></li>'
                    for s in range(table.get("seeds", 1)) for k in keys)
    body = "".join(f"<tr><td>{html.escape(r['row'])}</td><td>{r['items']}</td>" + "".join(
        f"<td>{_cell(r[c], r.get(f'{c}_spread'))}</td>" for c in table["columns"]) + "</tr>"
        for r in table["rows"])
    head = "".join(f"<th>{c}</th>" for c in table["columns"])
    notes = "".join(f"<li>{html.escape(line[2:])}</li>" for line in md.splitlines() if line.startswith("- "))
    page = (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>cwm_ray: the table in miniature</title>"
            f"<style>body{{font-family:system-ui,sans-serif;margin:2rem}}td,th{{border:1px solid #ccc;"
            f"padding:.3rem .6rem}}table{{border-collapse:collapse}}</style></head><body>"
            f"<h1>The paper's table in miniature (toy world)</h1><table><tr><th>world model</th><th>items</th>{head}"
            f"</tr>{body}</table><p><img src=\"../table.png\" alt=\"the table as bars\"></p><ul>{notes}</ul>"
            f"<p>{json.dumps(table['stage_seconds'])}</p><ul>{links}</ul>"
            f"</body></html>")
    storage.write_text(storage.join(root, "report", "index.html"), page)
