"""Where the time of one big rendezvous round goes, on a private GlusterFS volume (needs root).

    .venv/bin/python benchmarks/profile_round.py cached 128
    .venv/bin/python benchmarks/profile_round.py coherent 64
    .venv/bin/python benchmarks/profile_round.py cached 16 --first

Runs bench_rendezvous's part 3 (N participants as threads in 4 processes, spread over 3
GlusterFS client nodes, tests/sharedfs) once, with the rendezvous' file operations timed in
every process: the state lock (waiting for it, trying it, holding it), the commit of a
version, full state reads, head polls, heartbeat beats, peer observation, join requests
(submitted by joiners, scanned by lock holders). Prints calls, total and mean time
of each, summed over all participants (so totals overlap in time: compare "lock held" with the
round's wall time to see how much of it is serialized joins). Results: docs/benchmarks.md.

``--first``: instead, bench_rendezvous's part 1 (N agent processes call ``next_rendezvous`` at
once, as in the 2-16 agent comparison with c10d), once, and also a timeline: when each agent's
timed operations and handler steps began and ended, relative to the last agent's call. The
critical path of the round is then the chain of operations that ends last.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_rendezvous as bench  # noqa: E402

from hpc_elastic.rendezvous import heartbeat, locking, requests, state  # noqa: E402

STATS: dict[str, list[float]] = {}  # name -> [calls, seconds]
TIMELINE: list[tuple[float, float, str]] = []  # (start, end, name), time.time()
_GUARD = threading.Lock()
OUT = Path(tempfile.gettempdir()) / f"profile-round-{os.getpid()}"


def _add(name: str, seconds: float) -> None:
    with _GUARD:
        entry = STATS.setdefault(name, [0, 0.0])
        entry[0] += 1
        entry[1] += seconds
        now = time.time()
        TIMELINE.append((now - seconds, now, name))


def _time(cls: type, method: str, name: str) -> None:
    original: Callable = getattr(cls, method)

    def timed(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return original(self, *args, **kwargs)
        finally:
            _add(name, time.perf_counter() - start)

    setattr(cls, method, timed)


def _instrument() -> None:
    _time(state.StateFile, "_commit", "commit (private write, fsync, link, hint)")
    _time(state.StateFile, "read", "read the full state")
    _time(state.StateFile, "read_head", "read the head (poll)")
    _time(heartbeat.HeartbeatWriter, "beat", "heartbeat beat")
    _time(heartbeat.LivenessObserver, "observe", "observe watched peers")
    _time(requests.RequestBox, "submit", "join request: submit")
    _time(requests.RequestBox, "scan", "join requests: scan (by the holder)")
    hold = locking.ProcessFileLock.hold

    @contextlib.contextmanager
    def timed_hold(self, timeout: float) -> Iterator[None]:
        start = time.perf_counter()
        with hold(self, timeout):
            _add("state lock: wait", time.perf_counter() - start)
            held = time.perf_counter()
            try:
                yield
            finally:
                _add("state lock: held", time.perf_counter() - held)

    locking.ProcessFileLock.hold = timed_hold  # type: ignore[method-assign]
    try_hold = locking.ProcessFileLock.try_hold

    @contextlib.contextmanager
    def timed_try_hold(self) -> Iterator[bool]:
        start = time.perf_counter()
        with try_hold(self) as held:
            _add("state lock: try" + ("" if held else " (busy)"), time.perf_counter() - start)
            taken = time.perf_counter()
            try:
                yield held
            finally:
                if held:
                    _add("state lock: held", time.perf_counter() - taken)

    locking.ProcessFileLock.try_hold = timed_try_hold  # type: ignore[method-assign]
    from hpc_elastic.rendezvous.handler import SharedFSRendezvousHandler as Handler

    _time(Handler, "_check_run_key", "handler: check the run key")
    _time(Handler, "_join", "handler: join")
    _time(Handler, "_wait", "handler: wait for the round")
    _time(Handler, "_start_heartbeats", "handler: start heartbeats")
    bench._agent = _saving_stats(bench._agent)
    bench._scale_process = _saving_stats(bench._scale_process)


def _saving_stats(process_body: Callable) -> Callable:
    """``process_body`` (one benchmark process's work), then its stats and timeline saved to
    ``OUT/<pid>.json`` for the parent, whatever happened."""

    def profiled(*args, **kwargs) -> None:
        try:
            process_body(*args, **kwargs)
        finally:
            (OUT / f"{os.getpid()}.json").write_text(json.dumps(
                {"stats": STATS, "timeline": TIMELINE}))

    return profiled


def main() -> None:
    first = "--first" in sys.argv[1:]
    args = [a for a in sys.argv[1:] if a != "--first"]
    if len(args) != 2:
        sys.exit(__doc__.split("\n\n")[1])
    profile, n = args[0], int(args[1])
    from sharedfs import SharedFS

    # A SIGTERM (e.g. from `timeout`) must still stop the GlusterFS world in `finally`.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    _instrument()
    bench._preload()
    OUT.mkdir()
    fs = SharedFS().start()
    try:
        nodes = fs.clients(3, profile)
        bench.MNTNS[:] = [str(fs.state / "ns" / f"{x}.mnt") for x in nodes.nodes]
        print(f"# {n} participants on GlusterFS {profile!r}, 3 clients ({bench._load()})")
        with bench._roots([str(nodes.path)]) as dirs:
            if first:
                result = bench.first_rendezvous("sharedfs", n, dirs, 0)
                print(f"last arrival -> all done {result['last_arrival_to_all_done_s']:.3f} s")
            else:
                result = bench.scale(n, dirs)  # a participant that fails makes this raise
                print(f"last arrival -> all done {result['last_arrival_to_all_done_s']:.1f} s; "
                      f"file operations per participant "
                      f"{result['fs_ops_per_participant_mean']:.0f} "
                      f"(max {result['fs_ops_per_participant_max']})")
        total: dict[str, list[float]] = {}
        timelines = []
        for path in OUT.glob("*.json"):
            data = json.loads(path.read_text())
            timelines.append(data["timeline"])
            for name, (calls, seconds) in data["stats"].items():
                entry = total.setdefault(name, [0, 0.0])
                entry[0] += calls
                entry[1] += seconds
        for name, (calls, seconds) in sorted(total.items()):
            print(f"{name:44s} calls {int(calls):7d}  total {seconds:8.2f} s  "
                  f"mean {1000 * seconds / max(calls, 1):8.1f} ms")
        if first:
            _print_timelines(timelines)
        print(f"# done ({bench._load()})")
        nodes.close()
    finally:
        fs.stop()
        for path in OUT.glob("*.json"):
            path.unlink()
        OUT.rmdir()


def _print_timelines(timelines: list[list[list]]) -> None:
    """Each agent's operations, in ms relative to the last agent's ``_check_run_key`` start
    (its call of ``next_rendezvous``, give or take the event it emits first)."""
    calls = [min((s for s, _e, name in tl if name == "handler: check the run key"), default=0.0)
             for tl in timelines]
    zero = max(calls)
    order = sorted(range(len(timelines)),
                   key=lambda i: max((e for _s, e, _n in timelines[i]), default=0.0))
    for rank, i in enumerate(order):
        print(f"-- agent {rank} (ends {1000 * (max(e for _s, e, _n in timelines[i]) - zero):.0f}"
              " ms)")
        for start, end, name in sorted(timelines[i]):
            print(f"   {1000 * (start - zero):8.1f} .. {1000 * (end - zero):8.1f} ms  {name}")


if __name__ == "__main__":
    main()
