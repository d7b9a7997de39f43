"""Turn a validated config into a job: the job directory, its files, and the submission.

Order matters for "nothing lost": the job directory and its resolved config are written before
anything is submitted, and ``submission.json`` is rewritten (atomically) with the Slurm job id
right after ``sbatch`` answers, so every started job can be found and analysed.
"""

from __future__ import annotations

import json
import secrets
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from hpc_elastic.config import JobConfig, config_from_dict, not_utf8
from hpc_elastic.jobdir import JobDir, JobDirError, make_dir, write_atomic

if TYPE_CHECKING:  # submitit is imported only where a script is rendered
    from hpc_elastic.sbatch import MemberScript


@dataclass(frozen=True)
class Submission:
    """What ``submission.json`` holds."""

    mode: str  # "slurm" or "local"
    job_id: str
    submitted_at: float
    name: str

    def to_json(self) -> dict[str, Any]:
        return {"v": 1, "mode": self.mode, "job_id": self.job_id,
                "submitted_at": self.submitted_at, "name": self.name}


def new_jobdir(config: JobConfig, now: float | None = None) -> JobDir:
    """A fresh, unique job directory path under ``job_root`` (not created yet).

    The name sorts by time (``list`` shows newest first) and carries a random suffix, so two
    submissions in the same second never share a directory.
    """
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    return JobDir(Path(config.job_root) / f"{config.name}-{stamp}-{secrets.token_hex(2)}")


def create_jobdir(config: JobConfig, jobdir: JobDir, exist_ok: bool = False) -> None:
    """Create the directory tree and write the resolved config the agents will read.

    ``exist_ok`` is for batch scripts that skip ``submit``: every node creates the same
    directory at the same time, and each writes the same text with write-then-rename.
    """
    make_dir(jobdir.path, share_with_group=config.share_with_group, exist_ok=exist_ok)
    for sub in (jobdir.slurm_logs, jobdir.nodes, jobdir.checkpoints):
        make_dir(sub, exist_ok=exist_ok)
    # The rendezvous directory holds the store; only the job's owner may read it.
    make_dir(jobdir.rendezvous, share_with_group=False, exist_ok=exist_ok)
    try:
        write_atomic(jobdir.config, yaml.safe_dump(config.to_dict(), sort_keys=False))
    except OSError as err:
        raise JobDirError(f"{jobdir.config}: cannot be written ({err.strerror}). Fix: free space "
                          f"or make {jobdir.path} writable, then submit again.") from None


def batch_jobdir(config: JobConfig, slurm_job_id: str) -> JobDir:
    """The job directory of a job started from a plain batch script (``srun hpc-elastic agent
    job.yaml``): derived from the Slurm job id, so every node finds the same one without
    talking to the others, and a requeued attempt finds it again."""
    jobdir = JobDir(Path(config.job_root) / f"{config.name}-slurm{slurm_job_id}")
    create_jobdir(config, jobdir, exist_ok=True)
    if not jobdir.submission.exists():
        write_submission(jobdir, Submission("slurm", slurm_job_id, time.time(), config.name))
    return jobdir


def read_job_config(jobdir: JobDir) -> JobConfig:
    """The resolved config as written by :func:`create_jobdir`; a file that cannot be read or
    parsed is a :class:`JobDirError` (one paragraph), never a traceback."""
    where = str(jobdir.config)
    try:
        data = yaml.safe_load(jobdir.config.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise JobDirError(not_utf8(where, err)) from None
    except OSError as err:
        raise JobDirError(f"{where}: cannot be read ({err.strerror}). Is {jobdir.path} the "
                          "job directory 'submit' printed? Fix: give that directory.") from None
    except yaml.YAMLError as err:
        raise JobDirError(f"{where}: is not the YAML 'submit' wrote ({str(err).splitlines()[0]})."
                          " Fix: restore it, or submit the job file again.") from None
    if not isinstance(data, dict):
        raise JobDirError(f"{where}: holds no job configuration. Fix: restore it, or submit "
                          "the job file again.")
    return config_from_dict(data, source=where)


def write_submission(jobdir: JobDir, submission: Submission) -> None:
    write_atomic(jobdir.submission, json.dumps(submission.to_json(), indent=2) + "\n")


def read_submission(jobdir: JobDir) -> Submission | None:
    """``submission.json``, or None when it is missing, not UTF-8 JSON, or lacks a field."""
    try:
        data = json.loads(jobdir.submission.read_text(encoding="utf-8"))
        return Submission(mode=str(data["mode"]), job_id=str(data["job_id"]),
                          submitted_at=float(data["submitted_at"]), name=str(data["name"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def prepare_slurm_job(config: JobConfig, jobdir: JobDir, member: MemberScript | None = None
                      ) -> str:
    """Create the job directory and write the batch script; return the script's text."""
    from hpc_elastic.sbatch import render_sbatch

    create_jobdir(config, jobdir)
    text = render_sbatch(config, jobdir, python=sys.executable, member=member)
    write_atomic(jobdir.sbatch_script, text)
    return text
