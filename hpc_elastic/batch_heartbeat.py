"""The batch supervisor's heartbeat, and the agents' watch on it: surviving the batch host's loss.

Why: the batch supervisor (hpc_elastic/batch.py) and every ``srun`` client of the agents' steps
run on the job's first node, the *batch host*. Measured on Slurm 22.05 with ``--no-kill``
(docs/fault-tolerance.md): when that node loses power, slurmctld marks it DOWN after
``SlurmdTimeout``, removes it from the job and drops the batch step -- and then nothing ends or
requeues the job: it stays RUNNING on the other nodes without a batch script (90 s and more,
measured), their agents train on, but no supervisor is left to relaunch or end anything. So the
agents must act: the supervisor beats a counter file, ``batch/<job>.attempt-<a>.alive``, and
each lead agent watches it. When it stops for ``heartbeat_timeout`` (judged by the agent's own
monotonic clock, as the rendezvous judges nodes: hpc_elastic/rendezvous/heartbeat.py) the agent
records ``batch.lost``, excludes the batch host (``excluded/<node>.json``) and takes the same
path as a preemption: its workers checkpoint, and one node (the ``requeue/attempt-<a>`` claim)
runs ``scontrol requeue``. The next attempt resumes from that checkpoint on the other nodes.

A supervisor that never wrote the file (plain batch scripts that start agents themselves, local
mode) is never judged: watching starts only once the file exists.

The counter works like the rendezvous heartbeat (one writer, rewritten in place, ``fsync``ed;
read with ``O_NOFOLLOW`` and only when it is our own regular file), but is written here: the
rendezvous package imports torch, which the batch supervisor does not load.
"""

from __future__ import annotations

import contextlib
import os
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path

from hpc_elastic.jobdir import JobDir, make_dir
from hpc_elastic.telemetry import read_jsonl

_WIDTH = 20


def heartbeat_path(jobdir: JobDir, job_id: str, attempt: int) -> Path:
    """``batch/<job>.attempt-<a>.alive``: one writer, that attempt's supervisor."""
    events = jobdir.supervisor_events(job_id, attempt)
    return events.with_name(events.name.removesuffix(".jsonl") + ".alive")


class SupervisorHeartbeat:
    """A daemon thread that advances the supervisor's counter every ``interval`` seconds.

    A thread, not the supervisor's poll loop: the loop may wait a minute on a Slurm command
    (``sinfo`` of a busy controller), and that must not look like a dead batch host."""

    def __init__(self, jobdir: JobDir, job_id: str, attempt: int, interval: float) -> None:
        make_dir(jobdir.supervisor)
        self.path = heartbeat_path(jobdir, job_id, attempt)
        self.counter = 0
        self._interval = interval
        self._stop = threading.Event()
        self.beat()  # before any agent starts: they watch only once it exists
        self._thread = threading.Thread(target=self._loop, name="supervisor-heartbeat",
                                        daemon=True)
        self._thread.start()

    def beat(self) -> None:
        """Write the next counter value in place (same width: a reader sees old or new)."""
        self.counter += 1
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.pwrite(fd, f"{self.counter:0{_WIDTH}d}\n".encode(), 0)
            os.fsync(fd)
        finally:
            os.close(fd)

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            with contextlib.suppress(OSError):  # a missed beat: the watchers allow a timeout
                self.beat()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def batch_host(jobdir: JobDir, job_id: str, attempt: int) -> str | None:
    """The node the attempt's supervisor runs on (its ``batch.start`` record), if known."""
    host = None
    for record in read_jsonl(jobdir.supervisor_events(job_id, attempt), missing_ok=True):
        if record.get("kind") == "batch.start" and isinstance(record.get("host"), str):
            host = record["host"] or None
    return host


class SupervisorWatch:
    """An agent's daemon thread that calls ``on_lost(silent_s)`` once when the supervisor's
    heartbeat has not moved for ``timeout`` seconds (after it was first seen)."""

    def __init__(self, jobdir: JobDir, job_id: str, attempt: int, interval: float,
                 timeout: float, on_lost: Callable[[float], None]) -> None:
        self.path = heartbeat_path(jobdir, job_id, attempt)
        self._timeout = timeout
        self._seen: tuple[bytes, float] | None = None  # last value, when it last changed
        self._interval = interval
        self._on_lost = on_lost
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="supervisor-watch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def check(self, now: float | None = None) -> float | None:
        """One look: the seconds the heartbeat has been silent if that makes it dead, else
        None. A file that does not exist (yet) is not watched."""
        now = time.monotonic() if now is None else now
        value = _read_own(self.path)
        if value is None:
            return None  # not there (yet), or unreadable this time: proves nothing
        if self._seen is None or value != self._seen[0]:
            self._seen = (value, now)
            return None
        silent = now - self._seen[1]
        return silent if silent >= self._timeout else None

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            silent = self.check(time.monotonic())
            if silent is not None:
                self._on_lost(silent)
                return


def _read_own(path: Path) -> bytes | None:
    """The counter, or None when the file is missing, unreadable (ESTALE, a reconnecting client)
    or not our own regular file (then it is never trusted)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid():
            return None
        return os.read(fd, 64)
    except OSError:
        return None
    finally:
        os.close(fd)
