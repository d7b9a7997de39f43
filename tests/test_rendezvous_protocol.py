"""Rules of the sharedfs rendezvous protocol, on the pure state functions (no I/O, fast)."""

from __future__ import annotations

import pytest

from hpc_elastic.rendezvous import protocol
from hpc_elastic.rendezvous.errors import StateCorruptError
from hpc_elastic.rendezvous.state import COMPLETE, JOINING, State


def _join(state: State, node: str, leaving: int | None = None, lo: int = 2, hi: int = 3):
    return protocol.join(state, node, f"{node}.addr:1", leaving, lo, hi)


def _formed(nodes: list[str], lo: int = 2, hi: int = 3) -> State:
    state = State()
    for node in nodes:
        _join(state, node, lo=lo, hi=hi)
    if state.phase != COMPLETE:
        protocol.last_call(state, nodes[0], state.round, lo)
    assert state.phase == COMPLETE
    return state


def test_first_round_waits_for_max_or_last_call():
    state = State()
    assert _join(state, "a") == ["joined"]
    assert _join(state, "b") == ["joined"]
    assert state.phase == JOINING, "min reached but the last-call window has not passed"
    assert _join(state, "b") == [], "joining twice changes nothing"
    assert _join(state, "c") == ["joined", "completed:max_nodes"]
    assert state.participants == ["a", "b", "c"]
    assert state.endpoints["a"] == "a.addr:1"


def test_last_call_needs_min_nodes_and_the_same_round():
    state = State()
    _join(state, "a")
    assert protocol.last_call(state, "a", 0, 2) == [], "below min_nodes"
    _join(state, "b")
    assert protocol.last_call(state, "a", 7, 2) == [], "another round's timer"
    assert protocol.last_call(state, "z", 0, 2) == [], "not a participant"
    assert protocol.last_call(state, "a", 0, 2) == ["completed:last_call"]
    assert state.phase == COMPLETE


def test_late_node_waits_and_reformation_expects_members_and_waiters():
    state = _formed(["a", "b"])
    assert _join(state, "c") == ["waiting"]
    assert state.head().nw == 1
    # a participant re-rendezvousing out of round 0 opens round 1
    assert _join(state, "b", leaving=0)[:2] == ["opened", "joined"]
    assert state.round == 1 and state.phase == JOINING
    assert sorted(state.expected) == ["a", "b", "c"] and state.waiting == []
    _join(state, "c", leaving=None)
    assert state.phase == JOINING
    assert _join(state, "a", leaving=0) == ["joined", "completed:max_nodes"]


def test_reformation_completes_below_max_once_every_expected_node_joined():
    state = _formed(["a", "b"])
    _join(state, "a", leaving=0)
    assert state.phase == JOINING
    assert _join(state, "b", leaving=0) == ["joined", "completed:all_expected"]
    assert len(state.participants) == 2, "did not wait for a third node that nobody expects"


def _join_launched(state: State, node: str, launched: int | None, leaving: int | None = None,
                   lo: int = 2, hi: int = 4) -> list[str]:
    return protocol.join(state, node, f"{node}.addr:1", leaving, lo, hi, launched=launched)


def test_first_round_completes_once_every_launched_node_joined():
    """An elastic job given 3 of its 4 nodes: nobody else is on the way, no last call."""
    state = State()
    assert _join_launched(state, "a", 3) == ["joined"]
    assert _join_launched(state, "b", 3) == ["joined"], "min reached, a launched node missing"
    assert _join_launched(state, "c", 3) == ["joined", "completed:all_launched"]
    assert state.participants == ["a", "b", "c"]


def test_the_launched_count_never_completes_below_min_nodes_or_without_a_count():
    state = State()
    _join_launched(state, "a", 1)
    assert state.phase == JOINING, "1 launched, but min_nodes is 2"
    _join_launched(state, "b", 1)
    assert state.phase == COMPLETE
    unknown = State()
    for node in ("a", "b", "c"):
        _join_launched(unknown, node, None)
    assert unknown.phase == JOINING, "without a count the last call decides, as before"


def test_a_reformed_round_waits_for_its_expected_nodes_not_for_the_launched_count():
    """A spare joining a re-forming round must not let it complete before a live member is back:
    the count only stands in for the expected nodes of the first round, which has none."""
    state = State()
    for node in ("a", "b", "c"):
        _join_launched(state, node, 3)
    assert state.phase == COMPLETE
    assert _join_launched(state, "a", 3, leaving=0)[:2] == ["opened", "joined"]
    _join_launched(state, "spare", 3)
    _join_launched(state, "b", 3, leaving=0)
    assert state.phase == JOINING and len(state.participants) == 3, "c is expected and alive"
    assert _join_launched(state, "c", 3, leaving=0)[-1] == "completed:max_nodes"


