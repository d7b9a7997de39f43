"""``submit --wait``: follow a Slurm job to its end with a one-line live display.

Once a second: the queue state from Slurm (squeue, then sacct), and what the agents wrote since
the last look. :class:`EventsTail` keeps a byte offset per node file and parses only new whole
lines, so a poll costs the same on the first minute and the tenth hour of a job. On a terminal
the line is redrawn in place; otherwise a line is printed when it changes, so CI logs stay short.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TextIO

from hpc_elastic import slurm
from hpc_elastic.jobdir import JobDir

_ENDED = {"agent.succeeded", "agent.failed", "agent.preempted", "shutdown"}


@dataclass
class EventsTail:
    """What the agents of one job reported so far, read incrementally."""

    jobdir: JobDir
    offsets: dict[str, int] = field(default_factory=dict)
    running: set[str] = field(default_factory=set)
    restarts: int = 0

    def poll(self) -> None:
        for node in self.jobdir.node_names():
            try:
                with open(self.jobdir.events(node), "rb") as events:
                    events.seek(self.offsets.get(node, 0))
                    chunk = events.read()
            except OSError:
                continue
            complete = chunk[: chunk.rfind(b"\n") + 1]  # a partial last line waits
            self.offsets[node] = self.offsets.get(node, 0) + len(complete)
            for line in complete.splitlines():
                try:
                    self._see(node, json.loads(line))
                except (ValueError, TypeError, AttributeError):
                    continue

    def _see(self, node: str, event: dict) -> None:
        kind = event.get("kind")
        if kind == "workers.started":
            self.running.add(node)
        elif kind in _ENDED:
            self.running.discard(node)
        elif kind == "workers.restart":
            # Every node logs the same group restart: keep the highest count, not the sum.
            self.restarts = max(self.restarts, int(event.get("restart_count") or 0))


def follow_job(job_id: str, jobdir: JobDir | None = None, poll_s: float = 1.0,
               out: TextIO = sys.stderr,
               state_of: Callable[[str], str | None] = slurm.job_state,
               timeout: float | None = None) -> str | None:
    """Block until the job reaches a final state; return that state ('UNKNOWN' if it vanished),
    or None when ``timeout`` seconds passed first."""
    started = time.monotonic()
    tail = EventsTail(jobdir) if jobdir is not None else None
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
        shown = f"job {job_id}: {state or 'LEFT QUEUE'}"
        if tail is not None:
            tail.poll()
            shown += f"  nodes training {len(tail.running)}  restarts {tail.restarts}"
        line = f"{shown}  elapsed {elapsed // 60}:{elapsed % 60:02d}"
        if out.isatty():
            out.write("\r" + line.ljust(78))
            out.flush()
        elif shown != last_shown:  # off a terminal, print only what changed (not the clock)
            print(line, file=out, flush=True)
            last_shown = shown
        if state in slurm.FINAL_STATES or state == "UNKNOWN":
            if out.isatty():
                out.write("\n")
            return state
        if timeout is not None and time.monotonic() - started >= timeout:
            if out.isatty():
                out.write("\n")
            return None
        time.sleep(poll_s)
