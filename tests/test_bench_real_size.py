"""bench/real_size.py: P1–P4 against real families at published sizes, ready for a lent GPU.

A real-size run needs a GPU (none in CI), so this runs the same script at size=tiny on the CPU (it builds
the tiny checkpoints of the same families and runs a bench against them through $BENCH_IDM /
$BENCH_WORLD_MODEL), and checks that the default plan covers P1–P4 for both world-model families with their
real profiles. It asserts no speed: the figures are bench output, not test results.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))


def test_the_real_size_plan_covers_p1_to_p4_and_the_idm_for_both_families_with_their_profiles() -> None:
    import real_size

    args = dict(real_size.DEFAULTS)
    models = {"idm": "/m/idm", "instruct_pix2pix": "/m/ip2p", "janus": "/m/janus"}
    runs = real_size.commands(args, models)
    assert {b for b, _, _ in runs} == {"P1", "P2", "P3", "P4", "IDM"}
    for bench, env, argv in runs:
        assert env["BENCH_DEVICE"] == "cuda" and env["BENCH_IDM"] == "/m/idm"
        assert (REPO / argv[0]).exists(), argv[0]
        if bench in ("P1", "P4"):
            (config,) = [a.split("=", 1)[1] for a in argv if a.startswith("config=")]
            assert config.startswith("configs/real/") and (REPO / config).exists()
    assert {env["BENCH_WM_BACKEND"] for _, env, _ in runs} == {"diffusion", "token"}


def test_real_size_runs_a_bench_on_tiny_checkpoints_of_the_real_families(tmp_path: Path) -> None:
    env = dict(os.environ, BENCH_CACHE=str(tmp_path), RAY_AUTH_MODE="disabled")
    env.pop("BENCH_RESULTS", None)
    proc = subprocess.run([sys.executable, "bench/real_size.py", "size=tiny", "device=cpu", "benches=P2",
                           "wm_families=janus"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (line,) = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    assert line["bench"] == "P2" and line["inputs"]["backend"] == "token"
    assert line["inputs"]["idm"].endswith("qwen2_vl") and line["ratio"] > 0
