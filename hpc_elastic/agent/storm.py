"""The restart-storm guard: stop restarting when the same failure comes back every time.

A bug that fails at the same place on every start (a bad checkpoint, a shape error at step N, a
rank that hangs at the same line) would otherwise use up every restart, each costing a
rendezvous, a start-up and the training up to the failure, on every node of the allocation.

Each failure of this node's worker group gets a *signature*: per failed rank the exception's
type and the innermost frame of its traceback (from torch's error file), or its exit signal;
for a hang, each local rank's process state and innermost frame of its own code (its stack
dump). Numbers in messages (steps, tensor sizes) are left out on purpose: the same bug at a
different step is the same failure. When ``limit`` failures in a row have the same signature, the
agent stops restarting and says why.

The signature is per node: the node where the exception is raised sees it each time, its peers
see the same echo each time (a peer's "Connection closed"), so all nodes trip together.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from hpc_elastic.stacktext import main_frames, where

_FRAME = re.compile(r'File "([^"]+)", line (\d+), in (\S+)')


def _exception_location(failure: Any) -> str | None:
    """``RuntimeError at train.py:57 (main)`` from torch's error file data, if there is one."""
    data = getattr(failure, "error_file_data", None)
    if not isinstance(data, dict):
        return None
    message = data.get("message")
    if not isinstance(message, dict):
        return None
    text = message.get("message")
    kind = text.split(":", 1)[0].strip() if isinstance(text, str) and text else "error"
    extra = message.get("extraInfo")
    stack = extra.get("py_callstack") if isinstance(extra, dict) else None
    frames = _FRAME.findall(stack) if isinstance(stack, str) else []
    if not frames:
        return kind
    path, line, func = frames[-1]
    return f"{kind} at {'/'.join(path.split('/')[-2:])}:{line} ({func})"


def failure_signature(failures: dict[int, Any]) -> str:
    """The signature of a failed group from torch's ``RunResult.failures``."""
    parts = set()
    for failure in failures.values():
        where_ = _exception_location(failure)
        if where_ is None:
            code = getattr(failure, "exitcode", None)
            name = failure.signal_name() if isinstance(code, int) and code < 0 else None
            where_ = f"exit {code}" + (f" ({name})" if name else "")
        parts.add(where_)
    return "; ".join(sorted(parts))


def hang_signature(infos: dict[int, dict[str, Any]], files: dict[int, str],
                   jobdir: Path) -> str:
    """The signature of a hang from this node's dumps: each rank's state and place."""
    parts = set()
    for rank, info in infos.items():
        place = None
        if rank in files:
            try:
                text = (jobdir / files[rank]).read_text(errors="replace")
                place = where(main_frames(text))
            except OSError:
                pass
        parts.add(f"state {info.get('state')} at {place or '?'}")
    return "hang: " + "; ".join(sorted(parts))


class StormGuard:
    """Counts failures with the same signature in a row; ``limit`` 0 switches it off."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.last: str | None = None
        self.count = 0

    def observe(self, signature: str) -> bool:
        """Count one failure; True when it is the ``limit``-th in a row with this signature."""
        if signature == self.last:
            self.count += 1
        else:
            self.last, self.count = signature, 1
        return self.limit > 0 and self.count >= self.limit
