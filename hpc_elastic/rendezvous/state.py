"""The shared rendezvous state and its storage: immutable numbered versions, committed by link.

File format of one version (two JSON lines, so that pollers can stop after the first):

    {"format": 1, "v": 12, "round": 3, "phase": "complete", "closed": false, "token": "9f2c...",
     "key": "slurm-4711", "n": 3, "nw": 0, "nd": 0}
    {"participants": [...], "waiting": [...], "expected": [...], "prev": [...], "dead": [...],
     "endpoints": {...}}

Why versions and ``link``, not "read state.json under the lock, rename a new one over it": on a
filesystem whose clients cache (GlusterFS by default: a rename-over is seen 4-1000 ms late through
another client, an ``open`` may hit ``ESTALE``, small files' contents are cached), a lock holder
can read an *old* ``state.json`` and write its change over a newer one: a lost update. Locks and
exclusive creates, in contrast, are decided by the server on every POSIX filesystem we know.
So a change to version ``v`` is committed by ``link(tmp, versions/<v+1>)``: the server lets
exactly one writer create that name; a writer whose view was stale gets ``EEXIST``, reads what
won, and applies its change again. A version file is complete before its name exists (written,
``fsync``-ed and closed under a private name first) and never changes afterwards, so a cached
copy of it is never wrong, only possibly not the newest -- and the newest is found by name
(``versions/<v+1>`` exists?) rather than through any cached attribute. See
``docs/rendezvous.md`` ("Consistency on caching filesystems") for NFS, Lustre and GPFS.

The lock (``state.lock``) still serializes writers, so that 512 joining nodes queue instead of
racing; correctness does not depend on it, which matters when a partitioned client lost its lock
on the server without knowing (its ``fsync`` fails: :class:`FencedError`, nothing is committed).

``state.json`` is a *hint* for cheap polling: after each commit the writer renames its version
file's second name over it. Pollers read its first line, never trust a version lower than one
they saw already, and also look for ``versions/<seen+1>`` so a lagging hint cannot hide a change.

Everything read from the shared directory is validated (:meth:`State.decode`): node ids and the
store token are names, never paths; endpoints are ``host:port``; files must belong to this user.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .errors import FencedError, StateCorruptError, StateUnavailableError
from .events import logger
from .layout import FILE_MODE, RunLayout, is_local_fs
from .locking import ProcessFileLock

JOINING = "joining"
COMPLETE = "complete"
FORMAT = 1
#: Dead declarations kept in the state (oldest dropped first); only recent ones matter.
MAX_DEAD = 1024
#: Version files kept behind the newest one; older ones are removed every ``GC_EVERY`` commits.
KEEP_VERSIONS = 256
GC_EVERY = 64
#: errnos of a read that a caching or reconnecting client may return for a file that exists:
#: retried (bounded), never fatal.
TRANSIENT_READ = frozenset({errno.ESTALE, errno.ENOENT, errno.EINTR, errno.EIO, errno.ENOTCONN,
                            errno.EAGAIN})
#: Read attempts of one file before a reader gives up for this poll (about 1 s in all).
READ_RETRIES = 12

NODE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
TOKEN_RE = re.compile(r"^[0-9a-f]{1,64}$")
KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")
_HOST_RE = re.compile(r"^[A-Za-z0-9._:%\[\]-]{1,253}$")
_VERSION_NAME = re.compile(r"^[0-9]{12}$")


def new_token() -> str:
    """A random name part: makes every round's store file unique, even across crashed runs."""
    return secrets.token_hex(6)


def is_node_id(value: object) -> bool:
    """Node ids become file names (``hb/<node>``): a name, never a path."""
    return isinstance(value, str) and bool(NODE_RE.match(value)) and ".." not in value


def is_endpoint(value: object) -> bool:
    """``host:port`` as a node publishes it about itself (host: name, IPv4 or IPv6)."""
    if not isinstance(value, str):
        return False
    host, sep, port = value.rpartition(":")
    return bool(sep and _HOST_RE.match(host) and port.isdigit() and 0 < int(port) < 65536)


