"""The exact parser (image → scene) and the judge built on it, on the paper's 0–10 scale.

The parser classifies each grid cell independently: foreground = pixels far from the background
colour; colour = nearest palette entry to the median foreground pixel; shape = the template with the
best IoU. Working per cell with medians and IoU makes it robust to H.264 / JPEG ringing and to the
blur of a model's prediction.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from cwm_ray.config import ToyWorldConfig
from cwm_ray.toyworld.render import cell_size, shape_mask
from cwm_ray.toyworld.world import BACKGROUND, COLORS, SHAPES, InvalidAction, Obj, Scene, apply, parse_action

_PALETTE = np.array(list(COLORS.values()), np.float32)
_NAMES = list(COLORS)
FG_DISTANCE = 70.0
"""RGB distance from the background above which a pixel is foreground."""
MIN_FILL = 0.2
"""A cell holds an object when at least this fraction of it is foreground."""


def to_array(image: np.ndarray | Image.Image, cfg: ToyWorldConfig) -> np.ndarray:
    """RGB uint8 at the world's resolution (predictions may come at another size)."""
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    if image.shape[:2] != (cfg.image_size, cfg.image_size):
        image = np.asarray(Image.fromarray(image).resize((cfg.image_size, cfg.image_size), Image.BILINEAR))
    return image


def parse_scene(image: np.ndarray | Image.Image, cfg: ToyWorldConfig) -> Scene:
    img = to_array(image, cfg).astype(np.float32)
    c = cell_size(cfg)
    fg = np.linalg.norm(img - np.array(BACKGROUND, np.float32), axis=-1) > FG_DISTANCE
    templates = {s: shape_mask(s, c) for s in SHAPES}
    objects = []
    for r in range(cfg.grid):
        for col in range(cfg.grid):
            cell_fg = fg[r * c : (r + 1) * c, col * c : (col + 1) * c]
            if cell_fg.mean() < MIN_FILL:
                continue
            pixels = img[r * c : (r + 1) * c, col * c : (col + 1) * c][cell_fg]
            rgb = np.median(pixels, axis=0)
            color = _NAMES[int(np.argmin(np.linalg.norm(_PALETTE - rgb, axis=-1)))]
            ious = {s: (cell_fg & m).sum() / (cell_fg | m).sum() for s, m in templates.items()}
            objects.append(Obj(max(ious, key=ious.__getitem__), color, r, col))
    return Scene(tuple(objects))


@dataclass(frozen=True)
class Verdict:
    """Judge scores on the paper's scale: a sample's score is min(edit_success, minimal_edit)."""

    edit_success: float
    minimal_edit: float
    score: float
    reason: str


def judge_scenes(source: Scene, action_text: str, predicted: Scene, cfg: ToyWorldConfig) -> Verdict:
    """Edit success: did the acted object end exactly where the action puts it (5 = right kind of
    change, wrong result)? Minimal edit: the share of every other object left exactly as it was,
    where any extra object also counts as a change."""
    action = parse_action(action_text)
    if action is None:
        raise ValueError(f"not a toy-world action: {action_text!r}")
    try:
        expected = apply(source, action, cfg)
    except InvalidAction as exc:
        raise ValueError(f"action does not apply to the source scene: {exc}") from None
    before = source.find(action.color, action.shape)
    after = expected.find(action.new_color or action.color, action.shape)
    pred = set(predicted.objects)

    if action.kind == "remove":
        success, why = (10.0, "removed") if predicted.find(action.color, action.shape) is None else (0.0, "still there")
    elif after in pred:
        success, why = 10.0, "exact"
    else:
        got = predicted.find(action.new_color or action.color, action.shape)
        changed = got is not None and (action.kind == "recolor" or got != before)
        success, why = (5.0, "changed, but not exactly as asked") if changed else (0.0, "not done")

    others = [o for o in source.objects if o != before]
    kept = sum(o in pred for o in others)
    allowed = set(others) | {after}
    extra = sum(o not in allowed and (o.color, o.shape) != (action.color, action.shape) for o in predicted.objects)
    denom = len(others) + extra
    minimal = 10.0 if denom == 0 else 10.0 * kept / denom
    return Verdict(success, minimal, min(success, minimal), f"{why}; kept {kept}/{len(others)}, extra {extra}")


def judge(
    source: np.ndarray | Image.Image, action_text: str, predicted: np.ndarray | Image.Image, cfg: ToyWorldConfig
) -> Verdict:
    """Judge a predicted image against the source image and the action: free, exact, no reference."""
    return judge_scenes(parse_scene(source, cfg), action_text, parse_scene(predicted, cfg), cfg)


def explains(
    source: np.ndarray | Image.Image, action_text: str, target: np.ndarray | Image.Image, cfg: ToyWorldConfig
) -> bool:
    """Does `action_text`, executed on the source scene, give exactly the target scene?

    The IDM's accuracy in the toy world. It differs from string equality with the ground-truth action
    only where the world itself is ambiguous: `move the red circle left` and `put the red circle to the
    left of the blue square` can be the same change, and no IDM could tell which one was issued.
    """
    action = parse_action(action_text)
    if action is None:
        return False
    try:
        return apply(parse_scene(source, cfg), action, cfg) == parse_scene(target, cfg)
    except InvalidAction:
        return False
