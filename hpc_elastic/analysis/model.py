"""The job-level facts every command shares, derived in ONE streaming pass per node file.

Why per node and not over the merged stream: the state needed to interpret an event (which
rendezvous round the node is in, whether it has a pending join) is per node, and reading each file
sequentially avoids a 64-way heap merge on the hot path. Job-level facts (a round's start and end,
its participants) are then min/max/union over nodes, which is order independent.

Rounds are keyed ``(attempt, step, round)``: every Slurm attempt, and every new rendezvous
generation within an attempt (``step`` on ``agent.start``: the batch supervisor started every
agent again), has its own rendezvous that numbers its rounds from 0 again. One node's agent
relaunched into the running rendezvous (``launch`` on ``agent.start``) is a new run of that node,
so the agent it replaced can still be found lost.

Root causes are chosen among *causes* of both sorts the events show: a worker failure that is not
a consequence of another (see :func:`is_cascade`), and a node lost mid-run (its agent stopped
without an end event while the others went on without it, :func:`_node_losses`). Each cascade
(attempt, step, round) gets one root: the earliest cause (:func:`cause_key`), so a vanished node
is the root of the connection errors it leaves behind on the survivors, and an exception raised
before a node loss stays the root.
"""

from __future__ import annotations

import datetime as _dt
import re
from dataclasses import dataclass, field
from typing import Any

from .hangs import collect as collect_hangs
from .loader import Job

TERMINAL = {"agent.succeeded": "ok", "agent.failed": "failed", "agent.preempted": "preempted",
            "shutdown": "shutdown", "agent.left": "left"}
# Events after which a node that falls silent left on purpose, not lost: its agent's end events,
# and the rendezvous' own clean exits (it closed the run, or departed from it when stopped).
_CLEAN_END = frozenset(TERMINAL) | {"rendezvous.closed", "rendezvous.departed"}

#: A cause that is the agent itself: it ended with an error of its own (``agent.failed`` with a
#: ``reason``: a join timeout, an unwritable job directory, ...), not a worker's failure.
AGENT_ERROR = "agent_error"
#: Causes that are a node, not a worker: lost (vanished) or left (departed when stopped).
NODE_CAUSES = frozenset({"node_lost", "node_left"})
# How an agent stopped from outside ends: it departs from the rendezvous, then logs ``shutdown``.
_DEPARTED = frozenset({"shutdown", "rendezvous.departed"})
# A worker's error_time is whole seconds: a failure caused by a departure may carry a time up to
# this much earlier than the departure itself.
ERROR_TIME_RESOLUTION_S = 1.0

# A node's heartbeat counter is read every heartbeat_interval (2 s by default), so the "last
# heartbeat seen" of a node_dead event can trail the node's real stop by that much; error_time is
# whole seconds, and nodes' clocks differ a little. Ordering causes, a lost node is therefore
# taken to have stopped up to this long before its last seen heartbeat (never before its own last
# event, which proves it was alive then).
HEARTBEAT_SLACK_S = 2.0

# Messages of ranks that died *because* another rank died: the collective's peer vanished, or the
# agent stopped them. They are never preferred as the root of a cascade.
_CASCADE_MARKERS = ("Connection closed by peer", "Connection reset by peer", "NCCL communicator",
                    "ProcessGroupNCCL", "Socket Timeout", "SIGTERM", "Signal 15",
                    "remote worker crashing", "Broken pipe")
# torch's message for a rank that left no error file: it did not raise (in Python) at all.
_NO_ERROR_FILE = re.compile(r"Signal \d+ \(\w+\) received by PID|To enable traceback see")


#: One agent of a node: (node, attempt, rendezvous generation, launch).
RunKey = tuple[str, int, int, int]


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
    join_starts: dict[str, float] = field(default_factory=dict)  # node -> when it began to join

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
    #: The Slurm job the node's agent ran under, and the run it joined (another job's for the
    #: nodes of a ``grow`` job or an array task), from its last ``agent.start``.
    job_id: str | None = None
    run_id: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"node": self.node, "first_event": self.first, "last_event": self.last,
                "last_kind": self.last_kind, "ended": self.ended,
                "attempts": sorted(self.attempts), "events": self.events,
                "job_id": self.job_id}


