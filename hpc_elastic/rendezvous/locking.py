"""Honest mutual exclusion on a shared filesystem: ``flock`` or a clear error, never a fallback.

Rules this module enforces, and why:

* The lock is a dedicated ``.lock`` file that is never read, written or deleted. On NFS, flock is
  emulated with POSIX record locks, which the kernel drops when the process closes *any*
  descriptor of the file; so nothing but this module may ever open that path.
* Inside one process, holders are serialized by a ``threading.Lock`` before the flock is taken.
  POSIX locks are per process, so two threads (or two handlers in one agent) would otherwise both
  "own" the NFS lock, and one thread's close would release the other's lock.
* ``fcntl.flock`` directly, not the ``filelock`` package (no longer a dependency of ours; torch
  still installs it): its ``UnixFileLock`` (4.x) falls back to a marker file where flock is
  missing -- a SIGKILLed holder then leaves the marker behind and the whole job stalls -- it
  waits by polling a non-blocking flock (each try a server round trip that the holder needs
  too; measured slower on GlusterFS, docs/benchmarks.md), and it opens and closes the lock
  file on each acquire, which the per-process mutex below must control on NFS. A filesystem
  without flock is reported by :func:`probe_flock` with the mount option to fix.
* A holder that dies (even SIGKILL) releases its flock with its last descriptor, so the state is
  never locked forever. (Exception: NFS keeps a crashed *client's* lock until its lease expires,
  typically 90 s; ``lock_timeout`` must exceed that.)
"""

from __future__ import annotations

import errno
import fcntl
import os
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from .errors import LockingUnsupportedError, SharedFSRendezvousError

#: errnos that mean "this filesystem does not do flock at all" (as opposed to "held elsewhere").
NO_LOCK_ERRNOS = frozenset(
    {errno.ENOSYS, errno.EOPNOTSUPP, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP), errno.ENOLCK}
)

class LockTimeoutError(SharedFSRendezvousError):
    """The state lock could not be taken in time (a stuck client or an overloaded filesystem)."""


class _StillQueued(Exception):
    """A queued lock request timed out; its helper thread keeps the process's mutex."""


class _InterruptedWhileQueued(BaseException):
    """The wait for a queued lock was interrupted by an exception -- torch's agent turns
    SIGTERM into one in the main thread -- and the helper thread keeps the process's mutex.
    Carries the interrupting exception, which :meth:`ProcessFileLock.hold` raises again."""

    def __init__(self, original: BaseException) -> None:
        super().__init__(str(original))
        self.original = original


def unsupported_message(directory: Path | str, exc: OSError) -> str:
    """One paragraph naming the errno, the mount option and the alternative."""
    name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
    return (
        f"The filesystem holding the rendezvous directory {str(directory)!r} does not support "
        f"flock ({name}: {os.strerror(exc.errno or 0)}), which the sharedfs rendezvous needs for "
        "its compare-and-set of the shared state. On Lustre, mount the clients with '-o flock' "
        "(not '-o localflock', which only locks within one node and is unsafe across nodes); on "
        "NFS, do not mount with 'nolock' or 'local_lock=...' and make sure NFS locking (lockd, or "
        "NFSv4) works; or move the rendezvous directory (torchrun --rdzv-endpoint, or the "
        "hpc_elastic job directory) to a filesystem with working locks. The backend never falls "
        "back to marker-file locks, because a killed holder would leave a stale lock behind."
    )


def probe_flock(directory: Path) -> None:
    """Take and drop an flock on a private scratch file; raise if the filesystem refuses.

    A scratch file (not the real lock file) is used so that the probe never opens or closes a
    descriptor of a lock another thread of this process may hold.
    """
    probe = Path(directory) / f".flock-probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    fd = os.open(probe, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
    except OSError as exc:
        if exc.errno in NO_LOCK_ERRNOS:
            raise LockingUnsupportedError(unsupported_message(directory, exc)) from exc
        raise
    finally:
        os.close(fd)
        with suppress(OSError):
            os.unlink(probe)


