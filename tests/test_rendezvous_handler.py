"""The sharedfs handler end to end, with several handlers ("nodes") per test.

Handlers run in threads of this process (each is a distinct node: own id, own heartbeats) or,
where a node must die for real, in a forked process that is SIGKILLed.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import signal
import threading
import time
from importlib.metadata import entry_points
from pathlib import Path

import pytest
from rendezvous_helpers.threads import rendezvous_all
from torch.distributed.elastic.rendezvous import RendezvousParameters
from torch.distributed.elastic.rendezvous.api import (
    RendezvousClosedError,
    RendezvousError,
    RendezvousGracefulExitError,
    RendezvousTimeoutError,
)
from torch.distributed.elastic.rendezvous.registry import get_rendezvous_handler

from hpc_elastic.rendezvous import SharedFSConfigError, create_handler
from hpc_elastic.rendezvous.state import State, StateFile

FAST = {"heartbeat_interval": 0.1, "heartbeat_timeout": 0.6, "last_call_timeout": 5,
        "join_timeout": 20}
FORK = multiprocessing.get_context("fork")


def _handlers(root: Path, n: int, lo: int, hi: int, **kw):
    settings = {**FAST, **kw}
    return [create_handler(root, "run", lo, hi, local_addr="127.0.0.1", **settings)
            for _ in range(n)]


@pytest.fixture
def shutdown_later():
    handlers = []
    yield handlers.extend
    for h in handlers:
        h.shutdown()


def test_nodes_get_distinct_ranks_one_master_and_a_shared_store(tmp_path, shutdown_later):
    handlers = _handlers(tmp_path, 4, 2, 4)
    shutdown_later(handlers)
    infos = rendezvous_all(handlers)
    assert sorted(i.rank for i in infos) == [0, 1, 2, 3]
    assert {i.world_size for i in infos} == {4}
    masters = {(i.bootstrap_store_info.master_addr, i.bootstrap_store_info.master_port)
               for i in infos}
    assert len(masters) == 1 and next(iter(masters))[0] == "127.0.0.1"
    infos[0].store.set("k", b"v")
    assert infos[3].store.get("k") == b"v", "every node got the same store"
    assert all(h.get_backend() == "sharedfs" and h.get_run_id() == "run" for h in handlers)
    assert not handlers[0].use_agent_store
    assert oct(handlers[0].run_dir.stat().st_mode & 0o777) == "0o700"


def test_rerendezvous_forms_a_new_round_with_a_new_store_and_stable_ranks(tmp_path,
                                                                           shutdown_later):
    handlers = _handlers(tmp_path, 3, 2, 3)
    shutdown_later(handlers)
    first = rendezvous_all(handlers)
    assert [h.num_nodes_waiting() for h in handlers] == [0, 0, 0]
    start = time.monotonic()
    second = rendezvous_all(handlers)
    assert time.monotonic() - start < 2, "a full re-formation completes without last call"
    assert [i.rank for i in second] == [i.rank for i in first]
    assert {h.round for h in handlers} == {1}
    first[0].store.set("old", b"1")
    with pytest.raises(RuntimeError):
        second[0].store.set_timeout(__import__("datetime").timedelta(seconds=0.2))
        second[0].store.get("old")  # a fresh file per round: no keys leak between rounds


def test_late_node_is_announced_and_admitted_at_the_next_round(tmp_path, shutdown_later):
    handlers = _handlers(tmp_path, 2, 2, 3, last_call_timeout=0.3)
    late = _handlers(tmp_path, 1, 2, 3, last_call_timeout=0.3)[0]
    shutdown_later([*handlers, late])
    rendezvous_all(handlers)
    box = {}
    thread = threading.Thread(target=lambda: box.setdefault("info", late.next_rendezvous()))
    thread.start()
    deadline = time.monotonic() + 5
    while handlers[0].num_nodes_waiting() == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert handlers[0].num_nodes_waiting() == 1
    infos = rendezvous_all(handlers)
    thread.join(10)
    assert {i.world_size for i in infos} == {3} and box["info"].world_size == 3
    assert box["info"].rank == 2, "the newcomer ranks after the old members"


def test_surplus_node_waits_without_forcing_restarts_and_exits_gracefully(tmp_path):
    handlers = _handlers(tmp_path, 2, 1, 2)
    spare = _handlers(tmp_path, 1, 1, 2)[0]
    rendezvous_all(handlers)
    box: dict[str, BaseException] = {}

    def wait_spare():
        try:
            spare.next_rendezvous()
        except BaseException as exc:  # noqa: BLE001
            box["exc"] = exc

    thread = threading.Thread(target=wait_spare)
    thread.start()
    time.sleep(0.5)
    assert handlers[0].num_nodes_waiting() == 0, "the group is full: no restart for a spare"
    handlers[0].shutdown()
    thread.join(10)
    assert isinstance(box.get("exc"), RendezvousGracefulExitError)
    assert handlers[1].is_closed()
    spare.shutdown()
    handlers[1].shutdown()


def test_member_of_a_completed_round_gets_it_even_if_a_peer_closed_already(tmp_path):
    """A peer may complete the round and close the rendezvous before we poll again."""
    (slow,) = _handlers(tmp_path, 1, 2, 2, poll_interval=0.5, poll_interval_max=0.5)
    (fast,) = _handlers(tmp_path, 1, 2, 2)
    box = {}
    thread = threading.Thread(target=lambda: box.setdefault("info", slow.next_rendezvous()))
    thread.start()
    time.sleep(0.2)  # slow has joined and sleeps in its poll
    assert fast.next_rendezvous().world_size == 2
    fast.shutdown()
    thread.join(10)
    assert box["info"].world_size == 2 and box["info"].rank == 0
    slow.shutdown()


def _join_then_hang(root: str, ready) -> None:
    h = create_handler(root, "run", 2, 3, local_addr="127.0.0.1", **FAST)
    h.next_rendezvous()
    ready.set()
    time.sleep(120)


def _form_with_a_victim(tmp_path: Path, survivors: list, victim_first: bool):
    """A 3-node round of ``survivors`` and a forked victim process that joins first (rank 0)
    or last (rank 2). Returns the victim and the survivors' infos."""
    ready = FORK.Event()
    victim = FORK.Process(target=_join_then_hang, args=(str(tmp_path), ready))
    if victim_first:
        victim.start()
        time.sleep(0.3)
        infos = rendezvous_all(survivors)
    else:
        box = {}
        t = threading.Thread(target=lambda: box.setdefault("i", rendezvous_all(survivors)))
        t.start()
        time.sleep(0.3)
        victim.start()
        t.join(20)
        infos = box["i"]
    if not ready.wait(20):
        victim.kill()
        raise AssertionError("the victim did not join")
    return victim, infos


