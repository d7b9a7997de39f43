"""The agent's process ends at once after its final event, without tearing down the interpreter.

Why: the agent has imported torch, and an interpreter that has imported torch spends about
half a second dismantling its modules and objects at exit (on the 2-core dev VM, a process that
imported what the agent imports: 0.39-0.58 s from its last line to its end with a normal exit,
0.03 s with this function; an agent: 0.54-0.61 s from its final event to its end before, 0.01 s
after; benchmarks/bench_agent_exit.py, docs/benchmarks.md). Nobody waits for that work to be
done, yet everyone waits for the process to be gone: Slurm ends the node's step only then, the
batch script of a preempted job is requeued only after its last step, and the local launcher
relaunches only after every agent. So the teardown sits on the critical path of every requeue
and every job end.

What a normal exit does and this keeps, in the same order (CPython's ``Py_FinalizeEx``):
non-daemon threads are joined (after the callbacks that ``concurrent.futures`` registers to
stop its pools), ``atexit`` callbacks run (``logging.shutdown`` flushes and closes the log
handlers among them), stdout and stderr are flushed. What it skips: the destruction of modules
and objects, and the garbage collections that go with it. The agent does not rely on it: its
event, metric and log files are closed before its final event (``telemetry.close()``), and its
workers and standby are stopped before that.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
import threading
from typing import NoReturn


def exit_now(code: int) -> NoReturn:
    """End this process with ``code``: what a normal exit does, minus the interpreter teardown.
    Call from the main thread, when nothing is left to do."""
    # The first half of CPython's own finalization: stop thread pools, join non-daemon threads.
    shutdown = getattr(threading, "_shutdown", None)
    if shutdown is not None:
        shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)
