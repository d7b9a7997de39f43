"""The agents' per-round key-value store, kept as immutable files in the shared directory.

torch's agent needs a ``Store`` from the rendezvous: it assigns worker ranks through it
(``set``/``multi_get``/``get``) and runs its exit barrier on it (``add``/``wait``). It used to be
a ``torch.distributed.FileStore``: one file that every agent appends to and re-reads under a
lock. On a filesystem whose clients cache file *contents* (GlusterFS's default profile; NFS
between two opens), a reader may see the file's old contents or its old size through its own
client, so a key another node set stays invisible: measured on GlusterFS 10.3 with its default
caches, three ``torchrun`` agents on three clients hung in ``_assign_worker_ranks`` for 180 s
(rank 0 waiting for the others' role info, the others for their assigned ranks).

Here every value is its own file, written under a private name, ``fsync``-ed, and then given
its final name with ``link`` (exactly as the rendezvous state, :mod:`.state`): a file is complete
before its name exists and never changes, so whatever a client caches of it is right, and the
only question a cache can delay is "does this name exist yet", which is answered by name
lookups plus, while waiting, a directory listing (``opendir`` revalidates the directory on
NFS). A key ``k`` set ``n`` times has the files ``<name(k)>.<1..n>``; the newest one holds its
value. ``add`` and ``compare_set`` commit version ``n+1`` with ``link``, so two nodes that race
for it cannot both win (``EEXIST``: re-read and retry): no increment of the exit barrier is lost.

One store is a directory ``stores/r<round>-<token>/``, fresh for each round; nothing is deleted
while the run lives.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import time
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist

from .layout import check_own_dir, make_dir_here, settled
from .state import TRANSIENT_READ, read_owned, write_new

_VERSION_DIGITS = 8
_NAME_RE = re.compile(r"^([0-9a-fh][0-9a-f]*)\.([0-9]{8})$")
#: While waiting for a key: poll by name every ``_POLL_MIN`` s (growing x1.5 up to
#: ``_POLL_MAX``), and list the directory at least every ``_LIST_EVERY`` s.
_POLL_MIN, _POLL_MAX, _LIST_EVERY = 0.005, 0.1, 1.0


def key_name(key: str) -> str:
    """A file name for ``key`` (any string): its UTF-8 bytes in hex, or ``h`` + a SHA-256 when
    that would be too long. Never a path, never a leading dot (scratch files start with one)."""
    raw = key.encode()
    if len(raw) <= 100:
        return raw.hex() or "h"
    return "h" + hashlib.sha256(raw).hexdigest()


def _as_bytes(value: str | bytes | bytearray | list[int]) -> bytes:
    if isinstance(value, str):
        return value.encode()
    return bytes(value)


class SharedDirStore(dist.Store):
    """A ``torch.distributed.Store`` in one directory of a shared filesystem (see module doc)."""

    def __init__(self, directory: Path, sync: bool = True,
                 timeout: timedelta = timedelta(seconds=300)) -> None:
        super().__init__()
        self.directory = Path(directory)
        self.sync = sync
        # Every member makes the round's store at once, each through its own client: a caching
        # one may answer "exists" to mkdir and then "no such file" to the stat for a moment
        # (seen on GlusterFS 'cached' in the goodput benchmark: an agent ended there).
        settled(lambda: make_dir_here(self.directory), self.directory)
        check_own_dir(self.directory)
        self.set_timeout(timeout)
        #: newest version seen per file name: lookups start there, never go back
        self._seen: dict[str, int] = {}

    # ------------------------------------------------------------------------------- reading
    def _path(self, name: str, version: int) -> Path:
        return self.directory / f"{name}.{version:0{_VERSION_DIGITS}d}"

    def _newest(self, name: str) -> int:
        """The newest version of ``name`` this client can see by name (0: none)."""
        version = self._seen.get(name, 0)
        while os.path.lexists(self._path(name, version + 1)):
            version += 1
        self._seen[name] = version
        return version

    def _listed(self) -> None:
        """Learn every name's newest version from a listing (a lookup cache may lag)."""
        for entry in os.listdir(self.directory):
            match = _NAME_RE.match(entry)
            if match:
                name, version = match.group(1), int(match.group(2))
                if version > self._seen.get(name, 0):
                    self._seen[name] = version

    def _read(self, name: str, version: int) -> bytes:
        """Version ``version`` of ``name``, which exists; transient errors are retried."""
        path = self._path(name, version)
        for attempt in range(12):
            try:
                return read_owned(path)
            except OSError as exc:
                if exc.errno not in TRANSIENT_READ or attempt == 11:
                    raise
            time.sleep(min(0.002 * 2 ** attempt, 0.25))
        raise AssertionError("unreachable")

    def _current(self, name: str) -> tuple[int, bytes | None]:
        version = self._newest(name)
        return version, (self._read(name, version) if version else None)

    def _wait_for(self, keys: list[str], timeout: timedelta | None) -> None:
        names = [key_name(k) for k in keys]
        limit = (self.timeout if timeout is None else timeout).total_seconds()
        deadline = time.monotonic() + limit if limit > 0 else float("inf")
        pause, listed_at = _POLL_MIN, time.monotonic()
        while True:
            missing = [n for n in names if self._newest(n) == 0]
            if not missing:
                return
            now = time.monotonic()
            if now - listed_at >= _LIST_EVERY:
                self._listed()
                listed_at = now
                missing = [n for n in missing if self._seen.get(n, 0) == 0]
                if not missing:
                    return
            if now >= deadline:
                late = [k for k, n in zip(keys, names, strict=True) if n in missing]
                raise dist.DistStoreError(
                    f"Timed out after {limit:g} s waiting for {len(late)} key(s) ("
                    f"{', '.join(map(repr, late[:3]))}) in the rendezvous store "
                    f"{str(self.directory)!r}: another node did not get there (it may have "
                    "died; its agent's log says why)."
                )
            time.sleep(min(pause, max(0.0, deadline - now)))
            pause = min(pause * 1.5, _POLL_MAX)

    # --------------------------------------------------------------------------- the Store API
    def get(self, key: str) -> bytes:
        self._wait_for([key], None)
        _, value = self._current(key_name(key))
        assert value is not None
        return value

    def check(self, keys: list[str]) -> bool:
        return all(self._newest(key_name(k)) > 0 for k in keys)

    def wait(self, keys: list[str], timeout: timedelta | None = None) -> None:
        self._wait_for(list(keys), timeout)

    def set(self, key: str, value: str | bytes) -> None:
        self._update(key_name(key), lambda _old: _as_bytes(value))

    def add(self, key: str, amount: int) -> int:
        result = 0

        def change(old: bytes | None) -> bytes:
            nonlocal result
            result = int(old or b"0") + int(amount)
            return str(result).encode()

        self._update(key_name(key), change)
        return result

    def compare_set(self, key: str, expected: str | bytes, desired: str | bytes) -> bytes:
        expected_b, desired_b = _as_bytes(expected), _as_bytes(desired)
        outcome = b""

        def change(old: bytes | None) -> bytes | None:
            nonlocal outcome
            if (old is None and expected_b == b"") or old == expected_b:
                outcome = desired_b
                return desired_b
            outcome = expected_b if old is None else old
            return None

        self._update(key_name(key), change)
        return outcome

    def multi_get(self, keys: list[str]) -> list[bytes]:
        self._wait_for(list(keys), None)
        return [self._current(key_name(k))[1] or b"" for k in keys]

    def multi_set(self, keys: list[str], values: list[str | bytes]) -> None:
        for key, value in zip(keys, values, strict=True):
            self.set(key, value)

    def num_keys(self) -> int:
        self._listed()
        return sum(1 for v in self._seen.values() if v > 0)

    def _update(self, name: str, change) -> None:
        """Commit ``change(current value)`` as the next version of ``name`` (``None``: keep);
        another node that committed that version first makes us re-read and apply it again."""
        deadline = time.monotonic() + max(self.timeout.total_seconds(), 1.0)
        while True:
            version, old = self._current(name)
            new = change(old)
            if new is None:
                return
            tmp = write_new(self.directory, new, self.sync)
            try:
                os.link(tmp, self._path(name, version + 1))
                self._seen[name] = version + 1
                return
            except FileExistsError:
                # NFS may answer a retransmitted, successful link with EEXIST: the link count.
                if os.stat(tmp).st_nlink >= 2:
                    self._seen[name] = version + 1
                    return
                self._seen[name] = max(self._seen.get(name, 0), version + 1)
            except OSError as exc:
                if exc.errno not in TRANSIENT_READ or time.monotonic() > deadline:
                    raise
            finally:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
            if time.monotonic() > deadline:
                raise dist.DistStoreError(
                    f"Could not update key {name!r} in the rendezvous store "
                    f"{str(self.directory)!r}: other nodes kept committing first."
                )


__all__ = ["SharedDirStore", "key_name"]
