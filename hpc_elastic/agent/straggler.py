"""Stragglers: a node whose ranks work markedly slower than the job's median.

What is compared: each rank's *busy time per step*, the CPU time of its training thread between
two steps (from its progress record, :mod:`hpc_elastic.worker.beat`), averaged over a window. The
wall time per step cannot show a straggler in synchronous data-parallel training: every rank
waits in the gradient all_reduce for the slowest, so all ranks' steps take equally long; the time
spent waiting is not CPU time (gloo sleeps on its socket). This measures CPU-bound work (CPU
training, data loading and augmentation in the training thread); for GPU training it would need
CUDA event timings, which are not built.

How nodes compare without a service: each agent rewrites ``nodes/<node>/steptime.json`` (its own
directory: one writer) once a window with its ranks' busy times and the rendezvous round they
belong to, and reads the other nodes' files of the same round. A node whose ranks' median is at
least ``RATIO`` (1.45: "1.5x slower" less measurement noise) times the median of all ranks flags
*itself* (``node.straggler``, in its own event file), and ``node.straggler_cleared`` when it is
back under.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch.distributed.elastic.agent.server.api import WorkerGroup

from hpc_elastic.excluded import exclude_node
from hpc_elastic.jobdir import JobDir
from hpc_elastic.worker import record
from hpc_elastic.worker.beat import ENV_STEP_WINDOW, STEP_WINDOW_S

# A node 1.5x slower than the median measures 1.49-1.50x (the costs outside the slowed work are
# the same on every rank), so exactly 1.5 would flag it only by chance: measured with
# benchmarks/bench_hangs.py (1.498 in its smoke run).
RATIO = 1.45
WINDOW_S = STEP_WINDOW_S  # the workers' averaging window
STEPTIME_FILE = "steptime.json"
POLICIES = ("off", "report", "exclude")


def _env_window() -> float:
    try:
        return max(1.0, float(os.environ.get(ENV_STEP_WINDOW) or WINDOW_S))
    except ValueError:
        return WINDOW_S


class StragglerWatch:
    """One agent's straggler check over its current worker group."""

    def __init__(self, jobdir: JobDir, node: str, record_event: Callable[..., None],
                 policy: str = "report", window: float | None = None,
                 ratio: float = RATIO, job_id: str = "", attempt: int = 0) -> None:
        self.jobdir = jobdir
        self.node = node
        self.policy = policy
        self.job_id = job_id
        self.attempt = attempt
        #: Why this node was excluded (policy ``exclude``); the agent leaves at its next restart.
        self.excluded: str | None = None
        # The workers' window (they average over it); the same variable sets both.
        self.window = window or _env_window()
        self.ratio = ratio
        self._record = record_event
        self._folders: dict[int, Path] = {}
        self._pids: dict[int, int] = {}
        self._round = ""
        self._next = 0.0
        self.flagged = False
        self.windows = 0  # windows compared in this round
        self.last_ratio: float | None = None  # own median / everyone's, last window

    def watch(self, worker_group: WorkerGroup, folders: dict[int, Path]) -> None:
        handler = worker_group.spec.rdzv_handler
        self._round = f"{getattr(handler, 'run_dir', '')}#{getattr(handler, 'round', '')}"
        self._folders = {w.global_rank: folders[w.local_rank] for w in worker_group.workers
                         if w.local_rank in folders}
        self._pids = {w.global_rank: int(w.id) for w in worker_group.workers
                      if isinstance(w.id, int)}
        self._next = time.monotonic() + self.window
        self.flagged = False
        self.windows = 0

    def check(self) -> None:
        now = time.monotonic()
        if now < self._next or not self._folders:
            return
        self._next = now + self.window
        mine: dict[int, float] = {}
        for rank, folder in self._folders.items():
            p = record.read(folder / record.PROGRESS_FILE)
            if p is not None and p.pid == self._pids.get(rank) and p.busy is not None \
                    and not p.ended:
                mine[rank] = p.busy
        if not mine:
            return
        self._publish(mine)
        everyone = self._read_all()
        everyone[self.node] = mine
        if len(everyone) < 2:
            return
        self.windows += 1
        all_ranks = [v for ranks in everyone.values() for v in ranks.values()]
        median = statistics.median(all_ranks)
        own = statistics.median(mine.values())
        self.last_ratio = own / median if median > 0 else None
        slow = median > 0 and own >= self.ratio * median
        if slow and not self.flagged:
            self.flagged = True
            action = "reported"
            if self.policy == "exclude" and self.excluded is None:
                action = self._exclude(own / median)
            self._record("node.straggler", ratio=round(own / median, 3),
                         node_busy_s=round(own, 6), median_busy_s=round(median, 6),
                         ranks=sorted(mine), nodes_compared=len(everyone),
                         window_s=self.window, windows=self.windows, policy=self.policy,
                         action=action)
        elif not slow and self.flagged:
            self.flagged = False
            self._record("node.straggler_cleared", ratio=round(own / median, 3)
                         if median > 0 else None, windows=self.windows)

    def _exclude(self, ratio: float) -> str:
        """Policy ``exclude``: record the node in ``excluded/<node>.json`` like a lost node (the
        next attempt's supervisor skips it, a requeue asks Slurm to leave it out), and mark it
        so that its agent leaves the run at the group's next restart instead of rejoining."""
        reason = (f"straggler: its ranks needed {ratio:.2f}x the median busy time per step "
                  f"(stragglers: exclude)")
        try:
            exclude_node(self.jobdir, self.node, reason, self.job_id, self.attempt)
        except OSError as err:
            return f"reported (could not record the exclusion: {err})"
        self.excluded = reason
        return "excluded: the node leaves the run at the next restart or requeue"

    def _publish(self, mine: dict[int, float]) -> None:
        path = self.jobdir.node(self.node) / STEPTIME_FILE
        tmp = path.with_name(STEPTIME_FILE + ".tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
            with os.fdopen(fd, "w") as f:
                json.dump({"round": self._round, "time": time.time(),
                           "ranks": {str(k): v for k, v in mine.items()}}, f)
            os.replace(tmp, path)
        except OSError:
            pass

    def _read_all(self) -> dict[str, dict[int, float]]:
        """Other nodes' latest busy times of this round (stale ones -- older than 3 windows by
        their writer's clock, a loose bound only -- and other rounds are skipped)."""
        out: dict[str, dict[int, float]] = {}
        for node in self.jobdir.node_names():
            if node == self.node:
                continue
            try:
                fd = os.open(self.jobdir.node(node) / STEPTIME_FILE, os.O_RDONLY | os.O_NOFOLLOW)
                with os.fdopen(fd) as f:
                    data: Any = json.loads(f.read(1 << 16))
                if data.get("round") != self._round:
                    continue
                if abs(time.time() - float(data.get("time", 0))) > 3 * self.window:
                    continue
                ranks = {int(k): float(v) for k, v in data["ranks"].items()}
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                continue
            if ranks:
                out[node] = ranks
        return out
