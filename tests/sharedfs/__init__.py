"""K independent GlusterFS clients of one volume, without Slurm -- for shared-filesystem tests.

A real shared filesystem has several *clients* that cache and lock independently; one local
disk has one. This module gives a test K real GlusterFS FUSE clients of one volume, each in its
own "node" (a network namespace on a private bridge and a mount namespace of its own), all
mounted at the **same path**, plus one more client for the test process itself at that path:

    from sharedfs import SharedFS

    def test_three_agents(sharedfs_clients):             # fixture, tests/conftest.py
        fs = sharedfs_clients(3, "coherent")             # or "cached" (Gluster's defaults)
        fs.path                                          # a fresh directory on the volume
        (fs.path / "x").write_text("seen by all")        # through the test's own client
        fs.run(0, ["cat", str(fs.path / "x")])           # CompletedProcess, on node 0's client
        p = fs.popen(1, [sys.executable, "agent.py", "--root", str(fs.path)])  # a Popen
        fs.cmd(2, ["python", ...])                       # the argv that runs it on node 2
        fs.kill_client(1); fs.remount(1)                 # SIGKILL node 1's FUSE client / new one
        fs.partition(2); fs.heal(2)                      # silently drop node 2's traffic / heal
        fs.slow(2, "1mbit"); fs.slow(2, "off")           # token bucket on node 2's link

* Commands run on node ``i`` enter only its **mount** namespace (``nsenter --mount``): they
  see node i's client at ``fs.path`` and keep the machine's network, so processes on different
  nodes still reach each other on 127.0.0.1 (c10d stores, TCP). Only the FUSE client itself
  lives in the node's network namespace, so ``partition(i)`` cuts exactly node i's client off
  the file server.
* Profiles: ``cached`` = Gluster 10.3's defaults (rename-over seen by another client after
  up to ~1 s, ``ESTALE`` on open right after a rename); ``coherent`` = performance translators
  off and the FUSE client with ``--attribute-timeout=0 --entry-timeout=0 --negative-timeout=0
  --fopen-keep-cache=off`` (every change visible at once). Both: server keepalive 3 s / 1 s x 3,
  tcp-user-timeout 6 s (a partitioned client loses its locks after ~5 s), network.ping-timeout
  10 s (default 42: a partitioned client's calls hang that long, unkillable, then fail).
* One server per pytest session (``SharedFS``: glusterd + both volumes in namespaces of their
  own, state under ``/tmp/hpce-sfs-<pid>``), started on first use, stopped at session end;
  each ``sharedfs_clients(...)`` call gets new nodes, removed after the test.
* Needs root, ``/dev/fuse`` and Debian's ``glusterfs-server glusterfs-client iproute2``
  (``tests/slurm_cluster/install-deps.sh``). Tests using it are marked ``sharedfs`` (and count
  as ``slurm`` tests: ``-m "not slurm"`` leaves them out). If the server cannot start, they
  error -- never a silent skip.

The shell side is ``tests/sharedfs/sharedfs.sh`` (also used by the Slurm test cluster).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

from pidfiles import live_pid_from

HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "sharedfs.sh"
PROFILES = ("cached", "coherent")


class SharedFSError(RuntimeError):
    """The file server or a client could not be set up."""


def _sh(state: Path, *args: str, timeout: float = 180) -> str:
    """Run ``sharedfs.sh CMD STATE ARGS...``; raises SharedFSError with its output."""
    cmd, *rest = args
    proc = subprocess.run(
        ["bash", str(SCRIPT), cmd, str(state), *rest],
        capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
    )
    if proc.returncode != 0:
        raise SharedFSError(
            f"sharedfs.sh {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-4000:]}"
        )
    return proc.stderr


class SharedFS:
    """A private GlusterFS server (volumes ``cached`` and ``coherent``) and its clients."""

    def __init__(self, state: Path | None = None) -> None:
        # short: brick and socket paths derive from it
        self.state = state or Path(f"/tmp/hpce-sfs-{os.getpid()}")
        self.start_seconds = 0.0
        self._host_mounts: set[str] = set()
        self._ids = itertools.count(1)

    def start(self) -> SharedFS:
        if os.geteuid() != 0:
            raise SharedFSError("the shared-filesystem tests need root (namespaces, FUSE)")
        if shutil.which("glusterd", path=os.environ.get("PATH", "") + ":/usr/sbin") is None:
            raise SharedFSError(
                "glusterd is missing: run tests/slurm_cluster/install-deps.sh "
                "(glusterfs-server glusterfs-client)"
            )
        t0 = time.monotonic()
        _sh(self.state, "up")
        # the test process's own clients, one per profile, all in namespace "login"
        _sh(self.state, "node", "login", "3")
        self.start_seconds = time.monotonic() - t0
        return self

    def mountpoint(self, profile: str) -> Path:
        """Where every node (and the test process) sees volume ``profile``."""
        if profile not in PROFILES:
            raise ValueError(f"profile {profile!r}: use one of {PROFILES}")
        return self.state / "mnt" / profile

    def host_mount(self, profile: str) -> Path:
        """Mount ``profile`` for the test process (once) and return its mount point."""
        mnt = self.mountpoint(profile)
        if profile not in self._host_mounts:
            _sh(self.state, "mount", "login", profile, str(mnt), "host")
            self._host_mounts.add(profile)
        return mnt

    def clients(self, k: int, profile: str = "coherent") -> Clients:
        """K new nodes, each with its own client of ``profile``, and a fresh directory."""
        if not 1 <= k <= 90:
            raise ValueError(f"k={k}: 1..90 nodes")
        mnt = self.host_mount(profile)
        path = mnt / f"t-{uuid.uuid4().hex[:12]}"
        path.mkdir()
        clients = Clients(self, profile, path, [])
        try:
            for _ in range(k):
                n = next(self._ids)
                name = f"c{n}"
                # addresses .10 and up; .2 is the server, .3 the test process's clients
                _sh(self.state, "node", name, str(10 + n % 240))
                clients.nodes.append(name)
                _sh(self.state, "mount", name, profile, str(mnt))
        except BaseException:
            clients.close()
            raise
        return clients

    def stop(self) -> None:
        """Every client, the server, every namespace and mount; the state directory."""
        _sh(self.state, "down", timeout=300)
        self._host_mounts.clear()
        shutil.rmtree(self.state, ignore_errors=True)


class Clients:
    """K nodes with a client each of one volume (see the module docstring)."""

    def __init__(self, fs: SharedFS, profile: str, path: Path, nodes: list[str]) -> None:
        self.fs = fs
        self.profile = profile
        self.path = path  # the same path on every node and for the test process
        self.nodes = nodes  # namespace names, "c1", "c2", ...

    @property
    def k(self) -> int:
        return len(self.nodes)

    def _mntns(self, i: int) -> Path:
        return self.fs.state / "ns" / f"{self.nodes[i]}.mnt"

    def cmd(self, i: int, args: Sequence[str | os.PathLike[str]]) -> list[str]:
        """The argv that runs ``args`` on node ``i`` (its mount namespace, our network)."""
        return ["nsenter", f"--mount={self._mntns(i)}", "--", *map(str, args)]

    def run(
        self, i: int, args: Sequence[str | os.PathLike[str]], **kw
    ) -> subprocess.CompletedProcess:
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        kw.setdefault("timeout", 60)
        return subprocess.run(self.cmd(i, args), **kw)

    def popen(self, i: int, args: Sequence[str | os.PathLike[str]], **kw) -> subprocess.Popen:
        return subprocess.Popen(self.cmd(i, args), **kw)

    def client_pid(self, i: int) -> int | None:
        """PID of node i's FUSE client process (None once it is gone)."""
        return live_pid_from(self.fs.state / "pids" / f"client-{self.nodes[i]}-{self.profile}.pid")

    def kill_client(self, i: int) -> None:
        """SIGKILL node i's FUSE client: its mount answers ENOTCONN until :meth:`remount`."""
        pid = self.client_pid(i)
        if pid is not None:
            os.kill(pid, 9)

    def remount(self, i: int) -> None:
        """A new client for node i (after :meth:`kill_client`); a no-op if it is fine."""
        mnt = str(self.fs.mountpoint(self.profile))
        _sh(self.fs.state, "mount", self.nodes[i], self.profile, mnt)

    def partition(self, i: int) -> None:
        """Silently drop every packet of node i's client (its bridge port disabled)."""
        _sh(self.fs.state, "partition", self.nodes[i])

    def heal(self, i: int) -> None:
        _sh(self.fs.state, "heal", self.nodes[i])

    def slow(self, i: int, rate: str) -> None:
        """Token-bucket node i's link to ``rate`` (e.g. ``"1mbit"``), or ``"off"``."""
        _sh(self.fs.state, "slow", self.nodes[i], rate)

    def close(self) -> None:
        """Remove the nodes (their clients, processes, namespaces); the directory stays."""
        for name in self.nodes:
            with contextlib.suppress(SharedFSError):
                _sh(self.fs.state, "rmnode", name)
        self.nodes.clear()
