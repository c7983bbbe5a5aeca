"""IDM accuracy: how often the inverse dynamics model names the action a frame pair shows.

The paper's bootstrap stands on the IDM's labels (§Strategy 1), so its accuracy is the first number to
check; this is how the IDM figures in docs/experiments.md are measured, from a command rather than a notebook.

Two sources of (source, target, action) rows, one scoring:
- `bench`: an AURORA-format test set; the IDM labels each pair (greedy, as annotation does) and its action
  is compared with the reference text;
- `triplets`: a Parquet directory written by `jobs/annotate.py` (`triplets/` or `pairs/`); the stored
  actions are scored as they are, so the figure is what annotation kept, with no IDM loaded.

Scores per row: `exact`, the action equals the reference after case and whitespace are normalised; the paper's
text metrics (`text_metrics`): ROUGE-1 / ROUGE-L F1 and BERTScore F1 per row, and corpus BLEU over each task
and the whole set (none of these for `triplets`, which have no reference); and, with `toy_judge`,
`explains`: the action, executed on the source scene by the toy world's exact parser, gives the target
scene. The toy figure is the one to read there: two sentences can describe one change (`move the red
circle left` and `put the red circle to the left of the blue square`), and no IDM can tell which was said.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import pyarrow.parquet as pq

from cwm_ray import storage
from cwm_ray.config import EvaluateIDMConfig, ToyWorldConfig
from cwm_ray.evaluate.metrics import normalise_action
from cwm_ray.schema import decode_image

TRIPLET_COLUMNS = ["id", "source", "target", "action"]


@dataclass
class Row:
    """One scored pair. `reference` is None for annotated triplets (nothing to compare the text with)."""

    id: str
    task: str
    action: str
    reference: str | None
    exact: bool | None
    explains: bool | None
    logprob: float | None = None
    rouge1: float | None = None
    rougeL: float | None = None  # noqa: N815 (rouge-score's name)
    bertscore: float | None = None


def score(ids: Sequence[str], tasks: Sequence[str], sources: Sequence[bytes], targets: Sequence[bytes],
          actions: Sequence[str], references: Sequence[str | None], toy: ToyWorldConfig | None,
          logprobs: Sequence[float | None] | None = None) -> list[Row]:
    """Score each row's action against its reference text and, given the toy world, against its frames."""
    from cwm_ray.toyworld.parser import explains  # only the toy judge needs the toy world

    rows = []
    for i, (action, ref) in enumerate(zip(actions, references, strict=True)):
        ok = None
        if toy is not None:
            ok = explains(decode_image(sources[i]), action, decode_image(targets[i]), toy)
        exact = None if ref is None else normalise_action(action) == normalise_action(ref)
        rows.append(Row(ids[i], tasks[i], action, ref, exact, ok, None if logprobs is None else logprobs[i]))
    return rows


def text_metrics(rows: Sequence[Row], scorer: Any = None) -> None:
    """Fill each referenced row's ROUGE-1 / ROUGE-L F1 (rouge-score) and BERTScore F1 (bert-score, one batched
    pass over the set), the paper's IDM metrics; BLEU is a corpus score, taken in `summarise`."""
    from rouge_score import rouge_scorer

    scored = [r for r in rows if r.reference is not None]
    if not scored:
        return
    rouge = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)
    for r in scored:
        s = rouge.score(r.reference, r.action)  # (target, prediction)
        r.rouge1, r.rougeL = s["rouge1"].fmeasure, s["rougeL"].fmeasure
    if scorer is not None:
        # An empty action matches nothing: 0, without asking bert-score (whose empty-sentence path calls a tokenizer
        # method transformers 5 no longer has).
        said = [r for r in scored if r.action.strip() and r.reference.strip()]
        for r in scored:
            r.bertscore = 0.0
        if said:
            _, _, f1 = scorer.score([r.action for r in said], [r.reference for r in said])
            for r, v in zip(said, f1.tolist(), strict=True):
                r.bertscore = float(v)


def bert_scorer(cfg: EvaluateIDMConfig) -> Any:
    """bert-score's scorer over `bertscore_model` (an id, or a local or s3:// directory), at `bertscore_layers`."""
    import torch
    from bert_score import BERTScorer
    from bert_score.utils import model2layers
    from transformers import AutoConfig

    model = cfg.bertscore_model or ""
    path = storage.local_dir(model, cfg=cfg.storage)
    layers = cfg.bertscore_layers or model2layers.get(model) or AutoConfig.from_pretrained(path).num_hidden_layers
    device = "cuda" if torch.cuda.is_available() else "cpu"
    scorer = BERTScorer(model_type=path, num_layers=layers, lang="en" if cfg.bertscore_rescale else None,
                        rescale_with_baseline=cfg.bertscore_rescale, device=device)
    if cfg.bertscore_rescale:
        try:
            _ = scorer.baseline_vals  # read now, not after the IDM has labelled the whole set
        except ValueError:
            raise ValueError(f"bertscore_rescale: bert-score ships no English baseline for {model!r}; use a model it "
                             "knows (e.g. roberta-large) or bertscore_rescale=false") from None
    return scorer


def corpus_bleu(part: Sequence[Row]) -> float | None:
    """sacrebleu's corpus BLEU of the actions against their references, on a 0–1 scale (the paper's)."""
    import sacrebleu

    scored = [r for r in part if r.reference is not None]
    if not scored:
        return None
    return sacrebleu.corpus_bleu([r.action for r in scored], [[r.reference for r in scored]]).score / 100


