"""torchrun entry point: ``--rdzv-backend=sharedfs --rdzv-endpoint=/shared/dir``.

``pyproject.toml`` registers :func:`sharedfs_handler_creator` in the ``torchrun.handlers``
entry-point group. torch calls it with no arguments and registers what it returns as the
creator ``f(RendezvousParameters) -> RendezvousHandler`` for the name ``sharedfs``.

torch loads entry points while ``torch.distributed.elastic.rendezvous`` itself is being imported
(possibly triggered by importing this very package), so this module imports nothing at the top
level and defers everything to the moment a handler is actually created.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch.distributed.elastic.rendezvous.api import RendezvousHandler, RendezvousParameters

BACKEND_NAME = "sharedfs"


def create_from_parameters(params: RendezvousParameters) -> RendezvousHandler:
    """Build the handler from torchrun's parameters (``--rdzv-conf`` keys in ``params.config``)."""
    from .errors import SharedFSConfigError
    from .handler import SharedFSRendezvousHandler
    from .settings import Settings

    if params.backend != BACKEND_NAME:
        raise SharedFSConfigError(
            f"create_from_parameters builds the {BACKEND_NAME!r} backend, not {params.backend!r}."
        )
    endpoint = (params.endpoint or "").strip()
    if not endpoint or not os.path.isabs(endpoint):
        raise SharedFSConfigError(
            f"--rdzv-endpoint={endpoint!r} is not usable by the sharedfs backend: it must be the "
            "absolute path of a directory on a filesystem every node mounts at the same path "
            "(e.g. --rdzv-endpoint=/shared/project/rdzv), not a host:port."
        )
    settings = Settings.from_config(params.run_id, params.min_nodes, params.max_nodes,
                                    params.config)
    return SharedFSRendezvousHandler(endpoint, settings, local_addr=params.local_addr)


def sharedfs_handler_creator():
    """Entry point: return the creator torch registers under the backend name ``sharedfs``."""
    return create_from_parameters
