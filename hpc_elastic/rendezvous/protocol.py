"""The rendezvous protocol as pure functions on :class:`~.state.State`.

Each function is one atomic step, applied inside ``StateFile.transact`` (under the lock), and
returns the list of things it did (empty: nothing changed, nothing to write). Keeping them free of
I/O makes the rules testable on their own and readable in one screen:

1. A node that calls ``next_rendezvous`` joins the round that is forming (``joining``), up to
   ``max_nodes``. If the current round is ``complete`` and the node was in it, it opens the next
   round and *expects* the live members of the old one plus the nodes that were waiting. A node
   that was not in a complete round waits for the next one (``waiting``), which tells the running
   nodes, through ``num_nodes_waiting``, to re-rendezvous.
2. A forming round completes as soon as it has ``max_nodes``, or as soon as every expected node
   that is still alive has joined (and there are at least ``min_nodes``), or when a participant
   has seen ``min_nodes`` for the whole last-call window on its own clock. The run's first round
   has no expected nodes; there, the number of nodes *launched* together (known to the batch
   supervisor, passed as the ``launched_nodes`` setting) plays their part.
3. Ranks follow the previous round's order (so rank 0 stays put when it can), then join order.
4. Batched joins (:mod:`.requests`): whoever holds the lock also applies :func:`join` for every
   pending request file (:func:`fold`), so many joins cost one commit.
5. A node whose heartbeat counter stalled is declared dead: it leaves the forming round, the
   expected set and the waiting list; in a complete round it stays listed (ranks are fixed) but
   the survivors see it in ``dead`` and re-form without it.
"""

from __future__ import annotations

from collections.abc import Sequence

from .requests import JoinRequest
from .state import COMPLETE, JOINING, State, new_token

#: What :func:`fold` did with a request: ``joined`` (the state changed), ``present`` (already
#: where it belongs), and the unfolded ones -- ``stale`` (made for an older round), ``dead``
#: (its node is declared dead), ``foreign`` (another run's key), ``closed``, ``future`` (a round
#: this state has not reached: kept, the holder's view may lag). All but ``future`` are removed.
FOLDED = frozenset({"joined", "present"})


def join(state: State, node: str, endpoint: str, leaving_round: int | None,
         min_nodes: int, max_nodes: int, key: str | None = None,
         launched: int | None = None) -> list[str]:
    """The one step a node in ``next_rendezvous`` takes; idempotent once it is where it belongs.

    ``leaving_round`` is the round this node was a member of before this call (``None`` on the
    first call); being in a complete round with that number means "I am leaving it". ``key``
    (the run key) is recorded by the first node that has one; the handler refuses to join a
    state with another key while that run lives (:func:`take_over` once it is dead).
    ``launched``: see :func:`maybe_complete`.
    """
    if state.closed:
        return []
    done: list[str] = []
    if key is not None and state.key is None:
        state.key = key
        done.append("claimed")
    if node in state.dead:
        # We are obviously alive: a stall (NFS hiccup, SIGSTOP) made someone declare us dead.
        state.dead.remove(node)
        done.append("resurrected")
    if state.phase == JOINING:
        if node in state.participants:
            return done
        if len(state.participants) < max_nodes:
            state.participants.append(node)
            state.endpoints[node] = endpoint
            _discard(state.waiting, node)
            done.append("joined")
            done += maybe_complete(state, min_nodes, max_nodes, launched)
        elif node not in state.waiting:
            state.waiting.append(node)
            done.append("waiting")
        return done
    # The current round is complete.
    if node in state.participants:
        if state.round == leaving_round:
            return done + open_round(state, node, endpoint, min_nodes, max_nodes)
        return done  # we joined this round during this very call: nothing left to do
    dead = set(state.dead)
    if not [p for p in state.participants if p not in dead]:
        # Nobody alive runs the complete round (e.g. leftovers of a crashed earlier run):
        # nobody would ever re-form it for us, so we do.
        return done + open_round(state, node, endpoint, min_nodes, max_nodes)
    if node not in state.waiting:
        state.waiting.append(node)
        done.append("waiting")
    return done


def fold(state: State, requests: Sequence[JoinRequest], min_nodes: int,
         max_nodes: int, launched: int | None = None) -> tuple[list[str], dict[str, str]]:
    """Join every valid pending request's node, as if each had taken the lock in turn.

    Returns what changed in the round (``opened``, ``completed:...``, ``claimed``) and a verdict
    per request node (see :data:`FOLDED`). Only requests made for the round of ``state`` *as
    the holder read it* are folded (the first of them may open the next round; the others then
    join it, exactly as their own calls of :func:`join` would have), and never one of a node
    listed as dead: a request left behind by a crashed holder must not resurrect a node declared
    dead since; a live node declared dead joins through the lock and :func:`join` itself.
    """
    done: list[str] = []
    verdicts: dict[str, str] = {}
    round_ = state.round
    for req in requests:
        if state.closed:
            verdicts[req.node] = "closed"
        elif req.round > round_:
            verdicts[req.node] = "future"
        elif req.round < round_:
            verdicts[req.node] = "stale"
        elif req.node in state.dead:
            verdicts[req.node] = "dead"
        elif req.key is not None and state.key is not None and req.key != state.key:
            verdicts[req.node] = "foreign"
        else:
            did = join(state, req.node, req.endpoint, req.leaving, min_nodes, max_nodes, req.key,
                       launched)
            verdicts[req.node] = "joined" if did else "present"
            done += [d for d in did if d.startswith(("opened", "completed", "claimed"))]
    return done, verdicts


