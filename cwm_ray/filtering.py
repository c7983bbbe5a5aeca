"""Stratified top-K (paper §Strategy 1, step 4): keep the data diverse, not dominated by one action.

Per corpus: group triplets by action class, sort each class by IDM log-likelihood (best first, ties
broken by id so the result is deterministic), then take the best remaining triplet of each class in
turn until the budget is spent. Within a round, classes are visited best candidate first, so a budget
that ends mid-round keeps the most confident triplets of that round.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cwm_ray.config import FilterConfig

_WORD = re.compile(r"[a-z]+(?:'[a-z]+)?")


_DETERMINERS = frozenset("the a an this that these those his her their my your its our some".split())
_SUBJECTS = frozenset("he she they it i we you someone somebody something person people".split())
_AUXILIARIES = frozenset("is are was were be being been am has have had does do did will would can could "
                         "then now just".split())


def _verb_start(words: list[str], keep: set[str]) -> int:
    """Where the verb is: 0 for an imperative ("open the door"), past the subject of a caption.

    Real captions often describe rather than instruct ("the man opens the door", "a person is picking up a
    cup"), and their first word is then an article or a pronoun, which would make one class of every action.
    A caption's subject is an article and a short noun phrase, or a pronoun, with auxiliaries after it; its
    verb is the first later word followed by an article, a kept particle or nothing (no tagger needed: within
    three words of the article, the word before "the door" / "up" is the verb).
    """
    i = 0
    if words[0] in _SUBJECTS:
        i = 1
    elif words[0] in _DETERMINERS:
        i = len(words) - 1
        for j in range(2, min(len(words), 5)):
            if j + 1 == len(words) or words[j + 1] in _DETERMINERS or words[j + 1] in keep:
                i = j
                break
    while i + 1 < len(words) and words[i] in _AUXILIARIES:
        i += 1
    return min(i, len(words) - 1)


def _base_form(verb: str) -> str:
    """A third-person verb to its base ("opens" → "open", "pushes" → "push"), so captions and instructions of
    one action share a class; other forms are kept as written."""
    if len(verb) > 4 and verb.endswith(("shes", "ches", "xes", "sses", "zes")):
        return verb[:-2]
    if len(verb) > 3 and verb.endswith("s") and not verb.endswith(("ss", "us", "is")):
        return verb[:-1]
    return verb


def action_class(action: str, cfg: FilterConfig) -> str:
    """The class an action is balanced under: its verb phrase with the object words removed.

    "move the red circle left" → "move left"; "put the red circle above the blue square" → "put above";
    "make the green triangle yellow" → "make"; "pick up the cup" → "pick up"; a caption's subject goes first:
    "the man opens the door" → "open", "a person is picking up a cup" → "picking up".
    """
    words = _WORD.findall(action.lower())
    if not words:
        return ""
    if cfg.class_rule == "full":
        return " ".join(words)
    keep = set(cfg.keep_words)
    start = _verb_start(words, keep)
    verb = words[start] if start == 0 else _base_form(words[start])
    if cfg.class_rule == "first_word":
        return verb
    if cfg.class_rule == "verb_phrase":
        return " ".join([verb, *(w for w in words[start + 1 :] if w in keep)])
    raise ValueError(f"unknown filter.class_rule {cfg.class_rule!r}; use verb_phrase, first_word or full")


def triplet_score(logprob: float, num_tokens: int, how: str) -> float:
    if how == "sum":
        return float(logprob)
    if how == "mean":
        return float(logprob) / max(1, int(num_tokens))
    raise ValueError(f"unknown filter.score {how!r}; use sum or mean")


def stratified_top_k(
    ids: Sequence[str], classes: Sequence[str], scores: Sequence[float], budget: int
) -> list[str]:
    """The ids kept for one corpus, in the order they were taken."""
    by_class: dict[str, list[tuple[float, str]]] = defaultdict(list)
    for i, c, s in zip(ids, classes, scores, strict=True):
        by_class[c].append((-float(s), str(i)))
    queues = {c: sorted(v) for c, v in by_class.items()}  # best first; ties by id
    kept: list[str] = []
    depth = 0
    while len(kept) < budget:
        round_ = sorted((q[depth], c) for c, q in queues.items() if depth < len(q))
        if not round_:
            break
        for (_, item_id), _c in round_:
            if len(kept) == budget:
                break
            kept.append(item_id)
        depth += 1
    return kept


def select(rows: Iterable[dict[str, object]], cfg: FilterConfig) -> set[str]:
    """Kept ids over rows of {id, dataset, action_class, logprob, num_tokens}: the budget is per corpus."""
    per_corpus: dict[str, tuple[list[str], list[str], list[float]]] = defaultdict(lambda: ([], [], []))
    for r in rows:
        ids, cls, sc = per_corpus[str(r["dataset"])]
        ids.append(str(r["id"]))
        cls.append(str(r["action_class"]))
        sc.append(triplet_score(float(r["logprob"]), int(r["num_tokens"]), cfg.score))  # type: ignore[arg-type]
    kept: set[str] = set()
    for ids, cls, sc in per_corpus.values():
        kept.update(stratified_top_k(ids, cls, sc, cfg.budget))
    return kept


def _run_position(*sorted_columns: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Each row's position inside its run of equal keys, over columns already sorted by those keys."""
    n = len(sorted_columns[0])
    starts = np.zeros(n, dtype=bool)
    if n:
        starts[0] = True
    for col in sorted_columns:
        if n > 1:
            changed = pc.not_equal(col.slice(1), col.slice(0, n - 1))
            starts[1:] |= pc.fill_null(changed, True).to_numpy(zero_copy_only=False)
    rows = np.arange(n)
    return rows - np.maximum.accumulate(np.where(starts, rows, 0))


def stratified_top_k_mask(table: pa.Table, cfg: FilterConfig) -> pa.BooleanArray:
    """Which rows of {id, dataset, action_class, logprob, num_tokens} are kept: `select`, as Arrow sorts.

    The round a triplet is taken in is its rank inside its (corpus, class), best first, ties by id; round by
    round, classes are visited best candidate first. So a corpus's triplets in the order (rank, score desc,
    id) are exactly the order `stratified_top_k` takes them in, and the kept ones are the first `budget` of
    that order. Two sorts and a run-length pass, in Arrow's C++ and numpy: no Python object per row, which
    is what lets finalize handle millions of staged pairs (`stratified_top_k` stays as the reference).
    """
    n = table.num_rows
    logprob = pc.cast(table.column("logprob"), pa.float64())
    if cfg.score == "sum":
        score = logprob
    elif cfg.score == "mean":
        tokens = pc.max_element_wise(pc.cast(table.column("num_tokens"), pa.int64()), 1)
        score = pc.divide(logprob, pc.cast(tokens, pa.float64()))
    else:
        raise ValueError(f"unknown filter.score {cfg.score!r}; use sum or mean")
    keys = pa.table({"dataset": pc.cast(table.column("dataset"), pa.string()),
                     "action_class": pc.cast(table.column("action_class"), pa.string()),
                     "score": pc.add(score, 0.0),  # -0.0 → 0.0: Python's sort sees them as a tie
                     "id": pc.cast(table.column("id"), pa.string()), "row": pa.array(np.arange(n))})
    by_class = keys.take(pc.sort_indices(keys, [("dataset", "ascending"), ("action_class", "ascending"),
                                                ("score", "descending"), ("id", "ascending")]))
    rank = _run_position(by_class.column("dataset"), by_class.column("action_class"))
    by_round = by_class.append_column("rank", pa.array(rank))
    by_round = by_round.take(pc.sort_indices(by_round, [("dataset", "ascending"), ("rank", "ascending"),
                                                        ("score", "descending"), ("id", "ascending"),
                                                        ("action_class", "ascending")]))
    taken = _run_position(by_round.column("dataset")) < cfg.budget
    kept = np.zeros(n, dtype=bool)
    kept[by_round.column("row").to_numpy()] = taken
    return pa.array(kept)
