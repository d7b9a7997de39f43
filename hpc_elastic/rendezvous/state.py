"""The shared rendezvous state and its storage: one small file, replaced atomically.

File format (two JSON lines, so that pollers can stop after the first):

    {"v": 12, "round": 3, "phase": "complete", "closed": false, "token": "9f2c...", "n": 3, ...}
    {"participants": [...], "waiting": [...], "expected": [...], "prev": [...], "dead": [...],
     "endpoints": {...}}

The first line (the *head*) changes whenever anything changes (``v`` is the version), and carries
what a waiting node needs to decide whether to look closer; the second line (the *body*) is
parsed only when the head changed. With 512 nodes this keeps the cost of every poll tiny.

Writes happen only under the state lock: write ``state.json.tmp`` (the lock makes that name
private to the holder), then ``rename`` it over ``state.json``. Readers without the lock therefore
see either the old or the new file, never a torn one, and a writer SIGKILLed mid-write leaves
only a scratch file that the next holder truncates.
"""

from __future__ import annotations

import copy
import json
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .errors import StateCorruptError
from .layout import FILE_MODE, RunLayout
from .locking import ProcessFileLock

JOINING = "joining"
COMPLETE = "complete"
FORMAT = 1
#: Dead declarations kept in the state (oldest dropped first); only recent ones matter.
MAX_DEAD = 1024


def new_token() -> str:
    """A random name part: makes every round's store file unique, even across crashed runs."""
    return secrets.token_hex(6)


@dataclass
class Head:
    """The first line of the state file: cheap to read on every poll."""

    version: int
    round: int
    phase: str
    closed: bool
    token: str
    n: int  # participants of the current round
    nw: int  # nodes waiting for the next round
    nd: int  # participants of the current round declared dead


@dataclass
class State:
    """The whole shared state of one run (one attempt).

    ``participants`` is in join order while the round is ``joining`` and in rank order once it is
    ``complete``. ``expected`` is who a re-formed round waits for (live members of the previous
    round and nodes that were waiting); once all of them have joined, the round completes without
    waiting for the last-call window.
    """

    version: int = 0
    round: int = 0
    phase: str = JOINING
    closed: bool = False
    token: str = field(default_factory=new_token)
    participants: list[str] = field(default_factory=list)
    waiting: list[str] = field(default_factory=list)
    expected: list[str] = field(default_factory=list)
    prev: list[str] = field(default_factory=list)
    dead: list[str] = field(default_factory=list)
    endpoints: dict[str, str] = field(default_factory=dict)

    def head(self) -> Head:
        dead = set(self.dead)
        return Head(
            version=self.version,
            round=self.round,
            phase=self.phase,
            closed=self.closed,
            token=self.token,
            n=len(self.participants),
            nw=len(self.waiting),
            nd=sum(1 for p in self.participants if p in dead),
        )

    def copy(self) -> State:
        return copy.deepcopy(self)

    def encode(self) -> bytes:
        head = self.head()
        first = {
            "format": FORMAT,
            "v": head.version,
            "round": head.round,
            "phase": head.phase,
            "closed": head.closed,
            "token": head.token,
            "n": head.n,
            "nw": head.nw,
            "nd": head.nd,
        }
        body = {
            "participants": self.participants,
            "waiting": self.waiting,
            "expected": self.expected,
            "prev": self.prev,
            "dead": self.dead[-MAX_DEAD:],
            "endpoints": self.endpoints,
        }
        sep = (",", ":")
        lines = (json.dumps(first, separators=sep), json.dumps(body, separators=sep))
        return ("\n".join(lines) + "\n").encode()

    @classmethod
    def decode(cls, data: bytes, where: str) -> State:
        try:
            first, second = data.split(b"\n", 2)[:2]
            head = _decode_head(first, where)
            body = json.loads(second)
            return cls(
                version=head.version,
                round=head.round,
                phase=head.phase,
                closed=head.closed,
                token=head.token,
                participants=list(body["participants"]),
                waiting=list(body["waiting"]),
                expected=list(body["expected"]),
                prev=list(body["prev"]),
                dead=list(body["dead"]),
                endpoints=dict(body["endpoints"]),
            )
        except StateCorruptError:
            raise
        except (ValueError, KeyError, TypeError) as exc:
            raise _corrupt(where, exc) from exc


