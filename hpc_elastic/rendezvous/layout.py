"""The layout of one run's rendezvous directory, and its safe creation.

``<root>/<run_id>[.attempt-<a>]/``::

    versions/<v>        version v of the shared state (12 digits); immutable, committed by link
    versions/.tmp-<r>   a writer's scratch (random name, O_EXCL); a dead writer's is harmless
    state.json          polling hint: a second name of a recent version, renamed over each time
    state.lock          flock'd around every read-modify-write; never written, never deleted
    hb/<node>           heartbeat counter of one node; exactly one writer (that node)
    requests/<node>     a join request of one node (batched joins, .requests); immutable,
                        committed by link, removed once a lock holder folded it into a version
    stores/r<N>-<tok>/  the agents' store of round N (token random per round; .store): one
                        immutable file per value, committed by link; never deleted while the
                        run lives

Only this module joins path strings; everything else asks a :class:`RunLayout`.
"""

from __future__ import annotations

import errno
import os
import stat
import tempfile
import time
from collections.abc import Callable
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
    def versions(self) -> Path:
        return self.run_dir / "versions"

    def version(self, number: int) -> Path:
        return self.versions / f"{number:012d}"

    @property
    def lock(self) -> Path:
        return self.run_dir / "state.lock"

    @property
    def heartbeats(self) -> Path:
        return self.run_dir / "hb"

    def heartbeat(self, node: str) -> Path:
        return self.heartbeats / node

    @property
    def requests(self) -> Path:
        return self.run_dir / "requests"

    def request(self, node: str) -> Path:
        return self.requests / node

    @property
    def stores(self) -> Path:
        return self.run_dir / "stores"

    def store(self, round_: int, token: str) -> Path:
        return self.stores / f"r{round_}-{token}"

    def create(self) -> None:
        """Create the run directory tree (mode 0700), check it is ours, prove it is writable.

        Fails with one clear paragraph instead of a traceback deep in torch when the root is
        missing, read-only, or not a directory -- and when a directory of the run exists but
        belongs to someone else or others can write it: run ids are predictable, and another
        user who pre-created the directory could plant symlinks or forge the state.
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
        check_root(root)
        for path in (self.run_dir, self.heartbeats, self.stores, self.versions, self.requests):
            settled(lambda path=path: make_dir_here(path), path)
            check_own_dir(path)

        def probe() -> None:
            fd, name = tempfile.mkstemp(prefix=".probe-", dir=self.run_dir)
            os.close(fd)
            os.unlink(name)

        settled(probe, self.run_dir)


#: How long :func:`settled` retries what a caching client of a shared filesystem answers wrongly
#: for a moment. GlusterFS with its default caches showed a directory made through another
#: mount 4-1000 ms late (docs/rendezvous.md); all nodes create the run's directories at once.
SETTLE_S = 5.0
#: "No such file" for a directory another node just made (a stale negative entry), "exists" from
#: mkdir but then "not a directory" from the stat that ``exist_ok`` does, a stale handle.
UNSETTLED = frozenset({errno.ENOENT, errno.EEXIST, errno.ESTALE})


def settled(action: Callable[[], None], path: Path, settle_s: float | None = None) -> None:
    """Run ``action`` (a mkdir, a probe write) until it works, retrying errors a caching client
    gives for a directory that another node created a moment ago; anything else, or the same
    error for longer than ``SETTLE_S``, is the one-paragraph :class:`SharedFSConfigError`.

    Seen in the Slurm test suite on the ``cached`` profile: two of three agents failed at
    start with "the rendezvous directory .../hb cannot be used: No such file or directory"."""
    deadline = time.monotonic() + (SETTLE_S if settle_s is None else settle_s)
    delay = 0.01
    while True:
        try:
            action()
            return
        except OSError as exc:
            if exc.errno not in UNSETTLED or time.monotonic() >= deadline:
                raise _unusable(path, exc) from exc
        time.sleep(delay)
        delay = min(delay * 2, 0.25)


def make_dir_here(path: Path) -> None:
    """mkdir (mode 0700) that also sees the directory through this client afterwards."""
    path.mkdir(mode=DIR_MODE, exist_ok=True)
    os.lstat(path)  # what check_own_dir reads next: it must be visible here too


#: Filesystems whose every reader is on this machine: a write is visible to all of them at once,
#: and fsync would only add durability across a crash of the machine, which ends every "node"
#: of such a run anyway. Anything else (nfs, fuse.glusterfs, lustre, gpfs, ceph, ...) is shared.
LOCAL_FS = frozenset({"ext2", "ext3", "ext4", "xfs", "btrfs", "tmpfs", "ramfs", "overlay",
                      "zfs", "f2fs", "jfs", "reiserfs"})


def is_local_fs(path: Path) -> bool:
    """Whether ``path`` lies on a filesystem of this machine only (from /proc/self/mounts).

    Decides whether writes are ``fsync``ed: on a shared filesystem the fsync result is what
    tells a client that lost its server (fencing); on local disk it costs ~6 ms per write for
    nothing. Unknown: treated as shared (the safe side)."""
    try:
        target = os.path.realpath(path)
        best, kind = "", ""
        with open("/proc/self/mounts", encoding="utf-8", errors="replace") as mounts:
            for line in mounts:
                fields = line.split()
                if len(fields) < 3:
                    continue
                point = fields[1].replace("\\040", " ")
                inside = target == point or target.startswith(point.rstrip("/") + "/")
                if inside and len(point) >= len(best):
                    best, kind = point, fields[2]
        return kind in LOCAL_FS
    except OSError:
        return False


def check_own_dir(path: Path) -> None:
    """Refuse a directory of the run that is a symlink, not ours, or writable by others."""
    try:
        info = os.lstat(path)
    except OSError as exc:
        raise _unusable(path, exc) from exc
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        raise SharedFSConfigError(
            f"{str(path)!r} is not a plain directory (a symlink or a file is in the way). "
            "Remove it or choose another run id."
        )
    if info.st_uid != os.geteuid():
        raise SharedFSConfigError(
            f"The rendezvous directory {str(path)!r} belongs to {_user(info.st_uid)}, not to "
            f"this user ({_user(os.geteuid())}): someone else created it, and could have "
            "planted links or forged state in it. It is not used. Choose another run id "
            "(torchrun --rdzv-id) or rendezvous directory, and let the owner remove it."
        )
    if info.st_mode & 0o022:
        raise SharedFSConfigError(
            f"The rendezvous directory {str(path)!r} has mode {oct(info.st_mode & 0o7777)}: "
            "other users can write into it, and could plant links or forge the state. It is not "
            f"used. If you made it so on purpose, 'chmod 700 {path}'; otherwise remove it, or "
            "choose another run id."
        )


def check_root(root: Path) -> None:
    """The endpoint may be shared (e.g. a project directory), but not a free-for-all.

    Another user who can write the root without the sticky bit could rename our run directory
    away and put their own in its place, so such a root is refused; a sticky one (like /tmp)
    is fine, because there only the owner of an entry may move or remove it."""
    info = os.stat(root)
    if info.st_mode & 0o022 and not info.st_mode & stat.S_ISVTX:
        raise SharedFSConfigError(
            f"The rendezvous endpoint {str(root)!r} has mode {oct(info.st_mode & 0o7777)}: "
            "other users can write into it without the sticky bit, so they could replace a "
            "run's directory. Use a directory only you can write (its run directories are "
            "created 0700), or set the sticky bit on the shared one (chmod +t)."
        )


def _user(uid: int) -> str:
    try:
        import pwd

        return f"user {pwd.getpwuid(uid).pw_name!r} (uid {uid})"
    except (KeyError, ImportError):
        return f"uid {uid}"


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
