"""Rendering scenes to RGB arrays, and actions to smooth multi-frame animations."""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

from cwm_ray.config import ToyWorldConfig
from cwm_ray.toyworld.world import BACKGROUND, COLORS, SHAPES, Action, Obj, Scene, apply


def cell_size(cfg: ToyWorldConfig) -> int:
    if cfg.image_size % cfg.grid:
        raise ValueError(f"image_size {cfg.image_size} must be a multiple of grid {cfg.grid}")
    return cfg.image_size // cfg.grid


@lru_cache(maxsize=64)
def shape_mask(shape: str, c: int) -> np.ndarray:
    """Boolean c x c mask of `shape` in a cell; a margin keeps neighbours apart after compression."""
    m = max(1, c // 8)
    yy, xx = np.mgrid[0:c, 0:c] + 0.5
    inner = (yy >= m) & (yy <= c - m) & (xx >= m) & (xx <= c - m)
    centre, half = c / 2, (c - 2 * m) / 2
    if shape == "square":
        return inner
    if shape == "circle":
        return (yy - centre) ** 2 + (xx - centre) ** 2 <= half**2 + 0.5
    if shape == "triangle":  # apex up: the half-width grows linearly from top to bottom
        frac = (yy - m) / (c - 2 * m)
        return inner & (np.abs(xx - centre) <= frac * half + 0.25)
    if shape == "cross":
        t = max(1.0, (c - 2 * m) / 6)
        return inner & ((np.abs(xx - centre) <= t) | (np.abs(yy - centre) <= t))
    raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")


def _draw(img: np.ndarray, shape: str, rgb: np.ndarray, y: int, x: int, alpha: float, c: int) -> None:
    mask = shape_mask(shape, c)
    region = img[y : y + c, x : x + c]
    mask = mask[: region.shape[0], : region.shape[1]]
    region[mask] = (alpha * rgb + (1 - alpha) * region[mask]).round()


def render(scene: Scene, cfg: ToyWorldConfig) -> np.ndarray:
    """The scene as an H x W x 3 uint8 image."""
    c = cell_size(cfg)
    img = np.empty((cfg.image_size, cfg.image_size, 3), np.float32)
    img[:] = BACKGROUND
    for o in scene.objects:
        _draw(img, o.shape, np.array(COLORS[o.color], np.float32), o.row * c, o.col * c, 1.0, c)
    return img.astype(np.uint8)


def _ease(t: float) -> float:
    return 0.5 - 0.5 * math.cos(math.pi * t)


def animate(scene: Scene, action: Action, cfg: ToyWorldConfig, frames: int | None = None) -> list[np.ndarray]:
    """`frames` images that take `scene` smoothly to `apply(scene, action)`; the last one is exact.

    Moves slide (eased), `remove` fades out, `add` fades in, `recolor` blends colours. The acted
    object is drawn on top, so it may pass over others while sliding.
    """
    frames = frames or cfg.frames_per_action
    after = apply(scene, action, cfg)
    c = cell_size(cfg)
    if action.kind == "add":
        moving = Obj(action.shape, action.color, -1, -1)
        still = scene
    else:
        found = scene.find(action.color, action.shape)
        assert found is not None
        moving = found
        still = Scene(tuple(o for o in scene.objects if o != found))
    base = render(still, cfg).astype(np.float32)
    end = after.find(action.new_color or action.color, action.shape)
    out = []
    for i in range(1, frames + 1):
        s = _ease(i / frames)
        img = base.copy()
        if action.kind == "remove":
            _draw(img, moving.shape, np.array(COLORS[moving.color], np.float32), moving.row * c,
                  moving.col * c, 1 - s, c)
        elif action.kind == "add":
            assert end is not None
            _draw(img, end.shape, np.array(COLORS[end.color], np.float32), end.row * c, end.col * c, s, c)
        elif action.kind == "recolor":
            rgb = (1 - s) * np.array(COLORS[moving.color], np.float32) + s * np.array(
                COLORS[action.new_color or moving.color], np.float32)
            _draw(img, moving.shape, rgb, moving.row * c, moving.col * c, 1.0, c)
        else:  # move, put
            assert end is not None
            y = round((1 - s) * moving.row * c + s * end.row * c)
            x = round((1 - s) * moving.col * c + s * end.col * c)
            _draw(img, moving.shape, np.array(COLORS[moving.color], np.float32), y, x, 1.0, c)
        out.append(img.astype(np.uint8))
    if not np.array_equal(out[-1], render(after, cfg)):
        # Only happens if drawing order differs from render(); keep the last frame exact.
        out[-1] = render(after, cfg)
    return out
