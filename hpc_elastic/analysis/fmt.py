"""Small formatting helpers shared by the text outputs (times, durations, the notes footer)."""

from __future__ import annotations

import datetime as _dt
import json
import sys
from typing import Any


def iso(t: float | None) -> str:
    """UTC ISO time with milliseconds; '-' for unknown."""
    if t is None:
        return "-"
    return _dt.datetime.fromtimestamp(t, _dt.timezone.utc).isoformat(timespec="milliseconds")


def dur(seconds: float | None) -> str:
    """Human duration: 0.123s, 12.3s, 4m05s, 2h03m."""
    if seconds is None:
        return "-"
    s = float(seconds)
    if s < 10:
        return f"{s:.3f}s"
    if s < 60:
        return f"{s:.1f}s"
    if s < 3600:
        return f"{int(s // 60)}m{int(s % 60):02d}s"
    return f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m"


def footer(notes: list[str]) -> str:
    """One line naming what was skipped, so a damaged input never passes silently."""
    if not notes:
        return ""
    return "notes: " + "; ".join(notes)


def emit_json(obj: Any) -> None:
    """JSON to stdout; ``default=str`` so an odd value never crashes the output."""
    json.dump(obj, sys.stdout, indent=2, default=str, allow_nan=False)
    sys.stdout.write("\n")