@pytest.mark.parametrize("victim_rank", [0, 2])
def test_dead_node_is_dropped_and_survivors_reform(tmp_path, shutdown_later, victim_rank):
    survivors = _handlers(tmp_path, 2, 2, 3)
    shutdown_later(survivors)
    victim, infos = _form_with_a_victim(tmp_path, survivors, victim_first=victim_rank == 0)
    try:
        assert {i.world_size for i in infos} == {3}
        assert sorted(i.rank for i in infos) == sorted({0, 1, 2} - {victim_rank})
        os.kill(victim.pid, signal.SIGKILL)
        victim.join(10)
        killed = time.monotonic()
        # survivors notice on their own (the agent polls num_nodes_waiting while training)
        deadline = killed + 5
        while survivors[0].num_nodes_waiting() == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert survivors[0].num_nodes_waiting() >= 1, "the dead node was reported"
        infos = rendezvous_all(survivors)
        took = time.monotonic() - killed
        assert {i.world_size for i in infos} == {2}
        assert sorted(i.rank for i in infos) == [0, 1]
        masters = {i.bootstrap_store_info.master_port for i in infos}
        assert len(masters) == 1
        assert took < FAST["heartbeat_timeout"] + 3, f"re-formed after {took:.1f} s"
    finally:
        if victim.is_alive():
            victim.kill()