def summarise(rows: Sequence[Row], text: bool = False) -> dict[str, Any]:
    """Counts and rates overall and per task; a rate is None when no row has that score. With `text`, also the
    means of the text metrics and corpus BLEU."""
    def rates(part: Sequence[Row]) -> dict[str, Any]:
        out: dict[str, Any] = {"items": len(part)}
        for key in ("exact", "explains", *(("rouge1", "rougeL", "bertscore") if text else ())):
            values = [getattr(r, key) for r in part if getattr(r, key) is not None]
            out[key] = sum(values) / len(values) if values else None
        if text:
            out["bleu"] = corpus_bleu(part)
        return out

    tasks = sorted({r.task for r in rows})
    return rates(rows) | {"per_task": {t: rates([r for r in rows if r.task == t]) for t in tasks}}


def _bench_rows(cfg: EvaluateIDMConfig, toy: ToyWorldConfig | None) -> list[Row]:
    from cwm_ray.evaluate.bench import load_bench
    from cwm_ray.idm import InverseDynamicsModel

    items = load_bench(cfg.bench, cfg.tasks, cfg.max_items, cfg.storage)
    if any(it.reference is None for it in items):
        missing = next(it.id for it in items if it.reference is None)
        raise ValueError(f"{cfg.bench}: item {missing} has no `output` frame: an IDM needs both frames")
    idm = InverseDynamicsModel.load(storage.with_local_paths(cfg.idm))
    labels = []
    for i in range(0, len(items), cfg.batch_size):
        chunk = items[i:i + cfg.batch_size]
        labels += idm.label([it.source for it in chunk], [it.reference for it in chunk])  # type: ignore[misc]
        print(f"[evaluate_idm] labelled {len(labels)}/{len(items)}", flush=True)
    return score([it.id for it in items], [it.task for it in items], [it.source for it in items],
                 [it.reference for it in items], [lab.action for lab in labels],  # type: ignore[misc]
                 [it.action for it in items], toy, [lab.logprob for lab in labels])


def _triplet_rows(cfg: EvaluateIDMConfig, toy: ToyWorldConfig | None) -> list[Row]:
    if toy is None:
        raise ValueError("triplets have no reference text: only the toy judge (toy_judge=true) can score them")
    fs, path = storage.filesystem(cfg.triplets or "", cfg.storage)
    try:
        dataset = pq.ParquetDataset(path, filesystem=fs)
    except (FileNotFoundError, OSError) as exc:
        raise ValueError(f"triplets={cfg.triplets}: not a readable Parquet directory ({exc})") from None
    names = dataset.schema.names
    missing = [c for c in TRIPLET_COLUMNS if c not in names]
    if missing:
        raise ValueError(f"triplets={cfg.triplets}: no column(s) {missing}; expected annotation's triplets/ or pairs/")
    # Only the columns scored: annotation rows also carry weight maps and video metadata.
    table = dataset.read(columns=[*TRIPLET_COLUMNS, *(c for c in ("dataset", "logprob") if c in names)])
    if table.num_rows == 0:
        raise ValueError(f"triplets={cfg.triplets}: no rows to score")
    t = table.to_pydict()
    tasks = t.get("dataset") or ["default"] * table.num_rows
    return score(t["id"], tasks, t["source"], t["target"], t["action"], [None] * table.num_rows, toy,
                 t.get("logprob"))


def evaluate_idm(cfg: EvaluateIDMConfig) -> dict[str, Any]:
    """Score the IDM on `bench` (or annotation's `triplets`); write results.json and rows.jsonl to `output`."""
    if bool(cfg.bench) == bool(cfg.triplets):
        raise ValueError("give exactly one of bench=<AURORA json> or triplets=<annotation Parquet directory>")
    storage.configure(cfg.storage)
    t0 = time.perf_counter()
    toy = cfg.toy if cfg.toy_judge else None
    text = bool(cfg.text_metrics and cfg.bench)
    scorer = bert_scorer(cfg) if text and cfg.bertscore_model else None  # a bad model fails before the IDM runs
    rows = _bench_rows(cfg, toy) if cfg.bench else _triplet_rows(cfg, toy)
    if text:
        text_metrics(rows, scorer)
    summary = summarise(rows, text) | {
        "source": cfg.bench or cfg.triplets, "idm": cfg.idm.model if cfg.bench else None,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    storage.write_json(storage.join(cfg.output, "results.json"), summary, cfg.storage)
    storage.write_text(storage.join(cfg.output, "rows.jsonl"),
                       "".join(f"{json.dumps(asdict(r))}\n" for r in rows), cfg.storage)
    print(format_table(summary), flush=True)
    return summary


TEXT_COLUMNS = ("bleu", "rouge1", "rougeL", "bertscore")
"""The paper's IDM metrics (its order: BERTScore / ROUGE-1 / ROUGE-L / BLEU), each on a 0–1 scale."""


def format_table(summary: dict[str, Any]) -> str:
    def pct(v: float | None) -> str:
        return "—" if v is None else f"{100 * v:.1f} %"

    def num(v: float | None) -> str:
        return "—" if v is None else f"{v:.3f}"

    text = [c for c in TEXT_COLUMNS if c in summary]

    def line(name: str, r: dict[str, Any]) -> str:
        return (f"{name:<16}{r['items']:>7}{pct(r['exact']):>10}{pct(r['explains']):>10}"
                + "".join(f"{num(r.get(c)):>11}" for c in text))

    lines = [f"IDM accuracy on {summary['source']}",
             f"{'task':<16}{'items':>7}{'exact':>10}{'explains':>10}" + "".join(f"{c:>11}" for c in text)]
    lines += [line(task, r) for task, r in summary["per_task"].items()]
    lines.append(line("all", summary))
    return "\n".join(lines)
