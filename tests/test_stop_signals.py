"""The agent's stop signals (hpc_elastic/agent/stop_signals.py), each case in a fresh Python
process: signal handlers belong to a process's main thread, and pytest's must stay as they are.

The case that matters: torch's ``TailLog.stop()`` catches every exception from its log-tailer
futures, so a SIGTERM raised while a failed worker group is being closed vanished, and the agent
restarted into a rendezvous nobody else joined (a clean-clone CI run: the batch supervisor's
SIGTERM after a requeue, the test waited 200 s). The recorded signal is raised again.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

PRELUDE = """
import os, signal, time
from torch.distributed.elastic.multiprocessing import SignalException
from torch.distributed.elastic.multiprocessing.api import _terminate_process_handler
from hpc_elastic.agent import stop_signals
"""


def run(body: str, ignore_sigterm: bool = False) -> list[str]:
    def preexec() -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN if ignore_sigterm else signal.SIG_DFL)

    result = subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(body)],
                            capture_output=True, text=True, timeout=120, preexec_fn=preexec)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.split()


def test_a_sigterm_swallowed_by_a_catch_all_is_raised_again() -> None:
    out = run("""
        stop_signals.install()
        stop_signals.raise_if_swallowed()  # nothing received yet: no-op
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(10)
            print("not-raised")
        except Exception:  # what TailLog.stop() does with its futures' errors
            print("swallowed")
        try:
            stop_signals.raise_if_swallowed()
            print("lost")
        except SignalException as err:
            print("raised-again", err.sigval.name)
    """)
    assert out == ["swallowed", "raised-again", "SIGTERM"]


def test_after_torch_set_its_handler_ours_is_put_back() -> None:
    """torch's ``PContext.start`` installs its handler at each worker start; the agent calls
    ``reinstall`` right after, so a signal from then on is recorded as well."""
    out = run("""
        stop_signals.install()
        signal.signal(signal.SIGTERM, _terminate_process_handler)  # what PContext.start does
        stop_signals.reinstall()
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(10)
        except Exception:
            pass
        try:
            stop_signals.raise_if_swallowed()
            print("lost")
        except SignalException as err:
            print("recorded", err.sigval.name)
    """)
    assert out == ["recorded", "SIGTERM"]


def test_an_inherited_ignored_sigterm_stays_ignored() -> None:
    out = run("""
        stop_signals.install()
        stop_signals.reinstall()
        print(signal.getsignal(signal.SIGTERM) is signal.SIG_IGN)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.2)
        stop_signals.raise_if_swallowed()
        print("alive")
    """, ignore_sigterm=True)
    assert out == ["True", "alive"]


def test_a_signal_before_torch_is_imported_raises_stopped_early() -> None:
    """The agent installs its handlers before it imports torch (agent/start.py): a stop then
    raises ``StoppedEarly``, with the same ``sigval`` as torch's exception, and torch is not
    imported for it (it would be, inside a signal handler, in the middle of an import)."""
    result = subprocess.run([sys.executable, "-c", textwrap.dedent("""
        import os, signal, sys, time
        from hpc_elastic.agent import stop_signals
        stop_signals.install()
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(10)
        except stop_signals.StoppedEarly as err:
            print("early", err.sigval.name, "torch" in sys.modules)
    """)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["early", "SIGTERM", "False"]
