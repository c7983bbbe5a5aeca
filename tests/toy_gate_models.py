"""The toy gates' two models, trained as `jobs/train_idm.py` and `jobs/train_world_model.py --config
configs/train_token_world_model.yaml` train them (tests/test_toy_training.py checks what they learned).

About 20 minutes of both cores, the largest part of the suite. So `conftest.py` starts this file in a background
process at the lowest CPU priority (Linux's idle scheduling class) as soon as the session knows the gates are
selected, and the gates run last and wait for it: the training takes the CPU time the rest of the suite leaves idle
(process start-ups, waits on servers, single-threaded steps) and yields the CPU to every other test.
Its Ray is a private one in its own temp dir, so no test's Ray finds or joins it.

    python tests/toy_gate_models.py ROOT     # writes ROOT/corpus, ROOT/idm, ROOT/wm, then ROOT/done.json
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import ray_processes

REPO = Path(__file__).resolve().parents[1]
TEST_PAIRS = 1000
"""Held-out pairs the corpus holds (the default is 300): see `test_toy_training.TEST_PAIRS`."""
LOG = "train.log"
DONE = "done.json"


def _run(root: Path, script: str, *args: str) -> None:
    env = os.environ | {"RAY_AUTH_MODE": "disabled"}
    start = time.monotonic()
    with open(root / LOG, "a") as log:
        log.write(f"$ {script} {' '.join(args)}\n")
        log.flush()
        proc = subprocess.run([sys.executable, f"jobs/{script}", *args], cwd=REPO, env=env, stdout=log,
                              stderr=subprocess.STDOUT, timeout=3600)
        log.write(f"# {script}: exit {proc.returncode} after {time.monotonic() - start:.0f} s\n")
    if proc.returncode:
        raise RuntimeError(f"jobs/{script} exited {proc.returncode}: see {root / LOG}")


def train(root: Path) -> dict[str, str]:
    """Corpus, IDM, world model under `root`; the paths the gates read."""
    corpus, runs = root / "corpus", root / "runs"
    _run(root, "make_toy_corpus.py", f"output={corpus}", f"num_test={TEST_PAIRS}")
    gold = f"data.sources=[{{uri: {corpus / 'gold' / 'train.json'}}}]"
    _run(root, "train_idm.py", gold, f"train.storage_path={runs}", f"train.export={root / 'idm'}")
    _run(root, "train_world_model.py", "--config", "configs/train_token_world_model.yaml", gold,
         f"train.storage_path={runs}", f"train.export={root / 'wm'}")
    return {"root": str(root), "corpus": str(corpus), "idm": str(root / "idm"), "wm": str(root / "wm")}


def _lowest_priority() -> None:
    """Linux's idle scheduling class, inherited by every process the training starts: it runs only on a core no
    other process wants (a nice-19 process would still take a third of a core from Ray's nice-15 workers)."""
    os.nice(19)
    os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))


class BackgroundTraining:
    """This file's `train` in a process of the idle scheduling class (its Ray too), started now and waited for later."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.marker = ray_processes.new_marker()
        self.ray_tmp = tempfile.mkdtemp(prefix="cwmtg", dir="/tmp")  # short: Ray's Unix sockets live under it
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | self.marker | {
            "RAY_TMPDIR": self.ray_tmp,  # its own session dirs; `ray.init()` elsewhere never sees this Ray
            "RAY_worker_niceness": "19",  # Ray renices its workers (15 by default), which would raise them
        }
        # Same session as pytest: a new one would get its own scheduler autogroup, which shares the CPU equally
        # with pytest's however nice it is.
        self.proc = subprocess.Popen([sys.executable, __file__, str(root)], cwd=REPO, env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=_lowest_priority)

    def wait(self, timeout_s: float) -> dict[str, Path]:
        """The trained models' paths; fails with the training's log tail if it failed or ran out of time."""
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.stop()
            raise RuntimeError(f"the toy gates' training did not finish in {timeout_s:.0f} s: {self._tail()}") from None
        done = self.root / DONE
        result = json.loads(done.read_text()) if done.exists() else {"error": f"exit {self.proc.returncode}"}
        if "error" in result:
            raise RuntimeError(f"the toy gates' training failed ({result['error']}): {self._tail()}")
        return {k: Path(v) for k, v in result["paths"].items()} | {"seconds": result["seconds"]}

    def _tail(self) -> str:
        log = self.root / LOG
        return log.read_text()[-4000:] if log.exists() else "(no log)"

    def stop(self) -> None:
        """End the training and its Ray (a session that deselected or skipped the gates, or an interrupt)."""
        if self.proc.poll() is None:
            self.proc.terminate()
        ray_processes.stop(self.marker)
        self.proc.wait(timeout=30)
        shutil.rmtree(self.ray_tmp, ignore_errors=True)


GATES = "test_toy_training.py"
_STASH = pytest.StashKey[BackgroundTraining]()


def schedule(config: pytest.Config, items: list[pytest.Item]) -> None:
    """If the gates are selected: move them to the end of `items` and start their models' training now."""
    gates = [item for item in items if item.path.name == GATES]
    if gates and not config.option.collectonly:
        items[:] = [item for item in items if item.path.name != GATES] + gates
        config.stash[_STASH] = BackgroundTraining(Path(tempfile.mkdtemp(prefix="cwm-toy-gates-")))


def background(config: pytest.Config) -> BackgroundTraining:
    """The training `schedule` started for this session."""
    return config.stash[_STASH]


def stop(config: pytest.Config) -> None:
    """At the session's end: the training stopped if it still runs, and its files removed."""
    training = config.stash.get(_STASH, None)
    if training is not None:
        training.stop()
        shutil.rmtree(training.root, ignore_errors=True)


if __name__ == "__main__":
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    try:
        result: dict[str, object] = {"paths": train(out)}
    except Exception as exc:  # noqa: BLE001 - recorded for the waiting fixture, which fails the gates with it
        result = {"error": f"{type(exc).__name__}: {exc}"}
    result["seconds"] = round(time.monotonic() - start)
    (out / (DONE + ".tmp")).write_text(json.dumps(result))
    (out / (DONE + ".tmp")).rename(out / DONE)