@dataclass
class NodeRun:
    """One node's agent in one (attempt, step, launch): what tells a vanished node from a
    finished one."""

    node: str
    attempt: int
    step: int
    last: float
    last_kind: str
    launch: int = 0
    round: int | None = None  # the last rendezvous round it completed
    ended: bool = False  # it logged a clean end (_CLEAN_END)


@dataclass
class NodeDeath:
    """A ``rendezvous.node_dead`` line: ``by`` declared the rendezvous node id ``dead_id`` dead."""

    time: float
    dead_id: str
    silent_s: float | None
    by: str

    @classmethod
    def of(cls, rec: dict[str, Any], node: str) -> NodeDeath:
        """From the line; ``silent_s`` is absent when the death was found during a join."""
        silent = rec.get("silent_s")
        ok = isinstance(silent, (int, float)) and not isinstance(silent, bool)
        return cls(rec["time"], rec["dead_node"], float(silent) if ok else None, node)


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
    losses: list[dict[str, Any]] = field(default_factory=list)  # nodes lost mid-run
    root_causes: list[dict[str, Any]] = field(default_factory=list)  # roots, earliest first
    hangs: list[dict[str, Any]] = field(default_factory=list)  # analysed hang dumps (.hangs)
    #: ``restarts.stopped``: an agent stopped restarting because one failure kept repeating.
    restarts_stopped: list[dict[str, Any]] = field(default_factory=list)
    #: ``node.straggler``: a node whose ranks' busy time per step was >= 1.5x the median.
    stragglers: list[dict[str, Any]] = field(default_factory=list)


def is_cascade(message: str | None, exitcode: Any) -> bool:
    """A failure that was caused by another one (peer vanished, SIGTERM from the agent).

    The rank's own exception (its error file's message) decides when there is one: a rank that
    raised and was then killed on its way out (the agent's SIGTERM, a SIGABRT from tearing down
    its process group) raised first. Only a rank without one counts as a consequence because a
    signal ended it.
    """
    text = message or ""
    if any(m in text for m in _CASCADE_MARKERS):
        return True
    raised = bool(text) and _NO_ERROR_FILE.match(text) is None
    return not raised and isinstance(exitcode, int) and exitcode < 0


