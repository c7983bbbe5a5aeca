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

from cwm_ray.config import FilterConfig

_WORD = re.compile(r"[a-z]+(?:'[a-z]+)?")


def action_class(action: str, cfg: FilterConfig) -> str:
    """The class an action is balanced under: its verb phrase with the object words removed.

    "move the red circle left" → "move left"; "put the red circle above the blue square" → "put above";
    "make the green triangle yellow" → "make"; "pick up the cup" → "pick up".
    """
    words = _WORD.findall(action.lower())
    if not words:
        return ""
    if cfg.class_rule == "full":
        return " ".join(words)
    if cfg.class_rule == "first_word":
        return words[0]
    if cfg.class_rule == "verb_phrase":
        keep = set(cfg.keep_words)
        return " ".join([words[0], *(w for w in words[1:] if w in keep)])
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
