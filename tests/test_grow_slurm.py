"""Elastic across jobs on the real Slurm test cluster (issue #8, docs/elastic-across-jobs.md).

A run starts on the nodes Slurm gives it, takes more from a separate ``grow`` job, gives them
back when that job is cancelled, and can start from an array of single-node jobs. What the
workers saw (their world size, where they resumed) comes from their own stdout; what the run
looked like comes from ``logs summary --json`` and ``status --json``.
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e_helpers import (
    RESUMED,
    assert_nothing_left,
    env_of,
    job_id_of,
    node_events,
    slurm_logs,
    submit_args,
    summary_json,
    summary_text,
)
from polling import wait_for
from slurm_cluster.fixture import SlurmCluster

from hpc_elastic.jobdir import JobDir

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

WORLD = re.compile(r"^rank (\d+)/(\d+): attempt \d+ restart \d+, starting at .*global step (\d+)",
                   re.MULTILINE)
# Long enough that the grow job's nodes join mid-run (an epoch takes ~3 s).
LONG_RUN = "entrypoint.args=[--epochs, 8, --steps-per-epoch, 10, --step-sleep, 0.3]"


def hpc_elastic(cluster: SlurmCluster, *args: str, timeout: float = 60
                ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hpc_elastic", *args], capture_output=True,
                          text=True, timeout=timeout, env=env_of(cluster),
                          stdin=subprocess.DEVNULL)


def submit(cluster: SlurmCluster, job_root: Path, *extra: str) -> JobDir:
    # 2 workers per node: the grow must land mid-run, and a 1-worker run finished its
    # LONG_RUN before a grow job's agents joined (one run of 8 epochs at load 9).
    result = subprocess.run(submit_args(job_root, "--set", "nproc_per_node=2", *extra),
                            capture_output=True, text=True,
                            timeout=60, env=env_of(cluster), stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stdout + result.stderr
    (path,) = [p for p in job_root.iterdir() if p.is_dir()]
    return JobDir(path)


@contextlib.contextmanager
def others_hold(cluster: SlurmCluster, count: int) -> Iterator[int]:
    """Another job holds ``count`` nodes while the run starts -- how a run ends up below its
    ``max`` (an elastic job takes every free node up to ``max`` at start). Cancelled on exit,
    so the nodes are free for a grow job. Every node must be idle first: a node still coming
    back from an earlier test's power cut would leave the run nothing to start on."""
    for node in cluster.nodes:
        cluster.wait_node_state(node, ["idle"], timeout=120)
    blocker = cluster.sbatch("--exclusive", f"--nodes={count}", "--time=10", "--chdir=/tmp",
                             "--output=/dev/null", "--wrap", "sleep 600")
    try:
        wait_for("the other job to hold its nodes",
                 lambda: cluster.job_state(blocker) == "RUNNING", timeout=60)
        yield blocker
    finally:
        cluster.run(["scancel", str(blocker)], check=False)


def starts_seen(jobdir: JobDir) -> list[tuple[int, int, int]]:
    """(rank, world size, global step) of every worker start, from the workers' stdout."""
    found = []
    for log in jobdir.path.glob("nodes/*/workers/attempt-*/restart-*/rank-*/stdout.log"):
        found += [(int(r), int(w), int(g)) for r, w, g in WORLD.findall(log.read_text())]
    return found


def grow(cluster: SlurmCluster, jobdir: JobDir, *args: str) -> subprocess.CompletedProcess[str]:
    return hpc_elastic(cluster, "grow", str(jobdir.path), *args)