class ProcessFileLock:
    """An exclusive lock on one lock file, shared by every thread of this process.

    Obtain it with :meth:`for_path` (one instance per path and process), then
    ``with lock.hold(timeout): ...``.

    A free lock is taken with one non-blocking ``flock``. A lock held elsewhere is *waited for
    in the server's queue* (a blocking ``flock`` in a helper thread), not polled: on a network
    filesystem each poll is a round trip to the server that the holder needs too, and a polling
    waiter learns of the release late. The server hands the lock to the
    next waiter as soon as it is released. If the wait times out, the helper keeps this
    process's mutex until its queued request is granted (and dropped) or fails, so that a late
    grant can never release another holder's POSIX lock (NFS).
    """

    _instances: dict[tuple[int, str], ProcessFileLock] = {}
    _instances_guard = threading.Lock()

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._mutex = threading.Lock()
        #: How often the lock was taken and how long it was waited for (for benchmarks).
        self.acquisitions = 0
        self.wait_seconds = 0.0

    @classmethod
    def for_path(cls, path: Path) -> ProcessFileLock:
        key = (os.getpid(), os.path.abspath(path))
        with cls._instances_guard:
            lock = cls._instances.get(key)
            if lock is None:
                lock = cls._instances[key] = cls(Path(path))
            return lock

    @contextmanager
    def hold(self, timeout: float) -> Iterator[None]:
        """Hold the lock for the body; raise :class:`LockTimeoutError` after ``timeout`` s."""
        start = time.monotonic()
        deadline = start + timeout
        if not self._mutex.acquire(timeout=max(timeout, 0.0)):
            raise LockTimeoutError(self._timeout_message(timeout))
        handed_over = False
        try:
            try:
                fd = self._acquire_file_lock(deadline, timeout)
            except _StillQueued:
                handed_over = True  # the helper thread releases the mutex
                raise LockTimeoutError(self._timeout_message(timeout)) from None
            except _InterruptedWhileQueued as interrupted:
                handed_over = True  # likewise
                raise interrupted.original from None
            self.acquisitions += 1
            self.wait_seconds += time.monotonic() - start
            try:
                yield
            finally:
                _unlock(fd)
        finally:
            if not handed_over:
                self._mutex.release()

    @contextmanager
    def try_hold(self) -> Iterator[bool]:
        """Hold the lock for the body if it is free right now (yields True), else yield False
        at once. For batched joins: a joiner that finds the lock taken leaves its request to
        the holder instead of queueing behind it (see :mod:`.requests`)."""
        if not self._mutex.acquire(blocking=False):
            yield False
            return
        try:
            fd = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno in NO_LOCK_ERRNOS:
                    raise LockingUnsupportedError(
                        unsupported_message(self.path.parent, exc)) from exc
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                yield False
                return
            self.acquisitions += 1
            try:
                yield True
            finally:
                _unlock(fd)
        finally:
            self._mutex.release()

    def _open(self) -> int:
        # Only this module opens the lock file (NFS: closing any descriptor drops the lock).
        return open_or_create(self.path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)

    def _acquire_file_lock(self, deadline: float, timeout: float) -> int:
        """The locked descriptor. :class:`_StillQueued` when the wait timed out: the helper
        thread then owns this process's mutex (the caller must not release it)."""
        fd = self._open()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except OSError as exc:
            if exc.errno in NO_LOCK_ERRNOS:
                os.close(fd)
                raise LockingUnsupportedError(unsupported_message(self.path.parent, exc)) from exc
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                os.close(fd)
                raise
        # Held elsewhere: queue on the server.
        granted = threading.Event()
        outcome: dict[str, object] = {}
        guard = threading.Lock()

        def wait_in_queue() -> None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError as exc:
                outcome["error"] = exc
            with guard:
                if not outcome.get("abandoned"):
                    granted.set()
                    return
            # The caller gave up: drop what we got, then free the process's mutex.
            _unlock(fd, locked="error" not in outcome)
            self._mutex.release()

        threading.Thread(target=wait_in_queue, name="sharedfs-lock-wait", daemon=True).start()
        try:
            granted.wait(max(0.0, deadline - time.monotonic()))
        except BaseException as exc:
            # Interrupted (SIGTERM raised by torch's handler, Ctrl-C): the queued request must
            # not be granted later and then held by nobody until this process exits -- that
            # would stop every node's rendezvous. Hand it to the helper, or drop a grant.
            with guard:
                if not granted.is_set():
                    outcome["abandoned"] = True
                    raise _InterruptedWhileQueued(exc) from exc
            _unlock(fd, locked="error" not in outcome)
            raise
        with guard:
            if not granted.is_set():
                outcome["abandoned"] = True
                raise _StillQueued
        error = outcome.get("error")
        if isinstance(error, OSError):
            os.close(fd)
            if error.errno in NO_LOCK_ERRNOS:
                raise LockingUnsupportedError(unsupported_message(self.path.parent, error))
            return self._poll_file_lock(deadline, timeout)
        return fd

    def _poll_file_lock(self, deadline: float, timeout: float) -> int:
        """Fallback when a queued wait failed (e.g. EINTR, a reconnecting client): try without
        waiting until the deadline."""
        pause = 0.0005
        while True:
            fd = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return fd
            except OSError as exc:
                os.close(fd)
                if exc.errno in NO_LOCK_ERRNOS:
                    raise LockingUnsupportedError(
                        unsupported_message(self.path.parent, exc)) from exc
            now = time.monotonic()
            if now >= deadline:
                raise LockTimeoutError(self._timeout_message(timeout))
            time.sleep(min(pause, deadline - now))
            pause = min(pause * 2, 0.01)

    def _timeout_message(self, timeout: float) -> str:
        return (
            f"Could not take the rendezvous state lock {str(self.path)!r} within {timeout:.0f} s. "
            "Another node holds it: either the shared filesystem is stalled, or a node crashed "
            "while holding it and its NFS lock lease has not expired yet. Raise lock_timeout "
            "(--rdzv-conf lock_timeout=SECONDS) above the NFS lease time if this repeats."
        )


def _unlock(fd: int, locked: bool = True) -> None:
    """Release and close (closing alone would release too; unlocking first says so)."""
    try:
        if locked:
            with suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        with suppress(OSError):
            os.close(fd)


#: Tries of an open that creates a file another client may be creating at the same moment.
CREATE_TRIES = 5


def open_or_create(path: Path, flags: int, mode: int) -> int:
    """``os.open(path, flags | O_CREAT, mode)`` for a file that other nodes may be creating at the
    same moment (the lock file: every node of a first round opens it at once).

    POSIX says that ``O_CREAT`` without ``O_EXCL`` opens the file if it exists. A FUSE client
    does it as a lookup and then a create, and GlusterFS fails the create with ``EEXIST`` when
    another client created the file in between (measured: in a 16-agent first rendezvous over
    3 GlusterFS clients one agent ended with ``FileExistsError`` on ``state.lock``). The file
    exists then, so the next try's lookup finds it; the last try opens without ``O_CREAT``."""
    for _ in range(CREATE_TRIES - 1):
        try:
            return os.open(path, flags | os.O_CREAT, mode)
        except FileExistsError:
            continue
    return os.open(path, flags & ~os.O_CREAT, mode)
