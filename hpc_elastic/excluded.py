"""Nodes a run does not use again: each failed node is recorded once in ``excluded/<node>.json``.

Why in the job directory: the decision is made by one job attempt's batch supervisor (it saw
the node's step end while the node was lost, or end abnormally twice; or the analysis of the job
directory finds the node lost, :func:`exclude_lost_nodes`), by an agent (a lost batch host, a
straggler), but it must outlive that attempt -- a requeued attempt, whose supervisor may run on
another node, skips the node, and the requeue asks Slurm to leave it out of the next allocation
(``ExcNodeList``). ``status`` and ``logs summary`` show the list.

Shared-filesystem rules: each record is created with ``O_CREAT | O_EXCL | O_NOFOLLOW`` (one
writer, never a planted link followed), written once, and read back only when it is a regular
file owned by the reading user and not writable by others; anything else is ignored, so a
stranger's file cannot take nodes away from a run.
"""

from __future__ import annotations

import json
import os
import stat
import time
from dataclasses import asdict, dataclass
from typing import Any

from hpc_elastic.jobdir import JobDir, file_mode_in, make_dir
from hpc_elastic.slurm import SlurmError, exclude_nodes, requeue

#: Evidence (``logs failures``: a ``node_lost`` cause) that the *others* went on without the node:
#: they declared its heartbeat dead, or formed a round without it. A node that merely fell silent
#: while a peer ended cleanly (``outlived``: e.g. killed by a requeue before its final event) is
#: not enough to take it away from the run.
LOSS_EVIDENCE = frozenset({"heartbeat", "left_rendezvous"})


@dataclass(frozen=True)
class ExcludedNode:
    """One failed node: why, and by which job attempt's supervisor, at what time."""

    node: str
    reason: str
    job_id: str
    attempt: int
    time: float

    def to_json(self) -> dict[str, Any]:
        return {"v": 1, **asdict(self)}


def exclude_node(jobdir: JobDir, node: str, reason: str, job_id: str, attempt: int) -> bool:
    """Record ``node`` as excluded; False when it already was (the first record stays)."""
    path = jobdir.excluded_node(node)
    make_dir(jobdir.excluded)
    record = ExcludedNode(node, reason, job_id, attempt, time.time())
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW,
                     file_mode_in(jobdir.excluded))
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as out:
        out.write(json.dumps(record.to_json()) + "\n")
    return True


def read_excluded(jobdir: JobDir) -> list[ExcludedNode]:
    """Every excluded node of the run, oldest first; records that fail the checks are skipped."""
    if not jobdir.excluded.is_dir():
        return []
    found = []
    for path in jobdir.excluded.glob("*.json"):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            continue  # a link, or gone
        try:
            info = os.fstat(fd)
            if (not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid()
                    or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)):
                continue
            with os.fdopen(os.dup(fd)) as source:
                data = json.loads(source.read(64 * 1024))
            record = ExcludedNode(node=str(data["node"]), reason=str(data["reason"]),
                                  job_id=str(data["job_id"]), attempt=int(data["attempt"]),
                                  time=float(data["time"]))
        except (OSError, ValueError, KeyError, TypeError):
            continue  # half-written by a crashed supervisor, or not ours
        finally:
            os.close(fd)
        if path.name == f"{record.node}.json":
            found.append(record)
    return sorted(found, key=lambda r: (r.time, r.node))


def excluded_names(jobdir: JobDir) -> list[str]:
    return [r.node for r in read_excluded(jobdir)]


def exclude_lost_nodes(jobdir: JobDir, job_id: str, attempt: int) -> list[tuple[str, str]]:
    """Exclude every node that the post-run analysis (``logs failures``) finds *lost* in
    ``attempt`` -- its agent stopped without an end event and the others went on without it
    (:data:`LOSS_EVIDENCE`) -- and that logged nothing since (a node that rejoined and trained on
    is not excluded). Returns the newly excluded ``(node, reason)`` pairs.

    Why the analysis and not only Slurm's node state: a power-cut node stays "up" for Slurm until
    ``SlurmdTimeout`` (300 s by default), long after the survivors re-formed without it, and a
    node whose agent cannot reach the job directory is up for Slurm forever. Called at the
    supervisor's decision points (a new generation, a requeue, the next attempt's start), not
    while training runs: it reads every node's events."""
    from hpc_elastic.analysis.loader import Job
    from hpc_elastic.analysis.model import build

    model = build(Job(jobdir))
    done = set(excluded_names(jobdir))
    found = []
    for loss in model.losses:
        node = loss["node"]
        health = model.health.get(node)
        if (loss["kind"] != "node_lost" or loss["attempt"] != attempt or node in done
                or not LOSS_EVIDENCE & set(loss.get("evidence") or ())
                or health is None or health.last != loss["last_event"]):
            continue
        reason = f"the analysis finds it lost in attempt {attempt}: {loss['message']}"
        try:
            if exclude_node(jobdir, node, reason, job_id, attempt):
                found.append((node, reason))
        except (OSError, ValueError):  # a name that is no file name, a full disk: not excluded
            continue
        done.add(node)
    return found


def requeue_without_excluded(jobdir: JobDir, job_id: str) -> list[str]:
    """``scontrol requeue``, then ask Slurm to leave the run's excluded nodes out of the next
    allocation (``ExcNodeList``; Slurm takes it once the requeued job counts as pending, which
    it does at once, while it is still completing). Returns the new list, [] when there is none
    or Slurm refused it: the next attempt's supervisor skips excluded nodes either way.

    Why the requeueing process sets it: after the batch host's loss no supervisor is left to do
    it at the end of the attempt, and the agent that requeued is ended by Slurm right after."""
    requeue(job_id)
    failed = excluded_names(jobdir)
    if not failed:
        return []
    try:
        return exclude_nodes(job_id, failed)
    except SlurmError:
        return []
