"""Hung ranks in local mode, for real: 2 simulated nodes x 1 gloo DDP worker, a fault injected
into rank 1 (SIGSTOP, a Python deadlock, an endless loop). Without hang detection each of these
jobs waits forever (gloo's timeout in the script is 10 min, the test's 150 s); with it, the hung
rank is found within ``hang_timeout`` + 15 s, every rank's stack is dumped on both nodes, and
the job restarts and finishes from its checkpoint. A legitimate long step shorter than
``hang_timeout`` is left alone.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from hpc_elastic.jobdir import JobDir
from hpc_elastic.telemetry import read_jsonl

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "tests" / "hang_helpers" / "train_ddp.py"
pytestmark = pytest.mark.slow

HANG_TIMEOUT = 6.0


def run_job(root: Path, fault: str, *extra: str, steps: int = 30,
            timeout: float = 150) -> tuple[subprocess.CompletedProcess, JobDir]:
    """Submit the DDP script locally (2 nodes x 1 worker) and wait for the end."""
    job = root / "job.yaml"
    job.write_text(
        "name: hang\nnodes: 2\nnproc_per_node: 1\n"
        f"entrypoint: {SCRIPT} --steps {steps} --step-sleep 0.05 --fault {fault} "
        f"--fault-rank 1 --fault-step 8 {' '.join(extra)}\n"
        f"max_restarts: 2\nhang_timeout: {HANG_TIMEOUT}\njob_root: {root / 'jobs'}\n"
        "env:\n  OMP_NUM_THREADS: 1\nrendezvous:\n  last_call_timeout: 1\n")
    args = [sys.executable, "-m", "hpc_elastic", "submit", str(job), "--local"]
    launcher = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = launcher.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_local_job(root / "jobs")
        launcher.kill()
        out, err = launcher.communicate()
        pytest.fail(f"the job hung for {timeout:g} s:\n{(out + err)[-3000:]}")
    (path,) = (root / "jobs").iterdir()
    return subprocess.CompletedProcess(args, launcher.returncode, out, err), JobDir(path)


def stop_local_job(jobs: Path) -> None:
    """SIGKILL a hung local job's agents and their workers (the agents run in their own
    sessions, so killing the launcher leaves them behind)."""
    for agents in jobs.glob("*/local-agents.json"):
        for pid in json.loads(agents.read_text())["pids"]:
            children = Path(f"/proc/{pid}/task/{pid}/children")
            kids = children.read_text().split() if children.exists() else []
            for victim in [*map(int, kids), pid]:
                with contextlib.suppress(OSError):
                    os.kill(victim, signal.SIGKILL)


def events(jobdir: JobDir, kind: str) -> list[dict]:
    return [e for node in jobdir.node_names() for e in read_jsonl(jobdir.events(node))
            if e["kind"] == kind]


def summary(jobdir: JobDir) -> dict:
    out = subprocess.run([sys.executable, "-m", "hpc_elastic", "logs", "summary",
                          str(jobdir.path), "--json"], capture_output=True, text=True, timeout=60)
    return json.loads(out.stdout)


def check_hang_handled(result: subprocess.CompletedProcess, jobdir: JobDir,
                       culprit_state: set[str]) -> dict:
    """The checks every hang kind shares; returns the culprit's dump header."""
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    injected_at = float((jobdir.checkpoints / "injected").read_text().split()[0])
    assert (jobdir.checkpoints / "step.txt").read_text() == "30", "the job did not finish"

    hung = events(jobdir, "worker.hung")
    assert hung and all(e["silent_s"] >= HANG_TIMEOUT for e in hung), hung
    dumped = events(jobdir, "hang.dumped")
    assert sorted(e["node"] for e in dumped) == ["local0", "local1"], "stacks from every node"
    assert len({e["stamp"] for e in dumped}) == 1
    # Detection and every node's dumps within hang_timeout + 15 s of the fault.
    assert max(e["time"] for e in dumped) - injected_at <= HANG_TIMEOUT + 15, (
        max(e["time"] for e in dumped) - injected_at)
    ranks = {r["rank"]: r for e in dumped for r in e["ranks"]}
    assert sorted(ranks) == [0, 1]
    for rank, info in ranks.items():
        text = (jobdir.path / info["dump"]).read_text()
        assert "train_ddp.py" in text, f"rank {rank}'s dump has no stack:\n{text}"
    assert ranks[1]["state"] in culprit_state, ranks[1]
    # The restart came from the hang: one more group start on each node.
    assert len(events(jobdir, "workers.restart")) == 2
    return ranks[1]


def test_frozen_rank_sigstop_is_detected_dumped_and_restarted(tmp_path: Path) -> None:
    result, jobdir = run_job(tmp_path, "stop")
    culprit = check_hang_handled(result, jobdir, {"T"})
    assert "main (hang_helpers/train_ddp.py" in (jobdir.path / culprit["dump"]).read_text()


def test_python_deadlock_is_detected_dumped_and_restarted(tmp_path: Path) -> None:
    result, jobdir = run_job(tmp_path, "deadlock")
    culprit = check_hang_handled(result, jobdir, {"S"})
    assert "deadlock (hang_helpers/train_ddp.py" in (jobdir.path / culprit["dump"]).read_text()


def test_endless_loop_is_detected_dumped_and_restarted(tmp_path: Path) -> None:
    result, jobdir = run_job(tmp_path, "loop")
    culprit = check_hang_handled(result, jobdir, {"R", "S"})
    # It burns CPU while the rank waiting for it does not (the share depends on the machine's
    # load: 16 % was seen on 2 busy cores, so the test compares, not a fixed number).
    (peer,) = [r for e in events(jobdir, "hang.dumped") for r in e["ranks"] if r["rank"] == 0]
    assert culprit["cpu_percent"] > 5 * max(peer["cpu_percent"], 1.0), (culprit, peer)
    assert "spin_forever (hang_helpers/train_ddp.py" in (
        jobdir.path / culprit["dump"]).read_text()


def test_faulthandler_fallback_dumps_a_deadlocked_rank(tmp_path: Path) -> None:
    """Without py-spy the workers' own faulthandler answers the stack signal."""
    os.environ["HPC_ELASTIC_STACK_TOOL"] = "faulthandler"
    try:
        result, jobdir = run_job(tmp_path, "deadlock")
    finally:
        del os.environ["HPC_ELASTIC_STACK_TOOL"]
    culprit = check_hang_handled(result, jobdir, {"S"})
    text = (jobdir.path / culprit["dump"]).read_text()
    assert "stack by faulthandler" in text and 'line' in text and "in deadlock" in text, text


def test_long_legitimate_step_below_hang_timeout_is_not_a_hang(tmp_path: Path) -> None:
    result, jobdir = run_job(tmp_path, "long", f"--long-s {HANG_TIMEOUT * 0.6}")
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert not events(jobdir, "worker.hung")
    assert not events(jobdir, "hang.dumped")
    assert not events(jobdir, "workers.restart")
