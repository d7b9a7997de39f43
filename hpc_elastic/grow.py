"""``grow``: add nodes to a running run from a separate Slurm job (docs/elastic-across-jobs.md).

A batch scheduler hands out fixed allocations, so an elastic run can only take more nodes by
asking for them in another job. That job's agents join the run's rendezvous (through the job
directory, like every agent); the running agents see nodes waiting at their next monitor tick,
and the whole run re-forms with the larger world and resumes from its checkpoint. When the grow
job ends or is cancelled, its agents leave the rendezvous and the run shrinks back.

Refused, with the reason and the fix: a job that is not a Slurm job, a run that has ended,
more nodes than ``max_nodes`` leaves room for, and a config that differs from the run's.
"""

from __future__ import annotations

import secrets
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hpc_elastic import slurm
from hpc_elastic.config import JobConfig, load_config
from hpc_elastic.jobdir import JobDir, make_dir
from hpc_elastic.members import GROW, MemberJob, read_members, record_member
from hpc_elastic.sbatch import MemberScript, render_sbatch
from hpc_elastic.submit import read_job_config, read_submission, write_atomic

#: Queue states in which a run can still take nodes (a pending lead starts in the same run).
LIVE_STATES = frozenset({"RUNNING", "PENDING", "CONFIGURING", "COMPLETING", "REQUEUED",
                         "RESIZING", "SUSPENDED"})
#: Config sections that may differ in a grow job: they describe its own allocation.
OWN_SECTIONS = frozenset({"slurm"})


class GrowRefused(ValueError):
    """The run cannot grow as asked; the message says why and what to do instead."""


def grow(jobdir: JobDir, nodes: int, overrides: Sequence[str] = (),
         config_file: str | None = None, env: Mapping[str, str] | None = None) -> MemberJob:
    """Submit a job of ``nodes`` nodes whose agents join ``jobdir``'s run; return its record."""
    if nodes < 1:
        raise GrowRefused(f"--nodes {nodes}: grow needs at least 1 node.")
    submission = read_submission(jobdir)
    if submission is None or submission.mode != "slurm":
        raise GrowRefused(
            f"{jobdir.path} is not a Slurm job (no submission.json, or a --local run, whose "
            "simulated nodes all start at once). Only a job submitted to Slurm can grow.")
    run_config = read_job_config(jobdir)
    config = _grow_config(jobdir, run_config, overrides, config_file)
    run_id = submission.job_id
    state = slurm.queue_state(run_id, env)
    if state not in LIVE_STATES:
        final = state or slurm.accounting_state(run_id, env) or "no longer in the queue"
        raise GrowRefused(
            f"job {run_id} has ended ({final}); grow only adds nodes to a run that is running "
            f"or pending. Submit a new run instead: hpc-elastic submit {jobdir.config}")
    in_use = nodes_in_use(jobdir, env)
    room = run_config.max_nodes - sum(in_use.values())
    if nodes > room:
        held = ", ".join(f"job {job} {count}" for job, count in in_use.items()) or "none"
        raise GrowRefused(
            f"job {run_id}'s run holds or waits for {sum(in_use.values())} node(s) ({held}) "
            f"and its max_nodes is {run_config.max_nodes} (nodes: {run_config.nodes} in "
            f"{jobdir.config}), so it can grow by at most {max(room, 0)}, not {nodes}. "
            "Grow by fewer nodes, or start a new run with a larger max.")
    return submit_member(jobdir, config, MemberScript(nodes=nodes, run_id=run_id), env)


def submit_member(jobdir: JobDir, config: JobConfig, member: MemberScript,
                  env: Mapping[str, str] | None = None) -> MemberJob:
    """Write a member job's script next to the others, sbatch it, record it."""
    make_dir(jobdir.members)
    script = jobdir.members / f"grow-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}.sbatch"
    write_atomic(script, render_sbatch(config, jobdir, sys.executable, member=member))
    try:
        job_id = slurm.submit_script(str(script), env)
    except slurm.SlurmError:
        script.unlink()  # nothing was submitted: leave no script that looks like a member
        raise
    record = MemberJob(job_id, GROW, str(member.nodes), time.time(),
                       script=str(script.relative_to(jobdir.path)))
    record_member(jobdir, record)
    return record


def nodes_in_use(jobdir: JobDir, env: Mapping[str, str] | None = None) -> dict[str, int]:
    """Nodes each live job of the run holds (running) or asks for (pending): ``{job: count}``.
    An array counts its live tasks, one node each."""
    used: dict[str, int] = {}
    for member in read_members(jobdir):
        count = slurm.queue_nodes(member.job_id, LIVE_STATES, env)
        if count:
            used[member.job_id] = count
    return used


def _grow_config(jobdir: JobDir, run_config: JobConfig, overrides: Sequence[str],
                 config_file: str | None) -> JobConfig:
    """The config of the grow job: the run's, or ``config_file``, with ``overrides``. Only the
    grow job's own allocation (``slurm.*``) may differ: every node of a run must train the
    same script the same way."""
    if not overrides and config_file is None:
        return run_config
    source = Path(config_file) if config_file else jobdir.config
    config = load_config(source, list(overrides))
    differ = _differences(run_config.to_dict(), config.to_dict())
    if differ:
        raise GrowRefused(
            f"{source} differs from the run's config ({jobdir.config}) in "
            f"{', '.join(differ)}. All nodes of a run must train with the same config; only "
            f"{', '.join(s + '.*' for s in sorted(OWN_SECTIONS))} may differ for the grow job. "
            "Grow with the run's own job file, or submit a new run.")
    return config


def _differences(run: dict[str, Any], other: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ, outside the sections a grow job may set itself."""
    found: list[str] = []
    for key in sorted(set(run) | set(other)):
        if not prefix and key in OWN_SECTIONS:
            continue
        a, b = run.get(key), other.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            found.append(f"{prefix}{key}")
    return found
