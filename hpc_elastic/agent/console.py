"""Local mode: the submitting terminal gets one short line per failure, not torch's log lines.

In local mode every simulated node's agent shares the terminal that ran ``submit``. torch's
agent logs each failure on stderr from every node ("Sending process N closing signal SIGTERM",
"failed (exitcode: 1) local_rank: 1 (pid: N) of binary: ..."), most of them consequences of
one root cause, which ``submit`` prints at the end anyway (with a pointer to ``logs
failures``). So in local mode torch's ``torch.distributed.elastic`` loggers write to the node's
``agent.log`` in the job directory instead -- nothing is lost -- and the agent prints one short
line per failed worker group (the root cause is in ``submit``'s last lines). On a cluster
nothing changes: an agent's stderr is its own node's Slurm log, where torch's lines belong.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hpc_elastic.jobdir import JobDirError, open_append

#: The loggers of torch's elastic agent, its worker processes' supervision and rendezvous.
TORCH_ELASTIC_LOGGER = "torch.distributed.elastic"


def route_torch_logs(path: Path) -> Path | None:
    """Send torch's elastic log lines to ``path`` (appended, created with the job directory's
    modes) instead of stderr; returns ``path``, or None when it cannot be written (then they
    stay on stderr, so they are never lost)."""
    try:
        fd = open_append(path)
    except (JobDirError, OSError):
        return None
    stream = os.fdopen(fd, "a", buffering=1, encoding="utf-8", errors="replace")
    handler = AgentLogHandler(stream)
    handler.setFormatter(_torch_formatter())
    logger = logging.getLogger(TORCH_ELASTIC_LOGGER)
    logger.addHandler(handler)
    logger.propagate = False  # "torch.distributed"'s handler writes to stderr
    return path


class AgentLogHandler(logging.StreamHandler):
    """Writes to ``agent.log``; a line that cannot be written there (a full or vanished job
    directory) goes to stderr as one plain line -- not logging's "--- Logging error ---" with
    a traceback, which would bury the agent's own final message about the failing disk."""

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging's name
        with contextlib.suppress(Exception):  # stderr is gone too: nothing left to tell
            sys.stderr.write(f"[agent.log unwritable] {record.levelname}: "
                             f"{record.getMessage()}\n")


def _torch_formatter() -> logging.Formatter:
    """torch's own line format (level, time, pid, file:line), as on a cluster's node log."""
    for name in ("torch.distributed", "torch"):
        for handler in logging.getLogger(name).handlers:
            if handler.formatter is not None:
                return handler.formatter
    return logging.Formatter("%(levelname).1s%(asctime)s %(process)d %(name)s] %(message)s")


def failure_line(node: str, failures: Mapping[int, Any], remaining_restarts: int,
                 max_restarts: int) -> str:
    """One line for a failed worker group: which ranks, their exit codes, what happens next.
    No error text: on one node most failures are echoes of another rank's (a collective's peer
    vanished); the root cause is what ``submit`` prints at the end, from the analysis."""
    ranks = ", ".join(str(rank) for rank in sorted(failures))
    codes = ", ".join(str(code) for code in sorted({f.exitcode for f in failures.values()}))
    # torch takes the restart after this is said: the one about to start is number ``used``.
    used = max_restarts - remaining_restarts + 1
    then = (f"restarting the workers (restart {used} of {max_restarts})"
            if remaining_restarts > 0 else "no restarts left")
    return f"hpc-elastic: {node}: rank(s) {ranks} failed (exit {codes}); {then}"


def say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
