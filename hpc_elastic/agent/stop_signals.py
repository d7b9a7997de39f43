"""SIGTERM/SIGINT stop the agent, from its first line to its last, and none is ever lost.

Two holes in torch's own handling, both seen end to end:

- torch installs its handler (raise ``SignalException``) only when it starts the first workers.
  Before that -- reading the job, waiting minutes in the rendezvous for the other nodes -- the
  default action killed the agent on the spot: no final event, no departure from the
  rendezvous (tests/test_cancel_local.py).
- torch's ``TailLog.stop()`` catches *every* ``Exception`` from its log-tailer futures, and so
  also the ``SignalException`` its handler raises when SIGTERM comes while a failed worker
  group is being closed: it logs "error in log tailer ... SignalException" and goes on. Seen
  in the clean-clone CI run (tests/test_batch_supervisor.py, the supervisor's SIGTERM after a
  requeue): the agent restarted its workers into a rendezvous nobody else would join and
  waited there, deaf to the signal it had been sent, until the test gave up after 200 s.

So the handler here records the signal before raising, the agent puts it back after each
worker start (torch replaces it there), and the agent raises a recorded signal again at its
next step (:func:`raise_if_swallowed`). A signal this process inherited as ignored stays
ignored (``nohup``, a shell's background job).

This module does not import torch: the agent installs the handlers before it imports torch
(seconds of CPU, hpc_elastic/agent/start.py). A signal that comes before torch's
``SignalException`` exists raises :class:`StoppedEarly` instead, which has the same ``sigval``.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

#: The stop signals this agent handles (not those it inherited as ignored).
_HANDLED: set[signal.Signals] = set()
#: Stop signals received so far, first first.
_RECEIVED: list[signal.Signals] = []
#: What SIGTERM/SIGINT did before :func:`install` (Python's defaults, or inherited ``SIG_IGN``).
_BEFORE: dict[signal.Signals, object] = {}
#: Where torch defines ``SignalException``, the exception its agent stops on.
_TORCH_MODULE = "torch.distributed.elastic.multiprocessing.api"


class StoppedEarly(Exception):  # noqa: N818 - named like torch's SignalException it stands for
    """A stop signal before torch was imported (torch's ``SignalException`` raised later)."""

    def __init__(self, msg: str, sigval: signal.Signals) -> None:
        super().__init__(msg)
        self.sigval = sigval


def _exception(msg: str, sigval: signal.Signals) -> Exception:
    """torch's ``SignalException`` once torch defined it (its agent stops on that one), else
    :class:`StoppedEarly`. Looked up, never imported: this runs in a signal handler, maybe in
    the middle of ``import torch``."""
    cls = getattr(sys.modules.get(_TORCH_MODULE), "SignalException", StoppedEarly)
    return cls(msg, sigval=sigval)


def _stop(received: int, _frame: object) -> None:
    sigval = signal.Signals(received)
    _RECEIVED.append(sigval)
    raise _exception(f"Process {os.getpid()} got signal: {received}", sigval)


def install() -> None:
    """From the agent's first line: SIGTERM/SIGINT raise ``SignalException`` (and are
    recorded). Only the main thread may set handlers; elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGTERM, signal.SIGINT):
        if sig not in _BEFORE:
            _BEFORE[sig] = signal.getsignal(sig)
        if sig in _HANDLED or signal.getsignal(sig) is not signal.SIG_IGN:
            _HANDLED.add(sig)
            signal.signal(sig, _stop)


def put_back_before() -> None:
    """SIGTERM/SIGINT as they were before :func:`install`: in a process forked from the agent
    that is to behave like a freshly started one (the warm-worker standby, agent/start.py)."""
    for sig, handler in _BEFORE.items():
        signal.signal(sig, handler)  # type: ignore[arg-type]


def also_stop_on(signum: int) -> None:
    """One more signal that stops the agent like SIGTERM: a member job's preemption signal (its
    own time limit or preemption is near), on which it stops its workers and leaves the run."""
    sig = signal.Signals(signum)
    _HANDLED.add(sig)
    signal.signal(sig, _stop)


def reinstall() -> None:
    """After torch started workers (``PContext.start`` set its own handler): ours again, so
    that the next signal is recorded too."""
    if threading.current_thread() is threading.main_thread():
        for sig in _HANDLED:
            signal.signal(sig, _stop)


def raise_if_swallowed() -> None:
    """Raise again a stop signal that was received but did not end the agent (swallowed by
    torch code that catches every exception)."""
    if _RECEIVED:
        sigval = _RECEIVED[0]
        raise _exception(f"Process {os.getpid()} got signal: {int(sigval)} (raised again: "
                         "the first raise was swallowed)", sigval)
