"""Liveness without comparing clocks: heartbeat *counters* judged by the reader's own clock.

Each node owns one file, ``hb/<node>``, and rewrites it in place with an ever-increasing counter
every ``heartbeat_interval``. No other process writes it (one writer per file), nothing is
appended, and no timestamp is written at all.

A reader remembers, per watched node, the last counter value it saw and the moment *on its own
monotonic clock* when it last saw that value change. A node is dead for that reader when its
counter has not changed for ``heartbeat_timeout``. Clock skew between nodes therefore cannot make
a live node look dead or a dead node look alive; wall-clock jumps (NTP) cannot either. mtime is
never consulted (NFS attribute caching and client clocks make it unreliable).

Consequences, documented in ``docs/rendezvous.md``: a reader that starts watching a node needs a
full ``heartbeat_timeout`` before it can call it dead; a torn read of a half-written counter can
only look like progress, and only a live writer writes, so it can never make a dead node look
alive.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import SharedFSRendezvousError
from .layout import FILE_MODE
from .state import FsOps, read_owned

_WIDTH = 20


class HeartbeatWriter:
    """Advances this node's counter. Only the owning node ever creates an instance for a file."""

    def __init__(self, path: Path, ops: FsOps, sync: bool = True) -> None:
        self.path = path
        self.ops = ops
        self.counter = 0
        #: fsync each beat (on a shared filesystem: a failed fsync is how a client that lost
        #: its server finds out; see layout.is_local_fs).
        self.sync = sync

    def beat(self) -> None:
        """Write the next counter value and make it durable; raise ``OSError`` if it is not.

        ``fsync`` (and ``close``) are checked because a network filesystem client that lost
        its server still lets ``write`` succeed: only they tell that the others will not see
        this beat. The caller keeps the time of the last durable beat (fencing)."""
        self.counter += 1
        data = f"{self.counter:0{_WIDTH}d}\n".encode()
        self.ops.opens += 1
        self.ops.writes += 1
        # In place, no O_TRUNC: the width never changes, so a reader sees old or new digits.
        # O_NOFOLLOW: a symlink planted at our name is refused, never written through.
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                     FILE_MODE)
        try:
            os.pwrite(fd, data, 0)
            if self.sync:
                os.fsync(fd)
        finally:
            os.close(fd)  # close() is what publishes the write to other NFS clients


class _Unknown:
    """A heartbeat that could not be read this time."""


UNKNOWN = _Unknown()


@dataclass
class _Seen:
    value: bytes | None
    changed_at: float


class LivenessObserver:
    """Judges watched nodes alive or dead from how their counters move, by our clock only."""

    def __init__(self, heartbeat_dir: Path, timeout: float, ops: FsOps) -> None:
        self.dir = heartbeat_dir
        self.timeout = timeout
        self.ops = ops
        self._seen: dict[str, _Seen] = {}

    def read(self, node: str) -> bytes | None | _Unknown:
        """The counter of ``node`` as bytes, ``None`` if it has none, or ``UNKNOWN``."""
        self.ops.opens += 1
        try:
            data = read_owned(self.dir / node, limit=64)
            self.ops.reads += 1
            return data
        except FileNotFoundError:
            return None
        except (OSError, SharedFSRendezvousError):
            # ESTALE, a reconnecting client, a foreign file: we cannot tell, so this read
            # neither proves progress nor counts as silence.
            return UNKNOWN

    def observe(self, nodes: list[str], now: float | None = None) -> dict[str, float]:
        """Read the counters of ``nodes``; return ``{node: silent_seconds}`` for the dead ones.

        Nodes not passed are forgotten, so a node that comes back later is watched afresh.
        """
        if now is None:
            now = time.monotonic()
        dead: dict[str, float] = {}
        watched = set(nodes)
        for gone in [n for n in self._seen if n not in watched]:
            del self._seen[gone]
        for node in nodes:
            value = self.read(node)
            if value is UNKNOWN:
                continue
            seen = self._seen.get(node)
            if seen is None:
                self._seen[node] = _Seen(value, now)
                continue
            if value != seen.value:
                seen.value = value
                seen.changed_at = now
                continue
            silent = now - seen.changed_at
            if silent >= self.timeout:
                dead[node] = silent
        return dead


def watch_set(members: list[str], me: str, fanout: int) -> list[str]:
    """The nodes ``me`` watches: the ``fanout`` members after it on a ring of sorted members.

    Every node is watched by ``fanout`` others, so watching costs O(fanout) reads per node per
    interval instead of O(N) (at 512 nodes that is the difference between ~4k and ~260k file
    reads per interval on the metadata server). When a watched node is declared dead it leaves
    the ring, and the ring closes over it, so the nodes behind it get new watchers.
    A node that is not a member (yet) watches nobody.
    """
    ring = sorted(set(members) | {me})
    if me not in members or len(ring) <= 1:
        return []
    i = ring.index(me)
    count = min(fanout, len(ring) - 1)
    return [ring[(i + k) % len(ring)] for k in range(1, count + 1)]
