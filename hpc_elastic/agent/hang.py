"""Hang detection: a rank that stops making progress, stacks from every node, then a restart.

torch's agent watches worker *exits* only; a rank that is stopped, deadlocked or spinning (and
its peers, blocked in a collective waiting for it) would hold the allocation until the
collective's own timeout (gloo 30 min, NCCL 10 min), and without a trace of where it was.

Each worker rewrites its progress record (:mod:`hpc_elastic.worker.record`); the node's agent
reads its own ranks' records once a second from ``_monitor_workers`` and judges them on its own
monotonic clock. A rank whose count has not moved for ``hang_timeout`` seconds (counted from its
first report, so start-up and loading are never judged) is hung. Then, with no service of any
kind, only files in the shared directory:

1. The first agent to see a hung rank creates the round's marker
   ``<rendezvous run dir>/hangs/round-<r>.json`` with O_EXCL (one wins; a later one reads it).
2. Every agent of the round -- the others notice the marker within a second -- dumps every local
   rank's stacks to ``nodes/<node>/hangs/<stamp>/rank-<r>.txt`` (:mod:`.stacks`) and creates its
   acknowledgement ``round-<r>.<node>.ack``.
3. Each waits until all nodes of the round acknowledged (at most ``ACK_WAIT_S``), so no
   worker is stopped before every node's stacks are written; then it kills its workers (a
   stopped process would ignore torch's SIGTERM for the whole shutdown timeout) and reports the
   group FAILED, which torch turns into a restart like any failure.

Events: ``worker.hung`` per rank past the timeout (the cause, with its process state and CPU
use), ``hang.dumped`` per node (every dumped rank, the files, who detected it).
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from torch.distributed.elastic.agent.server.api import RunResult, WorkerGroup, WorkerState
from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

from hpc_elastic.agent import stacks
from hpc_elastic.jobdir import JobDir
from hpc_elastic.worker import record

ACK_WAIT_S = 10.0
# The least time a restarted group gets to reach its first step: measured on a loaded 2-core
# machine, a restarted worker spent over 20 s importing torch alone.
STARTUP_TIMEOUT_S = 600.0
HANG_EXIT_CODE = -9  # the failures' exit code: the hung workers are SIGKILLed


@dataclass
class _Rank:
    """What the agent knows of one local worker."""

    local_rank: int
    rank: int
    pid: int
    folder: Path
    n: int = -1
    changed: float = 0.0  # monotonic time the count last moved (or the watch began)
    cpu_at_change: float | None = None
    armed: bool = False
    startup: bool = False  # judged before its first step (startup_timeout)
    last: record.Progress | None = None


@dataclass
class Hang:
    """The round's hang, as its marker says."""

    stamp: str
    node: str
    time: float
    ranks: list[int] = field(default_factory=list)


