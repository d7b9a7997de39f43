"""Find a job directory and stream its per-node files, collecting what had to be skipped.

Why a wrapper around :func:`read_jsonl`: every command must tolerate the same damage (a truncated
last line, a missing node directory, lines written by a newer agent, lines without ``time``) and
must *say* what it skipped. :class:`Job` owns one list of notes that every reader appends to, so a
command prints one footer however many files it read.
"""

from __future__ import annotations

import heapq
import json
import math
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hpc_elastic.jobdir import (
    JobDir,
    fallback_events,
    fallback_node_names,
    find_jobdir,
    readable_fallback,
)
from hpc_elastic.members import read_members
from hpc_elastic.telemetry.jsonl import MAX_LINE_BYTES, ReadStats, read_jsonl
from hpc_elastic.telemetry.schema import SCHEMA_VERSION

# Lines of one file may be a few records out of time order (events from different threads µs
# apart, metric aggregates flushed at exit). A bounded heap this deep restores time order while
# streaming, so a k-way merge over nodes stays correct without sorting whole files.
REORDER_WINDOW = 256


class JobNotFound(Exception):
    """JOB is neither a job directory nor a job id found under ``./jobs``."""


@dataclass
class Job:
    """One job directory plus the notes (skipped lines, missing files) its readers collected."""

    dir: JobDir
    notes: list[str] = field(default_factory=list)
    _noted: set[str] = field(default_factory=set)

    @property
    def path(self) -> Path:
        return self.dir.path

    def note(self, text: str) -> None:
        """Record something the reader had to skip or guess; each text once."""
        if text not in self._noted:
            self._noted.add(text)
            self.notes.append(text)

    def submission(self) -> dict[str, Any]:
        """``submission.json`` or ``{}``: a job started by hand has none, that is not an error."""
        try:
            data = json.loads(self.dir.submission.read_text())
        except FileNotFoundError:
            self.note("no submission.json: queue time unknown")
            return {}
        except (OSError, ValueError) as exc:
            self.note(f"submission.json unreadable ({exc}): queue time unknown")
            return {}
        return data if isinstance(data, dict) else {}

    def nodes(self) -> list[str]:
        """Node directories present; a node named in the config but absent is noted."""
        names = node_names(self.dir)
        expected = _expected_nodes(self.dir)
        if expected is not None and len(names) < expected:
            self.note(f"{expected - len(names)} of {expected} configured node(s) wrote no "
                      "directory (never started, or its files are lost)")
        return names

    def records(self, path: Path, what: str, node: str | None = None) -> Iterator[dict[str, Any]]:
        """Stream one file's valid records: known version, numeric ``time``; notes the rest.

        ``what`` names the file in notes ("events of local0"). Records with a newer ``v`` are
        skipped (their fields may mean something else); without ``time`` they cannot be placed.
        """
        stats = ReadStats()
        newer = no_time = 0
        try:
            for rec in read_jsonl(path, stats):
                v = rec.get("v", SCHEMA_VERSION)
                if not isinstance(v, int) or v > SCHEMA_VERSION:
                    newer += 1
                    continue
                t = rec.get("time")
                if not isinstance(t, (int, float)) or isinstance(t, bool) or not math.isfinite(t):
                    no_time += 1
                    continue
                if node is not None and "node" not in rec:
                    rec["node"] = node
                yield rec
        except FileNotFoundError:
            self.note(f"{what}: {path.name} missing")
            return
        except OSError as exc:
            self.note(f"{what}: cannot read {path} ({exc})")
            return
        finally:
            if stats.skipped:
                tail = " (truncated last line)" if stats.truncated_tail else ""
                if stats.long_lines:
                    tail += (f" ({stats.long_lines} longer than {MAX_LINE_BYTES >> 20} MiB, "
                             "not read)")
                self.note(f"{what}: skipped {stats.skipped} unparsable line(s){tail}")
            if newer:
                self.note(f"{what}: skipped {newer} line(s) of a newer schema version "
                          f"(this reader knows v{SCHEMA_VERSION})")
            if no_time:
                self.note(f"{what}: skipped {no_time} line(s) without a valid 'time'")

    def events(self, node: str) -> Iterator[dict[str, Any]]:
        """One node's events in file order (nearly time order). Events the job directory could
        not take (read-only, lost) are in the agent's fallback directory on its node: read from
        there too when this is that machine (local mode; a command run on the node)."""
        path = self.dir.events(node)
        fallback = fallback_nodes(self.dir).get(node)
        if fallback is None:
            return self.records(path, f"events of {node}", node)
        self.note(f"events of {node}: some were read from {fallback} on this machine (the job "
                  "directory could not take them)")
        streams = [reorder(self.records(fallback, f"fallback events of {node}", node))]
        if path.exists():
            streams.append(reorder(self.records(path, f"events of {node}", node)))
        return heapq.merge(*streams, key=_time_key)

    def merged_events(self, nodes: Iterable[str] | None = None) -> Iterator[dict[str, Any]]:
        """All nodes' events in time order: a k-way merge of per-node, locally reordered streams."""
        names = list(nodes) if nodes is not None else self.nodes()
        streams = [reorder(self.events(n)) for n in names]
        return heapq.merge(*streams, key=_time_key)

    def supervisor_events(self) -> list[dict[str, Any]]:
        """What the batch supervisors did (``batch/*.jsonl``: steps started and ended,
        relaunches, excluded nodes), all job attempts, in time order."""
        folder = self.dir.supervisor
        if not folder.is_dir():
            return []
        found = [rec for path in sorted(folder.glob("*.jsonl"))
                 for rec in self.records(path, f"batch supervisor {path.stem}")]
        return sorted(found, key=_time_key)

    def worker_metric_files(self, node: str) -> list[Path]:
        """Every rank's ``metrics.jsonl`` of a node, all attempts and restarts, sorted."""
        workers = self.dir.node(node) / "workers"
        if not workers.is_dir():
            return []
        return sorted(workers.glob("attempt-*/restart-*/rank-*/metrics.jsonl"))


