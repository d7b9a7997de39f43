"""Helpers for the end-to-end tests that drive ``hpc-elastic`` against the real Slurm test
cluster (tests/test_e2e_slurm.py, tests/test_grow_slurm.py): submit, find the job directory,
read its events and summary, and check that nothing of a job is left on any node."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from slurm_cluster.fixture import SlurmCluster

from hpc_elastic.jobdir import JobDir
from hpc_elastic.telemetry import read_jsonl

REPO = Path(__file__).resolve().parent.parent
# Fast failure detection, so the scenarios fit the test budget.
FAST_RDZV = ("--set", "rendezvous.heartbeat_interval=0.5", "--set",
             "rendezvous.heartbeat_timeout=3", "--set", "rendezvous.last_call_timeout=1")
RESUMED = re.compile(r"starting at epoch (\d+) step (\d+) \(global step (\d+)\)")


# One worker per node unless a test asks for more (``--set nproc_per_node=2`` in ``extra`` wins,
# the last ``--set`` of a key counts). On the 2-core test machine every worker start is an
# ``import torch`` competing for the CPUs: 6 at once took 11-15 s, 3 at once 3.5 s, and the
# node-loss, grow and spare scenarios start worker groups 2-3 times each. What they test is
# nodes, not local ranks; the happy path keeps 2 workers per node on the cluster.
ONE_WORKER_PER_NODE = ("--set", "nproc_per_node=1")


def submit_args(job_root: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "hpc_elastic", "submit", str(REPO / "examples" / "demo.yaml"),
            "--set", f"job_root={job_root}", "--set", "slurm.time=5", *FAST_RDZV,
            *ONE_WORKER_PER_NODE, *extra]


def env_of(cluster: SlurmCluster) -> dict[str, str]:
    return {**cluster.env, "OMP_NUM_THREADS": "1"}


def submit_wait(cluster: SlurmCluster, job_root: Path, *extra: str,
                timeout: float = 240) -> subprocess.CompletedProcess[str]:
    """``submit --wait``: returns when the job has ended."""
    return subprocess.run(submit_args(job_root, "--wait", *extra), capture_output=True,
                          text=True, timeout=timeout, env=env_of(cluster),
                          stdin=subprocess.DEVNULL)


def the_jobdir(job_root: Path) -> JobDir:
    (path,) = [p for p in job_root.iterdir() if p.is_dir()]
    return JobDir(path)


def job_id_of(jobdir: JobDir) -> str:
    return str(json.loads(jobdir.submission.read_text())["job_id"])


def node_events(jobdir: JobDir, node: str) -> list[dict[str, Any]]:
    path = jobdir.events(node)
    return list(read_jsonl(path)) if path.exists() else []


def all_events(jobdir: JobDir) -> list[dict[str, Any]]:
    return [e for node in jobdir.node_names() for e in node_events(jobdir, node)]


def summary_json(jobdir: JobDir) -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, "-m", "hpc_elastic", "logs", "summary", str(jobdir.path), "--json"],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def summary_text(jobdir: JobDir) -> str:
    """The human summary; printed so that ``-s`` runs show it (docs/fault-tolerance.md)."""
    text = subprocess.run(
        [sys.executable, "-m", "hpc_elastic", "logs", "summary", str(jobdir.path)],
        capture_output=True, text=True, timeout=60).stdout
    print(f"\n$ hpc-elastic logs summary {jobdir.path}\n{text}")
    return text


def processes_mentioning(text: str) -> list[int]:
    """PIDs whose command line contains ``text`` (every agent's names the job directory)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if text.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def job_processes_left(cluster: SlurmCluster, jobdir: JobDir) -> list[str]:
    """What of the job still runs: any node's job processes, or any process naming the job
    directory. Waits a little, since Slurm reaps a finished step asynchronously."""
    def left() -> list[str]:
        out = [f"{node}: {pid}" for node in cluster.nodes for pid in cluster.node_processes(node)
               if _mentions(pid, jobdir)]
        return out + [f"cmdline: {pid}" for pid in processes_mentioning(str(jobdir.path))]

    deadline = time.monotonic() + 20
    while (found := left()) and time.monotonic() < deadline:
        time.sleep(0.5)
    return found


def _mentions(pid: int, jobdir: JobDir) -> bool:
    """A node process belongs to this job: its environment or command line names the job
    directory (workers get HPC_ELASTIC_JOBDIR; other tests' jobs may run meanwhile)."""
    needle = str(jobdir.path).encode()
    try:
        return any(needle in Path(f"/proc/{pid}/{f}").read_bytes() for f in ("cmdline", "environ"))
    except OSError:
        return False


def assert_nothing_left(cluster: SlurmCluster, jobdir: JobDir) -> None:
    assert not job_processes_left(cluster, jobdir), "processes of the job left behind"


def slurm_logs(jobdir: JobDir) -> str:
    return "\n".join(f"--- {p.name}\n" + p.read_text(errors="replace")[-1500:]
                     for p in sorted(jobdir.slurm_logs.glob("*")))


def rank0_node(jobdir: JobDir) -> str | None:
    """The node whose worker has global rank 0 in the current round."""
    for node in jobdir.node_names():
        if any(e["kind"] == "worker.started" and e.get("rank") == 0
               for e in node_events(jobdir, node)):
            return node
    return None


def training_nodes(jobdir: JobDir) -> list[str]:
    """Nodes whose workers run in the latest round they joined."""
    return [n for n in jobdir.node_names()
            if [e["kind"] for e in node_events(jobdir, n)
                if e["kind"].startswith(("rendezvous.completed", "workers.started"))][-1:]
            == ["workers.started"]]
