"""Run a batch of forked writer processes to completion, and never leave one behind."""

from __future__ import annotations

from collections.abc import Sequence
from multiprocessing.process import BaseProcess


def run_all(procs: Sequence[BaseProcess], timeout: float) -> None:
    """Start every process, wait for each (``timeout`` seconds apiece) and assert it exited 0.

    Whatever is still alive when an assertion fails is killed by its own handle, so a failed
    stress test does not leave writers hammering the state directory of the next test.
    """
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join(timeout=timeout)
            assert p.exitcode == 0, f"writer {p.name} ended with exit code {p.exitcode}"
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