def node_names(jd: JobDir) -> list[str]:
    """Nodes that wrote anything: into the job directory, or into this machine's fallback
    directory of the job (see :meth:`Job.events`)."""
    return sorted(set(jd.node_names()) | set(fallback_nodes(jd)))


def fallback_nodes(jd: JobDir) -> dict[str, Path]:
    """This machine's fallback event files of the job, by node: only those whose last event
    names one of the job's Slurm jobs (or its local job id), since the fallback directory is
    named after the job directory alone and a directory made by hand may share its name."""
    if readable_fallback(jd) is None:
        return {}
    try:
        job_id = str(json.loads(jd.submission.read_text(encoding="utf-8"))["job_id"])
    except (OSError, ValueError, KeyError, TypeError):
        return {}  # nothing to match the files against
    ids = {job_id, *(m.job_id for m in read_members(jd))}
    found = {}
    for node in fallback_node_names(jd):
        path = fallback_events(jd, node)
        rec = last_record(path)
        owner = str(rec.get("job_id")) if rec is not None else ""
        if owner in ids or owner.split("_", 1)[0] in ids:  # an array task: <array>_<task>
            found[node] = path
    return found


def last_record(path: Path, tail: int = 16384) -> dict[str, Any] | None:
    """The last whole record of a JSON-lines file with a ``kind``, from a read of its last
    ``tail`` bytes (``list`` stays fast on huge logs; a final event with its traceback is a few
    KiB)."""
    try:
        with open(path, "rb") as events:
            events.seek(0, os.SEEK_END)
            events.seek(max(0, events.tell() - tail))
            lines = events.read().splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("kind"), str):
            return rec
    return None


def _time_key(rec: dict[str, Any]) -> float:
    return rec["time"]


def reorder(records: Iterable[dict[str, Any]], window: int = REORDER_WINDOW
            ) -> Iterator[dict[str, Any]]:
    """Yield records in ``time`` order, assuming none is more than ``window`` lines late."""
    heap: list[tuple[float, int, dict[str, Any]]] = []
    for seq, rec in enumerate(records):
        if len(heap) >= window:
            yield heapq.heappushpop(heap, (rec["time"], seq, rec))[2]
        else:
            heapq.heappush(heap, (rec["time"], seq, rec))
    while heap:
        yield heapq.heappop(heap)[2]


def _expected_nodes(jd: JobDir) -> int | None:
    """``nodes`` from job.yaml when it is a plain integer; yaml is optional, so parse loosely."""
    try:
        text = jd.config.read_text(encoding="utf-8")
    except (OSError, ValueError):  # unreadable, or not UTF-8: the count is only a hint
        return None
    for line in text.splitlines():
        if line.startswith("nodes:"):
            value = line.split(":", 1)[1].split("#", 1)[0].strip().strip("'\"")
            if value.isdigit():
                return int(value)
            if ":" in value:  # "min:max" elastic range: the minimum is what must appear
                lo = value.split(":", 1)[0]
                return int(lo) if lo.isdigit() else None
    return None


def open_job(spec: str, roots: list[Path] | None = None) -> Job:
    """Resolve JOB: a directory path, else a job id found under the job roots (``./jobs``)."""
    jobdir = find_jobdir(spec, roots if roots is not None else [Path("jobs")])
    if jobdir is None:
        raise JobNotFound(f"{spec}: not a job directory, and no job directory under "
                          f"{', '.join(str(r) for r in roots or [Path('jobs')])} has that job id")
    return Job(jobdir)
