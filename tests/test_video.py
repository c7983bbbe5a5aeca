import dataclasses
import io
import json
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from cwm_ray.config import FramesConfig, ToyCorpusConfig, ToyWorldConfig
from cwm_ray.toyworld.corpus import encode_mp4, make_corpus
from cwm_ray.toyworld.parser import parse_scene
from cwm_ray.toyworld.render import render
from cwm_ray.toyworld.world import Obj, Scene
from cwm_ray.video import Frame, VideoError, choose_pairs, iter_frames

WORLD = ToyWorldConfig()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("videos")
    make_corpus(ToyCorpusConfig(output=str(out), num_videos=6, actions_per_video=6, num_train=0, num_test=0))
    return out


@pytest.mark.parametrize("motion", ["farneback", "diff"])
def test_bracket_pairs_fall_inside_ground_truth_segments(corpus: Path, motion: str) -> None:
    cfg = FramesConfig(motion=motion)
    exact = total = 0
    for gt_path in sorted((corpus / "ground_truth").glob("*.json")):
        gt = json.loads(gt_path.read_text())
        pairs, n = choose_pairs(iter_frames((corpus / gt["video"]).read_bytes(), cfg), cfg)
        assert n == gt["num_frames"]
        assert 0 < len(pairs) <= cfg.k_frames
        for p in pairs:
            assert p.source.index < p.target.index
            # The pair lies within one segment: source shows the scene before it, target the scene after.
            seg = next(s for s in gt["segments"] if s["start_frame"] - cfg.max_span <= p.source.index <= s["end_frame"])
            assert p.target.index <= seg["end_frame"] + cfg.max_span
            total += 1
            exact += (parse_scene(p.source.rgb, WORLD) == Scene.from_dict(seg["scene_before"])
                      and parse_scene(p.target.rgb, WORLD) == Scene.from_dict(seg["scene_after"]))
    assert exact / total >= 0.95, (exact, total)


def _single_action_share(corpus: Path, cfg: FramesConfig) -> tuple[int, int]:
    """(pairs whose source is the scene before one ground-truth action and target the scene after it, pairs)."""
    one = total = 0
    for gt_path in sorted((corpus / "ground_truth").glob("*.json")):
        gt = json.loads(gt_path.read_text())
        pairs, _ = choose_pairs(iter_frames((corpus / gt["video"]).read_bytes(), cfg), cfg)
        for p in pairs:
            before, after = parse_scene(p.source.rgb, WORLD), parse_scene(p.target.rgb, WORLD)
            total += 1
            one += any(before == Scene.from_dict(s["scene_before"]) and after == Scene.from_dict(s["scene_after"])
                       for s in gt["segments"])
    return one, total


def test_bracket_is_the_default_because_consecutive_peaks_straddle_actions(corpus: Path) -> None:
    """docs/annotation.md's measurement: on this corpus (6 videos x 6 actions) `bracket` gave 31/31 pairs that
    show exactly one action, the paper's `consecutive` 2/25 (its frames are motion peaks, mid-movement, and a
    pair spans the end of one action and the middle of the next)."""
    assert FramesConfig().pairing == "bracket"
    one, total = _single_action_share(corpus, FramesConfig(pairing="bracket"))
    assert one / total >= 0.95, (one, total)
    one, total = _single_action_share(corpus, FramesConfig(pairing="consecutive"))
    assert total > 0 and one / total <= 0.25, (one, total)


def test_peaks_respect_k_and_spacing_in_consecutive_mode(corpus: Path) -> None:
    cfg = FramesConfig(pairing="consecutive", k_frames=4, min_spacing=20)
    data = (corpus / "videos" / "toy_00000.mp4").read_bytes()
    pairs, _ = choose_pairs(iter_frames(data, cfg), cfg)
    assert len(pairs) == 3  # 4 peaks → 3 consecutive pairs
    idx = [pairs[0].source.index] + [p.target.index for p in pairs]
    assert all(b - a >= 20 for a, b in zip(idx, idx[1:], strict=False))


def test_stored_frames_are_capped_by_max_side_and_motion_runs_on_a_small_copy(corpus: Path) -> None:
    data = (corpus / "videos" / "toy_00001.mp4").read_bytes()
    frame = next(iter_frames(data, FramesConfig(motion_size=16, max_side=32)))
    # The ring buffer holds decoded pictures scaled to max_side, never the source's: memory stays bounded.
    assert (frame._picture.width, frame._picture.height) == (32, 32)
    assert frame.rgb.shape == (32, 32, 3) and frame.motion is not None and frame.motion.shape == (16, 16)
    assert next(iter_frames(data, FramesConfig(motion_size=16, motion="diff"))).motion.shape == (16, 16, 3)
    # Never upscaled: a 64 px video stays 64 px under the default 512 cap.
    frame = next(iter_frames(data, FramesConfig(motion_size=128, max_side=512)))
    assert frame.rgb.shape == (64, 64, 3) and frame.motion.shape == (64, 64)


