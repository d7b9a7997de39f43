"""``status``, ``cancel`` and ``list``: a job as the queue sees it and as its agents wrote it.

Queue state is asked in order of freshness: squeue (live), then sacct (after the end; may lag or
be switched off), then the job directory alone ("left the queue"). What the agents wrote (nodes
up, rendezvous round, restarts, last failure) comes from the analysis of the job directory, so
``status`` works the same for a running job, a finished one, and one whose accounting is gone.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hpc_elastic import local, procs, slurm
from hpc_elastic.analysis import Job
from hpc_elastic.analysis.summary import NO_FINAL_EVENT, agents_gone, summarize
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


def slurm_job_state(job_id: str) -> str:
    """squeue (live), then sacct (after the end), then a plain explanation."""
    if not slurm.slurm_available():
        return "unknown (Slurm's commands are not on PATH here)"
    return (slurm.job_state(job_id)
            or "left the queue (sacct has no record: accounting off or lagging)")


def job_status(jobdir: JobDir) -> JobStatus:
    submission = read_submission(jobdir)
    state = queue_state(submission, jobdir)
    lead = submission.job_id if submission else None
    members = [{"job_id": m.job_id, "kind": m.kind, "nodes": m.nodes, "tasks": m.tasks,
                "state": state if m.job_id == lead else slurm_job_state(m.job_id)}
               for m in read_members(jobdir)]
    summary = summarize(Job(jobdir))
    if summary.get("status") == "running" and queue_ended(state):
        # The queue says the job is over, but its agents left no final event (killed, or the
        # job directory could not take it): whatever the files say, it no longer runs.
        summary["status"] = "ended"
        summary.setdefault("notes", []).append(NO_FINAL_EVENT)
    return JobStatus(jobdir, submission, state, summary, members)


#: Slurm states of a job that may still run (or run again); anything else has ended.
_LIVE_STATES = frozenset({"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED",
                          "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING", "SUSPENDED", "STOPPED",
                          "SIGNALING", "STAGE_OUT", "RESV_DEL_HOLD", "SPECIAL_EXIT"})


def queue_ended(state: str) -> bool:
    """Whether a queue state (``queue_state``'s answer) means the job has ended for good."""
    if state == "ENDED" or state.startswith("left the queue"):
        return True
    word = state.split(" ", 1)[0]
    return word.isupper() and word not in _LIVE_STATES


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
    without asking Slurm."""
    rows = []
    for jobdir in jobdirs_under(jobdirs) if isinstance(jobdirs, Path) else jobdirs:
        submission = read_submission(jobdir)
        outcome = quick_outcome(jobdir)
        if outcome == "running or unfinished" and agents_gone(jobdir):
            outcome = "ended, no final event"
        rows.append({
            "job_id": submission.job_id if submission else None,
            "mode": submission.mode if submission else None,
            "name": submission.name if submission else jobdir.path.name,
            "submitted_at": submission.submitted_at if submission else None,
            "outcome": outcome,
            "jobdir": str(jobdir.path),
        })
    return rows


def quick_outcome(jobdir: JobDir) -> str:
    """succeeded / failed / running-or-unfinished / not started, from each node's last event only
    (a 16 KiB read from the end of each file, so ``list`` stays fast on huge logs; a final event
    with its traceback is a few KiB)."""
    last_kinds = []
    for node in jobdir.node_names():
        try:
            with open(jobdir.events(node), "rb") as events:
                events.seek(0, os.SEEK_END)
                events.seek(max(0, events.tell() - 16384))
                lines = events.read().splitlines()
        except OSError:
            continue
        for line in reversed(lines):
            try:
                last_kinds.append(json.loads(line)["kind"])
                break
            except (ValueError, KeyError):
                continue
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
