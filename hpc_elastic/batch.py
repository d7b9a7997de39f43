"""The batch step of a Slurm job: start one agent per node with ``srun``, and start them again
on the surviving nodes when a node is lost.

Why a supervisor and not a plain ``srun`` line: with ``--no-kill`` Slurm keeps the job's other
nodes when one fails, but once it marks the node DOWN it kills the running *step* on every node,
the survivors included (measured on Slurm 22.05: srun rc 137, "Node failure on n2"). The
survivors' agents would die with it although the allocation still has enough nodes. So when
``srun`` ends and

* no agent of this run logged an outcome (``agent.succeeded`` / ``agent.failed`` /
  ``agent.preempted``) and no node claimed a requeue,
* this step lost a node (one of the nodes it ran on is no longer usable), and
* at least ``min_nodes`` nodes of the allocation are still usable,

the supervisor launches a new step on the usable nodes. Each step gets a number
(``HPC_ELASTIC_STEP``) that the agents put into their rendezvous run id, because the previous
step's rendezvous was abandoned mid-round by SIGKILLed agents and must not be reused. Training
resumes from the checkpoint, as after any restart. The batch step exits 0 when an agent
succeeded (even if srun itself reported the lost node's task as failed), else srun's code.

Runs that span several jobs (docs/elastic-across-jobs.md): the *lead* job's supervisor publishes
the run's current rendezvous (attempt, step) before each step, and a *member* job's supervisor
(``grow``, array tasks: ``HPC_ELASTIC_RUN_ID`` is set) starts its agents in it. A member never
relaunches: its nodes are extra, and the run goes on without them. Whenever the lead leaves its
rendezvous behind -- it ends, is cancelled, is preempted and requeued, or relaunches after a node
loss -- it cancels the member jobs, so that members never train on in the old rendezvous side by
side with the lead. Only after a success are running members left alone: they finish with it.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import FrameType

from hpc_elastic.identity import RUN_ATTEMPT_ENV, RUN_ID_ENV, STEP_ENV
from hpc_elastic.jobdir import JobDir
from hpc_elastic.members import LEAD, publish_run_pointer, read_members, read_run_pointer
from hpc_elastic.slurm import SlurmError, cancel, run_slurm
from hpc_elastic.submit import read_job_config
from hpc_elastic.telemetry import read_jsonl

#: Node states (sinfo ``%t``, without the ``*``/``~``/... suffixes) a new step can run on.
USABLE_STATES = frozenset({"alloc", "mix", "idle", "comp", "plnd"})
OUTCOMES = frozenset({"agent.succeeded", "agent.failed", "agent.preempted"})


def _slurm(*args: str) -> str:
    """Run a Slurm client; its stdout ('' when it fails: the caller then sees no usable node)."""
    try:
        return run_slurm(args)
    except SlurmError:
        return ""


def hostnames(nodelist: str) -> list[str]:
    """``n[1-3]`` -> ``["n1", "n2", "n3"]`` (Slurm's own expansion)."""
    return _slurm("scontrol", "show", "hostnames", nodelist).split() if nodelist else []


def job_nodes(job_id: str, fallback: Sequence[str]) -> list[str]:
    """The job's nodes now: with ``--no-kill`` Slurm removes a failed node from the job's
    NodeList, while ``SLURM_JOB_NODELIST`` keeps the nodes the job started with."""
    for field in _slurm("scontrol", "show", "job", job_id, "--oneliner").split():
        if field.startswith("NodeList="):
            nodes = hostnames(field.split("=", 1)[1])
            if nodes:
                return nodes
    return list(fallback)


def usable(nodes: Sequence[str]) -> list[str]:
    """The nodes of ``nodes`` that respond and are not down, drained or failing."""
    if not nodes:
        return []
    states: dict[str, str] = {}
    for line in _slurm("sinfo", "--noheader", "--Node", "--nodes", ",".join(nodes),
                       "--format", "%N %t").splitlines():
        name, _, state = line.partition(" ")
        states[name] = state.strip()
    return [n for n in nodes if states.get(n, "") in USABLE_STATES]


def outcome_logged(jobdir: JobDir, attempt: int, since: float) -> str | None:
    """The outcome an agent of this step logged (``agent.succeeded`` wins), or None."""
    found: set[str] = set()
    for node in jobdir.node_names():
        path = jobdir.events(node)
        if not path.exists():
            continue
        for event in read_jsonl(path):
            if (event.get("kind") in OUTCOMES and event.get("attempt") == attempt
                    and float(event.get("time", 0)) >= since):
                found.add(event["kind"])
    for kind in ("agent.succeeded", "agent.failed", "agent.preempted"):
        if kind in found:
            return kind
    return None


def srun_command(jobdir: JobDir, python: str, step: int, nodes: Sequence[str] | None) -> list[str]:
    """The srun of one step: one agent per node. Step 0 runs on the whole allocation and writes
    ``slurm/%j_<node index>_log.out``; later steps name their nodes and their logs."""
    logs = jobdir.slurm_logs
    stem = "%j_%t" if step == 0 else f"%j_s{step}_%t"
    command = ["srun", "--unbuffered", "--output", str(logs / f"{stem}_log.out"),
               "--error", str(logs / f"{stem}_log.err"), "--kill-on-bad-exit=0"]
    if nodes is not None:
        command += [f"--nodes={len(nodes)}", f"--ntasks={len(nodes)}", "--ntasks-per-node=1",
                    f"--nodelist={','.join(nodes)}"]
    return [*command, python, "-m", "hpc_elastic", "agent", str(jobdir.path)]


class _Stop:
    """SIGTERM/SIGINT to the batch step (scancel, the end of a requeue): pass it to srun and
    start nothing new.

    The preemption signal: a lead's goes to its agents (it is sent to the steps, not to the batch
    shell), so should it reach us it is ignored, never fatal. A member job's goes to the batch
    shell only (``--signal=B:...``, see sbatch.py) and means "leave the run": we have Slurm send
    SIGTERM to the step's processes, as ``scancel`` would, so that the agents depart and stop
    their workers. (Not SIGTERM to srun: srun then cancels the step at once, and the agents die
    before they can depart.) Were the preemption signal sent to the member's workers instead,
    the example's preemption contract would have *every* rank of the run checkpoint and exit 0,
    and the lead would take that for the end of training."""

    def __init__(self, preempt_signal: str, leave_on_preempt: bool = False,
                 job_id: str = "") -> None:
        self.signum: int | None = None
        self.left = False  # a member left at the preemption signal
        self.job_id = job_id
        self.child: subprocess.Popen[bytes] | None = None
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._stop)
        sig = getattr(signal, f"SIG{preempt_signal.upper().removeprefix('SIG')}", None)
        if sig is not None and sig not in (signal.SIGTERM, signal.SIGINT):
            # A handler, not SIG_IGN: SIG_IGN would be inherited by srun through exec.
            signal.signal(sig, self._leave if leave_on_preempt else lambda _s, _f: None)

    def _leave(self, _signum: int, _frame: FrameType | None) -> None:
        if self.left:
            return
        self.left = True
        # Not waited for here (a signal handler); srun's end is what the main loop waits for.
        subprocess.Popen(["scancel", "--signal=TERM", self.job_id], stdin=subprocess.DEVNULL)

    def _stop(self, signum: int, _frame: FrameType | None) -> None:
        self.signum = signum
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signum)