def _int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.lstrip("-").isdigit():
        return int(value)
    return None


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


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
           "error_file": rec.get("error_file"), "kind": "worker_failed", "root": False,
           "secondary_to": None}
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
    runs: dict[RunKey, NodeRun] = {}
    rdzv_ids: dict[str, RunKey] = {}  # rendezvous node id -> its run's key
    deaths: list[NodeDeath] = []
    hung: dict[str, tuple[dict[str, Any], tuple[int, int, int] | None]] = {}  # stamp -> first
    stopped: list[dict[str, Any]] = []
    stragglers: list[dict[str, Any]] = []

    def get_round(key: tuple[int, int, int]) -> Round:
        r = rounds.get(key)
        if r is None:
            r = rounds[key] = Round(attempt=key[0], step=key[1], round=key[2])
        return r

    def add_failure(rec: dict[str, Any], key: tuple[int, int, int] | None, t: float) -> None:
        failures.append(_failure(rec, key))
        if key is not None:
            r = get_round(key)
            if r.first_failure is None or t < r.first_failure:
                r.first_failure = t

    for node in nodes:
        h = health[node] = NodeHealth(node)
        current: dict[int, tuple[int, int, int]] = {}  # attempt -> round key the node is in
        step_of: dict[int, int] = {}  # attempt -> the rendezvous generation this node runs in
        launch_of: dict[int, int] = {}  # attempt -> this node's agent launch in that generation
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
                step_of[attempt] = _int(rec.get("step")) or 0
                launch_of[attempt] = _int(rec.get("launch")) or 0
                h.job_id = _str(rec.get("job_id")) or h.job_id
                h.run_id = _str(rec.get("run_id")) or h.job_id
            rkey = (node, attempt, step_of.get(attempt, 0), launch_of.get(attempt, 0))
            run = runs.get(rkey)
            if run is None:
                run = runs[rkey] = NodeRun(node, attempt, rkey[2], t, kind, rkey[3])
            elif t >= run.last:
                run.last, run.last_kind = t, kind
            rdzv_id = rec.get("x_node")  # the rendezvous' own node id (see rendezvous.node_dead)
            if isinstance(rdzv_id, str):
                rdzv_ids[rdzv_id] = rkey

            if kind in ("agent.start", "agent.started"):
                if first_start is None or t < first_start:
                    first_start = t
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
                if start is not None:
                    r.join_starts[node] = min(start, r.join_starts.get(node, start))
                    if r.start is None or start < r.start:
                        r.start = start
                if r.end is None or t > r.end:
                    r.end = t
                r.participants.add(node)
                ws = _int(rec.get("world_size"))
                if ws is not None:
                    r.world_size = ws
                current[attempt] = key
                fallback_round[attempt] = rnd + 1
                run.round = rnd
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
                run.round = rnd
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
                add_failure(rec, current.get(attempt), t)
            elif kind == "agent.failed":
                key = current.get(attempt)
                if not rec.get("failures") and isinstance(rec.get("reason"), str):
                    # The agent itself failed (join timeout, unwritable job directory, ...):
                    # a cause like a worker's failure, with the agent's reason as its message.
                    add_failure({**rec, "message": rec["reason"], "node": node}, key, t)
                    failures[-1]["kind"] = AGENT_ERROR
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
                    add_failure(merged, key, t)
            elif kind == "preemption.signal":
                preemptions.append({"time": t, "node": node, "attempt": attempt,
                                    "signal": rec.get("signal")})
            elif kind == "requeue":
                requeues += 1
            elif kind == "rendezvous.node_dead" and isinstance(rec.get("dead_node"), str):
                deaths.append(NodeDeath.of(rec, node))
            elif kind == "node.straggler":
                stragglers.append({"time": t, "node": node, "attempt": attempt,
                                   "ratio": rec.get("ratio"), "ranks": rec.get("ranks"),
                                   "node_busy_s": rec.get("node_busy_s"),
                                   "median_busy_s": rec.get("median_busy_s"),
                                   "windows": rec.get("windows"),
                                   "policy": rec.get("policy"), "action": rec.get("action")})
            elif kind == "restarts.stopped":
                stopped.append({"time": t, "node": node, "attempt": attempt,
                                "repeats": rec.get("repeats"), "cause": rec.get("cause"),
                                "reason": rec.get("reason")})
            elif kind == "worker.hung" and isinstance(rec.get("stamp"), str):
                first = hung.get(rec["stamp"])
                if first is None or t < first[0]["time"]:
                    hung[rec["stamp"]] = (rec, current.get(attempt))

            if kind in _CLEAN_END:
                run.ended = True
            ended = TERMINAL.get(kind)
            if ended is not None:
                h.ended = ended
                terminal.setdefault(attempt, {})[node] = ended
            elif kind in ("agent.start", "agent.started"):
                h.ended = "vanished"  # a new attempt starts over

    _standby_starts(rounds)
    hang_list = collect_hangs(job) if hung or job.dir.nodes.is_dir() and any(
        (job.dir.node(n) / "hangs").is_dir() for n in nodes) else []
    failures.extend(_hang_causes(hung, hang_list))
    losses = _node_losses(runs, rounds, rdzv_ids, deaths)
    _mark_roots(failures, losses)
    failures.sort(key=lambda f: (*_failure_order(f), f["node"] or "", f["rank"] or 0))
    losses.sort(key=cause_key)
    roots = sorted((c for c in [*losses, *failures] if c["root"]), key=cause_key)
    _mark_stops(rounds, roots, failures)
    return JobModel(job_id=job_id if isinstance(job_id, str) else None,
                    submitted_at=submitted_at, nodes=nodes, rounds=rounds, health=health,
                    failures=failures, first_start=first_start, last_event=last_event,
                    attempts=attempts, attempt_spans=spans, terminal=terminal,
                    preemptions=preemptions, requeues=requeues, events=n_events,
                    losses=losses, root_causes=[root_cause(c) for c in roots],
                    hangs=hang_list, restarts_stopped=sorted(stopped, key=lambda x: x["time"]),
                    stragglers=sorted(stragglers, key=lambda x: x["time"]))


