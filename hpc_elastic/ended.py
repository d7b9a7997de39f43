"""Has a job ended although its job directory has no final event -- and where is that event?

Every agent writes a final event (``agent/ending.py``), but not always into the job directory:
SIGKILL leaves none, and an agent whose job directory turned read-only (or was lost) writes it
into its fallback directory on its own node. The files alone then say "running" for ever. So
``status``, ``list`` and ``logs summary`` all ask the same question here: for a local job, are
the agents the launcher recorded gone? For a Slurm job, what does the queue (squeue, then sacct)
say? And they say where the final events are (:func:`no_final_event_note`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable

from hpc_elastic import slurm
from hpc_elastic.jobdir import FALLBACK_BASE, JobDir
from hpc_elastic.procs import is_same, live_agents, recorded_launcher

#: Slurm states of a job that may still run (or run again); anything else has ended.
_LIVE_STATES = frozenset({"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED",
                          "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING", "SUSPENDED", "STOPPED",
                          "SIGNALING", "STAGE_OUT", "RESV_DEL_HOLD", "SPECIAL_EXIT"})


def queue_ended(state: str) -> bool:
    """Whether a queue state (``jobs.queue_state``'s answer) means the job has ended for good."""
    if state == "ENDED" or state.startswith("left the queue"):
        return True
    word = state.split(" ", 1)[0]
    return word.isupper() and word not in _LIVE_STATES


def slurm_job_state(job_id: str) -> str:
    """squeue (live), then sacct (after the end), then a plain explanation."""
    if not slurm.slurm_available():
        return "unknown (Slurm's commands are not on PATH here)"
    return (slurm.job_state(job_id)
            or "left the queue (sacct has no record: accounting off or lagging)")


def _submission(jobdir: JobDir) -> dict:
    try:
        data = json.loads(jobdir.submission.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def agents_gone(jobdir: JobDir) -> str | None:
    """Why the job's agents can no longer be running, or None when they may be (or nobody can
    tell): a local job whose recorded agents and launcher are all gone; a Slurm job that the
    queue says has ended (its state is returned)."""
    submission = _submission(jobdir)
    mode = submission.get("mode")
    if mode == "slurm" and submission.get("job_id"):
        state = slurm_job_state(str(submission["job_id"]))
        return f"the queue says {state}" if queue_ended(state) else None
    if mode != "local" or not jobdir.local_agents.is_file() or live_agents(jobdir):
        return None
    launcher = recorded_launcher(jobdir)
    return "its agents are gone" if launcher is None or not is_same(launcher) else None


def no_final_event_note(jobdir: JobDir, nodes: Iterable[str], why: str | None = None) -> str:
    """What to tell a user whose job ended without final events in the job directory: why we
    know it ended, and the exact place on each node where its agent put the final event."""
    try:
        uid = os.stat(jobdir.path).st_uid  # the agents ran as the job directory's owner
    except OSError:
        uid = os.getuid()
    where = (f"$TMPDIR/{FALLBACK_BASE.format(uid=uid)}/{jobdir.path.name}/nodes/<node>/"
             "events.jsonl")
    nodes = sorted(nodes)
    return (f"the job ended ({why or 'its agents are gone'}) without a final event in the job "
            "directory (an agent was killed, or it could not write there: read-only or lost). "
            f"An agent that could write one put it in {where} on its node"
            + (f" ({', '.join(nodes)})" if nodes else "")
            + ", and said why on its stderr (for Slurm: the node's log under slurm/)")
