"""How long an agent's process lives on after its final event, against an interpreter that
imported what the agent imports and exits normally, measured in the same run.

    .venv/bin/python benchmarks/bench_agent_exit.py            # ~2 min: 5 reference exits
                                                               # each way, 3 preempted jobs
    .venv/bin/python benchmarks/bench_agent_exit.py --smoke    # does it still run? (1 + 1)

Why it matters: Slurm ends a node's step only when the agent's process is gone; a preempted
job's batch script is requeued only after its last step, and the local launcher relaunches only
after every agent. Whatever an agent does after its final event therefore delays every requeue
and every job end (hpc_elastic/agent/quick_exit.py).

Part 1, the reference: a fresh interpreter imports torch and torch's elastic agent (what an
agent imports), writes the time, and ends -- with a normal exit (the interpreter's teardown),
and with hpc_elastic's ``exit_now``. Measured: from the written time until ``wait`` returns.

Part 2, the product: a local job (2 simulated nodes, 1 worker each, a worker script written
here that just sleeps) gets the preemption signal once its workers run; each agent writes its
final event (``agent.preempted``) and ends. Measured per agent: from that event's time until
its process is gone or a zombie (``/proc/PID/stat`` polled every 2 ms). Reported: medians, and
the agents' median over the normal-exit reference's (target: < 0.2).
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
PYTHON = sys.executable

from hpc_elastic.telemetry import read_jsonl  # noqa: E402

REFERENCE = r"""
import sys, time
import torch
import torch.distributed.elastic.agent.server.local_elastic_agent
from hpc_elastic.agent.quick_exit import exit_now
print(repr(time.time()), flush=True)
if sys.argv[1] == "exit_now":
    exit_now(0)
"""

WORKER = """\
import time
while True:  # the preemption signal's default action ends it
    time.sleep(0.05)
"""

JOB = """\
name: exit-bench
nodes: 2
nproc_per_node: 1
entrypoint: sleeper.py
max_restarts: 0
job_root: {root}
warm_workers: false
env:
  OMP_NUM_THREADS: 1
rendezvous:
  last_call_timeout: 1
preemption:
  signal: USR1
  grace: 30
  requeue: true
"""


def reference_exit(how: str) -> float:
    """Seconds from the reference process's last line to its end."""
    proc = subprocess.Popen([PYTHON, "-c", REFERENCE, how], stdout=subprocess.PIPE, text=True,
                            cwd=REPO)
    assert proc.stdout is not None
    last_line = float(proc.stdout.readline())
    proc.wait()
    ended = time.time()
    if proc.returncode != 0:
        raise SystemExit(f"the reference process ({how}) ended with {proc.returncode}")
    return ended - last_line


def events(root: Path) -> list[dict]:
    """Every node's events so far (a line still being written is skipped)."""
    return [event for path in root.glob("*/nodes/*/events.jsonl") for event in read_jsonl(path)]


def gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return True
    return state == "Z"


def preempted_job(work: Path) -> list[float]:
    """One local job, preempted once its workers run: per agent, seconds from its final event
    to its process's end."""
    root = work / "jobs"
    (work / "sleeper.py").write_text(WORKER)
    (work / "job.yaml").write_text(JOB.format(root=root))
    launcher = subprocess.Popen([PYTHON, "-m", "hpc_elastic", "submit", "--local", "job.yaml"],
                                cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while sum(e.get("kind") == "worker.started" for e in events(root)) < 2:
            if time.monotonic() > deadline or launcher.poll() is not None:
                raise SystemExit(f"the workers did not start; see {root}")
            time.sleep(0.1)
        agents = {e["node"]: e["pid"] for e in events(root) if e.get("kind") == "agent.start"}
        for pid in agents.values():
            os.kill(pid, signal.SIGUSR1)
        ended: dict[str, float] = {}
        while len(ended) < len(agents) and time.monotonic() < deadline:
            for node, pid in agents.items():
                if node not in ended and gone(pid):
                    ended[node] = time.time()
            time.sleep(0.002)
        final = {e["node"]: e["time"] for e in events(root) if e.get("kind") == "agent.preempted"}
        missing = set(agents) - set(final) - set(ended)
        if missing or set(final) != set(agents):
            raise SystemExit(f"agents without a final event or an end: {sorted(missing)}; "
                             f"see {root}")
        return [ended[node] - final[node] for node in agents]
    finally:
        os.killpg(launcher.pid, signal.SIGTERM)  # the local launcher and what it started
        launcher.wait()


def ms(seconds: list[float]) -> str:
    return (f"median {1000 * statistics.median(seconds):.0f} ms "
            f"(range {1000 * min(seconds):.0f}-{1000 * max(seconds):.0f})")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--references", type=int, default=5,
                    help="reference processes for each way of exiting")
    ap.add_argument("--jobs", type=int, default=3, help="preempted local jobs (2 agents each)")
    ap.add_argument("--smoke", action="store_true",
                    help="1 reference each, 1 job: checks that the benchmark runs (the test "
                    "suite does); its numbers mean little")
    args = ap.parse_args()
    if args.smoke:
        args.references, args.jobs = 1, 1
    normal = [reference_exit("normal") for _ in range(args.references)]
    quick = [reference_exit("exit_now") for _ in range(args.references)]
    agents: list[float] = []
    for _ in range(args.jobs):
        with tempfile.TemporaryDirectory() as tmp:
            agents += preempted_job(Path(tmp))
    print(f"reference, normal exit:  {ms(normal)} over {len(normal)}")
    print(f"reference, exit_now:     {ms(quick)} over {len(quick)}")
    print(f"agent, final event->end: {ms(agents)} over {len(agents)} agents")
    ratio = statistics.median(agents) / statistics.median(normal)
    print(f"ratio agent / normal-exit reference: {ratio:.2f} (target < 0.2)")
    return 0 if args.smoke or ratio < 0.2 else 1


if __name__ == "__main__":
    sys.exit(main())
