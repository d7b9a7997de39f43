"""Thin, honest wrappers around Slurm's commands (sbatch, squeue, sacct, scontrol, scancel).

Why not submitit's executor: it pickles a Python function per task, while our task is a plain
command (the agent). We use submitit to *render* the script (see ``sbatch.py``) and call the
commands ourselves, so Slurm's own error text reaches the user unchanged.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Collection, Mapping, Sequence

# Slurm job states that will not change any more.
FINAL_STATES = frozenset({
    "BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY",
    "PREEMPTED", "TIMEOUT", "REVOKED",
})


class SlurmError(RuntimeError):
    """A Slurm command failed; the message is Slurm's own words plus what to do."""


def slurm_available(env: Mapping[str, str] | None = None) -> bool:
    """True when ``sbatch`` is on PATH (of ``env`` when given)."""
    path = (env or os.environ).get("PATH")
    return shutil.which("sbatch", path=path) is not None


def controller_answers(env: Mapping[str, str] | None = None, timeout: float = 10
                       ) -> tuple[bool, str]:
    """Whether a Slurm controller answers ``scontrol ping``, and what it said.

    ``sbatch`` on PATH is not enough: after installing Slurm's client packages (the README's test
    command does) there is no configuration, and every command fails with "Could not establish a
    configuration source". Slurm's own timeouts apply inside ``timeout``; a controller that does
    not answer within it counts as not reachable.
    """
    try:
        result = subprocess.run(
            ["scontrol", "ping"], capture_output=True, text=True, timeout=timeout,
            env=dict(env) if env is not None else None, stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        return False, "scontrol is not on PATH"
    except subprocess.TimeoutExpired:
        return False, f"'scontrol ping' did not answer within {timeout:g} s"
    lines = [line.strip() for line in (result.stdout + result.stderr).splitlines()
             if line.strip() and not line.lstrip().startswith("*")]  # scontrol's banner
    said = "; ".join(lines) or f"exit code {result.returncode}"
    return result.returncode == 0 and " is UP" in said, said


def run_slurm(args: Sequence[str], env: Mapping[str, str] | None = None,
              timeout: float = 60) -> str:
    """Run one Slurm command; return stdout, or raise SlurmError with Slurm's stderr."""
    try:
        result = subprocess.run(
            list(args), capture_output=True, text=True, timeout=timeout,
            env=dict(env) if env is not None else None, stdin=subprocess.DEVNULL,
        )
    except FileNotFoundError:
        raise SlurmError(
            f"'{args[0]}' is not installed or not on PATH. Run this on a Slurm login node, or "
            "use --local to run on this machine."
        ) from None
    except subprocess.TimeoutExpired:
        raise SlurmError(f"'{' '.join(args)}' did not answer within {timeout:g} s; is slurmctld "
                         "reachable (try 'sinfo')?") from None
    if result.returncode != 0:
        said = " ".join(result.stderr.split()) or f"exit code {result.returncode}"
        raise SlurmError(f"{args[0]} failed: {said}")
    return result.stdout


def submit_script(script_path: str, env: Mapping[str, str] | None = None) -> str:
    """``sbatch --parsable``: return the job id."""
    out = run_slurm(["sbatch", "--parsable", script_path], env=env).strip()
    return out.split(";")[0]  # "<id>;<cluster>" on federated clusters


def _squeue_lines(job_id: str, fmt: str, env: Mapping[str, str] | None) -> list[str]:
    """squeue's lines for one job (an array: one per task or task range); [] once it left."""
    try:
        out = run_slurm(["squeue", "--noheader", "--jobs", job_id, f"--format={fmt}"], env=env)
    except SlurmError:
        return []  # "Invalid job id specified" once the job has left the queue
    return [line for line in out.splitlines() if line.strip()]


def queue_state(job_id: str, env: Mapping[str, str] | None = None) -> str | None:
    """The job's state from squeue, or None when squeue no longer knows it."""
    lines = _squeue_lines(job_id, "%T", env)
    return lines[0].split()[0] if lines else None


def queue_nodes(job_id: str, states: Collection[str],
                env: Mapping[str, str] | None = None) -> int:
    """Nodes the job holds or asks for in the given states (an array: summed over its tasks)."""
    return sum(int(fields[1]) for line in _squeue_lines(job_id, "%T %D", env)
               if len(fields := line.split()) == 2 and fields[0] in states)


def accounting_state(job_id: str, env: Mapping[str, str] | None = None) -> str | None:
    """The job's final state from sacct, or None when accounting is off or lags."""
    try:
        out = run_slurm(
            ["sacct", "--noheader", "--parsable2", "--allocations", "--jobs", job_id,
             "--format=State"], env=env)
    except SlurmError:
        return None
    states = [line.split()[0] for line in out.splitlines() if line.strip()]
    return states[-1] if states else None  # "CANCELLED by 0" -> "CANCELLED"


def job_state(job_id: str, env: Mapping[str, str] | None = None) -> str | None:
    """squeue first (live), then sacct (after the end); None if neither knows the job."""
    return queue_state(job_id, env) or accounting_state(job_id, env)


def cancel(*job_ids: str, pending_only: bool = False,
           env: Mapping[str, str] | None = None) -> None:
    """``scancel`` the jobs; ``pending_only``: only those (or their array tasks) not started."""
    run_slurm(["scancel", *(["--state=PENDING"] if pending_only else []), *job_ids], env=env)


def exclude_nodes(job_id: str, nodes: Sequence[str],
                  env: Mapping[str, str] | None = None) -> list[str]:
    """Add ``nodes`` to a *pending* job's ``ExcNodeList`` (Slurm accepts the change only while
    the job pends, e.g. right after ``scontrol requeue``); return the whole new list. The job's
    own exclusions (``--exclude``) are kept."""
    current: list[str] = []
    for field in run_slurm(["scontrol", "show", "job", job_id, "--oneliner"], env=env).split():
        if field.startswith("ExcNodeList=") and field != "ExcNodeList=(null)":
            current = run_slurm(["scontrol", "show", "hostnames", field.split("=", 1)[1]],
                                env=env).split()
    wanted = sorted(set(current) | set(nodes))
    run_slurm(["scontrol", "update", f"JobId={job_id}", f"ExcNodeList={','.join(wanted)}"],
              env=env)
    return wanted


def requeue(job_id: str, env: Mapping[str, str] | None = None) -> None:
    run_slurm(["scontrol", "requeue", job_id], env=env)
