"""``SharedFSRendezvousHandler``: torch's ``RendezvousHandler`` over a shared directory.

The handler is the only piece with I/O and threads; the rules live in :mod:`.protocol`.
Why not torch's ``DynamicRendezvousHandler`` with a file backend? It sleeps a fixed second
between polls (``_Action.SYNC``) and judges heartbeats by comparing the writers' wall clocks. This
handler polls the first line of a small file every 20 ms (backing off to 200 ms while nothing
changes), so a round forms in tens of milliseconds, and judges liveness by counters on the
reader's own monotonic clock.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import socket
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

from torch.distributed.elastic.rendezvous.api import (
    RendezvousClosedError,
    RendezvousGracefulExitError,
    RendezvousHandler,
    RendezvousInfo,
    RendezvousStoreInfo,
    RendezvousTimeoutError,
)

from . import protocol
from .errors import FencedError, RunIdInUseError, SharedFSRendezvousError
from .events import DEFAULT_DESTINATION, EventEmitter, logger
from .heartbeat import UNKNOWN, HeartbeatWriter, LivenessObserver, watch_set
from .layout import RunLayout
from .locking import probe_flock
from .requests import JoinRequest, Rejected, RequestBox, rejection_message
from .settings import COMMAND_KEY_PREFIX, Settings
from .state import COMPLETE, JOINING, FsOps, Head, State, StateFile
from .store import SharedDirStore

BACKEND_NAME = "sharedfs"
#: How many ring neighbours each node watches (see :func:`.heartbeat.watch_set`).
WATCH_FANOUT = 8
#: Batched joins (see ``_join``): a joiner whose request is not folded polls up to
#: ``BATCH_PATIENCE`` s for a new version, then tries the lock again; after ``BATCH_LIMIT`` s
#: in all it queues for the lock itself.
BATCH_PATIENCE = 1.0
BATCH_LIMIT = 60.0
#: Nodes per ``poll_interval`` of head polling: a round of N nodes is polled every
#: ``poll_interval * N / POLL_SPREAD`` s at the fastest (at most ``poll_interval_max``), so N
#: waiting nodes do not flood a shared filesystem's clients with reads while a few
#: nodes still see a change within ``poll_interval``.
POLL_SPREAD = 16
#: While a forming round keeps changing, a waiting node re-reads the whole state this often.
FULL_REFRESH = 1.0
_HOST_CHARS = re.compile(r"[^A-Za-z0-9_-]")


def make_node_id() -> str:
    """``<host>-<pid>-<random>``: unique per handler, readable in logs, safe as a file name."""
    host = _HOST_CHARS.sub("_", socket.gethostname().split(".")[0])[:40] or "host"
    return f"{host}-{os.getpid()}-{secrets.token_hex(3)}"


def free_port() -> int:
    """A port free right now on this node, for the workers' ``MASTER_PORT`` if we get rank 0."""
    for family, addr in ((socket.AF_INET, ""), (socket.AF_INET6, "::")):
        try:
            with socket.socket(family, socket.SOCK_STREAM) as sock:
                sock.bind((addr, 0))
                return int(sock.getsockname()[1])
        except OSError:
            continue
    raise OSError("no free TCP port on this node")


#: errnos with which a network filesystem client says it lost its server (or its locks):
#: the node is cut off from the others' state, whatever the file.
LOST_FS_ERRNOS = frozenset({errno.ENOTCONN, errno.ECONNABORTED, errno.EBADFD, errno.ESHUTDOWN,
                            errno.ECONNRESET, errno.ETIMEDOUT, errno.EIO, errno.ENODEV})


def lost_fs_name(err: OSError) -> str:
    """``ENOTCONN: Transport endpoint is not connected`` for an ``OSError``."""
    name = errno.errorcode.get(err.errno or 0, str(err.errno))
    return f"{name}: {err.strerror or os.strerror(err.errno or 0)}"


def fastest_poll(head: Head | None, poll_interval: float, poll_interval_max: float) -> float:
    """The shortest pause between two head polls for a round the size ``head`` shows."""
    nodes = (head.n + head.nw) if head is not None else 0
    return min(poll_interval_max, poll_interval * max(1.0, nodes / POLL_SPREAD))


def _matters(head: Head) -> tuple:
    """The part of the head whose change a waiting node must look at at once."""
    return head.round, head.phase, head.closed, head.nd


