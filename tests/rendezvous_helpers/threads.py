"""Several rendezvous handlers ("nodes") calling ``next_rendezvous`` at once, each in a thread of
the test process: the shared runner of tests/test_rendezvous_handler.py and
tests/test_rendezvous_requests.py."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any


def start_rendezvous(handlers: Sequence[Any]) -> tuple[list[threading.Thread], dict[int, object]]:
    """Start ``next_rendezvous`` on every handler; the results fill in as the threads end."""
    results: dict[int, object] = {}

    def run(i: int, handler: Any) -> None:
        try:
            results[i] = handler.next_rendezvous()
        except BaseException as exc:  # noqa: BLE001 - re-raised by finish_rendezvous
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i, h), daemon=True)
               for i, h in enumerate(handlers)]
    for t in threads:
        t.start()
    return threads, results


def finish_rendezvous(threads: list[threading.Thread], results: dict[int, object],
                      timeout: float = 30) -> list[Any]:
    """The infos in handler order, or the first error raised; fails if one is still waiting."""
    for t in threads:
        t.join(timeout)
    assert all(not t.is_alive() for t in threads), "a rendezvous hung"
    for value in results.values():
        if isinstance(value, BaseException):
            raise value
    return [results[i] for i in range(len(threads))]


def rendezvous_all(handlers: Sequence[Any], timeout: float = 30) -> list[Any]:
    """``next_rendezvous`` on every handler concurrently; the infos, or the first error."""
    return finish_rendezvous(*start_rendezvous(handlers), timeout=timeout)
