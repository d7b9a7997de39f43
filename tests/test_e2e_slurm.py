"""End-to-end fault scenarios on the real multi-node Slurm test cluster (issue #7).

Each test drives ``python -m hpc_elastic submit`` with ``examples/train.py`` and checks three
things a user relies on: the final outcome, resume from the checkpoint where there is one, and
that ``logs summary --json`` tells exactly what happened -- plus that no process of the job is
left on any node afterwards. Scenarios covered elsewhere: preemption
(tests/test_preemption.py, Slurm variant), the torchrun path (tests/test_sbatch_scripts.py),
cancel (tests/test_jobs.py). What a user sees in each case: docs/fault-tolerance.md.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from polling import wait_for
from slurm_cluster.fixture import SlurmCluster

from hpc_elastic.jobdir import JobDir
from hpc_elastic.telemetry import read_jsonl

REPO = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.slurm, pytest.mark.slow]
# Fast failure detection, so the scenarios fit the test budget.
FAST_RDZV = ("--set", "rendezvous.heartbeat_interval=0.5", "--set",
             "rendezvous.heartbeat_timeout=3", "--set", "rendezvous.last_call_timeout=1")
RESUMED = re.compile(r"starting at epoch (\d+) step (\d+) \(global step (\d+)\)")


# -- helpers ---------------------------------------------------------------------------------

def submit_args(job_root: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "hpc_elastic", "submit", str(REPO / "examples" / "demo.yaml"),
            "--set", f"job_root={job_root}", "--set", "slurm.time=5", *FAST_RDZV, *extra]


def env_of(cluster: SlurmCluster) -> dict[str, str]:
    return {**cluster.env, "OMP_NUM_THREADS": "1"}


def submit_wait(cluster: SlurmCluster, job_root: Path, *extra: str,
                timeout: float = 240) -> subprocess.CompletedProcess[str]:
    """``submit --wait``: returns when the job has ended."""
    return subprocess.run(submit_args(job_root, "--wait", *extra), capture_output=True,
                          text=True, timeout=timeout, env=env_of(cluster),
                          stdin=subprocess.DEVNULL)


def the_jobdir(job_root: Path) -> JobDir:
    (path,) = [p for p in job_root.iterdir() if p.is_dir()]
    return JobDir(path)


def job_id_of(jobdir: JobDir) -> str:
    return str(json.loads(jobdir.submission.read_text())["job_id"])


def node_events(jobdir: JobDir, node: str) -> list[dict[str, Any]]:
    path = jobdir.events(node)
    return list(read_jsonl(path)) if path.exists() else []


def all_events(jobdir: JobDir) -> list[dict[str, Any]]:
    return [e for node in jobdir.node_names() for e in node_events(jobdir, node)]


def summary_json(jobdir: JobDir) -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, "-m", "hpc_elastic", "logs", "summary", str(jobdir.path), "--json"],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def summary_text(jobdir: JobDir) -> str:
    """The human summary; printed so that ``-s`` runs show it (docs/fault-tolerance.md)."""
    text = subprocess.run(
        [sys.executable, "-m", "hpc_elastic", "logs", "summary", str(jobdir.path)],
        capture_output=True, text=True, timeout=60).stdout
    print(f"\n$ hpc-elastic logs summary {jobdir.path}\n{text}")
    return text


def processes_mentioning(text: str) -> list[int]:
    """PIDs whose command line contains ``text`` (every agent's names the job directory)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if text.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def job_processes_left(cluster: SlurmCluster, jobdir: JobDir) -> list[str]:
    """What of the job still runs: any node's job processes, or any process naming the job
    directory. Waits a little, since Slurm reaps a finished step asynchronously."""
    def left() -> list[str]:
        out = [f"{node}: {pid}" for node in cluster.nodes for pid in cluster.node_processes(node)
               if _mentions(pid, jobdir)]
        return out + [f"cmdline: {pid}" for pid in processes_mentioning(str(jobdir.path))]

    deadline = time.monotonic() + 20
    while (found := left()) and time.monotonic() < deadline:
        time.sleep(0.5)
    return found


def _mentions(pid: int, jobdir: JobDir) -> bool:
    """A node process belongs to this job: its environment or command line names the job
    directory (workers get HPC_ELASTIC_JOBDIR; other tests' jobs may run meanwhile)."""
    needle = str(jobdir.path).encode()
    try:
        return any(needle in Path(f"/proc/{pid}/{f}").read_bytes() for f in ("cmdline", "environ"))
    except OSError:
        return False


def assert_nothing_left(cluster: SlurmCluster, jobdir: JobDir) -> None:
    assert not job_processes_left(cluster, jobdir), "processes of the job left behind"


def slurm_logs(jobdir: JobDir) -> str:
    return "\n".join(f"--- {p.name}\n" + p.read_text(errors="replace")[-1500:]
                     for p in sorted(jobdir.slurm_logs.glob("*")))


# -- 1. happy path ---------------------------------------------------------------------------

def test_happy_path_three_nodes_one_round_no_restart(
    slurm_cluster: SlurmCluster, tmp_path: Path
) -> None:
    t0 = time.monotonic()
    result = submit_wait(slurm_cluster, tmp_path, "--set", "nodes=3",
                         "--set", "entrypoint.args=[--epochs, 2, --steps-per-epoch, 5]")
    jobdir = the_jobdir(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr + slurm_logs(jobdir)
    summary = summary_json(jobdir)
    summary_text(jobdir)
    assert summary["job_id"] == job_id_of(jobdir)
    assert summary["status"] == "succeeded"
    assert summary["restarts"] == 0 and summary["attempts"] == 1
    assert len(summary["nodes"]) == 3 and set(summary["nodes"]) <= set(slurm_cluster.nodes)
    (only,) = summary["rendezvous_rounds"]
    assert sorted(only["participants"]) == sorted(summary["nodes"])
    assert not [f for f in summary["failures"]]
    assert_nothing_left(slurm_cluster, jobdir)
    print(f"happy path: {time.monotonic() - t0:.1f} s")


# -- 2. worker crash -------------------------------------------------------------------------

def test_worker_crash_one_restart_resumes_and_finishes(
    slurm_cluster: SlurmCluster, tmp_path: Path
) -> None:
    result = submit_wait(slurm_cluster, tmp_path, "--set", "nodes=2", "--set", "max_restarts=2",
                         "--set", "entrypoint.args=[--epochs, 2, --steps-per-epoch, 5,"
                         " --fail-at-step, 7, --fail-rank, 3]")
    jobdir = the_jobdir(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr + slurm_logs(jobdir)
    summary = summary_json(jobdir)
    summary_text(jobdir)
    assert summary["status"] == "succeeded"
    assert summary["restarts"] == 1 and summary["attempts"] == 1
    (root,) = [f for f in summary["failures"] if f.get("root")]
    assert root["message"] == "RuntimeError: injected failure at global step 7 on rank 3"
    assert root["rank"] == 3 and root["node"] in slurm_cluster.nodes
    # The restarted group resumed from epoch 0's checkpoint (global step 5), not from 0.
    resumed = [RESUMED.search(p.read_text()) for p in
               jobdir.path.glob("nodes/*/workers/attempt-0/restart-1/rank-0/stdout.log")]
    assert [m.group(3) for m in resumed if m] == ["5"]
    assert_nothing_left(slurm_cluster, jobdir)


# -- 5. restarts exhausted -------------------------------------------------------------------

def test_restarts_exhausted_job_fails_with_the_root_cause(
    slurm_cluster: SlurmCluster, tmp_path: Path
) -> None:
    result = submit_wait(slurm_cluster, tmp_path, "--set", "nodes=2", "--set", "max_restarts=1",
                         "--set", "entrypoint.args=[--epochs, 2, --steps-per-epoch, 5,"
                         " --fail-at-step, 3, --fail-rank, 1, --fail-always]")
    jobdir = the_jobdir(tmp_path)
    assert result.returncode != 0, result.stdout + result.stderr
    summary = summary_json(jobdir)
    summary_text(jobdir)
    assert summary["status"] == "failed"
    assert summary["restarts"] == 1
    # Each of the 2 runs (first + 1 restart) failed at its root on the same rank.
    roots = [f for f in summary["failures"] if f.get("root")]
    assert len(roots) == 2 and {f["rank"] for f in roots} == {1}
    assert {f["message"] for f in roots} == {
        "RuntimeError: injected failure at global step 3 on rank 1"}
    assert_nothing_left(slurm_cluster, jobdir)


# -- 3. node loss ----------------------------------------------------------------------------

def rank0_node(jobdir: JobDir) -> str | None:
    """The node whose worker has global rank 0 in the current round."""
    for node in jobdir.node_names():
        if any(e["kind"] == "worker.started" and e.get("rank") == 0
               for e in node_events(jobdir, node)):
            return node
    return None


def training_nodes(jobdir: JobDir) -> list[str]:
    """Nodes whose workers run in the latest round they joined."""
    return [n for n in jobdir.node_names()
            if [e["kind"] for e in node_events(jobdir, n)
                if e["kind"].startswith(("rendezvous.completed", "workers.started"))][-1:]
            == ["workers.started"]]


@pytest.mark.parametrize("victim_kind", ["other", "rank0"])
def test_node_loss_survivors_relaunched_resume_and_finish(
    slurm_cluster: SlurmCluster, tmp_path: Path, victim_kind: str
) -> None:
    """``nodes: 2:3``; one node's slurmd and everything under it are killed mid-run. The
    survivors re-form as 2; when Slurm marks the node DOWN it kills the step on them too, and
    the batch supervisor relaunches the agents there (step 1), which resume from the checkpoint
    and finish. The batch host cannot be the victim: Slurm ends a job whose batch host dies."""
    t0 = time.monotonic()
    launcher = subprocess.Popen(
        # Slurm gives a --nodes=2-3 job 2 nodes when 2 satisfy it; ntasks=3 asks for all 3.
        submit_args(tmp_path, "--wait", "--set", "nodes=2:3", "--set", "slurm.sbatch={ntasks: 3}",
                    "--set",
                    "entrypoint.args=[--epochs, 6, --steps-per-epoch, 10, --step-sleep, 0.4]"),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env_of(slurm_cluster),
        stdin=subprocess.DEVNULL)
    try:
        jobdir = wait_for("3 nodes training and epoch 0's checkpoint", lambda: next(
            (JobDir(p) for p in tmp_path.iterdir() if (p / "checkpoints" / "last.pt").exists()
             and len(training_nodes(JobDir(p))) == 3), None), timeout=120)
        job_id = job_id_of(jobdir)
        batch_host = (slurm_cluster.scontrol_job(int(job_id)) or {}).get("BatchHost")
        nodes = jobdir.node_names()
        assert len(nodes) == 3 and batch_host in nodes
        rank0 = rank0_node(jobdir)
        if victim_kind == "rank0":
            if rank0 == batch_host:
                launcher.kill()
                slurm_cluster.run(["scancel", job_id])
                pytest.skip("rank 0 landed on the batch host this time (join order); losing "
                            "the batch host ends the job in Slurm")
            victim = rank0
        else:
            victim = next(n for n in nodes if n not in (batch_host, rank0))
        killed_at = time.time()
        slurm_cluster.kill_node(victim)
        output, _ = launcher.communicate(timeout=240)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    try:
        assert launcher.returncode == 0, output[-3000:] + slurm_logs(jobdir)
        survivors = [n for n in nodes if n != victim]
        summary = summary_json(jobdir)
        summary_text(jobdir)
        assert summary["status"] == "succeeded"
        assert sorted(summary["nodes"]) == sorted(nodes)
        rounds = summary["rendezvous_rounds"]
        assert any(sorted(r["participants"]) == sorted(nodes) for r in rounds)
        assert sorted(rounds[-1]["participants"]) == sorted(survivors)
        health = {h["node"]: h["ended"] for h in summary["node_health"]}
        assert health[victim] == "vanished" and all(health[n] == "ok" for n in survivors)
        for node in survivors:
            after = [e for e in node_events(jobdir, node) if e["time"] > killed_at]
            assert after[-1]["kind"] == "agent.succeeded"
        # Resumed from a checkpoint after the loss, not from global step 0.
        starts = [int(m.group(3)) for p in
                  jobdir.path.glob("nodes/*/workers/attempt-0/restart-*/rank-0/stdout.log")
                  if p.stat().st_mtime > killed_at and (m := RESUMED.search(p.read_text()))]
        assert starts and min(starts) >= 10, starts
        assert_nothing_left(slurm_cluster, jobdir)
        print(f"node loss ({victim_kind}: {victim}): {time.monotonic() - t0:.1f} s")
    finally:
        slurm_cluster.heal()


# -- 6. stale directory ----------------------------------------------------------------------

def test_second_job_is_not_confused_by_a_crashed_first_ones_leftovers(
    slurm_cluster: SlurmCluster, tmp_path: Path
) -> None:
    """Both jobs share the job root and one rendezvous directory; the first is SIGKILLed
    (``scancel --signal=KILL``) while its agents rendezvous, leaving lock, state and store files
    of a round nobody will close. The second one right after it meets in a fresh run and
    succeeds with one round and no restart."""
    rdzv = ("--set", f"rendezvous.directory={tmp_path / 'rdzv'}")
    first = subprocess.run(submit_args(tmp_path, "--set", "nodes=2", *rdzv),
                           capture_output=True, text=True, timeout=60, env=env_of(slurm_cluster))
    assert first.returncode == 0, first.stderr
    first_id = first.stdout.split("submitted job ")[1].split()[0]
    wait_for("the first job's rendezvous", lambda: any((tmp_path / "rdzv").glob("*/*")),
             timeout=60, every=0.05)
    slurm_cluster.run(["scancel", "--signal=KILL", "--full", first_id])
    slurm_cluster.run(["scancel", first_id])
    slurm_cluster.wait_job(int(first_id), timeout=60)
    first_dir = next(JobDir(p) for p in tmp_path.iterdir()
                     if (p / "submission.json").exists() and job_id_of(JobDir(p)) == first_id)
    assert_nothing_left(slurm_cluster, first_dir)

    second = submit_wait(slurm_cluster, tmp_path, "--set", "nodes=2", *rdzv,
                         "--set", "entrypoint.args=[--epochs, 1, --steps-per-epoch, 5]")
    assert second.returncode == 0, second.stdout + second.stderr
    second_id = second.stdout.split("submitted job ")[1].split()[0]
    jobdir = next(JobDir(p) for p in tmp_path.iterdir()
                  if (p / "submission.json").exists() and job_id_of(JobDir(p)) == second_id)
    summary = summary_json(jobdir)
    summary_text(jobdir)
    assert summary["status"] == "succeeded" and summary["restarts"] == 0
    assert len(summary["rendezvous_rounds"]) == 1
    assert_nothing_left(slurm_cluster, jobdir)
