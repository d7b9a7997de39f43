"""``logs timeline``: every node's events in one time-ordered stream.

A k-way merge (``heapq.merge``) of the per-node files, each locally reordered by a bounded heap,
so memory stays O(nodes x window) however long the job ran. Filters are applied while streaming.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from .fmt import iso
from .loader import Job

# Fields that are the same on every line or too long for one line of text.
_SKIP_FIELDS = {"v", "time", "job_id", "attempt", "node", "source", "kind", "torch_name",
                "run_id", "hostname", "role", "torch_state", "rdzv_backend", "x_node",
                "total_run_time_s", "error", "error_file", "failures", "worker_id",
                "group_world_size", "group_rank", "role_rank", "role_world_size", "rel_s"}
_DETAIL_WIDTH = 100


def details(rec: dict[str, Any]) -> str:
    """``key=value`` pairs of the interesting fields, cut to one readable line."""
    parts = []
    for k, v in rec.items():
        if k in _SKIP_FIELDS or v is None:
            continue
        if isinstance(v, float):
            v = f"{v:.6g}"
        text = str(v).replace("\n", " ")
        if len(text) > 60:
            text = text[:57] + "..."
        parts.append(f"{k}={text}")
    if isinstance(rec.get("failures"), list):
        parts.append(f"failures={len(rec['failures'])}")
    line = " ".join(parts)
    return line if len(line) <= _DETAIL_WIDTH else line[:_DETAIL_WIDTH - 3] + "..."


def events(job: Job, *, since: float | None = None, node: str | None = None,
           kind: str | None = None) -> Iterator[dict[str, Any]]:
    """Merged events, filtered. ``since`` is seconds after the job's first event."""
    nodes = job.nodes()
    t0 = job_start(job, nodes)
    if node is not None:
        if node not in nodes:
            job.note(f"node {node!r} has no directory (nodes: {', '.join(nodes) or 'none'})")
            return
        nodes = [node]
    for rec in job.merged_events(nodes):
        if t0 is None:
            t0 = rec["time"]
        rec["rel_s"] = rec["time"] - t0
        if since is not None and rec["rel_s"] < since:
            continue
        k = rec.get("kind")
        if kind is not None and not (isinstance(k, str) and k.startswith(kind)):
            continue
        yield rec


def job_start(job: Job, nodes: list[str]) -> float | None:
    """The earliest first event over ALL nodes, so relative times and ``--since`` mean the same
    with and without ``--node``. Reads one line per node."""
    firsts = []
    for n in nodes:
        quiet = Job(job.dir)  # its notes are dropped: the full read below reports the damage
        for rec in quiet.records(job.dir.events(n), "", n):
            firsts.append(rec["time"])
            break
    return min(firsts, default=None)


def row_json(rec: dict[str, Any]) -> dict[str, Any]:
    """The record with its relative and ISO time in front (JSON lines output)."""
    return {"rel_s": round(rec.pop("rel_s"), 6), "iso": iso(rec["time"]), **rec}


def row_text(rec: dict[str, Any]) -> str:
    """One aligned text line: +relative, ISO, node, attempt, kind, details."""
    return (f"+{rec['rel_s']:10.3f}s  {iso(rec['time'])}  {str(rec.get('node')):<12} "
            f"a{rec.get('attempt', '?')}  {str(rec.get('kind')):<28} {details(rec)}")
