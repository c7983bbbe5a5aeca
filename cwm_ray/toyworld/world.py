"""Scenes, actions and the action grammar of the toy world.

A scene is a few objects (shape x colour) on a grid of cells, one object per cell. Every object is
unique by (colour, shape), so "the red circle" always names exactly one object. Actions are rendered
to language by a template grammar and parsed back exactly, so the toy world is its own free judge.
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace

from cwm_ray.config import ToyWorldConfig

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 50, 47),
    "green": (60, 180, 75),
    "blue": (40, 90, 230),
    "yellow": (240, 210, 40),
    "purple": (150, 60, 200),
    "cyan": (40, 210, 220),
}
SHAPES: tuple[str, ...] = ("square", "circle", "triangle", "cross")
BACKGROUND: tuple[int, int, int] = (28, 28, 28)
KINDS: tuple[str, ...] = ("move", "remove", "add", "recolor", "put")
DIRECTIONS: dict[str, tuple[int, int]] = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}
RELATIONS: dict[str, str] = {"left": "to the left of", "right": "to the right of", "up": "above", "down": "below"}


class InvalidAction(ValueError):
    """The action cannot be applied to this scene (unknown object, occupied or off-board cell)."""


@dataclass(frozen=True, order=True)
class Obj:
    shape: str
    color: str
    row: int
    col: int

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"

    @property
    def cell(self) -> tuple[int, int]:
        return (self.row, self.col)


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "objects", tuple(sorted(self.objects, key=lambda o: (o.row, o.col))))

    def find(self, color: str, shape: str) -> Obj | None:
        return next((o for o in self.objects if o.color == color and o.shape == shape), None)

    def at(self, cell: tuple[int, int]) -> Obj | None:
        return next((o for o in self.objects if o.cell == cell), None)

    def to_dict(self) -> list[dict[str, object]]:
        return [{"shape": o.shape, "color": o.color, "row": o.row, "col": o.col} for o in self.objects]

    @staticmethod
    def from_dict(rows: list[dict[str, object]]) -> Scene:
        return Scene(tuple(Obj(str(r["shape"]), str(r["color"]), int(r["row"]), int(r["col"])) for r in rows))


@dataclass(frozen=True)
class Action:
    """One edit. `color`/`shape` name the acted object (the new one, for `add`).

    `direction` is the move direction, or the side of the reference object for `add` / `put`.
    """

    kind: str
    color: str
    shape: str
    direction: str | None = None
    ref_color: str | None = None
    ref_shape: str | None = None
    new_color: str | None = None

    def text(self) -> str:
        """The canonical sentence for this action (the toy world's action language)."""
        obj = f"{self.color} {self.shape}"
        ref = f"{self.ref_color} {self.ref_shape}"
        if self.kind == "move":
            return f"move the {obj} {self.direction}"
        if self.kind == "remove":
            return f"remove the {obj}"
        if self.kind == "add":
            return f"add a {obj} {RELATIONS[self.direction or '']} the {ref}"
        if self.kind == "recolor":
            return f"make the {obj} {self.new_color}"
        if self.kind == "put":
            return f"put the {obj} {RELATIONS[self.direction or '']} the {ref}"
        raise ValueError(f"unknown action kind {self.kind!r}")


_C = "|".join(COLORS)
_S = "|".join(SHAPES)
_R = "|".join(RELATIONS.values())
_PATTERNS: list[tuple[str, re.Pattern[str]]] = [
    ("move", re.compile(rf"move the ({_C}) ({_S}) (left|right|up|down)")),
    ("remove", re.compile(rf"remove the ({_C}) ({_S})")),
    ("add", re.compile(rf"add an? ({_C}) ({_S}) ({_R}) the ({_C}) ({_S})")),
    ("recolor", re.compile(rf"make the ({_C}) ({_S}) ({_C})")),
    ("put", re.compile(rf"put the ({_C}) ({_S}) ({_R}) the ({_C}) ({_S})")),
]
_REL_TO_DIR = {v: k for k, v in RELATIONS.items()}


def parse_action(text: str) -> Action | None:
    """Exact inverse of `Action.text`; None when the sentence is not in the toy grammar."""
    t = " ".join(text.lower().strip().rstrip(".").split())
    for kind, pat in _PATTERNS:
        m = pat.fullmatch(t)
        if not m:
            continue
        g = m.groups()
        if kind == "move":
            return Action("move", g[0], g[1], direction=g[2])
        if kind == "remove":
            return Action("remove", g[0], g[1])
        if kind == "recolor":
            return Action("recolor", g[0], g[1], new_color=g[2])
        return Action(kind, g[0], g[1], direction=_REL_TO_DIR[g[2]], ref_color=g[3], ref_shape=g[4])
    return None


def _in_board(cell: tuple[int, int], grid: int) -> bool:
    return 0 <= cell[0] < grid and 0 <= cell[1] < grid


def _beside(obj: Obj, direction: str) -> tuple[int, int]:
    dr, dc = DIRECTIONS[direction]
    return (obj.row + dr, obj.col + dc)


def target_cell(scene: Scene, action: Action, cfg: ToyWorldConfig) -> tuple[int, int] | None:
    """Where the acted object ends up (None for `remove`). Raises InvalidAction if impossible."""
    obj = scene.find(action.color, action.shape)
    if action.kind == "add":
        if obj is not None:
            raise InvalidAction(f"there is already a {obj.name}")
    elif obj is None:
        raise InvalidAction(f"there is no {action.color} {action.shape}")
    if action.kind == "remove":
        return None
    if action.kind == "recolor":
        assert obj is not None
        if action.new_color == action.color or scene.find(action.new_color or "", action.shape):
            raise InvalidAction(f"cannot make the {obj.name} {action.new_color}")
        return obj.cell
    if action.kind == "move":
        assert obj is not None
        dr, dc = DIRECTIONS[action.direction or ""]
        cell = (obj.row + dr * cfg.move_cells, obj.col + dc * cfg.move_cells)
    else:  # add, put: beside the reference object
        ref = scene.find(action.ref_color or "", action.ref_shape or "")
        if ref is None:
            raise InvalidAction(f"there is no {action.ref_color} {action.ref_shape}")
        if obj is not None and ref == obj:
            raise InvalidAction("an object cannot be put beside itself")
        cell = _beside(ref, action.direction or "")
    if not _in_board(cell, cfg.grid):
        raise InvalidAction(f"{action.text()!r} leaves the board")
    occupant = scene.at(cell)
    if occupant is not None:
        raise InvalidAction(f"{action.text()!r}: the cell is taken by the {occupant.name}")
    return cell


def apply(scene: Scene, action: Action, cfg: ToyWorldConfig) -> Scene:
    """The exact next scene: the toy world's ground-truth world model."""
    cell = target_cell(scene, action, cfg)
    if action.kind == "add":
        assert cell is not None
        return Scene((*scene.objects, Obj(action.shape, action.color, *cell)))
    obj = scene.find(action.color, action.shape)
    assert obj is not None
    rest = tuple(o for o in scene.objects if o != obj)
    if action.kind == "remove":
        return Scene(rest)
    if action.kind == "recolor":
        return Scene((*rest, replace(obj, color=action.new_color or obj.color)))
    assert cell is not None
    return Scene((*rest, replace(obj, row=cell[0], col=cell[1])))


def random_scene(rng: random.Random, cfg: ToyWorldConfig) -> Scene:
    n = rng.randint(cfg.min_objects, cfg.max_objects)
    kinds = rng.sample([(c, s) for c in COLORS for s in SHAPES], n)
    cells = rng.sample([(r, c) for r in range(cfg.grid) for c in range(cfg.grid)], n)
    return Scene(tuple(Obj(s, c, r, col) for (c, s), (r, col) in zip(kinds, cells, strict=True)))


def _candidates(scene: Scene, kind: str, cfg: ToyWorldConfig) -> list[Action]:
    objs = scene.objects
    out: list[Action] = []
    if kind == "move":
        out = [Action("move", o.color, o.shape, direction=d) for o in objs for d in DIRECTIONS]
    elif kind == "remove" and len(objs) > max(1, cfg.min_objects - 1):
        out = [Action("remove", o.color, o.shape) for o in objs]
    elif kind == "add" and len(objs) < cfg.max_objects + 1:
        new = [(c, s) for c in COLORS for s in SHAPES if scene.find(c, s) is None]
        out = [Action("add", c, s, direction=d, ref_color=r.color, ref_shape=r.shape)
               for c, s in new for r in objs for d in DIRECTIONS]
    elif kind == "recolor":
        out = [Action("recolor", o.color, o.shape, new_color=c) for o in objs for c in COLORS]
    elif kind == "put" and len(objs) >= 2:
        out = [Action("put", o.color, o.shape, direction=d, ref_color=r.color, ref_shape=r.shape)
               for o in objs for r in objs if r != o for d in DIRECTIONS]
    valid = []
    for a in out:
        try:
            target_cell(scene, a, cfg)
        except InvalidAction:
            continue
        valid.append(a)
    return valid


def random_action(
    scene: Scene, rng: random.Random, cfg: ToyWorldConfig, kind_weights: Mapping[str, float] | None = None
) -> Action:
    """A kind (uniform, or by `kind_weights`; among those possible here), then a uniform valid instance of it.

    Kinds are tried in a random order; with weights, the order is a weighted draw without replacement
    (key u^(1/w), Efraimidis–Spirakis), so a kind's chance to come first is its share of the weights.
    Kinds missing from `kind_weights` weigh 1. Without weights the order is `rng.shuffle`'s, as before.
    """
    unknown = set(cfg.actions) - set(KINDS)
    if unknown:
        raise ValueError(f"unknown action kinds {sorted(unknown)}; known: {list(KINDS)}")
    kinds = list(cfg.actions)
    if kind_weights:
        check_kind_weights(kind_weights)
        keys = {k: rng.random() ** (1.0 / float(kind_weights.get(k, 1.0))) for k in kinds}
        kinds.sort(key=lambda k: keys[k], reverse=True)
    else:
        rng.shuffle(kinds)
    for kind in kinds:
        cands = _candidates(scene, kind, cfg)
        if cands:
            return rng.choice(cands)
    raise InvalidAction("no action of the configured kinds applies to this scene")


def near_misses(scene: Scene, action: Action, cfg: ToyWorldConfig) -> dict[str, Scene]:
    """Scenes a best-of-N verifier must rank below `apply(scene, action)`: what a world model nearly right makes.

    - `wrong_object`: the same kind of edit on another object (for `add`, a new object of another shape), with
      the action's own direction, reference and colour when they apply, else the first that does;
    - `wrong_colour`: the edit done, but the acted object in another colour (for `remove`, left in place recoloured;
      for `recolor`, the wrong new colour);
    - `unchanged`: the scene as it was (a copy of the source).
    Each is a valid scene of the world, different from the true target.
    """
    target = apply(scene, action, cfg)
    if action.kind == "add":  # another shape: the same shape in another colour is `wrong_colour`
        options = [replace(action, color=c, shape=s) for s in SHAPES for c in COLORS
                   if scene.find(c, s) is None and s != action.shape]
    else:
        others = [replace(action, color=o.color, shape=o.shape) for o in scene.objects
                  if (o.color, o.shape) != (action.color, action.shape)]
        options = others + [replace(a, direction=d if a.direction else None, new_color=c if a.new_color else None,
                                    ref_color=r.color if a.ref_color else None,
                                    ref_shape=r.shape if a.ref_shape else None)
                            for a in others for d in DIRECTIONS for c in COLORS for r in scene.objects]
    wrong_object = None
    for option in options:
        try:
            wrong_object = apply(scene, option, cfg)
        except InvalidAction:
            continue
        if wrong_object != target:
            break
    if wrong_object is None or wrong_object == target:
        raise InvalidAction(f"no other object to {action.kind} in this scene")
    after = scene if action.kind == "remove" else target
    colour = (action.new_color if action.kind == "recolor" else action.color) or action.color
    acted = after.find(colour, action.shape)
    assert acted is not None
    other = next(c for c in COLORS if c not in (colour, action.color) and after.find(c, action.shape) is None)
    wrong_colour = Scene((*(o for o in after.objects if o != acted), replace(acted, color=other)))
    return {"wrong_object": wrong_object, "wrong_colour": wrong_colour, "unchanged": scene}


def check_kind_weights(kind_weights: Mapping[str, float]) -> None:
    """Weights name known kinds and are positive; anything else is a config error, said plainly."""
    unknown = set(kind_weights) - set(KINDS)
    if unknown:
        raise ValueError(f"kind weights for unknown action kinds {sorted(unknown)}; known: {list(KINDS)}")
    bad = {k: w for k, w in kind_weights.items() if not float(w) > 0}
    if bad:
        raise ValueError(f"kind weights must be > 0, got {bad}")
