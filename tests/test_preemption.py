"""Preemption end to end: the signal reaches the workers, they checkpoint, one node requeues,
and the next attempt resumes from the checkpoint with the attempt counter one higher.

Two real runs of ``examples/train.py`` (2 nodes x 2 gloo workers): one in local mode (the
launcher plays Slurm's requeue), one on the real Slurm test cluster (``scontrol requeue``).
Unit tests of ``Preemption`` cover the one-claim rule and the per-worker single delivery
without processes of the job.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from e2e_helpers import assert_nothing_left, summary_json, summary_text
from polling import wait_for
from slurm_cluster.fixture import TERMINAL_STATES

from hpc_elastic.agent.preemption import Preemption, ignores_signal
from hpc_elastic.jobdir import JobDir
from hpc_elastic.telemetry import read_jsonl

REPO = Path(__file__).resolve().parent.parent
# 2 epochs of 12 steps at 0.15 s: long enough to signal mid-epoch 1, short enough to finish.
TRAIN_ARGS = "[--epochs, 2, --steps-per-epoch, 12, --step-sleep, 0.15]"
CHECKPOINTED = re.compile(r"preemption signal, checkpointed at epoch (\d+) step (\d+) "
                          r"\(global step (\d+)\)")
RESUMED = re.compile(r"attempt (\d+) restart \d+, starting at epoch (\d+) step (\d+) "
                     r"\(global step (\d+)\)")


# -- helpers -------------------------------------------------------------------------------

def events(jobdir: JobDir) -> list[dict[str, Any]]:
    return [e for node in jobdir.node_names()
            for e in read_jsonl(jobdir.events(node), missing_ok=True)]


def kind_events(jobdir: JobDir, kind: str) -> list[dict[str, Any]]:
    return [e for e in events(jobdir) if e["kind"] == kind]


def rank_stdout(jobdir: JobDir, attempt: int, rank: int) -> str:
    """Everything rank ``rank`` printed in ``attempt`` (all restarts, all nodes)."""
    found = sorted(jobdir.path.glob(f"nodes/*/workers/attempt-{attempt}/restart-*/rank-{rank}/"
                                    "stdout.log"))
    return "".join(path.read_text(errors="replace") for path in found)


def training_runs(jobdir: JobDir) -> bool:
    """Training really runs: workers started and epoch 0's checkpoint is written, so the
    preemption checkpoint lands mid-epoch 1, at a global step that is not 0."""
    return bool(kind_events(jobdir, "workers.started")) and (
        jobdir.checkpoints / "last.pt").exists()


def assert_resumed(jobdir: JobDir) -> tuple[int, int]:
    """Rank 0 checkpointed in attempt 0 and attempt 1 started exactly there; return
    (global step checkpointed, global step attempt 1 started at)."""
    first = CHECKPOINTED.search(rank_stdout(jobdir, 0, 0))
    assert first, rank_stdout(jobdir, 0, 0)[-2000:]
    second = RESUMED.search(rank_stdout(jobdir, 1, 0))
    assert second, rank_stdout(jobdir, 1, 0)[-2000:]
    assert second.group(1) == "1", "the worker sees the attempt counter"
    assert second.group(2, 3, 4) == first.group(1, 2, 3), "resumed from the checkpoint"
    assert int(second.group(4)) > 0, "not from global step 0"
    return int(first.group(3)), int(second.group(4))


def assert_one_requeue_and_attempt_1(jobdir: JobDir) -> None:
    """Both nodes got the signal, exactly one asked for the requeue (the O_EXCL claim), and
    attempt 1 ran on both nodes."""
    signalled = {e["node"] for e in kind_events(jobdir, "preemption.signal")
                 if e["attempt"] == 0}
    assert signalled == set(jobdir.node_names()) and len(signalled) == 2
    requeues = kind_events(jobdir, "requeue")
    assert len(requeues) == 1, requeues
    assert (jobdir.path / "requeue" / "attempt-0").read_text().strip() == requeues[0]["node"]
    preempted = [e for e in kind_events(jobdir, "agent.preempted") if e["attempt"] == 0]
    assert len(preempted) == 2, "a node ended without its final event"
    assert sorted(requeues[0]["nodes_done"]) == sorted(jobdir.node_names())
    assert sum(e["requeued_by_this_node"] for e in preempted) == 1
    assert not [e for e in kind_events(jobdir, "worker.failed") if e["attempt"] == 0], \
        "the preempted workers exited cleanly"
    assert {e["node"] for e in events(jobdir) if e["attempt"] == 1} == set(jobdir.node_names())
    assert not kind_events(jobdir, "requeue.failed")


def workers_checkpointed_at(jobdir: JobDir) -> float:
    """Time rank 0 finished its preemption checkpoint (the mtime of the file it printed
    after), for the signal -> checkpoint measurement."""
    (path,) = jobdir.path.glob("nodes/*/workers/attempt-0/restart-*/rank-0/stdout.log")
    return path.stat().st_mtime


# -- unit: the claim and the single delivery --------------------------------------------------

def make_preemption(tmp_path: Path, node: str, log: list[tuple[str, dict[str, Any]]],
                    requeue: Callable[[], None] | None, round_size: int = 1,
                    grace: float = 60) -> Preemption:
    return Preemption(signal_name="USR1", grace=grace,
                      claim_path=tmp_path / "requeue" / "attempt-0",
                      node=node, requeue=requeue,
                      record=lambda kind, **fields: log.append((kind, fields)),
                      worker_pids=list, round_size=lambda: round_size)


def test_the_requeue_waits_until_every_node_of_the_round_is_done(tmp_path: Path) -> None:
    """The requeue makes Slurm kill every step after KillWait: the node that asks for it waits
    until the other nodes are done, so none ends without its final event."""
    calls: list[float] = []
    logs: list[list[tuple[str, dict[str, Any]]]] = [[], []]
    first, second = (make_preemption(tmp_path, f"n{i}", logs[i],
                                     lambda: calls.append(time.monotonic()), round_size=2)
                     for i in range(2))
    first.received_at = second.received_at = time.time()
    asking = threading.Thread(target=first.finish)
    asking.start()
    time.sleep(1.0)
    assert not calls, "requeued while the other node was still busy"
    said_done = time.monotonic()
    second.finish()
    asking.join(timeout=10)
    assert len(calls) == 1 and calls[0] >= said_done
    (requeue,) = [fields for kind, fields in logs[0] if kind == "requeue"]
    assert requeue["nodes_done"] == ["n0", "n1"] and requeue["nodes_expected"] == 2


def test_a_node_known_lost_is_not_waited_for(tmp_path: Path) -> None:
    calls: list[float] = []
    log: list[tuple[str, dict[str, Any]]] = []
    node = Preemption(signal_name="USR1", grace=30, claim_path=tmp_path / "requeue" / "attempt-0",
                      node="n0", requeue=lambda: calls.append(time.time()),
                      record=lambda kind, **fields: log.append((kind, fields)),
                      worker_pids=list, round_size=lambda: 2, lost_nodes=lambda: 1)
    node.received_at = time.time()
    node.finish()
    assert len(calls) == 1 and calls[0] - node.received_at < 5


def test_a_node_that_never_says_done_delays_the_requeue_only_until_grace_ends(
        tmp_path: Path) -> None:
    calls: list[float] = []
    log: list[tuple[str, dict[str, Any]]] = []
    node = make_preemption(tmp_path, "n0", log, lambda: calls.append(time.time()),
                           round_size=3, grace=1.5)
    node.received_at = time.time()
    node.finish()
    assert len(calls) == 1 and 1.3 <= calls[0] - node.received_at < 5
    (requeue,) = [fields for kind, fields in log if kind == "requeue"]
    assert requeue["nodes_done"] == ["n0"] and requeue["nodes_expected"] == 3


def test_exactly_one_node_claims_the_requeue(tmp_path: Path) -> None:
    calls: list[str] = []
    logs: list[list[tuple[str, dict[str, Any]]]] = [[], [], []]
    nodes = [make_preemption(tmp_path, f"n{i}", logs[i], lambda i=i: calls.append(f"n{i}"))
             for i in range(3)]
    for node in nodes:
        node.finish()
        node.finish()  # idempotent
    assert len(calls) == 1
    assert [node.requeued_by_us for node in nodes].count(True) == 1
    assert (tmp_path / "requeue" / "attempt-0").read_text() == calls[0] + "\n"
    assert sum(kind == "requeue" for log in logs for kind, _ in log) == 1


def test_a_failing_requeue_is_reported_not_raised(tmp_path: Path) -> None:
    log: list[tuple[str, dict[str, Any]]] = []

    def broken() -> None:
        raise RuntimeError("scontrol: error: Invalid job id")

    node = make_preemption(tmp_path, "n1", log, broken)
    node.finish()
    assert not node.requeued_by_us
    assert [kind for kind, _ in log] == ["requeue", "requeue.failed"]


def test_signal_reaches_a_starting_worker_once_its_handler_is_installed(tmp_path: Path) -> None:
    """A worker inherits SIG_IGN (the agent starts workers that way) and installs its handler
    later: the forward waits for the handler, then delivers exactly once."""
    ready = tmp_path / "ready"
    script = (
        "import signal, sys, time, pathlib\n"
        "got = []\n"
        "time.sleep(0.5)\n"
        "signal.signal(signal.SIGUSR1, lambda s, f: got.append(s))\n"
        f"pathlib.Path({str(ready)!r}).write_text('x')\n"
        "deadline = time.monotonic() + 10\n"
        "while time.monotonic() < deadline and not got: time.sleep(0.02)\n"
        "time.sleep(0.5)\n"
        "print(len(got))\n"
    )
    log: list[tuple[str, dict[str, Any]]] = []
    node = make_preemption(tmp_path, "n1", log, None)
    previous = signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    try:
        worker = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                                  text=True)
    finally:
        signal.signal(signal.SIGUSR1, previous)
    try:
        node._worker_pids = lambda: [worker.pid]
        assert ignores_signal(worker.pid, signal.SIGUSR1)
        node._on_signal(signal.SIGUSR1, None)
        assert log[0][0] == "preemption.signal" and log[0][1]["not_ready"] == [worker.pid]
        wait_for("the worker's handler", ready.exists, 10, every=0.05)
        for _ in range(5):  # every monitor round; only the first after the handler delivers
            node.forward_again()
            time.sleep(0.05)
        out, _ = worker.communicate(timeout=20)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
    assert out.strip() == "1"
    assert [kind for kind, _ in log] == ["preemption.signal", "preemption.forwarded"]


# -- local mode ------------------------------------------------------------------------------

@pytest.mark.slow
def test_local_preemption_checkpoints_and_resumes_in_attempt_1(tmp_path: Path) -> None:
    started = time.monotonic()
    args = [sys.executable, "-m", "hpc_elastic", "submit", str(REPO / "examples" / "demo.yaml"),
            "--local", "--set", f"job_root={tmp_path}", "--set", "nodes=2",
            "--set", f"entrypoint.args={TRAIN_ARGS}", "--set", "preemption.grace=30"]
    launcher = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1"},
                                stdin=subprocess.DEVNULL)
    agent_pids: list[int] = []
    try:
        path = wait_for("the job directory",
                        lambda: next((p for p in tmp_path.iterdir() if p.is_dir()), None), 30)
        jobdir = JobDir(path)
        wait_for("training to run", lambda: training_runs(jobdir), 90)
        agents = json.loads((jobdir.path / "local-agents.json").read_text())
        assert agents["attempt"] == 0
        agent_pids = agents["pids"]
        signalled = time.time()
        for pid in agent_pids:
            os.kill(pid, signal.SIGUSR1)
        output, _ = launcher.communicate(timeout=150)
    finally:
        if launcher.poll() is None:  # stop what we started, by PID: agents, then the launcher
            for pid in agent_pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
            launcher.terminate()
            launcher.communicate(timeout=30)
    assert launcher.returncode == 0, output[-4000:]
    assert "attempt 0 was preempted; starting attempt 1" in output
    assert_one_requeue_and_attempt_1(jobdir)
    assert output.count("preemption signal, checkpointed") == 4, "every worker took part"
    checkpointed, resumed = assert_resumed(jobdir)
    assert "training finished at global step 24" in rank_stdout(jobdir, 1, 0)
    assert [e["kind"] for e in events(jobdir) if e["attempt"] == 1][-1] == "agent.succeeded"
    print(f"\nlocal: signal -> checkpoint {workers_checkpointed_at(jobdir) - signalled:.2f} s, "
          f"checkpoint at global step {checkpointed}, resumed at {resumed}, "
          f"whole test {time.monotonic() - started:.1f} s")


# -- the real Slurm test cluster -------------------------------------------------------------

@pytest.mark.slurm
@pytest.mark.slow
def test_slurm_preemption_requeues_once_and_resumes(slurm_cluster: Any, tmp_path: Path) -> None:
    started = time.monotonic()
    args = [sys.executable, "-m", "hpc_elastic", "submit", str(REPO / "examples" / "demo.yaml"),
            "--set", f"job_root={tmp_path}", "--set", "slurm.time=5", "--set", "nodes=2",
            "--set", "nproc_per_node=1",  # 2 ranks; saves 2 workers' `import torch` per start
            "--set", f"entrypoint.args={TRAIN_ARGS}", "--set", "preemption.grace=30"]
    env = {**slurm_cluster.env, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(args, capture_output=True, text=True, timeout=60, env=env,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stdout + result.stderr
    (path,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    jobdir = JobDir(path)
    job_id = int(json.loads(jobdir.submission.read_text())["job_id"])
    try:
        wait_for("training to run", lambda: training_runs(jobdir), 90)
        signalled = time.time()
        slurm_cluster.run(["scancel", "--signal=USR1", str(job_id)])
        wait_for("the requeue", lambda: kind_events(jobdir, "requeue"), 60)
        requeued = time.time()
        job = wait_for("Restarts=1", lambda: (slurm_cluster.scontrol_job(job_id) or {}).get(
            "Restarts") == "1" and slurm_cluster.job_state(job_id) == "PENDING", 60)
        assert job
        # A requeued job waits ~2 min on BeginTime (Slurm's own rule); start it now.
        slurm_cluster.release(job_id)

        def attempt_1_started() -> list[dict[str, Any]]:
            started = [e for e in kind_events(jobdir, "workers.started") if e["attempt"] == 1]
            if not started and (state := slurm_cluster.job_state(job_id)) in TERMINAL_STATES:
                pytest.fail(f"job {job_id} ended {state} before attempt 1 ran")
            return started

        wait_for("attempt 1 to run", attempt_1_started, 90)
        second_running = time.time()
        state = slurm_cluster.wait_job(job_id, timeout=120)
        logs = "\n".join(p.read_text(errors="replace")[-1500:]
                         for p in sorted(jobdir.slurm_logs.glob("*")))
        assert state == "COMPLETED", logs
    finally:
        if slurm_cluster.job_state(job_id) not in (None, "COMPLETED", "CANCELLED", "FAILED"):
            slurm_cluster.run(["scancel", str(job_id)])
    assert_one_requeue_and_attempt_1(jobdir)
    assert (slurm_cluster.scontrol_job(job_id) or {}).get("Restarts") == "1"
    checkpointed, resumed = assert_resumed(jobdir)
    assert "training finished at global step 24" in rank_stdout(jobdir, 1, 0)
    assert {e["attempt"] for e in events(jobdir)} == {0, 1}
    for node in jobdir.node_names():
        assert [e["kind"] for e in read_jsonl(jobdir.events(node))][-1] == "agent.succeeded"
    summary = summary_json(jobdir)
    summary_text(jobdir)
    assert summary["status"] == "succeeded" and summary["attempts"] == 2
    assert summary["requeues"] == 1 and summary["preemptions"]
    assert not summary["failures"], "a preemption is not a failure"
    assert_nothing_left(slurm_cluster, jobdir)
    print(f"\nslurm: signal -> checkpoint {workers_checkpointed_at(jobdir) - signalled:.2f} s, "
          f"signal -> requeue event {requeued - signalled:.2f} s, requeue -> attempt 1 running "
          f"{second_running - requeued:.2f} s (with release), checkpoint at global step "
          f"{checkpointed}, resumed at {resumed}, whole test {time.monotonic() - started:.1f} s")
