"""The progress record: the one fixed-size line a worker rewrites and its agent reads.

Why a fixed-size record rewritten in place (``pwrite`` at offset 0) and not an appended log:
the file has one writer (the worker) and one reader (its own agent, on the same node, so the same
page cache even on NFS); a rewrite of one small block never grows the file and needs no
truncation, so the reader sees either the old or the new record. A record that does not parse
(a torn read) is skipped; the next read a second later is whole again.

Liveness is judged by the *counter* ``n`` changing, on the reader's own monotonic clock, never
by mtime or by the writer's clock: a stopped process, a deadlocked one and one spinning in a loop
all leave ``n`` unchanged, whatever the writer thread still does.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

RECORD_SIZE = 160
PROGRESS_FILE = "progress"
STACKS_FILE = "stacks.txt"
# Where the agent tells the worker to write (its folder; see JobDirLogsSpecs) and how often.
ENV_PROGRESS_INTERVAL = "HPC_ELASTIC_PROGRESS_INTERVAL"
ENV_STACK_SIGNAL = "HPC_ELASTIC_STACK_SIGNAL"


@dataclass(frozen=True)
class Progress:
    """One read of a worker's record."""

    n: int  # progress reports so far (optimizer steps or explicit calls)
    step: int | None  # the last step number the script passed to report_progress, if any
    time: float  # writer's wall clock at its last report (display only, never compared)
    pid: int
    signal: int  # the signal that makes the worker dump its stacks (faulthandler); 0: none
    step_time: float | None  # mean seconds per report over the writer's last window
    ended: bool = False  # the script returned: the process is on its way out, not hung
    busy: float | None = None  # mean CPU seconds of the training thread per report (window)


def encode(p: Progress) -> bytes:
    text = json.dumps({"n": p.n, "step": p.step, "t": round(p.time, 3), "pid": p.pid,
                       "sig": p.signal, "dt": None if p.step_time is None
                       else round(p.step_time, 6), "end": int(p.ended),
                       "ct": None if p.busy is None else round(p.busy, 6)},
                      separators=(",", ":"))
    data = text.encode()
    if len(data) >= RECORD_SIZE:
        raise ValueError("progress record too long")
    return data + b" " * (RECORD_SIZE - 1 - len(data)) + b"\n"


def decode(data: bytes) -> Progress | None:
    """The record, or None when it is empty, torn or not ours."""
    try:
        obj = json.loads(data.decode().strip())
        n, pid, sig = obj["n"], obj["pid"], obj["sig"]
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (n, pid, sig)):
            return None
        step = obj.get("step")
        dt = obj.get("dt")
        return Progress(n=n, step=step if isinstance(step, int) else None,
                        time=float(obj.get("t") or 0.0), pid=pid, signal=sig,
                        step_time=float(dt) if isinstance(dt, (int, float)) else None,
                        ended=bool(obj.get("end")),
                        busy=float(ct) if isinstance(ct := obj.get("ct"), (int, float)) else None)
    except (ValueError, KeyError, TypeError, UnicodeDecodeError, AttributeError):
        return None


def read(path: str | os.PathLike[str]) -> Progress | None:
    """Read a record without following a link (the job directory is shared)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        return decode(os.pread(fd, RECORD_SIZE, 0))
    except OSError:
        return None
    finally:
        os.close(fd)
