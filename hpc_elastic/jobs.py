"""``status``, ``cancel`` and ``list``: a job as the queue sees it and as its agents wrote it.

Queue state is asked in order of freshness: squeue (live), then sacct (after the end; may lag or
be switched off), then the job directory alone ("left the queue"). What the agents wrote (nodes
up, rendezvous round, restarts, last failure) comes from the analysis of the job directory, so
``status`` works the same for a running job, a finished one, and one whose accounting is gone.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hpc_elastic import local, procs, slurm
from hpc_elastic.analysis import Job
from hpc_elastic.analysis.loader import fallback_nodes, last_record, node_names
from hpc_elastic.analysis.summary import summarize
from hpc_elastic.ended import agents_gone, slurm_job_state
from hpc_elastic.jobdir import JobDir, jobdirs_under
from hpc_elastic.members import read_members, spans_jobs
from hpc_elastic.submit import Submission, read_submission


@dataclass
class JobStatus:
    jobdir: JobDir
    submission: Submission | None
    queue_state: str  # Slurm's state, or RUNNING/ENDED for local jobs, or a plain explanation
    summary: dict[str, Any]
    #: Every Slurm job of the run (the first one, grow jobs, an array) with its queue state.
    members: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        s = self.summary
        failures = s.get("failures") or []
        # Root causes include lost nodes, which are not failures of a worker.
        roots = s.get("root_causes") or [f for f in failures if f.get("root")]
        return {
            "job_id": self.submission.job_id if self.submission else None,
            "mode": self.submission.mode if self.submission else None,
            "jobdir": str(self.jobdir.path),
            "queue_state": self.queue_state,
            "status": s.get("status"),
            "nodes": s.get("nodes", []),
            "rounds": len(s.get("rendezvous_rounds", [])),
            "restarts": s.get("restarts", 0),
            "attempts": s.get("attempts", 0),
            "last_failure": (roots or failures)[-1] if failures else None,
            "jobs": self.members,
            "excluded_nodes": s.get("excluded_nodes", []),
        }

    def render(self) -> str:
        d = self.as_dict()
        last = d["last_failure"]
        lines = [
            f"job {d['job_id']} ({d['mode']})  queue: {d['queue_state']}  "
            f"agents say: {d['status']}",
            f"  directory   {d['jobdir']}",
            f"  nodes       {len(d['nodes'])}: {', '.join(d['nodes']) or '-'}",
            f"  rounds      {d['rounds']}   restarts {d['restarts']}   attempts {d['attempts']}",
            "  last failure " + (_failure_line(last) if last else "-"),
        ]
        if d["excluded_nodes"]:
            lines.append("  excluded    " + ", ".join(
                f"{x['node']} ({x['reason']})" for x in d["excluded_nodes"]))
        if spans_jobs([m["kind"] for m in self.members]):
            lines.append("  jobs of the run:")
            lines += [f"    {m['job_id']:<10} {m['kind']:<6} nodes {m['nodes']:<5} {m['state']}"
                      for m in self.members]
        return "\n".join(lines)


def _failure_line(cause: dict[str, Any]) -> str:
    if cause.get("kind") in ("node_lost", "node_left"):
        return str(cause.get("message"))
    if cause.get("kind") == "agent_error":
        return f"{cause.get('node')} agent: {cause.get('message')}"
    return (f"{cause.get('node')} rank {cause.get('rank')} exit {cause.get('exitcode')}: "
            f"{cause.get('message')}")


def local_agent_pids(jobdir: JobDir) -> list[int]:
    """PIDs of a local job's agents that are still alive *and still those agents*."""
    return [rec.pid for rec in procs.live_agents(jobdir)]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def queue_state(submission: Submission | None, jobdir: JobDir) -> str:
    if submission is None:
        return "unknown (no submission.json: started by hand?)"
    if submission.mode == "local":
        if local.read_result(jobdir) is not None:
            return "ENDED"
        launcher = local.launcher_pid(jobdir)
        running = (launcher is not None and alive(launcher)) or local_agent_pids(jobdir)
        return "RUNNING" if running else "ENDED"
    return slurm_job_state(submission.job_id)


def job_status(jobdir: JobDir) -> JobStatus:
    submission = read_submission(jobdir)
    state = queue_state(submission, jobdir)
    lead = submission.job_id if submission else None
    members = [{"job_id": m.job_id, "kind": m.kind, "nodes": m.nodes, "tasks": m.tasks,
                "state": state if m.job_id == lead else slurm_job_state(m.job_id)}
               for m in read_members(jobdir)]
    # The queue says whether a job whose files say "running" has ended without a final event.
    summary = summarize(Job(jobdir), queue_state=state)
    return JobStatus(jobdir, submission, state, summary, members)


