import io
import json
import random
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from cwm_ray import storage
from cwm_ray.config import ToyCorpusConfig, ToyWorldConfig
from cwm_ray.toyworld.corpus import ground_truth_action, make_corpus, make_pretraining_gold, make_video
from cwm_ray.toyworld.parser import judge, parse_scene
from cwm_ray.toyworld.render import animate, render
from cwm_ray.toyworld.world import (
    KINDS,
    Action,
    InvalidAction,
    Obj,
    Scene,
    apply,
    parse_action,
    random_action,
    random_scene,
)

CFG = ToyWorldConfig()


def small_corpus(output: str, **kw: object) -> ToyCorpusConfig:
    return ToyCorpusConfig(output=output, num_videos=4, actions_per_video=5, num_train=40, num_test=20, **kw)


def test_grammar_round_trips_every_kind() -> None:
    rng = random.Random(1)
    seen = set()
    for _ in range(300):
        scene = random_scene(rng, CFG)
        action = random_action(scene, rng, CFG)
        assert parse_action(action.text()) == action
        assert parse_action(action.text().upper() + ".") == action  # case / punctuation tolerant
        seen.add(action.kind)
    assert seen == set(KINDS)
    assert parse_action("dance the red circle") is None


def test_apply_semantics_and_invalid_actions() -> None:
    scene = Scene((Obj("circle", "red", 3, 3), Obj("square", "blue", 3, 1)))
    assert apply(scene, parse_action("move the red circle right"), CFG).find("red", "circle").cell == (3, 5)
    put = apply(scene, parse_action("put the red circle above the blue square"), CFG)
    assert put.find("red", "circle").cell == (2, 1)
    assert apply(scene, parse_action("remove the blue square"), CFG).find("blue", "square") is None
    assert apply(scene, parse_action("make the red circle green"), CFG).find("green", "circle").cell == (3, 3)
    assert apply(scene, parse_action("add a cyan cross below the red circle"), CFG).find("cyan", "cross").cell == (4, 3)
    with pytest.raises(InvalidAction, match="taken"):  # two cells left of (3,3) is the blue square
        apply(scene, parse_action("move the red circle left"), CFG)
    with pytest.raises(InvalidAction, match="no yellow"):
        apply(scene, Action("remove", "yellow", "cross"), CFG)
    with pytest.raises(InvalidAction, match="leaves the board"):
        apply(Scene((Obj("circle", "red", 0, 0),)), parse_action("move the red circle up"), CFG)


def test_scenes_and_renders_are_deterministic() -> None:
    a = [random_scene(random.Random(5), CFG) for _ in range(2)]
    assert a[0] == a[1]
    assert np.array_equal(render(a[0], CFG), render(a[1], CFG))
    assert random_scene(random.Random(6), CFG) != a[0]


def test_animation_is_smooth_and_ends_exactly_at_target() -> None:
    rng = random.Random(3)
    for _ in range(40):
        scene = random_scene(rng, CFG)
        action = random_action(scene, rng, CFG)
        frames = animate(scene, action, CFG)
        assert len(frames) == CFG.frames_per_action
        assert np.array_equal(frames[-1], render(apply(scene, action, CFG), CFG))
        start, end = render(scene, CFG), frames[-1]
        # Smooth, not a cut: at least half the frames are in-between states, all distinct.
        between = [f.tobytes() for f in frames if not np.array_equal(f, start) and not np.array_equal(f, end)]
        assert len(set(between)) == len(between) >= len(frames) // 2, action.text()


def test_corpus_is_deterministic(tmp_path: Path) -> None:
    make_corpus(small_corpus(str(tmp_path / "a")))
    make_corpus(small_corpus(str(tmp_path / "b")))
    for rel in ["videos/toy_00002.mp4", "gold/train.json", "gold/images/test_000007_tgt.png",
                "ground_truth/toy_00001.json"]:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    make_corpus(small_corpus(str(tmp_path / "c"), seed=1))
    assert (tmp_path / "a/gold/train.json").read_bytes() != (tmp_path / "c/gold/train.json").read_bytes()


