"""Batched joins (``requests/<node>``, hpc_elastic/rendezvous/requests.py): many joins folded into
one commit by whoever holds the state lock; a stale request never resurrects a dead node; a
forged or malformed request file is rejected with its reason; a joiner whose request nobody
folds still joins (through the lock). Real handlers in threads, real files, a real lock.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import pytest
from rendezvous_helpers.threads import finish_rendezvous, rendezvous_all, start_rendezvous

from hpc_elastic.rendezvous import create_handler, protocol
from hpc_elastic.rendezvous import handler as handler_module
from hpc_elastic.rendezvous.layout import RunLayout
from hpc_elastic.rendezvous.locking import ProcessFileLock
from hpc_elastic.rendezvous.requests import JoinRequest, RequestBox
from hpc_elastic.rendezvous.state import COMPLETE, State, StateFile

FAST = {"heartbeat_interval": 0.1, "heartbeat_timeout": 0.6, "last_call_timeout": 5,
        "join_timeout": 30}


def _handlers(root: Path, n: int, lo: int, hi: int, **kw):
    return [create_handler(root, "run", lo, hi, local_addr="127.0.0.1", **{**FAST, **kw})
            for _ in range(n)]


def _wait_for(predicate, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.02)


def _versions(layout: RunLayout) -> list[str]:
    return sorted(n for n in os.listdir(layout.versions) if not n.startswith("."))


def _requests(layout: RunLayout) -> list[str]:
    return sorted(n for n in os.listdir(layout.requests) if not n.startswith("."))


@pytest.fixture
def shutdown_later():
    handlers = []
    yield handlers.extend
    for h in handlers:
        h.shutdown()


def test_fold_joins_many_requests_as_their_own_joins_would(tmp_path):
    state = State()
    reqs = [JoinRequest(f"n{i:03d}", f"127.0.0.1:{1000 + i}", 0, None) for i in range(100)]
    done, verdicts = protocol.fold(state, reqs, 2, 64)
    assert set(verdicts.values()) == {"joined"}
    assert state.phase == COMPLETE and len(state.participants) == 64
    assert state.waiting == [r.node for r in reqs[64:]], "beyond max_nodes: waiting, in order"
    assert done == ["completed:max_nodes"]
    again, verdicts = protocol.fold(state, reqs, 2, 64)
    assert again == [] and set(verdicts.values()) == {"present"}, "folding twice is a no-op"


def test_many_pending_joins_are_folded_into_one_commit(tmp_path, shutdown_later):
    n = 12
    handlers = _handlers(tmp_path, n, n, n)
    shutdown_later(handlers)
    layout = RunLayout(tmp_path, "run")
    lock = ProcessFileLock.for_path(layout.lock)
    with lock.hold(10):  # a holder that is busy while every node arrives
        threads, results = start_rendezvous(handlers)
        _wait_for(lambda: len(_requests(layout)) == n)
        assert _versions(layout) == [], "nobody got past the held lock"
    infos = finish_rendezvous(threads, results)
    assert sorted(i.rank for i in infos) == list(range(n))
    assert _versions(layout) == ["000000000001"], "all joins in the first commit"
    assert _requests(layout) == [], "folded requests are removed"


def test_a_stale_request_never_resurrects_a_node_declared_dead(tmp_path, shutdown_later):
    layout = RunLayout(tmp_path, "run")
    layout.create()
    store = StateFile(layout, lock_timeout=10)
    box = RequestBox(layout, sync=False)
    # 'ghost' joined round 1 through a holder that crashed before removing its request; then
    # 'ghost' died and was declared dead. 'old' left a request made for a round long gone.
    store.transact(lambda st: setattr(st, "round", 1) or True)
    store.transact(lambda st: bool(protocol.join(st, "ghost", "127.0.0.1:1", None, 2, 3)))
    store.transact(lambda st: bool(protocol.declare_dead(st, ["ghost"], 2, 3)))
    box.submit(JoinRequest("ghost", "127.0.0.1:1", 1, None))
    box.submit(JoinRequest("old", "127.0.0.1:2", 0, None))
    handlers = _handlers(tmp_path, 2, 2, 2)
    shutdown_later(handlers)
    infos = rendezvous_all(handlers)
    final = store.read()
    assert final is not None and final.phase == COMPLETE
    assert "ghost" not in final.participants and "ghost" in final.dead
    assert "old" not in final.participants + final.waiting
    assert {i.world_size for i in infos} == {2}
    assert _requests(layout) == [], "the stale requests were removed, unfolded"
    _, verdicts = protocol.fold(final, [JoinRequest("ghost", "127.0.0.1:1", final.round,
                                                       None)], 1, 3)
    assert verdicts == {"ghost": "dead"} and "ghost" not in final.participants


def _forge(layout: RunLayout, name: str, data: bytes, mode: int = 0o600) -> Path:
    path = layout.request(name)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    os.write(fd, data)
    os.close(fd)
    os.chmod(path, mode)
    return path


def test_forged_or_malformed_request_files_are_rejected_with_their_reason(tmp_path,
                                                                          shutdown_later,
                                                                          caplog):
    layout = RunLayout(tmp_path, "run")
    layout.create()
    good = JoinRequest("other", "127.0.0.1:9", 0, None).encode()
    _forge(layout, "garbage", b"{not json\n")
    _forge(layout, "liar", good)  # claims to be 'other'
    _forge(layout, "bad-endpoint", good.replace(b"other", b"bad-endpoint")
           .replace(b"127.0.0.1:9", b"/etc/passwd"))
    _forge(layout, "writable", good.replace(b"other", b"writable"), mode=0o666)
    os.symlink(tmp_path / "elsewhere", layout.request("link"))
    if os.geteuid() == 0:
        os.chown(_forge(layout, "stranger", good.replace(b"other", b"stranger")), 4321, 4321)
    found, rejected = RequestBox(layout, sync=False).scan()
    assert found == []
    reasons = {Path(r.path).name: r.reason for r in rejected}
    assert "not JSON" in reasons["garbage"]
    assert "not the file's name" in reasons["liar"]
    assert "not host:port" in reasons["bad-endpoint"]
    assert "others can write it" in reasons["writable"]
    assert "symbolic link" in reasons["link"]
    if os.geteuid() == 0:
        assert "uid 4321" in reasons["stranger"]
    handlers = _handlers(tmp_path, 2, 2, 2)
    shutdown_later(handlers)
    with caplog.at_level(logging.WARNING, logger="hpc_elastic.rendezvous"):
        infos = rendezvous_all(handlers)
    assert {i.world_size for i in infos} == {2}, "forged requests joined nobody"
    final = StateFile(layout, 5).read()
    assert final is not None and sorted(final.participants) == sorted(h.node_id for h in handlers)
    assert _requests(layout) == [], "rejected files are removed"
    assert not (tmp_path / "elsewhere").exists(), "the symlink was never followed"
    logged = caplog.text
    assert "join request file" in logged and "not JSON" in logged and "rejected" in logged


def test_a_joiner_whose_request_is_never_folded_still_joins(tmp_path, shutdown_later,
                                                             monkeypatch):
    monkeypatch.setattr(handler_module, "BATCH_PATIENCE", 0.2)
    monkeypatch.setattr(handler_module, "BATCH_LIMIT", 0.6)
    layout = RunLayout(tmp_path, "run")
    handlers = _handlers(tmp_path, 1, 1, 1, poll_interval_max=0.05)
    shutdown_later(handlers)
    lock = ProcessFileLock.for_path(layout.lock)
    with lock.hold(10):
        threads, results = start_rendezvous(handlers)
        _wait_for(lambda: _requests(layout) == [handlers[0].node_id])
        os.unlink(layout.request(handlers[0].node_id))  # lost: no holder will ever see it
        time.sleep(1.5)  # past BATCH_LIMIT: the joiner queues for the lock
        assert threads[0].is_alive()
    (info,) = finish_rendezvous(threads, results)
    assert info.world_size == 1 and info.rank == 0
    assert _versions(layout) == ["000000000001"]