class SharedFSRendezvousHandler(RendezvousHandler):
    """A rendezvous whose only meeting point is a directory every node mounts.

    Build it with :func:`hpc_elastic.rendezvous.create_handler` (or through torchrun with
    ``--rdzv-backend=sharedfs``). One handler is one node for the lifetime of its process.
    """

    def __init__(self, root: Path | str, settings: Settings, local_addr: str | None = None,
                 event_destination: str = DEFAULT_DESTINATION) -> None:
        self._settings = settings
        self._layout = RunLayout(Path(root).absolute(), settings.run_dir_name)
        self._node = make_node_id()
        self._events = EventEmitter(settings.run_id, settings.attempt, self._node,
                                    event_destination)
        self._layout.create()
        probe_flock(self._layout.run_dir)
        #: Filesystem operations made by this handler (state, heartbeats; not the store).
        self.fs_ops = FsOps()
        self._state_file = StateFile(self._layout, settings.lock_timeout, self.fs_ops)
        self._requests = RequestBox(self._layout, self._state_file.sync, self.fs_ops)
        self._addr = local_addr or socket.getfqdn()
        self._round: int | None = None
        self._beater = HeartbeatWriter(self._layout.heartbeat(self._node), self.fs_ops,
                                       sync=self._state_file.sync)
        self._observer = LivenessObserver(self._layout.heartbeats, settings.heartbeat_timeout,
                                          self.fs_ops)
        self._hb_thread: threading.Thread | None = None
        self._hb_stop = threading.Event()
        self._nnw_cache: tuple[float, int] = (-1.0, 0)
        self._shut = False
        #: Monotonic time of the last heartbeat that reached the filesystem (fsync succeeded),
        #: and since when beats fail (None: the last one worked). See :meth:`_check_fenced`.
        self._beat_ok_at = time.monotonic()
        self._beat_failing_since: float | None = None
        #: Monotonic time a beat started that has not returned yet (None: no beat under way).
        self._beat_since: float | None = None
        self._last_beat_error: OSError | None = None
        self._fenced: FencedError | None = None
        self._fence_lock = threading.Lock()
        self._watch_thread: threading.Thread | None = None
        self._judge_thread: threading.Thread | None = None
        #: Called (once, from whichever thread notices) when this node is fenced, before
        #: anything else happens -- even while the main thread is blocked in the filesystem.
        #: The hpc_elastic agent kills its workers here (hpc_elastic/agent/runner.py).
        self.on_fenced: Callable[[], None] | None = None
        #: Called with (round, world size) each time this node completes a round, before the
        #: agent starts the round's workers (under torchrun: the hang watch, see
        #: hpc_elastic/agent/torchrun_hangs.py); ``on_shutdown`` when the rendezvous closes.
        self.on_round: Callable[[int, int], None] | None = None
        self.on_shutdown: Callable[[], None] | None = None

    # ------------------------------------------------------------------------- identity, getters
    @property
    def settings(self) -> Settings:
        return self._settings

    @property
    def node_id(self) -> str:
        return self._node

    @property
    def run_dir(self) -> Path:
        return self._layout.run_dir

    @property
    def round(self) -> int | None:
        """The round this node last completed (``None`` before its first rendezvous)."""
        return self._round

    def get_backend(self) -> str:
        return BACKEND_NAME

    def get_run_id(self) -> str:
        return self._settings.run_id

    @property
    def use_agent_store(self) -> bool:
        # Workers must not depend on a store hosted by one agent: it dies with its node. They
        # build their own TCPStore at MASTER_ADDR:MASTER_PORT, which we publish per round.
        return False

    # --------------------------------------------------------------------------- the rendezvous
    def next_rendezvous(self) -> RendezvousInfo:
        s = self._settings
        start = time.monotonic()
        deadline = start + s.join_timeout
        leaving = self._round
        self._check_fenced()
        self._start_heartbeats()
        endpoint = f"{self._addr}:{free_port()}"
        self._events.emit("started", f"joining (leaving round {leaving})", leaving_round=leaving)
        try:
            if leaving is None:
                self._check_run_key(deadline)
            state = self._join(endpoint, leaving)
            state = self._wait(state, endpoint, leaving, start, deadline)
        except Exception as exc:
            fenced = self.explain(exc)
            self._events.emit(
                "failed", f"{type(fenced).__name__}: {fenced}", error=type(fenced).__name__,
                duration_ms=round((time.monotonic() - start) * 1000, 3),
            )
            if fenced is not exc:
                raise fenced from exc
            raise
        return self._result(state, start)

    def _step(self, endpoint: str, leaving: int | None) -> State:
        s = self._settings
        done: list[str] = []

        def change(st: State) -> bool:
            done[:] = protocol.join(st, self._node, endpoint, leaving, s.min_nodes, s.max_nodes,
                                    s.run_key, s.launched_nodes)
            return bool(done)

        state = self._transact(change)
        self._report(done, state)
        return state

    def _join(self, endpoint: str, leaving: int | None) -> State:
        """Join by request (batched, see :mod:`.requests`); through the lock if not folded soon.

        The joiner commits ``requests/<node>`` naming the round it saw, then tries the lock
        without waiting: free, it commits its join and folds everyone else's pending request;
        taken, its holder (or the next) will most likely fold this request, so it polls the
        state's head instead of queueing, and tries the lock again after each new version
        that did not fold it, or after ``BATCH_PATIENCE`` s without one (a new round: it
        renews its request for that round). Not folded after ``BATCH_LIMIT`` s, it queues for
        the lock like a join without requests: a request that no holder ever sees (a listing
        that lags, a holder that crashed) costs time, never the join.
        """
        s = self._settings
        try:
            seen = self._state_file.read() or State()
        except (OSError, SharedFSRendezvousError):
            return self._step(endpoint, leaving)
        if not protocol.wants_to_join(seen, self._node, leaving, s.max_nodes, s.run_key):
            return seen
        if seen.closed or self._node in seen.dead:
            return self._step(endpoint, leaving)  # fold never resurrects: join ourselves
        request = JoinRequest(self._node, endpoint, seen.round, leaving, s.run_key)
        try:
            self._requests.submit(request)
        except OSError as exc:  # FencedError is not an OSError: it ends the join
            logger.debug("could not leave a join request, joining through the lock: %s", exc)
            return self._step(endpoint, leaving)
        done: list[str] = []

        def change(st: State) -> bool:
            done[:] = protocol.join(st, self._node, endpoint, leaving, s.min_nodes, s.max_nodes,
                                    s.run_key, s.launched_nodes)
            return bool(done)

        try:
            version = seen.version
            give_up = time.monotonic() + BATCH_LIMIT
            while time.monotonic() < give_up:
                state = self._try_transact(change)
                if state is not None:
                    self._report(done, state)
                    return state
                state, newer = self._await_fold(version, leaving)
                if state is not None:
                    return state
                if newer is not None:
                    version = newer.version
                    if newer.round != request.round and not newer.closed:
                        # A new round: the old request is stale now (removed unfolded).
                        request = JoinRequest(self._node, endpoint, newer.round, leaving,
                                              s.run_key)
                        self._requests.submit(request)
            return self._step(endpoint, leaving)
        finally:
            self._requests.withdraw(self._node)

    def _await_fold(self, version: int, leaving: int | None) -> tuple[State | None,
                                                                     State | None]:
        """Poll the head until a version newer than ``version`` shows up (at most
        ``BATCH_PATIENCE`` s). Returns ``(state, None)`` if the state no longer needs this
        node's join (folded), else ``(None, that newer state)``, or ``(None, None)`` if none
        came."""
        s = self._settings
        end = time.monotonic() + max(BATCH_PATIENCE, 4 * s.poll_interval_max)
        pause = fastest_poll(self._state_file.last_head, s.poll_interval, s.poll_interval_max)
        while time.monotonic() < end:
            time.sleep(pause)
            self._check_fenced()
            pause = min(pause * 1.5, s.poll_interval_max)
            try:
                head = self._state_file.read_head()
                if head is None or head.version <= version:
                    continue
                state = self._state_file.read()
            except (OSError, SharedFSRendezvousError) as exc:
                logger.debug("polling for a folded join request failed: %s", exc)
                continue
            if state is None:
                continue
            if not protocol.wants_to_join(state, self._node, leaving, s.max_nodes, s.run_key):
                return state, None
            return None, state
        return None, None

    def _transact(self, change: Callable[[State], bool], timeout: float | None = None) -> State:
        """``StateFile.transact`` that also folds every pending join request (see
        :meth:`_folding`)."""
        state = self._folding(change, lambda fold: self._state_file.transact(fold, timeout))
        assert state is not None
        return state

    def _try_transact(self, change: Callable[[State], bool]) -> State | None:
        """:meth:`_transact` if the lock is free now; else ``None``, nothing done."""
        return self._folding(change, self._state_file.try_transact)

    def _folding(self, change: Callable[[State], bool],
                 run: Callable[[Callable[[State], bool]], State | None]) -> State | None:
        """Run a transaction (``run``) whose change is ``change`` plus the fold of every pending
        join request: whoever holds the lock folds them, whatever its own change. Once it
        committed, the request files it folded, found stale or rejected are removed."""
        s = self._settings
        settled_: list[tuple[str, tuple[int, int] | None]] = []
        rejected: list[Rejected] = []
        folded_done: list[str] = []

        def with_fold(st: State) -> bool:
            changed = change(st)
            try:
                found, bad = self._requests.scan()
            except OSError as exc:  # a listing that fails now: the next holder folds them
                logger.debug("could not list the join requests: %s", exc)
                return changed
            did, verdicts = protocol.fold(st, [f.request for f in found], s.min_nodes,
                                          s.max_nodes, s.launched_nodes)
            folded_done[:] = did
            rejected[:] = bad
            settled_[:] = [(f.path, f.ident) for f in found
                           if verdicts.get(f.request.node) != "future"]
            settled_.extend((r.path, r.ident) for r in bad)
            return changed or "joined" in verdicts.values()

        state = run(with_fold)
        if state is None:
            return None
        for path, ident in settled_:
            self._requests.remove(path, ident)
        for item in rejected:
            text = rejection_message(item)
            logger.warning("%s", text)
            self._events.emit("request_rejected", text, path=item.path, reason=item.reason)
        self._report(folded_done, state)
        return state

    def _check_run_key(self, deadline: float) -> None:
        """Refuse to merge into another live run that uses the same run id; take it over when
        that run is dead (its members' heartbeats stood still for ``heartbeat_timeout``)."""
        s = self._settings
        if s.run_key is None:
            return
        try:
            state = self._state_file.read()
        except (OSError, SharedFSRendezvousError):
            return  # the join itself retries and reports
        if state is None or state.closed or state.key is None:
            return
        if state.key == s.run_key:
            if s.run_key.startswith(COMMAND_KEY_PREFIX):
                self._refuse_if_not_needed(state, deadline)
            return
        foreign = state.key
        others = [m for m in protocol.members(state) if m != self._node]
        alive = self._any_heartbeat_moves(others, deadline)
        if alive:
            raise RunIdInUseError(
                f"The rendezvous run id {s.run_id!r} in {str(self.run_dir)!r} is in use by "
                f"another run that is alive (its key {foreign!r} is not this node's "
                f"{s.run_key!r}; the heartbeat of {alive} moves). Two unrelated jobs must not "
                "share a run id: pass another --rdzv-id (or --rdzv-conf attempt=N). If this "
                "node does belong to that run, give it the same --rdzv-conf run_key."
            )
        done: list[str] = []

        def change(st: State) -> bool:
            done[:] = protocol.take_over(st, foreign, s.run_key or "", s.min_nodes, s.max_nodes)
            return bool(done)

        self._report(done, self._state_file.transact(change))

    def _refuse_if_not_needed(self, state: State, deadline: float) -> None:
        """A key from the command line (torchrun outside a batch system) cannot tell two runs
        with identical commands apart. A node of the run that needs it -- forming, short of
        ``max_nodes``, or replacing a lost member -- is welcome; a fresh node that a run already
        training with all its ``max_nodes`` alive does not need is another run: refused."""
        s = self._settings
        live = [p for p in state.participants if p not in state.dead and p != self._node]
        if (state.phase != COMPLETE or self._node in state.participants
                or len(live) < s.max_nodes or not self._all_heartbeats_move(live, deadline)):
            return
        raise RunIdInUseError(
            f"The rendezvous run id {s.run_id!r} in {str(self.run_dir)!r} is in use by a run "
            f"started with the same command line that is training with all its {len(live)} "
            f"node(s) alive (--nnodes max {s.max_nodes}), so this node is not part of it. Two "
            "separate runs must not share a run id: pass another --rdzv-id (or set "
            "HPC_ELASTIC_RUN_KEY to one value per run on every node of it). Standby nodes of a "
            "run outside a batch system need that too: start every node of the run with the "
            "same HPC_ELASTIC_RUN_KEY (or --rdzv-conf run_key=NAME)."
        )

    def _all_heartbeats_move(self, nodes: list[str], deadline: float) -> bool:
        """Whether every one of ``nodes`` shows a moving heartbeat within
        ``heartbeat_timeout``."""
        watcher = LivenessObserver(self._layout.heartbeats, self._settings.heartbeat_timeout,
                                   self.fs_ops)
        first = {n: watcher.read(n) for n in nodes}
        pending = set(nodes)
        end = min(deadline, time.monotonic() + self._settings.heartbeat_timeout)
        while pending and time.monotonic() < end:
            time.sleep(min(self._settings.heartbeat_interval / 2, max(0.0, end - time.monotonic())))
            for node in list(pending):
                value = watcher.read(node)
                if value is not UNKNOWN and first[node] is not UNKNOWN and value != first[node]:
                    pending.discard(node)
        return not pending

    def _any_heartbeat_moves(self, nodes: list[str], deadline: float) -> str | None:
        """The first of ``nodes`` whose counter changes within ``heartbeat_timeout``."""
        if not nodes:
            return None
        watcher = LivenessObserver(self._layout.heartbeats, self._settings.heartbeat_timeout,
                                   self.fs_ops)
        first = {n: watcher.read(n) for n in nodes}
        end = min(deadline, time.monotonic() + self._settings.heartbeat_timeout)
        while time.monotonic() < end:
            time.sleep(min(self._settings.heartbeat_interval / 2, max(0.0, end - time.monotonic())))
            for node in nodes:
                value = watcher.read(node)
                if value is not UNKNOWN and first[node] is not UNKNOWN and value != first[node]:
                    return node
        return None

    def _wait(self, state: State, endpoint: str, leaving: int | None, start: float,
              deadline: float) -> State:
        """Poll until this node is in a complete round; act whenever the protocol says so.

        Pollers read only the head of the state file. The body is read when the head shows a
        change that matters to a waiting node (round, phase, closed, dead count), and otherwise
        at most once per ``FULL_REFRESH`` s while the state keeps changing (to notice, e.g.,
        that we were dropped from a forming round). With hundreds of nodes joining, the state
        changes with every join; reading the body on each change would cost O(N^2) parsing.
        """
        s = self._settings
        pause = s.poll_interval
        last_call: tuple[int, float] | None = None  # (round, when we first saw >= min_nodes)
        head = state.head()
        full_at = time.monotonic()
        acted_on = -1
        while True:
            # Membership first: a peer may finish and close right after the round completed,
            # before we polled; we are still part of the round it completed.
            if (state.phase == COMPLETE and self._node in state.participants
                    and (leaving is None or state.round > leaving)):
                return state
            if state.closed:
                self._raise_closed(state)
            now = time.monotonic()
            if state.phase == COMPLETE and self._node in state.waiting and len(
                    set(state.participants) - set(state.dead)) >= s.max_nodes:
                # A hot spare: the running round is full and alive. We stand by until one of
                # its members is lost (or the run ends); join_timeout counts from then.
                deadline = max(deadline, now + s.join_timeout)
            if now >= deadline:
                self._give_up(state)
            if state.version != acted_on and protocol.wants_to_join(
                    state, self._node, leaving, s.max_nodes, s.run_key):
                acted_on = state.version
                state = self._join(endpoint, leaving)
                head, full_at = state.head(), time.monotonic()
                continue
            wake = deadline
            if (head.phase == JOINING and head.round == state.round and head.n >= s.min_nodes
                    and self._node in state.participants):
                if last_call is None or last_call[0] != head.round:
                    last_call = (head.round, now)
                expires = last_call[1] + s.last_call_timeout
                if now >= expires:
                    state = self._last_call(head.round)
                    head, full_at = state.head(), time.monotonic()
                    continue
                wake = min(wake, expires)
            else:
                last_call = None
            time.sleep(max(0.0, min(pause, wake - time.monotonic())))
            self._check_fenced()
            try:
                new = self._state_file.read_head()
            except (OSError, SharedFSRendezvousError) as exc:
                # ESTALE and friends were retried already; keep our view and poll again.
                logger.debug("polling the rendezvous state failed: %s", exc)
                new = None
            relevant = changed = False
            if new is not None and new.version > head.version:
                relevant, changed = _matters(new) != _matters(head), True
                head = new
            # Poll fast while versions come (few: joins are batched), back off while idle.
            fastest = fastest_poll(head, s.poll_interval, s.poll_interval_max)
            pause = fastest if changed else min(max(pause * 1.5, fastest), s.poll_interval_max)
            if head.version != state.version and (
                    relevant or time.monotonic() - full_at >= FULL_REFRESH):
                try:
                    state = self._state_file.read() or state
                except (OSError, SharedFSRendezvousError) as exc:
                    logger.debug("reading the rendezvous state failed: %s", exc)
                head, full_at = state.head(), time.monotonic()

    def _last_call(self, round_: int) -> State:
        s = self._settings
        done: list[str] = []

        def change(st: State) -> bool:
            done[:] = protocol.last_call(st, self._node, round_, s.min_nodes)
            return bool(done)

        state = self._transact(change)
        self._report(done, state)
        return state

    def _result(self, state: State, start: float) -> RendezvousInfo:
        rank = state.participants.index(self._node)
        world = len(state.participants)
        master_addr, _, port = state.endpoints[state.participants[0]].rpartition(":")
        # Not a FileStore: its one appended file is read stale through a caching client
        # (see .store); every value here is an immutable file committed by link.
        store = SharedDirStore(self._layout.store(state.round, state.token),
                               sync=self._state_file.sync,
                               timeout=timedelta(seconds=max(300.0, self._settings.join_timeout)))
        self._round = state.round
        self._nnw_cache = (-1.0, 0)
        elapsed = time.monotonic() - start
        self._events.emit(
            "completed",
            f"round {state.round}: rank {rank} of {world}, master {master_addr}:{port}, "
            f"{elapsed * 1000:.0f} ms",
            round=state.round, rank=rank, world_size=world, master_addr=master_addr,
            master_port=int(port), duration_ms=round(elapsed * 1000, 3),
        )
        if self.on_round is not None:
            self.on_round(state.round, world)
        return RendezvousInfo(store, rank, world, RendezvousStoreInfo(master_addr, int(port)))

    def _raise_closed(self, state: State) -> None:
        if self._node in state.waiting:
            raise RendezvousGracefulExitError(
                f"The rendezvous {self._settings.run_id!r} was closed while this node was "
                "waiting to join: the job finished without needing it."
            )
        if self._round is None and self._node not in state.participants:
            raise RendezvousClosedError(
                f"The rendezvous {self._settings.run_id!r} in {str(self.run_dir)!r} is closed: "
                "a job with this run id (and attempt) already finished. Start a new run with a "
                "new run id (torchrun --rdzv-id), or pass a new attempt (--rdzv-conf attempt=N), "
                "or delete that directory if no job uses it."
            )
        raise RendezvousClosedError(f"The rendezvous {self._settings.run_id!r} is closed.")

    def _give_up(self, state: State) -> None:
        done: list[str] = []

        def change(st: State) -> bool:
            done[:] = protocol.leave(st, self._node)
            return bool(done)

        try:
            self._transact(change, timeout=5.0)
        except Exception:  # best effort: our heartbeat will stop anyway
            logger.debug("could not withdraw after the join timeout", exc_info=True)
        s = self._settings
        raise RendezvousTimeoutError(
            f"The rendezvous {s.run_id!r} did not complete within join_timeout="
            f"{s.join_timeout:.0f} s: round {state.round} has {len(state.participants)} node(s), "
            f"min_nodes={s.min_nodes}. Start more nodes or raise join_timeout "
            "(--rdzv-conf join_timeout=SECONDS)."
        )

    def _report(self, done: list[str], state: State) -> None:
        for what in done:
            kind, _, detail = what.partition(":")
            if kind == "completed":
                self._events.emit("round_formed", f"formed round {state.round} ({detail}) with "
                                  f"{len(state.participants)} node(s)", round=state.round,
                                  world_size=len(state.participants), reason=detail)
            elif kind == "dead":
                self._events.emit("node_dead", f"declared {detail} dead", round=state.round,
                                  dead_node=detail)
            elif kind in ("opened", "waiting", "resurrected", "left", "closed", "claimed"):
                self._events.emit(kind, f"{kind} (round {state.round})", round=state.round)

    # ------------------------------------------------------------------- membership and closing
    def num_nodes_waiting(self) -> int:
        """Nodes that need a re-rendezvous to get in, or ``>= 1`` if our round is obsolete.

        The agent calls this every ``monitor_interval`` while workers are healthy and restarts
        them when it is positive. Besides late joiners we also report "our round is over" (a
        newer round is forming, or a member of ours was declared dead), so that healthy nodes
        re-form promptly even when their workers have not noticed the loss yet. The head of the
        state file is read at most once per ``poll_interval_max``.
        """
        self._check_fenced()
        now = time.monotonic()
        when, value = self._nnw_cache
        if now - when < self._settings.poll_interval_max:
            return value
        try:
            value = self._count_waiting()
        except (OSError, SharedFSRendezvousError) as exc:
            # Unreadable for now (retried already): nothing new to act on; fencing (above)
            # ends this node if the filesystem stays away for too long.
            logger.debug("num_nodes_waiting could not read the state: %s", exc)
            return value
        self._nnw_cache = (now, value)
        return value

    def _count_waiting(self) -> int:
        head = self._state_file.read_head()
        if head is None or head.closed:
            return 0
        late = head.nw if head.phase == COMPLETE and head.n < self._settings.max_nodes else 0
        if self._round is None:
            return late
        if head.round != self._round:
            return max(1, head.n)
        return late + head.nd if head.phase == COMPLETE else 0

    def lost_a_member(self) -> bool:
        """True when a node of this node's current round departed or was declared dead.

        The agent asks when its workers fail: failures right after a peer left are its
        consequence (a collective lost its peer), a membership change rather than a fault of the
        workers. Read fresh, not cached; a True answer also makes :meth:`num_nodes_waiting` say
        so at once, so that the agent re-forms without waiting for the next poll."""
        self._check_fenced()
        try:
            head = self._state_file.read_head()
        except (OSError, SharedFSRendezvousError):
            return False
        lost = bool(head and not head.closed and head.round == self._round
                    and head.phase == COMPLETE and head.nd > 0)
        if not lost and head and not head.closed and self._round is not None \
                and head.round == self._round + 1:
            lost = self._next_round_left_out_a_member()
        if lost:
            self._nnw_cache = (time.monotonic(), max(1, head.nd if head else 1))
        return lost

    def wait_for_member_loss(self) -> bool:
        """Whether a member of this node's round is lost, waiting for the verdict: the agent
        asks when its workers failed because a peer's connection closed. A node whose processes
        were all killed closes its connections at once, so its peers' workers fail at once --
        but it is declared dead only ``heartbeat_timeout`` later; counted as a fault, that echo
        would use a restart (and feed the restart-storm guard) although the node is lost.

        True once :meth:`lost_a_member` says so. False as soon as it cannot come: a next round
        opened that leaves no member out (a peer restarts after its own workers' failure), or
        the heartbeat of every other member moved (all alive: the connection failed for another
        reason), or after ``heartbeat_timeout`` plus two ``heartbeat_interval`` (by then a dead
        member is declared)."""
        s = self._settings
        round_ = self._round
        if round_ is None:
            return False
        try:
            state = self._state_file.read(at_least=0)
        except (OSError, SharedFSRendezvousError):
            state = None
        others = [n for n in (state.participants if state and state.round == round_ else [])
                  if n != self._node]
        watcher = LivenessObserver(self._layout.heartbeats, s.heartbeat_timeout, self.fs_ops)
        first = {n: watcher.read(n) for n in others}
        alive: set[str] = set()
        deadline = time.monotonic() + s.heartbeat_timeout + 2 * s.heartbeat_interval
        while True:
            if self.lost_a_member():
                return True
            try:
                head = self._state_file.read_head()
            except (OSError, SharedFSRendezvousError):
                head = None
            if head is not None and (head.closed or head.round != round_):
                return False  # lost_a_member() above found nobody left out of the next round
            for node in others:
                value = watcher.read(node)
                if value is not UNKNOWN and first[node] is not UNKNOWN and value != first[node]:
                    alive.add(node)
            left = deadline - time.monotonic()
            if (others and alive == set(others)) or left <= 0:
                return False
            time.sleep(min(0.1, left))

    def _next_round_left_out_a_member(self) -> bool:
        """Another survivor was quicker: its workers failed first, and it already opened the
        next round, so the head no longer shows this node's round with its dead member. The
        new round still tells: it expects only the live members of the old one (``prev``).
        Without this, of two survivors of a node loss the slower one counted its workers'
        failure as a fault and used a restart (seen in tests/test_warm_workers.py, 2 of 4
        runs)."""
        try:
            state = self._state_file.read(at_least=0)
        except (OSError, SharedFSRendezvousError):
            return False
        if state is None or state.closed or state.round != (self._round or 0) + 1:
            return False
        return any(node in state.dead or node not in state.expected
                   for node in state.prev if node != self._node)

    def is_closed(self) -> bool:
        head = self._state_file.read_head()
        return bool(head and head.closed)

    def set_closed(self) -> None:
        # A fenced node must never end the run for the others that went on without it.
        self._check_fenced()
        self._transact(lambda st: bool(protocol.close(st)),
                                  timeout=self._settings.close_timeout)
        self._events.emit("closed", "closed the rendezvous", round=self._round)

    def shutdown(self) -> bool:
        """Stop heartbeats and close the rendezvous (torch semantics: the job is over)."""
        if self._shut:
            return True
        self._shut = True
        if self.on_shutdown is not None:
            self.on_shutdown()
        self._stop_heartbeats()
        try:
            self.set_closed()
            return True
        except Exception as exc:
            logger.warning("shutdown of rendezvous %s failed: %s", self._settings.run_id, exc)
            return False

    def depart(self) -> bool:
        """Leave the run for good without closing it (this node's job was cancelled or ended).

        The others then need not wait ``heartbeat_timeout`` to notice: this node is recorded as
        gone at once, exactly as if its heartbeat had stopped, and the next round forms without
        it. Best effort -- a node that cannot write is found dead by its heartbeat anyway."""
        if self._shut:
            return True
        self._shut = True
        self._stop_heartbeats()
        if self._fenced is not None:
            # Its view of the state may be stale and its lock gone; the others declare it dead
            # by its heartbeat (stopped) anyway. A fenced node writes nothing.
            return False
        s = self._settings

        def change(st: State) -> bool:
            return bool(protocol.declare_dead(st, [self._node], s.min_nodes, s.max_nodes))

        try:
            state = self._transact(change, timeout=s.close_timeout)
        except Exception as exc:
            logger.warning("could not record the departure from rendezvous %s: %s",
                           s.run_id, exc)
            return False
        self._events.emit("departed", "left the run (not closing it)", round=state.round,
                          dead_node=self._node)
        return True

    # -------------------------------------------------------------------------------- heartbeats
    def _start_heartbeats(self) -> None:
        if self._hb_thread is not None:
            return
        self._beater.beat()  # before joining: watchers must find a counter from the start
        self._beat_ok_at = time.monotonic()
        self._hb_thread = threading.Thread(
            target=self._heartbeat_loop, name=f"sharedfs-heartbeat-{self._node}", daemon=True
        )
        self._hb_thread.start()
        self._judge_thread = threading.Thread(
            target=self._judge_loop, name=f"sharedfs-judge-{self._node}", daemon=True
        )
        self._judge_thread.start()
        self._watch_thread = threading.Thread(
            target=self._fence_watch, name=f"sharedfs-fence-{self._node}", daemon=True
        )
        self._watch_thread.start()
        self._events.emit("heartbeat_started", "heartbeat thread started")

    def _stop_heartbeats(self) -> None:
        self._hb_stop.set()
        for thread in (self._hb_thread, self._judge_thread):
            if thread is not None and thread is not threading.current_thread():
                thread.join(timeout=self._settings.heartbeat_interval + 5)

    def _heartbeat_loop(self) -> None:
        """Beat, and nothing else: a beat must not wait behind slow reads of the state or of
        the peers' counters (measured: with 64 nodes on an overloaded GlusterFS client those
        took seconds, and beats that waited for them reached the directory 8 s apart)."""
        while not self._hb_stop.wait(self._settings.heartbeat_interval):
            # A node that was silent too long (frozen, or its last beat blocked) is fenced
            # *before* it beats again: a fresh beat must not hide that the others gave up on it.
            if self._check_silence(by="beat") is not None:
                return  # fenced: no more beats
            self._beat()

    def _judge_loop(self) -> None:
        """Judge the watched peers every ``heartbeat_interval``, whatever happens to our own
        beats: a node whose heartbeat write fails must still find a frozen peer dead (a blind
        spot otherwise) -- until it is fenced itself; a fenced node judges nobody."""
        cached: State | None = None
        while not self._hb_stop.wait(self._settings.heartbeat_interval):
            if self._check_silence() is not None:
                return
            try:
                head = self._state_file.read_head()
                if head is not None and (cached is None or cached.version != head.version):
                    cached = self._state_file.read() or cached
            except Exception:  # keep the last view; the files are retried next time
                logger.debug("heartbeat: could not read the state", exc_info=True)
            if cached is None or cached.closed:
                continue
            try:
                watched = watch_set(protocol.members(cached), self._node, WATCH_FANOUT)
                dead = self._observer.observe(watched)
                if dead and not self._hb_stop.is_set() and self._check_silence() is None:
                    self._declare_dead(sorted(dead), dead)
            except FencedError as exc:
                self.explain(exc)
                return
            except Exception:  # keep judging whatever happens
                logger.warning("sharedfs heartbeat: judging the peers failed", exc_info=True)

    def _fence_watch(self) -> None:
        """Notice silence without touching the filesystem: when this node's last durable
        heartbeat is too old -- its beats fail, one is blocked in a partitioned client, or the
        node was frozen -- fence it (:meth:`on_fenced` stops the workers) even while every
        other thread of the agent is stuck in a filesystem call."""
        s = self._settings
        period = max(0.05, min(s.heartbeat_interval / 2, 0.5))
        last = time.monotonic()
        while not self._hb_stop.wait(period):
            now = time.monotonic()
            ran, last = now - last < (s.heartbeat_timeout - s.heartbeat_interval) / 2, now
            # Not scheduled for that long: the whole process stalled (the heartbeat thread
            # judges that); a blocked beat is only judged while this thread itself ran.
            if ran and self._check_silence(by="watch") is not None:
                return

    def _beat(self) -> None:
        self._beat_since = started = time.monotonic()
        try:
            self._beater.beat()
        except OSError as exc:
            if self._beat_failing_since is None:
                self._beat_failing_since = self._beat_since
                logger.warning("sharedfs heartbeat of %s could not be written: %s", self._node,
                               exc)
            self._last_beat_error = exc
            return
        finally:
            self._beat_since = None
        now = time.monotonic()
        if self._beat_failing_since is not None:
            logger.warning("sharedfs heartbeat of %s written again after %.1f s", self._node,
                           now - self._beat_failing_since)
        self._beat_failing_since = None
        s = self._settings
        if now - started < s.heartbeat_timeout - s.heartbeat_interval:
            self._beat_ok_at = now
        # else: the beat took that long (blocked, or the node stalled in mid-write): the next
        # loop judges the silence before this beat counts (see _check_silence).

    def _fence(self, exc: FencedError) -> FencedError:
        """Fence this node once (later calls return the first reason): stop its workers
        (:attr:`on_fenced`) first, then say so. From here on it writes nothing to the
        rendezvous (not even its departure, see :meth:`depart`)."""
        with self._fence_lock:
            if self._fenced is not None:
                return self._fenced
            self._fenced = exc
        self._hb_stop.set()
        if self.on_fenced is not None:
            try:
                self.on_fenced()
            except Exception:
                logger.warning("stopping the workers of fenced node %s failed", self._node,
                               exc_info=True)
        logger.error("[%s %s] %s", self._settings.run_id, self._node, exc)
        self._events.emit("fenced", str(exc), round=self._round, error=type(exc).__name__)
        return exc

    @property
    def fenced(self) -> FencedError | None:
        """Why this node was fenced (``None``: it was not)."""
        return self._fenced

    def _fence_text(self, cause: str) -> str:
        """The one paragraph a fenced node ends with: what happened, what it means for the
        job, what was (not) written, what to do."""
        s = self._settings
        where = (f"after round {self._round}" if self._round is not None
                 else "before it joined any round")
        return (
            f"{cause} This node was fenced from rendezvous {s.run_id!r}: the other nodes "
            f"declare it dead after heartbeat_timeout={s.heartbeat_timeout:g} s and go on "
            f"without it. Its workers were stopped, and it takes part in no round {where} "
            "(it writes nothing to the rendezvous from here on); its "
            "agent ends instead of rejoining. Check this node's network and filesystem client, "
            "then start it again to add it back (a new node joins at a later round)."
        )

    def _check_silence(self, by: str = "") -> FencedError | None:
        """Fence this node if its last durable heartbeat is ``heartbeat_timeout -
        heartbeat_interval`` old: the others are about to declare it dead (or already did).

        When its beats fail (the filesystem is gone), that is all it takes. A beat that is
        blocked is judged only by the watch thread (``by="watch"``), which knows that it ran
        itself meanwhile: right after a freeze, a beat caught in mid-write looks blocked too.
        When the node simply did not run (frozen, suspended, starved of CPU), the state
        decides -- read by the heartbeat thread before its next beat (``by="beat"``), or by the
        agent's thread or the judge (``by=""``), whichever comes first after the thaw: fenced
        if the others declared it dead meanwhile; otherwise the stall went unnoticed (e.g. the
        whole machine was starved) and it goes on. (Measured: with only the heartbeat thread
        deciding, a thawed agent on a loaded machine joined the next round first, 1 of 4 runs
        of tests/test_fencing_sharedfs.py's freeze case in the suite's two workers.)"""
        if self._fenced is not None:
            return self._fenced
        if self._hb_thread is None or self._shut:
            return None
        s = self._settings
        now = time.monotonic()
        silent = now - self._beat_ok_at
        if silent < s.heartbeat_timeout - s.heartbeat_interval:
            return None
        where = str(self.run_dir)
        failing, since = self._beat_failing_since, self._beat_since
        if failing is not None:
            err = self._last_beat_error
            name = lost_fs_name(err) if err is not None else "an error"
            cause = (f"This node lost the shared filesystem at {where!r}: its heartbeat writes "
                     f"fail ({name}) and none has reached it for {silent:.1f} s.")
        elif since is not None and by == "watch":
            cause = (f"This node lost the shared filesystem at {where!r}: a heartbeat write "
                     f"has been blocked in the filesystem client for {now - since:.1f} s (a "
                     "network partition, or a server that stopped answering), none has "
                     f"reached it for {silent:.1f} s.")
        elif since is not None:
            return None
        else:
            # Not the watch thread: it must not touch the filesystem. The heartbeat thread
            # decides before its next beat; the agent's own thread decides too, before it
            # joins a round or reports on one: right after a thaw it may get there first,
            # and it must not rejoin as if nothing happened when the others gave up on it.
            if by == "watch":
                return None
            try:
                state = self._state_file.read()
            except Exception as exc:  # after a stall and retries: the directory is gone too
                logger.debug("after a stall: could not read the state", exc_info=True)
                state, unreadable = None, f"; its state is unreadable now ({exc})"
            else:
                if state is None or self._node not in state.dead:
                    # Nobody gave up on it: a stall the others did not notice; beat again.
                    self._beat_ok_at = time.monotonic()
                    return None
                unreadable = ""
            cause = (f"This node did not run for {silent:.1f} s (frozen, suspended, or starved "
                     f"of CPU: none of its heartbeats reached {where!r} meanwhile), and the "
                     f"other nodes declared it dead{unreadable}.")
        return self._fence(FencedError(self._fence_text(cause)))

    def explain(self, err: BaseException) -> BaseException:
        """The error an agent should end with: the fencing reason if this node was fenced,
        or -- for an ``OSError`` that means the filesystem client lost its server (ENOTCONN,
        EBADFD, ...) -- this node is fenced now and that is the reason; else ``err``."""
        if self._fenced is not None:
            return self._fenced
        if isinstance(err, FencedError):
            cause = err.__cause__
            if isinstance(cause, OSError):
                return self._fence(FencedError(self._fence_text(
                    f"This node lost the shared filesystem at {str(self.run_dir)!r}: a write "
                    f"could not be made durable ({lost_fs_name(cause)}), so its lock on the "
                    "rendezvous state may be gone too.")))
            return self._fence(FencedError(self._fence_text(str(err))))
        if isinstance(err, OSError) and err.errno in LOST_FS_ERRNOS:
            what = f" ({err.filename})" if err.filename else ""
            return self._fence(FencedError(self._fence_text(
                f"This node lost the shared filesystem at {str(self.run_dir)!r}: "
                f"{lost_fs_name(err)}{what}.")))
        return err

    def _check_fenced(self) -> None:
        """Raise :class:`FencedError` once this node must stop being a member of its group.

        Either a write was not durable (a failed ``fsync``: the client lost its server and
        maybe its lock), or no heartbeat of ours has reached the filesystem for
        ``heartbeat_timeout - heartbeat_interval`` (failing, blocked, or the node was frozen):
        the others are about to declare this node dead and re-form without it, so its workers
        must stop before that, not after -- they would otherwise go on (and write checkpoints)
        as part of a group that no longer exists. The agent sees the error in
        ``num_nodes_waiting``/``next_rendezvous``: torch stops the workers and the agent ends
        with this message (and :attr:`on_fenced` stopped them already).
        """
        fenced = self._check_silence()
        if fenced is not None:
            raise fenced

    def _declare_dead(self, nodes: list[str], silent: dict[str, float]) -> None:
        s = self._settings
        done: list[str] = []

        def change(st: State) -> bool:
            done[:] = protocol.declare_dead(st, nodes, s.min_nodes, s.max_nodes)
            return bool(done)

        # Never wait long here: beats of this node wait meanwhile; retried next interval.
        state = self._transact(change, timeout=s.heartbeat_interval)
        for what in done:
            kind, _, node = what.partition(":")
            if kind == "dead":
                self._events.emit(
                    "node_dead",
                    f"declared {node} dead: heartbeat counter unchanged for "
                    f"{silent.get(node, 0.0):.1f} s (by this node's clock)",
                    round=state.round, dead_node=node,
                    silent_s=round(silent.get(node, 0.0), 3),
                )
        self._report([d for d in done if not d.startswith("dead:")], state)
