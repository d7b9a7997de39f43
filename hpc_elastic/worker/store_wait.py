"""Connect to the group's store the moment rank 0 has opened it, not at torch's next retry.

Why: with ``init_process_group()`` (``env://``), rank 0's worker opens the group's TCPStore at
``MASTER_ADDR:MASTER_PORT`` and every other rank connects to it. A rank whose first connect comes
before rank 0 listens is refused, and torch's client then waits out a backoff before it tries
again. Measured here (torch 2.13, 4 gloo ranks forked at once on loopback, rank 0 delayed): with
rank 0 10-100 ms late, ``init_process_group`` returned 0.5-0.8 s after rank 0 started; with
the ranks polling the port every 10 ms first, 0.03-0.04 s after. Whether rank 0 is first is
chance -- a warm start forks every rank within milliseconds, a cold one has each import torch
at its own pace -- so a start or restart paid that backoff most of the time
(benchmarks/bench_group_start.py: 330 ms on average, 22 ms with the wait).

What this does: it wraps torch's ``env://`` rendezvous handler. Before a rank other than 0
creates its store client, it tries to connect to ``MASTER_ADDR:MASTER_PORT`` every 5-20 ms
(longer in groups of over 200 ranks, see :func:`longest_pause`) and closes each connection it
got at once (the store's server takes that as a client that left), then hands over to torch's
own handler, unchanged. It gives up after :data:`MOST_WAIT_S` (or half the group's timeout, if
smaller) and hands over anyway: a master that comes later is torch's to wait for, with torch's
error if it never comes. With the agent's store (``TORCHELASTIC_USE_AGENT_STORE=True``) the
server is up before any worker starts, so nothing waits. ``HPC_ELASTIC_STORE_WAIT=0`` in the
job's ``env:`` turns it off (for a site whose firewall or monitoring objects to connections
that close without a word).

In a forked warm worker ``torch.distributed`` is already imported, and :func:`install` wraps the
handler at once. A cold worker imports torch in its script, so :func:`install_on_import` waits
for that import (an import hook that removes itself on first use): this module never imports
torch, so the script's own import order and environment set-up stay its own.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.abc
import importlib.machinery
import importlib.util
import os
import random
import socket
import sys
import time
from collections.abc import Callable
from datetime import timedelta
from types import ModuleType
from typing import Any
from urllib.parse import parse_qs, urlparse

__all__ = ["ENV_SWITCH", "MOST_WAIT_S", "install", "install_on_import", "wait_until_listening"]

_RENDEZVOUS = "torch.distributed.rendezvous"
_MARK = "_hpc_elastic_waits_for_store"

#: Set to "0" in the workers' environment to leave torch's handler alone.
ENV_SWITCH = "HPC_ELASTIC_STORE_WAIT"
#: The longest wait for rank 0's store before torch's own connect takes over.
MOST_WAIT_S = 30.0
#: The first pause between two tries (it grows x1.5 up to :func:`longest_pause`).
_FIRST_PAUSE_S = 0.005
#: The tries per second that all ranks together may make at rank 0's host, at most on average:
#: each refused one costs that host's kernel a reset, a few microseconds.
_TRIES_PER_S_AT_MASTER = 10_000
#: One try's connect timeout: a host that drops packets must not hold a try for long.
_TRY_TIMEOUT_S = 1.0


def longest_pause(world_size: int) -> float:
    """The longest pause between two tries of one rank: 20 ms, or longer in a group so large
    that its ranks together would try more than :data:`_TRIES_PER_S_AT_MASTER` times a second
    (4,096 ranks: 0.41 s)."""
    return max(0.02, world_size / _TRIES_PER_S_AT_MASTER)


def wait_until_listening(host: str, port: int, limit_s: float, world_size: int = 1) -> bool:
    """Try to connect to ``host:port`` until a connection is accepted (True) or ``limit_s``
    seconds have passed (False). Every connection made is closed at once. The pauses between
    tries grow from 5 ms to :func:`longest_pause`, each shifted by up to 20 % at random, so
    that the ranks of a large group do not try in step."""
    deadline = time.monotonic() + limit_s
    pause, longest = _FIRST_PAUSE_S, longest_pause(world_size)
    addresses: list[Any] = []
    while True:
        if not addresses:
            with contextlib.suppress(OSError):  # a name not resolvable yet: try again
                addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        for family, kind, proto, _name, address in addresses:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            with socket.socket(family, kind, proto) as probe:
                probe.settimeout(min(_TRY_TIMEOUT_S, left))
                with contextlib.suppress(OSError):
                    probe.connect(address)
                    return True
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        time.sleep(min(pause * random.uniform(0.8, 1.2), left))
        pause = min(pause * 1.5, longest)


def _store_endpoint(url: str) -> tuple[str, int, int] | None:
    """Where this rank's store client will connect, and the group's size (1 if not known), or
    None when it will not wait for one: rank 0 (it opens the store), the agent's store (open
    before the workers start), or an environment torch's handler will refuse anyway (it says
    why)."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        return None
    query = parse_qs(urlparse(url).query)
    rank_text = query["rank"][0] if "rank" in query else os.environ.get("RANK", "")
    world_text = (query["world_size"][0] if "world_size" in query
                  else os.environ.get("WORLD_SIZE", ""))
    host = os.environ.get("MASTER_ADDR", "")
    port_text = os.environ.get("MASTER_PORT", "")
    if not (rank_text.isdigit() and port_text.isdigit() and host):
        return None
    port = int(port_text)
    if int(rank_text) == 0 or not 0 < port < 65536:
        return None
    return host, port, int(world_text) if world_text.isdigit() else 1


