"""The layout of one run's rendezvous directory, and its safe creation.

``<root>/<run_id>[.attempt-<a>]/``::

    state.json          the shared state; replaced atomically (write temp + rename), never edited
    state.json.tmp      scratch of the lock holder (a dead writer's leftover is harmless)
    state.lock          flock'd around every read-modify-write; never written, never deleted
    hb/<node>           heartbeat counter of one node; exactly one writer (that node)
    stores/r<N>-<tok>   torch FileStore of round N (token random per round); never deleted while
                        the run lives, because deleting a live FileStore file makes readers hang

Only this module joins path strings; everything else asks a :class:`RunLayout`.
"""

from __future__ import annotations

import errno
import os
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .errors import SharedFSConfigError

DIR_MODE = 0o700
FILE_MODE = 0o600


@dataclass(frozen=True)
class RunLayout:
    """Paths of one run (and attempt). Creating the object touches nothing on disk."""

    root: Path
    name: str

    def __post_init__(self) -> None:
        # Settings validated the name already; this guard keeps any other caller from building a
        # layout that escapes the root.
        if not self.name or "/" in self.name or "\0" in self.name or self.name in {".", ".."}:
            raise SharedFSConfigError(f"{self.name!r} cannot name a directory under the root.")
        object.__setattr__(self, "root", Path(self.root))

    @property
    def run_dir(self) -> Path:
        return self.root / self.name

    @property
    def state(self) -> Path:
        return self.run_dir / "state.json"

    @property
    def state_tmp(self) -> Path:
        return self.run_dir / "state.json.tmp"

    @property
    def lock(self) -> Path:
        return self.run_dir / "state.lock"

    @property
    def heartbeats(self) -> Path:
        return self.run_dir / "hb"

    def heartbeat(self, node: str) -> Path:
        return self.heartbeats / node

    @property
    def stores(self) -> Path:
        return self.run_dir / "stores"

    def store(self, round_: int, token: str) -> Path:
        return self.stores / f"r{round_}-{token}"

    def create(self) -> None:
        """Create the run directory tree (mode 0700) and prove that it is writable.

        Fails with one clear paragraph instead of a traceback deep in torch when the root is
        missing, read-only, or not a directory.
        """
        root = self.root
        if not root.exists():
            try:
                root.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
            except OSError as exc:
                raise _unusable(root, exc) from exc
        if not root.is_dir():
            raise SharedFSConfigError(
                f"The rendezvous endpoint {str(root)!r} exists but is not a directory. Pass a "
                "directory on a filesystem every node mounts (torchrun: --rdzv-endpoint=/path)."
            )
        for path in (self.run_dir, self.heartbeats, self.stores):
            try:
                path.mkdir(mode=DIR_MODE, exist_ok=True)
            except OSError as exc:
                raise _unusable(path, exc) from exc
            if path.is_symlink() or not stat.S_ISDIR(path.lstat().st_mode):
                raise SharedFSConfigError(
                    f"{str(path)!r} is not a plain directory (a symlink or a file is in the "
                    "way). Remove it or choose another run id."
                )
        try:
            fd, probe = tempfile.mkstemp(prefix=".probe-", dir=self.run_dir)
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            raise _unusable(self.run_dir, exc) from exc


def _unusable(path: Path, exc: OSError) -> SharedFSConfigError:
    reason = os.strerror(exc.errno) if exc.errno else str(exc)
    hint = ""
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        hint = " The current user cannot write there (or the filesystem is read-only)."
    return SharedFSConfigError(
        f"The rendezvous directory {str(path)!r} cannot be used: {reason}.{hint} The rendezvous "
        "endpoint must be a writable directory on a filesystem that every node mounts at the "
        "same path (torchrun: --rdzv-endpoint=/shared/dir; hpc_elastic: the job directory)."
    )
