"""``logs summary``: the outcome and where the wall time went.

The time split is derived from events only, and only as far as they allow: rendezvous rounds are
[first join, last completion]; a round's training runs from its rendezvous end until its first
failure (then it counts as *lost to failures*: the work since the last checkpoint is unknown, so
this is an upper bound), until the next round's rendezvous (a membership change) or until the
agents ended. The gap between a failure and the next rendezvous is *restarting*. Time between
Slurm attempts counts as *queued* again (the requeued job waited for an allocation). Whatever no
event explains (e.g. an attempt whose agents never formed a round) is *other*, so the split
always adds up to the wall time.

Every disruption is listed with what it cost (``disruptions``): each worker-group restart (from
the failure, or the membership change, until the next round had formed; plus the training since
the round began, which a failure may have lost; a standing-by node that took a lost one's place
in it is a *spare swap*), each relaunch of a node's agent step and each
new rendezvous generation by the batch supervisor (from the step's end until the node trained
again), and each requeue (from the preemption signal until the next attempt trained).
"""

from __future__ import annotations

import time
from itertools import pairwise
from typing import Any

from hpc_elastic.ended import agents_gone, no_final_event_note, queue_ended
from hpc_elastic.excluded import read_excluded
from hpc_elastic.jobdir import JobDir
from hpc_elastic.members import ARRAY, read_members, spans_jobs

from .fmt import dur, footer, iso
from .loader import Job
from .model import AGENT_ERROR, NODE_CAUSES, JobModel, Round, build


def status_of(m: JobModel, excluded: frozenset[str] = frozenset()) -> str:
    """succeeded | failed | running | cancelled | unknown, from the LAST attempt's end events.

    A node ``excluded`` from the run (lost: partitioned, frozen, its filesystem client dead)
    whose agent failed once it was cut off does not fail a job that the other nodes finished:
    the run went on without it, as designed. Its failure is still listed."""
    if not m.attempts:
        return "unknown"
    last = max(m.attempts)
    ends = m.terminal.get(last, {})
    values = set(ends.values())
    kept = {value for node, value in ends.items() if node not in excluded}
    if "failed" in kept or ("failed" in values and "ok" not in kept):
        return "failed"
    if "ok" in values:
        return "succeeded"
    if "preempted" in values:
        return "running" if m.requeues else "cancelled"  # requeued: waiting for the next attempt
    if "shutdown" in values:
        return "cancelled"
    return "running"


def _segments(m: JobModel) -> list[tuple[str, float, float]]:
    """Job-level phases (name, start, end) in time order; see the module docstring."""
    segs: list[tuple[str, float, float]] = []
    if m.submitted_at is not None and m.first_start is not None and m.first_start > m.submitted_at:
        segs.append(("queued", m.submitted_at, m.first_start))
    prev_attempt_end: float | None = None
    for attempt in sorted(m.attempts):
        span = m.attempt_spans[attempt]
        if prev_attempt_end is not None and span[0] > prev_attempt_end:
            segs.append(("queued", prev_attempt_end, span[0]))
        rounds = sorted((r for r in m.rounds.values() if r.attempt == attempt),
                        key=lambda r: (r.step, r.round))
        rounds = [r for r in rounds if r.start is not None and r.end is not None]
        cursor = span[0]
        if rounds and rounds[0].start is not None and rounds[0].start > cursor:
            segs.append(("startup", cursor, rounds[0].start))
        for i, r in enumerate(rounds):
            assert r.start is not None and r.end is not None
            start = max(r.start, cursor)
            if r.end > start:
                segs.append(("rendezvous", start, r.end))
            nxt: Round | None = rounds[i + 1] if i + 1 < len(rounds) else None
            stop = nxt.start if nxt is not None and nxt.start is not None else span[1]
            stop = max(stop, r.end)
            if r.first_failure is not None and r.end <= r.first_failure <= stop:
                segs.append(("lost to failures", r.end, r.first_failure))
                if stop > r.first_failure:
                    segs.append(("restarting", r.first_failure, stop))
            elif stop > r.end:
                segs.append(("training", r.end, stop))
            cursor = max(cursor, stop)
        prev_attempt_end = span[1]
    return segs


FAILURE_FIELDS = ("time", "error_time", "node", "attempt", "step", "round", "rank", "exitcode",
                  "message", "root", "secondary_to")
PHASES = ("queued", "startup", "rendezvous", "training", "restarting", "lost to failures",
          "other")