def test_a_killed_member_is_reported_lost_once_declared_dead(tmp_path, shutdown_later):
    """Workers whose peer's connection closed ask whether a member is lost before the dead node
    is declared (its connections closed at once, its heartbeat stops): the answer waits for
    the declaration instead of calling the echo a fault."""
    survivors = _handlers(tmp_path, 2, 2, 3, heartbeat_timeout=1.0)
    shutdown_later(survivors)
    victim, infos = _form_with_a_victim(tmp_path, survivors, victim_first=False)
    try:
        assert {i.world_size for i in infos} == {3}
        os.kill(victim.pid, signal.SIGKILL)
        victim.join(10)
        killed = time.monotonic()
        assert survivors[0].lost_a_member() is False  # not declared yet
        assert survivors[0].wait_for_member_loss() is True
        took = time.monotonic() - killed
        # declared after heartbeat_timeout (1 s), judged every heartbeat_interval (0.1 s)
        assert 0.5 < took < 1.0 + 2 * 0.1 + 1.5, took
        assert survivors[0].num_nodes_waiting() >= 1  # the agent re-forms at once
    finally:
        if victim.is_alive():
            victim.kill()


def test_no_member_is_reported_lost_while_every_heartbeat_moves(tmp_path, shutdown_later):
    """The same question when every member lives (a connection failed for another reason):
    answered as soon as each other member's heartbeat moved, not after heartbeat_timeout."""
    handlers = _handlers(tmp_path, 3, 3, 3, heartbeat_timeout=30)
    shutdown_later(handlers)
    rendezvous_all(handlers)
    began = time.monotonic()
    assert handlers[0].wait_for_member_loss() is False
    assert time.monotonic() - began < 3.0  # beats every 0.1 s; 30 s + 0.2 s if it waited out


def test_departed_node_is_not_waited_for_and_the_run_stays_open(tmp_path, shutdown_later):
    """A node whose job ends (a cancelled grow job) departs: the others re-form without it at
    once, not after heartbeat_timeout, and the run is not closed for them."""
    handlers = _handlers(tmp_path, 3, 1, 3, heartbeat_timeout=60)
    shutdown_later(handlers[:2])
    rendezvous_all(handlers)
    assert handlers[2].depart()
    assert handlers[0].num_nodes_waiting() >= 1, "the survivors learn their round is over"
    start = time.monotonic()
    infos = rendezvous_all(handlers[:2])
    assert time.monotonic() - start < 5, "no wait for the departed node's heartbeat to age"
    assert {i.world_size for i in infos} == {2}
    assert not handlers[0].is_closed()


def test_join_timeout_raises_and_withdraws_the_node(tmp_path):
    (h,) = _handlers(tmp_path, 1, 2, 2, join_timeout=0.5)
    with pytest.raises(RendezvousTimeoutError, match="join_timeout"):
        h.next_rendezvous()
    state = StateFile(h._layout, 5).read()
    assert h.node_id not in state.participants
    h.shutdown()


def test_closed_run_is_not_reused_but_a_new_attempt_is_isolated(tmp_path):
    (h,) = _handlers(tmp_path, 1, 1, 1)
    h.next_rendezvous()
    assert h.shutdown() and h.is_closed()
    (again,) = _handlers(tmp_path, 1, 1, 1)
    with pytest.raises(RendezvousClosedError, match="attempt"):
        again.next_rendezvous()
    (fresh,) = _handlers(tmp_path, 1, 1, 1, attempt=1)
    assert fresh.run_dir.name == "run.attempt-1"
    assert fresh.next_rendezvous().world_size == 1
    fresh.shutdown()


def test_leftovers_of_a_crashed_run_do_not_confuse_a_new_one(tmp_path, shutdown_later):
    probe = _handlers(tmp_path, 1, 1, 1)[0]
    store = StateFile(probe._layout, 5)
    store.transact(lambda st: st.__dict__.update(
        State(round=7, phase="complete", participants=["ghost-1", "ghost-2"],
              endpoints={"ghost-1": "10.9.9.9:1", "ghost-2": "10.9.9.9:2"}).__dict__) or True)
    (probe._layout.versions / ".tmp-crashed").write_bytes(b"torn write of a crashed writer")
    handlers = _handlers(tmp_path, 2, 2, 2)
    shutdown_later(handlers)
    infos = rendezvous_all(handlers)
    assert {i.world_size for i in infos} == {2}
    assert {i.bootstrap_store_info.master_addr for i in infos} == {"127.0.0.1"}
    assert handlers[0].round == 8


class _Capture(logging.Handler):
    def __init__(self):
        super().__init__()
        self.events = []

    def emit(self, record):
        self.events.append(json.loads(record.getMessage()))


