"""``logs failures``: each worker failure, its root-cause line, and the failing rank's stderr.

The roots come first: a cascade's consequences (the peers' gloo errors, the agent's SIGTERMs)
outnumber its cause and used to bury it at the end of the list.

Nodes lost mid-run are listed with the failures: a loss is often the root of its cascade, and
the survivors' connection errors after it are then marked secondary to it (see ``model``).

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
from .model import AGENT_ERROR, NODE_CAUSES, build, cause_key


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
    """Failures with stderr tails, node losses and the root causes, JSON-ready."""
    m = build(job)
    out = []
    for f in m.failures:
        p = stderr_path(job, f)
        item = dict(f)
        item["stderr_path"] = str(p) if p else None
        item["stderr_tail"] = tail(p, lines) if p else []
        if p is None and f["kind"] != AGENT_ERROR:
            job.note(f"no stderr.log found for {f.get('node')} rank {f.get('rank')}")
        out.append(item)
    return {"job_id": m.job_id, "failures": out, "node_losses": m.losses,
            "root_causes": m.root_causes, "notes": job.notes}


def _header(data: dict[str, Any]) -> str:
    fs, losses = data["failures"], data.get("node_losses") or []
    if not fs and not losses:
        return "no worker failures recorded"
    left = sum(1 for c in losses if c["kind"] == "node_left")
    lost = (f", {len(losses) - left} node(s) lost" if len(losses) > left else "") + (
        f", {left} node(s) left" if left else "")
    roots = len(data.get("root_causes") or [])
    rest = len(fs) + len(losses) - roots
    order = f"; the root cause(s) first, then {rest} secondary in time order" if rest > 0 else ""
    return f"{len(fs)} failure(s){lost}, {roots} root cause(s){order}"


def _loss_block(c: dict[str, Any]) -> list[str]:
    mark = "ROOT " if c["root"] else "     "
    return [f"{mark}{iso(c['time'])}  node {c['node']}  attempt {c['attempt']} round "
            f"{c['round']}  {'LEFT' if c['kind'] == 'node_left' else 'LOST'}",
            f"     cause: {c['message']}"]


def _failure_block(f: dict[str, Any]) -> list[str]:
    mark = "ROOT " if f["root"] else "     "
    who = ("the agent itself" if f["kind"] == AGENT_ERROR
           else f"rank {f['rank']}  HANG" if f["kind"] == "hang"
           else f"rank {f['rank']}  exit {f['exitcode']}")
    out = [f"{mark}{iso(f['time'])}  node {f['node']}  attempt {f['attempt']} round "
           f"{f['round']}  {who}" + (f" ({f['signal']})" if f.get("signal") else "")]
    out.append(f"     cause: {f['message'] or '(no message)'}")
    sec = f.get("secondary_to")
    if sec:
        what = (f"node {sec['node']} {'left' if sec['kind'] == 'node_left' else 'lost'}"
                if sec["kind"] in NODE_CAUSES else f"{sec['node']} rank {sec['rank']}")
        out.append(f"     secondary to: {what}")
    for folder in f.get("hang_dumps") or []:
        out.append(f"     stacks: {folder}/rank-*.txt (hpc-elastic logs hangs JOB)")
    if f["stderr_path"]:
        out.append(f"     stderr ({f['stderr_path']}), last {len(f['stderr_tail'])} lines:")
        out.extend(f"       | {line}" for line in f["stderr_tail"])
    return out


def render(data: dict[str, Any]) -> str:
    """Failures and node losses as text, one block each: the roots first (what to fix), then
    the rest -- mostly consequences of a root -- in time order."""
    out = [_header(data)]
    items = sorted([*(data.get("node_losses") or []), *data["failures"]],
                   key=lambda c: (not c["root"], cause_key(c)))
    for c in items:
        out.append("")
        out.extend(_loss_block(c) if c["kind"] in NODE_CAUSES else _failure_block(c))
    foot = footer(data["notes"])
    if foot:
        out.append(foot)
    return "\n".join(out)
