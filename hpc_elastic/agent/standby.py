"""Warm worker starts (``warm_workers: true``): workers forked from a process that has imported
torch.

Why: measured in the fault-storm benchmark (docs/benchmarks.md), a restart spent ~1 s on
noticing the failure and re-forming the group and 12-22 s on starting the new workers --
Python, ``import torch``, then the script. The agent therefore keeps one standby process
(hpc_elastic/worker/standby.py): started while nothing else needs the CPUs, it imports torch
(and what DDP imports on first use) and waits on a socket. torch's agent still decides
everything about a start (ranks, environment, log files): only the ``Popen`` of a worker is
replaced, inside :meth:`StandbyPool.serving`, by asking the standby to fork that worker. A
standby that is not there, or that died, means an ordinary cold start; nothing else changes.

The standby is forked from the agent itself when it can be (:func:`fork_from_agent`): right
after the agent imported torch, before it started any thread or opened any file, so the standby
only adds what DDP imports on first use. On a node that starts from nothing (a requeue, the
job's start) that saves one ``import torch`` per node while the agents and their standbys
compete for the CPUs. Otherwise (the agent already has threads or files, or a standby that died
is replaced later) it is a new process, ``python -u -m hpc_elastic.worker.standby``.

A forked worker is the standby's child, not the agent's: the standby reaps it and reports its
exit code, and :class:`ForkedWorker` gives torch the ``Popen`` calls it uses (``pid``,
``poll``, ``wait``, signals). The worker leads its own session like torch's own workers, so
the agent's ``killpg`` (torch's stop, fencing's SIGKILL), hang dumps and preemption forwarding
reach it by PID as before.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch.distributed.elastic.multiprocessing.api as mp_api
from torch.distributed.elastic.multiprocessing.subprocess_handler import SubprocessHandler

from hpc_elastic.agent import stop_signals
from hpc_elastic.agent.start import open_fds
from hpc_elastic.worker import standby as standby_side
from hpc_elastic.worker.standby import ENV_STANDBY_FD

logger = logging.getLogger(__name__)

#: How the agent starts a worker (runner.py); only these starts can be handed to a standby.
WORKER_PREFIX = ("-u", "-m", "hpc_elastic.worker")
#: A standby that died is replaced once the current group made its first steps (they no longer
#: compete for the CPUs), or this long after the group's start at most.
FILL_AFTER_S = 30.0
#: How long a start waits for the standby's fork. A standby still importing torch (just
#: started, on a loaded node) answers when it is done; a cold start would import as long.
FORK_TIMEOUT_S = 120.0
#: The exit code given to a forked worker whose real one was lost with its standby (the
#: standby was killed before it could report it): counted as a failure, so the group restarts.
EXIT_UNKNOWN = 1


class ForkedProcess:
    """What :class:`Standby` uses of a ``Popen``, for a standby forked from the agent."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:  # reaped elsewhere: gone, how is unknown
                self.returncode = EXIT_UNKNOWN
            else:
                if pid:
                    self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        end = None if timeout is None else time.monotonic() + timeout
        while (code := self.poll()) is None:
            if end is not None and time.monotonic() >= end:
                raise subprocess.TimeoutExpired([str(self.pid)], timeout or 0.0)
            time.sleep(0.02)
        return code


def _why_not_fork(inherited_fds: frozenset[int]) -> str | None:
    """Why the agent cannot fork its standby now, if it cannot: a fork copies every thread's
    locks but only the calling thread, and every open file; a standby started with ``Popen``
    gets neither. Descriptors the agent inherited are closed in the child (no Python object of
    the agent uses them), any it opened itself would be shared with every worker."""
    if threading.active_count() > 1:
        return "the agent already runs threads"
    opened = open_fds() - inherited_fds
    if opened:
        return f"the agent has files open (descriptors {sorted(opened)})"
    if not _unbuffered():
        return "the agent runs without python -u (its workers would buffer their output)"
    return None


def _unbuffered() -> bool:
    """Whether stdout and stderr are what ``python -u`` makes them: unbuffered files, every
    write passed through (``sys.flags`` does not say)."""
    return all(isinstance(getattr(stream, "buffer", None), io.FileIO)
               and getattr(stream, "write_through", False) for stream in (sys.stdout, sys.stderr))


