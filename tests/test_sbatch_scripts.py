"""The plain batch scripts in sbatch/, submitted with plain ``sbatch`` to the test cluster."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from e2e_helpers import job_processes_left
from slurm_cluster.fixture import SlurmCluster

from hpc_elastic.jobdir import JobDir
from hpc_elastic.telemetry import read_jsonl

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def run_script(cluster: SlurmCluster, tmp_path: Path, script: str, *args: str
               ) -> tuple[int, str]:
    """sbatch a script on 3 nodes with the cluster's env (which the test may extend)."""
    job_id = cluster.sbatch("--nodes=3", "--time=5", f"--output={tmp_path}/slurm-%j.out",
                            REPO / "sbatch" / script, *args)
    state = cluster.wait_job(job_id, timeout=240)
    log = (tmp_path / f"slurm-{job_id}.out").read_text(errors="replace")
    assert state == "COMPLETED", f"{script} job {job_id}: {state}\n{log[-4000:]}"
    return job_id, log


def test_agent_script_runs_a_job_file_without_a_submit_step(
    slurm_cluster: SlurmCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    job_file = tmp_path / "job.yaml"
    job_file.write_text(
        "name: plain\nnodes: 3\nnproc_per_node: 2\n"
        f"entrypoint: {{script: {REPO / 'examples' / 'train.py'}, "
        "args: [--epochs, 1, --steps-per-epoch, 3]}\n"
        f"job_root: {tmp_path / 'jobs'}\nenv: {{OMP_NUM_THREADS: 1}}\n")
    monkeypatch.setitem(slurm_cluster.env, "HPC_ELASTIC_PYTHON", sys.executable)
    job_id, _ = run_script(slurm_cluster, tmp_path, "hpc_elastic.sbatch", str(job_file))
    jobdir = JobDir(tmp_path / "jobs" / f"plain-slurm{job_id}")
    assert len(jobdir.node_names()) == 3
    for node in jobdir.node_names():
        assert list(read_jsonl(jobdir.events(node)))[-1]["kind"] == "agent.succeeded"


def test_torchrun_script_with_the_sharedfs_backend_on_three_nodes(
    slurm_cluster: SlurmCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in {"TORCHRUN": str(VENV_BIN / "torchrun"), "NPROC_PER_NODE": "2",
                        "RDZV_DIR": str(tmp_path / "rdzv"), "OMP_NUM_THREADS": "1"}.items():
        monkeypatch.setitem(slurm_cluster.env, name, value)
    _, log = run_script(slurm_cluster, tmp_path, "torchrun_sharedfs.sbatch",
                        str(REPO / "examples" / "train.py"), "--epochs", "1",
                        "--steps-per-epoch", "3", "--checkpoint-dir", str(tmp_path / "ckpt"))
    assert log.count("training finished") == 6, log[-3000:]  # 3 nodes x 2 workers
    assert (tmp_path / "ckpt" / "last.pt").is_file()
    assert not job_processes_left(slurm_cluster, JobDir(tmp_path)), "torchrun left processes"