@dataclass
class Head:
    """The first line of a state version: cheap to read on every poll."""

    version: int
    round: int
    phase: str
    closed: bool
    token: str
    n: int  # participants of the current round
    nw: int  # nodes waiting for the next round
    nd: int  # participants of the current round declared dead
    key: str | None = None  # which run owns this run id (see Settings.run_key)


@dataclass
class State:
    """The whole shared state of one run (one attempt).

    ``participants`` is in join order while the round is ``joining`` and in rank order once it is
    ``complete``. ``expected`` is who a re-formed round waits for (live members of the previous
    round and nodes that were waiting); once all of them have joined, the round completes without
    waiting for the last-call window.
    """

    version: int = 0
    round: int = 0
    phase: str = JOINING
    closed: bool = False
    token: str = field(default_factory=new_token)
    participants: list[str] = field(default_factory=list)
    waiting: list[str] = field(default_factory=list)
    expected: list[str] = field(default_factory=list)
    prev: list[str] = field(default_factory=list)
    dead: list[str] = field(default_factory=list)
    endpoints: dict[str, str] = field(default_factory=dict)
    key: str | None = None

    def head(self) -> Head:
        dead = set(self.dead)
        return Head(
            version=self.version,
            round=self.round,
            phase=self.phase,
            closed=self.closed,
            token=self.token,
            n=len(self.participants),
            nw=len(self.waiting),
            nd=sum(1 for p in self.participants if p in dead),
            key=self.key,
        )

    def copy(self) -> State:
        """An independent copy (lists and the endpoint map copied; their items are strings).
        Not ``deepcopy``: at 512 nodes that took 9 ms per copy and dominated each join."""
        return State(version=self.version, round=self.round, phase=self.phase,
                     closed=self.closed, token=self.token, participants=list(self.participants),
                     waiting=list(self.waiting), expected=list(self.expected),
                     prev=list(self.prev), dead=list(self.dead), endpoints=dict(self.endpoints),
                     key=self.key)

    def encode(self) -> bytes:
        head = self.head()
        first = {
            "format": FORMAT,
            "v": head.version,
            "round": head.round,
            "phase": head.phase,
            "closed": head.closed,
            "token": head.token,
            "key": head.key,
            "n": head.n,
            "nw": head.nw,
            "nd": head.nd,
        }
        body = {
            "participants": self.participants,
            "waiting": self.waiting,
            "expected": self.expected,
            "prev": self.prev,
            "dead": self.dead[-MAX_DEAD:],
            "endpoints": self.endpoints,
        }
        sep = (",", ":")
        lines = (json.dumps(first, separators=sep), json.dumps(body, separators=sep))
        return ("\n".join(lines) + "\n").encode()

    @classmethod
    def decode(cls, data: bytes, where: str) -> State:
        """Parse and validate one version; anything unexpected is :class:`StateCorruptError`."""
        try:
            lines = data.split(b"\n")
            if len(lines) != 3 or lines[2]:
                raise ValueError("not two complete lines")
            head = _decode_head(lines[0], where)
            body = json.loads(lines[1])
            if not isinstance(body, dict):
                raise TypeError("the second line is not an object")
            names = {k: _node_list(body[k], k) for k in
                     ("participants", "waiting", "expected", "prev", "dead")}
            if len(set(names["participants"])) != len(names["participants"]):
                raise ValueError("a participant is listed twice")
            endpoints = body["endpoints"]
            if not isinstance(endpoints, dict):
                raise TypeError("endpoints is not an object")
            for node, endpoint in endpoints.items():
                if node not in names["participants"] or not is_endpoint(endpoint):
                    raise ValueError(f"endpoint {node!r}: {endpoint!r} is not a participant's "
                                     "host:port")
            if (head.n, head.nw) != (len(names["participants"]), len(names["waiting"])):
                raise ValueError("the counts of the first line do not match the second")
            return cls(version=head.version, round=head.round, phase=head.phase,
                       closed=head.closed, token=head.token, key=head.key,
                       endpoints=dict(endpoints), **names)
        except StateCorruptError:
            raise
        except (ValueError, KeyError, TypeError) as exc:
            raise _corrupt(where, exc) from exc