def _full_rgb_frames(data: bytes) -> Iterator[Frame]:
    """Every frame converted to RGB, the way decoding worked before issue 32 (motion copies made from the RGB)."""
    import av

    with av.open(io.BytesIO(data)) as container:
        for i, frame in enumerate(container.decode(video=0)):
            yield Frame(i, float(frame.time), frame.to_ndarray(format="rgb24"))


@pytest.mark.parametrize("motion", ["farneback", "diff"])
def test_the_cheap_decode_path_chooses_the_frames_full_rgb_decoding_chose(corpus: Path, motion: str) -> None:
    """Issue 32: frames are no longer all converted to RGB (only the pairs' frames are, from the decoded pictures
    the ring buffer keeps), the motion copy is scaled straight from the decoded picture, FFmpeg decodes on one
    thread, and shot cuts are detected: on the toy corpus the pairs and their pixels are the same as before."""
    cfg = FramesConfig(motion=motion)
    assert cfg.shot_cuts and cfg.decode_threads == 1
    for video in sorted((corpus / "videos").glob("*.mp4")):
        data = video.read_bytes()
        frames = list(iter_frames(data, cfg))
        assert not any(f.cut for f in frames)  # the toy world has no cuts
        fast, n = choose_pairs(iter(frames), cfg)
        if motion == "farneback":  # frame choice converts nothing to RGB (`diff` compares the RGB frames)
            assert all(f._rgb is None for f in frames)
        slow, _ = choose_pairs(_full_rgb_frames(data), dataclasses.replace(cfg, shot_cuts=False))
        assert [(p.source.index, p.target.index) for p in fast] == [(p.source.index, p.target.index) for p in slow]
        for a, b in zip(fast, slow, strict=True):
            assert np.array_equal(a.source.rgb, b.source.rgb) and np.array_equal(a.target.rgb, b.target.rgb)
        if motion == "farneback":  # reading the pairs converted their frames and no others
            assert sum(f._rgb is not None for f in frames) == len({f.index for p in fast for f in (p.source, p.target)})


def _synthetic(n: int) -> Iterator[Frame]:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
    for i in range(n):
        img = base.copy()
        if i % 50 < 5:  # a burst of motion every 50 frames
            img = np.roll(img, i % 50 + 1, axis=1)
        yield Frame(i, i / 10, img)


def test_memory_stays_bounded_on_long_videos() -> None:
    cfg = FramesConfig(motion="diff")
    tracemalloc.start()
    pairs, n = choose_pairs(_synthetic(3000), cfg)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert n == 3000 and len(pairs) == cfg.k_frames
    assert peak < 0.1 * 3000 * 64 * 64 * 3  # far less than holding every frame