def run_batch(target: str | Path, env: Mapping[str, str] | None = None) -> int:
    """Supervise the agents' steps to the end of the job; return the batch step's exit code."""
    env = dict(os.environ if env is None else env)
    jobdir = JobDir(Path(target).resolve())
    if env.get(RUN_ID_ENV):
        return _run_member(jobdir, env)
    config = read_job_config(jobdir)
    job_id = env.get("SLURM_JOB_ID", "")
    attempt = int(env.get("SLURM_RESTART_COUNT", "0"))
    allocated = hostnames(env.get("SLURM_JOB_NODELIST", ""))
    stop = _Stop(config.preemption.signal)
    python = sys.executable

    step, nodes = 0, None  # step 0: the whole allocation, as srun would by default
    while True:
        publish_run_pointer(jobdir, job_id, attempt, step)
        rc, outcome = _run_step(jobdir, python, step, nodes, env, stop, attempt)
        if outcome == "agent.succeeded":
            _cancel_members(jobdir, job_id, pending_only=True)
            return 0
        _cancel_members(jobdir, job_id)
        ran_on = list(nodes) if nodes is not None else allocated
        if rc == 0 or outcome is not None or stop.signum is not None:
            return rc if stop.signum is None else 128 + stop.signum
        if (jobdir.path / "requeue" / f"attempt-{attempt}").exists():
            return rc  # preempted: Slurm requeues the job; the next attempt starts over
        left = usable(job_nodes(job_id, allocated))
        lost = [n for n in ran_on if n not in left]
        if not lost or len(left) < config.min_nodes:
            print(f"hpc_elastic batch: not relaunching (lost {lost or 'no node'}, "
                  f"{len(left)} usable, min {config.min_nodes})", flush=True)
            return rc
        step += 1
        nodes = left[:config.max_nodes]
        print(f"hpc_elastic batch: lost {','.join(lost)}; relaunching on "
              f"{','.join(nodes)} as step {step}", flush=True)


