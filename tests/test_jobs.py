"""status / cancel / list / init / doctor, on real local and Slurm jobs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from e2e_helpers import (
    assert_nothing_left,
    processes_mentioning,
    summary_json,
    summary_text,
)
from slurm_cluster.fixture import SlurmCluster

from hpc_elastic.jobdir import JobDir
from hpc_elastic.telemetry import read_jsonl

REPO = Path(__file__).resolve().parent.parent
SLOW_TRAINING = "entrypoint.args=[--epochs, 50, --steps-per-epoch, 20, --step-sleep, 0.05]"


def cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None,
        timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hpc_elastic", *args], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=cwd, stdin=subprocess.DEVNULL)


def wait_for_training(jobdir_root: Path, nodes: int, timeout: float = 90) -> JobDir:
    """Wait until every node logged workers.started; return the job directory."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        dirs = [p for p in jobdir_root.iterdir() if p.is_dir()] if jobdir_root.exists() else []
        if dirs:
            jobdir = JobDir(dirs[0])
            started = [n for n in jobdir.node_names() if jobdir.events(n).exists() and any(
                e["kind"] == "workers.started" for e in read_jsonl(jobdir.events(n)))]
            if len(started) == nodes:
                return jobdir
        time.sleep(0.5)
    raise AssertionError(f"training did not start on {nodes} nodes within {timeout} s")


def workers_of(jobdir: JobDir) -> list[int]:
    """Worker PIDs, from the worker.started events (torch calls the pid ``worker_id``)."""
    return [int(e["worker_id"]) for n in jobdir.node_names() for e in read_jsonl(jobdir.events(n))
            if e["kind"] == "worker.started"]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and ") Z" not in stat.read_text()  # a zombie is gone for our purpose


