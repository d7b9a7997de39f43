"""Progress reporting from inside a worker: the signal the agent's hang watch listens to.

How a worker says "I made progress" without the training script changing:

* torch's public global hook ``torch.optim.optimizer.register_optimizer_step_post_hook`` counts
  every optimizer step. The hook is registered by the reporter thread as soon as the script has
  imported ``torch.optim`` (this module never imports torch itself, so it changes nothing about
  when or how the script imports it).
* Scripts without an optimizer step (evaluation, custom update loops), or ones that want the step
  number in the dumps, call ``hpc_elastic.report_progress(step)``; once a script calls it, the
  optimizer hook stops counting so a step is never counted twice.

The hot path is one function call that adds to an integer and reads ``time.monotonic()``; a
daemon thread rewrites the rank's fixed-size record (:mod:`hpc_elastic.worker.record`) once per
``HPC_ELASTIC_PROGRESS_INTERVAL`` seconds (default 1) when the count changed. The record lives in
the worker's own folder (one writer per file, see docs/architecture.md).

At install the worker also registers Python's :mod:`faulthandler` for a real-time signal
(``HPC_ELASTIC_STACK_SIGNAL``, default SIGRTMIN+6) writing every thread's stack to
``stacks.txt`` in the same folder: the agent's fallback when py-spy is not available. The record
carries the signal number, so the agent never sends a signal nobody registered (a real-time
signal's default action is to terminate).

Outside an hpc_elastic worker (no ``HPC_ELASTIC_WORKER_DIR``, and not a torchrun worker whose
sharedfs rendezvous exported ``HPC_ELASTIC_PROGRESS_DIR``), everything is a no-op.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import signal
import sys
import threading
import time
from typing import IO, Any

from ..telemetry.schema import ENV_WORKER_DIR
from . import record

__all__ = ["finished", "install", "installed", "report_progress"]

DEFAULT_INTERVAL_S = 1.0
# Step times are averaged over this window and logged as the rank's ``step_time_s`` metric.
STEP_WINDOW_S = 10.0
ENV_STEP_WINDOW = "HPC_ELASTIC_STEP_WINDOW"
ENV_PROGRESS_DIR = "HPC_ELASTIC_PROGRESS_DIR"  # set by the sharedfs handler under torchrun


class _Reporter:
    """The per-process state: counters written by the training thread, read by the writer."""

    def __init__(self, folder: str, interval: float, window: float, signum: int) -> None:
        self.n = 0
        self.step: int | None = None
        self.explicit = False
        self.last_tick = 0.0
        self.step_time: float | None = None
        self.busy: float | None = None
        self.last_cpu = 0.0
        self.ended = False
        self.interval = interval
        self.window = window
        self.signum = signum
        self.pid = os.getpid()
        path = os.path.join(folder, record.PROGRESS_FILE)
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
        self.stacks: IO[str] | None = None
        self._hooked = False
        self._stop = threading.Event()
        self._write()
        self.thread = threading.Thread(target=self._loop, name="hpc-elastic-progress",
                                       daemon=True)
        self.thread.start()

    def tick(self, step: int | None, explicit: bool) -> None:
        """The hot path (training thread): count one step."""
        if explicit:
            self.explicit = True
        elif self.explicit:
            return  # the script reports itself; the optimizer hook would count twice
        self.n += 1
        if step is not None:
            self.step = step
        self.last_tick = time.monotonic()
        self.last_cpu = time.thread_time()

    def _optimizer_hook(self, _optimizer: Any, _args: Any, _kwargs: Any) -> None:
        self.tick(None, False)

    def _hook_optimizer(self) -> None:
        """Register the optimizer hook once the script imported torch.optim (never import it)."""
        module = sys.modules.get("torch.optim.optimizer")
        register = getattr(module, "register_optimizer_step_post_hook", None)
        if register is not None:
            register(self._optimizer_hook)
            self._hooked = True

    def _write(self) -> None:
        data = record.encode(record.Progress(
            n=self.n, step=self.step, time=time.time(), pid=self.pid, signal=self.signum,
            step_time=self.step_time, ended=self.ended, busy=self.busy))
        # A full disk must not stop training; the agent then sees no progress.
        with contextlib.suppress(OSError):
            os.pwrite(self.fd, data, 0)

    def _loop(self) -> None:
        written = self.n
        window_n, window_t, window_c = self.n, self.last_tick, self.last_cpu
        window_start = next_write = time.monotonic()
        # Until the optimizer hook is in, look for torch.optim 10x a second: steps before it
        # are not counted (harmless: judging starts with the first counted step).
        while not self._stop.wait(self.interval if self._hooked else min(self.interval, 0.1)):
            if not self._hooked:
                self._hook_optimizer()
            n, last, cpu = self.n, self.last_tick, self.last_cpu
            now = time.monotonic()
            if now - window_start >= self.window:
                if n - window_n >= 2 and window_n > 0:
                    self.step_time = (last - window_t) / (n - window_n)
                    self.busy = (cpu - window_c) / (n - window_n)
                    _log_step_time(self.step_time, self.busy, self.step)
                    written = -1  # publish the new window's numbers
                window_n, window_t, window_c, window_start = n, last, cpu, now
            elif window_n == 0 and n > 0:
                window_n, window_t, window_c = n, last, cpu  # the first step opens the window
            if n != written and now >= next_write:
                self._write()
                written, next_write = n, now + self.interval


def _log_step_time(step_time: float, busy: float, step: int | None) -> None:
    """Per-rank step time (wall) and busy time (CPU of the training thread) per step into the
    rank's own metrics file (``logs metrics``, the straggler marks of ``logs plot``)."""
    try:
        from ..telemetry.worker_metrics import log_metrics

        log_metrics({"step_time_s": round(step_time, 6), "step_busy_s": round(busy, 6)},
                    step=step, group="progress")
    except Exception:  # noqa: BLE001 - metrics are a nice-to-have here
        pass


