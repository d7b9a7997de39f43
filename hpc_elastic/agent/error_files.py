"""Worker error files that torch's own parser cannot read.

A worker decorated with ``@record`` writes its traceback as JSON to ``TORCHELASTIC_ERROR_FILE``
when it dies. On a full disk that file is left empty or cut off, and torch's ``ProcessFailure``
(``json.load`` of the file, then ``["message"]``) raises inside the agent's monitor loop: measured
in issue 14, the agents then died without using the restarts they had left. This module tells a
readable error file from an unreadable one exactly as torch reads it, and moves unreadable ones
aside (``error.json.unreadable``, kept for the user) so that torch reports the failure without
one, as for a worker that died of a signal.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any


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
