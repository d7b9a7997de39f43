"""A caching, flaky filesystem client, emulated in one process: the faults GlusterFS's default
profile (and NFS's attribute cache) show, injected where the rendezvous reads its state.

* ``open`` of a state file fails with ``ESTALE`` (or ``ENOENT``) now and then;
* ``read`` returns few bytes at a time (short reads);
* a listing of ``versions/`` is served from a cache that refreshes only now and then, and
  ``lexists`` of a new version answers "no" now and then (a lagging lookup cache);
* the ``state.json`` hint is read from a cached, older copy now and then.

Only paths inside a rendezvous run's ``versions/`` or ``stores/`` directories or named
``state.json`` are affected, never the lock file or heartbeats. :func:`install` patches ``os``
of this process; call it in a forked child (or undo with the returned function).
"""

from __future__ import annotations

import errno
import os
import random
import tempfile
from collections.abc import Callable


def _stateish(path: object) -> bool:
    text = os.fspath(path) if isinstance(path, (str, os.PathLike)) else ""
    return "/versions" in text or "/stores/" in text or text.endswith("state.json")


def install(seed: int, estale: float = 0.2, stale_listing: float = 0.7, miss_next: float = 0.5,
            short_reads: bool = True, stale_hint: float = 0.5) -> Callable[[], None]:
    rng = random.Random(seed)
    real = {name: getattr(os, name) for name in ("open", "read", "listdir")}
    real_lexists = os.path.lexists
    listing_cache: dict[str, list[str]] = {}
    hint_cache: dict[str, str] = {}
    stateish_fds: set[int] = set()

    def open_(path, flags, *args, **kwargs):
        if _stateish(path) and not flags & (os.O_WRONLY | os.O_RDWR):
            if rng.random() < estale:
                raise OSError(rng.choice([errno.ESTALE, errno.ESTALE, errno.ENOENT]),
                              "injected", os.fspath(path))
            text = os.fspath(path)
            if text.endswith("state.json") and text in hint_cache and rng.random() < stale_hint:
                return real["open"](hint_cache[text], os.O_RDONLY)  # the cached, older copy
            fd = real["open"](path, flags, *args, **kwargs)
            stateish_fds.add(fd)
            if text.endswith("state.json") and text not in hint_cache:
                copy = tempfile.NamedTemporaryFile(delete=False, prefix="stale-hint-")  # noqa: SIM115
                copy.write(os.pread(fd, 1 << 20, 0))
                copy.close()
                hint_cache[text] = copy.name
            return fd
        return real["open"](path, flags, *args, **kwargs)

    def read_(fd, n):
        if short_reads and fd in stateish_fds:
            n = min(n, rng.randint(1, 7))
        return real["read"](fd, n)

    def listdir_(path="."):
        text = os.fspath(path)
        if text.endswith("/versions") or "/stores/" in text:
            if text not in listing_cache or rng.random() > stale_listing:
                listing_cache[text] = real["listdir"](path)
            return list(listing_cache[text])
        return real["listdir"](path)

    def lexists_(path):
        if _stateish(path) and rng.random() < miss_next:
            return False
        return real_lexists(path)

    real_close = os.close

    def close_(fd):
        stateish_fds.discard(fd)
        return real_close(fd)

    os.open, os.read, os.listdir, os.close = open_, read_, listdir_, close_
    os.path.lexists = lexists_

    def undo() -> None:
        os.open, os.read, os.listdir = real["open"], real["read"], real["listdir"]
        os.close = real_close
        os.path.lexists = real_lexists

    return undo
