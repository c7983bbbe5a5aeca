"""PyAV decoding, motion scores and frame choice: one pass over a video, bounded memory.

The paper keeps the top K_f frames by optical-flow magnitude, at least I_f frames apart, and pairs
consecutive kept frames. We choose peaks by non-maximum suppression (a peak is the highest motion
within ±(I_f − 1) frames), keep the K_f best, and form pairs either the paper's way
(`pairing=consecutive`) or around each peak (`pairing=bracket`: the last still frame before the
movement and the first still frame after it, so a pair shows exactly one action).

Two sizes: motion is measured on a small copy of each frame (`frames.motion_size`, cheap flow), while the
frames that become pairs keep the source resolution up to `frames.max_side`, so a real IDM and world model
see them at their own input sizes instead of upscaled thumbnails.

Memory: frames are downscaled as they are decoded, and only a ring buffer of the last
`max_span + max(I_f, max_span)` frames plus the K_f best candidates are ever held.
"""

from __future__ import annotations

import heapq
import io
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import pairwise

import av
import cv2
import numpy as np

from cwm_ray.config import FramesConfig


class VideoError(Exception):
    """A video that cannot yield pairs; `kind` becomes the error row's `error_type`."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass
class Frame:
    index: int
    time: float
    rgb: np.ndarray
    """The stored frame: source resolution, longer side at most `frames.max_side`."""
    small: np.ndarray | None = None
    """The motion-analysis copy (longer side `frames.motion_size`); None = `rgb` itself."""

    @property
    def motion_rgb(self) -> np.ndarray:
        return self.rgb if self.small is None else self.small


def _fit(width: int, height: int, side: int) -> tuple[int, int]:
    """(w, h) scaled down so the longer side is at most `side` (never up), even-sized as codecs like."""
    scale = min(1.0, side / max(width, height))
    return max(2, round(width * scale)), max(2, round(height * scale))


@dataclass
class Pair:
    source: Frame
    target: Frame
    motion: float


def iter_frames(data: bytes, cfg: FramesConfig) -> Iterator[Frame]:
    """Decoded frames at most `cfg.max_side` on the longer side, each with its `cfg.motion_size` copy for
    motion scores; errors become VideoError."""
    if not data:
        raise VideoError("EmptyFile", "the file is empty (0 bytes)")
    try:
        container = av.open(io.BytesIO(data), mode="r")
    except (av.error.FFmpegError, ValueError) as exc:
        raise VideoError("NotAVideo", f"cannot open as a video container: {exc}") from None
    with container:
        if not container.streams.video:
            raise VideoError("NoVideoStream", "the container has no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        rate = float(stream.average_rate or 25)
        try:
            for i, frame in enumerate(container.decode(stream)):
                if i >= cfg.max_frames:
                    break
                w, h = _fit(frame.width, frame.height, cfg.max_side)
                rgb = frame.to_ndarray(format="rgb24", width=w, height=h)
                mw, mh = _fit(w, h, cfg.motion_size)
                small = None if (mw, mh) == (w, h) else cv2.resize(rgb, (mw, mh), interpolation=cv2.INTER_AREA)
                yield Frame(i, float(frame.time) if frame.time is not None else i / rate, rgb, small)
        except av.error.FFmpegError as exc:
            raise VideoError("CorruptVideo", f"decoding failed: {exc}") from None


def motion_score(prev: np.ndarray, cur: np.ndarray, method: str) -> float:
    """How much changed between two frames: mean dense-flow magnitude (pixels) between grayscale frames, or
    mean |difference| over every channel given (RGB, so a change of hue at equal brightness still counts).
    `choose_pairs` gives each method its frames (`cfg.motion == "diff"`: RGB; else grayscale)."""
    if method == "diff":
        return float(np.abs(cur.astype(np.float32) - prev.astype(np.float32)).mean())
    if method == "farneback":
        if np.array_equal(prev, cur):  # exactly still: the flow is zero (the solver returns ~1e-3 noise)
            return 0.0
        flow = cv2.calcOpticalFlowFarneback(prev, cur, None, 0.5, 3, 9, 3, 5, 1.1, 0)
        return float(np.linalg.norm(flow, axis=-1).mean())
    raise ValueError(f"unknown motion method {method!r}; use farneback or diff")


def choose_pairs(frames: Iterator[Frame], cfg: FramesConfig) -> tuple[list[Pair], int]:
    """(pairs, number of frames decoded) for one video, in a single streaming pass."""
    if cfg.pairing not in ("bracket", "consecutive"):
        raise ValueError(f"unknown pairing {cfg.pairing!r}; use bracket or consecutive")
    radius = max(1, cfg.min_spacing) - 1
    delay = max(radius, cfg.max_span if cfg.pairing == "bracket" else 0)
    window: deque[tuple[Frame, float]] = deque(maxlen=max(cfg.max_span, radius) + delay + 2)
    best: list[tuple[float, int, Pair]] = []  # min-heap of the K_f best peaks so far
    prev: np.ndarray | None = None
    count = 0

    def consider(pos: int) -> None:
        frame, m = window[pos]
        if m < cfg.min_motion:
            return
        lo = max(0, pos - radius)
        hi = min(len(window), pos + radius + 1)
        # Strictly higher than earlier neighbours, at least as high as later ones: ties go to the first.
        if any(window[j][1] >= m for j in range(lo, pos)) or any(window[j][1] > m for j in range(pos + 1, hi)):
            return
        if cfg.pairing == "bracket":
            # The bracket ends where motion stays below `still` for `still_frames` frames in a row, so one
            # repeated frame inside an action (an encoder's skipped frame in a slow fade) does not split it.
            still, run = cfg.quiet * m, max(1, cfg.still_frames)

            def moving(j: int) -> bool:
                return 0 <= j < len(window) and window[j][1] > still

            s = pos
            while s > 0 and pos - s < cfg.max_span and any(moving(s - k) for k in range(run)):
                s -= 1
            e = pos
            while e + 1 < len(window) and e - pos < cfg.max_span and any(moving(e + k) for k in range(1, run + 1)):
                e += 1
            pair = Pair(window[s][0], window[e][0], m)
        else:
            pair = Pair(frame, frame, m)
        item = (m, -frame.index, pair)
        if len(best) < cfg.k_frames:
            heapq.heappush(best, item)
        elif item[:2] > best[0][:2]:
            heapq.heapreplace(best, item)

    for frame in frames:
        # Flow reads luminance; the difference reads colour too (a recolour can keep the brightness).
        rgb = frame.motion_rgb
        cur = rgb if cfg.motion == "diff" else cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
        m = 0.0 if prev is None else motion_score(prev, cur, cfg.motion)
        prev = cur
        count += 1
        window.append((frame, m))
        if len(window) > delay:  # the frame `delay` back now has every neighbour it needs
            consider(len(window) - 1 - delay)
    if count < cfg.min_frames:
        raise VideoError("TooShort", f"only {count} decodable frames (min_frames={cfg.min_frames})")
    for pos in range(max(0, len(window) - delay), len(window)):  # the tail, with a truncated window
        consider(pos)
    peaks = sorted((p for _, _, p in best), key=lambda p: p.source.index)
    if cfg.pairing == "consecutive":
        peaks = [Pair(a.source, b.source, min(a.motion, b.motion)) for a, b in pairwise(peaks)]
    return [p for p in peaks if p.source.index != p.target.index], count
