"""``submit --wait``: follow a Slurm job to its end with a one-line live display.

Polls Slurm (squeue, then sacct) once a second; cheap for the controller and quick enough for a
human. On a terminal the line is redrawn in place; otherwise a line is printed per state change,
so CI logs stay readable.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

from hpc_elastic import slurm


def follow_job(job_id: str, poll_s: float = 1.0, out: TextIO = sys.stderr,
               state_of: Callable[[str], str | None] = slurm.job_state) -> str:
    """Block until the job reaches a final state; return that state ('UNKNOWN' if it vanished)."""
    started = time.monotonic()
    last_shown = ""
    unknown_since: float | None = None
    while True:
        state = state_of(job_id)
        if state is None:
            # Neither squeue nor sacct knows the job: sacct may lag, or accounting is off.
            unknown_since = unknown_since or time.monotonic()
            if time.monotonic() - unknown_since > 30:
                state = "UNKNOWN"
        else:
            unknown_since = None
        elapsed = int(time.monotonic() - started)
        line = f"job {job_id}: {state or 'LEFT QUEUE'}  elapsed {elapsed // 60}:{elapsed % 60:02d}"
        if out.isatty():
            out.write("\r" + line.ljust(60))
            out.flush()
        elif state != last_shown:
            print(line, file=out, flush=True)
        last_shown = state or ""
        if state in slurm.FINAL_STATES or state == "UNKNOWN":
            if out.isatty():
                out.write("\n")
            return state
        time.sleep(poll_s)
