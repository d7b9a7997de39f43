"""Batched joins: a joiner leaves a request file; whoever holds the state lock folds them all.

Why: with every join one commit under the state lock, a round of N joiners costs N commits one
after the other, and through a FUSE client each commit holds the lock for 25-700 ms (measured on
GlusterFS: 85-95 % of a 128-participant round, docs/benchmarks.md). Here a joiner creates
``requests/<node>`` and polls; the next lock holder -- any node, for any change -- folds *every*
pending request into the one version it commits and then removes the folded files, so N joins
cost a few commits. A joiner that finds the lock free takes it at once (and folds the others);
one that is not folded within a poll or two queues for the lock itself, so a request that no
holder ever sees (a lagging directory listing, a holder that crashed) only costs time.

A request is an immutable file committed like a state version: written and ``fsync``-ed under a
private ``O_EXCL|O_NOFOLLOW`` name, then ``link``-ed to its name, so a reader never sees half of
one. It is read like every file of the directory (``O_NOFOLLOW``, a regular file of this user
that others cannot write, at most ``MAX_BYTES``) and validated; a file that fails is removed by
the holder, with its reason logged and returned (:class:`Rejected`).

It names the round it was made for: a holder folds only requests for the round of the state it
read (a request of an older round is stale: removed unfolded) and never one of a node the state
lists as dead, so a request left behind by a holder that crashed between its commit and the
removal can never bring back a node declared dead since (a live node declared dead rejoins
through the lock, as before). The rules are in :func:`.protocol.fold`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from .layout import RunLayout
from .state import KEY_RE, TRANSIENT_READ, FsOps, is_endpoint, is_node_id, write_new

FORMAT = 1
#: A request is one short JSON line; anything longer is not ours.
MAX_BYTES = 4096
#: Request files a lock holder reads at once (see :meth:`RequestBox.scan`).
SCAN_THREADS = 16


@dataclass(frozen=True)
class JoinRequest:
    """What :func:`.protocol.join` needs to join ``node`` on its behalf."""

    node: str
    endpoint: str
    round: int  # the round of the state the joiner saw: folded only into that round
    leaving: int | None  # the round the joiner leaves (None: its first rendezvous)
    key: str | None = None  # the run key (Settings.run_key)

    def encode(self) -> bytes:
        body = {"format": FORMAT, "node": self.node, "endpoint": self.endpoint,
                "round": self.round, "leaving": self.leaving, "key": self.key}
        return (json.dumps(body, separators=(",", ":")) + "\n").encode()

    @classmethod
    def decode(cls, data: bytes, name: str) -> JoinRequest:
        """Parse and validate the contents of ``requests/<name>``; ``ValueError`` says why not."""
        if len(data) > MAX_BYTES or not data.endswith(b"\n") or data.count(b"\n") != 1:
            raise ValueError(f"not one JSON line of at most {MAX_BYTES} bytes")
        try:
            raw: Any = json.loads(data)
        except json.JSONDecodeError as exc:
            raise ValueError(f"not JSON ({exc.msg})") from None
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            found = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
            raise ValueError(f"unknown format {found!r}")
        node, endpoint, round_ = raw.get("node"), raw.get("endpoint"), raw.get("round")
        leaving, key = raw.get("leaving"), raw.get("key")
        if node != name or not is_node_id(node):
            raise ValueError(f"node {node!r} is not the file's name {name!r}")
        if not is_endpoint(endpoint):
            raise ValueError(f"endpoint {endpoint!r} is not host:port")
        if not _is_count(round_):
            raise ValueError(f"round {round_!r} is not a count")
        if leaving is not None and not _is_count(leaving):
            raise ValueError(f"leaving {leaving!r} is not a round")
        if key is not None and not (isinstance(key, str) and KEY_RE.match(key)):
            raise ValueError(f"key {key!r}")
        return cls(node=node, endpoint=endpoint, round=round_, leaving=leaving, key=key)


@dataclass(frozen=True)
class Found:
    """A valid request file as read: ``ident`` (device, inode) lets the holder remove exactly
    the file it folded, not a newer request its node put in its place meanwhile."""

    request: JoinRequest
    path: str
    ident: tuple[int, int]


@dataclass(frozen=True)
class Rejected:
    """A file in ``requests/`` that is not a valid request, and why (one sentence)."""

    path: str
    reason: str
    ident: tuple[int, int] | None


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


class RequestBox:
    """The ``requests/`` directory of one run, seen from one node."""

    def __init__(self, layout: RunLayout, sync: bool, ops: FsOps | None = None) -> None:
        self.layout = layout
        self.sync = sync
        self.ops = ops or FsOps()

    # ---------------------------------------------------------------------------- the joiner
    def submit(self, request: JoinRequest) -> None:
        """Commit ``request`` as ``requests/<node>`` (replacing an older one of this node).

        Raises :class:`~.errors.FencedError` when the write is not durable (like a state
        commit) and ``OSError`` when the directory cannot be written; the caller then joins
        through the lock."""
        target = self.layout.request(request.node)
        self.ops.opens += 1
        self.ops.writes += 1
        tmp = write_new(self.layout.requests, request.encode(), self.sync)
        try:
            for _ in range(3):
                self.ops.renames += 1
                try:
                    os.link(tmp, target)
                    return
                except FileExistsError:
                    # Our own earlier request (folded but not removed yet, or stale): only this
                    # node ever creates this name, so replacing it takes nothing from anyone.
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(target)
            raise FileExistsError(errno.EEXIST, "request keeps reappearing", str(target))
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)

    def withdraw(self, node: str) -> None:
        """Remove this node's own request, if still there (best effort)."""
        with contextlib.suppress(OSError):
            os.unlink(self.layout.request(node))

    # ---------------------------------------------------------------------------- the holder
    def scan(self) -> tuple[list[Found], list[Rejected]]:
        """Every request file there now: valid ones (sorted by node) and rejected ones.

        A file that is unreadable for a moment (``ESTALE``/``ENOENT`` through a caching
        client, or its node replacing it) is left for the next holder: neither list."""
        self.ops.opens += 1
        try:
            names = sorted(os.listdir(self.layout.requests))
        except OSError as exc:
            if exc.errno in TRANSIENT_READ:
                return [], []
            raise
        names = [n for n in names if not n.startswith(".")]  # .tmp-*: a writer's scratch
        found: list[Found] = []
        rejected: list[Rejected] = []
        # Read in parallel: each read is a few round trips to the server, and with the
        # client's caches off 128 requests read one after the other took 16 s on an
        # overloaded machine (benchmarks/profile_round.py coherent 128).
        workers = min(SCAN_THREADS, len(names))
        if workers > 1:
            with ThreadPoolExecutor(workers, thread_name_prefix="sharedfs-scan") as pool:
                outcomes = list(pool.map(self._outcome, names))
        else:
            outcomes = [self._outcome(name) for name in names]
        for outcome in outcomes:
            if isinstance(outcome, Found):
                found.append(outcome)
            elif isinstance(outcome, Rejected):
                rejected.append(outcome)
        return found, rejected

    def _outcome(self, name: str) -> Found | Rejected | None:
        """One request file read and judged (``None``: unreadable for now)."""
        path = os.path.join(self.layout.requests, name)
        try:
            return self._read(path, name)
        except _Transient:
            return None
        except _Invalid as bad:
            return Rejected(path, bad.reason, bad.ident)

    def _read(self, path: str, name: str) -> Found:
        self.ops.opens += 1
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise _Invalid("it is a symbolic link (never followed)", None) from None
            if exc.errno in TRANSIENT_READ:
                raise _Transient from None
            raise _Invalid(f"it cannot be opened ({os.strerror(exc.errno or 0)})", None) from None
        try:
            info = os.fstat(fd)
            ident = (info.st_dev, info.st_ino)
            if not stat.S_ISREG(info.st_mode):
                raise _Invalid("it is not a regular file", ident)
            if info.st_uid != os.geteuid():
                raise _Invalid(f"it belongs to uid {info.st_uid}, not to this user "
                               f"(uid {os.geteuid()})", ident)
            if info.st_mode & 0o022:
                raise _Invalid(f"others can write it (mode {oct(info.st_mode & 0o777)})", ident)
            try:
                data = os.read(fd, MAX_BYTES + 1)
            except OSError as exc:
                if exc.errno in TRANSIENT_READ:
                    raise _Transient from None
                raise
            self.ops.reads += 1
            try:
                request = JoinRequest.decode(data, name)
            except ValueError as exc:
                raise _Invalid(f"its contents are not a join request: {exc}", ident) from None
            return Found(request, path, ident)
        finally:
            os.close(fd)

    def remove(self, path: str, ident: tuple[int, int] | None) -> None:
        """Remove a folded, stale or rejected request -- only if it is still the file that was
        read (``ident``), so a newer request of the same node survives."""
        try:
            if ident is not None:
                info = os.lstat(path)
                if (info.st_dev, info.st_ino) != ident:
                    return
            os.unlink(path)
        except OSError:
            pass


class _Transient(Exception):
    """Unreadable for now: look again at the next transaction."""


class _Invalid(Exception):
    def __init__(self, reason: str, ident: tuple[int, int] | None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.ident = ident


def rejection_message(item: Rejected) -> str:
    """The one paragraph logged (and emitted as an event) for a rejected request file."""
    return (
        f"The join request file {item.path!r} was rejected and removed: {item.reason}. Only "
        "sharedfs rendezvous nodes of this user write there; another program or user wrote "
        "into the rendezvous directory. Keep the directory private (mode 0700); a real node "
        "whose request was removed still joins through the state lock."
    )
