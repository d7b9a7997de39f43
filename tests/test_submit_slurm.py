"""``hpc-elastic submit`` against the real multi-node Slurm test cluster."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from e2e_helpers import ONE_WORKER_PER_NODE
from slurm_cluster.fixture import SlurmCluster

from hpc_elastic.jobdir import AGENT_LOG, LOCAL_AGENTS, JobDir
from hpc_elastic.local import RESULT_FILE
from hpc_elastic.telemetry import read_jsonl

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slurm


def submit(cluster: SlurmCluster, job_root: Path, *extra: str,
           timeout: float = 300) -> subprocess.CompletedProcess[str]:
    args = [sys.executable, "-m", "hpc_elastic", "submit", str(REPO / "examples" / "demo.yaml"),
            "--set", f"job_root={job_root}", "--set", "slurm.time=5", *ONE_WORKER_PER_NODE,
            *extra]
    env = {**cluster.env, "OMP_NUM_THREADS": "1"}
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env,
                          stdin=subprocess.DEVNULL)


@pytest.mark.slow
def test_three_node_job_runs_to_success_with_every_nodes_logs(
    slurm_cluster: SlurmCluster, tmp_path: Path
) -> None:
    result = submit(slurm_cluster, tmp_path, "--wait", "--set", "nodes=3",
                    "--set", "entrypoint.args=[--epochs, 2, --steps-per-epoch, 5]")
    (path,) = list(tmp_path.iterdir())
    jobdir = JobDir(path)
    slurm_logs = "\n".join(p.read_text(errors="replace")[-2000:]
                           for p in sorted(jobdir.slurm_logs.glob("*")))
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}\n{slurm_logs}"
    job_id = json.loads(jobdir.submission.read_text())["job_id"]
    assert f"submitted job {job_id}" in result.stdout
    assert "#SBATCH --nodes=3" in jobdir.sbatch_script.read_text()
    assert len(jobdir.node_names()) == 3
    for node in jobdir.node_names():
        assert node in slurm_cluster.nodes
        events = list(read_jsonl(jobdir.events(node)))
        assert {e["job_id"] for e in events} == {job_id}
        assert events[-1]["kind"] == "agent.succeeded"
    # one agent per node: three srun task logs
    assert len(list(jobdir.slurm_logs.glob(f"{job_id}_*_log.out"))) == 3

    # The same job in local mode leaves a job directory of the same layout.
    local_root = tmp_path.parent / f"{tmp_path.name}-local"
    local = subprocess.run(
        [sys.executable, "-m", "hpc_elastic", "submit", str(REPO / "examples" / "demo.yaml"),
         "--local", "--set", f"job_root={local_root}", "--set", "nodes=3", *ONE_WORKER_PER_NODE,
         "--set", "entrypoint.args=[--epochs, 2, --steps-per-epoch, 5]"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert local.returncode == 0, local.stderr[-3000:]
    (local_path,) = list(local_root.iterdir())
    assert layout(JobDir(local_path)) == layout(jobdir)


def layout(jobdir: JobDir) -> set[str]:
    """Relative paths with node names and ranks made generic. Mode-specific files are left out:
    Slurm's logs, the batch script, the batch supervisor's event log and the record of the
    run's Slurm jobs; the local launcher's PID and result files and the agents' ``agent.log``
    (torch's log lines, which go to the node's Slurm log on a cluster); and the rendezvous
    directory (named after the job id)."""
    shapes = set()
    nodes = jobdir.node_names()
    for path in jobdir.path.rglob("*"):
        rel = str(path.relative_to(jobdir.path))
        if rel.startswith(("slurm/", "rendezvous/", "members/", "batch/")) or rel in (
                LOCAL_AGENTS, RESULT_FILE, "sbatch.sh", "members", "batch") or (
                path.name == AGENT_LOG and path.parent.parent == jobdir.path / "nodes"):
            continue
        for index, node in enumerate(nodes):
            rel = rel.replace(f"nodes/{node}", f"nodes/node{index}")
        shapes.add(re.sub(r"rank-\d+", "rank-N", rel))
    return shapes


def test_unknown_partition_shows_slurms_own_error(
    slurm_cluster: SlurmCluster, tmp_path: Path
) -> None:
    result = submit(slurm_cluster, tmp_path, "--set", "slurm.partition=nosuchpartition")
    assert result.returncode == 2
    assert "invalid partition" in result.stderr.lower()
    assert "Traceback" not in result.stderr
    assert not any(tmp_path.iterdir()), "a failed submission leaves no job directory behind"


def test_dry_run_prints_the_script_and_submits_nothing(
    slurm_cluster: SlurmCluster, tmp_path: Path
) -> None:
    before = slurm_cluster.run(["squeue", "--noheader", "--all"]).stdout
    result = submit(slurm_cluster, tmp_path, "--dry-run", "--set", "nodes=2:3")
    assert result.returncode == 0
    assert result.stdout.startswith("#!/bin/bash")
    assert "#SBATCH --nodes=2-3" in result.stdout and "#SBATCH --no-kill" in result.stdout
    assert not tmp_path.exists() or not any(tmp_path.iterdir())
    assert slurm_cluster.run(["squeue", "--noheader", "--all"]).stdout == before
