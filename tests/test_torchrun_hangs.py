"""Hang detection for plain ``torchrun --rdzv-backend=sharedfs`` agents (issue 16's measured
case): two torchrun agents on loopback, one worker each, running the unchanged example script
through ``-m hpc_elastic.worker``; rank 1 is frozen with SIGSTOP mid-training. Without the watch
both agents wait for gloo's 30-minute timeout; with it, both nodes dump their ranks' stacks, the
hung group is killed, torchrun restarts it, and the run finishes.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hpc_elastic.worker import record
from tests.polling import wait_for

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "examples" / "train.py"
TUNED = "heartbeat_interval=0.25,heartbeat_timeout=3,last_call_timeout=2"
HANG_TIMEOUT = 6
pytestmark = pytest.mark.slow


def start_torchrun(root: Path, out: Path, name: str) -> subprocess.Popen:
    env = {**os.environ, "HPC_ELASTIC_HANG_TIMEOUT": str(HANG_TIMEOUT), "OMP_NUM_THREADS": "1"}
    env.pop("HPC_ELASTIC_WORKER_DIR", None)
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--rdzv-backend=sharedfs",
         f"--rdzv-endpoint={root}", "--rdzv-id=hang", "--nnodes=2", "--nproc-per-node=1",
         "--local-addr=127.0.0.1", "--max-restarts=1", "--monitor-interval=0.2",
         f"--rdzv-conf={TUNED}", "-m", "hpc_elastic.worker", str(SCRIPT), "--epochs", "3",
         "--steps-per-epoch", "40", "--step-sleep", "0.05", "--checkpoint-dir", str(out)],
        stdout=open(out.parent / f"{name}.log", "w"), stderr=subprocess.STDOUT, env=env)


def test_torchrun_agents_detect_a_stopped_rank_dump_every_node_and_restart(
        tmp_path: Path) -> None:
    root, ckpt = tmp_path / "rdzv", tmp_path / "ckpt"
    root.mkdir()
    ckpt.mkdir()
    agents = [start_torchrun(root, ckpt, name) for name in ("t0", "t1")]
    try:
        def rank1_running() -> record.Progress | None:
            for path in (root / "hang" / "progress").glob("round-*/*/rank-1/progress"):
                p = record.read(path)
                if p is not None and p.n >= 10:
                    return p
            return None

        victim = wait_for("rank 1's progress record", rank1_running, 180)
        os.kill(victim.pid, signal.SIGSTOP)
        stopped_at = time.time()
        for agent in agents:
            agent.wait(timeout=240)
    finally:
        for agent in agents:
            if agent.poll() is None:
                agent.kill()
                agent.wait()
    logs = {n: (tmp_path / f"{n}.log").read_text() for n in ("t0", "t1")}
    assert [a.returncode for a in agents] == [0, 0], logs
    assert "training finished" in logs["t0"] + logs["t1"]
    run = root / "hang"
    dumps = sorted(run.glob("nodes/*/hangs/*/rank-*.txt"))
    assert sorted(p.name for p in dumps) == ["rank-0.txt", "rank-1.txt"], dumps
    assert len({p.parent.parent.parent for p in dumps}) == 2, "stacks from both nodes"
    hung = [json.loads(line) for f in run.glob("nodes/*/events.jsonl")
            for line in f.read_text().splitlines() if '"worker.hung"' in line]
    assert [(e["rank"], e["state"]) for e in hung] == [(1, "T")], hung
    assert hung[0]["time"] - stopped_at <= HANG_TIMEOUT + 15
    assert any("hpc_elastic: hang (no progress" in text for text in logs.values()), logs
    out = subprocess.run([sys.executable, "-m", "hpc_elastic", "logs", "hangs", str(run)],
                         capture_output=True, text=True, timeout=60)
    assert "rank 1 (node " in out.stdout and "was stopped (state T)" in out.stdout, (
        out.stdout + out.stderr)
    with contextlib.suppress(OSError):
        os.kill(victim.pid, signal.SIGKILL)
