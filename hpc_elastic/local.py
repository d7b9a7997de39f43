"""Local mode: run a job on this machine, one agent process per simulated node.

The agents are the same ``hpc-elastic agent JOBDIR`` processes that ``srun`` starts on a cluster;
only their identity comes from ``HPC_ELASTIC_*`` variables instead of Slurm's, so the job
directory and its logs have the same layout as a cluster run.

A *launcher* process (``python -m hpc_elastic.local JOBDIR``, started by :func:`start_local` in a
session of its own) plays Slurm's part: it starts the agents, starts a new attempt after a
preemption (the agents end with ``EXIT_REQUEUED``, as Slurm's requeue would), and at the end
writes ``local-result.json`` with every agent's real exit code, so whoever waits for the job --
the terminal that submitted it, or a notebook -- can say what happened. ``cancel`` signals the
launcher (SIGTERM), which stops the agents and records the job as cancelled, not failed.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from hpc_elastic import identity, procs
from hpc_elastic.agent.preemption import EXIT_REQUEUED
from hpc_elastic.config import JobConfig
from hpc_elastic.jobdir import LOCAL_AGENTS, JobDir, umask_for, write_atomic

MAX_LOCAL_ATTEMPTS = 5
AGENTS_FILE = LOCAL_AGENTS  # the launcher's and the current attempt's agents' identities
RESULT_FILE = "local-result.json"  # written once by the launcher when the job has ended


def node_name(index: int) -> str:
    return f"local{index}"


@dataclass(frozen=True)
class LocalResult:
    """How a local job ended, as the launcher saw it."""

    state: str  # succeeded | failed | cancelled
    exit_code: int  # the job's code (see :func:`job_exit_code`)
    codes: dict[str, int]  # node -> its agent's exit code in the last attempt (-N: signal N)
    detail: str  # one line: why it failed, with the real codes
    ended_at: float

    def to_json(self) -> dict:
        return {"v": 1, "state": self.state, "exit_code": self.exit_code, "codes": self.codes,
                "detail": self.detail, "ended_at": self.ended_at}


def read_result(jobdir: JobDir) -> LocalResult | None:
    """The launcher's ``local-result.json``; None while the job runs (or if it is unreadable)."""
    try:
        d = json.loads((jobdir.path / RESULT_FILE).read_text())
        codes = {str(k): int(v) for k, v in d["codes"].items()}
        return LocalResult(str(d["state"]), int(d["exit_code"]), codes, str(d["detail"]),
                           float(d["ended_at"]))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


class _Stop:
    """SIGTERM/SIGINT to the launcher: the job is cancelled; the current agents get SIGTERM."""

    def __init__(self) -> None:
        self.requested = False
        self.agents: list[subprocess.Popen] = []

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True
        for agent in self.agents:
            if agent.poll() is None:
                agent.send_signal(signal.SIGTERM)


def run_local(config: JobConfig, jobdir: JobDir, job_id: str, nodes: int | None = None
              ) -> LocalResult:
    """Run the job to its end with ``nodes`` simulated nodes (default: max_nodes); record and
    return how it ended."""
    count = nodes or config.max_nodes
    stop = _Stop()
    codes: dict[str, int] = {}
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    _record_agents(jobdir, 0, [])
    try:
        for attempt in range(MAX_LOCAL_ATTEMPTS):
            if stop.requested:
                break
            codes = _run_attempt(jobdir, job_id, count, attempt, stop)
            if stop.requested:
                break
            if (all(code == EXIT_REQUEUED for code in codes.values())
                    and config.preemption.requeue):
                print(f"hpc-elastic: attempt {attempt} was preempted; starting attempt "
                      f"{attempt + 1}", file=sys.stderr)
                continue
            break
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    result = outcome_of(codes, config.min_nodes, cancelled=stop.requested)
    write_atomic(jobdir.path / RESULT_FILE, json.dumps(result.to_json(), indent=2) + "\n")
    return result


def outcome_of(codes: dict[str, int], min_nodes: int, cancelled: bool = False) -> LocalResult:
    """The job's outcome from its agents' exit codes, with a detail line that names them."""
    code = job_exit_code(list(codes.values()), min_nodes)
    shown = ", ".join(f"{node} {describe_code(c)}" for node, c in sorted(codes.items()))
    if cancelled:
        state, detail = "cancelled", f"cancelled; agents: {shown}"
    elif code == 0:
        state, detail = "succeeded", f"agents: {shown}"
    elif any(c > 0 and c != EXIT_REQUEUED for c in codes.values()):
        state, detail = "failed", f"an agent failed; agents: {shown}"
    else:
        finished = sum(c == 0 for c in codes.values())
        state = "failed"
        detail = (f"{finished} of {len(codes)} agent(s) finished, the job needs {min_nodes} "
                  f"(min_nodes); agents: {shown}")
    return LocalResult(state, code, codes, detail, time.time())


