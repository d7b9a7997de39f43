"""``logs failures``: each worker failure, its root-cause line, and the failing rank's stderr.

The stderr file is found next to the ``error_file`` the agent recorded (both live in the rank's
directory), else through :meth:`JobDir.worker_logs` from attempt, restart count and rank. Only
the last N lines are kept (a deque), so a huge stderr is streamed, not loaded.
"""

from __future__ import annotations

from collections import deque
from pathlib import Path
from typing import Any

from .fmt import footer, iso
from .loader import Job
from .model import build


def stderr_path(job: Job, f: dict[str, Any]) -> Path | None:
    """The rank's ``stderr.log``: next to error_file if it exists, else derived from the ids."""
    ef = f.get("error_file")
    if isinstance(ef, str) and ef:
        p = Path(ef).parent / "stderr.log"
        if p.is_file():
            return p
        # The job dir may have been moved or copied: re-anchor at "nodes/".
        parts = Path(ef).parts
        if "nodes" in parts:
            p = job.path.joinpath(*parts[parts.index("nodes"):]).parent / "stderr.log"
            if p.is_file():
                return p
    node, rank = f.get("node"), f.get("rank")
    restart = f.get("restart_count")
    if isinstance(node, str) and isinstance(rank, int):
        for r in ([restart] if isinstance(restart, int) else []) + [None]:
            if r is None:
                base = job.dir.node(node) / "workers" / f"attempt-{f.get('attempt', 0)}"
                hits = sorted(base.glob(f"restart-*/rank-{rank}/stderr.log"))
                if hits:
                    return hits[-1]
                continue
            p = job.dir.worker_logs(node, int(f.get("attempt") or 0), r, rank) / "stderr.log"
            if p.is_file():
                return p
    return None


def tail(path: Path, n: int) -> list[str]:
    """Last ``n`` lines of a text file, streamed."""
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return [line.rstrip("\n") for line in deque(fh, maxlen=n)] if n > 0 else []
    except OSError:
        return []


def collect(job: Job, lines: int = 10) -> dict[str, Any]:
    """Failures (root first within each cascade) with stderr tails, JSON-ready."""
    m = build(job)
    out = []
    for f in m.failures:
        p = stderr_path(job, f)
        item = dict(f)
        item["stderr_path"] = str(p) if p else None
        item["stderr_tail"] = tail(p, lines) if p else []
        if p is None:
            job.note(f"no stderr.log found for {f.get('node')} rank {f.get('rank')}")
        out.append(item)
    return {"job_id": m.job_id, "failures": out, "notes": job.notes}


def render(data: dict[str, Any]) -> str:
    """Failures as text: one block each, the cascade's root marked."""
    fs = data["failures"]
    if not fs:
        out = ["no worker failures recorded"]
    else:
        out = [f"{len(fs)} failure(s), {sum(1 for f in fs if f['root'])} root cause(s)"]
    for f in fs:
        mark = "ROOT " if f["root"] else "     "
        out.append("")
        out.append(f"{mark}{iso(f['time'])}  node {f['node']}  attempt {f['attempt']} round "
                   f"{f['round']}  rank {f['rank']}  exit {f['exitcode']}"
                   + (f" ({f['signal']})" if f.get("signal") else ""))
        out.append(f"     cause: {f['message'] or '(no message)'}")
        if f["stderr_path"]:
            out.append(f"     stderr ({f['stderr_path']}), last {len(f['stderr_tail'])} lines:")
            out.extend(f"       | {line}" for line in f["stderr_tail"])
    foot = footer(data["notes"])
    if foot:
        out.append(foot)
    return "\n".join(out)
