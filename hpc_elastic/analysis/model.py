"""The job-level facts every command shares, derived in ONE streaming pass per node file.

Why per node and not over the merged stream: the state needed to interpret an event (which
rendezvous round the node is in, whether it has a pending join) is per node, and reading each file
sequentially avoids a 64-way heap merge on the hot path. Job-level facts (a round's start and end,
its participants) are then min/max/union over nodes, which is order independent.

Rounds are keyed ``(attempt, step, round)``: every Slurm attempt, and every relaunch of the agents'
srun step within an attempt after a node loss (``step`` on ``agent.start``), has its own
rendezvous that numbers its rounds from 0 again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .loader import Job

TERMINAL = {"agent.succeeded": "ok", "agent.failed": "failed", "agent.preempted": "preempted",
            "shutdown": "shutdown"}

# Messages of ranks that died *because* another rank died: the collective's peer vanished, or the
# agent stopped them. They are never preferred as the root of a cascade.
_CASCADE_MARKERS = ("Connection closed by peer", "Connection reset by peer", "NCCL communicator",
                    "ProcessGroupNCCL", "Socket Timeout", "SIGTERM", "Signal 15",
                    "remote worker crashing", "Broken pipe")


@dataclass
class Round:
    """One rendezvous round of the whole job (all nodes that joined it)."""

    attempt: int
    round: int
    step: int = 0
    start: float | None = None
    end: float | None = None
    participants: set[str] = field(default_factory=set)
    world_size: int | None = None
    workers_started: float | None = None
    first_failure: float | None = None
    restart: bool = False  # some node logged workers.restart for it
    restart_reasons: set[str] = field(default_factory=set)

    def as_dict(self) -> dict[str, Any]:
        dur = None if self.start is None or self.end is None else round(self.end - self.start, 3)
        return {"attempt": self.attempt, "step": self.step, "round": self.round,
                "start": self.start,
                "end": self.end, "duration_s": dur, "participants": sorted(self.participants),
                "world_size": self.world_size}


@dataclass
class NodeHealth:
    """How one node's agent ended: ok, failed, preempted, shutdown, or vanished (no end event)."""

    node: str
    first: float | None = None
    last: float | None = None
    last_kind: str | None = None
    ended: str = "vanished"
    attempts: set[int] = field(default_factory=set)
    events: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {"node": self.node, "first_event": self.first, "last_event": self.last,
                "last_kind": self.last_kind, "ended": self.ended,
                "attempts": sorted(self.attempts), "events": self.events}


@dataclass
class JobModel:
    """Everything :func:`build` learned; commands format subsets of it."""

    job_id: str | None
    submitted_at: float | None
    nodes: list[str]
    rounds: dict[tuple[int, int], Round]
    health: dict[str, NodeHealth]
    failures: list[dict[str, Any]]
    first_start: float | None
    last_event: float | None
    attempts: set[int]
    attempt_spans: dict[int, list[float]]
    terminal: dict[int, dict[str, str]]  # attempt -> node -> how it ended
    preemptions: list[dict[str, Any]]
    requeues: int
    events: int


def is_cascade(message: str | None, exitcode: Any) -> bool:
    """A failure that was caused by another one (peer vanished, SIGTERM from the agent)."""
    if isinstance(exitcode, int) and exitcode < 0:
        return True
    text = message or ""
    return any(m in text for m in _CASCADE_MARKERS)


def _int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.lstrip("-").isdigit():
        return int(value)
    return None


def _failure(rec: dict[str, Any], key: tuple[int, int, int] | None,
             **extra: Any) -> dict[str, Any]:
    exitcode = rec.get("exitcode", rec.get("exit_code"))
    message = rec.get("message")
    if not isinstance(message, str):
        err = rec.get("error")
        message = err if isinstance(err, str) else None
    if message:
        message = message.strip().splitlines()[-1] if message.strip() else None
    out = {"time": rec["time"], "error_time": rec.get("error_time"), "node": rec.get("node"),
           "attempt": _int(rec.get("attempt")) or 0, "step": key[1] if key else 0,
           "round": key[2] if key else None,
           "restart_count": rec.get("restart_count"), "rank": rec.get("rank"),
           "local_rank": rec.get("local_rank"), "exitcode": exitcode, "pid": rec.get("pid"),
           "signal": rec.get("signal"), "message": message,
           "error_file": rec.get("error_file"), "root": False}
    out.update(extra)
    return out


