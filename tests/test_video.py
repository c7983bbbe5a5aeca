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
    assert frame.rgb.shape == (32, 32, 3) and frame.motion_rgb.shape == (16, 16, 3)
    # Never upscaled: a 64 px video stays 64 px under the default 512 cap.
    frame = next(iter_frames(data, FramesConfig(motion_size=128, max_side=512)))
    assert frame.rgb.shape == (64, 64, 3) and frame.small is None


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
