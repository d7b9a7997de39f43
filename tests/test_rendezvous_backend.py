"""Conformance of the sharedfs storage layer: locking, compare-and-set, heartbeats.

Real processes (forked) contend for the same files, because in-process threads would not show
what matters: a lost update between processes, or a lock left behind by a SIGKILLed holder.
"""

from __future__ import annotations

import errno
import fcntl
import multiprocessing
import os
import signal
import threading
import time
from pathlib import Path

import pytest
from rendezvous_helpers.forked import run_all

from hpc_elastic.rendezvous import LockingUnsupportedError, create_handler
from hpc_elastic.rendezvous.heartbeat import HeartbeatWriter, LivenessObserver, watch_set
from hpc_elastic.rendezvous.layout import RunLayout
from hpc_elastic.rendezvous.locking import LockTimeoutError, ProcessFileLock, probe_flock
from hpc_elastic.rendezvous.state import FsOps, State, StateFile

FORK = multiprocessing.get_context("fork")
WRITERS = 8
UPDATES = 25


def _layout(tmp_path: Path) -> RunLayout:
    layout = RunLayout(tmp_path / "rdzv", "run")
    layout.create()
    return layout


def _cas_writer(root: str, who: int, updates: int, successes) -> None:
    """Optimistic loop: lock-free read, modify, compare_and_set; retry on conflict."""
    store = StateFile(RunLayout(Path(root), "run"), lock_timeout=30)
    done = 0
    while done < updates:
        current = store.read() or State()
        new = current.copy()
        new.waiting.append(f"w{who}-{done}")
        ok, _ = store.compare_and_set(new, current.version)
        if ok:
            done += 1
            with successes.get_lock():
                successes.value += 1


def test_cas_never_loses_an_update_under_concurrent_writer_processes(tmp_path):
    layout = _layout(tmp_path)
    successes = FORK.Value("i", 0)
    procs = [FORK.Process(target=_cas_writer, args=(str(layout.root), i, UPDATES, successes))
             for i in range(WRITERS)]
    run_all(procs, timeout=60)
    final = StateFile(layout, 5).read()
    expected = {f"w{i}-{j}" for i in range(WRITERS) for j in range(UPDATES)}
    assert successes.value == WRITERS * UPDATES
    assert sorted(final.waiting) == sorted(expected), "an update was lost or duplicated"
    assert final.version == WRITERS * UPDATES, "every successful CAS bumps the version once"


def test_transactions_from_threads_of_one_process_are_serialized(tmp_path):
    """Threads share one POSIX lock owner; the in-process mutex must still exclude them."""
    layout = _layout(tmp_path)
    store = StateFile(layout, 30)

    def work(who: int) -> None:
        for j in range(UPDATES):
            store.transact(lambda st, who=who, j=j: st.waiting.append(f"t{who}-{j}") or True)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(WRITERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(store.read().waiting)) == WRITERS * UPDATES


def test_stale_compare_and_set_is_refused(tmp_path):
    store = StateFile(_layout(tmp_path), 5)
    ok, first = store.compare_and_set(State(round=1), 0)
    assert ok and first.version == 1
    ok, current = store.compare_and_set(State(round=99), 0)
    assert not ok and current.round == 1 and current.version == 1


def _hold_lock_then_wait(root: str, ready) -> None:
    layout = RunLayout(Path(root), "run")
    lock = ProcessFileLock.for_path(layout.lock)
    with lock.hold(5):
        (layout.versions / ".tmp-inprogress").write_bytes(b"half a stat")  # a write in progress
        ready.set()
        time.sleep(60)


def _die_between_write_and_rename(root: str) -> None:
    store = StateFile(RunLayout(Path(root), "run"), 5)
    os.link = lambda *a: os.kill(os.getpid(), signal.SIGKILL)  # die right before the commit
    store.transact(lambda st: st.waiting.append("never") or True)


def test_state_survives_a_writer_sigkilled_while_holding_the_lock(tmp_path):
    layout = _layout(tmp_path)
    store = StateFile(layout, 10)
    store.transact(lambda st: st.waiting.append("before") or True)

    ready = FORK.Event()
    holder = FORK.Process(target=_hold_lock_then_wait, args=(str(layout.root), ready))
    holder.start()
    try:
        assert ready.wait(20)
        with pytest.raises(Exception, match="lock"):
            store.transact(lambda st: True, timeout=0.3)  # really held by the other process
        os.kill(holder.pid, signal.SIGKILL)
        holder.join(10)
        start = time.monotonic()
        after = store.transact(lambda st: st.waiting.append("after") or True, timeout=5)
        assert time.monotonic() - start < 2, "the dead holder's lock was released at once"
        assert after.waiting == ["before", "after"]
    finally:
        if holder.is_alive():
            holder.kill()

    crasher = FORK.Process(target=_die_between_write_and_rename, args=(str(layout.root),))
    crasher.start()
    crasher.join(20)
    assert crasher.exitcode == -signal.SIGKILL
    assert store.read().waiting == ["before", "after"], "a half-done write never shows"
    assert store.transact(lambda st: st.waiting.append("again") or True).version == 3


def _enosys(*args, **kwargs):
    raise OSError(errno.ENOSYS, "Function not implemented")


def _eopnotsupp(*args, **kwargs):
    raise OSError(errno.EOPNOTSUPP, "Operation not supported")


