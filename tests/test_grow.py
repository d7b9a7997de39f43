"""Elastic across jobs without a cluster: who joins which rendezvous, the run's record of its
jobs, and the refusals that need no queue (issue #8). The real thing runs in
tests/test_grow_slurm.py."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hpc_elastic.config import load_config
from hpc_elastic.grow import GrowRefused, grow
from hpc_elastic.identity import RUN_ATTEMPT_ENV, RUN_ID_ENV, STEP_ENV, NodeIdentity
from hpc_elastic.jobdir import JobDir
from hpc_elastic.jobs import quick_outcome
from hpc_elastic.members import (
    GROW,
    LEAD,
    MemberJob,
    publish_run_pointer,
    read_members,
    read_run_pointer,
    record_member,
)
from hpc_elastic.submit import Submission, create_jobdir, write_submission

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def run_dir(tmp_path: Path) -> JobDir:
    """A job directory as ``submit`` leaves it for Slurm job 100 (``nodes: 1:3``)."""
    shutil.copy(REPO / "examples" / "demo.yaml", tmp_path / "job.yaml")
    shutil.copy(REPO / "examples" / "train.py", tmp_path / "train.py")
    config = load_config(tmp_path / "job.yaml", ["nodes=1:3"])
    jobdir = JobDir(tmp_path / "run")
    create_jobdir(config, jobdir)
    write_submission(jobdir, Submission("slurm", "100", 1.0, config.name))
    return jobdir


def slurm_env(**extra: str) -> dict[str, str]:
    return {"SLURM_JOB_ID": "205", "SLURMD_NODENAME": "n4", "SLURM_NODEID": "0",
            "SLURM_RESTART_COUNT": "0", "HPC_ELASTIC_NODE_ADDR": "127.0.0.1", **extra}


def test_a_member_agent_joins_the_runs_rendezvous_not_its_own() -> None:
    lead = NodeIdentity.from_env(slurm_env())
    assert not lead.is_member and lead.rendezvous_id == "205"
    member = NodeIdentity.from_env(slurm_env(**{RUN_ID_ENV: "100", RUN_ATTEMPT_ENV: "2",
                                                STEP_ENV: "1"}))
    assert member.is_member and member.job_id == "205"
    assert member.rendezvous_id == "100-s1" and member.attempt == 2


def test_the_lead_publishes_the_rendezvous_members_join(run_dir: JobDir) -> None:
    def where(run_id: str) -> tuple[int, int]:
        pointer = read_run_pointer(run_dir, run_id)
        return pointer.attempt, pointer.step

    assert where("100") == (0, 0), "before the lead runs: where it will start"
    publish_run_pointer(run_dir, "100", attempt=1, step=2)
    assert where("100") == (1, 2)
    assert where("999") == (0, 0), "another run's pointer is not ours"


def test_members_are_recorded_one_file_each_in_submission_order(run_dir: JobDir) -> None:
    assert read_members(run_dir) == [MemberJob("100", LEAD, "?", 1.0)], \
        "a job directory without records falls back to submission.json"
    record_member(run_dir, MemberJob("100", LEAD, "1-3", 1.0, script="sbatch.sh"))
    record_member(run_dir, MemberJob("130", GROW, "2", 3.0))
    record_member(run_dir, MemberJob("120", GROW, "1", 2.0))
    (run_dir.members / "140.json").write_text("{half a rec")  # a crashed submitter's
    assert [m.job_id for m in read_members(run_dir)] == ["100", "120", "130"]


def test_grow_refuses_a_local_job(run_dir: JobDir) -> None:
    write_submission(run_dir, Submission("local", "local-1", 1.0, "demo"))
    with pytest.raises(GrowRefused, match="not a Slurm job"):
        grow(run_dir, 1)


@pytest.mark.parametrize("override, key", [
    ("nproc_per_node=1", "nproc_per_node"),
    ("entrypoint.args=[--epochs, 1]", "entrypoint.args"),
    ("max_restarts=9", "max_restarts"),
])
def test_grow_refuses_a_config_that_differs_from_the_runs(run_dir: JobDir, override: str,
                                                          key: str) -> None:
    with pytest.raises(GrowRefused) as err:
        grow(run_dir, 1, [override])
    message = str(err.value)
    assert f"in {key}." in message and str(run_dir.config) in message
    assert "only slurm.* may differ" in message


def test_grow_refuses_a_different_job_file(run_dir: JobDir, tmp_path: Path) -> None:
    other = tmp_path / "other.yaml"
    other.write_text((tmp_path / "job.yaml").read_text().replace("nproc_per_node: 2",
                                                                 "nproc_per_node: 4"))
    with pytest.raises(GrowRefused, match=r"other.yaml differs .* in nodes, nproc_per_node\."):
        grow(run_dir, 1, config_file=str(other))


def test_a_cancelled_grow_job_does_not_make_a_finished_run_look_cancelled(
    run_dir: JobDir,
) -> None:
    for node, kind in [("n1", "agent.succeeded"), ("n2", "shutdown")]:
        run_dir.node(node).mkdir(parents=True)
        run_dir.events(node).write_text(json.dumps({"kind": kind, "time": 1.0}) + "\n")
    assert quick_outcome(run_dir) == "succeeded"
    run_dir.events("n1").write_text(json.dumps({"kind": "shutdown", "time": 1.0}) + "\n")
    assert quick_outcome(run_dir) == "cancelled"


@pytest.mark.parametrize("args, said", [
    (["--array", "5"], "between 1 tasks"),
    (["--array", "2", "--local"], "--array needs Slurm"),
])
def test_submit_array_refusals(args: list[str], said: str, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "hpc_elastic", "submit", str(REPO / "examples" / "demo.yaml"),
         "--set", "nodes=1:3", "--set", f"job_root={tmp_path}", *args],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert said in result.stderr and "Traceback" not in result.stderr
    assert not any(tmp_path.iterdir()), "nothing created for a refused submission"
