import random
from collections import Counter

import pyarrow as pa
import pytest

from cwm_ray.config import FilterConfig
from cwm_ray.filtering import action_class, select, stratified_top_k, stratified_top_k_mask, triplet_score

CFG = FilterConfig()


@pytest.mark.parametrize("action, cls", [
    ("move the red circle left", "move left"),
    ("put the red circle above the blue square", "put above"),
    ("add a cyan cross to the right of the red circle", "add to right of"),
    ("make the green triangle yellow", "make"),
    ("remove the blue square", "remove"),
    ("Pick up the cup.", "pick up"),
    ("put the cup on the table", "put on"),
])
def test_action_class_default_rule(action: str, cls: str) -> None:
    assert action_class(action, CFG) == cls


def test_action_class_other_rules() -> None:
    assert action_class("move the red circle left", FilterConfig(class_rule="first_word")) == "move"
    assert action_class("Move the red circle LEFT", FilterConfig(class_rule="full")) == "move the red circle left"
    with pytest.raises(ValueError, match="class_rule"):
        action_class("x", FilterConfig(class_rule="pos"))


def test_round_robin_balances_classes_under_the_budget() -> None:
    # 90 confident "move" triplets, 5 "remove", 3 "add": a plain top-K would keep only moves.
    ids = [f"m{i:02d}" for i in range(90)] + [f"r{i}" for i in range(5)] + [f"a{i}" for i in range(3)]
    classes = ["move"] * 90 + ["remove"] * 5 + ["add"] * 3
    scores = [-1.0 - i / 100 for i in range(90)] + [-5.0 - i for i in range(5)] + [-9.0 - i for i in range(3)]
    kept = stratified_top_k(ids, classes, scores, budget=12)
    assert len(kept) == 12
    counts = Counter(k[0] for k in kept)
    assert counts == {"m": 5, "r": 4, "a": 3}  # rounds of 3 until "add" runs out, then 2 classes
    assert kept[:3] == ["m00", "r0", "a0"]  # each round visits the best candidate first
    assert [k for k in kept if k[0] == "m"] == ["m00", "m01", "m02", "m03", "m04"]  # best of each class


def test_budget_larger_than_data_and_ties_are_deterministic() -> None:
    assert sorted(stratified_top_k(["b", "a", "c"], ["x", "x", "y"], [0.0, 0.0, -1.0], budget=10)) == ["a", "b", "c"]
    assert stratified_top_k(["b", "a"], ["x", "x"], [0.0, 0.0], budget=1) == ["a"]  # tie → smaller id
    assert stratified_top_k([], [], [], budget=5) == []


def test_budget_is_per_corpus_and_mean_scoring() -> None:
    rows = [{"id": f"{d}{i}", "dataset": d, "action_class": "move", "logprob": -float(i), "num_tokens": 1}
            for d in ("k", "u") for i in range(10)]
    kept = select(rows, FilterConfig(budget=3))
    assert kept == {"k0", "k1", "k2", "u0", "u1", "u2"}
    assert triplet_score(-6.0, 3, "mean") == -2.0 and triplet_score(-6.0, 3, "sum") == -6.0
    long_but_likely = {"id": "long", "dataset": "d", "action_class": "c", "logprob": -4.0, "num_tokens": 8}
    short = {"id": "short", "dataset": "d", "action_class": "c", "logprob": -3.0, "num_tokens": 2}
    assert select([long_but_likely, short], FilterConfig(budget=1, score="sum")) == {"short"}
    assert select([long_but_likely, short], FilterConfig(budget=1, score="mean")) == {"long"}


@pytest.mark.parametrize(("action", "cls"), [
    ("the man opens the door", "open"),
    ("a person is picking up a cup", "picking up"),
    ("the cup falls off the table", "fall off"),
    ("he pushes the box to the left", "push to left"),
    ("someone closes the drawer", "close"),
    ("the woman in red puts the book on the shelf", "put on"),
    ("open the drawer", "open"),
    ("move the red circle left", "move left"),
])
def test_real_captions_are_classed_by_their_verb_not_their_subject(action: str, cls: str) -> None:
    """Captions describe ("the man opens the door"): their first word is an article, which once made a class
    called `the` of every such action, and the stratified filter then kept one class."""
    assert action_class(action, FilterConfig()) == cls
    assert action_class(action, FilterConfig(class_rule="first_word")) == cls.split()[0]


def _random_rows(rng: random.Random, n: int) -> list[dict[str, object]]:
    """Rows with few corpora and classes, many tied scores (a coarse grid, 0.0 among them) and shuffled ids."""
    ids = [f"{rng.getrandbits(40):010x}" for _ in range(n)]
    return [{"id": rid, "dataset": rng.choice("kuv"), "action_class": rng.choice(["move left", "put", "open", "é"]),
             "logprob": -rng.randrange(0, 6) / 2, "num_tokens": rng.randrange(0, 5)} for rid in ids]


@pytest.mark.parametrize("seed", range(40))
def test_the_arrow_selection_is_the_reference_selection(seed: int) -> None:
    """`stratified_top_k_mask` (finalize's Arrow sorts) keeps exactly the ids `select` keeps, budgets ending
    mid-round, before the first round ends and past the data, under both scores."""
    rng = random.Random(seed)
    rows = _random_rows(rng, rng.randrange(0, 300))
    table = pa.Table.from_pylist(rows, schema=pa.schema([("id", pa.string()), ("dataset", pa.string()),
                                                         ("action_class", pa.string()), ("logprob", pa.float64()),
                                                         ("num_tokens", pa.int64())]))
    for budget in (0, 1, 2, 3, rng.randrange(1, 120), 1000):
        for score in ("sum", "mean"):
            cfg = FilterConfig(budget=budget, score=score)
            mask = stratified_top_k_mask(table, cfg)
            assert set(table.filter(mask).column("id").to_pylist()) == select(rows, cfg), (budget, score)


def test_the_arrow_selection_on_a_hand_made_round() -> None:
    ids = [f"m{i:02d}" for i in range(90)] + [f"r{i}" for i in range(5)] + [f"a{i}" for i in range(3)]
    table = pa.table({"id": ids, "dataset": ["d"] * 98, "action_class": ["move"] * 90 + ["remove"] * 5 + ["add"] * 3,
                      "logprob": [-1.0 - i / 100 for i in range(90)] + [-5.0 - i for i in range(5)]
                      + [-9.0 - i for i in range(3)], "num_tokens": [1] * 98})
    kept = table.filter(stratified_top_k_mask(table, FilterConfig(budget=12))).column("id").to_pylist()
    assert sorted(kept) == sorted(stratified_top_k(ids, table.column("action_class").to_pylist(),
                                                   table.column("logprob").to_pylist(), 12))
