"""The agent's first steps, before it imports torch: read the job, set the umask and the
workers' environment. ``hpc-elastic agent`` runs this; hpc_elastic/agent/runner.py does the rest.

Why before torch: with ``warm_workers`` the agent forks its standby from itself right after its
own ``import torch`` (hpc_elastic/agent/standby.py), and every warm worker is a fork of that
standby. Whatever torch and its libraries read while being imported -- ``OMP_NUM_THREADS``
(the OpenMP runtime reads it when torch loads it), other variables of the job's ``env:`` -- and
the umask the job directory needs must therefore be in place before that import, or forked
workers would silently differ from workers started anew. This module imports no torch; neither
do the handlers for SIGTERM/SIGINT it installs first (a stop during the seconds of ``import
torch`` still ends with a final event).
"""

from __future__ import annotations

import fcntl
import os
import signal
from dataclasses import dataclass
from pathlib import Path

from hpc_elastic.agent import stop_signals
from hpc_elastic.agent.ending import Ending
from hpc_elastic.config import JobConfig, load_config
from hpc_elastic.identity import NodeIdentity
from hpc_elastic.jobdir import JobDir, umask_for
from hpc_elastic.submit import batch_jobdir, read_job_config


@dataclass(frozen=True)
class Prepared:
    """What the agent knows before torch: who it is, the job, where it lives."""

    ident: NodeIdentity
    config: JobConfig
    jobdir: JobDir
    #: descriptors this process was started with (a forked standby closes them, as ``Popen`` would)
    inherited_fds: frozenset[int]


def start_agent(target: str | Path) -> int:
    """Run this node's agent to the end; return the process exit code.

    ``target`` is a job directory made by ``submit``, or a job YAML file when a plain batch
    script starts the agents itself (see ``sbatch/``). Whatever ends the agent, its last event
    says why (hpc_elastic/agent/ending.py)."""
    inherited = frozenset(open_fds())
    ending = Ending()
    stop_signals.install()
    try:
        prepared = prepare(target, ending, inherited)
        from hpc_elastic.agent import runner  # noqa: PLC0415 - torch: after prepare()
    except Exception as err:  # noqa: BLE001 - every end gets its final event, then the code
        if isinstance(getattr(err, "sigval", None), signal.Signals):
            return ending.stopped(err)
        return ending.crashed(err)
    return runner.run_agent(prepared, ending)


def prepare(target: str | Path, ending: Ending, inherited_fds: frozenset[int]) -> Prepared:
    ident = NodeIdentity.from_env()
    if Path(target).is_file():
        config = load_config(target)
        jobdir = batch_jobdir(config, ident.job_id)
        ending.begin(jobdir, ident.node, ident.job_id, ident.attempt)
    else:
        jobdir = JobDir(Path(target).resolve())
        ending.begin(jobdir, ident.node, ident.job_id, ident.attempt)
        config = read_job_config(jobdir)
    # Files torch and the workers create (logs, error.json) get the job directory's modes.
    os.umask(umask_for(config.share_with_group))
    # Workers inherit the agent's environment: torch's agent copies os.environ for them.
    os.environ.update(worker_environment(config, jobdir))
    os.environ["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    # Every node runs nproc_per_node workers, so ranks can be computed locally: torch then does
    # not wait in the store for rank 0 to hand them out, which stalls if rank 0 dies right
    # after a rendezvous.
    os.environ.setdefault("TORCH_ELASTIC_WORKER_IDENTICAL", "1")
    return Prepared(ident, config, jobdir, inherited_fds)


def worker_environment(config: JobConfig, jobdir: JobDir) -> dict[str, str]:
    """Variables the workers see on top of torch's own (RANK, WORLD_SIZE, MASTER_ADDR, ...).

    The job id, attempt and node come from the telemetry's ``worker_env()``, which the agent
    adds as well."""
    return {
        **config.env,
        "HPC_ELASTIC_JOBDIR": str(jobdir.path),
        "HPC_ELASTIC_CHECKPOINT_DIR": str(jobdir.checkpoints),
        "HPC_ELASTIC_PREEMPT_SIGNAL": config.preemption.signal,
    }


def open_fds() -> set[int]:
    """This process's open file descriptors above stderr (not the one the listing used)."""
    return {fd for fd in map(int, os.listdir("/proc/self/fd")) if fd > 2 and _is_open(fd)}


def _is_open(fd: int) -> bool:
    try:
        fcntl.fcntl(fd, fcntl.F_GETFD)
    except OSError:
        return False
    return True