def test_events_reach_the_torch_rendezvous_event_logger(tmp_path):
    from torch.distributed.elastic import events

    events._get_or_create_logger("dynamic_rendezvous")  # what torch does on first record
    capture = _Capture()
    logger = logging.getLogger("torchelastic-events-dynamic_rendezvous")
    logger.addHandler(capture)
    try:
        handlers = _handlers(tmp_path, 2, 2, 2)
        rendezvous_all(handlers)
        for h in handlers:
            h.shutdown()
    finally:
        logger.removeHandler(capture)
    names = [e["name"] for e in capture.events]
    assert names.count("sharedfs.rendezvous.completed") == 2
    assert "sharedfs.rendezvous.round_formed" in names and "sharedfs.rendezvous.closed" in names
    done = [e for e in capture.events if e["name"] == "sharedfs.rendezvous.completed"]
    md = done[0]["metadata"]
    assert md["run_id"] == "run" and md["world_size"] == 2 and md["round"] == 0
    assert md["duration_ms"] >= 0 and md["master_addr"] == "127.0.0.1"
    assert done[0]["timestamp"] > 1_600_000_000_000


# ------------------------------------------------------------------------------- bad inputs
def _error(call) -> str:
    with pytest.raises(SharedFSConfigError) as info:
        call()
    assert isinstance(info.value, RendezvousError) and isinstance(info.value, ValueError)
    return str(info.value)


@pytest.mark.parametrize("run_id", ["..", "../escape", "a/b", "/abs", "", ".hidden", "x..y"])
def test_run_id_that_could_escape_the_root_is_refused(tmp_path, run_id):
    message = _error(lambda: create_handler(tmp_path, run_id, 1, 1))
    assert "--rdzv-id" in message
    assert list(tmp_path.iterdir()) == [], "nothing was created"


@pytest.mark.parametrize("launched", ["0", "two", 2.5, True, -1])
def test_a_launched_count_that_is_no_count_of_nodes_is_refused(tmp_path, launched):
    message = _error(lambda: create_handler(tmp_path, "run", 1, 4, launched_nodes=launched))
    assert "launched_nodes" in message and "--rdzv-conf launched_nodes=N" in message


def test_a_launched_count_from_the_command_line_is_read_as_a_number(tmp_path):
    assert create_handler(tmp_path, "run", 1, 4, launched_nodes="3").settings.launched_nodes == 3


def test_unusable_directory_is_reported_with_the_fix(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    message = _error(lambda: create_handler(blocker / "rdzv", "run", 1, 1))
    assert "writable directory" in message and "--rdzv-endpoint" in message
    message = _error(lambda: create_handler(blocker, "run", 1, 1))
    assert "not a directory" in message
    if os.geteuid() != 0:  # root ignores permission bits
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        assert "cannot write" in _error(lambda: create_handler(ro, "run", 1, 1))


def test_impossible_node_counts_and_settings_are_refused(tmp_path):
    assert "--nnodes" in _error(lambda: create_handler(tmp_path, "run", 3, 2))
    assert "--nnodes" in _error(lambda: create_handler(tmp_path, "run", 0, 2))
    message = _error(lambda: create_handler(tmp_path, "run", 1, 2, hearbeat_timeout=3))
    assert "hearbeat_timeout" in message and "heartbeat_timeout" in message
    message = _error(lambda: create_handler(tmp_path, "run", 1, 2, heartbeat_interval=5,
                                            heartbeat_timeout=6))
    assert "twice" in message
    assert "seconds" in _error(lambda: create_handler(tmp_path, "run", 1, 2, join_timeout="x"))
    assert "-o flock" in _error(lambda: create_handler(tmp_path, "run", 1, 2, lock_mode="none"))


def test_torchrun_entry_point_builds_the_handler(tmp_path):
    names = [ep.name for ep in entry_points(group="torchrun.handlers")]
    assert "sharedfs" in names
    params = RendezvousParameters("sharedfs", str(tmp_path), "tr", 1, 2, "127.0.0.1",
                                  timeout="900", heartbeat_interval="0.5",
                                  heartbeat_timeout="2", attempt="3")
    handler = get_rendezvous_handler(params)
    assert handler.get_backend() == "sharedfs"
    assert handler.settings.heartbeat_interval == 0.5
    assert handler.run_dir == tmp_path / "tr.attempt-3"
    bad = RendezvousParameters("sharedfs", "localhost:29400", "tr", 1, 2)
    assert "absolute path" in _error(lambda: get_rendezvous_handler(bad))
