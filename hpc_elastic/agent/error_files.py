"""Worker error files that torch's own parser cannot read.

A worker decorated with ``@record`` writes its traceback as JSON to ``TORCHELASTIC_ERROR_FILE``
when it dies. On a full disk that file is left empty or cut off, and torch's ``ProcessFailure``
(``json.load`` of the file, then ``["message"]``) raises inside the agent's monitor loop: measured
in issue 14, the agents then died without using the restarts they had left. This module tells a
readable error file from an unreadable one exactly as torch reads it, and moves unreadable ones
aside (``error.json.unreadable``, kept for the user) so that torch reports the failure without
one, as for a worker that died of a signal.

torch logs its parser's exception with a full traceback before it raises it. The agent handles
that exception (and records ``worker.error_file_unreadable`` with the reason), so the traceback
would only tell the user that something crashed when nothing did: :func:`quiet_torch_parser`
drops exactly that one log record.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from typing import Any

# The logger and message of torch's ``ProcessFailure.__post_init__`` (torch 2.x).
TORCH_ERRORS_LOGGER = "torch.distributed.elastic.multiprocessing.errors"
TORCH_PARSE_FAILURE = "Failed to parse reply file"


class _DropParseFailure(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(TORCH_PARSE_FAILURE)


def quiet_torch_parser() -> None:
    """Drop torch's log of an unreadable error file (idempotent); the agent reports it."""
    logger = logging.getLogger(TORCH_ERRORS_LOGGER)
    if not any(isinstance(f, _DropParseFailure) for f in logger.filters):
        logger.addFilter(_DropParseFailure())


def unreadable_reason(path: str) -> str | None:
    """Why torch could not parse the error file at ``path``; None when it can (or is absent)."""
    try:
        with open(path, encoding="utf-8") as fp:
            data = json.load(fp)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        return f"{type(err).__name__}: {err}" if os.path.getsize(path) else "empty file"
    if not isinstance(data, dict) or "message" not in data:
        return "not an error record (no 'message')"
    message = data["message"]
    if isinstance(message, str):
        try:
            int(data.get("timestamp", 0))
        except (TypeError, ValueError):
            return "bad 'timestamp'"
        return None
    try:
        int(message["extraInfo"]["timestamp"])
    except (KeyError, TypeError, ValueError):
        return "bad 'message' (no extraInfo.timestamp)"
    return None


def set_aside_unreadable(pcontext: Any, record: Callable[..., None]) -> list[str]:
    """Move every unreadable error file of the worker group aside; return their paths.

    ``pcontext`` is torch's process context (``error_files``: local rank -> path). Each file set
    aside is recorded as a ``worker.error_file_unreadable`` event."""
    moved = []
    for local_rank, path in sorted(getattr(pcontext, "error_files", {}).items()):
        if not path or not os.path.isfile(path):
            continue
        reason = unreadable_reason(path)
        if reason is None:
            continue
        try:
            os.replace(path, path + ".unreadable")
        except OSError:
            continue
        record("worker.error_file_unreadable", local_rank=local_rank, error_file=path,
               reason=reason)
        moved.append(path)
    return moved