@pytest.mark.slow
def test_local_job_status_cancel_and_list(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    job = subprocess.Popen(
        [sys.executable, "-m", "hpc_elastic", "submit", str(REPO / "examples" / "demo.yaml"),
         "--local", "--set", f"job_root={tmp_path}", "--set", SLOW_TRAINING],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        jobdir = wait_for_training(tmp_path, nodes=2)
        status = json.loads(cli("status", str(jobdir.path), "--json").stdout)
        assert status["queue_state"] == "RUNNING" and status["status"] == "running"
        assert status["nodes"] == ["local0", "local1"]
        workers = workers_of(jobdir)
        assert len(workers) == 4

        t0 = time.monotonic()
        job_id = json.loads(jobdir.submission.read_text())["job_id"]
        result = cli("cancel", job_id, cwd=REPO / "docs")  # by id, from anywhere: the index
        assert result.returncode == 0, result.stderr
        said, _ = job.communicate(timeout=60)
        assert job.returncode == 3, said  # the submitting terminal: cancelled, not failed
        assert f"job {job_id} cancelled" in said and "exited with" not in said
        print(f"cancel -> local job gone in {time.monotonic() - t0:.1f} s")
        assert not [pid for pid in workers if alive(pid)], "workers left behind"
        assert not processes_mentioning(str(jobdir.path)), "agents left behind"

        summary = json.loads(cli("logs", "summary", str(jobdir.path), "--json").stdout)
        assert summary["status"] == "cancelled"
        listing = cli("list", "--root", str(tmp_path))
        assert jobdir.path.name in listing.stdout and "cancelled" in listing.stdout
    finally:
        if job.poll() is None:
            job.kill()


def test_status_of_an_unknown_job_is_a_clear_error(tmp_path: Path) -> None:
    result = cli("status", "12345", "--root", str(tmp_path))
    assert result.returncode == 2
    assert "12345: not a job directory" in result.stderr and "Traceback" not in result.stderr


def test_init_writes_each_template_once(tmp_path: Path) -> None:
    result = cli("init", "--template", "elastic-preemptible", cwd=tmp_path)
    assert result.returncode == 0
    assert "nodes: 2:8" in (tmp_path / "job.yaml").read_text()
    again = cli("init", cwd=tmp_path)
    assert again.returncode == 2 and "--force" in again.stderr
    unknown = cli("init", "--template", "nope", "-o", "x.yaml", cwd=tmp_path)
    assert unknown.returncode == 2 and "cpu, elastic-preemptible" in unknown.stderr


def test_doctor_reports_each_check_and_fails_on_a_lockless_or_unwritable_dir(
    tmp_path: Path,
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM")}
    # Only the venv on PATH: no Slurm command runs (without a SLURM_CONF, Slurm's commands
    # would look for their controller in DNS, which the tests never do).
    env["PATH"] = str(Path(sys.executable).parent)
    ok_dir = cli("doctor", "--dir", str(tmp_path), env=env)
    assert "[ok  ] shared directory is writable" in ok_dir.stdout
    assert "[ok  ] file locks work" in ok_dir.stdout
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    bad = cli("doctor", "--dir", str(blocker / "sub"), env=env)
    assert bad.returncode == 1
    assert "[FAIL] shared directory is writable" in bad.stdout and "fix:" in bad.stdout


@pytest.mark.slurm
@pytest.mark.slow
def test_slurm_job_status_cancel_and_list(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    env = {**slurm_cluster.env, "OMP_NUM_THREADS": "1"}
    first = cli("submit", str(REPO / "examples" / "demo.yaml"), "--set", f"job_root={tmp_path}",
                "--set", "nodes=2", "--set", "slurm.time=5", "--set", SLOW_TRAINING, env=env)
    assert first.returncode == 0, first.stderr
    jobdir = wait_for_training(tmp_path, nodes=2)
    job_id = json.loads(jobdir.submission.read_text())["job_id"]

    status = json.loads(cli("status", job_id, "--root", str(tmp_path), "--json", env=env).stdout)
    assert status["queue_state"] == "RUNNING" and status["status"] == "running"
    assert len(status["nodes"]) == 2
    workers = workers_of(jobdir)

    t0 = time.monotonic()
    result = cli("cancel", job_id, "--root", str(tmp_path), env=env)
    assert result.returncode == 0 and "cancelled" in result.stdout, result.stdout + result.stderr
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (
            [p for p in workers if alive(p)] or processes_mentioning(str(jobdir.path))):
        time.sleep(0.5)
    print(f"cancel -> Slurm job and all processes gone in {time.monotonic() - t0:.1f} s")
    assert not [p for p in workers if alive(p)], "workers left behind"
    assert not processes_mentioning(str(jobdir.path)), "agents left behind"
    assert slurm_cluster.wait_job(int(job_id), timeout=30) == "CANCELLED"
    summary = summary_json(jobdir)
    summary_text(jobdir)
    assert summary["status"] == "cancelled" and not summary["failures"]
    assert_nothing_left(slurm_cluster, jobdir)

    second = cli("submit", str(REPO / "examples" / "demo.yaml"), "--set", f"job_root={tmp_path}",
                 "--set", "nodes=1", "--set", "slurm.time=5", "--wait",
                 "--set", "entrypoint.args=[--epochs, 1, --steps-per-epoch, 2]", env=env)
    assert second.returncode == 0, second.stderr
    listing = json.loads(cli("list", "--root", str(tmp_path), "--json", env=env).stdout)
    second_id = second.stdout.split("submitted job ")[1].split()[0]
    assert [row["job_id"] for row in listing] == [second_id, job_id], "newest first"
    assert [row["outcome"] for row in listing] == ["succeeded", "cancelled"]


@pytest.mark.skipif(shutil.which("scontrol") is None, reason="needs Slurm's client commands")
def test_a_slurm_client_without_a_controller_runs_locally_and_doctor_says_why(
    tmp_path: Path,
) -> None:
    # Slurm's real client, configured (tests/isolation.py) with a controller nobody runs: what a
    # machine looks like after the README's test command installed Slurm's packages.
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM")}
    env["SLURM_CONF"] = os.environ["SLURM_CONF"]
    submit = ["submit", str(REPO / "examples" / "demo.yaml"), "--set", f"job_root={tmp_path}"]
    plan = cli(*submit, "--dry-run", env=env)
    assert plan.returncode == 0, plan.stderr
    assert "no Slurm controller answers" in plan.stderr and "--local" in plan.stderr
    assert plan.stdout.startswith("would run locally: 2 agent(s) x 2 worker(s)")
    insist = cli(*submit, "--slurm", env=env)
    assert insist.returncode == 2 and "Unable to contact slurm controller" in insist.stderr
    assert "Traceback" not in insist.stderr and not any(tmp_path.iterdir())
    doctor = cli("doctor", "--dir", str(tmp_path), env=env)
    assert doctor.returncode == 1
    assert "[FAIL] Slurm controller answers: scontrol ping: " in doctor.stdout
    assert "[skip] Slurm accounting: no Slurm controller answers" in doctor.stdout


def test_without_slurm_submit_says_so_and_runs_locally(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM")}
    env["PATH"] = str(Path(sys.executable).parent)  # no sbatch here
    result = cli("submit", str(REPO / "examples" / "demo.yaml"), "--dry-run",
                 "--set", f"job_root={tmp_path}", env=env)
    assert result.returncode == 0
    assert "Slurm's sbatch is not on PATH" in result.stderr and "--local" in result.stderr
    assert result.stdout.startswith("would run locally: 2 agent(s) x 2 worker(s)")