def _lost_for_good(m: JobModel) -> set[str]:
    """Nodes whose last events are those of a loss: the others went on without them, so they
    are gone even while the job still runs."""
    return {loss["node"] for loss in m.losses
            if loss["last_event"] == m.health[loss["node"]].last}


def summarize(job: Job, now: float | None = None, queue_state: str | None = None
              ) -> dict[str, Any]:
    """The summary as a JSON-ready dict (the text output is rendered from it).

    A job whose agents have not ended (status ``running``) is still using its time: its clock
    and its last phase run to ``now`` (default: the current time), not to its last event, which
    may be minutes old while training goes well (``clock_to_now`` says so).

    Files that say "running" are checked against the agents' processes (local mode) or the
    queue (Slurm; ``queue_state`` when the caller asked already): a job that ended without a
    final event in the job directory is ``ended``, and a note says where its final events are.
    """
    m = build(job)
    excluded = read_excluded(JobDir(job.path))
    status = status_of(m, frozenset(x.node for x in excluded))
    if status in ("running", "unknown"):  # unknown: no events at all in the job directory
        if queue_state is None:
            why = agents_gone(job.dir)
        else:
            why = (None if not queue_ended(queue_state) else "its agents are gone"
                   if queue_state == "ENDED" else f"the queue says {queue_state}")
        if why is not None:
            status = "ended"
            ended = m.terminal.get(max(m.attempts), {}) if m.attempts else {}
            job.note(no_final_event_note(JobDir(job.path),
                                         [n for n in m.nodes if n not in ended], why))
    end = m.last_event
    running = status == "running" and end is not None and bool(m.attempts)
    if running:
        end = max(end, time.time() if now is None else now)
        m.attempt_spans[max(m.attempts)][1] = end
    segs = _segments(m)
    split = {p: 0.0 for p in PHASES}
    for name, a, b in segs:
        split[name] += b - a
    begin = m.submitted_at if m.submitted_at is not None else m.first_start
    wall = (end - begin) if begin is not None and end is not None else None
    if wall is not None and wall - sum(split.values()) > 0.0005:
        split["other"] = wall - sum(split.values())
    batch = job.supervisor_events()
    disruptions = _disruptions(m, batch)
    restarts = [r for r in m.rounds.values() if r.restart]
    failure_restarts = sum(1 for r in restarts if "failure" in r.restart_reasons)
    health = [h.as_dict() for h in m.health.values()]
    if status == "running":
        lost = _lost_for_good(m)
        for h in health:
            if h["ended"] == "vanished" and h["node"] not in lost:
                h["ended"] = "running?"  # cannot tell a live node from a dead one from files
    return {
        "job_id": m.job_id,
        "job_dir": str(job.path),
        "status": status,
        "submitted_at": m.submitted_at,
        "first_event": min((h.first for h in m.health.values() if h.first), default=None),
        "last_event": m.last_event,
        "clock_to_now": running,  # a running job: wall time and last phase run to now
        "wall_s": None if wall is None else round(wall, 3),
        "time_split_s": {k: round(v, 3) for k, v in split.items()},
        "nodes": m.nodes,
        "attempts": len(m.attempts),
        "attempt_ids": sorted(m.attempts),
        "restarts": len(restarts),
        "restarts_after_failure": failure_restarts,
        "rendezvous_rounds": [
            r.as_dict()
            for r in sorted(m.rounds.values(), key=lambda r: (r.attempt, r.step, r.round))],
        "failures_count": len(m.failures),
        "failures": [{k: f[k] for k in FAILURE_FIELDS} for f in m.failures],
        "node_losses": m.losses,
        "root_causes": m.root_causes,
        "root_cause": m.root_causes[0] if m.root_causes else None,
        "restarts_stopped": m.restarts_stopped,
        "stragglers": m.stragglers,
        "hangs": [{k: h[k] for k in ("stamp", "message", "culprits", "evidence", "dump_dirs")}
                  for h in m.hangs],
        "preemptions": m.preemptions,
        # Asked for by an agent (preemption) or by the batch supervisor (too few nodes left).
        "requeues": m.requeues + sum(1 for e in batch if e.get("kind") == "batch.requeue"),
        "step_relaunches": sum(1 for e in batch if e.get("kind") == "step.relaunched"),
        "generations": 1 + sum(1 for e in batch if e.get("kind") == "generation.started"),
        "spare_swaps": sum(len(d.get("swapped_in") or []) for d in disruptions),
        "disruptions": disruptions,
        "excluded_nodes": [r.to_json() for r in excluded],
        "node_health": health,
        "jobs": member_jobs(job, m),
        "events_read": m.events,
        "notes": job.notes,
    }


