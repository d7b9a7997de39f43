"""How coherent is the shared filesystem *between two clients*? Measured, not guessed.

``doctor`` runs two probe processes on two different clients of the job directory's
filesystem (two nodes of a Slurm allocation, or any two command prefixes that reach two
clients: ``ssh``, ``srun -w``, ``nsenter --mount``). They play ping-pong through files:

* **rename**: A writes ``ping`` (a new file renamed over the old one) with a number; B polls,
  opening the name afresh, until it reads that number, then does the same with ``pong``; A
  polls for it. Half the round trip is the visibility delay of a rename.
* **in-place write**: the same with files rewritten in place (same width, ``fsync``, close) --
  what the rendezvous heartbeats do.
* **locks**: A holds an exclusive ``flock`` on a file; B tries to take it without waiting and
  must be refused (on Lustre ``-o localflock`` or NFS ``local_lock`` it is not).

A round trip needs no common clock: each side's delay is measured on A's monotonic clock only.
Both polls open the file by name each time (as the rendezvous does), so the numbers include
the client's attribute, entry and data caches. The verdict compares the in-place delay with
``heartbeat_timeout``: a live node's heartbeat seen later than that looks dead.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

#: How long B waits for A's next number before giving up, and A for the lock answer (s).
PATIENCE = 30.0
#: How long A waits for one round's answer; an unanswered round counts as this long (s).
ROUND_PATIENCE = 10.0
ROUNDS = 10
#: Between two polls (s): fine enough for the delays that matter, light on the client.
POLL = 0.005
LOCK_ASK, LOCK_REFUSED, LOCK_GRANTED = 1000, 1001, 1002
#: The longest a whole probe can take (s): every round unanswered, then the lock.
TOTAL_PATIENCE = 2 * ROUNDS * ROUND_PATIENCE + 2 * PATIENCE + 30
PREFIX = "FSPROBE "
_WIDTH = 20


def _read(path: Path) -> bytes | None:
    """The file's contents through a fresh descriptor (None: not there / not readable now)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        return os.read(fd, 4096)
    except OSError:
        return None
    finally:
        with contextlib.suppress(OSError):  # GlusterFS may answer close() with ESTALE
            os.close(fd)


def _retried(put, path: Path, value: int) -> None:
    """A write that a caching client refused for a moment (ESTALE) is tried again."""
    for attempt in range(20):
        try:
            return put(path, value)
        except OSError:
            if attempt == 19:
                raise
            time.sleep(0.05)


def _put_rename(path: Path, value: int) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(f"{value:0{_WIDTH}d}\n".encode())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _put_inplace(path: Path, value: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        os.pwrite(fd, f"{value:0{_WIDTH}d}\n".encode(), 0)
        os.fsync(fd)
    finally:
        os.close(fd)


def _await(path: Path, at_least: int, patience: float) -> int | None:
    """Poll ``path`` (fresh open each time) until it holds a number ``>= at_least``."""
    deadline = time.monotonic() + patience
    while time.monotonic() < deadline:
        data = _read(path)
        if data and data.endswith(b"\n") and data.strip().isdigit():
            value = int(data)
            if value >= at_least:
                return value
        time.sleep(POLL)
    return None


@dataclass
class ProbeResult:
    """What side A measured (seconds; ``None`` where the other side never answered)."""

    rename_s: list[float] = field(default_factory=list)
    inplace_s: list[float] = field(default_factory=list)
    locks_conflict: bool | None = None
    #: rounds of each kind that were not answered within ROUND_PATIENCE
    unanswered: dict[str, int] = field(default_factory=dict)
    error: str = ""

    def to_json(self) -> str:
        return json.dumps(self.__dict__)

    @classmethod
    def from_json(cls, text: str) -> ProbeResult:
        return cls(**json.loads(text))


def run_side(directory: Path, role: str, rounds: int = ROUNDS) -> ProbeResult | None:
    """Play side ``role`` ("A" leads and measures, "B" echoes) in ``directory``.

    A round that B does not answer within ``ROUND_PATIENCE`` counts as that long (a lower
    bound) and A goes on with the next number; B echoes whatever number it sees, so the two
    sides stay in step even when a change stays invisible for a while."""
    directory.mkdir(parents=True, exist_ok=True)
    ping, pong = directory / "ping", directory / "pong"
    wping, wpong = directory / "wping", directory / "wpong"
    lock = directory / "lock"
    result = ProbeResult()
    for kind, put, a_file, b_file, out in (
            ("rename", _put_rename, ping, pong, result.rename_s),
            ("inplace", _put_inplace, wping, wpong, result.inplace_s)):
        if role != "A":
            want = 1
            while want <= rounds:
                seen = _await(a_file, want, PATIENCE)
                if seen is None:
                    return None
                _retried(put, b_file, seen)
                want = seen + 1
            continue
        for k in range(1, rounds + 1):
            start = time.monotonic()
            _retried(put, a_file, k)
            seen = _await(b_file, k, ROUND_PATIENCE)
            out.append(ROUND_PATIENCE if seen is None else (time.monotonic() - start) / 2)
            if seen is None:
                result.unanswered[kind] = result.unanswered.get(kind, 0) + 1
    # locks: A holds, says so (rename: it arrives), B tries without waiting, answers, A lets go
    if role == "A":
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            _retried(_put_rename, ping, LOCK_ASK)
            answer = _await(pong, LOCK_REFUSED, PATIENCE)
            if answer is None:
                result.error = f"locks: no answer within {PATIENCE:g} s"
            else:
                result.locks_conflict = answer == LOCK_REFUSED
        finally:
            os.close(fd)
        return result
    if _await(ping, LOCK_ASK, PATIENCE) is None:
        return None
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        refused = False
        fcntl.flock(fd, fcntl.LOCK_UN)
    except OSError as exc:
        refused = exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)
    finally:
        os.close(fd)
    _retried(_put_rename, pong, LOCK_REFUSED if refused else LOCK_GRANTED)
    return None


