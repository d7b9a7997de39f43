"""The batch supervisor's heartbeat and the agents' watch on it (hpc_elastic/batch_heartbeat.py):
a live supervisor is never judged dead, a stopped one is after the timeout, and a missing or
foreign file is never trusted. The whole path (power-cut batch host -> requeue -> resume) runs
on the Slurm test cluster: tests/test_e2e_slurm.py."""

from __future__ import annotations

import os
import time
from pathlib import Path

from hpc_elastic.batch_heartbeat import (
    SupervisorHeartbeat,
    SupervisorWatch,
    batch_host,
    heartbeat_path,
)
from hpc_elastic.jobdir import JobDir, make_dir
from hpc_elastic.telemetry.jsonl import JsonlWriter


def _jobdir(tmp_path: Path) -> JobDir:
    jobdir = JobDir(tmp_path / "job")
    make_dir(jobdir.path)
    return jobdir


def test_a_beating_supervisor_stays_alive_and_a_stopped_one_is_dead_after_the_timeout(
    tmp_path: Path
) -> None:
    jobdir = _jobdir(tmp_path)
    beat = SupervisorHeartbeat(jobdir, "42", 0, interval=0.05)
    watch = SupervisorWatch(jobdir, "42", 0, interval=0.05, timeout=0.5, on_lost=lambda s: None)
    try:
        assert heartbeat_path(jobdir, "42", 0).name == "42.attempt-0.alive"
        start = time.monotonic()
        while time.monotonic() - start < 1.5:
            assert watch.check() is None  # alive for three timeouts
            time.sleep(0.05)
    finally:
        beat.stop()
    now = time.monotonic()
    watch.check(now)  # takes in the last value written
    assert watch.check(now + 0.6) is not None  # silent for more than the timeout: dead


def test_the_watch_thread_reports_a_lost_supervisor_once(tmp_path: Path) -> None:
    jobdir = _jobdir(tmp_path)
    beat = SupervisorHeartbeat(jobdir, "7", 1, interval=0.05)
    lost: list[float] = []
    watch = SupervisorWatch(jobdir, "7", 1, interval=0.05, timeout=0.4, on_lost=lost.append)
    watch.start()
    time.sleep(0.8)
    assert lost == []
    beat.stop()
    deadline = time.monotonic() + 5
    while not lost and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    assert len(lost) == 1 and lost[0] >= 0.4


def test_no_file_or_a_foreign_file_is_never_judged(tmp_path: Path) -> None:
    """Plain batch scripts and local mode have no supervisor heartbeat: never judged dead. A
    symlink planted at the name is not followed (it could be made to look still)."""
    jobdir = _jobdir(tmp_path)
    watch = SupervisorWatch(jobdir, "9", 0, interval=0.05, timeout=0.1, on_lost=lambda s: None)
    now = time.monotonic()
    assert watch.check(now) is None and watch.check(now + 10) is None
    make_dir(jobdir.supervisor)
    target = tmp_path / "elsewhere"
    target.write_text("00000000000000000001\n")
    os.symlink(target, heartbeat_path(jobdir, "9", 0))
    assert watch.check(now) is None and watch.check(now + 10) is None


def test_batch_host_is_read_from_the_supervisors_start_record(tmp_path: Path) -> None:
    jobdir = _jobdir(tmp_path)
    assert batch_host(jobdir, "5", 0) is None
    make_dir(jobdir.supervisor)
    writer = JsonlWriter(jobdir.supervisor_events("5", 0))
    writer.write({"v": 1, "kind": "batch.start", "host": "n1", "time": time.time()})
    writer.close()
    assert batch_host(jobdir, "5", 0) == "n1"