def _run_step(jobdir: JobDir, python: str, step: int, nodes: Sequence[str] | None,
              env: Mapping[str, str], stop: _Stop, attempt: int,
              ) -> tuple[int, str | None]:
    """One srun of agents, to its end: srun's exit code and the outcome an agent logged."""
    command = srun_command(jobdir, python, step, nodes)
    print(f"hpc_elastic batch: step {step}: {shlex.join(command)}", flush=True)
    launched = time.time() - 1.0  # event times come from other nodes' clocks
    stop.child = subprocess.Popen(command, env={**env, STEP_ENV: str(step)})
    rc = stop.child.wait()
    outcome = outcome_logged(jobdir, attempt, launched)
    print(f"hpc_elastic batch: step {step} ended: srun rc {rc}, outcome {outcome}", flush=True)
    return rc, outcome


def _run_member(jobdir: JobDir, env: dict[str, str]) -> int:
    """The batch step of a member job: its agents join the run's current rendezvous once.

    No relaunch after a lost node: the run goes on without this job's nodes, as it would after
    the job ended."""
    config = read_job_config(jobdir)
    pointer = read_run_pointer(jobdir, env[RUN_ID_ENV])
    print(f"hpc_elastic batch: member of run {pointer.run_id}, joining attempt "
          f"{pointer.attempt} step {pointer.step}", flush=True)
    env = {**env, RUN_ATTEMPT_ENV: str(pointer.attempt)}
    stop = _Stop(config.preemption.signal, leave_on_preempt=True,
                 job_id=env.get("SLURM_JOB_ID", ""))
    rc, outcome = _run_step(jobdir, sys.executable, pointer.step, None, env, stop,
                            pointer.attempt)
    if outcome == "agent.succeeded" or stop.left:
        return 0  # done, or left the run when told to
    return rc if stop.signum is None else 128 + stop.signum


def _cancel_members(jobdir: JobDir, own_job_id: str, pending_only: bool = False) -> None:
    """The lead leaves its rendezvous: end the member jobs too (see the module docstring);
    after a success only those that never started, which would find the run over."""
    others = [m.job_id for m in read_members(jobdir) if m.kind != LEAD and m.job_id != own_job_id]
    if not others:
        return
    print(f"hpc_elastic batch: the lead leaves rendezvous; cancelling member job(s) "
          f"{', '.join(others)}{' that are still pending' if pending_only else ''}", flush=True)
    try:
        cancel(*others, pending_only=pending_only)
    except SlurmError as exc:  # gone already, or Slurm busy: the lead's own end goes on
        print(f"hpc_elastic batch: {exc}", flush=True)
