"""Shared-filesystem rendezvous for torch.distributed.elastic (backend name ``sharedfs``).

The only meeting point of the nodes is a directory they all mount (NFS, Lustre, GPFS; a local
directory on one machine). No etcd, no TCP endpoint to agree on. See ``docs/rendezvous.md``.

Programmatic use (what the per-node agent does)::

    from hpc_elastic.rendezvous import create_handler

    handler = create_handler(jobdir.rendezvous, run_id="job42", min_nodes=2, max_nodes=4,
                             local_addr="10.0.0.5", attempt="0", heartbeat_timeout=10)
    spec = WorkerSpec(..., rdzv_handler=handler)

torchrun::

    torchrun --rdzv-backend=sharedfs --rdzv-endpoint=/shared/dir --rdzv-id=myrun \\
             --nnodes=1:3 --nproc-per-node=2 script.py
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import (
    LockingUnsupportedError,
    SharedFSConfigError,
    SharedFSRendezvousError,
    StateCorruptError,
)
from .events import DEFAULT_DESTINATION
from .handler import BACKEND_NAME, SharedFSRendezvousHandler
from .settings import DEFAULTS, Settings

__all__ = [
    "BACKEND_NAME",
    "DEFAULTS",
    "LockingUnsupportedError",
    "Settings",
    "SharedFSConfigError",
    "SharedFSRendezvousError",
    "SharedFSRendezvousHandler",
    "StateCorruptError",
    "create_handler",
]


def create_handler(
    root: Path | str,
    run_id: str,
    min_nodes: int,
    max_nodes: int,
    *,
    local_addr: str | None = None,
    attempt: str | int | None = None,
    event_destination: str = DEFAULT_DESTINATION,
    **settings: Any,
) -> SharedFSRendezvousHandler:
    """Create this node's rendezvous handler for run ``run_id`` under directory ``root``.

    ``root`` must be on a filesystem every node mounts at the same path; the run lives in
    ``root/<run_id>`` or, with ``attempt``, ``root/<run_id>.attempt-<attempt>`` (a fresh,
    isolated rendezvous per Slurm attempt). ``local_addr`` is the address other nodes reach this
    one at; it becomes the workers' ``MASTER_ADDR`` when this node gets rank 0 (default: the
    FQDN). Other keyword arguments are the settings of :class:`Settings` (``join_timeout``,
    ``last_call_timeout``, ``close_timeout``, ``heartbeat_interval``, ``heartbeat_timeout``,
    ``lock_timeout``, ``poll_interval``, ``poll_interval_max``, ``lock_mode``).

    Raises :class:`SharedFSConfigError` (a ``RendezvousError`` and a ``ValueError``) with one
    paragraph naming the setting and the fix, before touching the directory when it can.
    """
    config: dict[str, Any] = dict(settings)
    if attempt is not None:
        config["attempt"] = str(attempt)
    parsed = Settings.from_config(run_id, min_nodes, max_nodes, config)
    return SharedFSRendezvousHandler(root, parsed, local_addr=local_addr,
                                     event_destination=event_destination)
