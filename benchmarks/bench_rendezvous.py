"""Rendezvous speed: sharedfs against torch's own c10d rendezvous, measured in the same run.

    .venv/bin/python benchmarks/bench_rendezvous.py              # ~2-3 min on 2 shared cores
    .venv/bin/python benchmarks/bench_rendezvous.py --quick      # ~1 min: fewer repeats, no 512
    .venv/bin/python benchmarks/bench_rendezvous.py --smoke      # < 60 s: tiny sizes, no kill
    .venv/bin/python benchmarks/bench_rendezvous.py --json out.json
    .venv/bin/python benchmarks/bench_rendezvous.py --roots /mnt/a/r,/mnt/b/r,/mnt/c/r
                                   # one directory seen through several mounts (GlusterFS
                                   # clients): agent i uses root i mod 3; no kill part
    .venv/bin/python benchmarks/bench_rendezvous.py --roots /shared/r --mntns NS0,NS1,NS2
                                   # one path, each agent process in mount namespace i mod 3
                                   # (tests/sharedfs nodes: each has its own client there)
    .venv/bin/python benchmarks/bench_rendezvous.py --gluster cached,coherent
                                   # root: starts a private GlusterFS server (tests/sharedfs),
                                   # 3 client nodes per profile, agents spread over them

Three parts, every process on this machine, directories on local disk (``tempfile``):

1. **First rendezvous**, N = 2, 4, 8, 16 agents (one forked process each, ``min = max = N``):
   time from the *last* agent calling ``next_rendezvous`` to the *last* one returning. The
   reference is torch's ``DynamicRendezvousHandler`` over a c10d ``TCPStore`` (``--rdzv-backend
   c10d``), measured with the same harness right after ours. Target: sharedfs <= 0.1x c10d.
   Also printed for sharedfs: how busy the machine's CPUs were from the last arrival to the
   end (``/proc/stat``: agents, filesystem clients and server together), and the CPU the agents
   spent in ``next_rendezvous`` in all: near 100 % busy means the round is bound by this
   machine's cores, not by waiting.
2. **Kill -> training again**: 3 real ``LocalElasticAgent`` nodes (``nnodes 2:3``, 2 gloo
   workers each, the test helpers under ``tests/rendezvous_helpers``); the rank-0 node is
   SIGKILLed with its workers while training; we time until a surviving worker finished a step
   in the re-formed world of 4. Default settings and tuned ones. Target: <= heartbeat_timeout
   + 5 s. (torch defaults with c10d took 42 s here, see docs/benchmarks.md.)
3. **Scale**: one round with 256 and 512 participants, simulated by threads in 4 processes
   (each thread is a full handler: own node id, heartbeat thread, lock, polling). Time from
   last arrival to all done, from first arrival to all done, and file operations per
   participant (state/heartbeat/join-request opens, renames, lock acquisitions; the agents'
   store not counted), and the number of state versions committed for the whole round.
   Target: < 5 s at 512.

The machine's load average is printed with each part: timings on 2 shared cores are noisy.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")

FORK = multiprocessing.get_context("fork")
#: Seconds a scale round may take before it counts as not finished (--scale-timeout).
SCALE_TIMEOUT = [300.0]


def _preload() -> None:
    """Import torch and both backends once, before forking: every agent process then starts
    with them loaded (on 2 loaded cores an import of torch in each child took ~10 s)."""
    import torch.distributed.elastic.rendezvous.c10d_rendezvous_backend  # noqa: F401
    import torch.distributed.elastic.rendezvous.dynamic_rendezvous  # noqa: F401
    from torch.distributed.elastic.rendezvous.registry import get_rendezvous_handler  # noqa: F401

    import hpc_elastic.rendezvous  # noqa: F401


def _load() -> str:
    one, five, _ = os.getloadavg()
    return f"load avg {one:.2f} (1 min) {five:.2f} (5 min), {os.cpu_count()} cores"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- 1. first rendezvous
def _make_handler(kind: str, root: str, run_id: str, n: int, index: int, port: int):
    if kind == "sharedfs":
        from hpc_elastic.rendezvous import create_handler

        return create_handler(root, run_id, n, n, local_addr="127.0.0.1")
    from torch.distributed.elastic.rendezvous import RendezvousParameters
    from torch.distributed.elastic.rendezvous.registry import get_rendezvous_handler

    params = RendezvousParameters("c10d", f"127.0.0.1:{port}", run_id, n, n,
                                  local_addr="127.0.0.1", is_host=str(index == 0).lower())
    return get_rendezvous_handler(params)


MNTNS: list[str] = []


def _enter_node(index: int) -> None:
    """Enter mount namespace ``index mod k`` of ``--mntns`` (a forked, single-threaded child):
    from then on this process reaches the shared directory through that node's own client."""
    if not MNTNS:
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(MNTNS[index % len(MNTNS)], os.O_RDONLY)
    try:
        if libc.setns(fd, 0x00020000) != 0:  # CLONE_NEWNS
            raise OSError(ctypes.get_errno(), "setns(CLONE_NEWNS) failed")
    finally:
        os.close(fd)