def test_folded_joins_apply_the_holders_launched_count():
    from hpc_elastic.rendezvous.requests import JoinRequest

    state = State()
    _join_launched(state, "a", 2)
    done, verdicts = protocol.fold(state, [JoinRequest("b", "b.addr:1", 0, None, None)], 2, 4,
                                   launched=2)
    assert verdicts == {"b": "joined"} and done == ["completed:all_launched"]


def test_ranks_follow_the_previous_round_then_join_order():
    state = _formed(["a", "b"])
    state.participants = ["b", "a"]  # b was rank 0 in round 0
    _join(state, "c")
    _join(state, "a", leaving=0)
    _join(state, "c")
    _join(state, "b", leaving=0)
    assert state.phase == COMPLETE
    assert state.participants == ["b", "a", "c"]


def test_dead_nodes_leave_forming_rounds_and_unblock_completion():
    state = _formed(["a", "b", "c"])
    _join(state, "a", leaving=0)
    _join(state, "b", leaving=0)
    assert state.phase == JOINING and "c" in state.expected
    done = protocol.declare_dead(state, ["c"], 2, 3)
    assert done == ["dead:c", "completed:all_expected"]
    assert state.participants == ["a", "b"] and "c" in state.dead


def test_dead_participant_of_a_complete_round_is_reported_not_removed():
    state = _formed(["a", "b", "c"])
    protocol.declare_dead(state, ["b"], 2, 3)
    assert state.participants == ["a", "b", "c"], "ranks of a running round never change"
    assert state.head().nd == 1
    _join(state, "a", leaving=0)
    assert "b" not in state.expected, "the next round does not wait for a dead node"


def test_dead_joiner_is_dropped_from_the_forming_round():
    state = State()
    _join(state, "a")
    _join(state, "b")
    protocol.declare_dead(state, ["b"], 2, 3)
    assert state.participants == ["a"] and "b" not in state.endpoints


def test_leftovers_of_a_crashed_run_do_not_block_a_new_node():
    state = _formed(["old1", "old2"])
    assert _join(state, "new") == ["waiting"], "the old nodes might still be alive"
    protocol.declare_dead(state, ["old1", "old2"], 2, 3)
    assert _join(state, "new")[:2] == ["opened", "joined"]
    assert state.round == 1 and state.expected == ["new"]


def test_a_node_declared_dead_by_mistake_comes_back():
    state = State()
    _join(state, "a")
    protocol.declare_dead(state, ["a"], 2, 3)
    assert _join(state, "a") == ["resurrected", "joined"]
    assert "a" not in state.dead


def test_closed_rendezvous_accepts_nobody():
    state = State()
    _join(state, "a")
    assert protocol.close(state) == ["closed"]
    assert protocol.close(state) == []
    assert _join(state, "b") == [] and state.participants == ["a"]


def test_leave_withdraws_from_a_forming_round_only():
    state = State()
    _join(state, "a")
    assert protocol.leave(state, "a") == ["left"] and state.participants == []
    state = _formed(["a", "b"])
    assert protocol.leave(state, "a") == []


def test_members_exclude_the_dead():
    state = _formed(["a", "b"])
    _join(state, "c")
    protocol.declare_dead(state, ["b"], 2, 3)
    assert protocol.members(state) == ["a"] + ["c"]


def test_encoding_round_trips_and_the_head_is_the_first_line():
    state = _formed(["a", "b", "c"])
    state.version = 5
    data = state.encode()
    again = State.decode(data, "x")
    assert again == state
    first = data.split(b"\n")[0]
    assert b'"v":5' in first and b"participants" not in first


@pytest.mark.parametrize("data", [b"", b"garbage\n", b'{"format":99}\n{}\n', b'{"format":1}\n'])
def test_foreign_state_file_is_reported_with_a_fix(data):
    with pytest.raises(StateCorruptError, match="new run id"):
        State.decode(data, "/x/state.json")


def test_cheap_predicate_agrees_with_the_join_step_on_random_states():
    """Pollers decide with wants_to_join(); join() must then change something, and vice versa."""
    import random

    rng = random.Random(7)
    nodes = ["a", "b", "c", "d", "e"]
    for _ in range(3000):
        state = State(round=rng.randint(0, 3), phase=rng.choice([JOINING, COMPLETE]),
                      closed=rng.random() < 0.1)
        for lst in (state.participants, state.waiting, state.dead):
            lst.extend(n for n in nodes if rng.random() < 0.35)
        node = rng.choice(nodes)
        leaving = rng.choice([None, 0, 1, 2, 3])
        hi = rng.randint(1, 5)
        predicted = protocol.wants_to_join(state, node, leaving, hi)
        changed = bool(protocol.join(state.copy(), node, "x:1", leaving, 1, hi))
        assert predicted == changed, (state, node, leaving, hi)
