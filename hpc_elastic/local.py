"""Local mode: run a job on this machine, one agent process per simulated node.

The agents are the same ``hpc-elastic agent JOBDIR`` processes that ``srun`` starts on a cluster;
only their identity comes from ``HPC_ELASTIC_*`` variables instead of Slurm's, so the job
directory and its logs have the same layout as a cluster run.

A preemption in local mode ends the agents with ``EXIT_REQUEUED``; the launcher then starts a
new attempt, as Slurm's requeue would.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from types import FrameType

from hpc_elastic import identity
from hpc_elastic.agent.preemption import EXIT_REQUEUED
from hpc_elastic.config import JobConfig
from hpc_elastic.jobdir import JobDir

MAX_LOCAL_ATTEMPTS = 5
AGENTS_FILE = "local-agents.json"


def node_name(index: int) -> str:
    return f"local{index}"


def run_local(config: JobConfig, jobdir: JobDir, job_id: str, nodes: int | None = None) -> int:
    """Run the job to its end with ``nodes`` simulated nodes (default: max_nodes)."""
    count = nodes or config.max_nodes
    for attempt in range(MAX_LOCAL_ATTEMPTS):
        codes = _run_attempt(jobdir, job_id, count, attempt)
        if all(code == EXIT_REQUEUED for code in codes) and config.preemption.requeue:
            print(f"hpc-elastic: attempt {attempt} was preempted; starting attempt {attempt + 1}",
                  file=sys.stderr)
            continue
        return job_exit_code(codes, config.min_nodes)
    return 1


def job_exit_code(codes: list[int], min_nodes: int) -> int:
    """The job's outcome from its agents' exit codes.

    An agent killed by a signal (negative code) is a lost node, as when a real node dies: the
    job succeeded if no agent reported a failure and at least ``min_nodes`` agents finished.
    """
    failed = [code for code in codes if code > 0]
    if failed:
        return failed[0]
    return 0 if sum(code == 0 for code in codes) >= min_nodes else 1


def _run_attempt(jobdir: JobDir, job_id: str, count: int, attempt: int) -> list[int]:
    agents = [_start_agent(jobdir, job_id, index, attempt) for index in range(count)]
    (jobdir.path / AGENTS_FILE).write_text(json.dumps(
        {"attempt": attempt, "pids": [agent.pid for agent in agents]}) + "\n")

    def forward(signum: int, frame: FrameType | None) -> None:
        for agent in agents:
            if agent.poll() is None:
                agent.send_signal(signal.SIGTERM)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return [agent.wait() for agent in agents]
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _start_agent(jobdir: JobDir, job_id: str, index: int, attempt: int) -> subprocess.Popen:
    env = dict(os.environ)
    for name in list(env):  # a local run inside a Slurm allocation must not look like Slurm
        if name.startswith("SLURM_"):
            del env[name]
    env.update({
        identity.LOCAL_JOB_ID: job_id,
        identity.LOCAL_NODE_NAME: node_name(index),
        identity.LOCAL_NODE_INDEX: str(index),
        identity.LOCAL_ATTEMPT: str(attempt),
        identity.LOCAL_NODE_ADDR: "127.0.0.1",
    })
    # Each agent gets its own session: a signal is delivered to it alone, as on a real node.
    return subprocess.Popen(
        [sys.executable, "-m", "hpc_elastic", "agent", str(jobdir.path)],
        env=env, start_new_session=True, stdin=subprocess.DEVNULL,
    )


def local_job_id(jobdir: JobDir) -> str:
    """Job ids of local runs: unique because the job directory's name is."""
    return f"local-{jobdir.path.name}"