def grow_job_id(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout.split("submitted grow job ")[1].split()[0]


def epochs_done(jobdir: JobDir) -> int:
    """Checkpoints written so far (rank 0 prints a line after each epoch's)."""
    return sum(log.read_text().count(" done: loss ") for log in
               jobdir.path.glob("nodes/*/workers/attempt-*/restart-*/rank-0/stdout.log"))


def wait_epochs(jobdir: JobDir, count: int, timeout: float = 90) -> None:
    wait_for(f"{count} checkpoint(s)", lambda: epochs_done(jobdir) >= count, timeout=timeout)


def wait_world(jobdir: JobDir, world: int, timeout: float = 90) -> None:
    wait_for(f"workers with world size {world}",
             lambda: any(w == world for _, w, _ in starts_seen(jobdir)), timeout=timeout)


def finish(cluster: SlurmCluster, jobdir: JobDir, *job_ids: str, timeout: float = 180
           ) -> dict[str, str]:
    """Wait for every job to end; their final states (sacct, else slurmctld)."""
    states = {}
    for job_id in job_ids:
        states[job_id] = cluster.wait_job(int(job_id), timeout=timeout)
    assert states[job_ids[0]] == "COMPLETED", f"{states}\n{slurm_logs(jobdir)}"
    return states


def test_grow_one_node_run_by_two_nodes_then_finish_on_three(
    slurm_cluster: SlurmCluster, tmp_path: Path
) -> None:
    t0 = time.monotonic()
    with others_hold(slurm_cluster, len(slurm_cluster.nodes) - 1):
        jobdir = submit(slurm_cluster, tmp_path, "--set", "nodes=1:3", "--set", LONG_RUN)
        lead = job_id_of(jobdir)
        wait_epochs(jobdir, 1)

    # Refusals, while the run holds 1 of its max 3 nodes.
    too_many = grow(slurm_cluster, jobdir, "--nodes", "3")
    assert too_many.returncode == 2
    assert "can grow by at most 2, not 3" in too_many.stderr, too_many.stderr
    other = grow(slurm_cluster, jobdir, "--nodes", "1", "--set", "nproc_per_node=1")
    assert other.returncode == 2 and "nproc_per_node" in other.stderr, other.stderr

    member = grow_job_id(grow(slurm_cluster, jobdir, "--nodes", "2",
                              "--set", "slurm.time=4"))
    states = finish(slurm_cluster, jobdir, lead, member)
    assert states[member] == "COMPLETED", states

    starts = starts_seen(jobdir)
    worlds = sorted({w for _, w, _ in starts})
    assert worlds == [2, 6], starts
    # The 6-worker world resumed from a checkpoint, not from step 0.
    assert min(g for _, w, g in starts if w == 6) >= 10, starts
    summary = summary_json(jobdir)
    summary_text(jobdir)
    assert summary["status"] == "succeeded"
    assert [j["job_id"] for j in summary["jobs"]] == [lead, member]
    assert [j["kind"] for j in summary["jobs"]] == ["lead", "grow"]
    assert len(summary["nodes"]) == 3
    sizes = [len(r["participants"]) for r in summary["rendezvous_rounds"]]
    assert sizes[0] == 1 and sizes[-1] == 3, sizes
    status = json.loads(hpc_elastic(slurm_cluster, "status", str(jobdir.path), "--json").stdout)
    assert [(j["job_id"], j["state"]) for j in status["jobs"]] == [
        (lead, "COMPLETED"), (member, "COMPLETED")]

    finished = grow(slurm_cluster, jobdir, "--nodes", "1")
    assert finished.returncode == 2 and "has ended (COMPLETED)" in finished.stderr
    assert_nothing_left(slurm_cluster, jobdir)
    print(f"grow 1 -> 3 nodes: {time.monotonic() - t0:.1f} s")


@pytest.mark.parametrize("ending", ["cancelled", "preempted"])
def test_grow_job_that_ends_shrinks_the_run_back_and_it_finishes(
    slurm_cluster: SlurmCluster, tmp_path: Path, ending: str
) -> None:
    """The grow job is cancelled (scancel: SIGTERM), or gets the preemption signal that Slurm
    sends before its time limit (USR1, to its batch shell: ``--signal=B:USR1@grace``): its
    agents leave, the run re-forms on the lead's node alone and finishes."""
    t0 = time.monotonic()
    with others_hold(slurm_cluster, len(slurm_cluster.nodes) - 1):
        jobdir = submit(slurm_cluster, tmp_path, "--set", "nodes=1:3", "--set", LONG_RUN,
                        "--set", "max_restarts=3")
        lead = job_id_of(jobdir)
        wait_epochs(jobdir, 1)
    member = grow_job_id(grow(slurm_cluster, jobdir, "--nodes", "2"))
    wait_world(jobdir, 6)
    wait_epochs(jobdir, epochs_done(jobdir) + 1)  # the world of 6 wrote a checkpoint
    cancelled_at = time.time()
    if ending == "cancelled":
        slurm_cluster.run(["scancel", member])
    else:
        slurm_cluster.run(["scancel", "--batch", "--signal=USR1", member])
    states = finish(slurm_cluster, jobdir, lead, member)
    assert states[member] == ("CANCELLED" if ending == "cancelled" else "COMPLETED"), states

    # Back to the lead's 2 workers, resumed mid-run.
    assert any(w == 2 and g > 0 for _, w, g in starts_seen(jobdir)), starts_seen(jobdir)
    summary = summary_json(jobdir)
    summary_text(jobdir)
    assert summary["status"] == "succeeded"
    sizes = [len(r["participants"]) for r in summary["rendezvous_rounds"]]
    assert sizes[0] == 1 and 3 in sizes and sizes[-1] == 1, sizes
    # The grow job's departure is a membership change: no restart of max_restarts used for it.
    assert summary["restarts_after_failure"] == 0, summary["failures"]
    lead_nodes = [n for n in jobdir.node_names()
                  if any(e["kind"] == "agent.succeeded" for e in node_events(jobdir, n))]
    assert len(lead_nodes) == 1
    # The lead's workers resumed from a checkpoint after the grow job left.
    resumed = [int(m.group(3)) for p in jobdir.path.glob(
        f"nodes/{lead_nodes[0]}/workers/attempt-0/restart-*/rank-0/stdout.log")
        if p.stat().st_mtime > cancelled_at and (m := RESUMED.search(p.read_text()))]
    assert resumed and min(resumed) >= 10, resumed
    assert_nothing_left(slurm_cluster, jobdir)
    print(f"grow, the grow job {ending}, finish: {time.monotonic() - t0:.1f} s")


def test_array_start_trains_once_min_nodes_joined_and_takes_the_third_later(
    slurm_cluster: SlurmCluster, tmp_path: Path
) -> None:
    """``submit --array 3`` with ``nodes: 2:3``, submitted held so the test decides when Slurm
    schedules each task: 2 tasks start and train as a world of 4; the third joins later."""
    t0 = time.monotonic()
    jobdir = submit(slurm_cluster, tmp_path, "--array", "3", "--set", "nodes=2:3",
                    "--set", "slurm.sbatch={hold: ''}", "--set", LONG_RUN)
    array = job_id_of(jobdir)
    slurm_cluster.run(["scontrol", "release", f"{array}_0", f"{array}_1"])
    wait_world(jobdir, 4)
    assert len(jobdir.node_names()) == 2
    slurm_cluster.run(["scontrol", "release", f"{array}_2"])
    wait_for("the array's tasks to end", lambda: not slurm_cluster.run(
        ["squeue", "--noheader", "--jobs", array], check=False).stdout.strip(), timeout=180)
    starts = starts_seen(jobdir)
    assert sorted({w for _, w, _ in starts}) == [4, 6], starts
    summary = summary_json(jobdir)
    summary_text(jobdir)
    assert summary["status"] == "succeeded"
    assert len(summary["nodes"]) == 3
    sizes = [len(r["participants"]) for r in summary["rendezvous_rounds"]]
    assert sizes[0] == 2 and sizes[-1] == 3, sizes
    assert [j["kind"] for j in summary["jobs"]] == ["array"]
    assert_nothing_left(slurm_cluster, jobdir)
    print(f"array start 2 -> 3 nodes: {time.monotonic() - t0:.1f} s")