_reporter: _Reporter | None = None
_lock = threading.Lock()


def stack_signal() -> int:
    """The signal the agent sends for a faulthandler dump (``HPC_ELASTIC_STACK_SIGNAL``)."""
    raw = os.environ.get(record.ENV_STACK_SIGNAL, "")
    try:
        return int(raw) if raw else int(signal.SIGRTMIN) + 6
    except ValueError:
        return int(signal.SIGRTMIN) + 6


def allow_parent_ptrace() -> None:
    """Let the agent (the parent) and its children (py-spy) read this process under Yama
    ``ptrace_scope`` 1, where only ancestors may and py-spy is the worker's sibling."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_ptracer = 0x59616D61
        libc.prctl(pr_set_ptracer, os.getppid(), 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _torchrun_folder() -> str | None:
    """Under plain torchrun with the sharedfs rendezvous, the folder its handler chose for this
    round's workers (``HPC_ELASTIC_PROGRESS_DIR``, see hpc_elastic/agent/torchrun_hangs.py):
    ``rank-<RANK>`` in it. It becomes this process's worker folder (metrics go there too)."""
    base, rank = os.environ.get(ENV_PROGRESS_DIR), os.environ.get("RANK", "")
    if not base or not rank.isdigit():
        return None
    folder = os.path.join(base, f"rank-{int(rank)}")
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError:
        return None
    os.environ[ENV_WORKER_DIR] = folder
    return folder


def install() -> bool:
    """Start reporting for this process (idempotent); False outside an hpc_elastic worker."""
    global _reporter
    folder = os.environ.get(ENV_WORKER_DIR) or _torchrun_folder()
    if not folder:
        return False
    with _lock:
        if _reporter is not None and _reporter.pid == os.getpid():
            return True
        try:
            interval = float(os.environ.get(record.ENV_PROGRESS_INTERVAL) or DEFAULT_INTERVAL_S)
            window = float(os.environ.get(ENV_STEP_WINDOW) or STEP_WINDOW_S)
        except ValueError:
            interval, window = DEFAULT_INTERVAL_S, STEP_WINDOW_S
        allow_parent_ptrace()
        signum = stack_signal()
        stacks = None
        try:
            stacks = open(os.path.join(folder, record.STACKS_FILE), "w")  # noqa: SIM115
            faulthandler.register(signum, file=stacks, all_threads=True, chain=False)
        except (OSError, ValueError, RuntimeError):
            signum = 0  # no fallback dump; the agent will not send the signal
        try:
            _reporter = _Reporter(folder, max(interval, 0.05), max(window, 1.0), signum)
        except OSError as err:
            print(f"hpc_elastic: progress reporting is off: {err}", file=sys.stderr)
            return False
        _reporter.stacks = stacks
        return True


def finished() -> None:
    """The script returned (or raised): from here on the process only exits, which can take
    seconds (interpreter and library teardown) and must not look like a hang."""
    rep = _reporter
    if rep is not None and rep.pid == os.getpid():
        rep.ended = True
        rep._write()


def installed() -> bool:
    return _reporter is not None and _reporter.pid == os.getpid()


def report_progress(step: int | None = None) -> None:
    """Tell the agent this rank made progress (``step``: its number, shown in hang dumps).

    Optional: optimizer steps count by themselves. Call it in loops without an optimizer step
    (evaluation) or to label the dumps with your own step numbers. A no-op outside hpc_elastic.
    """
    rep = _reporter
    if rep is None or rep.pid != os.getpid():
        if not install():
            return
        rep = _reporter
        assert rep is not None
    rep.tick(step, True)
