"""PID files of the daemons and FUSE clients that the test clusters start."""

from __future__ import annotations

import os
from pathlib import Path


def live_pid_from(pidfile: Path) -> int | None:
    """The PID written in ``pidfile`` if that process is alive; None if the file is missing,
    unreadable, not a number, or names a process that has gone."""
    try:
        pid = int(pidfile.read_text())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    return pid
