"""Benchmark ``hpc-elastic logs summary`` on a synthetic 64-node job with 1,000,000 events.

Why synthetic: a real job of that size takes hours; the analysis only reads files, so files with
the real line shapes (rendezvous rounds, worker starts, restarts, failures, and mostly chatty
rendezvous/torch log lines) exercise the same code. The summary runs in a CHILD process so its
peak RSS (``ru_maxrss`` of that process) is the command's own, not this generator's.

    .venv/bin/python benchmarks/bench_analysis.py [--nodes 64] [--events 1000000] [--keep DIR]
    .venv/bin/python benchmarks/bench_analysis.py --smoke    # does it still run? (tiny sizes)

``--command plot`` renders the job's timeline (``--keep DIR`` to look at the PNG).

Targets: < 10 s and < 500 MB peak RSS.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import io, json, resource, sys, time, contextlib
import argparse
from hpc_elastic.analysis import cli
t = time.perf_counter()
buf = io.StringIO()
with contextlib.redirect_stdout(buf):
    rc = cli.run(sys.argv[2], argparse.Namespace(job=sys.argv[1], json=True))
elapsed = time.perf_counter() - t
out = json.loads(buf.getvalue()) if sys.argv[2] == "summary" else {}
print(json.dumps({"rc": rc, "elapsed_s": elapsed,
                  "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "restarts": out.get("restarts"), "failures": out.get("failures_count"),
                  "events": out.get("events_read"), "status": out.get("status")}))
"""


class _Adder:
    """Appends one event line per call, 10 ms after the previous one."""

    def __init__(self, head: dict[str, object], lines: list[str], t: float) -> None:
        self.head, self.lines, self.t = head, lines, t

    def __call__(self, kind: str, source: str = "agent", **fields: object) -> None:
        self.t += 0.01
        self.lines.append(json.dumps({**self.head, "time": self.t, "source": source,
                                      "kind": kind, **fields}, separators=(",", ":")))


def synthesize(root: Path, nodes: int, events: int, rounds: int = 10, workers: int = 8) -> int:
    """Write a job dir: ``nodes`` event files with ``events`` lines in total. Returns lines."""
    root.mkdir(parents=True, exist_ok=True)
    t0 = 1_700_000_000.0
    (root / "submission.json").write_text(json.dumps(
        {"v": 1, "mode": "slurm", "job_id": "4242", "submitted_at": t0 - 30, "name": "bench"}))
    (root / "job.yaml").write_text(f"name: bench\nnodes: {nodes}\n")
    per_node = events // nodes
    total = 0
    for n in range(nodes):
        node = f"node{n:03d}"
        d = root / "nodes" / node
        d.mkdir(parents=True)
        lines: list[str] = []
        add = _Adder({"v": 1, "job_id": "4242", "attempt": 0, "node": node}, lines,
                     t0 + n * 0.001)

        add("agent.start", pid=1000 + n, address=f"10.0.{n // 256}.{n % 256}", nodes=nodes)
        fixed = 1 + rounds * (5 + workers) + 2
        filler_per_round = max(0, (per_node - fixed) // rounds)
        for r in range(rounds):
            add("rendezvous.started", "rendezvous", run_id="4242", message="joining")
            add("rendezvous.completed", "rendezvous", run_id="4242", round=r, rank=n,
                world_size=nodes, master_addr="10.0.0.0", master_port=29500, duration_ms=12.5)
            add("agent.rendezvous", torch_name="torchelastic.worker.status.RENDEZVOUS",
                run_id="4242", role="trainer", restart_count=r, duration_ms=12.7)
            if r:
                add("workers.restart", restart_count=r, reason="failure", role="trainer",
                    group_rank=n, group_world_size=nodes)
            add("workers.started", restart_count=r, role="trainer", group_rank=n,
                group_world_size=nodes)
            for w in range(workers):
                add("worker.started", "worker", rank=n * workers + w, local_rank=w,
                    restart_count=r, worker_id=str(5000 + w), role="trainer")
            for i in range(filler_per_round):
                if i % 2:
                    add("rendezvous.heartbeat", "rendezvous", run_id="4242", suppressed=59,
                        message="keep-alive")
                else:
                    add("torch.log", logger="torchelastic", message=f"step {i} ok on {node}")
            if r < rounds - 1 and n == r % nodes:
                add("worker.failed", rank=n * workers, local_rank=0, exitcode=1, pid=5000,
                    restart_count=r, message=f"RuntimeError: synthetic failure in round {r}",
                    error_time=int(add.t))
        while len(lines) < per_node - 1:
            add("torch.log", logger="torchelastic", message="tail")
        add("agent.succeeded", elapsed_s=add.t - t0)
        (d / "events.jsonl").write_text("\n".join(lines) + "\n")
        total += len(lines)
    return total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=64)
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--keep", type=Path, help="write the job dir here and keep it")
    ap.add_argument("--command", default="summary",
                    choices=["summary", "metrics", "failures", "plot"])
    ap.add_argument("--smoke", action="store_true",
                    help="4 nodes, 4,000 events: checks that the benchmark runs (the test suite "
                    "does); its numbers mean nothing")
    args = ap.parse_args()
    if args.smoke:
        args.nodes, args.events = 4, 4000
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp) / "bench-job"
        t = time.perf_counter()
        n = synthesize(root, args.nodes, args.events)
        size = sum(p.stat().st_size for p in root.glob("nodes/*/events.jsonl"))
        print(f"synthesized {n} events on {args.nodes} nodes ({size / 1e6:.0f} MB) in "
              f"{time.perf_counter() - t:.1f}s")
        proc = subprocess.run([sys.executable, "-c", CHILD, str(root), args.command],
                              capture_output=True, text=True, check=False)
        if proc.returncode:
            sys.stderr.write(proc.stderr)
            return 1
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"logs {args.command}: {res['elapsed_s']:.2f}s, peak RSS {res['maxrss_mb']:.0f} MB"
              f" (targets < 10 s, < 500 MB); events {res['events']}, restarts "
              f"{res['restarts']}, failures {res['failures']}, status {res['status']}")
        return 0 if res["elapsed_s"] < 10 and res["maxrss_mb"] < 500 else 1


if __name__ == "__main__":
    sys.exit(main())