def build(job: Job) -> JobModel:
    """One pass over every node's events (no merge), then job-level aggregation."""
    sub = job.submission()
    submitted = sub.get("submitted_at")
    submitted_at = float(submitted) if isinstance(submitted, (int, float)) else None
    job_id = sub.get("job_id")
    nodes = job.nodes()
    rounds: dict[tuple[int, int, int], Round] = {}
    health: dict[str, NodeHealth] = {}
    failures: list[dict[str, Any]] = []
    attempts: set[int] = set()
    spans: dict[int, list[float]] = {}
    terminal: dict[int, dict[str, str]] = {}
    preemptions: list[dict[str, Any]] = []
    requeues = 0
    first_start: float | None = None
    last_event: float | None = None
    n_events = 0
    seen_failures: set[tuple[Any, ...]] = set()

    def get_round(key: tuple[int, int, int]) -> Round:
        r = rounds.get(key)
        if r is None:
            r = rounds[key] = Round(attempt=key[0], step=key[1], round=key[2])
        return r

    for node in nodes:
        h = health[node] = NodeHealth(node)
        current: dict[int, tuple[int, int, int]] = {}  # attempt -> round key the node is in
        step_of: dict[int, int] = {}  # attempt -> the agents' srun step this node runs in
        pending_join: dict[int, float] = {}  # attempt -> time of an unanswered join
        fallback_round: dict[int, int] = {}
        for rec in job.events(node):
            n_events += 1
            t = rec["time"]
            kind = rec.get("kind")
            if not isinstance(kind, str):
                job.note(f"events of {node}: line(s) without 'kind' ignored")
                continue
            attempt = _int(rec.get("attempt")) or 0
            attempts.add(attempt)
            h.attempts.add(attempt)
            h.events += 1
            if h.first is None or t < h.first:
                h.first = t
            if h.last is None or t >= h.last:
                h.last, h.last_kind = t, kind
            span = spans.get(attempt)
            if span is None:
                spans[attempt] = [t, t]
            else:
                span[0] = min(span[0], t)
                span[1] = max(span[1], t)
            if last_event is None or t > last_event:
                last_event = t
            if job_id is None and isinstance(rec.get("job_id"), str):
                job_id = rec["job_id"]

            if kind in ("agent.start", "agent.started"):
                if first_start is None or t < first_start:
                    first_start = t
                step_of[attempt] = _int(rec.get("step")) or 0
            elif kind in ("rendezvous.started", "rendezvous.join"):
                pending_join.setdefault(attempt, t)
            elif kind in ("rendezvous.completed", "rendezvous.complete"):
                rnd = _int(rec.get("round"))
                if rnd is None:
                    continue
                key = (attempt, step_of.get(attempt, 0), rnd)
                r = get_round(key)
                start = pending_join.pop(attempt, None)
                if start is None and isinstance(rec.get("duration_ms"), (int, float)):
                    start = t - rec["duration_ms"] / 1000.0
                if start is not None and (r.start is None or start < r.start):
                    r.start = start
                if r.end is None or t > r.end:
                    r.end = t
                r.participants.add(node)
                ws = _int(rec.get("world_size"))
                if ws is not None:
                    r.world_size = ws
                current[attempt] = key
                fallback_round[attempt] = rnd + 1
            elif kind == "agent.rendezvous" and attempt in pending_join:
                # A backend without round events (plain c10d with torch's events suppressed):
                # number the node's rounds itself; duration_ms gives the join time.
                rnd = fallback_round.get(attempt, 0)
                fallback_round[attempt] = rnd + 1
                key = (attempt, step_of.get(attempt, 0), rnd)
                r = get_round(key)
                start = pending_join.pop(attempt)
                r.start = start if r.start is None else min(r.start, start)
                r.end = t if r.end is None else max(r.end, t)
                r.participants.add(node)
                current[attempt] = key
            elif kind == "workers.started":
                key = current.get(attempt)
                if key is not None:
                    r = get_round(key)
                    if r.workers_started is None or t > r.workers_started:
                        r.workers_started = t
            elif kind == "workers.restart":
                key = current.get(attempt)
                if key is not None:
                    r = get_round(key)
                    r.restart = True
                    if isinstance(rec.get("reason"), str):
                        r.restart_reasons.add(rec["reason"])
                else:
                    job.note(f"events of {node}: workers.restart outside a known round")
            elif kind in ("worker.failed", "worker.exit"):
                code = rec.get("exitcode", rec.get("exit_code"))
                if kind == "worker.exit" and code in (0, None):
                    continue
                fkey = (node, attempt, rec.get("pid"), rec.get("rank"), rec.get("restart_count"))
                if fkey in seen_failures:
                    continue
                seen_failures.add(fkey)
                key = current.get(attempt)
                failures.append(_failure(rec, key))
                if key is not None:
                    r = get_round(key)
                    if r.first_failure is None or t < r.first_failure:
                        r.first_failure = t
            elif kind == "agent.failed":
                key = current.get(attempt)
                for f in rec.get("failures") or []:
                    if not isinstance(f, dict):
                        continue
                    merged = {**rec, **f, "time": rec["time"], "node": node}
                    merged.pop("failures", None)
                    fkey = (node, attempt, merged.get("pid"), merged.get("rank"),
                            merged.get("restart_count"))
                    dup = any(x["node"] == node and x["attempt"] == attempt
                              and x["rank"] == merged.get("rank")
                              and x["round"] == (key[2] if key else None)
                              and x["step"] == (key[1] if key else 0) for x in failures)
                    if fkey in seen_failures or dup:
                        continue
                    seen_failures.add(fkey)
                    failures.append(_failure(merged, key))
                    if key is not None:
                        r = get_round(key)
                        if r.first_failure is None or t < r.first_failure:
                            r.first_failure = t
            elif kind == "preemption.signal":
                preemptions.append({"time": t, "node": node, "attempt": attempt,
                                    "signal": rec.get("signal")})
            elif kind == "requeue":
                requeues += 1

            ended = TERMINAL.get(kind)
            if ended is not None:
                h.ended = ended
                terminal.setdefault(attempt, {})[node] = ended
            elif kind in ("agent.start", "agent.started"):
                h.ended = "vanished"  # a new attempt starts over

    _mark_roots(failures)
    failures.sort(key=lambda f: (*_failure_order(f), f["node"] or "", f["rank"] or 0))
    for f in failures:  # the root's error_time: when useful work really stopped
        if f["root"] and isinstance(f["error_time"], (int, float)) and f["round"] is not None:
            r = rounds.get((f["attempt"], f["step"], f["round"]))
            if r is not None and r.end is not None and r.end <= f["error_time"] < f["time"]:
                r.first_failure = float(f["error_time"])
    return JobModel(job_id=job_id if isinstance(job_id, str) else None,
                    submitted_at=submitted_at, nodes=nodes, rounds=rounds, health=health,
                    failures=failures, first_start=first_start, last_event=last_event,
                    attempts=attempts, attempt_spans=spans, terminal=terminal,
                    preemptions=preemptions, requeues=requeues, events=n_events)


def _failure_order(f: dict[str, Any]) -> tuple[float, float]:
    """``error_time`` (when the rank raised; whole seconds) first, the agent's ``time`` next."""
    et = f.get("error_time")
    return (float(et) if isinstance(et, (int, float)) else f["time"], f["time"])


def _mark_roots(failures: list[dict[str, Any]]) -> None:
    """Mark the first failure of each cascade (one cascade per attempt and round) as ``root``.

    Prefer a failure whose message is not a consequence of another (gloo peer closed, SIGTERM);
    among those the earliest. Only if every failure looks like a consequence take the earliest.
    """
    groups: dict[tuple[Any, Any], list[dict[str, Any]]] = {}
    for f in failures:
        groups.setdefault((f["attempt"], f["step"], f["round"]), []).append(f)
    for group in groups.values():
        causes = [f for f in group if not is_cascade(f["message"], f["exitcode"])]
        root = min(causes or group, key=_failure_order)
        root["root"] = True