def main_side(directory: Path, role: str) -> int:
    """Entry of ``hpc-elastic doctor --fs-probe-side``: role "auto" = A for Slurm task 0."""
    if role == "auto":
        role = "A" if os.environ.get("SLURM_PROCID", "0") == "0" else "B"
    try:
        result = run_side(directory, role)
    except OSError as exc:  # say what the filesystem did, in the verdict, not as a traceback
        result = ProbeResult(error=f"side {role}: {exc}") if role == "A" else None
        if result is None:
            print(f"fsprobe side {role}: {exc}", flush=True)
    if result is not None:
        print(PREFIX + result.to_json(), flush=True)
    return 0


@dataclass
class Verdict:
    ok: bool | None
    detail: str
    fix: str = ""


def judge(result: ProbeResult, heartbeat_timeout: float) -> list[tuple[str, Verdict]]:
    """Numbers + verdicts for doctor: visibility delays against ``heartbeat_timeout``."""
    out: list[tuple[str, Verdict]] = []
    for name, samples, what in (("rename", result.rename_s, "a file renamed over another"),
                                ("inplace", result.inplace_s, "a file rewritten in place")):
        title = f"cross-node visibility: {what}"
        if not samples:
            out.append((title, Verdict(False, result.error or "never seen by the other node",
                                       _FIX_CACHE)))
            continue
        med, worst = statistics.median(samples), max(samples)
        numbers = (f"seen {med * 1000:.0f} ms later (median of {len(samples)}, "
                   f"max {worst * 1000:.0f} ms)")
        missed = result.unanswered.get(name, 0)
        if missed:
            numbers += (f"; {missed} of {len(samples)} not seen within {ROUND_PATIENCE:g} s "
                        "(counted as that)")
        if name == "inplace" and worst * 4 > heartbeat_timeout:
            out.append((title, Verdict(False, f"{numbers}: over a quarter of heartbeat_timeout="
                                       f"{heartbeat_timeout:g} s, so a live node may be "
                                       "declared dead", _FIX_CACHE
                                       + f"; or raise heartbeat_timeout to >= "
                                       f"{max(10.0, worst * 8):.0f} s")))
        elif med > 0.2:
            out.append((title, Verdict(True, f"{numbers}: the client caches (correct, but each "
                                       "rendezvous step may wait that long)")))
        else:
            out.append((title, Verdict(True, f"{numbers}: coherent")))
    if result.locks_conflict is None:
        out.append(("locks conflict across nodes", Verdict(False, result.error or "no answer",
                                                          _FIX_LOCK)))
    else:
        out.append(("locks conflict across nodes",
                    Verdict(result.locks_conflict,
                            "flock held on one node refuses the other" if result.locks_conflict
                            else "a flock held on one node did NOT stop the other", _FIX_LOCK)))
    return out


_FIX_CACHE = ("shorten the filesystem client's caches: NFS 'actimeo=1' (or 'noac'); GlusterFS "
              "'gluster volume set VOL performance.quick-read off', 'performance.io-cache "
              "off', 'performance.md-cache-timeout 0' (or the client with "
              "--attribute-timeout=0 --entry-timeout=0)")
_FIX_LOCK = ("mount so that locks work across nodes: Lustre '-o flock' (not localflock), NFS "
             "without 'nolock'/'local_lock'; or use another shared directory")


def parse_output(text: str) -> ProbeResult | None:
    for line in text.splitlines():
        if line.startswith(PREFIX):
            with contextlib.suppress(ValueError, TypeError):
                return ProbeResult.from_json(line[len(PREFIX):])
    return None