def _bad_inputs(corpus: Path) -> dict[str, bytes]:
    good = (corpus / "videos" / "toy_00002.mp4").read_bytes()
    return {
        "EmptyFile": b"",
        "NotAVideo": b"this is a text file, not a video\n" * 20,
        "truncated": good[: len(good) // 2],
        "corrupt": good[:48] + bytes(np.random.default_rng(1).integers(0, 255, len(good) - 48, dtype=np.uint8)),
        "TooShort": encode_mp4([np.zeros((64, 64, 3), np.uint8)] * 3, fps=10),
    }


def test_every_kind_of_bad_input_is_a_clear_video_error(corpus: Path) -> None:
    cfg = FramesConfig()
    for name, data in _bad_inputs(corpus).items():
        with pytest.raises(VideoError) as info:
            choose_pairs(iter_frames(data, cfg), cfg)
        assert info.value.kind and str(info.value), name
        if name in ("EmptyFile", "NotAVideo", "TooShort"):
            assert info.value.kind == name


def test_unknown_options_are_errors(corpus: Path) -> None:
    data = (corpus / "videos" / "toy_00000.mp4").read_bytes()
    with pytest.raises(ValueError, match="pairing"):
        choose_pairs(iter_frames(data, FramesConfig()), FramesConfig(pairing="random"))
    with pytest.raises(ValueError, match="motion"):
        choose_pairs(iter_frames(data, FramesConfig()), FramesConfig(motion="raft"))


def test_still_frames_have_zero_flow_and_moving_ones_do_not() -> None:
    import cv2

    from cwm_ray.video import motion_score

    world = ToyWorldConfig()
    a = cv2.cvtColor(render(Scene((Obj("circle", "red", 2, 2),)), world), cv2.COLOR_RGB2GRAY)
    b = cv2.cvtColor(render(Scene((Obj("circle", "red", 2, 3),)), world), cv2.COLOR_RGB2GRAY)
    assert motion_score(a, a.copy(), "farneback") == 0.0  # skipped: identical frames cannot have moved
    assert motion_score(a, b, "farneback") > 0.1
    assert motion_score(a, b, "diff") > 0.0 == motion_score(a, a, "diff")


def test_one_repeated_frame_inside_an_action_does_not_cut_the_bracket_short() -> None:
    """An encoder may repeat a frame mid-fade; the pair must still span the whole action."""
    def frames() -> Iterator[Frame]:
        levels = [0] * 30 + [60, 80, 80, 100, 120, 140, 160] + [160] * 30  # frame 32 repeats frame 31
        for i, v in enumerate(levels):
            img = np.zeros((64, 64, 3), np.uint8)
            img[16:48, 16:48] = v
            yield Frame(i, i / 10, img)

    for run, expected in ((2, (29, 36)), (1, (29, 31))):
        cfg = FramesConfig(motion="diff", k_frames=1, still_frames=run)
        (pair,), _ = choose_pairs(frames(), cfg)
        assert (pair.source.index, pair.target.index) == expected, run


def _shot(seed: int, n: int, move_at: int, colour: tuple[int, int, int]) -> list[np.ndarray]:
    """`n` frames of one camera set-up: a smooth random background, and a square that slides 32 px right over 8
    frames from `move_at` (one action)."""
    import cv2

    rng = np.random.default_rng(seed)
    background = cv2.resize(rng.integers(0, 255, (6, 6, 3), dtype=np.uint8), (96, 96), interpolation=cv2.INTER_CUBIC)
    frames = []
    for i in range(n):
        img = background.copy()
        x = 20 + 4 * min(max(i - move_at, 0), 8)
        cv2.rectangle(img, (x, 40), (x + 16, 56), colour, -1)
        frames.append(img)
    return frames


@pytest.fixture(scope="module")
def cut_video() -> bytes:
    """H.264 (PyAV, yuv420p): a hard cut at frame 40 between two shots, each with one action touching the cut (the
    square of shot A slides over frames 33-39, that of shot B over frames 41-48)."""
    return encode_mp4(_shot(1, 40, 32, (255, 255, 255)) + _shot(2, 40, 0, (0, 0, 0)), fps=10)


def test_no_pair_spans_a_hard_cut_although_the_cut_is_the_biggest_motion_peak(cut_video: bytes) -> None:
    """Issue 33: a hard cut is the largest motion peak a video has, so without cut detection it becomes a pair
    showing two scenes. PySceneDetect's ContentDetector, fed the frames already decoded, marks frame 40; the cut's
    motion is no peak, no pair spans it in either pairing, and each shot's action makes its own pair."""
    from cwm_ray.video import motion_score

    plain = FramesConfig(shot_cuts=False, k_frames=2)
    frames = list(iter_frames(cut_video, plain))
    motion = [motion_score(a.motion, b.motion, "farneback") for a, b in zip(frames, frames[1:], strict=False)]
    assert int(np.argmax(motion)) + 1 == 40 and max(motion) > 10 * sorted(motion)[-2]
    pairs, _ = choose_pairs(iter(frames), plain)
    assert any(p.source.index < 40 <= p.target.index for p in pairs)  # what cut detection is for

    cfg = FramesConfig(k_frames=2)
    assert [f.index for f in iter_frames(cut_video, cfg) if f.cut] == [40]
    pairs, _ = choose_pairs(iter_frames(cut_video, cfg), cfg)
    # Each bracket stops at the cut, though the motion goes on right across it; neither peak is the cut's.
    assert [(p.source.index, p.target.index) for p in pairs] == [(32, 39), (40, 48)]
    assert all(p.motion < max(motion) / 10 for p in pairs)
    consecutive = dataclasses.replace(cfg, pairing="consecutive", k_frames=3, min_spacing=3)
    pairs, _ = choose_pairs(iter_frames(cut_video, consecutive), consecutive)
    assert pairs and not any(p.source.index < 40 <= p.target.index for p in pairs)
