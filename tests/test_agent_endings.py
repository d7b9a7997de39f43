"""Every way an agent ends leaves a final event saying why (issue 14, class 6).

Real agents, real workers, real faults: a rendezvous nobody else joins, an empty ``error.json``,
a job directory on a filesystem that fills up or turns read-only (a small tmpfs mounted by the
test; we are root), a fallback log directory another user took first. After each, ``status``,
``list`` and ``logs summary`` say how the job ended and why -- never "running" for ever.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from other_users import ensure_user, needs_root

from hpc_elastic.analysis import Job
from hpc_elastic.analysis.summary import summarize
from hpc_elastic.config import load_config
from hpc_elastic.jobdir import JobDir
from hpc_elastic.jobs import job_status, list_jobs
from hpc_elastic.submit import Submission, create_jobdir, write_submission
from hpc_elastic.telemetry import read_jsonl

pytestmark = pytest.mark.slow


def events(path: Path) -> list[dict]:
    return list(read_jsonl(path, missing_ok=True))


def make_job(tmp_path: Path, script: str, *lines: str, root: Path | None = None) -> Path:
    (tmp_path / "w.py").write_text(script)
    path = tmp_path / "job.yaml"
    path.write_text("\n".join(["name: ending", "entrypoint: w.py",
                               f"job_root: {root or tmp_path / 'jobs'}",
                               "env: {OMP_NUM_THREADS: 1}", *lines]) + "\n")
    return path


def run_one_agent(tmp_path: Path, job: Path,
                  **env: str) -> tuple[JobDir, subprocess.CompletedProcess]:
    """One agent of the job, started as ``srun`` would (node local0)."""
    config = load_config(job)
    jobdir = JobDir(Path(config.job_root) / "ending-20260101-000000-abcd")
    create_jobdir(config, jobdir)
    result = subprocess.run(
        [sys.executable, "-m", "hpc_elastic", "agent", str(jobdir.path)],
        capture_output=True, text=True, timeout=180,
        env={**os.environ, "HPC_ELASTIC_NODE_NAME": "local0", "HPC_ELASTIC_JOB_ID": "t-ending",
             "TMPDIR": str(tmp_path / "tmp"), **env})
    return jobdir, result


def submit_local(job: Path, tmp_path: Path) -> tuple[JobDir, subprocess.CompletedProcess]:
    result = subprocess.run(
        [sys.executable, "-m", "hpc_elastic", "submit", str(job), "--local"],
        capture_output=True, text=True, timeout=180,
        env={**os.environ, "TMPDIR": str(tmp_path / "tmp")})
    root = Path(load_config(job).job_root)
    (path,) = [p for p in root.iterdir() if p.is_dir()]
    return JobDir(path), result


def assert_ended_with(jobdir: JobDir, reason: str) -> dict:
    """The last event is agent.failed with ``reason``, and every view of the job says so."""
    last = events(jobdir.events("local0"))[-1]
    assert last["kind"] == "agent.failed", last
    assert reason in last.get("reason", "") + json.dumps(last.get("failures")), last
    summary = summarize(Job(jobdir))
    assert summary["status"] == "failed"
    assert summary["root_cause"] is not None and reason in summary["root_cause"]["message"]
    assert list_jobs(jobdir.path.parent)[0]["outcome"] == "failed"
    return last


@pytest.fixture
def tmp_path(tmp_path: Path) -> Path:
    (tmp_path / "tmp").mkdir()
    return tmp_path


def test_a_join_timeout_is_the_agents_final_event_and_the_root_cause(tmp_path: Path) -> None:
    job = make_job(tmp_path, "print('never runs')\n", "nodes: 2",
                   "rendezvous: {join_timeout: 2}")
    jobdir, result = run_one_agent(tmp_path, job)
    assert result.returncode == 1, result.stderr[-2000:]
    last = assert_ended_with(jobdir, "Timeout")
    assert last["error_type"] and "Traceback" in last["traceback"]
    assert "ended: " in result.stderr and "Traceback" not in result.stderr
    status = job_status(jobdir).render()
    assert "agent: " in status and "Timeout" in status


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_while_waiting_for_the_other_nodes_leaves_a_shutdown_event(
        tmp_path: Path, sig: signal.Signals) -> None:
    """``scancel``/``cancel`` of a job whose rendezvous has not formed yet: torch's own signal
    handler is not installed before the first workers start, and the agent used to die on the
    spot -- no final event, the job "running" for ever (seen in test_cancel_local)."""
    job = make_job(tmp_path, "print('never runs')\n", "nodes: 2")
    config = load_config(job)
    jobdir = JobDir(Path(config.job_root) / "ending-20260101-000000-abcd")
    create_jobdir(config, jobdir)
    agent = subprocess.Popen(
        [sys.executable, "-m", "hpc_elastic", "agent", str(jobdir.path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "HPC_ELASTIC_NODE_NAME": "local0", "HPC_ELASTIC_JOB_ID": "t-ending",
             "TMPDIR": str(tmp_path / "tmp")},
        # A suite started in the background (CI) has SIGINT ignored, and the agent keeps an
        # inherited "ignore" (nohup's meaning): give it the default, as a terminal would.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 120
        while not [e for e in events(jobdir.events("local0")) if e["kind"] == "rendezvous.started"]:
            assert time.monotonic() < deadline and agent.poll() is None, "never joined"
            time.sleep(0.1)
        agent.send_signal(sig)
        _, err = agent.communicate(timeout=60)
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
    assert agent.returncode == 128 + sig, err[-2000:]
    last = events(jobdir.events("local0"))[-1]
    assert last["kind"] == "shutdown" and last["signal"] == sig.name, last
    assert "Traceback" not in err, err[-2000:]
    assert job_status(jobdir).as_dict()["status"] != "running"


def test_an_unreadable_job_yaml_still_leaves_a_final_event(tmp_path: Path) -> None:
    job = make_job(tmp_path, "print('hi')\n")
    config = load_config(job)
    jobdir = JobDir(Path(config.job_root) / "ending-20260101-000000-abcd")
    create_jobdir(config, jobdir)
    jobdir.config.write_bytes(b"name: caf\xe9\n")
    result = subprocess.run([sys.executable, "-m", "hpc_elastic", "agent", str(jobdir.path)],
                            capture_output=True, text=True, timeout=120,
                            env={**os.environ, "HPC_ELASTIC_NODE_NAME": "local0"})
    assert result.returncode == 2 and "UTF-8" in result.stderr
    assert_ended_with(jobdir, "UTF-8")


EMPTY_ERROR_FILE = """\
import os, sys
if os.environ["TORCHELASTIC_RESTART_COUNT"] == "0":
    open(os.environ["TORCHELASTIC_ERROR_FILE"], "w").close()  # what a full disk leaves
    sys.exit(1)
