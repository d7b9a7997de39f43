"""Warm worker starts (``warm_workers: true``): standby processes that have imported torch.

Why: measured in the fault-storm benchmark (docs/benchmarks.md), a restart spent ~1 s on
noticing the failure and re-forming the group and 12-22 s on starting the new workers --
Python, ``import torch``, then the script. The agent therefore keeps one standby process per
local rank (hpc_elastic/worker/standby.py): started while nothing else needs the CPUs, it
imports torch and waits on a socket. torch's agent still decides everything about a start
(ranks, environment, log files): only the ``Popen`` of a worker is replaced, inside
:meth:`StandbyPool.serving`, by handing that start to a standby. A standby that is not there,
or that died, means an ordinary cold start for that rank; nothing else changes.

The standby is the agent's child (``start_new_session`` like torch's own workers), so its
exit code, PID, process group and error file are those of any worker.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch.distributed.elastic.multiprocessing.api as mp_api
from torch.distributed.elastic.multiprocessing.subprocess_handler import SubprocessHandler

from hpc_elastic.worker.standby import ENV_STANDBY_FD

#: How the agent starts a worker (runner.py); only these starts can be handed to a standby.
WORKER_PREFIX = ("-u", "-m", "hpc_elastic.worker")
#: A refill waits until every worker of the new group made its first step (they no longer
#: compete for the CPUs), or this long at most (a script that reports no steps).
FILL_AFTER_S = 30.0


@dataclass
class Standby:
    """One waiting process and the agent's end of its socket."""

    proc: subprocess.Popen[bytes]
    sock: socket.socket

    def alive(self) -> bool:
        return self.proc.poll() is None

    def hand_over(self, argv: list[str], env: dict[str, str], stdout: Any, stderr: Any
                  ) -> subprocess.Popen[bytes] | None:
        """Send the start order; the process is then the worker. None if it could not be
        sent (the standby died): the caller starts the worker cold."""
        order = json.dumps({"argv": argv, "env": env, "cwd": os.getcwd()}).encode()
        try:
            socket.send_fds(self.sock, [order], [stdout.fileno(), stderr.fileno()])
        except OSError:
            self.discard()
            return None
        finally:
            self.sock.close()
        return self.proc

    def discard(self) -> None:
        """End a standby that will not be used (its socket's end already tells it to exit)."""
        self.sock.close()
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)


class StandbyPool:
    """``size`` standby processes (one per local rank) for the agent's next worker start."""

    def __init__(self, size: int, record: Callable[..., None] | None = None) -> None:
        self.size = size
        self._record = record
        self._ready: list[Standby] = []
        #: local ranks of the last start that got a standby / were started cold
        self.last_warm: list[int] = []
        self.last_cold: list[int] = []
        self._group_started = time.monotonic()
        self._not_before = 0.0

    def _start_one(self) -> Standby:
        agent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            proc = subprocess.Popen(
                [sys.executable, "-u", "-m", "hpc_elastic.worker.standby"],
                env={**os.environ, ENV_STANDBY_FD: str(child_end.fileno())},
                pass_fds=(child_end.fileno(),), stdout=subprocess.DEVNULL,
                start_new_session=True)
        except BaseException:
            agent_end.close()
            raise
        finally:
            child_end.close()
        return Standby(proc, agent_end)

    def fill(self) -> list[int]:
        """Start standbys until ``size`` are waiting; returns the PIDs of the new ones."""
        for dead in [s for s in self._ready if not s.alive()]:
            # Killed from outside (the OOM killer, a user): replaced, but not in a tight loop.
            dead.discard()
            self._ready.remove(dead)
            self._not_before = time.monotonic() + FILL_AFTER_S
        new = []
        while len(self._ready) < self.size:
            try:
                standby = self._start_one()
            except OSError as err:  # no memory, no processes left: cold starts it is
                if self._record is not None:
                    self._record("standby.failed", error=str(err))
                self._not_before = time.monotonic() + FILL_AFTER_S
                break
            self._ready.append(standby)
            new.append(standby.proc.pid)
        if new and self._record is not None:
            self._record("standby.started", pids=new)
        return new

    def due(self, first_steps_done: Callable[[], bool]) -> bool:
        """Whether to refill now: some standby is missing and the current group is past its
        own start (see ``FILL_AFTER_S``)."""
        if len(self._ready) >= self.size and all(s.alive() for s in self._ready):
            return False
        if time.monotonic() < self._not_before:
            return False
        return (time.monotonic() - self._group_started >= FILL_AFTER_S
                or first_steps_done())

    def take(self) -> Standby | None:
        while self._ready:
            standby = self._ready.pop(0)
            if standby.alive():
                return standby
            standby.discard()
        return None

    @contextlib.contextmanager
    def serving(self) -> Iterator[None]:
        """Inside: torch's ``start_processes`` hands worker starts to standbys. Scoped to one
        start of the worker group, in the agent's main thread."""
        self.last_warm, self.last_cold = [], []
        original = mp_api.get_subprocess_handler

        def handler(**kwargs: Any) -> SubprocessHandler:
            return _WarmHandler(self, **kwargs)

        mp_api.get_subprocess_handler = handler  # type: ignore[assignment]
        try:
            yield
        finally:
            mp_api.get_subprocess_handler = original  # type: ignore[assignment]
            self._group_started = time.monotonic()

    def close(self) -> None:
        """End every waiting standby (the agent is ending)."""
        ready, self._ready = self._ready, []
        for standby in ready:
            standby.discard()


class _WarmHandler(SubprocessHandler):
    """torch's handler for one worker (opens the log files, keeps the ``Popen``), whose
    ``Popen`` is a standby when one is waiting."""

    def __init__(self, pool: StandbyPool, **kwargs: Any) -> None:
        self._pool = pool
        super().__init__(**kwargs)

    def _popen(self, args: tuple, env: dict[str, str]) -> subprocess.Popen:  # type: ignore[type-arg]
        argv = [str(a) for a in args]
        if (argv[0] == sys.executable and tuple(argv[1:4]) == WORKER_PREFIX
                and self._stdout is not None and self._stderr is not None):
            standby = self._pool.take()
            if standby is not None:
                proc = standby.hand_over(argv[4:], env, self._stdout, self._stderr)
                if proc is not None:
                    self._pool.last_warm.append(self.local_rank_id)
                    return proc
        self._pool.last_cold.append(self.local_rank_id)
        return super()._popen(args, env)
