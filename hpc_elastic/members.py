"""The Slurm jobs that take part in one run, and the run's current rendezvous.

A run starts as one job (the *lead*) or as a job array, and may take more nodes later from
separate ``grow`` jobs (docs/elastic-across-jobs.md). Each job that takes part is recorded in
``members/<job id>.json`` by the command that submitted it -- one writer per file, as
everywhere in the job directory -- so ``status`` and ``logs summary`` can show the run as one
thing with its member jobs.

Members join the rendezvous of the run, not one of their own. Its name changes when the lead is
requeued (a new attempt) or relaunched on the survivors of a node loss (a new step), so the
lead's batch step publishes the current one in ``rendezvous/current.json`` and a member's batch
step reads it when it starts.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from typing import Any

from hpc_elastic.jobdir import JobDir, make_dir
from hpc_elastic.submit import read_submission, write_atomic

#: How a member job came to the run.
LEAD, GROW, ARRAY = "lead", "grow", "array"


@dataclass(frozen=True)
class MemberJob:
    """One Slurm job of the run (an array counts as one job of ``tasks`` single-node tasks)."""

    job_id: str
    kind: str  # LEAD, GROW or ARRAY
    nodes: str  # what it asked sbatch for: "2", "1-3"
    submitted_at: float
    script: str | None = None  # the batch script, relative to the job directory
    tasks: int | None = None  # array jobs only

    def to_json(self) -> dict[str, Any]:
        return {"v": 1, **asdict(self)}


def spans_jobs(kinds: list[str]) -> bool:
    """Whether a run with members of these kinds is more than its one lead job: only then do
    ``status`` and ``logs summary`` show its jobs."""
    return len(kinds) > 1 or any(kind != LEAD for kind in kinds)


def record_member(jobdir: JobDir, member: MemberJob) -> None:
    make_dir(jobdir.members)
    write_atomic(jobdir.member(member.job_id), json.dumps(member.to_json(), indent=2) + "\n")


def read_members(jobdir: JobDir) -> list[MemberJob]:
    """Every job of the run, in submission order. A job directory from before member records
    (or from a plain batch script) has its one job in ``submission.json``."""
    found: list[MemberJob] = []
    if jobdir.members.is_dir():
        for path in jobdir.members.glob("*.json"):
            try:
                data = json.loads(path.read_text())
                found.append(MemberJob(job_id=str(data["job_id"]), kind=data["kind"],
                                       nodes=str(data["nodes"]),
                                       submitted_at=float(data["submitted_at"]),
                                       script=data.get("script"), tasks=data.get("tasks")))
            except (OSError, ValueError, KeyError, TypeError):
                continue  # half-written by a crashed submitter: the rest still counts
    if not found:
        submission = read_submission(jobdir)
        if submission is not None and submission.mode == "slurm":
            found.append(MemberJob(submission.job_id, LEAD, "?", submission.submitted_at))
    return sorted(found, key=lambda m: (m.submitted_at, m.job_id))


@dataclass(frozen=True)
class RunPointer:
    """Where the run's agents meet now: rendezvous ``<run_id>[-s<step>].attempt-<attempt>``."""

    run_id: str
    attempt: int
    step: int
    written_at: float = 0.0


def publish_run_pointer(jobdir: JobDir, run_id: str, attempt: int, step: int) -> None:
    """Written by the lead's batch step before each srun of agents."""
    pointer = RunPointer(run_id, attempt, step, time.time())
    write_atomic(jobdir.run_pointer, json.dumps(asdict(pointer)) + "\n")


def read_run_pointer(jobdir: JobDir, run_id: str) -> RunPointer:
    """The run's current rendezvous; attempt 0, step 0 until the lead has published one (the
    lead may still be pending: its agents will then start in exactly that rendezvous)."""
    try:
        data = json.loads(jobdir.run_pointer.read_text())
        if str(data["run_id"]) == run_id:
            return RunPointer(run_id, int(data["attempt"]), int(data["step"]),
                              float(data.get("written_at", 0.0)))
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return RunPointer(run_id, 0, 0)