print("second start succeeded")
"""


def test_an_empty_error_file_is_a_failure_that_uses_a_restart(tmp_path: Path) -> None:
    """torch's own parser of error files crashed on an empty one and took the agent down."""
    jobdir, result = submit_local(make_job(tmp_path, EMPTY_ERROR_FILE, "max_restarts: 1"),
                                  tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    # torch's parser logs a traceback for the file; the agent handles it, so none is shown.
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    kinds = [e["kind"] for e in events(jobdir.events("local0"))]
    assert "worker.error_file_unreadable" in kinds and kinds[-1] == "agent.succeeded"
    (kept,) = jobdir.nodes.glob("local0/workers/attempt-0/restart-0/rank-0/error.json.unreadable")
    assert kept.stat().st_size == 0
    summary = summarize(Job(jobdir))
    assert summary["status"] == "succeeded" and summary["restarts_after_failure"] == 1


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 24 MiB tmpfs: a job directory that can fill up or be made read-only."""
    needs_root()
    mount = tmp_path / "fs"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m,mode=0700", "tmpfs", str(mount)],
                   check=True)
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


FILL_THE_DISK = """\
import os, sys
ckpt = os.path.join(os.environ["HPC_ELASTIC_CHECKPOINT_DIR"], "huge.pt")
try:
    with open(ckpt, "ab") as out:
        while True:
            out.write(b"x" * (1 << 20))
            out.flush()
except OSError as err:
    print("disk full:", err, file=sys.stderr)
try:  # what @record leaves on a full disk: an empty error file (tmpfs may refuse even that)
    open(os.environ["TORCHELASTIC_ERROR_FILE"], "w").close()
except OSError:
    pass
sys.exit(1)
"""


def test_a_full_job_directory_still_gets_the_final_event(tmp_path: Path, small_fs: Path) -> None:
    job = make_job(tmp_path, FILL_THE_DISK, "max_restarts: 1", root=small_fs / "jobs")
    jobdir, result = submit_local(job, tmp_path)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    # The final event is there, whole (the line cut by the full disk before it is skipped),
    # although the disk is still full: the agent freed its reserve for it.
    last = events(jobdir.events("local0"))[-1]
    assert last["kind"] == "agent.failed", last
    assert summarize(Job(jobdir))["status"] == "failed"
    assert list_jobs(jobdir.path.parent)[0]["outcome"] == "failed"


@pytest.fixture
def read_only_nodes(tmp_path: Path) -> Iterator[JobDir]:
    """A job directory whose ``nodes/`` (where agents write their logs) is mounted read-only,
    as after a node's mount went read-only. The rest of the job directory works."""
    needs_root()
    job = make_job(tmp_path, "import sys\nprint('failing')\nsys.exit(1)\n", "max_restarts: 0")
    config = load_config(job)
    jobdir = JobDir(Path(config.job_root) / "ending-20260101-000000-abcd")
    create_jobdir(config, jobdir)
    nodes = str(jobdir.nodes)
    subprocess.run(["mount", "--bind", nodes, nodes], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", nodes], check=True)
        yield jobdir
    finally:
        subprocess.run(["umount", nodes], check=False)


def run_local0_agent(jobdir: JobDir, job_id: str, tmpdir: Path) -> subprocess.CompletedProcess:
    """One agent, as node local0 of job ``job_id``, with its own TMPDIR (its fallback logs)."""
    return subprocess.run(
        [sys.executable, "-m", "hpc_elastic", "agent", str(jobdir.path)],
        capture_output=True, text=True, timeout=180,
        env={**os.environ, "HPC_ELASTIC_NODE_NAME": "local0", "HPC_ELASTIC_JOB_ID": job_id,
             "TMPDIR": str(tmpdir)})


def test_a_read_only_job_directory_puts_the_final_event_in_the_fallback(
        tmp_path: Path, read_only_nodes: JobDir) -> None:
    jobdir = read_only_nodes
    result = run_local0_agent(jobdir, "t-ro", tmp_path / "tmp")
    assert result.returncode == 1, result.stderr[-3000:]
    fallback = (tmp_path / "tmp" / f"hpc_elastic-logs-{os.getuid()}" / jobdir.path.name
                / "nodes" / "local0")
    last = (events(fallback / "events.jsonl") or [{}])[-1]
    assert last.get("kind") == "agent.failed", result.stderr[-3000:]
    assert last["failures"][0]["exitcode"] == 1, last
    assert str(fallback / "events.jsonl") in result.stderr
    assert "failing" in (fallback / "workers/attempt-0/restart-0/rank-0/stdout.log").read_text()


FAKE_SLURM = Path(__file__).resolve().parent / "fake_slurm"


def cli(*args: str, tmpdir: Path, fake: Path) -> subprocess.CompletedProcess:
    """``hpc-elastic ARGS`` with the queue of tests/fake_slurm and this TMPDIR."""
    return subprocess.run(
        [sys.executable, "-m", "hpc_elastic", *args], capture_output=True, text=True,
        timeout=120, env={**os.environ, "PATH": f"{FAKE_SLURM}:{os.environ['PATH']}",
                          "FAKE_SLURM_DIR": str(fake), "TMPDIR": str(tmpdir)})


def test_a_slurm_job_whose_job_directory_was_read_only_is_not_running_for_ever(
        tmp_path: Path, read_only_nodes: JobDir) -> None:
    """Issue 14, gap A: the agent (on "node" local0, its TMPDIR tmp/) could write its final
    event only to its fallback directory. ``list`` and ``logs summary`` must say how the job
    ended: from the fallback when it is on this machine, else from the queue -- and where the
    final event is -- never "running" or "not started"."""
    jobdir = read_only_nodes
    write_submission(jobdir, Submission(mode="slurm", job_id="4242", submitted_at=time.time(),
                                        name="ending"))
    result = run_local0_agent(jobdir, "4242", tmp_path / "tmp")
    assert result.returncode == 1, result.stderr[-3000:]
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "sacct-4242").write_text("FAILED\n")
    root = str(jobdir.path.parent)

    # On the login node (another TMPDIR): only the queue can tell.
    login = tmp_path / "login-tmp"
    login.mkdir()
    rows = json.loads(cli("list", "--root", root, "--json", tmpdir=login, fake=fake).stdout)
    assert rows[0]["outcome"].startswith("ended") and "the queue says FAILED" in rows[0]["outcome"]
    summary = cli("logs", "summary", str(jobdir.path), tmpdir=login, fake=fake)
    said = summary.stdout + summary.stderr
    assert "the queue says FAILED" in said, said
    where = f"$TMPDIR/hpc_elastic-logs-{os.getuid()}/{jobdir.path.name}/nodes/<node>/events.jsonl"
    assert where in said, said
    # Still in the queue: nobody may call it ended.
    (fake / "queue-4242").write_text("RUNNING")
    rows = json.loads(cli("list", "--root", root, "--json", tmpdir=login, fake=fake).stdout)
    assert not rows[0]["outcome"].startswith("ended"), rows
    (fake / "queue-4242").unlink()

    # On the node itself: the final event is read from the fallback, with the worker's exit.
    node_tmp = tmp_path / "tmp"
    rows = json.loads(cli("list", "--root", root, "--json", tmpdir=node_tmp, fake=fake).stdout)
    assert rows[0]["outcome"] == "failed", rows
    summary = cli("logs", "summary", str(jobdir.path), "--json", tmpdir=node_tmp, fake=fake)
    data = json.loads(summary.stdout)
    assert data["status"] == "failed", data
    assert data["root_cause"] is not None and data["root_cause"]["node"] == "local0", data
    assert any("were read from" in note for note in data["notes"]), data["notes"]


SLEEPER = "import time\ntime.sleep(600)\n"


def test_a_killed_local_job_is_not_running_for_ever(tmp_path: Path) -> None:
    """SIGKILL leaves no chance for a final event: once the agents are gone, status, list and
    logs summary say the job ended (and why they cannot say more)."""
    job = make_job(tmp_path, SLEEPER, "max_restarts: 0")
    launcher = subprocess.Popen([sys.executable, "-m", "hpc_elastic", "submit", str(job),
                                 "--local"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            dirs = list((tmp_path / "jobs").glob("ending-*"))
            started = dirs and [e for e in events(JobDir(dirs[0]).events("local0"))
                                if e["kind"] == "worker.started"]
            if started:
                break
            assert time.monotonic() < deadline and launcher.poll() is None, "no worker started"
            time.sleep(0.2)
        jobdir = JobDir(dirs[0])
        assert job_status(jobdir).as_dict()["status"] == "running"
        agent = json.loads(jobdir.local_agents.read_text())["pids"][0]
        os.kill(agent, 9)
        os.kill(int(started[0]["worker_id"]), 9)
        launcher.communicate(timeout=60)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
    status = job_status(jobdir)
    assert status.queue_state == "ENDED" and status.as_dict()["status"] == "ended"
    assert list_jobs(jobdir.path.parent)[0]["outcome"] == "ended, no final event"
    job_ = Job(jobdir)
    assert summarize(job_)["status"] == "ended"
    assert any("without a final event" in note for note in job_.notes)


def test_an_unusable_fallback_log_directory_ends_the_agent_with_its_reason(
        tmp_path: Path) -> None:
    """The worker logs cannot go into the job directory, and the fallback directory on the node
    was created first by another user: the agent ends, and says why."""
    needs_root()
    uid = ensure_user("hpce14other")
    taken = tmp_path / "tmp" / f"hpc_elastic-logs-{os.getuid()}"
    taken.mkdir(mode=0o777)
    os.chown(taken, uid, -1)
    job = make_job(tmp_path, "print('hi')\n")
    config = load_config(job)
    jobdir = JobDir(Path(config.job_root) / "ending-20260101-000000-abcd")
    create_jobdir(config, jobdir)
    jobdir.node("local0").mkdir()
    (jobdir.node("local0") / "workers").write_text("not a directory\n")
    result = subprocess.run(
        [sys.executable, "-m", "hpc_elastic", "agent", str(jobdir.path)],
        capture_output=True, text=True, timeout=180,
        env={**os.environ, "HPC_ELASTIC_NODE_NAME": "local0", "TMPDIR": str(tmp_path / "tmp")})
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert_ended_with(jobdir, "another user")
    assert list(taken.iterdir()) == [], "nothing written into the other user's directory"


def test_a_corrupt_rendezvous_state_is_the_agents_final_event(tmp_path: Path) -> None:
    """A first agent leaves the run's rendezvous state; it is then damaged (a disk error, a
    hostile write), and the next agent of that run cannot read it: it ends, and says why."""
    job = make_job(tmp_path, "print('hi')\n")
    jobdir, first = run_one_agent(tmp_path, job)
    assert first.returncode == 0, first.stderr[-2000:]
    damaged = [p for p in jobdir.rendezvous.rglob("versions/*") if p.is_file()]
    assert damaged, sorted(jobdir.rendezvous.rglob("*"))
    for path in damaged:
        path.write_bytes(b'{"format": "garbage"}\n')
    result = subprocess.run(
        [sys.executable, "-m", "hpc_elastic", "agent", str(jobdir.path)],
        capture_output=True, text=True, timeout=180,
        env={**os.environ, "HPC_ELASTIC_NODE_NAME": "local0", "HPC_ELASTIC_JOB_ID": "t-ending",
             "TMPDIR": str(tmp_path / "tmp")})
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    last = events(jobdir.events("local0"))[-1]
    assert last["kind"] == "agent.failed" and "Corrupt" in last["error_type"], last
