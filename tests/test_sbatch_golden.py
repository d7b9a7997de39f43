"""Golden tests of the batch script for every template.

submitit's renderer is private API: a submitit upgrade that changes the text must fail here first.
Regenerate on purpose with ``HPC_ELASTIC_UPDATE_GOLDEN=1 pytest tests/test_sbatch_golden.py`` and
read the diff before committing it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from hpc_elastic.config import load_config
from hpc_elastic.jobdir import JobDir
from hpc_elastic.sbatch import MemberScript, render_sbatch

REPO = Path(__file__).resolve().parent.parent
TEMPLATES = sorted((REPO / "templates").glob("*.yaml"))
GOLDEN = Path(__file__).parent / "golden"


def test_there_are_templates() -> None:
    assert {p.stem for p in TEMPLATES} >= {
        "cpu", "single-node-gpu", "multi-node-gpu", "elastic-preemptible"}


@pytest.mark.parametrize("template", TEMPLATES, ids=lambda p: p.stem)
def test_sbatch_text_matches_golden(template: Path, tmp_path: Path) -> None:
    shutil.copy(template, tmp_path / "job.yaml")
    (tmp_path / "train.py").write_text("")
    config = load_config(tmp_path / "job.yaml")
    jobdir = JobDir(Path("/shared/jobs") / template.stem)
    text = render_sbatch(config, jobdir, "/opt/venv/bin/python")
    golden = GOLDEN / f"{template.stem}.sbatch"
    if os.environ.get("HPC_ELASTIC_UPDATE_GOLDEN") == "1":
        golden.write_text(text)
    assert text == golden.read_text()


def test_elastic_job_keeps_its_allocation_when_a_node_fails(tmp_path: Path) -> None:
    shutil.copy(REPO / "templates" / "elastic-preemptible.yaml", tmp_path / "job.yaml")
    (tmp_path / "train.py").write_text("")
    elastic = load_config(tmp_path / "job.yaml")
    fixed = load_config(tmp_path / "job.yaml", ["nodes=4"])
    jobdir = JobDir(tmp_path / "j")
    elastic_text = render_sbatch(elastic, jobdir, "python")
    fixed_text = render_sbatch(fixed, jobdir, "python")
    assert "#SBATCH --no-kill" in elastic_text and "#SBATCH --nodes=2-8" in elastic_text
    assert "--no-kill" not in fixed_text and "#SBATCH --nodes=4" in fixed_text
    for text in (elastic_text, fixed_text):
        # Neither pins an elastic job to its minimum: Slurm gives --nodes=2-8 up to 8 free
        # nodes (the supervisor then starts one agent step per node).
        assert "--ntasks" not in text
        assert "#SBATCH --requeue" in text
        assert "#SBATCH --signal=USR1@120" in text
        assert "export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in text
        assert text.rstrip().endswith(f"python -m hpc_elastic batch {jobdir.path}")


@pytest.mark.parametrize("kind", ["grow", "array"])
def test_member_script_matches_golden(kind: str, tmp_path: Path) -> None:
    """A grow job's and an array start's script: exclusive nodes, never requeued (only the
    lead requeues the run), and the run id their agents join (the lead's, or the array's)."""
    shutil.copy(REPO / "templates" / "elastic-preemptible.yaml", tmp_path / "job.yaml")
    (tmp_path / "train.py").write_text("")
    config = load_config(tmp_path / "job.yaml")
    member = (MemberScript(nodes=2, run_id="4242") if kind == "grow"
              else MemberScript(array_tasks=3))
    text = render_sbatch(config, JobDir(Path("/shared/jobs/run")), "/opt/venv/bin/python",
                         member=member)
    golden = GOLDEN / f"member-{kind}.sbatch"
    if os.environ.get("HPC_ELASTIC_UPDATE_GOLDEN") == "1":
        golden.write_text(text)
    assert text == golden.read_text()
    for absent in ("--requeue\n", "--no-kill"):
        assert absent not in text
    assert "#SBATCH --exclusive" in text and "#SBATCH --no-requeue" in text
    # The run's signal, to the batch shell only: the cue to leave the run.
    assert "#SBATCH --signal=B:USR1@120" in text
