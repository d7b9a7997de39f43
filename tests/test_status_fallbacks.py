"""``status`` when Slurm's accounting is missing: squeue, then sacct, then the job directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from slurm_cluster.fixture import SlurmCluster

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slurm


def test_status_of_a_finished_job_without_sacct_falls_back_to_the_job_directory(
    slurm_cluster: SlurmCluster, tmp_path: Path
) -> None:
    env = {**slurm_cluster.env, "OMP_NUM_THREADS": "1"}
    jobs = tmp_path / "jobs"
    done = subprocess.run(
        [sys.executable, "-m", "hpc_elastic", "submit", str(REPO / "examples" / "demo.yaml"),
         "--wait", "--set", f"job_root={jobs}", "--set", "nodes=1", "--set", "slurm.time=5",
         "--set", "nproc_per_node=1",
         "--set", "entrypoint.args=[--epochs, 1, --steps-per-epoch, 2]"],
        capture_output=True, text=True, timeout=180, env=env, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr[-3000:]
    job_id = done.stdout.split("submitted job ")[1].split()[0]

    # A PATH with squeue and sbatch but no sacct, as on a cluster without accounting.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("squeue", "sbatch"):
        os.symlink(f"/usr/bin/{tool}", bin_dir / tool)
    no_sacct = {**env, "PATH": f"{bin_dir}:{Path(sys.executable).parent}"}
    result = subprocess.run(
        [sys.executable, "-m", "hpc_elastic", "status", job_id, "--root", str(jobs), "--json"],
        capture_output=True, text=True, timeout=60, env=no_sacct)
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    assert status["queue_state"].startswith("left the queue")
    assert status["status"] == "succeeded" and status["job_id"] == job_id

    if slurm_cluster.accounting:  # with sacct back, the final state comes from accounting
        slurm_cluster.wait_sacct(int(job_id), ["COMPLETED"], timeout=30)
        with_sacct = subprocess.run(
            [sys.executable, "-m", "hpc_elastic", "status", job_id, "--root", str(jobs),
             "--json"], capture_output=True, text=True, timeout=60, env=env)
        assert json.loads(with_sacct.stdout)["queue_state"] == "COMPLETED"
