"""Telemetry: torch elastic metrics and events, and worker metrics, as JSON lines on disk.

Importing this package does not import torch (workers and the analysis commands import it); the
torch-facing names (``install``, ``Telemetry``, ``EventLog``, ``FileMetricHandler``, ...) load on
first use. The agent's whole API::

    tel = telemetry.install(jobdir, node, job_id=..., attempt=...)
    os.environ.update(tel.worker_env())      # workers inherit it: log_metric() -> rank files
    tel.events.record("preemption.signal", signal="SIGUSR1")
    ...
    tel.close()

See docs/logs.md for every file and field.
"""

from __future__ import annotations

import importlib
from typing import Any

from .jsonl import JsonlWriter, ReadStats, read_jsonl
from .schema import (
    ENV_ATTEMPT,
    ENV_JOB_ID,
    ENV_NODE,
    ENV_WORKER_DIR,
    ENV_WORKER_METRICS,
    SCHEMA_VERSION,
    Context,
)
from .worker_metrics import log_metric, log_metrics

_LAZY = {
    "install": "wiring",
    "uninstall": "wiring",
    "Telemetry": "wiring",
    "DEFAULT_DESTINATIONS": "wiring",
    "EventLog": "events",
    "TorchEventHandler": "events",
    "AGENT_EVENT_KINDS": "events",
    "RDZV_METHOD_KINDS": "events",
    "CHATTY_KINDS": "events",
    "DIRECT_KINDS": "events",
    "FileMetricHandler": "metrics",
}

__all__ = [
    "ENV_ATTEMPT",
    "ENV_JOB_ID",
    "ENV_NODE",
    "ENV_WORKER_DIR",
    "ENV_WORKER_METRICS",
    "SCHEMA_VERSION",
    "Context",
    "JsonlWriter",
    "ReadStats",
    "log_metric",
    "log_metrics",
    "read_jsonl",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    """Load torch-dependent names on first access (PEP 562)."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