class HangWatch:
    """One agent's watch over its current worker group (see the module docstring)."""

    def __init__(self, jobdir: JobDir, node: str, timeout: float,
                 record_event: Callable[..., None], ack_wait: float = ACK_WAIT_S,
                 startup_timeout: float | None = None) -> None:
        self.jobdir = jobdir
        self.node = node
        self.timeout = timeout
        self.startup_timeout = startup_timeout or max(2 * timeout, STARTUP_TIMEOUT_S)
        # Once this node's ranks have reported progress, later groups are judged from their
        # start (startup_timeout until the first step): a rank that hangs before its first step
        # after a restart is caught. A first group never is -- a script that reports no progress
        # at all must not be killed.
        self._reported = False
        self.interval = min(1.0, timeout / 4)
        self.ack_wait = ack_wait
        self._record = record_event
        self._ranks: list[_Rank] = []
        self._marker: Path | None = None
        self._nodes = 1
        self._next = 0.0
        self.last_hang: dict[str, Any] | None = None  # the last hang this node took part in

    # ------------------------------------------------------------------------------ set up
    def watch(self, worker_group: WorkerGroup, folders: dict[int, Path]) -> None:
        """Start watching a freshly started group (called after every start)."""
        now = time.monotonic()
        self._ranks = [
            _Rank(local_rank=w.local_rank, rank=w.global_rank, pid=int(w.id), folder=folders[
                w.local_rank], changed=now, startup=self._reported)
            for w in worker_group.workers
            if isinstance(w.id, int) and w.local_rank in folders]
        self._nodes = max(1, int(worker_group.group_world_size or 1))
        handler = worker_group.spec.rdzv_handler
        run_dir = getattr(handler, "run_dir", None)
        rnd = getattr(handler, "round", None)
        if run_dir is not None and rnd is not None:
            self._marker = Path(run_dir) / "hangs" / f"round-{rnd}.json"
        else:  # another rendezvous: a marker per node only (no stacks from the other nodes)
            self._marker = self.jobdir.node(self.node) / "hangs" / f"marker-{int(now)}.json"
        self._next = now + self.interval

    # ------------------------------------------------------------------------------ the check
    def check(self) -> RunResult | None:
        """Called from every ``_monitor_workers``: None while healthy, else the FAILED result
        (after the stacks are dumped and every node acknowledged)."""
        now = time.monotonic()
        if now < self._next or not self._ranks or self._marker is None:
            return None
        self._next = now + self.interval
        hang = self._read_marker()
        if hang is not None:
            return self._take_part(hang, detected=False)
        hung = []
        for r in self._ranks:
            p = record.read(r.folder / record.PROGRESS_FILE)
            if p is not None and p.pid == r.pid:
                r.last = p
                if p.n != r.n:
                    r.changed = now if r.n >= 0 or p.n > 0 else r.changed
                    r.n, r.armed = p.n, p.n > 0
                    r.cpu_at_change = stacks.proc_sample(r.pid).cpu_s
                if p.ended:
                    r.armed = False  # the script returned; torch sees the exit
            if r.armed:
                self._reported = True
                if now - r.changed >= self.timeout:
                    hung.append(r)
            elif r.startup and r.last is not None and not r.last.ended \
                    and now - r.changed >= self.startup_timeout:
                hung.append(r)
        if not hung:
            return None
        hang = self._claim(hung)
        return self._take_part(hang, detected=hang.node == self.node, hung=hung)

    def _read_marker(self) -> Hang | None:
        marker = self._marker
        assert marker is not None
        try:
            fd = os.open(marker, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            return None
        try:
            with os.fdopen(fd) as f:
                data = json.loads(f.read(65536))
            return Hang(stamp=_safe_stamp(data["stamp"]), node=str(data["node"]),
                        time=float(data["time"]), ranks=[int(x) for x in data.get("ranks", [])])
        except (OSError, ValueError, KeyError, TypeError):
            return None  # half written: read again at the next check

    def _claim(self, hung: list[_Rank]) -> Hang:
        """Create the round's marker; if another node was first, its marker wins."""
        marker = self._marker
        assert marker is not None
        now = time.time()
        stamp = datetime.fromtimestamp(now, timezone.utc).strftime("%Y%m%d-%H%M%S")
        hang = Hang(stamp=stamp, node=self.node, time=now, ranks=[r.rank for r in hung])
        try:
            marker.parent.mkdir(parents=True, exist_ok=True)
            tmp = marker.with_name(f"{marker.stem}.{self.node}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
            with os.fdopen(fd, "w") as f:
                json.dump({"stamp": stamp, "node": self.node, "time": now,
                           "ranks": hang.ranks}, f)
            os.link(tmp, marker)  # atomic and exclusive: fails if another node was first
            os.unlink(tmp)
            return hang
        except FileExistsError:
            os.unlink(tmp)
            other = self._read_marker()
            return other if other is not None else hang
        except OSError:
            return hang  # cannot write the shared directory: act alone

    # ------------------------------------------------------------------------------ the dump
    def _take_part(self, hang: Hang, detected: bool,
                   hung: list[_Rank] | None = None) -> RunResult:
        seen = time.monotonic()
        now = seen
        folder = self.jobdir.node(self.node) / "hangs" / hang.stamp
        with contextlib.suppress(OSError):
            folder.mkdir(parents=True, exist_ok=True)
        samples = {r.rank: stacks.proc_sample(r.pid) for r in self._ranks}
        infos: dict[int, dict[str, Any]] = {}
        for r in self._ranks:
            s = samples[r.rank]
            silent = now - r.changed
            cpu = None
            if s.cpu_s is not None and r.cpu_at_change is not None and silent > 0:
                cpu = round(100.0 * (s.cpu_s - r.cpu_at_change) / silent, 1)
            infos[r.rank] = {
                "node": self.node, "rank": r.rank, "local_rank": r.local_rank, "pid": r.pid,
                "state": s.state, "cpu_percent": cpu, "silent_s": round(silent, 1),
                "armed": r.armed, "n": r.n, "step": r.last.step if r.last else None,
                "step_time_s": r.last.step_time if r.last else None, "stamp": hang.stamp,
                "detected_by": hang.node, "worker_dir": str(r.folder)}
        files = self._dump_all(folder, infos)
        if hung is not None and detected:
            for r in hung:
                info = infos[r.rank]
                self._record("worker.hung", rank=r.rank, local_rank=r.local_rank, pid=r.pid,
                             silent_s=info["silent_s"], hang_timeout=self.timeout,
                             before_first_step=not r.armed,
                             state=info["state"], cpu_percent=info["cpu_percent"],
                             step=info["step"], reports=r.n, dump=files.get(r.rank),
                             stamp=hang.stamp)
        self._ack(hang)
        acked = self._wait_acks(hang, seen)
        self._record("hang.dumped", stamp=hang.stamp, detected_by=hang.node,
                     dump_dir=str(folder.relative_to(self.jobdir.path)), acked_nodes=acked,
                     expected_nodes=self._nodes,
                     ranks=[{**infos[r], "dump": files.get(r)} for r in sorted(infos)],
                     dump_s=round(time.monotonic() - seen, 3))
        self.last_hang = {"stamp": hang.stamp, "infos": infos, "files": files}
        for r in self._ranks:
            stacks.kill(r.pid)
        failures = {}
        for r in self._ranks:
            failure = ProcessFailure(local_rank=r.local_rank, pid=r.pid,
                                     exitcode=HANG_EXIT_CODE, error_file="")
            failure.message = (
                f"hang: no progress for {infos[r.rank]['silent_s']:g} s (hang_timeout "
                f"{self.timeout:g} s); stacks in {files.get(r.rank) or folder}")
            failures[r.rank] = failure
        self._ranks = []
        return RunResult(state=WorkerState.FAILED, failures=failures)

    def _dump_all(self, folder: Path, infos: dict[int, dict[str, Any]]) -> dict[int, str]:
        """Dump every local rank at once (one thread each: py-spy takes ~0.1-1 s a rank)."""
        files: dict[int, str] = {}

        def one(r: _Rank) -> None:
            info = infos[r.rank]
            text, tool = stacks.dump_stack(r.pid, r.folder,
                                           r.last.signal if r.last else 0, info["state"])
            path = folder / f"rank-{r.rank}.txt"
            try:
                stacks.write_dump(path, info, text, tool)
                files[r.rank] = str(path.relative_to(self.jobdir.path))
            except OSError:
                pass

        threads = [threading.Thread(target=one, args=(r,), daemon=True) for r in self._ranks]
        for t in threads:
            t.start()
        for t in threads:
            t.join(stacks.PY_SPY_TIMEOUT_S + stacks.FAULTHANDLER_WAIT_S + 1)
        return files

    def _ack_path(self, node: str) -> Path:
        marker = self._marker
        assert marker is not None
        return marker.with_name(f"{marker.stem}.{node}.ack")

    def _ack(self, hang: Hang) -> None:
        try:
            fd = os.open(self._ack_path(self.node),
                         os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
            os.close(fd)
        except OSError:
            pass

    def _wait_acks(self, hang: Hang, since: float) -> int:
        """Wait until every node of the round dumped its stacks (or ``ack_wait`` passed)."""
        marker = self._marker
        assert marker is not None
        pattern = f"{marker.stem}.*.ack"
        deadline = since + self.ack_wait
        while True:
            acked = len(list(marker.parent.glob(pattern)))
            if acked >= self._nodes or time.monotonic() >= deadline:
                return acked
            time.sleep(0.1)


def _safe_stamp(value: object) -> str:
    text = str(value)
    if not text.replace("-", "").isdigit() or len(text) > 32:
        raise ValueError(f"bad hang stamp {text!r}")
    return text