@pytest.mark.parametrize("fake", [_enosys, _eopnotsupp])
def test_filesystem_without_flock_fails_with_the_mount_option(tmp_path, monkeypatch, fake):
    monkeypatch.setattr(fcntl, "flock", fake)
    with pytest.raises(LockingUnsupportedError) as info:
        create_handler(tmp_path / "rdzv", "run", 1, 2)
    message = str(info.value)
    assert "-o flock" in message and "localflock" in message and "nolock" in message
    assert isinstance(info.value, ValueError)
    assert not list((tmp_path / "rdzv" / "run").glob(".flock-probe-*")), "probe cleaned up"


def test_lock_acquisition_never_falls_back_to_a_marker_file(tmp_path, monkeypatch):
    layout = _layout(tmp_path)
    probe_flock(layout.run_dir)  # real flock works here
    lock = ProcessFileLock(layout.lock)
    monkeypatch.setattr(fcntl, "flock", _enosys)
    with pytest.raises(LockingUnsupportedError), lock.hold(1):
        pass
    monkeypatch.undo()
    with lock.hold(1):  # still a real flock afterwards, and usable
        other = os.open(layout.lock, os.O_RDWR)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(other)
    assert sorted(p.name for p in layout.run_dir.iterdir() if "lock" in p.name) == [
        "state.lock"], "no marker file beside the lock"


def test_liveness_is_judged_by_counter_progress_on_the_readers_clock(tmp_path):
    ops = FsOps()
    (tmp_path / "hb").mkdir()
    alive = HeartbeatWriter(tmp_path / "hb" / "alive", ops)
    stalled = HeartbeatWriter(tmp_path / "hb" / "stalled", ops)
    alive.beat()
    stalled.beat()
    observer = LivenessObserver(tmp_path / "hb", timeout=10.0, ops=ops)
    nodes = ["alive", "stalled", "never-wrote"]
    assert observer.observe(nodes, now=1000.0) == {}, "nobody is dead at first sight"
    for t in (1004.0, 1008.0):
        alive.beat()
        assert observer.observe(nodes, now=t) == {}
    alive.beat()
    dead = observer.observe(nodes, now=1010.5)
    assert set(dead) == {"stalled", "never-wrote"} and dead["stalled"] == pytest.approx(10.5)
    # The file holds a counter and nothing else: no writer's clock is ever compared.
    assert (tmp_path / "hb" / "alive").read_text().strip().isdigit()
    stalled.beat()  # it comes back
    assert "stalled" not in observer.observe(nodes, now=1011.0)


def test_every_member_is_watched_by_fanout_others():
    members = [f"n{i:03d}" for i in range(50)]
    watchers = {m: 0 for m in members}
    for me in members:
        for watched in watch_set(members, me, 8):
            watchers[watched] += 1
    assert set(watchers.values()) == {8}
    assert watch_set(members, "outsider", 8) == [], "non-members watch nobody"
    assert sorted(watch_set(["a", "b", "c"], "a", 8)) == ["b", "c"]


def _hold_for(path: str, seconds: float, ready) -> None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    ready.set()
    time.sleep(seconds)
    os.close(fd)


def _holding_for(lock: Path, seconds: float):
    """A forked process that holds ``lock`` for ``seconds`` (started, and holding it)."""
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    holder = ctx.Process(target=_hold_for, args=(str(lock), seconds, ready))
    holder.start()
    assert ready.wait(20)
    return holder


def test_a_held_lock_is_waited_for_in_the_queue_and_a_timed_out_wait_frees_it_later(tmp_path):
    """A waiter is granted the lock as soon as the holder lets go (no polling delay); a wait
    that timed out leaves nothing held once its queued request completes."""
    layout = _layout(tmp_path)
    holder = _holding_for(layout.lock, 1.5)
    lock = ProcessFileLock(layout.lock)
    start = time.monotonic()
    with pytest.raises(LockTimeoutError), lock.hold(0.3):
        pass
    assert time.monotonic() - start < 1.2
    with lock.hold(20):  # the timed-out request is granted and dropped, then ours
        waited = time.monotonic() - start
    holder.join(10)
    assert 1.2 < waited < 4, waited
    with lock.hold(1):
        pass


class _Interrupt(Exception):
    pass


def test_a_lock_wait_interrupted_by_a_signal_leaves_the_lock_free(tmp_path):
    """torch's agent raises SIGTERM as an exception in the main thread, wherever it is. One that
    lands while this process waits in the lock queue must not leave the queued request to be
    granted later and then held by nobody: the other nodes could never take the lock again."""
    layout = _layout(tmp_path)
    holder = _holding_for(layout.lock, 1.5)
    lock = ProcessFileLock(layout.lock)

    def interrupt(_signum, _frame):
        raise _Interrupt("SIGALRM while queued")

    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.3)
        with pytest.raises(_Interrupt), lock.hold(20):
            pass
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    holder.join(10)
    # Another process gets the lock soon after the holder let go: nothing of ours holds it.
    ctx = multiprocessing.get_context("fork")
    other = ctx.Process(target=_hold_for, args=(str(layout.lock), 0.0, ctx.Event()))
    start = time.monotonic()
    other.start()
    other.join(10)
    if other.is_alive():
        other.kill()
    assert other.exitcode == 0 and time.monotonic() - start < 5, "the lock stayed held"
    with lock.hold(5):  # and this process can take it again
        pass

