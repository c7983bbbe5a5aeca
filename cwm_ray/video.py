"""PyAV decoding, motion scores, shot cuts and frame choice: one pass over a video, bounded memory.

The paper keeps the top K_f frames by optical-flow magnitude, at least I_f frames apart, and pairs
consecutive kept frames. We choose peaks by non-maximum suppression (a peak is the highest motion
within ±(I_f − 1) frames), keep the K_f best, and form pairs either the paper's way
(`pairing=consecutive`) or around each peak (`pairing=bracket`: the last still frame before the
movement and the first still frame after it, so a pair shows exactly one action).

Two sizes: motion is measured on a small copy of each frame (`frames.motion_size`, cheap flow), while the
frames that become pairs keep the source resolution up to `frames.max_side`, so a real IDM and world model
see them at their own input sizes instead of upscaled thumbnails.

Cost (issue 32): each decoded frame is only made into what frame choice reads, its small motion copy
(grayscale for flow, scaled and converted in one swscale call straight from the decoded picture) and, with
`frames.shot_cuts`, a small colour copy for the cut detector. The stored RGB frame is converted only when a
frame becomes part of a pair (`Frame.rgb`, from the decoded picture the frame keeps): on the toy corpus that is
12 of ~260 frames a video. Each video decodes on `frames.decode_threads` threads (1: decode tasks already run
in parallel, one per video, and FFmpeg's threads within one cost more CPU per frame than they save).

Shot cuts: a hard cut is the largest motion peak a video has, and a pair across it shows two scenes, not an
action. PySceneDetect's `ContentDetector` (HSV differences between consecutive frames) marks each frame that
starts a new shot; that frame's motion is not a peak, and no pair spans it.

Memory: only a ring buffer of the last `max_span + max(I_f, max_span)` frames plus the K_f best candidates are
ever held, each as its decoded picture at most `max_side` on the longer side (YUV 4:2:0 is half the bytes of
the RGB frame it becomes) plus its small motion copy.
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
from av.video.reformatter import VideoReformatter

from cwm_ray.config import FramesConfig


class VideoError(Exception):
    """A video that cannot yield pairs; `kind` becomes the error row's `error_type`."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class Frame:
    """One decoded frame: its motion copy, and its stored RGB frame, converted when first read."""

    __slots__ = ("_picture", "_rgb", "_size", "cut", "index", "motion", "time")

    def __init__(self, index: int, time: float, rgb: np.ndarray | None = None, motion: np.ndarray | None = None,
                 *, picture: av.VideoFrame | None = None, size: tuple[int, int] | None = None,
                 cut: bool = False) -> None:
        if rgb is None and picture is None:
            raise ValueError("a Frame needs its RGB pixels or the decoded picture to make them from")
        self.index = index
        self.time = time
        self._rgb = rgb
        self._picture = picture
        self._size = size
        self.motion = motion
        """The copy motion is measured on (grayscale for flow, RGB for `diff`, at `motion_size`); None = made
        from `rgb` by `choose_pairs` (frames built from arrays, as tests do)."""
        self.cut = cut
        """This frame starts a new shot (a hard cut between it and the frame before)."""

    @property
    def rgb(self) -> np.ndarray:
        """The stored frame: source resolution, longer side at most `frames.max_side`."""
        if self._rgb is None:
            assert self._picture is not None
            w, h = self._size or (self._picture.width, self._picture.height)
            self._rgb = self._picture.to_ndarray(format="rgb24", width=w, height=h)
            self._picture = None
        return self._rgb


def _fit(width: int, height: int, side: int) -> tuple[int, int]:
    """(w, h) scaled down so the longer side is at most `side` (never up), even-sized as codecs like."""
    scale = min(1.0, side / max(width, height))
    return max(2, round(width * scale)), max(2, round(height * scale))


@dataclass
class Pair:
    source: Frame
    target: Frame
    motion: float


class _CutDetector:
    """PySceneDetect's ContentDetector fed the frames this pass already decodes (no second decode).

    `min_scene_len=0`: every frame over the threshold starts a shot at once. PySceneDetect's default (15 frames)
    merges cuts closer than that and reports them later; here a flash (two cuts a few frames apart) should split
    pairs too, since a flash is no action either.
    """

    def __init__(self, threshold: float, rate: float) -> None:
        from scenedetect import FrameTimecode
        from scenedetect.detectors import ContentDetector

        self.detector = ContentDetector(threshold=threshold, min_scene_len=0)
        self.timecode = FrameTimecode
        self.rate = rate

    def __call__(self, index: int, bgr: np.ndarray) -> bool:
        return bool(self.detector.process_frame(self.timecode(index, fps=self.rate), bgr))


