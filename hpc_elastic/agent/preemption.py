"""Preemption and time limits: forward Slurm's warning signal, then requeue the job once.

Slurm sends the job's ``--signal`` (``preemption.signal``, default USR1) to every node's agent
``grace`` seconds before it stops the job. The agent:

1. records a ``preemption.signal`` event and forwards the signal to its workers, which
   checkpoint and exit (the worker contract, see ``examples/train.py``);
2. as soon as the workers are done, or when ``grace`` runs out, asks for the requeue. Exactly
   one node asks: each node tries to create ``<jobdir>/requeue/attempt-<a>`` with ``O_EXCL``
   (atomic on local filesystems and on NFS v3+), and only the node that created it calls
   ``scontrol requeue``. The next attempt sees ``SLURM_RESTART_COUNT`` one higher.

Why signal handlers stay small: the handler only sets state, forwards the signal and starts a
timer thread; everything that can block (scontrol) runs outside the handler.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

# Exit code of an agent that handed its job to a requeue (local mode relaunches on it).
EXIT_REQUEUED = 75


class Preemption:
    """State and actions for one agent's preemption handling."""

    def __init__(
        self,
        signal_name: str,
        grace: float,
        claim_path: Path,
        node: str,
        requeue: Callable[[], None] | None,
        record: Callable[..., None],
        worker_pids: Callable[[], list[int]],
    ) -> None:
        self.signum = signal.Signals[f"SIG{signal_name}"]
        self.grace = grace
        self.claim_path = claim_path
        self.node = node
        self._requeue = requeue
        self._record = record
        self._worker_pids = worker_pids
        self.received_at: float | None = None
        self.requeued_by_us = False
        self._finished = threading.Event()
        self._lock = threading.Lock()

    @property
    def received(self) -> bool:
        return self.received_at is not None

    def install(self) -> None:
        signal.signal(self.signum, self._on_signal)

    def _on_signal(self, signum: int, frame: object) -> None:
        if self.received:
            return
        self.received_at = time.time()
        pids = self._worker_pids()
        self._record("preemption.signal", signal=self.signum.name, grace_s=self.grace,
                     forwarded_to=pids)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)
        timer = threading.Timer(self.grace, self.finish, kwargs={"reason": "grace expired"})
        timer.daemon = True
        timer.start()

    def finish(self, reason: str = "workers finished") -> None:
        """Requeue (if this node wins the claim). Safe to call twice, from any thread."""
        with self._lock:
            if self._finished.is_set():
                return
            self._finished.set()
        if self._requeue is None or not self._claim():
            return
        self._record("requeue", reason=reason, claim=str(self.claim_path))
        try:
            self._requeue()
            self.requeued_by_us = True
        except Exception as err:  # noqa: BLE001 - reported, and the job ends instead of hanging
            self._record("requeue.failed", error=str(err))

    def _claim(self) -> bool:
        self.claim_path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.claim_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as claim:
            claim.write(f"{self.node}\n")
        return True
