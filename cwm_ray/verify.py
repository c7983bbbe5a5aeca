"""Best-of-N with the IDM as verifier: the paper's second bootstrap (§Strategy 2).

Sample N futures from the world model, score each with the IDM's log p(action | source, candidate),
keep the most likely. One function does the ranking, so Serve, evaluation and the benchmarks agree on
ties; `best_of_n` is the offline form (one process, both models in hand) that Serve splits across
replicas.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from cwm_ray.idm import InverseDynamicsModel
from cwm_ray.world_model import ImageLike, WorldModel


def rank(scores: Sequence[float] | np.ndarray) -> list[int]:
    """Candidate indices from the highest verifier score down; ties keep sampling order (deterministic)."""
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 1 or not len(s):
        raise ValueError(f"need a non-empty 1-D list of scores, got shape {s.shape}")
    if np.isnan(s).any():
        raise ValueError("verifier scores contain NaN")
    return [int(i) for i in np.argsort(-s, kind="stable")]


@dataclass
class Search:
    """One best-of-N search: every candidate with its score, and the order the verifier put them in."""

    candidates: list[Image.Image]
    scores: list[float]
    order: list[int]

    def best(self, n: int = 1) -> list[Image.Image]:
        return [self.candidates[i] for i in self.order[:n]]


def best_of_n(world_model: WorldModel, idm: InverseDynamicsModel, sources: Sequence[ImageLike],
              actions: Sequence[str], best_of: int, seed: int | Sequence[int] = 0) -> list[Search]:
    """For each (source, action): `best_of` candidates from one batched sampling call, then one batched
    verifier pass per input. best_of = 1 is plain sampling (its score is still reported)."""
    if best_of < 1:
        raise ValueError(f"best_of must be >= 1, got {best_of}")
    out = []
    for source, action, candidates in zip(sources, actions, world_model.sample(sources, actions, best_of, seed),
                                          strict=True):
        scores = idm.score(source, candidates, action).tolist()
        out.append(Search(candidates, scores, rank(scores)))
    return out
