"""Stack dumps of live worker processes: py-spy when it can, faulthandler through a signal else.

Why two tools: py-spy reads a process's memory from outside (``process_vm_readv``), so it shows
the Python stack of every thread even of a *stopped* (SIGSTOP, state T) or deadlocked process,
and the process does nothing. It needs the right to ptrace the worker: the same user and, under
Yama ``ptrace_scope`` 1 (Ubuntu's default), either CAP_SYS_PTRACE or the worker's consent --
workers started through ``hpc_elastic.worker`` give it to their agent and its children with
``prctl(PR_SET_PTRACER)``; ``ptrace_scope`` 2 needs CAP_SYS_PTRACE (root), 3 forbids it. In
containers, Docker's default profile drops CAP_SYS_PTRACE (``--cap-add SYS_PTRACE``); Apptainer
runs as the user and works like the host. py-spy is an optional extra
(``pip install 'hpc-elastic[hangs]'``).

The fallback is Python's own :mod:`faulthandler`, registered by every worker for a real-time
signal (see :mod:`hpc_elastic.worker.beat`): it needs no rights beyond sending a signal to one's
own child, but runs *inside* the worker, so a stopped process cannot answer (its state is
written instead) and a process stuck in C code without returning to the interpreter answers only
at the C level.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from hpc_elastic.worker import record

PY_SPY_TIMEOUT_S = 8.0
FAULTHANDLER_WAIT_S = 3.0
ENV_STACK_TOOL = "HPC_ELASTIC_STACK_TOOL"  # "py-spy", "faulthandler" or unset (the best one)
HEADER = "# hpc_elastic hang dump "

STATES = {"R": "running", "S": "sleeping", "D": "disk wait", "T": "stopped", "t": "traced",
          "Z": "zombie", "X": "dead", "I": "idle"}


@dataclass(frozen=True)
class ProcSample:
    """What /proc says about a process: its state letter and CPU seconds so far."""

    state: str | None
    cpu_s: float | None


def proc_sample(pid: int) -> ProcSample:
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return ProcSample(None, None)
    # The command name is in parentheses and may contain spaces: split after the last ')'.
    fields = text[text.rfind(")") + 2:].split()
    try:
        ticks = os.sysconf("SC_CLK_TCK")
        return ProcSample(fields[0], (int(fields[11]) + int(fields[12])) / ticks)
    except (IndexError, ValueError):
        return ProcSample(fields[0] if fields else None, None)


def py_spy_path() -> str | None:
    """py-spy next to this interpreter (a venv) or on PATH."""
    beside = Path(sys.executable).with_name("py-spy")
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("py-spy")


def _py_spy(pid: int) -> tuple[str | None, str]:
    tool = py_spy_path()
    if tool is None:
        return None, "py-spy is not installed"
    try:
        # --nonblocking: read the memory without pausing the process (works on a stopped one).
        done = subprocess.run([tool, "dump", "--pid", str(pid), "--nonblocking"],
                              capture_output=True, text=True, timeout=PY_SPY_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as err:
        return None, f"py-spy failed: {err}"
    if done.returncode != 0 or "Thread" not in done.stdout:
        why = (done.stderr or done.stdout).strip().splitlines()
        return None, f"py-spy failed: {why[-1] if why else done.returncode}"
    return done.stdout, "py-spy"


def _faulthandler(pid: int, folder: Path, signum: int, state: str | None) -> tuple[str | None, str]:
    if signum <= 0:
        return None, "the worker registered no stack signal"
    if state in ("T", "t"):
        return None, "faulthandler cannot answer: the process is stopped (state T)"
    path = folder / record.STACKS_FILE
    try:
        before = path.stat().st_size
        os.kill(pid, signum)
    except OSError as err:
        return None, f"faulthandler: {err}"
    deadline = time.monotonic() + FAULTHANDLER_WAIT_S
    size, stable_since = before, time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.05)
        try:
            now_size = path.stat().st_size
        except OSError:
            break
        if now_size != size:
            size, stable_since = now_size, time.monotonic()
        elif size > before and time.monotonic() - stable_since >= 0.2:
            break
    if size <= before:
        return None, f"faulthandler: no answer within {FAULTHANDLER_WAIT_S:g} s"
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        data = os.pread(fd, size - before, before)
    finally:
        os.close(fd)
    return data.decode(errors="replace"), "faulthandler"


def dump_stack(pid: int, folder: Path, signum: int, state: str | None) -> tuple[str | None, str]:
    """The text of every thread's stack of ``pid``, and the tool (or why there is none)."""
    wanted = os.environ.get(ENV_STACK_TOOL, "")
    notes = []
    if wanted != "faulthandler":
        text, how = _py_spy(pid)
        if text is not None:
            return text, how
        notes.append(how)
    if wanted != "py-spy":
        text, how = _faulthandler(pid, folder, signum, state)
        if text is not None:
            return text, how
        notes.append(how)
    return None, "; ".join(notes)


def write_dump(path: Path, header: dict[str, object], text: str | None, tool: str) -> None:
    """One rank's dump file: a JSON header line (for ``logs hangs``), a readable one, the stack.

    Created with O_EXCL|O_NOFOLLOW: the directory is shared, nothing is overwritten."""
    state = header.get("state")
    lines = [HEADER + json.dumps({**header, "tool": tool}, sort_keys=True),
             f"# node {header.get('node')} rank {header.get('rank')} pid {header.get('pid')}: "
             f"state {state} ({STATES.get(str(state), '?')}), last progress "
             f"{header.get('silent_s')} s before, step {header.get('step')}",
             f"# stack by {tool}", ""]
    body = "\n".join(lines) + (text if text is not None else f"(no stack: {tool})\n")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "w") as f:
        f.write(body)


def kill(pid: int) -> None:
    with contextlib.suppress(OSError):
        os.kill(pid, signal.SIGKILL)
