"""Honest mutual exclusion on a shared filesystem: ``flock`` or a clear error, never a fallback.

Rules this module enforces, and why:

* The lock is a dedicated ``.lock`` file that is never read, written or deleted. On NFS, flock is
  emulated with POSIX record locks, which the kernel drops when the process closes *any*
  descriptor of the file; so nothing but this module may ever open that path.
* Inside one process, holders are serialized by a ``threading.Lock`` before the flock is taken.
  POSIX locks are per process, so two threads (or two handlers in one agent) would otherwise both
  "own" the NFS lock, and one thread's close would release the other's lock.
* ``filelock.UnixFileLock`` is used with ``fallback_to_soft=False``: recent filelock versions
  silently switch to a marker file on ``ENOSYS``; a SIGKILLed holder then leaves the marker behind
  and the whole job stalls. A filesystem without flock is reported by :func:`probe_flock` with
  the mount option to fix.
* A holder that dies (even SIGKILL) releases its flock with its last descriptor, so the state is
  never locked forever. (Exception: NFS keeps a crashed *client's* lock until its lease expires,
  typically 90 s; ``lock_timeout`` must exceed that.)
"""

from __future__ import annotations

import errno
import inspect
import os
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import filelock

from .errors import LockingUnsupportedError, SharedFSRendezvousError

#: errnos that mean "this filesystem does not do flock at all" (as opposed to "held elsewhere").
NO_LOCK_ERRNOS = frozenset(
    {errno.ENOSYS, errno.EOPNOTSUPP, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP), errno.ENOLCK}
)

_HAS_FALLBACK_FLAG = "fallback_to_soft" in inspect.signature(filelock.UnixFileLock).parameters


class LockTimeoutError(SharedFSRendezvousError):
    """The state lock could not be taken in time (a stuck client or an overloaded filesystem)."""


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
    import fcntl

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
    """

    _instances: dict[tuple[int, str], ProcessFileLock] = {}
    _instances_guard = threading.Lock()

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._mutex = threading.Lock()
        kwargs: dict[str, object] = {"thread_local": False, "mode": 0o600}
        if _HAS_FALLBACK_FLAG:
            kwargs["fallback_to_soft"] = False
        self._file_lock = filelock.UnixFileLock(str(self.path), **kwargs)
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
        try:
            self._acquire_file_lock(deadline, timeout)
            self.acquisitions += 1
            self.wait_seconds += time.monotonic() - start
            try:
                yield
            finally:
                self._file_lock.release()
        finally:
            self._mutex.release()

    def _acquire_file_lock(self, deadline: float, timeout: float) -> None:
        pause = 0.0005
        while True:
            try:
                self._file_lock.acquire(blocking=False)
            except filelock.Timeout:
                pass
            except OSError as exc:
                if exc.errno in NO_LOCK_ERRNOS:
                    raise LockingUnsupportedError(
                        unsupported_message(self.path.parent, exc)
                    ) from exc
                raise
            else:
                if not isinstance(self._file_lock, filelock.UnixFileLock):  # pragma: no cover
                    # Defensive: a filelock version that swapped classes behind our back.
                    self._file_lock.release()
                    raise LockingUnsupportedError(
                        unsupported_message(self.path.parent, OSError(errno.ENOSYS, "flock"))
                    )
                return
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