def _agent(kind, roots, run_id, n, index, port, ready, finished, results) -> None:
    _enter_node(index)
    handler = _make_handler(kind, roots[index % len(roots)], run_id, n, index, port)
    ready.wait()
    called, cpu = time.time(), time.process_time()
    info = handler.next_rendezvous()
    results.put((called, time.time(), info.rank, time.process_time() - cpu))
    finished.wait()  # nobody closes before everyone has its result (torch would raise Closed)
    handler.shutdown()
    finished.wait()  # the c10d host keeps its TCPStore up until everyone closed


def first_rendezvous(kind: str, n: int, roots: list[str], trial: int) -> dict[str, float]:
    ready, finished = FORK.Barrier(n), FORK.Barrier(n)
    results = FORK.Queue()
    port = _free_port()
    run_id = f"first-{kind}-{n}-{trial}"
    procs = [FORK.Process(target=_agent,
                          args=(kind, roots, run_id, n, i, port, ready, finished, results))
             for i in range(n)]
    for p in procs:
        p.daemon = True  # never outlive the benchmark, even when it fails
        p.start()
    busy = BusySampler()  # after the forks: a child must not inherit a thread's locks
    try:
        rows = [_result(results, procs) for _ in range(n)]
        time.sleep(0.03)  # a sample after the last agent's end
    finally:
        busy.stop()
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
    assert sorted(r[2] for r in rows) == list(range(n)), rows
    calls, dones = [r[0] for r in rows], [r[1] for r in rows]
    return {"last_arrival_to_all_done_s": max(dones) - max(calls),
            "first_arrival_to_all_done_s": max(dones) - min(calls),
            "agents_cpu_s": sum(r[3] for r in rows),
            "machine_busy": busy.fraction(max(calls), max(dones))}


def _result(results, procs, timeout: float = 120.0) -> tuple:
    """The next agent's result; fails at once when an agent process died (the others would
    wait for it until their join timeout)."""
    import queue

    deadline = time.monotonic() + timeout
    while True:
        try:
            return results.get(timeout=1.0)
        except queue.Empty:
            died = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            if died or time.monotonic() > deadline:
                raise RuntimeError(f"no rendezvous result: agent exit codes {died}, or none "
                                   f"within {timeout:g} s") from None


