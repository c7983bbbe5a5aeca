"""scripts/prepare_aurora.py on a tiny sample written as AURORA releases it (github.com/McGill-NLP/AURORA):
`data/TASK/train.json` with paths relative to the checkout (`data/ag/images/...`), MagicBrush's extra fields,
a task whose images were not unzipped, and AURORA-Bench's `test.json` with items without a reference. The output
is read back by the loaders the stages use, at the paths a profile derives from its root."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from cwm_ray import storage
from cwm_ray.config import EvaluateConfig, TrainIDMConfig, load
from cwm_ray.data import read_aurora
from cwm_ray.evaluate.bench import load_bench

REPO = Path(__file__).resolve().parents[1]
PROFILE = REPO / "configs" / "real" / "qwen25vl7b_ip2p.yaml"


def _png(seed: int) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (seed * 40 % 256, 10, 200)).save(buf, "PNG")
    return buf.getvalue()


def _released_sample(root: Path) -> None:
    def image(rel: str, seed: int) -> str:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(_png(seed))
        return rel

    (root / "data" / "ag").mkdir(parents=True)
    (root / "data" / "ag" / "train.json").write_text(json.dumps([
        {"instruction": "Leave the door while standing closer",
         "input": image("data/ag/images/1K0SU.mp4_4_left.png", 1),
         "output": image("data/ag/images/1K0SU.mp4_4_right.png", 2)},
        {"instruction": "Sit down", "input": image("data/ag/images/2X.mp4_1_left.png", 3),
         "output": image("data/ag/images/2X.mp4_1_right.png", 4)}]))
    (root / "data" / "magicbrush").mkdir(parents=True)
    (root / "data" / "magicbrush" / "train.json").write_text(json.dumps([
        {"input": image("data/magicbrush/images/0-input.png", 5), "mask": "0-mask.png",
         "output": image("data/magicbrush/images/0-output.png", 6), "instruction": "change the table for a dog",
         "img_id": "327726"}]))
    (root / "data" / "kubric").mkdir(parents=True)  # its images.zip not unpacked: the item is left out, and counted
    (root / "data" / "kubric" / "train.json").write_text(json.dumps([
        {"input": "data/kubric/images/further_location/2720/image0.jpg",
         "output": "data/kubric/images/further_location/2720/image1.jpg", "instruction": "move the pencil case left"}]))
    (root / "test.json").write_text(json.dumps([
        {"input": image("data/magicbrush/images/242679/242679-input.png", 7),
         "output": image("data/magicbrush/images/242679/242679-output1.png", 8),
         "instruction": "Put a cat on the seat.", "task": "magicbrush"},
        {"id": "36", "instruction": "Make remote fall down", "input": image("data/something/images/36/first.jpg", 9),
         "output": image("data/something/images/36/last.jpg", 10), "task": "something"},
        {"instruction": "Make the photo seem like it was taken at a picnic",
         "input": image("data/emu/images/2660.png", 11), "type": "global", "task": "emu"}]))


def test_the_released_files_become_the_layout_a_profile_reads(tmp_path: Path, s3_bucket: str) -> None:
    source = tmp_path / "AURORA"
    _released_sample(source)
    for root in (str(tmp_path / "cwm"), f"{s3_bucket}/cwm"):
        proc = subprocess.run([sys.executable, "scripts/prepare_aurora.py", str(source), root], cwd=REPO,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        summary = json.loads(proc.stdout)
        assert summary["train"] == {"ag": 2, "magicbrush": 1, "kubric missing": 1, "something (no train.json)": 1}
        assert summary["bench"] == {"magicbrush": 1, "something": 1, "emu": 1}, summary
        # the paths the profile's stages read under this root
        train_uri = load(TrainIDMConfig, PROFILE, [f"root={root}"]).data.sources[0].uri
        bench_uri = load(EvaluateConfig, PROFILE, [f"root={root}"]).bench
        rows = read_aurora(train_uri)
        assert [r["task"] for r in rows] == ["ag", "ag", "magicbrush"] and rows[2]["img_id"] == "327726"
        assert storage.read_bytes(rows[0]["input"]) == _png(1) and storage.read_bytes(rows[2]["output"]) == _png(6)
        items = load_bench(bench_uri)
        assert [(i.task, i.action) for i in items][:2] == [("magicbrush", "Put a cat on the seat."),
                                                         ("something", "Make remote fall down")]
        assert items[2].reference is None and items[2].extra["type"] == "global"
        assert items[1].source == _png(9) and items[1].id == "36"


def test_a_checkout_without_images_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "data" / "ag").mkdir(parents=True)
    (tmp_path / "data" / "ag" / "train.json").write_text(json.dumps(
        [{"instruction": "x", "input": "data/ag/images/a.png", "output": "data/ag/images/b.png"}]))
    proc = subprocess.run([sys.executable, "scripts/prepare_aurora.py", str(tmp_path), str(tmp_path / "out")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [
        f"error: no item of {tmp_path} has its images: unzip them into data/TASK/images/ first"]