def cancel_job(jobdir: JobDir, wait_s: float = 60.0) -> str:
    """Stop a job: ``scancel`` for Slurm (agents get SIGTERM and stop their workers), SIGTERM
    to the agents of a local job. Returns a sentence saying what was done."""
    submission = read_submission(jobdir)
    if submission is None:
        raise ValueError(f"{jobdir.path}: no submission.json, so there is nothing to cancel")
    if submission.mode == "slurm":
        # The run is one thing: its grow jobs and array tasks go with it.
        job_ids = list(dict.fromkeys([submission.job_id,
                                      *(m.job_id for m in read_members(jobdir))]))
        slurm.cancel(*job_ids)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            live = [j for j in job_ids if slurm.queue_state(j) is not None]
            if not live:
                return f"job {', '.join(job_ids)} cancelled"
            time.sleep(0.5)
        return f"job {', '.join(job_ids)}: scancel sent; {', '.join(live)} still in the queue " \
               f"after {wait_s:g} s"
    # The launcher records the job as cancelled and stops its agents; without a live launcher
    # (it was killed), the agents are stopped directly. Only processes that still are the ones
    # the launcher recorded are signalled: a reused PID belongs to somebody else
    # (hpc_elastic/procs.py).
    launcher = local.launcher_record(jobdir)
    if local.read_result(jobdir) is not None or launcher is None or not procs.is_same(launcher):
        launcher = None
    agents = procs.live_agents(jobdir)
    if launcher is None and not agents:
        return f"job {submission.job_id}: not running (nothing to cancel)"
    if launcher is not None and not procs.signal_if_same(launcher, signal.SIGTERM):
        launcher = None
    if launcher is None:
        agents = [rec for rec in agents if procs.signal_if_same(rec, signal.SIGTERM)]
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline and (procs.live_agents(jobdir) or (
            launcher is not None and procs.is_same(launcher)
            and local.read_result(jobdir) is None)):
        time.sleep(0.2)
    # The agents had their chance to stop their workers cleanly.
    left = [rec for rec in procs.live_agents(jobdir)
            if procs.signal_if_same(rec, signal.SIGKILL)]
    return (f"job {submission.job_id} cancelled: stopped {len(agents)} local agent(s)"
            + (f", {len(left)} had to be killed" if left else ""))


def list_jobs(jobdirs: Path | Iterable[JobDir]) -> list[dict[str, Any]]:
    """The jobs under a root (or these job directories), newest first, with what can be known
    from their files; Slurm's queue is asked only about a job whose files say it runs (or never
    started), as ``status`` does, so a job that ended without a final event there says so."""
    rows = []
    for jobdir in jobdirs_under(jobdirs) if isinstance(jobdirs, Path) else jobdirs:
        submission = read_submission(jobdir)
        outcome = quick_outcome(jobdir)
        if outcome in ("running or unfinished", "not started"):
            why = agents_gone(jobdir)
            if why is not None:
                said = f" ({why})" if why.startswith("the queue") else ""
                # "not started": nothing in the job directory -- which may have been unable to
                # take anything, so the job may well have run.
                outcome = ("ended, no final event" if outcome != "not started"
                           else "ended, no events") + said
        rows.append({
            "job_id": submission.job_id if submission else None,
            "mode": submission.mode if submission else None,
            "name": submission.name if submission else jobdir.path.name,
            "submitted_at": submission.submitted_at if submission else None,
            "outcome": outcome,
            "jobdir": str(jobdir.path),
        })
    return rows


def _time_of(rec: dict[str, Any]) -> float:
    t = rec.get("time")
    return float(t) if isinstance(t, (int, float)) else 0.0


def quick_outcome(jobdir: JobDir) -> str:
    """succeeded / failed / running-or-unfinished / not started, from each node's last event only
    (a 16 KiB read from the end of each file, so ``list`` stays fast on huge logs; a final event
    with its traceback is a few KiB). A final event the job directory could not take is read
    from the agent's fallback directory when that is on this machine (local mode)."""
    fallback = fallback_nodes(jobdir)
    last_kinds = []
    for node in node_names(jobdir):
        found = [last_record(jobdir.events(node))]
        if node in fallback:
            found.append(last_record(fallback[node]))
        recs = [rec for rec in found if rec is not None]
        if recs:
            last_kinds.append(max(recs, key=_time_of)["kind"])
    if not last_kinds:
        return "not started"
    if "agent.failed" in last_kinds:
        return "failed"
    # A grow job that was cancelled mid-run leaves a "shutdown" node in a run that succeeded.
    if "agent.succeeded" in last_kinds and set(last_kinds) <= {"agent.succeeded", "shutdown"}:
        return "succeeded"
    if "shutdown" in last_kinds:
        return "cancelled"
    return "running or unfinished"
