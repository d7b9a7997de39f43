"""Every way an agent ends leaves a final event that says why.

Why one module: an agent can end through torch's result (succeeded, failed), a signal (shutdown,
preemption) or an exception from anywhere -- a join timeout, a corrupt rendezvous state, a job
directory that became read-only or full, a fallback log directory it cannot use, a job.yaml it
cannot read. Without a final event ``status``, ``list`` and ``logs summary`` say "running" for
ever, and nobody learns the reason. So:

* :meth:`Ending.crashed` turns any exception that ends the agent into an ``agent.failed`` event
  with ``reason`` (one line), ``error_type`` and the traceback; the analysis shows the reason as
  the job's root cause.
* A final event the node's ``events.jsonl`` cannot take is rescued (:meth:`Ending.rescue`): first
  by freeing the node's *reserve* -- a small file made at start for exactly this -- and writing
  again (a full filesystem), then into this user's fallback directory on the node
  (``$TMPDIR/hpc_elastic-logs-<uid>/<job>/nodes/<node>/events.jsonl``; a read-only job
  directory). The reason is always printed on stderr too, which Slurm keeps in the node's log.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import traceback
from pathlib import Path
from typing import Any

from hpc_elastic.config import ConfigError
from hpc_elastic.jobdir import JobDir, JobDirError, make_dir
from hpc_elastic.telemetry.events import EventLog
from hpc_elastic.telemetry.jsonl import JsonlWriter, encode_line
from hpc_elastic.telemetry.schema import Context

#: The reserve: freed to make room for the final event on a full filesystem. A final event with
#: a traceback is a few KiB; filesystems allocate in blocks of up to 64 KiB.
RESERVE_NAME = ".final-event-reserve"
RESERVE_BYTES = 64 * 1024
#: The end of the traceback kept in the final event: enough for the frames that matter, and the
#: line stays well inside the tail that ``list`` reads (hpc_elastic/jobs.py, quick_outcome).
TRACEBACK_CHARS = 3000
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2


class Ending:
    """The agent's end: knows where the final event goes, and makes sure it gets somewhere."""

    def __init__(self) -> None:
        self.jobdir: JobDir | None = None
        self.node = "?"
        self.context: Context | None = None
        self.events: EventLog | None = None
        self.handler: Any = None  # the rendezvous handler, once there is one

    def begin(self, jobdir: JobDir, node: str, job_id: str, attempt: int) -> None:
        """The agent knows its job directory and who it is: from here on, a final event can
        be written."""
        self.jobdir = jobdir
        self.node = node
        self.context = Context(job_id=str(job_id), attempt=int(attempt), node=node)

    def attach(self, events: EventLog) -> None:
        """Use the agent's event log; final events it cannot write come back to :meth:`rescue`.
        Also makes the reserve, while there is room."""
        self.events = events
        events.final_lost = self.rescue
        if self.jobdir is not None:
            make_reserve(self.jobdir.node(self.node) / RESERVE_NAME)

    def crashed(self, err: BaseException) -> int:
        """The agent ends with ``err``: record why, leave the run, return the exit code.

        A node cut off from the shared filesystem ends with the rendezvous' fencing reason
        (what happened, that the others went on without it, what it did not write), not with
        the bare ``OSError`` (ENOTCONN, EBADFD) that happened to surface first."""
        original = err
        explain = getattr(self.handler, "explain", None)
        if explain is not None:
            with contextlib.suppress(Exception):
                err = explain(err)
        reason = one_line(err)
        if self.handler is not None:
            # The others re-form at once instead of waiting for our heartbeat to stop; the
            # rendezvous may be what broke, so this is best effort.
            with contextlib.suppress(Exception):
                self.handler.depart()
        events = self.events or self._bare_event_log()
        print(f"hpc_elastic agent on {self.node}: ended: {reason}", file=sys.stderr, flush=True)
        if events is not None:
            events.record("agent.failed", reason=reason, error_type=type(err).__name__,
                          traceback="".join(
                              traceback.format_exception(original))[-TRACEBACK_CHARS:])
            events.close()
        return EXIT_BAD_INPUT if isinstance(err, ConfigError) else EXIT_FAILED

    def stopped(self, err: Any) -> int:
        """The agent was stopped by a signal (``err``: torch's ``SignalException``) before
        torch's agent ran -- while it read the job or set up: the same final ``shutdown`` event
        and exit code (128 + signal) as a stop during training."""
        for sig in (signal.SIGTERM, signal.SIGINT):  # nothing may cut the wrap-up short
            signal.signal(sig, signal.SIG_IGN)
        if self.handler is not None:
            with contextlib.suppress(Exception):
                self.handler.depart()
        events = self.events or self._bare_event_log()
        if events is not None:
            events.record("shutdown", signal=err.sigval.name)
            events.close()
        return 128 + int(err.sigval)

    def rescue(self, line: dict[str, Any]) -> None:
        """Called with a final event the event log could not write."""
        events = self.events
        if events is not None and self.jobdir is not None and free_reserve(
                self.jobdir.node(self.node) / RESERVE_NAME):
            events.writer.retry()
            if events.writer.write(line):
                return
        where = self._write_fallback(line)
        target = f"wrote it to {where}" if where else "could not write it anywhere else"
        print(f"hpc_elastic agent on {self.node}: the final event ({line.get('kind')}"
              f"{': ' + str(line['reason']) if line.get('reason') else ''}) could not be written "
              f"to the job directory; {target}", file=sys.stderr, flush=True)

    def _write_fallback(self, line: dict[str, Any]) -> Path | None:
        if self.jobdir is None:
            return None
        from hpc_elastic.agent.worker_logs import fallback_dir

        try:
            path = fallback_dir(self.jobdir) / "nodes" / self.node / "events.jsonl"
            make_dir(path.parent)
        except (JobDirError, OSError):
            return None
        writer = JsonlWriter(path)
        written = writer.write_bytes(encode_line(line))
        writer.close()
        return path if written else None

    def _bare_event_log(self) -> EventLog | None:
        """An event log for an agent that ended before its telemetry was set up (its job.yaml
        could not be read): the final event still goes where ``status`` looks."""
        if self.jobdir is None or self.context is None:
            return None
        try:
            events = EventLog(JsonlWriter(self.jobdir.events(self.node)), self.context)
        except ValueError:  # a node name that cannot be a file name
            return None
        events.final_lost = self.rescue
        self.events = events
        return events


def one_line(err: BaseException) -> str:
    """``Type: message`` on one line, for the event's ``reason`` and the Slurm log."""
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def make_reserve(path: Path) -> None:
    """Create the reserve (once; a relaunched agent finds it). Never raises: without room for
    it now, there will be none to free later either."""
    try:
        if os.path.getsize(path) >= RESERVE_BYTES:
            return
    except OSError:
        pass
    try:
        make_dir(path.parent)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except (JobDirError, OSError):
        return
    try:
        os.pwrite(fd, b"\0" * RESERVE_BYTES, 0)
    except OSError:
        pass
    finally:
        os.close(fd)


def free_reserve(path: Path) -> bool:
    try:
        os.unlink(path)
    except OSError:
        return False
    return True
