"""The agents' per-round store (``hpc_elastic.rendezvous.store``): torch's Store API over
immutable files, correct through a caching client. Its reason to exist -- torch's FileStore
hung three torchrun agents on GlusterFS's default profile -- is tested across real GlusterFS
clients in ``test_rendezvous_gluster.py``; here several processes share a local directory,
some of them through the injected caching faults of ``rendezvous_helpers/flaky.py``.
"""

from __future__ import annotations

import multiprocessing
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch.distributed as dist
from torch.distributed.elastic.utils import store as store_util

sys.path.insert(0, str(Path(__file__).parent))
from rendezvous_helpers import flaky  # noqa: E402

from hpc_elastic.rendezvous.store import SharedDirStore, key_name  # noqa: E402

FORK = multiprocessing.get_context("fork")


def _store(tmp_path: Path, timeout: float = 5) -> SharedDirStore:
    (tmp_path / "stores").mkdir(mode=0o700, exist_ok=True)
    return SharedDirStore(tmp_path / "stores" / "r0-abc", sync=False,
                          timeout=timedelta(seconds=timeout))


def test_set_get_wait_and_a_missing_key_times_out(tmp_path):
    a, b = _store(tmp_path), _store(tmp_path, timeout=0.3)
    a.set("torchelastic/role_info/0", b"\x00\x01")
    a.multi_set(["x", "y"], ["1", b"2"])
    assert b.get("torchelastic/role_info/0") == b"\x00\x01"
    assert b.multi_get(["x", "y"]) == [b"1", b"2"]
    assert b.check(["x"]) and not b.check(["x", "nope"])
    a.set("x", "3")
    assert b.get("x") == b"3", "the newest value wins"
    start = time.monotonic()
    with pytest.raises(dist.DistStoreError, match="nope"):
        b.get("nope")
    assert 0.25 < time.monotonic() - start < 3
    with pytest.raises(dist.DistStoreError):
        b.wait(["nope"], timedelta(seconds=0.1))
    assert b.compare_set("c", "", "v1") == b"v1"
    assert b.compare_set("c", "wrong", "v2") == b"v1"
    assert a.compare_set("c", "v1", "v2") == b"v2"
    assert key_name("a/b") == "612f62" and key_name("k" * 200).startswith("h")
    assert oct((tmp_path / "stores" / "r0-abc").stat().st_mode & 0o777) == "0o700"


def _adder(directory: str, who: int, count: int, out) -> None:
    if who % 2:
        flaky.install(seed=who)  # half of them through a caching, ESTALE-prone "client"
    store = SharedDirStore(Path(directory), sync=False, timeout=timedelta(seconds=60))
    out.put([store.add("counter", 1) for _ in range(count)])


def test_add_from_six_processes_loses_no_increment(tmp_path):
    store = _store(tmp_path)
    queue = FORK.Queue()
    procs = [FORK.Process(target=_adder, args=(str(store.directory), w, 15, queue))
             for w in range(6)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    seen = sorted(v for r in results for v in r)
    assert seen == list(range(1, 91)), "every add returned a distinct count: none lost"
    assert store.get("counter") == b"90"


def _barrier(directory: str, who: int, out) -> None:
    flaky.install(seed=50 + who)
    store = SharedDirStore(Path(directory), sync=False, timeout=timedelta(seconds=60))
    store.set(f"role/{who}", str(who))
    store_util.barrier(store, 3, "exit", barrier_timeout=60)
    out.put((who, store_util.get_all(store, who, "role/", 3)))


def test_torch_barrier_and_get_all_through_caching_clients(tmp_path):
    store = _store(tmp_path)
    queue = FORK.Queue()
    procs = [FORK.Process(target=_barrier, args=(str(store.directory), w, queue))
             for w in range(3)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    assert results == {w: [b"0", b"1", b"2"] for w in range(3)}
