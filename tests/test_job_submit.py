"""`ray job submit -- python jobs/annotate.py ...` against a `ray start --head` node, as users run it."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray_processes

from cwm_ray.config import ToyCorpusConfig
from cwm_ray.toyworld.corpus import make_corpus
from cwm_ray.toyworld.diffusion_model import build_toy_world_model
from cwm_ray.toyworld.idm_model import build_toy_idm

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def head_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real head node (GCS, raylet, dashboard with the Jobs API) on free ports and its own temp dir.

    Every port is a free one: another Ray on the machine (the toy gates' training runs beside the suite) holds
    the defaults, and a job agent that cannot bind 52365 leaves the head answering "No available agent".

    Stopped by its marker (`ray_processes`), not `ray stop`, which ends every Ray process of the user; its own
    temp dir keeps `ray_current_cluster`, which a plain `ray.init()` elsewhere would join, to itself.
    """
    port, dash = _free_port(), _free_port()
    marker, temp_dir = ray_processes.new_marker(), tempfile.mkdtemp(prefix="cwmjs", dir="/tmp")  # short: sockets
    # as with an activated virtualenv: the entrypoint's `python` is the one that has cwm_ray installed
    env = os.environ | marker | {"RAY_AUTH_MODE": "disabled",
                                 "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    try:
        subprocess.run([str(BIN / "ray"), "start", "--head", f"--port={port}", f"--dashboard-port={dash}",
                        f"--dashboard-agent-listen-port={_free_port()}", f"--ray-client-server-port={_free_port()}",
                        f"--temp-dir={temp_dir}", "--num-cpus=2", "--include-dashboard=true",
                        "--dashboard-host=127.0.0.1", "--disable-usage-stats"],
                       check=True, env=env, capture_output=True, timeout=180)
        yield f"http://127.0.0.1:{dash}"
    finally:
        ray_processes.stop(marker)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_annotate_through_ray_job_submit(head_node: str, tmp_path: Path) -> None:
    make_corpus(ToyCorpusConfig(output=str(tmp_path / "corpus"), num_videos=2, actions_per_video=2, num_train=0,
                                num_test=0))
    build_toy_idm(str(tmp_path / "idm"), hidden_size=32, text_layers=1)
    build_toy_world_model(str(tmp_path / "wm"), resolution=32, block_out_channels=(8, 16), text_hidden_size=16)
    out = tmp_path / "out"
    cmd = [str(BIN / "ray"), "job", "submit", "--address", head_node, "--working-dir", str(REPO), "--",
           "python", "jobs/annotate.py", f"inputs=[{{name: toy, uri: {tmp_path / 'corpus' / 'videos'}}}]",
           f"output={out}", f"idm.model={tmp_path / 'idm'}", f"world_model.model={tmp_path / 'wm'}",
           "world_model.resolution=32", "idm.max_new_tokens=4"]
    # The head's job agent comes up seconds after `ray start` returns, later on a loaded machine (it once
    # took over a minute while another Ray job ran beside the suite): retry that one answer, by deadline.
    deadline = time.monotonic() + 300
    while True:
        proc = subprocess.run(cmd, env=os.environ | {"RAY_AUTH_MODE": "disabled"}, capture_output=True, text=True,
                              timeout=600)
        if "No available agent" not in proc.stdout + proc.stderr or time.monotonic() > deadline:
            break
        time.sleep(3)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "succeeded" in proc.stdout + proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["videos"] == 2 and summary["pairs"] > 0 and summary["errors"] == 0
    assert "[annotate]" in proc.stdout  # the job's own summary table streams back to the submitter
