"""Preemption and time limits: forward Slurm's warning signal, then requeue the job once.

Slurm sends the job's ``--signal`` (``preemption.signal``, default USR1) to every node's agent
``grace`` seconds before it stops the job. The agent:

1. records a ``preemption.signal`` event and forwards the signal to its workers, which
   checkpoint and exit (the worker contract, see ``examples/train.py``);
2. as soon as the workers are done, or when ``grace`` runs out, asks for the requeue. Exactly
   one node asks: each node tries to create ``<jobdir>/requeue/attempt-<a>`` with ``O_EXCL``
   (atomic on local filesystems and on NFS v3+), and only the node that created it calls
   ``scontrol requeue``. The next attempt sees ``SLURM_RESTART_COUNT`` one higher.
3. Before it asks, the node that won waits (at most until ``grace`` runs out) until every node
   of the round has said it is done (``<jobdir>/requeue/attempt-<a>.done/<node>``): the
   requeue makes Slurm end every step with SIGTERM and SIGKILL after ``KillWait``, and a node
   that was still noticing its workers' exit would otherwise end without its final event
   (seen on a loaded machine with ``KillWait=5``). Nodes excluded as lost in this attempt (a
   dead batch host) are not waited for.

Why signal handlers stay small: the handler only sets state, forwards the signal and starts a
timer thread; everything that can block (scontrol) runs outside the handler.

Once the signal was received the job is going away, so the agent no longer restarts failed
workers (the next attempt resumes from the checkpoint instead), and when ``grace`` runs out
while workers still run, the agent stops them (``grace_expired``): in local mode nothing else
would, and on Slurm the requeue ends the step anyway. The agent's end -- workers done, stopped,
or the SIGTERM with which Slurm ends the step after ``scontrol requeue`` -- is a preemption, not
a failure (see ``runner.run_agent``).

Workers are started with the signal ignored (:meth:`Preemption.ignored_while`): a worker that
gets it before its script installed a handler would otherwise be killed by it (SIGUSR1's default
action) instead of checkpointing. The worker's own ``signal.signal`` replaces the inherited
``SIG_IGN``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from hpc_elastic.jobdir import file_mode_in, make_dir

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
        round_size: Callable[[], int] = lambda: 1,
        lost_nodes: Callable[[], int] = lambda: 0,
    ) -> None:
        self.signum = signal.Signals[f"SIG{signal_name}"]
        self.grace = grace
        self.claim_path = claim_path
        self.node = node
        self._requeue = requeue
        self._record = record
        self._worker_pids = worker_pids
        self._round_size = round_size  # nodes in the current round (the agent's worker group)
        self._lost_nodes = lost_nodes  # of those, how many are known lost (never say done)
        self.received_at: float | None = None
        self.requeued_by_us = False
        self.grace_expired = False
        self._delivered: set[int] = set()  # worker PIDs the signal was forwarded to
        self._finished = threading.Event()
        self._lock = threading.Lock()

    @property
    def received(self) -> bool:
        return self.received_at is not None

    def install(self) -> None:
        signal.signal(self.signum, self._on_signal)

    @contextlib.contextmanager
    def ignored_while(self) -> Iterator[None]:
        """Start workers inside this: they inherit ``SIG_IGN`` for the signal (dispositions
        other than ignore are reset by ``exec``) and keep it until their script installs its
        handler. The agent's own handler is restored afterwards. Main thread only (Python's
        rule for ``signal.signal``); a no-op when the handler was not installed."""
        if signal.getsignal(self.signum) != self._on_signal:
            yield
            return
        signal.signal(self.signum, signal.SIG_IGN)
        try:
            yield
        finally:
            signal.signal(self.signum, self._on_signal)

    def forward_again(self) -> None:
        """Deliver the signal to workers that have not had it yet: those started after it
        arrived, and those that still ignored it then (see :func:`ignores_signal`). Called
        every monitor round; each worker gets the signal exactly once."""
        if self.received:
            late = self._forward(self._worker_pids())
            if late:
                self._record("preemption.forwarded", forwarded_to=late, late=True)

    def _forward(self, pids: list[int]) -> list[int]:
        """Send the signal once to each of ``pids`` that can take it now; return those sent to.

        Why once, and not to a worker that still ignores it: a worker that has checkpointed
        and is exiting has had its handler reset to the default by Python's finalization, so
        a repeated signal would kill it (exit -10) and look like a failure; and a signal sent
        while the worker still ignores it (starting up, ``SIG_IGN`` inherited) is lost."""
        sent = []
        for pid in pids:
            if pid in self._delivered or ignores_signal(pid, self.signum):
                continue
            self._delivered.add(pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, self.signum)
                sent.append(pid)
        return sent

    def _on_signal(self, signum: int, frame: object) -> None:
        if self.received:
            return
        self.received_at = time.time()
        pids = self._worker_pids()
        sent = self._forward(pids)
        self._record("preemption.signal", signal=self.signum.name, grace_s=self.grace,
                     forwarded_to=sent, not_ready=[pid for pid in pids if pid not in sent])
        timer = threading.Timer(self.grace, self._on_grace_expired)
        timer.daemon = True
        timer.start()

    def _on_grace_expired(self) -> None:
        """Grace is over: ask for the requeue now, and tell the agent to stop its workers."""
        self.grace_expired = True
        if not self._finished.is_set():
            self._record("preemption.grace_expired", grace_s=self.grace)
        self.finish(reason="grace expired")

    def finish(self, reason: str = "workers finished") -> None:
        """Requeue (if this node wins the claim). Safe to call twice, from any thread."""
        with self._lock:
            if self._finished.is_set():
                return
            self._finished.set()
        if self._requeue is None:
            return
        self._say_done()
        if not self._claim():
            return
        waited = self._wait_for_the_other_nodes()
        self._record("requeue", reason=reason, claim=str(self.claim_path), **waited)
        try:
            self._requeue()
            self.requeued_by_us = True
        except Exception as err:  # noqa: BLE001 - reported, and the job ends instead of hanging
            self._record("requeue.failed", error=str(err))

    @property
    def _done_dir(self) -> Path:
        return self.claim_path.with_name(self.claim_path.name + ".done")

    def _say_done(self) -> None:
        """Tell the node that requeues that this one's workers are done (its final event
        follows at once). A name in a directory: no content to read stale, and creating a
        file that exists (a relaunched agent) is fine."""
        with contextlib.suppress(OSError):
            make_dir(self._done_dir)
            fd = os.open(self._done_dir / self.node,
                         os.O_CREAT | os.O_WRONLY | os.O_NOFOLLOW, file_mode_in(self._done_dir))
            os.close(fd)

    def _wait_for_the_other_nodes(self, poll: float = 0.2) -> dict[str, object]:
        """Wait until every node of the round said it is done, or the grace is over. Returns
        what to record: how many said so, and how long this took."""
        expected = max(1, self._round_size() - self._lost_nodes())
        deadline = (self.received_at or time.time()) + self.grace
        t0 = time.time()
        done: list[str] = []
        while True:
            with contextlib.suppress(OSError):
                done = sorted(p.name for p in self._done_dir.iterdir())
            if len(done) >= expected or time.time() >= deadline:
                break
            time.sleep(poll)
        return {"nodes_done": done, "nodes_expected": expected,
                "waited_s": round(time.time() - t0, 3)}

    def _claim(self) -> bool:
        make_dir(self.claim_path.parent)
        try:
            fd = os.open(self.claim_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW,
                         file_mode_in(self.claim_path.parent))
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as claim:
            claim.write(f"{self.node}\n")
        return True


def ignores_signal(pid: int, signum: int) -> bool:
    """True while process ``pid`` ignores ``signum`` (``SigIgn`` in ``/proc/<pid>/status``):
    a worker that has not yet installed its preemption handler. False when it cannot be told
    (no /proc, process gone): then the signal is sent as it would be without this check."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("SigIgn:"):
                    return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    except (OSError, ValueError):
        return False
    return False