def _hang_causes(hung: dict[str, tuple[dict[str, Any], tuple[int, int, int] | None]],
                 hang_list: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One cause per hang (``worker.hung`` events share the hang's stamp), naming the culprit
    its stack dumps point to (:mod:`.hangs`), not merely the rank that was noticed first.

    Its ``error_time`` is when the noticed rank last made progress, so the hang precedes the
    errors its restart causes."""
    analysed = {h["stamp"]: h for h in hang_list}
    out = []
    for stamp, (rec, key) in sorted(hung.items()):
        h = analysed.get(stamp)
        culprit = (h or {}).get("culprits") or [{}]
        silent = rec.get("silent_s")
        since = rec["time"] - silent if isinstance(silent, (int, float)) else None
        message = (f"hang: {h['message']}" if h else
                   f"hang: rank {rec.get('rank')} made no progress for {silent} s")
        dumps = ", ".join((h or {}).get("dump_dirs") or [])
        out.append(_failure(
            {**rec, "message": message + (f" (stacks: {dumps})" if dumps else ""),
             "exitcode": None, "error_time": since,
             "node": culprit[0].get("node", rec.get("node")),
             "rank": culprit[0].get("rank", rec.get("rank")),
             "pid": rec.get("pid") if not h or not h.get("culprits") else None,
             # the culprit's folder: `logs failures` shows its stderr.log from there
             "error_file": (f"{culprit[0]['worker_dir']}/error.json"
                            if isinstance(culprit[0].get("worker_dir"), str) else None)},
            key, kind="hang", stamp=stamp, hang_dumps=(h or {}).get("dump_dirs") or []))
    return out


def _standby_starts(rounds: dict[tuple[int, int, int], Round]) -> None:
    """A later round starts when the previous round's members begin to re-join, not when a node
    that stood by (a hot spare, a late joiner) began waiting, which may be long before."""
    ordered = sorted(rounds.values(), key=lambda r: (r.attempt, r.step, r.round))
    for prev, r in zip(ordered, ordered[1:], strict=False):
        if (prev.attempt, prev.step) != (r.attempt, r.step):
            continue
        rejoined = [t for node, t in r.join_starts.items() if node in prev.participants]
        if rejoined:
            r.start = min(rejoined)


def _failure_order(f: dict[str, Any]) -> tuple[float, float]:
    """``error_time`` (when the rank raised; whole seconds) first, the agent's ``time`` next."""
    et = f.get("error_time")
    return (float(et) if isinstance(et, (int, float)) else f["time"], f["time"])


def cause_key(c: dict[str, Any]) -> tuple[float, int, float]:
    """The earliest moment a cause (a failure or a node loss) may have begun, for ordering.

    A failure: when its rank raised (``error_time``), else when its agent saw it. A lost node: its
    last seen heartbeat less :data:`HEARTBEAT_SLACK_S`, but never before its own last event. On a
    tie the failure comes first: a failure its own node recorded happened before that node fell
    silent, so the node's loss cannot have caused it.
    """
    if c["kind"] == "node_left":
        return (c["time"] - ERROR_TIME_RESOLUTION_S, 0, c["time"])
    if c["kind"] != "node_lost":
        return (_failure_order(c)[0], 0, c["time"])
    t = c["last_event"]
    hb = c.get("heartbeat_lost_at")
    if isinstance(hb, (int, float)):
        t = max(t, hb - HEARTBEAT_SLACK_S)
    return (t, 1, c["time"])


def _node_losses(runs: dict[RunKey, NodeRun],
                 rounds: dict[tuple[int, int, int], Round],
                 rdzv_ids: dict[str, RunKey],
                 deaths: list[NodeDeath]) -> list[dict[str, Any]]:
    """Nodes lost mid-run: an agent that fell silent without a clean end while the job went on.

    Silence alone proves nothing (agents log nothing while training goes well, and a job may still
    run), so a loss needs evidence from the others, after the node's last event: a node declared
    it dead (its heartbeat stopped), a later round of its rendezvous formed without it, or another
    node of the same attempt and step ended cleanly.
    """
    heartbeats = _heartbeat_deaths(rdzv_ids, deaths)
    peers: dict[tuple[int, int], list[NodeRun]] = {}
    for run in runs.values():
        peers.setdefault((run.attempt, run.step), []).append(run)
    losses = []
    for key, run in runs.items():
        if run.ended:
            left = _round_without(run, rounds) if run.last_kind in _DEPARTED else None
            if left is not None:  # stopped from outside while the run went on: it shrank
                losses.append(_departure(run, left))
            continue
        death = heartbeats.get(key)
        if death is not None and death.time <= run.last:
            death = None  # it went on after being declared dead (a false alarm)
        left = _round_without(run, rounds)
        outlived = max((p for p in peers[(run.attempt, run.step)] if p.ended and p.last > run.last),
                       key=lambda p: p.last, default=None)
        if death is not None or left is not None or outlived is not None:
            losses.append(_loss(run, death, left, outlived))
    return losses


def _heartbeat_deaths(rdzv_ids: dict[str, RunKey],
                      deaths: list[NodeDeath]) -> dict[RunKey, NodeDeath]:
    """Per node run, the first declaration that its heartbeat stopped (rendezvous ids are unique
    per agent, so an id names one node, attempt, step and launch)."""
    first: dict[RunKey, NodeDeath] = {}
    for d in deaths:
        key = rdzv_ids.get(d.dead_id)
        if key is not None and (key not in first or d.time < first[key].time):
            first[key] = d
    return first


def _round_without(run: NodeRun, rounds: dict[tuple[int, int, int], Round]) -> Round | None:
    """The first round of the node's rendezvous that formed without it after its last event."""
    later = [r for r in rounds.values()
             if r.attempt == run.attempt and r.step == run.step and r.end is not None
             and r.end > run.last and run.node not in r.participants
             and (run.round is None or r.round > run.round)]
    return min(later, key=lambda r: r.round, default=None)


def _clock(t: float) -> str:
    """Time of day (UTC, ms) for messages: the date is in the summary's header already."""
    return _dt.datetime.fromtimestamp(t, _dt.timezone.utc).strftime("%H:%M:%S.%f")[:-3]


def _loss(run: NodeRun, death: NodeDeath | None, left: Round | None,
          outlived: NodeRun | None) -> dict[str, Any]:
    """The loss as a cause record, shaped like a failure where the fields mean the same."""
    lost_at = None
    parts = []
    evidence = []
    if death is not None:
        evidence.append("heartbeat")
        if death.silent_s is not None:
            lost_at = death.time - death.silent_s
            parts.append(f"no heartbeat since {_clock(lost_at)} (declared dead by {death.by} "
                         f"at {_clock(death.time)})")
        else:
            parts.append(f"declared dead by {death.by} at {_clock(death.time)}")
    parts.append(f"its agent and workers stopped without a shutdown event (last event "
                 f"{run.last_kind} at {_clock(run.last)})")
    if left is not None:
        evidence.append("left_rendezvous")
        parts.append(f"round {left.round} formed without it at {_clock(left.end or 0.0)}")
    if outlived is not None:
        evidence.append("outlived")
        if death is None and left is None:
            parts.append(f"{outlived.node} ran on until {_clock(outlived.last)}")
    return {"kind": "node_lost", "time": max(run.last, lost_at or run.last), "node": run.node,
            "attempt": run.attempt, "step": run.step, "round": run.round,
            "last_event": run.last, "last_kind": run.last_kind, "heartbeat_lost_at": lost_at,
            "declared_dead_by": death.by if death else None,
            "declared_dead_at": death.time if death else None, "evidence": evidence,
            "message": f"node {run.node} lost: " + "; ".join(parts), "root": False}


def _departure(run: NodeRun, left: Round) -> dict[str, Any]:
    """A node whose agent was stopped (its grow job ended, a cancel) while the run went on
    without it: the cause of the connection errors of the workers that stay."""
    return {"kind": "node_left", "time": run.last, "node": run.node, "attempt": run.attempt,
            "step": run.step, "round": run.round, "last_event": run.last,
            "last_kind": run.last_kind, "heartbeat_lost_at": None, "declared_dead_by": None,
            "declared_dead_at": None, "evidence": ["departed"],
            "message": f"node {run.node} left the run: its agent was stopped ({run.last_kind} "
                       f"at {_clock(run.last)}); round {left.round} formed without it at "
                       f"{_clock(left.end or 0.0)}", "root": False}


def _cascade(c: dict[str, Any]) -> tuple[Any, Any, Any]:
    """The cascade a failure or loss belongs to: its attempt, step and round."""
    return (c["attempt"], c["step"], c["round"])


def _mark_roots(failures: list[dict[str, Any]], losses: list[dict[str, Any]]) -> None:
    """Mark the root of each cascade (one per attempt, step and round) and its secondaries.

    The root is the earliest (:func:`cause_key`) *cause*: a node loss, or a failure whose message
    is not a consequence of another (gloo peer closed, SIGTERM). Only if there is none, the
    earliest failure. Every other failure of the cascade gets ``secondary_to`` naming the root:
    the survivors' connection errors after a node loss are its symptoms, not causes.
    """
    groups: dict[tuple[Any, Any, Any], list[dict[str, Any]]] = {}
    for c in [*losses, *failures]:
        groups.setdefault(_cascade(c), []).append(c)
    for group in groups.values():
        causes = [c for c in group
                  if c["kind"] in NODE_CAUSES or not is_cascade(c["message"], c["exitcode"])]
        root = min(causes or group, key=cause_key)
        root["root"] = True
        ref = {"kind": root["kind"], "node": root["node"], "rank": root.get("rank")}
        for c in group:
            if c is not root and c["kind"] not in NODE_CAUSES:
                c["secondary_to"] = ref


def _mark_stops(rounds: dict[tuple[int, int, int], Round], roots: list[dict[str, Any]],
                failures: list[dict[str, Any]]) -> None:
    """Move each round's ``first_failure`` back to when useful work really stopped.

    A failure root: when its rank raised (``error_time``), before its agent saw it. A node loss:
    its last seen heartbeat, or a survivor's rank raising, whichever came first (both precede the
    agents' failure lines).
    """
    for c in roots:
        if c["round"] is None:
            continue
        r = rounds.get((c["attempt"], c["step"], c["round"]))
        if r is None or r.end is None:
            continue
        if c["kind"] not in NODE_CAUSES:
            if isinstance(c["error_time"], (int, float)) and r.end <= c["error_time"] < c["time"]:
                r.first_failure = float(c["error_time"])
            continue
        signs = [f["error_time"] for f in failures if _cascade(f) == _cascade(c)
                 and isinstance(f["error_time"], (int, float))]
        if c["heartbeat_lost_at"] is not None:
            signs.append(c["heartbeat_lost_at"])
        stop = min((t for t in signs if t >= r.end), default=None)
        if stop is not None and (r.first_failure is None or stop < r.first_failure):
            r.first_failure = float(stop)


ROOT_CAUSE_FIELDS = ("kind", "time", "node", "attempt", "step", "round", "rank", "exitcode",
                     "message")


def root_cause(c: dict[str, Any]) -> dict[str, Any]:
    """A root in the one shape shared by failures and node losses (JSON ``root_causes``)."""
    return {k: c.get(k) for k in ROOT_CAUSE_FIELDS}