def _disruptions(m: JobModel, batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every disruption with its cost (see the module docstring), in time order."""
    out: list[dict[str, Any]] = []
    ordered = sorted((r for r in m.rounds.values() if r.start is not None and r.end is not None),
                     key=lambda r: (r.attempt, r.step, r.round))
    for prev, nxt in pairwise(ordered):
        if (prev.attempt, prev.step) != (nxt.attempt, nxt.step):
            continue
        assert prev.end is not None and nxt.end is not None and nxt.start is not None
        failed = prev.first_failure is not None and prev.first_failure >= prev.end
        began = prev.first_failure if failed and prev.first_failure is not None else nxt.start
        # A node that stood by (a hot spare) taking a lost member's place in this round.
        gone = prev.participants - nxt.participants
        came = sorted(nxt.participants - prev.participants)[:len(gone)]
        out.append({"kind": "restart", "reason": "failure" if failed else "membership change",
                    "time": began, "attempt": nxt.attempt, "step": nxt.step,
                    "round": nxt.round, "cost_s": round(nxt.end - began, 3),
                    "lost_training_s": round(began - prev.end, 3) if failed else 0.0,
                    "left": sorted(gone), "swapped_in": came})
    for e in batch:
        kind = e.get("kind")
        if kind not in ("step.relaunched", "generation.started"):
            continue
        nodes = [e.get("node")] if kind == "step.relaunched" else list(e.get("nodes") or [])
        back = _trained_again(m, e.get("attempt"), nodes, e["time"])
        out.append({"kind": "relaunch" if kind == "step.relaunched" else "generation",
                    "time": e["time"], "nodes": nodes, "attempt": e.get("attempt"),
                    "step": e.get("generation"),
                    "cost_s": None if back is None else round(back - e["time"], 3)})
    attempts = sorted(m.attempts)
    for a, b in pairwise(attempts):
        signals = [p["time"] for p in m.preemptions if p["attempt"] == a]
        began = min(signals) if signals else m.attempt_spans[a][1]
        firsts = [r.end for r in ordered if r.attempt == b and r.end is not None]
        out.append({"kind": "requeue", "time": began, "attempt": b,
                    "cost_s": round(min(firsts) - began, 3) if firsts else None})
    return sorted(out, key=lambda d: d["time"])


def _trained_again(m: JobModel, attempt: Any, nodes: list[Any], since: float) -> float | None:
    """The end of the first round after ``since`` that all of ``nodes`` took part in."""
    ends = [r.end for r in m.rounds.values() if r.attempt == attempt and r.end is not None
            and r.end > since and set(nodes) <= r.participants]
    return min(ends, default=None)


def member_jobs(job: Job, m: JobModel) -> list[dict[str, Any]]:
    """The Slurm jobs of the run (the first, ``grow`` jobs, an array) with the nodes each
    brought and when they took part: from ``members/`` and each node's ``agent.start``."""
    out = []
    for member in read_members(JobDir(job.path)):
        mine = [h for h in m.health.values() if h.job_id == member.job_id
                or (member.kind == ARRAY and h.run_id == member.job_id)]
        firsts = [h.first for h in mine if h.first is not None]
        lasts = [h.last for h in mine if h.last is not None]
        out.append({"job_id": member.job_id, "kind": member.kind, "requested_nodes": member.nodes,
                    "array_tasks": member.tasks, "submitted_at": member.submitted_at,
                    "nodes": sorted(h.node for h in mine),
                    "first_event": min(firsts, default=None),
                    "last_event": max(lasts, default=None)})
    return out


def _root_line(c: dict[str, Any], failures: list[dict[str, Any]]) -> str:
    """One root cause; a node loss says how many failures it explains, as they are not roots."""
    if c["kind"] == AGENT_ERROR:
        return f"{iso(c['time'])} {c['node']} agent: {c['message']}"
    if c["kind"] == "hang":
        return f"{iso(c['time'])} {c['message']}"
    if c["kind"] not in NODE_CAUSES:
        return (f"{iso(c['time'])} {c['node']} rank {c['rank']} exit {c['exitcode']}: "
                f"{c['message'] or '(no message)'}")
    n = sum(1 for f in failures if (f.get("secondary_to") or {}).get("kind") == c["kind"]
            and f["secondary_to"]["node"] == c["node"]
            and (f["attempt"], f["step"], f["round"]) == (c["attempt"], c["step"], c["round"]))
    return f"{iso(c['time'])} {c['message']}" + (f" [{n} failure(s) follow from it]" if n else "")


def render(s: dict[str, Any]) -> str:
    """The human-readable summary."""
    out = [f"job {s['job_id'] or '?'}  {s['status'].upper()}  ({s['job_dir']})"]
    until = (f"now (still running; last event {iso(s['last_event'])})" if s.get("clock_to_now")
             else iso(s["last_event"]))
    out.append(f"wall time {dur(s['wall_s'])}  from {iso(s['submitted_at'] or s['first_event'])}"
               f" to {until}")
    wall = s["wall_s"] or 0.0
    for name, v in s["time_split_s"].items():
        if v or name in ("rendezvous", "training"):
            pct = f"{100 * v / wall:5.1f}%" if wall else "    -"
            out.append(f"  {name:<17} {dur(v):>9} {pct}")
    out.append(f"nodes {len(s['nodes'])}: {', '.join(s['nodes']) or '-'}")
    out.append(f"attempts {s['attempts']}  worker-group restarts {s['restarts']} "
               f"({s['restarts_after_failure']} after a failure)  failures {s['failures_count']}"
               f"  preemptions {len(s['preemptions'])}  requeues {s['requeues']}")
    if s["step_relaunches"] or s["generations"] > 1 or s["spare_swaps"]:
        out.append(f"agent steps relaunched {s['step_relaunches']}  rendezvous generations "
                   f"{s['generations']}  spare swaps {s['spare_swaps']}")
    if s["disruptions"]:
        out.append("disruptions (what each cost until training ran again):")
        for d in s["disruptions"]:
            what = d["kind"] + (f" ({d['reason']})" if d.get("reason") else "")
            if d.get("swapped_in"):
                what += f" {','.join(d['swapped_in'])} for {','.join(d['left'])}"
            if d.get("nodes"):
                what += f" {','.join(str(n) for n in d['nodes'])}"
            lost = (f", training lost <= {dur(d['lost_training_s'])}"
                    if d.get("lost_training_s") else "")
            out.append(f"  {iso(d['time'])} {what:<32} {dur(d['cost_s']):>9}{lost}")
    if s["excluded_nodes"]:
        out.append("excluded nodes (not used again by this run):")
        out.extend(f"  {x['node']:<16} since {iso(x['time'])} (job {x['job_id']} attempt "
                   f"{x['attempt']}): {x['reason']}" for x in s["excluded_nodes"])
    jobs = s.get("jobs") or []
    several_jobs = spans_jobs([j["kind"] for j in jobs])
    if several_jobs:
        out.append("jobs of the run:")
        for j in jobs:
            what = (f"array of {j['array_tasks']}" if j["kind"] == ARRAY
                    else f"{j['kind']} {j['requested_nodes']} node(s)")
            took = (f"took part {iso(j['first_event'])} .. {iso(j['last_event'])}"
                    if j["first_event"] is not None else "never took part")
            out.append(f"  {j['job_id']:<10} {what:<20} nodes {','.join(j['nodes']) or '-':<12}"
                       f" {took}")
    out.append("rendezvous rounds:")
    for r in s["rendezvous_rounds"]:
        step = f" step {r['step']}" if r.get("step") else ""
        out.append(f"  attempt {r['attempt']}{step} round {r['round']}: {dur(r['duration_s']):>8}  "
                   f"at {iso(r['start'])}  nodes {','.join(r['participants'])}")
    if s["root_causes"]:
        out.append("root causes:")
        out.extend(f"  {_root_line(c, s['failures'])}" for c in s["root_causes"])
    for stop in s.get("restarts_stopped") or []:
        out.append(f"restarts stopped on {stop['node']} at {iso(stop['time'])}: "
                   f"{stop['reason']}")
    for st in s.get("stragglers") or []:
        out.append(f"straggler: node {st['node']} (ranks {st['ranks']}) {st['ratio']}x the "
                   f"median busy time per step at {iso(st['time'])}"
                   + (f"; {st['action']}" if st.get("policy") == "exclude" else ""))
    if s.get("hangs"):
        out.append("hangs (stacks: hpc-elastic logs hangs JOB):")
        out.extend(f"  {h['stamp']}: {h['message']}; dumps in {', '.join(h['dump_dirs'])}"
                   for h in s["hangs"])
    out.append("node health:")
    for h in s["node_health"]:
        job = f"  (job {h['job_id']})" if several_jobs else ""
        out.append(f"  {h['node']:<16} {h['ended']:<9} last {h['last_kind'] or '-'} at "
                   f"{iso(h['last_event'])}{job}")
    foot = footer(s["notes"])
    if foot:
        out.append(foot)
    return "\n".join(out)
