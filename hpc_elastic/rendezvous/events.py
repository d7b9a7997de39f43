"""Rendezvous events: torch elastic events for machines, a Python logger for people.

Every event is a ``torch.distributed.elastic.events.Event`` recorded with
``events.record(event, destination)``, i.e. logged as one JSON line on the Python logger
``torchelastic-events-<destination>``. The default destination is ``dynamic_rendezvous``, the
logger torch's own rendezvous events go to, so a ``logging.Handler`` attached there (hpc_elastic's
file event handler does that) sees ours too. torch accepts only the destinations it knows
(``console``, ``dynamic_rendezvous``, ``null``); an unknown one is refused at construction.

Names are ``sharedfs.rendezvous.<what>`` and ``metadata`` is flat (see ``docs/rendezvous.md`` for
the list). ``timestamp`` is wall-clock milliseconds of the emitting node, for display only: the
protocol itself never compares clocks.

The same events are logged for humans on ``hpc_elastic.rendezvous`` (INFO; DEBUG for chatty ones).
"""

from __future__ import annotations

import logging
import os
import socket
import time

from torch.distributed.elastic import events as torch_events
from torch.distributed.elastic.events.api import Event, EventMetadataValue, EventSource

from .errors import SharedFSConfigError

logger = logging.getLogger("hpc_elastic.rendezvous")

DEFAULT_DESTINATION = "dynamic_rendezvous"
PREFIX = "sharedfs.rendezvous."
_DEBUG = frozenset({"heartbeat_started", "waiting"})


class EventEmitter:
    """Stamps run/node identity on every event and sends it to torch and to the logger."""

    def __init__(self, run_id: str, attempt: str | None, node: str,
                 destination: str = DEFAULT_DESTINATION) -> None:
        try:
            from torch.distributed.elastic.events.handlers import get_logging_handler

            get_logging_handler(destination)
        except KeyError:
            raise SharedFSConfigError(
                f"event_destination={destination!r} is not a torch elastic event destination; "
                "torch only knows 'console', 'dynamic_rendezvous' and 'null'. Use "
                "'dynamic_rendezvous' (the default) and attach a logging.Handler to the logger "
                "'torchelastic-events-dynamic_rendezvous'."
            ) from None
        self.destination = destination
        self._base: dict[str, EventMetadataValue] = {
            "run_id": run_id,
            "attempt": attempt,
            "node": node,
            "hostname": socket.gethostname(),
            "pid": os.getpid(),
        }

    def emit(self, what: str, message: str, **metadata: EventMetadataValue) -> None:
        md: dict[str, EventMetadataValue] = {**self._base, **metadata, "message": message}
        event = Event(
            name=PREFIX + what,
            source=EventSource.AGENT,
            timestamp=int(time.time() * 1000),
            metadata=md,
        )
        try:
            torch_events.record(event, self.destination)
        except Exception:  # an observer must never break the rendezvous
            logger.debug("could not record event %s", what, exc_info=True)
        level = logging.DEBUG if what in _DEBUG else logging.INFO
        if logger.isEnabledFor(level):
            logger.log(level, "[%s %s] %s", self._base["run_id"], self._base["node"], message)