def iter_frames(data: bytes, cfg: FramesConfig) -> Iterator[Frame]:
    """Decoded frames at most `cfg.max_side` on the longer side, each with its `cfg.motion_size` copy for
    motion scores (and `cut` set where a shot starts, with `cfg.shot_cuts`); errors become VideoError."""
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
        if cfg.decode_threads == 1:
            stream.codec_context.thread_count = 1
        else:
            stream.thread_type = "AUTO"
            stream.codec_context.thread_count = max(0, cfg.decode_threads)
        rate = float(stream.average_rate or 25)
        cuts = _CutDetector(cfg.cut_threshold, rate) if cfg.shot_cuts else None
        # One swscale context per conversion, kept for the whole video: PyAV's per-frame default (and one reformatter
        # asked for two conversions in turn) builds a new context each call, which cost more than decoding.
        to_small, to_size = VideoReformatter(), VideoReformatter()
        try:
            for i, frame in enumerate(container.decode(stream)):
                if i >= cfg.max_frames:
                    break
                w, h = _fit(frame.width, frame.height, cfg.max_side)
                mw, mh = _fit(w, h, cfg.motion_size)
                # The small copy straight from the decoded picture (scaled and converted in one swscale call, as
                # the stored frame is): what motion and cuts read. At the stored size it is the stored frame's
                # pixels exactly, so the toy corpus (64 px, motion at 64) gets the motion scores it always had.
                small = to_small.reformat(frame, width=mw, height=mh, format="rgb24").to_ndarray()
                # Keep the picture at most max_side: a 4K source's frames would otherwise fill the ring buffer.
                picture = frame if (w, h) == (frame.width, frame.height) else to_size.reformat(frame, width=w, height=h)
                out = Frame(i, float(frame.time) if frame.time is not None else i / rate, None,
                            small if cfg.motion == "diff" else cv2.cvtColor(small, cv2.COLOR_RGB2GRAY),
                            picture=picture, size=(w, h))
                if cuts is not None:
                    out.cut = cuts(i, cv2.cvtColor(small, cv2.COLOR_RGB2BGR))
                yield out
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
        return float(cv2.magnitude(flow[..., 0], flow[..., 1]).mean())
    raise ValueError(f"unknown motion method {method!r}; use farneback or diff")


def _motion_copy(frame: Frame, cfg: FramesConfig) -> np.ndarray:
    """The frame's motion copy; frames built from arrays get one made from their RGB pixels here."""
    if frame.motion is not None:
        return frame.motion
    rgb = frame.rgb
    mw, mh = _fit(rgb.shape[1], rgb.shape[0], cfg.motion_size)
    small = rgb if (mw, mh) == rgb.shape[1::-1] else cv2.resize(rgb, (mw, mh), interpolation=cv2.INTER_AREA)
    # Flow reads luminance; the difference reads colour too (a recolour can keep the brightness).
    return small if cfg.motion == "diff" else cv2.cvtColor(small, cv2.COLOR_RGB2GRAY)


def choose_pairs(frames: Iterator[Frame], cfg: FramesConfig) -> tuple[list[Pair], int]:
    """(pairs, number of frames decoded) for one video, in a single streaming pass."""
    if cfg.pairing not in ("bracket", "consecutive"):
        raise ValueError(f"unknown pairing {cfg.pairing!r}; use bracket or consecutive")
    radius = max(1, cfg.min_spacing) - 1
    delay = max(radius, cfg.max_span if cfg.pairing == "bracket" else 0)
    window: deque[tuple[Frame, float, int]] = deque(maxlen=max(cfg.max_span, radius) + delay + 2)
    best: list[tuple[float, int, Pair, int]] = []  # min-heap of the K_f best peaks so far, with their shots
    prev: np.ndarray | None = None
    count = shot = 0

    def consider(pos: int) -> None:
        frame, m, here = window[pos]
        if m < cfg.min_motion:
            return
        lo = max(0, pos - radius)
        hi = min(len(window), pos + radius + 1)
        # Strictly higher than earlier neighbours, at least as high as later ones: ties go to the first. Only
        # neighbours of the same shot count: an action just after a cut is not the one just before it.
        if (any(window[j][1] >= m and window[j][2] == here for j in range(lo, pos))
                or any(window[j][1] > m and window[j][2] == here for j in range(pos + 1, hi))):
            return
        if cfg.pairing == "bracket":
            # The bracket ends where motion stays below `still` for `still_frames` frames in a row, so one
            # repeated frame inside an action (an encoder's skipped frame in a slow fade) does not split it.
            # It never leaves the peak's shot.
            still, run = cfg.quiet * m, max(1, cfg.still_frames)

            def moving(j: int) -> bool:
                return 0 <= j < len(window) and window[j][1] > still

            s = pos
            while (s > 0 and window[s - 1][2] == here and pos - s < cfg.max_span
                   and any(moving(s - k) for k in range(run))):
                s -= 1
            e = pos
            while (e + 1 < len(window) and window[e + 1][2] == here and e - pos < cfg.max_span
                   and any(moving(e + k) for k in range(1, run + 1))):
                e += 1
            pair = Pair(window[s][0], window[e][0], m)
        else:
            pair = Pair(frame, frame, m)
        item = (m, -frame.index, pair, here)
        if len(best) < cfg.k_frames:
            heapq.heappush(best, item)
        elif item[:2] > best[0][:2]:
            heapq.heapreplace(best, item)

    for frame in frames:
        cur = _motion_copy(frame, cfg)
        if frame.cut:  # the change across a cut is no motion: never a peak, and a new shot starts here
            shot += 1
            m = 0.0
        else:
            m = 0.0 if prev is None else motion_score(prev, cur, cfg.motion)
        prev = cur
        count += 1
        window.append((frame, m, shot))
        if len(window) > delay:  # the frame `delay` back now has every neighbour it needs
            consider(len(window) - 1 - delay)
    if count < cfg.min_frames:
        raise VideoError("TooShort", f"only {count} decodable frames (min_frames={cfg.min_frames})")
    for pos in range(max(0, len(window) - delay), len(window)):  # the tail, with a truncated window
        consider(pos)
    peaks = sorted(((p, s) for _, _, p, s in best), key=lambda ps: ps[0].source.index)
    if cfg.pairing == "consecutive":  # consecutive peaks of one shot: a pair across a cut is no action
        pairs = [Pair(a.source, b.source, min(a.motion, b.motion)) for (a, sa), (b, sb) in pairwise(peaks) if sa == sb]
    else:
        pairs = [p for p, _ in peaks]
    return [p for p in pairs if p.source.index != p.target.index], count
