"""Metrics from the training script itself (``loss``, ``samples_per_s``, ...).

Why a file per rank instead of the node's ``metrics.jsonl``: that file has exactly one writer, the
agent, and ``O_APPEND`` is not atomic across NFS clients. Each worker process therefore appends to
its own file, ``<node>/workers/attempt-<a>/restart-<r>/rank-<rank>/metrics.jsonl``, whose path the
agent passes in ``HPC_ELASTIC_WORKER_DIR`` (the folder itself, per worker) or
``HPC_ELASTIC_WORKER_METRICS`` (a template; ``{rank}``, ``{local_rank}`` and ``{restart}`` are
filled in here from ``RANK``, ``LOCAL_RANK`` and ``TORCHELASTIC_RESTART_COUNT``). So every file
has one writer for its whole life.

Outside hpc_elastic (the variable unset) every function is a cheap no-op, so the same script runs
under plain ``python``, ``torchrun`` or anything else. Nothing here imports torch.

    from hpc_elastic.telemetry.worker_metrics import log_metric, log_metrics
    log_metric("loss", loss.item(), step=step)
    log_metrics({"loss": loss, "samples_per_s": sps}, step=step)
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Mapping
from typing import Any

from ..jobdir import METRICS
from . import jsonl
from .jsonl import JsonlWriter
from .schema import (
    ENV_ATTEMPT,
    ENV_JOB_ID,
    ENV_NODE,
    ENV_WORKER_DIR,
    ENV_WORKER_METRICS,
    PLACEHOLDERS,
    SCHEMA_VERSION,
)

__all__ = ["enabled", "log_metric", "log_metrics", "metrics_path"]

_lock = threading.Lock()
# (fork generation, resolved path, writer, leading fields). Resolved at import, so a process that
# forks (DataLoader workers) has resolved it before: a forked child whose environment resolves to
# the same file stays quiet (one writer per file); one with its own RANK gets its own file.
_State = tuple[int, "str | None", "JsonlWriter | None", "dict[str, Any]"]
_state: _State | None = None


def _int_env(name: str) -> int | None:
    try:
        return int(os.environ[name])
    except (KeyError, ValueError):
        return None


def metrics_path() -> str | None:
    """This process's metrics file, or None when not running as an hpc_elastic worker.

    ``HPC_ELASTIC_WORKER_DIR`` (the exact folder of this worker, set by the agent's LogsSpecs)
    wins; else the ``HPC_ELASTIC_WORKER_METRICS`` template, None when it names a variable torch
    did not set (e.g. in the agent itself).
    """
    worker_dir = os.environ.get(ENV_WORKER_DIR)
    if worker_dir:
        return os.path.join(worker_dir, METRICS)
    template = os.environ.get(ENV_WORKER_METRICS)
    if not template:
        return None
    for placeholder, var in PLACEHOLDERS.items():
        if placeholder in template:
            if var not in os.environ:
                return None
            template = template.replace(placeholder, os.environ[var])
    return template


def _resolve(inherited: _State | None) -> _State:
    gen = jsonl.FORK_GENERATION
    path = metrics_path()
    head: dict[str, Any] = {
        "job_id": os.environ.get(ENV_JOB_ID),
        "attempt": _int_env(ENV_ATTEMPT),
        "node": os.environ.get(ENV_NODE),
        "rank": _int_env("RANK"),
        "local_rank": _int_env("LOCAL_RANK"),
        "restart": _int_env("TORCHELASTIC_RESTART_COUNT"),
    }
    if path is None or (inherited is not None and inherited[1] == path):
        return gen, path, None, head
    return gen, path, JsonlWriter(path, fsync_on_close=False), head


def _setup() -> tuple[JsonlWriter | None, dict[str, Any]]:
    """The writer of this process: resolved at import, again in a forked child."""
    global _state
    st = _state
    if st is None or st[0] != jsonl.FORK_GENERATION:
        with _lock:
            if _state is None or _state[0] != jsonl.FORK_GENERATION:
                _state = _resolve(_state)
            st = _state
    return st[2], st[3]


_setup()


def enabled() -> bool:
    """True when metrics go somewhere (the agent set ``HPC_ELASTIC_WORKER_METRICS``)."""
    return _setup()[0] is not None


def _plain(value: Any) -> Any:
    """Tensors and numpy scalars become Python numbers (``.item()``) without importing either."""
    item = getattr(value, "item", None)
    if callable(item):
        try:
            return item()
        except Exception:  # noqa: BLE001 - e.g. a multi-element tensor: fall back to str
            return str(value)
    return value


def log_metrics(
    values: Mapping[str, Any], *, step: int | None = None, group: str = "worker"
) -> None:
    """Append one line per metric, all with the same time and step. Never raises for I/O."""
    writer, head = _setup()
    if writer is None:
        return
    now = time.time()
    for name, value in values.items():
        line: dict[str, Any] = {"v": SCHEMA_VERSION, "time": now}
        line.update(head)
        line["group"] = group
        line["name"] = str(name)
        line["value"] = _plain(value)
        if step is not None:
            line["step"] = int(step)
        writer.write(line)


def log_metric(name: str, value: Any, *, step: int | None = None, group: str = "worker") -> None:
    """Append one metric line (a no-op outside hpc_elastic)."""
    log_metrics({name: value}, step=step, group=group)