def _decode_head(line: bytes, where: str) -> Head:
    try:
        raw: dict[str, Any] = json.loads(line)
        if raw.get("format") != FORMAT:
            raise ValueError(f"unknown format {raw.get('format')!r}")
        return Head(
            version=int(raw["v"]),
            round=int(raw["round"]),
            phase=str(raw["phase"]),
            closed=bool(raw["closed"]),
            token=str(raw["token"]),
            n=int(raw["n"]),
            nw=int(raw["nw"]),
            nd=int(raw["nd"]),
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise _corrupt(where, exc) from exc


def _corrupt(where: str, exc: Exception) -> StateCorruptError:
    return StateCorruptError(
        f"The rendezvous state file {where!r} is not a sharedfs state file ({exc}). Another "
        "program (or another hpc_elastic version) wrote it. Use a new run id, pass an attempt "
        "(--rdzv-conf attempt=N), or delete that run directory when no job uses it."
    )


class FsOps:
    """Counts filesystem operations, so the benchmark can report them per participant."""

    __slots__ = ("reads", "writes", "renames", "locks", "opens")

    def __init__(self) -> None:
        self.reads = self.writes = self.renames = self.locks = self.opens = 0

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}

    def total(self) -> int:
        return self.opens + self.renames + self.locks


class StateFile:
    """Compare-and-set storage of :class:`State` in ``state.json`` guarded by ``state.lock``."""

    def __init__(self, layout: RunLayout, lock_timeout: float, ops: FsOps | None = None) -> None:
        self.layout = layout
        self.lock_timeout = lock_timeout
        self.ops = ops or FsOps()
        self._lock = ProcessFileLock.for_path(layout.lock)

    # ----------------------------------------------------------------------------- lock-free reads
    def read_head(self) -> Head | None:
        """The first line only; ``None`` before anyone wrote the state."""
        line = self._read(first_line_only=True)
        return None if line is None else _decode_head(line, str(self.layout.state))

    def read(self) -> State | None:
        data = self._read(first_line_only=False)
        return None if data is None else State.decode(data, str(self.layout.state))

    def _read(self, first_line_only: bool) -> bytes | None:
        self.ops.opens += 1
        try:
            with open(self.layout.state, "rb") as f:
                self.ops.reads += 1
                return f.readline() if first_line_only else f.read()
        except FileNotFoundError:
            return None

    # ------------------------------------------------------------------------------ locked writes
    def transact(self, change: Callable[[State], bool], timeout: float | None = None) -> State:
        """Read the state under the lock, let ``change`` edit it, write it back if it said so.

        ``change`` returns True when it modified the state; the version is then bumped. The
        state after the transaction is returned (also when nothing changed).
        """
        with self._lock.hold(self.lock_timeout if timeout is None else timeout):
            self.ops.locks += 1
            state = self.read() or State()
            if change(state):
                state.version += 1
                self._write(state)
            return state

    def compare_and_set(self, new: State, expected_version: int) -> tuple[bool, State]:
        """Write ``new`` only if the stored version is still ``expected_version``.

        ``expected_version`` 0 means "no state yet". Returns ``(written, current state)``; on
        success ``new.version`` becomes ``expected_version + 1``.
        """
        written = False

        def change(current: State) -> bool:
            nonlocal written
            if current.version != expected_version:
                return False
            written = True
            fresh = new.copy()
            fresh.version = expected_version
            current.__dict__.update(fresh.__dict__)
            return True

        state = self.transact(change)
        return written, state

    def _write(self, state: State) -> None:
        data = state.encode()
        tmp = self.layout.state_tmp
        self.ops.opens += 1
        self.ops.writes += 1
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
        self.ops.renames += 1
        os.replace(tmp, self.layout.state)