def wants_to_join(state: State, node: str, leaving_round: int | None, max_nodes: int,
                  key: str | None = None) -> bool:
    """Whether :func:`join` would change ``state`` — without copying it (pollers call this often).

    Must agree with :func:`join` exactly; a randomized test checks that it does.
    """
    if state.closed:
        return False
    if key is not None and state.key is None:
        return True
    if node in state.dead:
        return True
    if state.phase == JOINING:
        if node in state.participants:
            return False
        return len(state.participants) < max_nodes or node not in state.waiting
    if node in state.participants:
        return state.round == leaving_round
    dead = set(state.dead)
    if not [p for p in state.participants if p not in dead]:
        return True
    return node not in state.waiting


def open_round(state: State, node: str, endpoint: str, min_nodes: int,
               max_nodes: int) -> list[str]:
    """Start round ``round + 1`` with ``node`` in it, expecting the live old members + waiters."""
    dead = set(state.dead)
    old = state.participants if state.phase == COMPLETE else state.prev
    expected: list[str] = []
    for candidate in [*old, *state.waiting]:
        if candidate not in dead and candidate not in expected:
            expected.append(candidate)
    if node not in expected:
        expected.append(node)
    state.prev = list(old)
    state.round += 1
    state.phase = JOINING
    state.token = new_token()
    state.participants = [node]
    state.endpoints = {node: endpoint}
    state.waiting = []
    state.expected = expected
    return ["opened", "joined", *maybe_complete(state, min_nodes, max_nodes)]


def maybe_complete(state: State, min_nodes: int, max_nodes: int,
                   launched: int | None = None) -> list[str]:
    """Complete the forming round if nobody else can be worth waiting for.

    ``launched``: how many nodes were started together for the run's first round (the round
    without a previous one, and so without expected nodes; a later round whose expected nodes
    all died does not count as one). Once that many joined, nobody else is on the way, so the round
    completes without its last call. Later rounds wait for their expected nodes instead: a
    spare or a ``grow`` node may have joined while a member that is still alive rejoins."""
    if state.closed or state.phase != JOINING:
        return []
    count = len(state.participants)
    if count >= max_nodes:
        return [complete(state, "max_nodes")]
    joined = set(state.participants)
    if count >= min_nodes and state.expected and all(e in joined for e in state.expected):
        return [complete(state, "all_expected")]
    first_round = not state.prev and not state.expected
    if launched and first_round and count >= max(min_nodes, launched):
        return [complete(state, "all_launched")]
    return []


def last_call(state: State, node: str, round_: int, min_nodes: int) -> list[str]:
    """``node`` saw ``min_nodes`` for the whole last-call window of ``round_``: complete it."""
    if (
        state.closed
        or state.phase != JOINING
        or state.round != round_
        or node not in state.participants
        or len(state.participants) < min_nodes
    ):
        return []
    return [complete(state, "last_call")]


def complete(state: State, reason: str) -> str:
    """Freeze the round: ranks = previous order first, then join order."""
    order = {p: i for i, p in enumerate(state.prev)}
    state.participants.sort(key=lambda p: order.get(p, len(order)))  # stable: keeps join order
    state.phase = COMPLETE
    state.expected = []
    state.endpoints = {p: state.endpoints[p] for p in state.participants if p in state.endpoints}
    state.waiting = [w for w in state.waiting if w not in state.participants]
    return f"completed:{reason}"


def declare_dead(state: State, nodes: list[str], min_nodes: int, max_nodes: int) -> list[str]:
    """Record that ``nodes`` stopped heartbeating; drop them from everything still forming."""
    done: list[str] = []
    for node in nodes:
        touched = False
        if node not in state.dead:
            state.dead.append(node)
            touched = True
        touched |= _discard(state.waiting, node)
        touched |= _discard(state.expected, node)
        if state.phase == JOINING and _discard(state.participants, node):
            state.endpoints.pop(node, None)
            touched = True
        if touched:
            done.append(f"dead:{node}")
    if done:
        done += maybe_complete(state, min_nodes, max_nodes)
    return done


def leave(state: State, node: str) -> list[str]:
    """Withdraw ``node`` from whatever is still forming (join timeout, shutdown)."""
    touched = _discard(state.waiting, node) | _discard(state.expected, node)
    if state.phase == JOINING and _discard(state.participants, node):
        state.endpoints.pop(node, None)
        touched = True
    return ["left"] if touched else []


def take_over(state: State, foreign_key: str | None, key: str, min_nodes: int,
              max_nodes: int) -> list[str]:
    """Claim a run id whose previous run (key ``foreign_key``) is dead: its members are recorded
    dead (the caller watched their heartbeats stand still) and ``key`` becomes the owner."""
    if state.closed or state.key != foreign_key:
        return []
    done = declare_dead(state, members(state), min_nodes, max_nodes)
    state.key = key
    return [*done, "claimed"]


def close(state: State) -> list[str]:
    if state.closed:
        return []
    state.closed = True
    return ["closed"]


def members(state: State) -> list[str]:
    """Nodes whose liveness matters now: in the round, expected by it, or waiting for the next."""
    dead = set(state.dead)
    seen: dict[str, None] = {}
    for node in [*state.participants, *state.expected, *state.waiting]:
        if node not in dead:
            seen[node] = None
    return list(seen)


def _discard(items: list[str], node: str) -> bool:
    if node in items:
        items.remove(node)
        return True
    return False
