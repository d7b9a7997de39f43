"""Nodes a run does not use again: each failed node is recorded once in ``excluded/<node>.json``.

Why in the job directory: the decision is made by one job attempt's batch supervisor (it saw
the node's step end while the node was lost, or end abnormally twice), but it must outlive that
attempt -- a requeued attempt, whose supervisor may run on another node, skips the node, and the
requeue asks Slurm to leave it out of the next allocation (``ExcNodeList``). ``status`` and
``logs summary`` show the list.

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
