"""pytest side of :mod:`sharedfs` (``tests/conftest.py`` re-exports these fixtures).

* ``sharedfs`` (session): the private GlusterFS server, started on first use, stopped (every
  process, mount and namespace) at the end of the session.
* ``sharedfs_clients`` (per test): ``sharedfs_clients(k, profile)`` -> :class:`sharedfs.Clients`;
  the nodes are removed when the test ends.
* Tests marked ``sharedfs`` are also marked ``slurm`` (privileged test infrastructure: the
  fast lane ``-m "not slurm"`` leaves them out). A server that does not start is an error,
  never a skip.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from sharedfs import Clients, SharedFS, SharedFSError


@pytest.fixture(scope="session")
def sharedfs() -> Iterator[SharedFS]:
    fs = SharedFS()
    try:
        fs.start()
    except (SharedFSError, OSError) as exc:
        fs.stop()
        pytest.fail(
            "the GlusterFS test server (tests/sharedfs) did not start; to run without it, "
            f'deselect its tests explicitly: pytest -m "not slurm"\n{exc}',
            pytrace=False,
        )
    try:
        yield fs
    finally:
        fs.stop()


@pytest.fixture
def sharedfs_clients(sharedfs: SharedFS) -> Iterator[Callable[..., Clients]]:
    made: list[Clients] = []

    def make(k: int, profile: str = "coherent") -> Clients:
        clients = sharedfs.clients(k, profile)
        made.append(clients)
        return clients

    try:
        yield make
    finally:
        for clients in made:
            clients.close()


def mark_sharedfs_tests_as_slurm(items: list[pytest.Item]) -> None:
    """A ``sharedfs`` test is a ``slurm`` test too (``tests/conftest.py`` calls this from its
    tryfirst ``pytest_collection_modifyitems``, before -m deselects)."""
    for item in items:
        if item.get_closest_marker("sharedfs") is not None and not item.get_closest_marker("slurm"):
            item.add_marker(pytest.mark.slurm)

