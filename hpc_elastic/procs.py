"""Which process a recorded PID is: the identity a local job's launcher records for its agents.

Why: a PID alone names a process only while it lives. After an agent exits, the kernel may give
its number to any other process of the same user, and ``cancel`` signalling the recorded PID would
kill that unrelated process. A process is identified by its PID together with its start time (in
clock ticks since boot, ``/proc/<pid>/stat`` field 22, which never changes for a process and
differs for the next one with that PID) and its command line; both are recorded at launch and
compared before any signal is sent.
"""

from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import dataclass
from typing import Any

from hpc_elastic.jobdir import JobDir


@dataclass(frozen=True)
class ProcessRecord:
    pid: int
    start_ticks: int
    cmdline: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {"pid": self.pid, "start_ticks": self.start_ticks, "cmdline": list(self.cmdline)}

    @classmethod
    def from_json(cls, data: Any) -> ProcessRecord | None:
        """The record, or None when ``data`` is not one (a file edited or corrupted)."""
        try:
            pid, ticks, argv = data["pid"], data["start_ticks"], data["cmdline"]
        except (KeyError, TypeError):
            return None
        if (not isinstance(pid, int) or isinstance(pid, bool) or pid <= 1
                or not isinstance(ticks, int) or not isinstance(argv, list)
                or not all(isinstance(a, str) for a in argv)):
            return None
        return cls(pid, ticks, tuple(argv))


def start_ticks(pid: int) -> int | None:
    """When ``pid`` started (clock ticks since boot), or None when there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            text = stat.read()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may itself hold ')' or spaces.
    fields = text[text.rfind(b")") + 2:].split()
    try:
        return int(fields[19])  # field 22 overall: 20th after "pid (comm)"
    except (IndexError, ValueError):
        return None


def cmdline(pid: int) -> tuple[str, ...] | None:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as raw:
            data = raw.read()
    except OSError:
        return None
    return tuple(part.decode("utf-8", "replace") for part in data.split(b"\0") if part)


#: How long :func:`record` waits for a process that is still inside ``execve`` to show its
#: command line.
EXEC_SETTLE_S = 2.0


def record(pid: int) -> ProcessRecord | None:
    """What identifies the running process ``pid`` now (call it right after starting it).

    Right after ``subprocess.Popen`` returns, the child may still be finishing ``execve`` and
    ``/proc/<pid>/cmdline`` reads empty (measured: 90 of 200 Python children read at once). A
    record with that empty command line would never match the process again, so ``cancel``
    would neither count nor signal it: wait (briefly) until the command line appears."""
    deadline = time.monotonic() + EXEC_SETTLE_S
    while True:
        ticks, argv = start_ticks(pid), cmdline(pid)
        if ticks is None or argv is None:
            return None
        if argv or time.monotonic() >= deadline or _is_zombie(pid):
            break
        time.sleep(0.005)
    if not argv:
        return None  # no command line to recognise it by: not a process we can vouch for
    return ProcessRecord(pid, ticks, argv)


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            text = stat.read()
    except OSError:
        return True
    return text[text.rfind(b")") + 2:][:1] == b"Z"


def is_same(rec: ProcessRecord) -> bool:
    """True only while the process ``rec`` describes is still alive: same PID, same start time,
    same command line (an exited, unreaped process has none)."""
    return start_ticks(rec.pid) == rec.start_ticks and cmdline(rec.pid) == rec.cmdline


def signal_if_same(rec: ProcessRecord, signum: int) -> bool:
    """Send ``signum`` to the process ``rec`` describes, only if it still is that process.

    Through a pidfd where the kernel has them: the descriptor pins the process, so the check
    and the signal concern the same process even if it exits in between and its PID is reused.
    Returns whether the signal was sent."""
    try:
        fd = os.pidfd_open(rec.pid)
    except (AttributeError, OSError):
        fd = None
    try:
        if not is_same(rec):
            return False
        if fd is not None:
            signal.pidfd_send_signal(fd, signum)
        else:
            os.kill(rec.pid, signum)
        return True
    except ProcessLookupError:
        return False
    finally:
        if fd is not None:
            os.close(fd)


def live_agents(jobdir: JobDir) -> list[ProcessRecord]:
    """A local job's agents that are still alive *and still those agents* (none when the job
    is not a local one, or its launcher recorded nothing).

    The launcher records each agent's PID with its start time and command line; a PID whose
    process has a different start time or command line was reused by the kernel for another
    process, which must never be signalled. A file from before these records (``pids`` only)
    is trusted only for processes whose command line is this job's agent."""
    data = _agents_file(jobdir)
    if data is None:
        return []
    if "agents" in data:
        records = data["agents"] if isinstance(data["agents"], list) else []
        found = [ProcessRecord.from_json(item) for item in records]
        return [rec for rec in found if rec is not None and is_same(rec)]
    pids = data.get("pids") if isinstance(data.get("pids"), list) else []
    current = [record(pid) for pid in pids if isinstance(pid, int) and pid > 1]
    agent_argv = ("hpc_elastic", "agent", str(jobdir.path))
    return [rec for rec in current if rec is not None and rec.cmdline[-3:] == agent_argv]


def recorded_launcher(jobdir: JobDir) -> ProcessRecord | None:
    """A local job's launcher as it recorded itself (alive or not: see :func:`is_same`). A
    file written before start times were recorded (``launcher`` only) counts only while that
    PID runs this job's launcher."""
    data = _agents_file(jobdir)
    if data is None:
        return None
    if "launcher_process" in data:
        return ProcessRecord.from_json(data["launcher_process"])
    pid = data.get("launcher")
    rec = record(pid) if isinstance(pid, int) and pid > 1 else None
    if rec is None or "hpc_elastic.local" not in rec.cmdline or str(jobdir.path) not in rec.cmdline:
        return None
    return rec


def _agents_file(jobdir: JobDir) -> dict[str, Any] | None:
    try:
        data = json.loads(jobdir.local_agents.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