class BusySampler:
    """How busy the whole machine's CPUs were in a time window: ``/proc/stat``'s busy and total
    jiffies, sampled every 5 ms by a thread. A round whose window shows the CPUs (nearly) fully
    busy is bound by this machine's cores -- agents, filesystem clients and server together --
    not by waiting. Coarse: a jiffy is 10 ms per core."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, int, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            with open("/proc/stat") as f:
                fields = [int(x) for x in f.readline().split()[1:]]
            idle = fields[3] + fields[4]  # idle + iowait
            self.samples.append((time.time(), sum(fields) - idle, sum(fields)))
            time.sleep(0.005)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def fraction(self, start: float, end: float) -> float:
        """Busy share of all CPUs from the last sample at or before ``start`` to the first at
        or after ``end`` (NaN without samples around the window)."""
        before = [s for s in self.samples if s[0] <= start]
        after = [s for s in self.samples if s[0] >= end]
        if not before or not after or after[0][2] == before[-1][2]:
            return float("nan")
        return (after[0][1] - before[-1][1]) / (after[0][2] - before[-1][2])


def part_first(sizes: list[int], repeats: int, roots: list[str] | None = None) -> list[dict]:
    print(f"\n## 1. First rendezvous, last arrival -> all done ({_load()})")
    print(f"{'agents':>6} {'sharedfs s':>11} {'c10d s':>8} {'ratio':>6}   (median of {repeats})")
    rows = []
    with _roots(roots) as dirs:
        for n in sizes:
            ours, ref = [], []
            for trial in range(repeats):  # interleaved, so load drifts hit both alike
                ours.append(first_rendezvous("sharedfs", n, dirs, trial))
                ref.append(first_rendezvous("c10d", n, dirs, trial))
            a = statistics.median(r["last_arrival_to_all_done_s"] for r in ours)
            b = statistics.median(r["last_arrival_to_all_done_s"] for r in ref)
            busy = statistics.median(r["machine_busy"] for r in ours)
            cpu = statistics.median(r["agents_cpu_s"] for r in ours)
            rows.append({"agents": n, "sharedfs_s": a, "c10d_s": b, "ratio": a / b,
                         "sharedfs_machine_busy": busy, "sharedfs_agents_cpu_s": cpu,
                         "sharedfs_all": ours, "c10d_all": ref})
            print(f"{n:>6} {a:>11.3f} {b:>8.3f} {a / b:>6.2f}   sharedfs: CPUs {busy:.0%} busy "
                  f"after the last arrival, agents' CPU {cpu:.3f} s in all")
    return rows


# ------------------------------------------------------------------------------ 2. kill recovery
def kill_recovery(conf: dict[str, object], label: str, steps: int) -> dict[str, float]:
    from polling import wait_for
    from rendezvous_helpers.harness import Cluster

    with tempfile.TemporaryDirectory() as tmp:
        cluster = Cluster(Path(tmp))
        try:
            names = ["n0", "n1", "n2"]
            for name in names:
                cluster.start_agent(name, "job", "2:3", conf,
                                    ["--steps", str(steps), "--step-time", "0.05"])

            def rank0_training():
                for r in cluster.records("progress"):
                    if r["world"] == 6 and r["group_rank"] == 0 and r["step"] >= 3:
                        return r["agent"]
                return None

            pid = wait_for("training with 3 nodes", rank0_training, 120)
            victim = next(n for n, p in cluster.nodes.items() if p.pid == pid)
            killed = time.time()
            cluster.kill_node(victim)

            def again():
                return [r["time"] for r in cluster.records("progress")
                        if r["world"] == 4 and r["time"] > killed]

            wait_for("training again with 2 nodes", again, 180)
            recovery = min(again()) - killed
            for name in names:
                if name != victim:
                    cluster.wait(name, 120)
            timeout = float(conf.get("heartbeat_timeout", 10.0))  # type: ignore[arg-type]
            print(f"{label:>8} {timeout:>12.2f} {recovery:>12.2f} {timeout + 5:>10.2f}")
            return {"settings": label, "heartbeat_timeout_s": timeout,
                    "kill_to_training_s": recovery, "target_s": timeout + 5}
        finally:
            cluster.cleanup()


def part_kill() -> list[dict]:
    print(f"\n## 2. Kill rank-0 node -> training again ({_load()})")
    print(f"{'settings':>8} {'hb timeout':>12} {'recovery s':>12} {'target s':>10}")
    default = {}  # heartbeat 2 s / 10 s, last call 30 s
    tuned = {"heartbeat_interval": 0.25, "heartbeat_timeout": 1.5, "last_call_timeout": 3}
    return [kill_recovery(default, "default", 40), kill_recovery(tuned, "tuned", 40)]


# ----------------------------------------------------------------------------------- 3. scale
def _scale_process(root, run_id, n, count, ready, finished, results, index=0) -> None:
    from hpc_elastic.rendezvous import create_handler

    _enter_node(index)
    handlers = [create_handler(root, run_id, n, n, local_addr="127.0.0.1")
                for _ in range(count)]
    out: list[tuple] = []
    lock = threading.Lock()

    def run(h) -> None:
        called = time.time()
        h.next_rendezvous()
        done = time.time()
        with lock:
            out.append((called, done, h.fs_ops.as_dict(), h._state_file._lock.acquisitions))

    threads = [threading.Thread(target=run, args=(h,)) for h in handlers]
    ready.wait()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    head = handlers[0]._state_file.read_head() if handlers else None
    # A fresh run directory: the newest version's number is the number of commits.
    out = [(*row, head.version if head else 0) for row in out]
    results.put(out)
    finished.wait()
    for h in handlers:
        h._stop_heartbeats()


def scale(n: int, roots: list[str], processes: int = 4) -> dict:
    processes = max(processes, len(MNTNS))
    ready, finished = FORK.Barrier(processes), FORK.Barrier(processes)
    results = FORK.Queue()
    per = [n // processes + (1 if i < n % processes else 0) for i in range(processes)]
    procs = [FORK.Process(target=_scale_process,
                          args=(roots[i % len(roots)], f"scale-{n}", n, c, ready, finished,
                                results, i))
             for i, c in enumerate(per)]
    for p in procs:
        p.daemon = True
        p.start()
    try:
        end = time.monotonic() + SCALE_TIMEOUT[0]
        rows = [row for _ in procs
                for row in results.get(timeout=max(1.0, end - time.monotonic()))]
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
    calls, dones = [r[0] for r in rows], [r[1] for r in rows]
    ops = [r[2] for r in rows]
    per_participant = {k: statistics.mean(o[k] for o in ops) for k in ops[0]}
    total_ops = [o["opens"] + o["renames"] + o["locks"] for o in ops]
    return {
        "participants": n,
        "last_arrival_to_all_done_s": max(dones) - max(calls),
        "first_arrival_to_all_done_s": max(dones) - min(calls),
        "fs_ops_per_participant_mean": statistics.mean(total_ops),
        "fs_ops_per_participant_max": max(total_ops),
        "state_commits": max(r[4] for r in rows),
        "breakdown_mean": per_participant,
    }


def part_scale(sizes: list[int], roots: list[str] | None = None) -> list[dict]:
    print(f"\n## 3. One round with many participants, threads in 4 processes ({_load()})")
    print(f"{'nodes':>6} {'last->done s':>13} {'first->done s':>14} {'fs ops/node':>12} "
          f"{'max':>5} {'commits':>7}  breakdown (mean per node)")
    rows = []
    for n in sizes:
        try:
            with _roots(roots) as dirs:
                r = scale(n, dirs)
        except Exception as exc:  # noqa: BLE001 - reported; larger rounds are not tried
            print(f"{n:>6} did not finish: {type(exc).__name__}: {str(exc)[:200]}")
            rows.append({"participants": n, "finished": False, "error": str(exc)[:500]})
            break
        b = r["breakdown_mean"]
        print(f"{n:>6} {r['last_arrival_to_all_done_s']:>13.3f} "
              f"{r['first_arrival_to_all_done_s']:>14.3f} "
              f"{r['fs_ops_per_participant_mean']:>12.1f} {r['fs_ops_per_participant_max']:>5}"
              f" {r['state_commits']:>7}"
              f"  opens {b['opens']:.1f}, renames {b['renames']:.1f}, locks {b['locks']:.1f}"
              f" ({_load()})")
        rows.append(r)
    return rows


@contextlib.contextmanager
def _roots(roots: list[str] | None):
    """The rendezvous roots to use: the given ones (one directory through several mounts, each
    run in a fresh subdirectory), or one temporary directory on local disk."""
    if not roots:
        with tempfile.TemporaryDirectory() as root:
            yield [root]
        return
    name = f"bench-{os.getpid()}-{time.time_ns()}"
    os.makedirs(os.path.join(roots[0], name), mode=0o700)
    if MNTNS:  # one path seen through every node's client: wait until each node sees it
        time.sleep(1.5)
    try:
        yield [os.path.join(r, name) for r in roots]
    finally:
        shutil.rmtree(os.path.join(roots[0], name), ignore_errors=True)


def on_gluster(profiles: list[str], clients: int, sizes: list[int], repeats: int,
               scale_sizes: list[int]) -> dict[str, dict]:
    """Parts 1 and 3 with every agent process in the mount namespace of one of ``clients``
    GlusterFS client nodes (agent i on node i mod k), per profile; one private server."""
    from sharedfs import SharedFS

    fs = SharedFS().start()
    out: dict[str, dict] = {}
    try:
        for profile in profiles:
            nodes = fs.clients(clients, profile)
            try:
                MNTNS[:] = [str(fs.state / "ns" / f"{n}.mnt") for n in nodes.nodes]
                print(f"\n# GlusterFS profile {profile!r}: {clients} client nodes, one "
                      f"directory {nodes.path}")
                root = [str(nodes.path)]
                out[profile] = {"first": part_first(sizes, repeats, root),
                                "scale": part_scale(scale_sizes, root)}
            finally:
                MNTNS[:] = []
                nodes.close()
    finally:
        fs.stop()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 repeat, scale 256 only")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes (2 agents, 32 participants, no kill part): < 60 s")
    parser.add_argument("--roots", help="comma-separated: one directory through several mounts")
    parser.add_argument("--mntns", help="comma-separated mount namespace files (nsfs) to spread "
                        "the agents over; --roots then names one path valid in all of them")
    parser.add_argument("--gluster", help="comma-separated GlusterFS profiles (cached, "
                        "coherent): a private server and --clients client nodes per profile "
                        "(tests/sharedfs; needs root); parts 1 and 3 on each")
    parser.add_argument("--clients", type=int, default=3, help="client nodes per profile")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sizes", default="2,4,8,16")
    parser.add_argument("--scale", default="256,512")
    parser.add_argument("--scale-timeout", type=float, default=300.0,
                        help="seconds before a scale round counts as not finished")
    parser.add_argument("--skip-kill", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args()
    SCALE_TIMEOUT[0] = args.scale_timeout
    if args.quick:
        args.repeats, args.scale = 1, "256"
    if args.smoke:
        args.repeats, args.sizes, args.scale, args.skip_kill = 1, "2", "32", True
    roots = args.roots.split(",") if args.roots else None
    if args.mntns:
        MNTNS[:] = args.mntns.split(",")
    if roots or args.gluster:
        args.skip_kill = True  # the kill part's agents use one local directory

    import logging

    logging.basicConfig(level=logging.WARNING)
    _preload()
    print(f"# bench_rendezvous ({_load()})")
    result: dict[str, object] = {"load_start": os.getloadavg()}
    result["roots"] = roots
    result["mount_namespaces"] = list(MNTNS)
    sizes = [int(x) for x in args.sizes.split(",")]
    scale_sizes = [int(x) for x in args.scale.split(",") if x]
    if args.gluster:
        result["gluster"] = on_gluster(args.gluster.split(","), args.clients, sizes,
                                       args.repeats, scale_sizes)
        firsts = [r for g in result["gluster"].values() for r in g["first"]]  # type: ignore
    else:
        result["first"] = firsts = part_first(sizes, args.repeats, roots)
        if not args.skip_kill:
            result["kill"] = part_kill()
        result["scale"] = part_scale(scale_sizes, roots)
    result["load_end"] = os.getloadavg()
    worst = max(r["ratio"] for r in firsts)
    print(f"\nworst sharedfs/c10d ratio: {worst:.2f} (target <= 0.1); {_load()}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