def _node_list(value: Any, key: str) -> list[str]:
    if not isinstance(value, list) or not all(is_node_id(v) for v in value):
        raise ValueError(f"{key} holds something that is not a node id")
    return list(value)


def _decode_head(line: bytes, where: str) -> Head:
    try:
        raw: dict[str, Any] = json.loads(line)
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            found = raw.get("format") if isinstance(raw, dict) else raw
            raise ValueError(f"unknown format {found!r}")
        head = Head(
            version=_count(raw["v"], "v"),
            round=_count(raw["round"], "round"),
            phase=raw["phase"],
            closed=raw["closed"],
            token=raw["token"],
            n=_count(raw["n"], "n"),
            nw=_count(raw["nw"], "nw"),
            nd=_count(raw["nd"], "nd"),
            key=raw.get("key"),
        )
        if head.phase not in (JOINING, COMPLETE) or not isinstance(head.closed, bool):
            raise ValueError(f"phase {head.phase!r} / closed {head.closed!r}")
        if not isinstance(head.token, str) or not TOKEN_RE.match(head.token):
            raise ValueError(f"token {head.token!r} is not a name of hex digits")
        if head.key is not None and not (isinstance(head.key, str) and KEY_RE.match(head.key)):
            raise ValueError(f"key {head.key!r}")
        return head
    except (ValueError, KeyError, TypeError) as exc:
        raise _corrupt(where, exc) from exc


def _count(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{key}={value!r} is not a count")
    return value


def _corrupt(where: str, exc: Exception) -> StateCorruptError:
    return StateCorruptError(
        f"The rendezvous state file {where!r} is not a valid sharedfs state ({exc}). Another "
        "program (or another hpc_elastic version, or another user) wrote it. Use a new run id, "
        "pass an attempt (--rdzv-conf attempt=N), or delete that run directory when no job "
        "uses it."
    )


class FsOps:
    """Counts filesystem operations, so the benchmark can report them per participant."""

    __slots__ = ("reads", "writes", "renames", "locks", "opens", "retries")

    def __init__(self) -> None:
        self.reads = self.writes = self.renames = self.locks = self.opens = self.retries = 0

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}

    def total(self) -> int:
        return self.opens + self.renames + self.locks