def fork_from_agent(inherited_fds: frozenset[int], ignore_signal: int | None
                    ) -> tuple[Standby | None, str | None]:
    """Fork this node's standby from the agent, right after the agent imported torch.

    Returns the standby, or None and why not (the agent then starts one with ``Popen``). In the
    child this does not return: it raises :class:`~hpc_elastic.worker.standby.BecomeStandby`,
    which unwinds the agent's frames to ``cli.main`` (none of them acts on it) where the child
    runs the standby. Before that the child is made what ``Popen`` would have made: its own
    session, the agent's inherited descriptors closed, stdout on ``/dev/null``, SIGTERM/SIGINT
    as at the agent's start and ``ignore_signal`` (the preemption signal) ignored."""
    why = _why_not_fork(inherited_fds)
    if why is not None:
        return None, why
    agent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        pid = os.fork()
    except OSError as err:
        agent_end.close()
        child_end.close()
        return None, f"fork failed: {err}"
    if pid == 0:
        try:
            agent_end.close()
            _become_fresh(inherited_fds - {child_end.fileno()}, ignore_signal)
        except BaseException:  # noqa: BLE001 - nothing of the agent may run in this child
            os._exit(EXIT_UNKNOWN)
        raise standby_side.BecomeStandby(child_end)
    child_end.close()
    return Standby(ForkedProcess(pid), agent_end), None


def _become_fresh(inherited_fds: frozenset[int], ignore_signal: int | None) -> None:
    """In the forked child: what a ``Popen(start_new_session=True, stdout=DEVNULL)`` of
    ``python -u -m hpc_elastic.worker.standby`` would have had."""
    os.setsid()
    stop_signals.put_back_before()
    if ignore_signal is not None:
        signal.signal(ignore_signal, signal.SIG_IGN)
    for fd in inherited_fds & open_fds():
        os.close(fd)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.close(devnull)
    sys.argv = [standby_side.__file__]
    sys.path[0] = os.getcwd()


class Standby:
    """The agent's end of one standby process: ordering forks, collecting exit codes."""

    def __init__(self, proc: subprocess.Popen[bytes] | ForkedProcess, sock: socket.socket
                 ) -> None:
        self.proc = proc
        self.sock = sock
        self._lock = threading.Lock()
        #: forked workers that have not been reported ended, by pid. An exit report goes to
        #: the worker object itself: a pid the kernel reuses for a later fork is reported
        #: ended before that fork's answer, so reports and workers never mix up.
        self._running: dict[int, ForkedWorker] = {}
        self._gone = False  # the socket reached its end: the standby exited

    def alive(self) -> bool:
        return not self._gone and self.proc.poll() is None

    def fork(self, argv: list[str], env: dict[str, str], stdout: Any, stderr: Any,
             timeout: float = FORK_TIMEOUT_S) -> ForkedWorker | None:
        """Have the standby fork this worker. None if it could not (dead, refused, or no answer
        within ``timeout``): the caller starts the worker cold."""
        order = json.dumps({"argv": argv, "env": env, "cwd": os.getcwd()}).encode()
        with self._lock:
            try:
                socket.send_fds(self.sock, [order], [stdout.fileno(), stderr.fileno()])
            except OSError:
                self._gone = True
                return None
            deadline = time.monotonic() + timeout
            while True:
                message = self._receive(max(0.0, deadline - time.monotonic()))
                if message is None:
                    if not self._gone:  # no answer in time: it may fork later, so end it
                        logger.warning("the standby did not fork a worker within %.0f s; "
                                       "starting it cold", timeout)
                        self.discard()
                    return None
                if "pid" in message:
                    worker = ForkedWorker(self, int(message["pid"]), argv)
                    self._running[worker.pid] = worker
                    return worker
                if "error" in message:
                    logger.warning("the standby could not fork a worker: %s", message["error"])
                    return None

    def update(self, worker: ForkedWorker) -> None:
        """Take in the exit reports sent so far (``worker.returncode`` is set if it ended)."""
        with self._lock:
            self._drain()
            if (worker.returncode is None and self._gone
                    and self._running.get(worker.pid) is worker and not _process_alive(worker.pid)):
                logger.warning("the exit code of worker %d was lost with its standby process; "
                               "counting it as %d", worker.pid, EXIT_UNKNOWN)
                self._running.pop(worker.pid)
                worker.returncode = EXIT_UNKNOWN

    def _read_one(self, timeout: float) -> dict[str, Any] | None:
        """The next message, waiting up to ``timeout``; None if none came or the standby is
        gone (its end of the socket closed). Caller holds the lock."""
        if self._gone:
            return None
        ready, _, _ = select.select([self.sock], [], [], max(0.0, timeout))
        if not ready:
            return None
        try:
            data = self.sock.recv(4096)
        except OSError:
            data = b""
        if not data:
            self._gone = True
            return None
        message = json.loads(data)
        if "exit" in message:
            worker = self._running.pop(int(message["exit"]), None)
            if worker is not None:
                worker.returncode = int(message["code"])
        return message

    def _receive(self, timeout: float) -> dict[str, Any] | None:
        """The standby's answer to an order (exit reports on the way are kept)."""
        end = time.monotonic() + timeout
        while (message := self._read_one(end - time.monotonic())) is not None:
            if "exit" not in message:
                return message
        return None

    def _drain(self) -> None:
        """Take in every exit report already sent."""
        while self._read_one(0.0) is not None:
            pass

    def discard(self) -> None:
        """End the standby (its socket's end also tells it to exit); its workers run on."""
        self._gone = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                os.kill(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)