def _waiting(handler: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(handler)
    def env_rendezvous_handler(url: str, *args: Any, **kwargs: Any) -> Any:
        with contextlib.suppress(Exception):  # never stand between a script and torch
            endpoint = _store_endpoint(url)
            if endpoint is not None:
                timeout = kwargs.get("timeout")
                limit = MOST_WAIT_S
                if isinstance(timeout, timedelta):
                    limit = min(limit, timeout.total_seconds() / 2)
                host, port, world_size = endpoint
                wait_until_listening(host, port, limit, world_size)
        return handler(url, *args, **kwargs)

    setattr(env_rendezvous_handler, _MARK, True)
    return env_rendezvous_handler


def install() -> bool:
    """Wrap torch's ``env://`` rendezvous handler if ``torch.distributed`` is already imported;
    False if it is not, if it is already wrapped, or if :data:`ENV_SWITCH` is "0"."""
    if os.environ.get(ENV_SWITCH) == "0":
        return False
    rendezvous = sys.modules.get(_RENDEZVOUS)
    handlers = getattr(rendezvous, "_rendezvous_handlers", None)
    if not isinstance(handlers, dict):
        return False
    handler = handlers.get("env")
    if handler is None or getattr(handler, _MARK, False):
        return False
    handlers["env"] = _waiting(handler)
    return True


class _InstallAfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: when torch's rendezvous module is imported, it removes itself from
    ``sys.meta_path``, lets the other finders find the module, and has :func:`install` run
    right after the module's own code."""

    def find_spec(self, fullname: str, path: Any, target: ModuleType | None = None
                  ) -> importlib.machinery.ModuleSpec | None:
        if fullname != _RENDEZVOUS:
            return None
        with contextlib.suppress(ValueError):
            sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(fullname)
        except Exception:  # noqa: BLE001 - the import system then finds it as without us
            return None
        loader = getattr(spec, "loader", None)
        exec_module = getattr(loader, "exec_module", None)
        if exec_module is None:
            return spec

        def exec_and_install(module: ModuleType) -> None:
            exec_module(module)
            with contextlib.suppress(Exception):  # never stand between a script and torch
                install()

        loader.exec_module = exec_and_install  # type: ignore[union-attr]
        return spec


def install_on_import() -> bool:
    """:func:`install` now if torch's rendezvous module is imported, else as soon as it is.
    False if it is already wrapped, or :data:`ENV_SWITCH` is "0"."""
    if os.environ.get(ENV_SWITCH) == "0":
        return False
    if _RENDEZVOUS in sys.modules:
        return install()
    if not any(isinstance(finder, _InstallAfterImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _InstallAfterImport())
    return True
