"""The batch script of a job, rendered through submitit. A pure function: config in, text out.

Why submitit's private ``_make_sbatch_string``: it is the well-used renderer of ``#SBATCH`` lines
(quoting, ``srun`` output paths, flag spelling). Because it is private, the version range is pinned
in ``pyproject.toml`` and ``tests/test_sbatch_golden.py`` compares the full text for every
template, so an upgrade that changes the text is noticed before it reaches a cluster.

What the script does, and why:

* ``--nodes=MIN-MAX`` for elastic jobs lets Slurm start the job on fewer nodes when that is all
  that is free, and on up to ``max`` when they are free. No ``--ntasks-per-node`` and no
  ``--ntasks``: either pins an elastic job to its minimum (measured on Slurm 22.05: ``--nodes=2-3
  --ntasks-per-node=1`` got 2 of 4 idle nodes, ``--nodes=2-3`` alone got 3). The batch
  supervisor starts exactly one agent per node itself, one ``srun --nodes=1 --ntasks=1`` step
  each, and the agent starts the workers (as ``torchrun`` would).
* ``--no-kill`` (elastic jobs, and jobs with hot spares) keeps the allocation when a node
  fails, so the survivors can re-form; a fixed-size job without spares cannot continue on fewer
  nodes, so it lets Slurm end it instead. ``spares: K`` asks for K more nodes than ``max``
  (``--nodes=MIN-MAX+K``): their agents stand by until a node is lost.
* ``--requeue`` and ``--signal=<sig>@<grace>`` let the agents checkpoint and requeue the job on
  preemption or before the time limit. Without ``B:`` the signal reaches every srun task.
* The batch step runs ``hpc_elastic batch`` (not ``srun`` directly): it starts one step per
  node, so that a node going DOWN ends only its own step, never the survivors' (see batch.py).
* ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``: torch 2.13's shared agent TCP store breaks
  re-rendezvous (see docs/architecture.md); with it off, every round gets a fresh address.

A *member* job (``grow``, or ``submit --array``; docs/elastic-across-jobs.md) runs the same
agents in another job's run: ``HPC_ELASTIC_RUN_ID`` names that run. It is ``--exclusive`` (so
two jobs of the run never share a node, whose log directory has one writer) and
``--no-requeue``: when it ends the run shrinks, and only the lead requeues the run. Its
preemption signal goes to its batch shell only (``B:``), the cue to stop its agents so that they
leave the run before Slurm kills them.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from typing import Any

from submitit.slurm.slurm import _make_sbatch_string

from hpc_elastic.config import ConfigError, JobConfig, control_character
from hpc_elastic.identity import RUN_ID_ENV
from hpc_elastic.jobdir import JobDir


@dataclass(frozen=True)
class MemberScript:
    """What makes a member job's script: ``nodes`` nodes (``grow``) joining run ``run_id``, or
    ``array_tasks`` single-node tasks of an array that is itself the run (``run_id`` None)."""

    nodes: int = 1
    run_id: str | None = None
    array_tasks: int | None = None


def render_sbatch(config: JobConfig, jobdir: JobDir, python: str,
                  member: MemberScript | None = None) -> str:
    """The full batch script for ``config``, whose agents run ``python -m hpc_elastic agent``."""
    slurm = config.slurm
    extra: dict[str, Any] = {
        "time": slurm.time,
        "signal": f"{config.preemption.signal}@{config.preemption.grace}",
        # The batch shell's own output; each node's agent writes %j_<node>_log.out.
        "output": str(jobdir.slurm_logs / "%j_batch.out"),
        "error": str(jobdir.slurm_logs / "%j_batch.err"),
    }
    if member is None:
        extra["requeue"] = True
        if config.elastic or config.spares:
            extra["no-kill"] = True
    else:
        # To the batch shell only: it stops the member's agents, which leave the run (see
        # hpc_elastic/batch.py for why the workers must not get it).
        extra["signal"] = f"B:{extra['signal']}"
        extra["exclusive"] = True
        extra["no-requeue"] = True
        if member.array_tasks is not None:
            extra["array"] = f"0-{member.array_tasks - 1}"
    for key, value in slurm.sbatch.items():
        extra[key] = True if value == "" else value

    setup = [
        "# hpc_elastic: one agent per node; it starts and supervises the workers",
        "export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1",
        f"export HPC_ELASTIC_JOBDIR={shlex.quote(str(jobdir.path))}",
    ]
    if member is not None:
        run_id = shlex.quote(member.run_id) if member.run_id else "$SLURM_ARRAY_JOB_ID"
        setup += ["# a member job: its agents join the run's rendezvous",
                  f"export {RUN_ID_ENV}={run_id}"]
    setup += slurm.setup
    nodes: int | str = (
        config.min_nodes if not config.elastic and not config.spares
        else f"{config.min_nodes}-{config.max_nodes + config.spares}"
    )
    if member is not None:
        nodes = member.nodes
    # The batch step runs the supervisor, which runs one ``srun ... hpc_elastic agent`` step per
    # node itself (see hpc_elastic/batch.py).
    # ``exec``: the supervisor *is* the batch shell, so a signal Slurm sends to the batch shell
    # (a member's ``--signal=B:...``) reaches it instead of killing a bash that waits for it.
    command = "exec " + shlex.join([python, "-m", "hpc_elastic", "batch", str(jobdir.path)])
    params: dict[str, Any] = {
        "job_name": config.name, "partition": slurm.partition, "nodes": nodes,
        "cpus_per_task": slurm.cpus_per_task, "gpus_per_node": slurm.gpus_per_node,
        "qos": slurm.qos, "mem": slurm.mem, "constraint": slurm.constraint,
        "account": slurm.account,
    }
    check_script_values({**params, **extra, "setup": setup, "command": command})
    return _make_sbatch_string(
        command=command,
        folder=jobdir.slurm_logs,
        setup=setup,
        wckey=None,  # type: ignore[arg-type]  # submitit's default "submitit" is not ours
        additional_parameters=extra,
        use_srun=False,
        **params,  # nodes: submitit renders it as text, "2-4" is fine
    )


def check_script_values(values: dict[str, Any]) -> None:
    """The last check before text becomes the batch script: no key or value may hold a control
    character, or a newline in it would become a shell line of its own. ``load_config`` refuses
    such values with the file and line already; this catches values from anywhere else (the
    job root's path, a run id, a future key) in the one place they all pass."""
    for key, value in values.items():
        for item in value if isinstance(value, list) else [value]:
            bad = control_character(f"{key}={item}") if item is not None else None
            if bad is not None:
                raise ConfigError(
                    f"the batch script's '{key}' ({str(item)!r}) contains the control character "
                    f"{bad}, which would inject a line into the script. Nothing was submitted. "
                    "Fix: remove it from the job file, the --set value or the job root's path."
                )