def _process_alive(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


class ForkedWorker:
    """What torch's agent uses of a worker's ``Popen``, for a worker forked by a standby."""

    def __init__(self, standby: Standby, pid: int, args: list[str]) -> None:
        self._standby = standby
        self.pid = pid
        self.args = args
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self._standby.update(self)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        end = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if end is not None and time.monotonic() >= end:
                raise subprocess.TimeoutExpired(self.args, timeout or 0.0)
            time.sleep(0.02)
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class StandbyPool:
    """The agent's standby process (one per agent), for its next worker starts."""

    def __init__(self, record: Callable[..., None] | None = None, forked: Standby | None = None,
                 not_forked: str | None = None) -> None:
        self._record = record
        #: ``forked``: the standby the agent forked from itself (:func:`fork_from_agent`)
        self.standby: Standby | None = forked
        self._announce = forked is not None  # its standby.started event is still to be written
        self._not_forked = not_forked  # why the agent could not fork it, for that event
        #: local ranks of the last start that got a forked worker / were started cold
        self.last_warm: list[int] = []
        self.last_cold: list[int] = []
        self._group_started = time.monotonic()
        self._not_before = 0.0

    def _start(self) -> Standby:
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
        """Start the standby if there is none (or it died); returns its PID if started. The
        first call announces a standby the agent forked from itself."""
        if self.standby is not None and self.standby.alive():
            if self._announce and self._record is not None:
                self._record("standby.started", pids=[self.standby.proc.pid],
                             forked_from_agent=True)
            self._announce = False
            return []
        self._announce = False
        if self.standby is not None:
            # Killed from outside (the OOM killer, a user): replaced, but not in a tight loop.
            self.standby.discard()
            self._not_before = time.monotonic() + FILL_AFTER_S
        try:
            self.standby = self._start()
        except OSError as err:  # no memory, no processes left: cold starts it is
            self.standby = None
            if self._record is not None:
                self._record("standby.failed", error=str(err))
            self._not_before = time.monotonic() + FILL_AFTER_S
            return []
        if self._record is not None:
            extra = {"not_forked": self._not_forked} if self._not_forked else {}
            self._record("standby.started", pids=[self.standby.proc.pid],
                         forked_from_agent=False, **extra)
        self._not_forked = None
        return [self.standby.proc.pid]

    def due(self, first_steps_done: Callable[[], bool]) -> bool:
        """Whether to start a standby now: none is alive and the current group is past its own
        start (see ``FILL_AFTER_S``)."""
        if self.standby is not None and self.standby.alive():
            return False
        if time.monotonic() < self._not_before:
            return False
        return (time.monotonic() - self._group_started >= FILL_AFTER_S
                or first_steps_done())

    def fork(self, argv: list[str], env: dict[str, str], stdout: Any, stderr: Any
             ) -> ForkedWorker | None:
        if self.standby is None or not self.standby.alive():
            return None
        return self.standby.fork(argv, env, stdout, stderr)

    @contextlib.contextmanager
    def serving(self) -> Iterator[None]:
        """Inside: torch's ``start_processes`` has the standby fork its workers. Scoped to one
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
        """End the standby (the agent is ending)."""
        standby, self.standby = self.standby, None
        if standby is not None:
            standby.discard()


class _WarmHandler(SubprocessHandler):
    """torch's handler for one worker (opens the log files, keeps the ``Popen``), whose
    ``Popen`` is a fork of the standby when one is waiting."""

    def __init__(self, pool: StandbyPool, **kwargs: Any) -> None:
        self._pool = pool
        super().__init__(**kwargs)

    def _popen(self, args: tuple, env: dict[str, str]) -> subprocess.Popen:  # type: ignore[type-arg]
        argv = [str(a) for a in args]
        if (argv[0] == sys.executable and tuple(argv[1:4]) == WORKER_PREFIX
                and self._stdout is not None and self._stderr is not None):
            worker = self._pool.fork(argv[4:], env, self._stdout, self._stderr)
            if worker is not None:
                self._pool.last_warm.append(self.local_rank_id)
                return worker  # type: ignore[return-value]
        self._pool.last_cold.append(self.local_rank_id)
        return super()._popen(args, env)

    def close(self, death_sig: signal.Signals | None = None) -> None:
        """torch's ``close`` (``killpg`` of the worker, then its log files), for a worker that
        may already be gone. torch signals a worker whose ``poll()`` said it runs; a forked
        worker that ended just before has been reaped by its standby at once, while its exit
        report may still be on the way, and ``killpg`` then fails with ESRCH -- which ended a
        whole agent in the fault-storm benchmark (run M). A worker torch started itself stays
        a zombie until the agent reaps it, so it never had this gap."""
        try:
            super().close(death_sig=death_sig)
        except ProcessLookupError:
            for stream in (self._stdout, self._stderr):
                if stream:
                    stream.close()