def test_pretraining_gold_uses_none_of_the_corpus_scenes_and_every_action_kind(tmp_path: Path) -> None:
    """Issue 36: the fine-tuned rows start from a world model pretrained on scenes the table never uses, so it is
    not judged on scenes it memorised. Compared by the rendered images the jobs read, not by the scene objects."""
    cfg = small_corpus(str(tmp_path / "corpus"))
    make_corpus(cfg)
    summary = make_pretraining_gold(cfg, str(tmp_path / "pretrain"), 300)
    gold = tmp_path / "pretrain" / "gold"
    items = json.loads((gold / "train.json").read_text())
    assert len(items) == summary["gold_train"] == 300
    assert {it["task"] for it in items} == set(ToyWorldConfig().actions) == set(summary["kinds"])
    corpus = tmp_path / "corpus" / "gold"
    table_scenes = {(corpus / it["input"]).read_bytes() for split in ("train", "test")
                    for it in json.loads((corpus / f"{split}.json").read_text())}
    assert len(table_scenes) == summary["scenes_avoided"]  # every corpus scene renders to its own image
    assert not table_scenes & {(gold / it["input"]).read_bytes() for it in items}
    again = make_pretraining_gold(cfg, str(tmp_path / "again"), 300)  # deterministic, like the corpus
    assert (tmp_path / "again" / "gold" / "train.json").read_bytes() == (gold / "train.json").read_bytes()
    assert again["kinds"] == summary["kinds"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("toy")
    make_corpus(ToyCorpusConfig(output=str(out), num_videos=6, actions_per_video=6, num_train=60, num_test=100))
    return out


def test_videos_decode_with_expected_frame_count_and_parse_exactly(corpus: Path) -> None:
    total = found = 0
    for gt_path in sorted((corpus / "ground_truth").glob("*.json")):
        gt = json.loads(gt_path.read_text())
        with av.open(str(corpus / gt["video"])) as container:
            stream = container.streams.video[0]
            assert stream.codec_context.name == "h264"
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        assert len(frames) == gt["num_frames"]
        assert frames[0].shape == (CFG.image_size, CFG.image_size, 3)
        for seg in gt["segments"]:
            assert seg["start_frame"] <= seg["end_frame"] < gt["num_frames"]
            for idx, truth in ((seg["start_frame"] - 1, seg["scene_before"]), (seg["end_frame"], seg["scene_after"])):
                want = set(Scene.from_dict(truth).objects)
                total += len(want)
                found += len(want & set(parse_scene(frames[idx], CFG).objects))
    assert total > 100
    assert found / total >= 0.99


def test_parser_survives_jpeg(corpus: Path) -> None:
    total = found = 0
    for item in json.loads((corpus / "gold/test.json").read_text()):
        for key in ("input", "output"):
            img = Image.open(corpus / "gold" / item[key])
            truth = set(parse_scene(img, CFG).objects)
            buf = io.BytesIO()
            img.save(buf, "JPEG", quality=75)
            total += len(truth)
            found += len(truth & set(parse_scene(Image.open(buf), CFG).objects))
    assert found / total >= 0.99


def test_gold_sets_are_aurora_format_with_unseen_test_scenes(corpus: Path) -> None:
    train = json.loads((corpus / "gold/train.json").read_text())
    test = json.loads((corpus / "gold/test.json").read_text())
    assert len(train) == 60 and len(test) == 100
    assert set(train[0]) == {"input", "output", "instruction", "task", "id"}
    assert set(test[0]) == {"input", "output", "prompt", "task", "id"}
    train_scenes = {parse_scene(Image.open(corpus / "gold" / r["input"]), CFG) for r in train}
    assert not train_scenes & {parse_scene(Image.open(corpus / "gold" / r["input"]), CFG) for r in test}
    for r in test:  # the gold target is exactly the action applied to the source
        src = parse_scene(Image.open(corpus / "gold" / r["input"]), CFG)
        tgt = parse_scene(Image.open(corpus / "gold" / r["output"]), CFG)
        assert apply(src, parse_action(r["prompt"]), CFG) == tgt


def test_gold_frames_come_through_the_video_codec_unless_asked_for_renders(tmp_path: Path) -> None:
    """Gold frames match what annotation decodes (codec-smeared, parse-exact); `gold_from_video=false`: renders."""
    for from_video in (True, False):
        out = tmp_path / str(from_video)
        make_corpus(ToyCorpusConfig(output=str(out), num_videos=1, actions_per_video=1, num_train=4, num_test=4,
                                    gold_from_video=from_video))
        for item in json.loads((out / "gold/test.json").read_text()):
            src = np.asarray(Image.open(out / "gold" / item["input"]).convert("RGB"))
            scene = parse_scene(src, CFG)
            tgt = np.asarray(Image.open(out / "gold" / item["output"]).convert("RGB"))
            assert parse_scene(tgt, CFG) == apply(scene, parse_action(item["prompt"]), CFG)
            rendered = render(scene, CFG), render(parse_scene(tgt, CFG), CFG)
            lossless = bool(np.array_equal(src, rendered[0]) and np.array_equal(tgt, rendered[1]))
            assert lossless == (not from_video)


def test_judge_scores_target_ten_and_copy_zero() -> None:
    scene = Scene((Obj("circle", "red", 3, 3), Obj("square", "blue", 6, 1), Obj("cross", "green", 0, 7)))
    text = "move the red circle right"
    src, tgt = render(scene, CFG), render(apply(scene, parse_action(text), CFG), CFG)
    best = judge(src, text, tgt, CFG)
    assert (best.edit_success, best.minimal_edit, best.score) == (10, 10, 10)
    copy = judge(src, text, src, CFG)
    assert copy.edit_success == 0 and copy.minimal_edit == 10 and copy.score == 0
    # Right edit, but another object vanished: success 10, minimal edit loses one of two others.
    broken = apply(apply(scene, parse_action(text), CFG), parse_action("remove the green cross"), CFG)
    v = judge(src, text, render(broken, CFG), CFG)
    assert v.edit_success == 10 and v.minimal_edit == 5 and v.score == 5
    # Moved, but not where asked: partial success.
    elsewhere = apply(scene, parse_action("put the red circle above the blue square"), CFG)
    v = judge(src, text, render(elsewhere, CFG), CFG)
    assert v.edit_success == 5
    with pytest.raises(ValueError, match="not a toy-world action"):
        judge(src, "fly away", tgt, CFG)


def test_judge_on_every_gold_test_target(corpus: Path) -> None:
    for r in json.loads((corpus / "gold/test.json").read_text()):
        src, tgt = (Image.open(corpus / "gold" / r[k]) for k in ("input", "output"))
        assert judge(src, r["prompt"], tgt, CFG).score == 10
        assert judge(src, r["prompt"], src, CFG).score == 0


def test_corpus_on_s3(s3_bucket: str) -> None:
    summary = make_corpus(small_corpus(s3_bucket + "/toy"))
    assert summary["videos"] == 4
    videos = storage.list_files(s3_bucket + "/toy/videos")
    assert len(videos) == 4 and all(v.startswith("s3://") and v.endswith(".mp4") for v in videos)
    with av.open(io.BytesIO(storage.read_bytes(videos[0]))) as c:
        assert sum(1 for _ in c.decode(video=0)) > 0
    assert len(storage.read_json(s3_bucket + "/toy/gold/train.json")) == 40


def test_kind_weights_shift_the_drawn_kinds() -> None:
    cfg = ToyWorldConfig()

    def share(weights: dict[str, float] | None) -> float:
        rng = random.Random(0)
        kinds = [random_action(random_scene(rng, cfg), rng, cfg, weights).kind for _ in range(400)]
        return kinds.count("remove") / len(kinds)

    assert share(None) < 0.3  # uniform over 5 kinds: about 0.2
    assert share({"remove": 8.0}) > 0.6  # 8 / 12 of the weight: about 0.67 when removal is possible
    for bad, match in (({"jump": 2.0}, "unknown action kinds"), ({"add": 0.0}, "must be > 0")):
        with pytest.raises(ValueError, match=match):
            random_action(random_scene(random.Random(1), cfg), random.Random(1), cfg, bad)


def test_train_kind_weights_leave_the_test_set_and_videos_untouched(tmp_path: Path) -> None:
    def corpus(name: str, weights: dict[str, float]) -> Path:
        make_corpus(ToyCorpusConfig(output=str(tmp_path / name), num_videos=1, actions_per_video=2, num_train=60,
                                    num_test=10, train_kind_weights=weights))
        return tmp_path / name

    plain, skewed = corpus("plain", {}), corpus("skewed", {"put": 6.0, "add": 6.0})
    for rel in ("gold/test.json", "videos/toy_00000.mp4", "gold/images/test_000003_tgt.png"):
        assert (plain / rel).read_bytes() == (skewed / rel).read_bytes(), rel
    kinds = {name: [it["task"] for it in json.loads((d / "gold" / "train.json").read_text())]
             for name, d in (("plain", plain), ("skewed", skewed))}
    assert sum(k in ("put", "add") for k in kinds["skewed"]) > sum(k in ("put", "add") for k in kinds["plain"]) + 10
    with pytest.raises(ValueError, match="unknown action kinds"):
        corpus("bad", {"teleport": 1.0})
    assert not (tmp_path / "bad" / "videos").exists()  # refused before anything was written


def test_the_oracle_labels_every_pair_that_shows_one_action() -> None:
    """Row (b′)'s labels: a pair on the quiet frames at a motion's ends (the animation's first frame, one short
    of its last) shows exactly the scenes before and after and gets the segment's action; a pair spanning two
    actions, or none, gets no label."""
    cfg = ToyWorldConfig()
    frames, segments = make_video(random.Random(3), cfg, 6)
    for seg in segments:
        start, end = seg["start_frame"], seg["end_frame"]
        for src, tgt in [(start - 1, end), (start, end - 1), (start, end)]:
            assert ground_truth_action(segments, src, tgt) == seg["action"], (src, tgt, seg)
        assert parse_scene(frames[start], cfg) == Scene.from_dict(seg["scene_before"])
        assert parse_scene(frames[end - 1], cfg) == Scene.from_dict(seg["scene_after"])
    first, second = segments[0], segments[1]
    assert ground_truth_action(segments, first["start_frame"], second["end_frame"]) is None  # two actions
    assert ground_truth_action(segments, first["end_frame"], second["start_frame"] - 1) is None  # still frames



def test_near_misses_are_valid_scenes_one_mistake_from_the_target() -> None:
    """`near_misses`: the same edit on another object, the acted object in the wrong colour, the unchanged scene;
    each differs from the true target and from the others, on every kind of action."""
    from cwm_ray.toyworld.world import near_misses

    cfg = ToyWorldConfig()
    rng = random.Random(7)
    kinds: set[str] = set()
    for _ in range(300):
        scene = random_scene(rng, cfg)
        action = random_action(scene, rng, cfg)
        target = apply(scene, action, cfg)
        misses = near_misses(scene, action, cfg)
        kinds.add(action.kind)
        assert set(misses) == {"wrong_object", "wrong_colour", "unchanged"} and misses["unchanged"] == scene
        assert len({target, *misses.values()}) == 4, (action.text(), misses)
        for miss in misses.values():  # each is a scene of the world: unique objects, one per cell, on the board
            assert len({(o.color, o.shape) for o in miss.objects}) == len({o.cell for o in miss.objects}) \
                == len(miss.objects)
        wrong = misses["wrong_colour"]  # the same cells, one object of another colour and the same shape
        after = scene if action.kind == "remove" else target
        assert sorted(o.cell for o in wrong.objects) == sorted(o.cell for o in after.objects)
        changed = [(a, b) for a, b in zip(after.objects, wrong.objects, strict=True) if a != b]
        assert len(changed) == 1 and changed[0][0].shape == changed[0][1].shape != "" \
            and changed[0][0].color != changed[0][1].color
        edited = {o for o in misses["wrong_object"].objects} ^ set(scene.objects)  # what the wrong edit touched
        assert edited and not edited & ({o for o in target.objects} ^ set(scene.objects)), action.text()
    assert kinds == {"move", "remove", "add", "recolor", "put"}
