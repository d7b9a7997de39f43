"""Hang detection for plain ``torchrun --rdzv-backend=sharedfs`` users.

torchrun's agent is torch's own, so the monitor loop that runs :class:`HangWatch` in
hpc_elastic's agent (runner.py) does not exist there. What torchrun does load of ours is the
rendezvous handler, in the agent process, and it completes a round right before the agent starts
that round's workers. So the watch hangs off the handler (``on_round``):

1. At each round it picks the node's progress folder for the round,
   ``<rendezvous run dir>/progress/round-<r>/<node id>``, and exports it to the workers-to-be
   (``HPC_ELASTIC_PROGRESS_DIR``: torch's agent copies its environment into every worker).
2. Workers started as ``torchrun ... -m hpc_elastic.worker train.py ARGS`` write their progress
   record into ``rank-<RANK>`` under it (:mod:`hpc_elastic.worker.beat`); a script started
   without the wrapper writes nothing and is never judged.
3. A daemon thread in the agent checks the records once a second with the same
   :class:`HangWatch` as hpc_elastic's agent: the same marker and acknowledgements in the run
   directory (stacks from every node), dumps in ``<run dir>/nodes/<node id>/hangs/<stamp>/``,
   events in ``<run dir>/nodes/<node id>/events.jsonl`` (so ``hpc-elastic logs hangs <run dir>``
   reads them). Then it SIGKILLs the hung group: torch's agent sees failed workers and restarts
   them as for any failure (``--max-restarts``).

``HPC_ELASTIC_HANG_TIMEOUT`` (seconds; default 300, ``0`` or ``off``: no watch) is read from the
agent's environment when torchrun creates the handler.
"""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from hpc_elastic.agent.hang import HangWatch
from hpc_elastic.config import DEFAULT_HANG_TIMEOUT, MIN_HANG_TIMEOUT
from hpc_elastic.jobdir import JobDir
from hpc_elastic.rendezvous.layout import settled
from hpc_elastic.telemetry.events import EventLog
from hpc_elastic.telemetry.jsonl import JsonlWriter
from hpc_elastic.telemetry.schema import Context
from hpc_elastic.worker import record
from hpc_elastic.worker.beat import ENV_PROGRESS_DIR

ENV_HANG_TIMEOUT = "HPC_ELASTIC_HANG_TIMEOUT"
CHECK_INTERVAL_S = 1.0


def hang_timeout_from_env() -> float | None:
    """``HPC_ELASTIC_HANG_TIMEOUT``: None when switched off; a clear error when unusable."""
    raw = os.environ.get(ENV_HANG_TIMEOUT, "").strip().lower()
    if raw in ("0", "off", "none", "null", "false"):
        return None
    if not raw:
        return DEFAULT_HANG_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value >= MIN_HANG_TIMEOUT:
        raise ValueError(
            f"{ENV_HANG_TIMEOUT}={raw!r} is not a usable hang timeout. Fix: seconds >= "
            f"{MIN_HANG_TIMEOUT:g} (default {DEFAULT_HANG_TIMEOUT:g}), or 0 to switch hang "
            "detection off.")
    return value


class TorchrunHangWatch:
    """One torchrun agent's hang watch, driven by its rendezvous handler's rounds."""

    def __init__(self, handler: Any, timeout: float) -> None:
        self.handler = handler
        self.timeout = timeout
        node = str(handler.node_id)
        self.jobdir = JobDir(Path(handler.run_dir))
        self.node = node
        self._events: EventLog | None = None
        self.watch = HangWatch(self.jobdir, node, timeout, self._record)
        self._folder: Path | None = None
        self._nodes = 1
        self._seen: dict[int, int] = {}  # rank -> pid of the records being judged
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        handler.on_round = self.new_round
        handler.on_shutdown = self.stop

    def _record(self, kind: str, **fields: Any) -> None:
        if self._events is None:
            path = self.jobdir.events(self.node)
            settled(lambda: path.parent.mkdir(parents=True, exist_ok=True), path.parent)
            self._events = EventLog(JsonlWriter(path), Context(
                job_id=str(self.handler.get_run_id()), attempt=0, node=self.node))
        self._events.record(kind, **fields)

    def new_round(self, round_: int, world: int) -> None:
        """The handler completed ``round_``: point the next workers at a fresh folder."""
        folder = self.jobdir.path / "progress" / f"round-{round_}" / self.node
        # Every node makes round-N/ at the same moment: through a caching client (GlusterFS)
        # mkdir answers EEXIST/ENOENT for a directory another node just made; retried.
        settled(lambda: folder.mkdir(parents=True, exist_ok=True), folder)
        os.environ[ENV_PROGRESS_DIR] = str(folder)
        with self._lock:
            self._folder, self._nodes, self._seen = folder, world, {}
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="hpc-elastic-hang-watch",
                                            daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        while not self._stop.wait(CHECK_INTERVAL_S):
            try:
                self._check()
            except Exception as exc:  # noqa: BLE001 - never take torchrun's agent down
                print(f"hpc_elastic hang watch: {type(exc).__name__}: {exc}", file=sys.stderr)

    def _check(self) -> None:
        with self._lock:
            folder, nodes = self._folder, self._nodes
            if folder is None:
                return
            ranks = self._ranks(folder)
            if ranks and ranks != self._seen:
                self._seen = ranks
                workers = [SimpleNamespace(local_rank=i, global_rank=r, id=pid)
                           for i, (r, pid) in enumerate(sorted(ranks.items()))]
                group = SimpleNamespace(workers=workers, group_world_size=nodes,
                                        spec=SimpleNamespace(rdzv_handler=self.handler))
                self.watch.watch(group, {i: folder / f"rank-{r}"  # type: ignore[arg-type]
                                         for i, r in enumerate(sorted(ranks))})
        if not self._seen:
            return
        result = self.watch.check()
        if result is not None:
            hang = self.watch.last_hang or {}
            print(f"hpc_elastic: hang (no progress for {self.timeout:g} s, "
                  f"{ENV_HANG_TIMEOUT}); stacks of this node's ranks in "
                  f"{self.jobdir.node(self.node) / 'hangs' / str(hang.get('stamp'))}; "
                  "the workers were stopped so that torchrun restarts them", file=sys.stderr)
            with self._lock:
                self._folder, self._seen = None, {}

    @staticmethod
    def _ranks(folder: Path) -> dict[int, int]:
        """rank -> pid of every worker that wrote its record in ``folder``."""
        found = {}
        for sub in folder.glob("rank-*"):
            try:
                rank = int(sub.name[len("rank-"):])
            except ValueError:
                continue
            p = record.read(sub / record.PROGRESS_FILE)
            if p is not None and p.pid > 0:
                found[rank] = p.pid
        return found


def install(handler: Any) -> TorchrunHangWatch | None:
    """Attach the watch to a handler torchrun created (None when switched off)."""
    timeout = hang_timeout_from_env()
    return None if timeout is None else TorchrunHangWatch(handler, timeout)
