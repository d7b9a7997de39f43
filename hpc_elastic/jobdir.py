"""The one place that knows the job directory's layout.

Every other module asks a :class:`JobDir` for paths instead of joining strings itself, so the
layout can change in one place and the analysis commands read exactly what the agents wrote.

Layout (``<root>`` is ``job_root`` from the config, one directory per submitted job)::

    <root>/<name>-<stamp>/
        job.yaml                 the resolved config (overrides applied), read by every agent
        submission.json          how and when the job was submitted (mode, Slurm job ids)
        sbatch.sh                the exact batch script that was submitted (Slurm mode)
        members/<job id>.json    every Slurm job that takes part in the run (the first one,
                                 ``grow`` jobs, array jobs), one file each, written by whoever
                                 submitted it; ``members/<stamp>.sbatch`` their scripts
        slurm/                   Slurm's own stdout/stderr: the batch step's, and each node's
                                 agent step (``<job>_<node>[_s<gen>][_r<launch>]_log.out``)
        batch/<job>.attempt-<a>.jsonl
                                 one writer: that job attempt's batch supervisor (the agents'
                                 steps it started, how each ended, relaunches, exclusions)
        excluded/<node>.json     nodes that failed and are not used again by this run, each
                                 created once (O_EXCL) by the supervisor that excluded it
        rendezvous/              the shared-filesystem rendezvous root (unless configured elsewhere)
            current.json         the run's current rendezvous (attempt, step): written by the
                                 first job's batch step, read by member jobs joining the run
        checkpoints/             where the example (and the templates) keep checkpoints
        nodes/<node>/
            events.jsonl         one writer: that node's agent
            metrics.jsonl        one writer: that node's agent
            workers/attempt-<a>/restart-<n>/rank-<r>/{stdout.log,stderr.log,error.json}

Per-node files have exactly one writer (the node's agent), because ``O_APPEND`` is not atomic
across NFS clients.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

JOB_CONFIG = "job.yaml"
SUBMISSION = "submission.json"
SBATCH_SCRIPT = "sbatch.sh"
EVENTS = "events.jsonl"
METRICS = "metrics.jsonl"

_SAFE_NAME = re.compile(r"^[A-Za-z0-9._-]+$")


def _check_name(name: str, what: str = "node name") -> str:
    """Node names and job ids become file names: refuse anything that could escape the
    directory they are meant for."""
    if not _SAFE_NAME.match(name) or name in {".", ".."}:
        raise ValueError(
            f"{what} {name!r} cannot be used as a file name; "
            "use letters, digits, '.', '_' or '-'"
        )
    return name


@dataclass(frozen=True)
class JobDir:
    """Paths inside one job directory. Creating the object touches nothing on disk."""

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    @property
    def config(self) -> Path:
        return self.path / JOB_CONFIG

    @property
    def submission(self) -> Path:
        return self.path / SUBMISSION

    @property
    def sbatch_script(self) -> Path:
        return self.path / SBATCH_SCRIPT

    @property
    def slurm_logs(self) -> Path:
        return self.path / "slurm"

    @property
    def rendezvous(self) -> Path:
        return self.path / "rendezvous"

    @property
    def run_pointer(self) -> Path:
        return self.rendezvous / "current.json"

    @property
    def members(self) -> Path:
        return self.path / "members"

    def member(self, job_id: str) -> Path:
        return self.members / f"{_check_name(job_id, 'job id')}.json"

    @property
    def supervisor(self) -> Path:
        return self.path / "batch"

    def supervisor_events(self, job_id: str, attempt: int) -> Path:
        """The events of one job attempt's batch supervisor (hpc_elastic/batch.py)."""
        return self.supervisor / f"{_check_name(job_id, 'job id')}.attempt-{int(attempt)}.jsonl"

    @property
    def excluded(self) -> Path:
        return self.path / "excluded"

    def excluded_node(self, node: str) -> Path:
        return self.excluded / f"{_check_name(node)}.json"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def nodes(self) -> Path:
        return self.path / "nodes"

    def node(self, node: str) -> Path:
        return self.nodes / _check_name(node)

    def events(self, node: str) -> Path:
        return self.node(node) / EVENTS

    def metrics(self, node: str) -> Path:
        return self.node(node) / METRICS

    def worker_logs(self, node: str, attempt: int, restart: int, rank: int) -> Path:
        """One worker's files: ``attempt`` counts Slurm requeues, ``restart`` the starts of this
        node's worker group within the attempt (0 first), ``rank`` the worker's global rank."""
        return (self.node(node) / "workers" / f"attempt-{attempt}" / f"restart-{restart}"
                / f"rank-{rank}")

    def node_names(self) -> list[str]:
        """Nodes that wrote anything, sorted; empty when the job never started."""
        if not self.nodes.is_dir():
            return []
        return sorted(p.name for p in self.nodes.iterdir() if p.is_dir())


def is_jobdir(path: Path) -> bool:
    """A job directory is one that holds the resolved config ``submit`` writes first."""
    return (path / JOB_CONFIG).is_file()


def jobdirs_under(root: Path) -> list[JobDir]:
    """Every job directory directly under ``root``, newest first (by the name's time stamp,
    never by mtime, which shared filesystems do not keep reliably)."""
    if not root.is_dir():
        return []
    found = [JobDir(p) for p in root.iterdir() if p.is_dir() and is_jobdir(p)]
    return sorted(found, key=lambda jd: _stamp_of(jd.path.name), reverse=True)


def _stamp_of(name: str) -> str:
    """``demo-20261124-052812-2aa7`` -> ``20261124-052812`` (names without a stamp sort last)."""
    match = re.search(r"(\d{8}-\d{6})-[0-9a-f]{4}$", name)
    return match.group(1) if match else ""


def find_jobdir(spec: str, roots: list[Path]) -> JobDir | None:
    """Resolve a JOB argument: a job directory path, else a job id (or directory name) found in
    the ``submission.json`` of a job directory under one of ``roots``."""
    path = Path(spec)
    if path.is_dir():
        return JobDir(path)
    for root in roots:
        for jobdir in jobdirs_under(root):
            if jobdir.path.name == spec:
                return jobdir
            try:
                data = json.loads(jobdir.submission.read_text())
            except (OSError, ValueError):
                continue
            if str(data.get("job_id", "")) == spec:
                return jobdir
    return None
