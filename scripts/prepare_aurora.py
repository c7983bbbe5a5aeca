"""Lay out AURORA's released training data and AURORA-Bench where a model profile reads them.

    python scripts/prepare_aurora.py /data/AURORA s3://my-bucket/cwm      # then every stage with root=s3://my-bucket/cwm
    python scripts/prepare_aurora.py /data/AURORA /shared/cwm --tasks ag magicbrush

SOURCE is a checkout of github.com/McGill-NLP/AURORA as its README sets it up: `data/TASK/train.json` for the
training tasks (ag, kubric, magicbrush, something), their images unzipped from Zenodo into `data/TASK/images/`
(Something-Something's frames extracted with `data/something/extract_frames.py`), and AURORA-Bench's `test.json`
at the top, whose images the repository ships under `data/TASK/images/`. In those files image paths are relative
to the checkout (`data/ag/images/1K0SU.mp4_4_left.png`), not to the JSON.

ROOT (a directory or an s3:// prefix; the profiles' `root`) receives the layout cwm_ray's loaders read (image
paths relative to the JSON, `task` on every item):

    ROOT/aurora/train.json         every training task's items, merged   (train_idm's and train_world_model's data)
    ROOT/aurora/images/...
    ROOT/aurora-bench/test.json    AURORA-Bench                          (evaluate's and evaluate_idm's bench)
    ROOT/aurora-bench/images/...

An item whose image is missing (a task whose zip was not unpacked) is left out and counted; the summary says how
many per task. Re-running overwrites the JSON and skips images already there.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from cwm_ray import storage

TRAIN_TASKS = ("ag", "kubric", "magicbrush", "something")
"""The training tasks AURORA releases (`data/TASK/train.json`)."""
IMAGE_KEYS = ("input", "output")


def _relative(path: str) -> str:
    """Where an image of the checkout goes under the output JSON's directory: `images/` + its path below data/."""
    return "images/" + path.removeprefix("./").removeprefix("data/")


def _convert(items: list[dict[str, Any]], source: Path, task: str | None) -> tuple[list[dict[str, Any]],
                                                                                      set[str], Counter]:
    """Items with their image paths moved under images/, the images they need, and per-task counts."""
    out, needed, counts = [], set(), Counter()
    for item in items:
        name = task or str(item.get("task") or "default")
        paths = [item[k] for k in IMAGE_KEYS if item.get(k)]
        if not item.get("input") or not all((source / p).is_file() for p in paths):
            counts[f"{name} missing"] += 1
            continue
        new = dict(item) | {k: _relative(item[k]) for k in IMAGE_KEYS if item.get(k)}
        new.setdefault("task", name)
        out.append(new)
        needed.update(paths)
        counts[name] += 1
    return out, needed, counts


def _copy(source: Path, files: set[str], dest: str, workers: int) -> None:
    def one(rel: str) -> None:
        target = storage.join(dest, _relative(rel))
        if not storage.exists(target):
            storage.write_bytes(target, (source / rel).read_bytes())

    with ThreadPoolExecutor(max(1, workers)) as pool:
        list(pool.map(one, sorted(files)))


def prepare(source: str | Path, root: str, tasks: tuple[str, ...] = TRAIN_TASKS, workers: int = 16) -> dict[str, Any]:
    """Write ROOT/aurora/ and ROOT/aurora-bench/ from an AURORA checkout; returns per-task counts."""
    source = Path(source)
    if not (source / "test.json").is_file() and not (source / "data").is_dir():
        raise SystemExit(f"error: {source} is not an AURORA checkout (no test.json, no data/): clone "
                         "https://github.com/McGill-NLP/AURORA and unzip the images as its README says")
    summary: dict[str, Any] = {}
    train: list[dict[str, Any]] = []
    train_files: set[str] = set()
    counts: Counter = Counter()
    for task in tasks:
        path = source / "data" / task / "train.json"
        if not path.is_file():
            counts[f"{task} (no train.json)"] += 1
            continue
        items, files, c = _convert(json.loads(path.read_text()), source, task)
        train += items
        train_files |= files
        counts += c
    if train:
        _copy(source, train_files, storage.join(root, "aurora"), workers)
        storage.write_json(storage.join(root, "aurora", "train.json"), train)
    summary["train"] = dict(counts)
    if (source / "test.json").is_file():
        bench, files, c = _convert(json.loads((source / "test.json").read_text()), source, None)
        if bench:
            _copy(source, files, storage.join(root, "aurora-bench"), workers)
            storage.write_json(storage.join(root, "aurora-bench", "test.json"), bench)
        summary["bench"] = dict(c)
    if not train and not summary.get("bench"):
        raise SystemExit(f"error: no item of {source} has its images: unzip them into data/TASK/images/ first")
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("source", help="AURORA checkout (github.com/McGill-NLP/AURORA, images unzipped)")
    parser.add_argument("root", help="storage root: a directory or s3://bucket/prefix (the profiles' root=)")
    parser.add_argument("--tasks", nargs="+", default=list(TRAIN_TASKS), help="training tasks to include")
    parser.add_argument("--workers", type=int, default=16, help="parallel image copies (uploads to S3)")
    args = parser.parse_args(argv)
    summary = prepare(args.source, args.root, tuple(args.tasks), args.workers)
    print(json.dumps(summary, indent=1))
    print(f"AURORA: {storage.join(args.root, 'aurora', 'train.json')}; AURORA-Bench: "
          f"{storage.join(args.root, 'aurora-bench', 'test.json')}", file=sys.stderr)


if __name__ == "__main__":
    main()