def read_owned(path: os.PathLike | str, first_line_only: bool = False,
               limit: int = 64 << 20) -> bytes:
    """Read a file of the rendezvous directory through a fresh descriptor, to its end.

    ``O_NOFOLLOW``: a symlink planted at one of our names is refused, never followed; the file
    must be a regular file owned by this user (another user's file cannot forge state or a
    heartbeat). Short reads are continued until end of file. ``OSError`` is left to the caller,
    which decides what is transient.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid():
            raise StateCorruptError(
                f"{os.fspath(path)!r} is not a regular file owned by this user (uid "
                f"{info.st_uid}, mode {oct(info.st_mode)}): someone else wrote into the "
                "rendezvous directory. Use a directory only you can write (mode 0700)."
            )
        chunks: list[bytes] = []
        size = 0
        while size < limit:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
            if first_line_only and b"\n" in chunk:
                break
        data = b"".join(chunks)
        if first_line_only:
            line, nl, _ = data.partition(b"\n")
            return line + nl
        return data
    finally:
        os.close(fd)


def write_new(directory: os.PathLike | str, data: bytes, sync: bool = True,
              prefix: str = ".tmp-") -> str:
    """Create a private file with an unpredictable name (``O_EXCL|O_NOFOLLOW``), write ``data``,
    ``fsync`` (if ``sync``) and close it, checking both; return its path.

    A failed ``fsync`` or ``close`` is what a client that lost its connection to the server (and
    with it, on GlusterFS, its locks) sees while its ``write`` still "succeeded": raised as
    :class:`FencedError`, after removing the file, so nothing half-written is ever committed.
    """
    path = os.path.join(os.fspath(directory), f"{prefix}{secrets.token_hex(8)}")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 FILE_MODE)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        _unlink(path)
        raise FencedError(fenced_message(path, exc)) from exc
    return path


def fenced_message(path: str, exc: OSError) -> str:
    name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
    return (
        f"This node could not make a write to the shared rendezvous directory durable ({name} "
        f"on {path!r}: {exc.strerror or exc}). On a network filesystem this means the client "
        "lost its connection to the server -- and possibly its lock, which another node may "
        "hold now -- so it must not go on as a member of its old group: it stops its workers "
        "and leaves. Check the network and the filesystem client of this node; if this "
        "repeats without a real outage, raise heartbeat_timeout."
    )


class StateFile:
    """Compare-and-set storage of :class:`State` (versions committed by ``link``)."""

    def __init__(self, layout: RunLayout, lock_timeout: float, ops: FsOps | None = None) -> None:
        self.layout = layout
        self.lock_timeout = lock_timeout
        self.ops = ops or FsOps()
        self._lock = ProcessFileLock.for_path(layout.lock)
        #: The newest version this object has seen (read or written): never go below it.
        self._known: State | None = None
        #: The newest version number seen in any head (the hint): ``read`` returns no older one.
        self._floor = 0
        self._head: Head | None = None  # the newest head returned
        #: fsync each version before it counts (on a shared filesystem; see layout.is_local_fs).
        self.sync = not is_local_fs(layout.root)

    @property
    def last_head(self) -> Head | None:
        """The newest head seen so far (no file access)."""
        return self._head

    # -------------------------------------------------------------------------------- reading
    def read_head(self) -> Head | None:
        """The newest head this node can see; ``None`` before anyone wrote the state.

        Cheap: the first line of the ``state.json`` hint, plus one ``lstat`` for the version
        after the newest seen (a caching client may show an old hint for a while). A head older
        than one seen before is ignored: a reader's view never goes back.
        """
        candidates = [self._head, self._read_hint()]
        if self._known is not None:
            candidates.append(self._known.head())
        best = max((h for h in candidates if h is not None), key=lambda h: h.version,
                   default=None)
        if best is not None:
            self._floor = max(self._floor, best.version)
            self._head = best
        newest = (best.version if best is not None else 0) + 1
        self.ops.opens += 1
        if not os.path.lexists(self.layout.version(newest)):
            return best
        # The hint lags (a caching client): find the newest version by name and read only its
        # first line -- parsing bodies on every poll would cost O(N^2) while N nodes join.
        for _ in range(8):
            self.ops.opens += 1
            if not os.path.lexists(self.layout.version(newest + 1)):
                break
            newest += 1
        else:
            newest = max(newest, self._newest_name())
        head = self._load_head(newest)
        if head is None:
            return best
        self._floor = max(self._floor, head.version)
        self._head = head
        return head

    def _load_head(self, version: int) -> Head | None:
        """The first line of version ``version`` (``None`` if unreadable for now)."""
        path = self.layout.version(version)
        for attempt in range(3):
            self.ops.opens += 1
            try:
                line = read_owned(path, first_line_only=True)
                self.ops.reads += 1
            except OSError as exc:
                if exc.errno not in TRANSIENT_READ:
                    raise
                self._pause(attempt)
                continue
            if line.endswith(b"\n"):
                head = _decode_head(line, str(path))
                if head.version == version:
                    return head
            self._pause(attempt)
        return None

    def read(self, at_least: int = 0) -> State | None:
        """The newest committed version (``None`` if there is none yet), read from its file.

        The candidate is the newest number this node knows (its own, the ``state.json`` hint's,
        or the listing of ``versions/`` when it knows none); the next numbers are then looked up
        by name, so a hint or listing that lags cannot hide a newer version. ``at_least``: a
        version known to exist (a writer lost the race for it), read even if nothing shows it
        yet. Old versions are removed only 256 behind the newest, so a candidate that is merely
        stale still has its successor on disk (a writer never re-creates a removed name). Raises
        :class:`StateUnavailableError` when the newest version stays unreadable for ~1 s.
        """
        known = self._known
        at_least = max(at_least, self._floor)
        for attempt in range(READ_RETRIES):
            # Start from the newest number known without a listing (ours, the hint's, a lost
            # race's); list the directory only when there is none, or when that one is gone.
            hint = self._read_hint() if attempt == 0 else None
            start = max(at_least, known.version if known is not None else 0,
                        hint.version if hint is not None else 0)
            shortcut = attempt == 0 and hint is not None  # without a hint: list, always
            newest = start if shortcut else max(self._newest_name(), at_least)
            if known is not None and known.version >= newest:
                state: State | None = known
            elif newest == 0:
                return None
            else:
                state = self._load_version(newest, listed=attempt > 0)
                if state is None:
                    continue  # removed, or not readable through this client yet: list again
            assert state is not None
            while True:
                self.ops.opens += 1
                if not os.path.lexists(self.layout.version(state.version + 1)):
                    break
                following = self._load_version(state.version + 1, listed=True)
                if following is None:
                    break
                state = following
            self._remember(state)
            return state.copy()
        raise StateUnavailableError(
            f"The newest rendezvous state in {str(self.layout.versions)!r} stayed unreadable "
            f"through this node's filesystem client for {READ_RETRIES} tries."
        )

    def _newest_name(self) -> int:
        """The highest version number listed in ``versions/`` (0: none)."""
        self.ops.opens += 1
        for attempt in range(READ_RETRIES):
            try:
                names = os.listdir(self.layout.versions)
                break
            except OSError as exc:
                if exc.errno not in TRANSIENT_READ or attempt == READ_RETRIES - 1:
                    raise
                self._pause(attempt)
        numbers = [int(n) for n in names if _VERSION_NAME.match(n)]
        return max(numbers, default=0)

    def _load_version(self, version: int, listed: bool) -> State | None:
        """Version ``version``, or ``None`` if it does not exist (``listed``: it should, so
        ``ENOENT`` is retried like ``ESTALE`` before giving up)."""
        path = self.layout.version(version)
        for attempt in range(READ_RETRIES):
            self.ops.opens += 1
            try:
                data = read_owned(path)
                self.ops.reads += 1
            except FileNotFoundError:
                if not listed:
                    return None
                self._pause(attempt)
                continue
            except OSError as exc:
                if exc.errno not in TRANSIENT_READ:
                    raise
                self._pause(attempt)
                continue
            try:
                state = State.decode(data, str(path))
            except StateCorruptError:
                # A version is complete before its name exists: a partial one is a cache's
                # view (or a short read); look again, and give up only if it stays so.
                if attempt == READ_RETRIES - 1:
                    raise
                self._pause(attempt)
                continue
            if state.version != version:
                raise _corrupt(str(path), ValueError(f"it holds version {state.version}"))
            return state
        return None

    def _read_hint(self) -> Head | None:
        for attempt in range(3):
            self.ops.opens += 1
            try:
                line = read_owned(self.layout.state, first_line_only=True)
                self.ops.reads += 1
            except FileNotFoundError:
                return None
            except OSError as exc:
                if exc.errno not in TRANSIENT_READ:
                    raise
                self._pause(attempt)
                continue
            if not line.endswith(b"\n"):  # torn by a cache: look again
                self._pause(attempt)
                continue
            return _decode_head(line, str(self.layout.state))
        return None

    def _pause(self, attempt: int) -> None:
        self.ops.retries += 1
        time.sleep(min(0.002 * 2 ** attempt, 0.25))

    def _remember(self, state: State) -> None:
        if self._known is None or state.version > self._known.version:
            self._known = state.copy()

    # ------------------------------------------------------------------------------ writing
    def transact(self, change: Callable[[State], bool], timeout: float | None = None) -> State:
        """Read the newest state under the lock, let ``change`` edit it, commit if it said so.

        ``change`` returns True when it modified the state; the version is then bumped and the
        new version committed. If another writer committed that version first (possible only
        when this client's view was stale or its lock was lost), ``change`` is applied again to
        what won. The state after the transaction is returned (also when nothing changed).
        Raises :class:`FencedError` when a write could not be made durable.
        """
        limit = self.lock_timeout if timeout is None else timeout
        with self._lock.hold(limit):
            return self._locked(change, limit)

    def try_transact(self, change: Callable[[State], bool]) -> State | None:
        """:meth:`transact` if the lock is free right now; ``None`` (nothing done) if it is
        held: a batched joiner then leaves its join to the holder (see :mod:`.requests`)."""
        with self._lock.try_hold() as held:
            if not held:
                return None
            return self._locked(change, self.lock_timeout)

    def _locked(self, change: Callable[[State], bool], limit: float) -> State:
        self.ops.locks += 1
        deadline = time.monotonic() + max(limit, 1.0)
        lost = 0  # a version another writer committed while our view was older
        while True:
            try:
                current = self.read(at_least=lost) or State()
            except (StateUnavailableError, OSError) as exc:
                if isinstance(exc, OSError) and exc.errno not in TRANSIENT_READ:
                    raise
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
                continue
            work = current.copy()
            if not change(work):
                return work
            work.version = current.version + 1
            if self._commit(work):
                return work.copy()
            lost = work.version
            if time.monotonic() > deadline:
                raise FencedError(
                    f"Could not commit a change to the rendezvous state in "
                    f"{str(self.layout.versions)!r} within {limit:.0f} s: other writers "
                    "kept committing first although this node held the lock, so this "
                    "node's lock is not respected (lost on the server, or a filesystem "
                    "whose locks do not work across nodes, e.g. Lustre -o localflock)."
                )

    def compare_and_set(self, new: State, expected_version: int) -> tuple[bool, State]:
        """Write ``new`` only if the newest version is still ``expected_version``.

        ``expected_version`` 0 means "no state yet". Returns ``(written, current state)``; on
        success ``new.version`` becomes ``expected_version + 1``.
        """
        written = False

        def change(current: State) -> bool:
            nonlocal written
            written = current.version == expected_version
            if written:
                fresh = new.copy()
                fresh.version = expected_version
                current.__dict__.update(fresh.__dict__)
            return written

        state = self.transact(change)
        return written, state

    def _commit(self, state: State) -> bool:
        """Make ``state`` version ``state.version`` unless that version exists: True if ours."""
        versions = self.layout.versions
        target = self.layout.version(state.version)
        self.ops.opens += 1
        self.ops.writes += 1
        tmp = write_new(versions, state.encode(), self.sync)
        try:
            self.ops.renames += 1
            os.link(tmp, target)
        except FileExistsError:
            # NFS may answer a retransmitted, successful link with EEXIST: the link count says.
            if os.stat(tmp).st_nlink < 2:
                _unlink(tmp)
                return False
        except OSError as exc:
            logger.debug("link of state version %s failed: %s", state.version, exc)
            _unlink(tmp)
            loaded = self._load_version(state.version, listed=False)
            return loaded is not None and loaded.encode() == state.encode()
        self._remember(state)
        try:
            os.replace(tmp, self.layout.state)  # the polling hint: same inode as the version
        except OSError as exc:
            logger.debug("could not update the state hint: %s", exc)
            _unlink(tmp)
        if state.version % GC_EVERY == 0:
            self._collect(state.version)
        return True

    def _collect(self, newest: int) -> None:
        """Remove versions older than ``KEEP_VERSIONS`` behind ``newest`` (best effort)."""
        try:
            names = os.listdir(self.layout.versions)
        except OSError:
            return
        for name in names:
            if _VERSION_NAME.match(name) and int(name) < newest - KEEP_VERSIONS:
                _unlink(os.path.join(self.layout.versions, name))


def _unlink(path: str | os.PathLike) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)
