"""``cancel`` of a local job signals its agents and nothing else (issue 14, class 8).

The launcher records each agent's PID with its start time and command line; a recorded PID that
now belongs to another process (the kernel reuses PIDs) must never be signalled.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hpc_elastic import procs
from hpc_elastic.jobdir import JobDir
from hpc_elastic.jobs import cancel_job, job_status
from hpc_elastic.submit import Submission, write_submission
from hpc_elastic.telemetry import read_jsonl


@pytest.fixture
def bystander() -> Iterator[subprocess.Popen[bytes]]:
    """An unrelated process of the same user: what a reused PID belongs to."""
    proc = subprocess.Popen(["sleep", "300"])
    yield proc
    proc.kill()
    proc.wait()


def local_jobdir(tmp_path: Path, agents: dict[str, object]) -> JobDir:
    jobdir = JobDir(tmp_path / "demo-20260101-000000-abcd")
    jobdir.path.mkdir(parents=True)
    write_submission(jobdir, Submission("local", "local-demo", time.time(), "demo"))
    (jobdir.path / "local-agents.json").write_text(json.dumps(agents))
    return jobdir


def test_a_recorded_pid_now_used_by_another_process_is_not_signalled(
        tmp_path: Path, bystander: subprocess.Popen[bytes]) -> None:
    """What a reused PID looks like: the PID is alive, but its start time is not the one the
    launcher recorded for its agent."""
    now = procs.record(bystander.pid)
    assert now is not None
    agent_was = procs.ProcessRecord(bystander.pid, now.start_ticks - 1,
                                    (sys.executable, "-m", "hpc_elastic", "agent", "x"))
    jobdir = local_jobdir(tmp_path, {"attempt": 0, "pids": [bystander.pid],
                                     "agents": [agent_was.to_json()]})
    message = cancel_job(jobdir, wait_s=1)
    time.sleep(0.2)
    assert bystander.poll() is None, "an unrelated process was killed"
    assert "not running" in message
    assert job_status(jobdir).queue_state == "ENDED"


def test_a_process_recorded_right_after_it_was_started_is_recognised_later() -> None:
    """Right after ``Popen`` returns the child may still be inside ``execve`` with an empty
    ``/proc/<pid>/cmdline`` (before the fix: 90 of 200 records were empty). Such a record
    matched nothing later, so ``cancel`` did not count or signal that agent."""
    for _ in range(40):
        proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
        try:
            rec = procs.record(proc.pid)
            assert rec is not None and rec.cmdline[-2:] == ("-c", "import time; time.sleep(30)")
            assert procs.is_same(rec)
        finally:
            proc.kill()
            proc.wait()


def test_a_zombie_is_not_recorded(bystander: subprocess.Popen[bytes]) -> None:
    proc = subprocess.Popen(["true"])
    # Until it exited, not reaped: a zombie (state Z) without a command line. (An empty command
    # line alone is no proof: it also reads empty while the child is still in execve.)
    deadline = time.monotonic() + 30
    while Path(f"/proc/{proc.pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z":
        assert time.monotonic() < deadline, "the child did not exit"
        time.sleep(0.01)
    started = time.monotonic()
    assert procs.record(proc.pid) is None
    assert time.monotonic() - started < 1, "a zombie is not waited for"
    proc.wait()


def test_a_file_with_bare_pids_only_signals_this_jobs_agents(
        tmp_path: Path, bystander: subprocess.Popen[bytes]) -> None:
    """A job directory written before the launcher recorded start times: its PIDs are trusted
    only for processes whose command line is this job's agent."""
    jobdir = local_jobdir(tmp_path, {"attempt": 0, "pids": [bystander.pid]})
    cancel_job(jobdir, wait_s=1)
    time.sleep(0.2)
    assert bystander.poll() is None, "an unrelated process was killed"


def test_garbage_in_the_agents_file_is_no_process(tmp_path: Path,
                                                  bystander: subprocess.Popen[bytes]) -> None:
    jobdir = local_jobdir(tmp_path, {"agents": [{"pid": bystander.pid}, {"pid": "1"}, 7, None],
                                     "launcher_process": {"pid": bystander.pid}})
    assert "not running" in cancel_job(jobdir, wait_s=1)
    assert bystander.poll() is None


def test_a_recorded_launcher_pid_now_used_by_another_process_is_not_signalled(
        tmp_path: Path, bystander: subprocess.Popen[bytes]) -> None:
    """``cancel`` signals a local job's launcher first: the same check applies to it."""
    now = procs.record(bystander.pid)
    assert now is not None
    was = procs.ProcessRecord(bystander.pid, now.start_ticks + 5,
                              (sys.executable, "-m", "hpc_elastic.local", "x"))
    for content in ({"launcher": bystander.pid, "launcher_process": was.to_json(), "pids": []},
                    {"launcher": bystander.pid, "pids": []}):
        jobdir = local_jobdir(tmp_path / str(len(content)), content)
        assert "not running" in cancel_job(jobdir, wait_s=1)
        assert job_status(jobdir).queue_state == "ENDED"
    time.sleep(0.2)
    assert bystander.poll() is None, "an unrelated process was killed"


@pytest.mark.slow
def test_cancel_stops_the_agents_of_a_running_local_job(tmp_path: Path) -> None:
    (tmp_path / "train.py").write_text("import time\ntime.sleep(300)\n")
    (tmp_path / "job.yaml").write_text("name: sleeper\nentrypoint: train.py\nnodes: 2\n"
                                       "job_root: jobs\n")
    launcher = subprocess.Popen(
        [sys.executable, "-m", "hpc_elastic", "submit", str(tmp_path / "job.yaml"), "--local"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        jobdir = None
        while time.monotonic() < deadline:
            dirs = list((tmp_path / "jobs").glob("sleeper-*"))
            if dirs and (dirs[0] / "local-agents.json").exists() and any(
                    e["kind"] == "workers.started"
                    for n in JobDir(dirs[0]).node_names()
                    for e in read_jsonl(JobDir(dirs[0]).events(n), missing_ok=True)):
                jobdir = JobDir(dirs[0])
                break
            time.sleep(0.3)
        assert jobdir is not None, "the job did not start"
        assert job_status(jobdir).queue_state == "RUNNING"
        message = cancel_job(jobdir, wait_s=60)
        assert "cancelled: stopped 2 local agent(s)" in message and "killed" not in message
        launcher.wait(timeout=60)
        assert job_status(jobdir).queue_state == "ENDED"
        for node in jobdir.node_names():
            events = read_jsonl(jobdir.events(node))
            assert [e for e in events if e["kind"] == "shutdown"], (
                node, [(e["kind"], e.get("message")) for e in events],
                (jobdir.path / "nodes" / node / "agent.log").read_text(errors="replace")[-3000:])
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