def describe_code(code: int) -> str:
    """``exit 0``, ``exit 1``, ``killed by SIGKILL (-9)``."""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name} ({code})"
        except ValueError:
            return f"killed by signal {-code} ({code})"
    if code == EXIT_REQUEUED:
        return f"exit {code} (preempted)"
    return f"exit {code}"


def job_exit_code(codes: list[int], min_nodes: int) -> int:
    """The job's outcome from its agents' exit codes.

    An agent killed by a signal (negative code) is a lost node, as when a real node dies: the
    job succeeded if no agent reported a failure and at least ``min_nodes`` agents finished.
    """
    failed = [code for code in codes if code > 0]
    if failed:
        return failed[0]
    return 0 if sum(code == 0 for code in codes) >= min_nodes else 1


def _run_attempt(jobdir: JobDir, job_id: str, count: int, attempt: int, stop: _Stop
                 ) -> dict[str, int]:
    stop.agents = agents = []
    for index in range(count):
        agents.append(_start_agent(jobdir, job_id, index, attempt, count))
        if stop.requested:  # cancelled while starting: this one was not signalled yet
            agents[-1].send_signal(signal.SIGTERM)
    _record_agents(jobdir, attempt, agents)
    return {node_name(i): agent.wait() for i, agent in enumerate(agents)}


def _record_agents(jobdir: JobDir, attempt: int, agents: list[subprocess.Popen]) -> None:
    """Write who runs the job now. PIDs alone are not enough for ``cancel`` and ``status``:
    the kernel reuses them, so each process is recorded with its start time and command line,
    which they check before counting or signalling it (hpc_elastic/procs.py). ``pids`` and
    ``launcher`` stay for readers of the plain numbers."""
    launcher = procs.record(os.getpid())
    records = [procs.record(agent.pid) for agent in agents]
    write_atomic(jobdir.local_agents, json.dumps(
        {"attempt": attempt, "pids": [agent.pid for agent in agents], "launcher": os.getpid(),
         "launcher_process": launcher.to_json() if launcher else None,
         "agents": [rec.to_json() for rec in records if rec is not None]}) + "\n")


def _start_agent(jobdir: JobDir, job_id: str, index: int, attempt: int,
                 count: int) -> subprocess.Popen:
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
        identity.LAUNCHED_ENV: str(count),
    })
    # Each agent gets its own session: a signal is delivered to it alone, as on a real node.
    return subprocess.Popen(
        [sys.executable, "-u", "-m", "hpc_elastic", "agent", str(jobdir.path)],
        env=env, start_new_session=True, stdin=subprocess.DEVNULL,
    )


def local_job_id(jobdir: JobDir) -> str:
    """Job ids of local runs: unique because the job directory's name is."""
    return f"local-{jobdir.path.name}"


def start_local(jobdir: JobDir, nodes: int | None = None) -> subprocess.Popen:
    """Start the launcher of a prepared local job (job.yaml and submission.json written) in a
    session of its own, so the job outlives a Ctrl-C in a notebook; ``cancel`` stops it."""
    return subprocess.Popen(
        [sys.executable, "-m", "hpc_elastic.local", str(jobdir.path),
         *(["--nodes", str(nodes)] if nodes else [])],
        start_new_session=True, stdin=subprocess.DEVNULL)


def launcher_pid(jobdir: JobDir) -> int | None:
    """The launcher's pid while it still runs (None before it recorded itself, or once the
    recorded process is gone: a PID the kernel gave to another process does not count)."""
    rec = launcher_record(jobdir)
    return rec.pid if rec is not None and procs.is_same(rec) else None


def launcher_record(jobdir: JobDir) -> procs.ProcessRecord | None:
    """The launcher as it recorded itself (see :func:`hpc_elastic.procs.recorded_launcher`)."""
    return procs.recorded_launcher(jobdir)


def main(argv: list[str] | None = None) -> int:
    """The launcher: ``python -m hpc_elastic.local JOBDIR [--nodes N]``."""
    from hpc_elastic.submit import read_job_config, read_submission

    parser = argparse.ArgumentParser(prog="python -m hpc_elastic.local")
    parser.add_argument("jobdir", type=Path)
    parser.add_argument("--nodes", type=int)
    args = parser.parse_args(argv)
    jobdir = JobDir(args.jobdir)
    submission = read_submission(jobdir)
    if submission is None:
        print(f"hpc-elastic: {jobdir.path}: no submission.json", file=sys.stderr)
        return 2
    config = read_job_config(jobdir)
    # The agents (and their workers) inherit it: private job files, whatever the user's umask.
    os.umask(umask_for(config.share_with_group))
    return run_local(config, jobdir, submission.job_id, args.nodes).exit_code


if __name__ == "__main__":
    sys.exit(main())
