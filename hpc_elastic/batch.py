"""The batch step of a Slurm job: one ``srun`` step per node, each running that node's agent,
started and watched here.

Why one step per node, not one ``srun`` over the allocation: when Slurm marks a node DOWN it
kills every step that runs on it -- on *all* of that step's nodes (measured on Slurm 22.05 with
``--no-kill``: srun rc 137 on the survivors, "Node failure on n2"). With one step spanning the
job, a lost node cost two restarts: the survivors re-formed without it (their rendezvous saw its
heartbeat stop), and then Slurm killed them too, up to ``SlurmdTimeout`` (300 s by default)
later. With ``srun --nodes=1 --ntasks=1 --nodelist=<node>`` per node, only the lost node's step
ends; the survivors' agents re-form once, on their own, and never wait for Slurm to notice.

When a node's step ends:

* its agent logged an outcome (``agent.succeeded`` / ``agent.failed`` / ``agent.preempted``),
  or another agent of this attempt did, or the job is being stopped (scancel, requeue): nothing
  is started again. After a success, steps still running get :data:`FINISH_GRACE_S` to end by
  themselves (a lost node's step ends only when Slurm notices the loss), then they are ended;
* otherwise the node's agent vanished. If Slurm still counts the node as up and the node was
  not relaunched before, its step is started again (``HPC_ELASTIC_LAUNCH`` one higher): the new
  agent joins the running rendezvous like a ``grow`` node. A node that is down, or whose step
  vanished twice, is *excluded* (hpc_elastic/excluded.py): never used again by the run, and
  left out of the requeued attempt's allocation;
* if no step is left running and nothing logged an outcome, every usable node is started again
  in a new rendezvous *generation* (``HPC_ELASTIC_STEP``; the agents put it into their
  rendezvous run id, because the dead generation's rendezvous was abandoned mid-round).

Elastic jobs ask for ``--nodes=MIN-MAX`` without ``--ntasks-per-node`` (see sbatch.py), so
Slurm gives them up to ``max`` free nodes; the supervisor learns which from
``SLURM_JOB_NODELIST`` and starts an agent on each, except excluded ones.

Everything the supervisor does is also written to ``batch/<job>.attempt-<a>.jsonl`` (one
writer: this process), which ``logs summary`` counts (step relaunches, excluded nodes).

Runs that span several jobs (docs/elastic-across-jobs.md): the *lead* job's supervisor publishes
the run's current rendezvous (attempt, generation) before it starts agents, and a *member*
job's supervisor (``grow``, array tasks: ``HPC_ELASTIC_RUN_ID`` is set) starts its agents in
it. A member never relaunches: its nodes are extra, and the run goes on without them. Whenever
the lead leaves its rendezvous behind -- it ends, is cancelled, is preempted and requeued, or
starts a new generation -- it cancels the member jobs, so that members never train on in the old
rendezvous side by side with the lead. Only after a success are running members left alone:
they finish with it.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from hpc_elastic.batch_heartbeat import SupervisorHeartbeat
from hpc_elastic.config import JobConfig
from hpc_elastic.excluded import exclude_lost_nodes, exclude_node, excluded_names
from hpc_elastic.identity import LAUNCH_ENV, LAUNCHED_ENV, RUN_ATTEMPT_ENV, RUN_ID_ENV, STEP_ENV
from hpc_elastic.jobdir import JobDir, file_mode_in, make_dir
from hpc_elastic.members import LEAD, publish_run_pointer, read_members, read_run_pointer
from hpc_elastic.slurm import SlurmError, cancel, exclude_nodes, requeue, run_slurm
from hpc_elastic.submit import read_job_config
from hpc_elastic.telemetry import read_jsonl
from hpc_elastic.telemetry.jsonl import JsonlWriter

#: Node states (sinfo ``%t``, without the ``*``/``~``/... suffixes) a new step can run on.
USABLE_STATES = frozenset({"alloc", "mix", "idle", "comp", "plnd"})
#: How one node's agent can end on purpose: an outcome of the run, or stopped from outside
#: (scancel: ``shutdown``; a member leaving: ``agent.left``). Any other end is a vanished agent.
NODE_ENDS = ("agent.succeeded", "agent.failed", "agent.preempted", "shutdown", "agent.left")
#: How often the supervisor looks at its steps.
POLL_S = 0.5
#: After training succeeded: how long steps still running may take to end by themselves (a lost
#: node's step ends only when Slurm marks the node down) before the supervisor ends them.
FINISH_GRACE_S = 10.0
#: After SIGTERM to a step's srun (it cancels the step): how long before SIGKILL.
KILL_AFTER_S = 5.0
#: Relaunches of one node's step whose agent vanished while the node stayed up; the next such
#: end excludes the node.
RELAUNCHES_PER_NODE = 1


def _slurm(*args: str) -> str:
    """Run a Slurm client; its stdout ('' when it fails: the caller then sees no usable node)."""
    try:
        return run_slurm(args)
    except SlurmError:
        return ""


def hostnames(nodelist: str) -> list[str]:
    """``n[1-3]`` -> ``["n1", "n2", "n3"]`` (Slurm's own expansion)."""
    return _slurm("scontrol", "show", "hostnames", nodelist).split() if nodelist else []


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


def outcome_logged(jobdir: JobDir, attempt: int, since: float,
                   nodes: Sequence[str] | None = None,
                   kinds: Sequence[str] = ("agent.succeeded", "agent.failed", "agent.preempted"),
                   ) -> str | None:
    """The first of ``kinds`` (in that order of precedence) that an agent of ``nodes`` (default:
    any node) logged in ``attempt`` since ``since``, or None."""
    found: set[str] = set()
    for node in jobdir.node_names() if nodes is None else nodes:
        path = jobdir.events(node)
        if not path.exists():
            continue
        for event in read_jsonl(path):
            if (event.get("kind") in kinds and event.get("attempt") == attempt
                    and float(event.get("time", 0)) >= since):
                found.add(event["kind"])
    return next((kind for kind in kinds if kind in found), None)


def srun_command(jobdir: JobDir, python: str, node: str, generation: int = 0,
                 launch: int = 0) -> list[str]:
    """The srun of one node's agent: a step of its own on exactly that node. Its output goes to
    ``slurm/<job>_<node>[_s<generation>][_r<launch>]_log.out``."""
    logs = jobdir.slurm_logs
    stem = f"%j_{node}" + (f"_s{generation}" if generation else "") + (
        f"_r{launch}" if launch else "")
    return ["srun", "--unbuffered", "--nodes=1", "--ntasks=1", f"--nodelist={node}",
            "--kill-on-bad-exit=0", "--output", str(logs / f"{stem}_log.out"),
            "--error", str(logs / f"{stem}_log.err"),
            python, "-u", "-m", "hpc_elastic", "agent", str(jobdir.path)]


class _Stop:
    """SIGTERM/SIGINT to the batch step (scancel, the end of a requeue): pass it to every srun
    and start nothing new.

    The preemption signal: a lead's goes to its agents (it is sent to the steps, not to the batch
    shell), so should it reach us it is ignored, never fatal. A member job's goes to the batch
    shell only (``--signal=B:...``, see sbatch.py) and means "leave the run": we have Slurm send
    SIGTERM to the steps' processes, as ``scancel`` would, so that the agents depart and stop
    their workers. (Not SIGTERM to srun: srun then cancels the step at once, and the agents die
    before they can depart.) Were the preemption signal sent to the member's workers instead,
    the example's preemption contract would have *every* rank of the run checkpoint and exit 0,
    and the lead would take that for the end of training."""

    def __init__(self, preempt_signal: str, leave_on_preempt: bool = False,
                 job_id: str = "") -> None:
        self.signum: int | None = None
        self.left = False  # a member left at the preemption signal
        self.job_id = job_id
        self.children: list[subprocess.Popen[bytes]] = []
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
        # Not waited for here (a signal handler); the steps' end is what the main loop waits for.
        subprocess.Popen(["scancel", "--signal=TERM", self.job_id], stdin=subprocess.DEVNULL)

    def _stop(self, signum: int, _frame: FrameType | None) -> None:
        self.signum = signum
        for child in self.children:
            if child.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    child.send_signal(signum)


class BatchLog:
    """``batch/<job>.attempt-<a>.jsonl``: what the supervisor did, for ``logs summary``; and the
    same as one line in the batch step's output for a person reading ``slurm/<job>_batch.out``."""

    def __init__(self, jobdir: JobDir, job_id: str, attempt: int) -> None:
        self.job_id = job_id
        self.attempt = attempt
        self.writer: JsonlWriter | None = None
        with contextlib.suppress(OSError, ValueError):
            make_dir(jobdir.supervisor)
            self.writer = JsonlWriter(jobdir.supervisor_events(job_id or "local", attempt))

    def record(self, kind: str, message: str, **fields: Any) -> None:
        print(f"hpc_elastic batch: {message}", flush=True)
        if self.writer is not None:
            self.writer.write({"v": 1, "time": time.time(), "job_id": self.job_id,
                               "attempt": self.attempt, "source": "batch", "kind": kind,
                               **fields})

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


@dataclass
class Step:
    """One node's agent step."""

    node: str
    generation: int
    launch: int
    proc: subprocess.Popen[bytes]
    #: When it was started, less a second: event times come from other nodes' clocks.
    since: float


@dataclass
class Supervisor:
    """Starts and watches the agents' steps of one job attempt (see the module docstring)."""

    jobdir: JobDir
    config: JobConfig
    env: Mapping[str, str]
    stop: _Stop
    log: BatchLog
    attempt: int
    member: bool = False
    python: str = sys.executable
    generation: int = 0
    steps: list[Step] = field(default_factory=list)
    launches: dict[str, int] = field(default_factory=dict)  # node -> relaunches, this generation
    nodes: list[str] = field(default_factory=list)  # the nodes this generation runs on
    outcome: str | None = None  # the attempt's outcome, once an agent logged one
    last_rc: int = 0
    started: float = 0.0

    @property
    def job_id(self) -> str:
        return self.env.get("SLURM_JOB_ID", "")

    def launch(self, node: str, launch: int = 0) -> None:
        command = srun_command(self.jobdir, self.python, node, self.generation, launch)
        env = {**self.env, STEP_ENV: str(self.generation), LAUNCH_ENV: str(launch),
               LAUNCHED_ENV: str(len(self.nodes))}
        since = time.time() - 1.0
        proc = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL)
        self.stop.children.append(proc)
        self.steps.append(Step(node, self.generation, launch, proc, since))
        self.log.record("step.started", f"step on {node} (generation {self.generation}, launch "
                        f"{launch}): {shlex.join(command)}", node=node,
                        generation=self.generation, launch=launch, pid=proc.pid)

    def start(self, nodes: Sequence[str]) -> None:
        """Start one agent step on each of ``nodes``, in the current generation."""
        self.nodes = list(nodes)
        self.launches = {}
        if not self.member:
            publish_run_pointer(self.jobdir, self.job_id, self.attempt, self.generation)
        for node in nodes:
            self.launch(node)

    def run(self, nodes: Sequence[str]) -> int:
        """Run the attempt to its end; return the batch step's exit code."""
        self.started = time.time() - 1.0
        self.start(nodes)
        finished_at: float | None = None
        while self.steps:
            self._sleep()
            ended = [s for s in self.steps if s.proc.poll() is not None]
            self.steps = [s for s in self.steps if s not in ended]
            for step in ended:
                self._ended(step)
            if self.steps and self.outcome == "agent.succeeded":
                finished_at = finished_at or time.monotonic()
                if time.monotonic() - finished_at > FINISH_GRACE_S:
                    self._end_leftovers()
            if not self.steps and self._may_go_on():
                self.exclude_lost()
                left = usable([n for n in self.nodes if n not in excluded_names(self.jobdir)])
                if not self._new_generation(left):
                    break
        return self._exit_code()

    def _sleep(self) -> None:
        """Wait for a step to end, or :data:`POLL_S` (signals interrupt the wait too)."""
        with contextlib.suppress(ChildProcessError, InterruptedError):
            deadline = time.monotonic() + POLL_S
            while time.monotonic() < deadline:
                if any(s.proc.poll() is not None for s in self.steps):
                    return
                time.sleep(0.05)

    def _ended(self, step: Step) -> None:
        rc = step.proc.returncode
        rc = 128 - rc if rc < 0 else rc
        if rc:
            self.last_rc = rc
        own = outcome_logged(self.jobdir, self.attempt, step.since, [step.node], NODE_ENDS)
        self.log.record("step.ended", f"step on {step.node} ended: srun rc {rc}, outcome {own}",
                        node=step.node, generation=step.generation, launch=step.launch, rc=rc,
                        outcome=own, ran_s=round(time.time() - step.since - 1.0, 3))
        if own in ("agent.succeeded", "agent.failed") and self.outcome != "agent.succeeded":
            self.outcome = own
        if own is not None or not self._may_go_on():
            return
        # The node's agent vanished.
        if self.member:
            self.log.record("step.not_relaunched", f"{step.node}: a member job's node is not "
                            "relaunched; the run goes on without it", node=step.node)
            return
        up = bool(usable([step.node]))
        relaunched = self.launches.get(step.node, 0)
        if not up or relaunched >= RELAUNCHES_PER_NODE:
            self.exclude(step.node, "Slurm no longer counts it usable (down, drained or not "
                         "responding)" if not up else
                         f"its agent vanished {relaunched + 1} times while the node was up")
        elif self.steps:
            # Up, and the others still train: it rejoins their rendezvous, like a grow node.
            self.launches[step.node] = relaunched + 1
            self.log.record("step.relaunched", f"{step.node} is up but its agent ended without "
                            "an outcome; starting its step again", node=step.node,
                            generation=self.generation, launch=step.launch + 1)
            self.launch(step.node, step.launch + 1)
        # else: no agent is left; run() starts a new generation on every usable node.

    def exclude_lost(self) -> None:
        """Before every node is started again: exclude the nodes the analysis finds lost in
        this attempt (hpc_elastic/excluded.py), which Slurm may still count as up."""
        _exclude_lost(self.jobdir, self.job_id, self.attempt, self.log)

    def exclude(self, node: str, reason: str) -> None:
        new = exclude_node(self.jobdir, node, reason, self.job_id, self.attempt)
        self.log.record("node.excluded", f"{node} excluded from this run: {reason}",
                        node=node, reason=reason, new=new)
        if not self.member:
            self._requeue_if_too_few()

    def _requeue_if_too_few(self) -> None:
        """Fewer agents run than ``min_nodes``, and this allocation cannot give more (its other
        nodes are excluded or gone): the survivors would wait ``join_timeout`` and fail. Requeue
        the job instead, as a preemption would (one claim per attempt, shared with the agents):
        the next attempt resumes from the checkpoint on other nodes. Not when member jobs take
        part: their nodes may keep the run at size, and only the lead can tell."""
        if len(self.steps) >= self.config.min_nodes or not self.config.preemption.requeue:
            return
        if any(m.kind != LEAD for m in read_members(self.jobdir)):
            return
        claim = self.jobdir.path / "requeue" / f"attempt-{self.attempt}"
        make_dir(claim.parent)
        try:
            os.close(os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW,
                             file_mode_in(claim.parent)))
        except FileExistsError:
            return  # an agent asked for a requeue already
        self.log.record("batch.requeue", f"only {len(self.steps)} agent(s) left, min "
                        f"{self.config.min_nodes}: requeueing the job", alive=len(self.steps))
        try:
            requeue(self.job_id)
        except SlurmError as exc:
            self.log.record("batch.requeue_failed", f"requeue failed: {exc}", error=str(exc))

    def _may_go_on(self) -> bool:
        """Whether a vanished agent may be replaced: nothing logged an outcome, nobody stops the
        job, and no node asked Slurm for a requeue."""
        if self.outcome is not None or self.stop.signum is not None or self.stop.left:
            return False
        if (self.jobdir.path / "requeue" / f"attempt-{self.attempt}").exists():
            return False
        self.outcome = outcome_logged(self.jobdir, self.attempt, self.started)
        return self.outcome is None

    def _new_generation(self, left: list[str]) -> bool:
        """Every agent of the generation is gone without an outcome: start all usable nodes
        again in a fresh rendezvous (a member never does: the run goes on without it)."""
        if (self.member or len(left) < self.config.min_nodes
                or self.generation >= self.config.max_restarts):
            self.log.record("batch.not_relaunching", f"not relaunching: {len(left)} usable "
                            f"node(s), min {self.config.min_nodes}, generation "
                            f"{self.generation} of at most {self.config.max_restarts}",
                            usable=left)
            return False
        _cancel_members(self.jobdir, self.job_id)
        self.generation += 1
        self.log.record("generation.started", f"every agent ended without an outcome; "
                        f"starting generation {self.generation} on {','.join(left)}",
                        generation=self.generation, nodes=left)
        self.start(left[:self.config.max_nodes + self.config.spares])
        return True

    def _end_leftovers(self) -> None:
        """Training succeeded: steps still running (a lost node's, until Slurm notices the
        loss) are ended, SIGTERM to their srun (it cancels the step) and SIGKILL later."""
        for step in self.steps:
            self.log.record("step.ended_after_success", f"training succeeded; ending the step "
                            f"on {step.node}", node=step.node)
            with contextlib.suppress(ProcessLookupError):
                step.proc.terminate()
        deadline = time.monotonic() + KILL_AFTER_S
        for step in self.steps:
            try:
                step.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                step.proc.kill()
                step.proc.wait()
        self.steps.clear()

    def _exit_code(self) -> int:
        if self.outcome == "agent.succeeded" or self.stop.left:
            return 0
        if self.stop.signum is not None:
            return 128 + self.stop.signum
        if self.outcome == "agent.failed":
            return self.last_rc or 1
        return self.last_rc


def run_batch(target: str | Path, env: Mapping[str, str] | None = None) -> int:
    """Supervise the agents' steps to the end of the job; return the batch step's exit code."""
    env = dict(os.environ if env is None else env)
    jobdir = JobDir(Path(target).resolve())
    if env.get(RUN_ID_ENV):
        return _run_member(jobdir, env)
    config = read_job_config(jobdir)
    job_id = env.get("SLURM_JOB_ID", "")
    attempt = int(env.get("SLURM_RESTART_COUNT", "0"))
    log = BatchLog(jobdir, job_id, attempt)
    allocated = hostnames(env.get("SLURM_JOB_NODELIST", ""))
    if attempt > 0:
        _exclude_dead_batch_host(jobdir, job_id, attempt - 1, log)
        _exclude_lost(jobdir, job_id, attempt - 1, log)
    excluded = set(excluded_names(jobdir))
    nodes = [n for n in allocated if n not in excluded]
    # max_nodes train; up to ``spares`` more agents stand by in the rendezvous (it completes a
    # round at max_nodes and keeps later joiners waiting until a member is lost).
    wanted = config.max_nodes + config.spares
    log.record("batch.start", f"job {job_id} attempt {attempt}: allocated "
               f"{','.join(allocated) or '-'}"
               + (f"; skipping excluded {','.join(sorted(excluded & set(allocated)))}"
                  if excluded & set(allocated) else ""),
               allocated=allocated, excluded=sorted(excluded), nodes=nodes[:wanted],
               host=env.get("SLURMD_NODENAME") or socket.gethostname())
    stop = _Stop(config.preemption.signal)
    heartbeat = None
    try:
        if job_id:
            # The agents watch it: when it stops, the batch host is lost, and they requeue the
            # job (hpc_elastic/batch_heartbeat.py).
            try:
                heartbeat = SupervisorHeartbeat(jobdir, job_id, attempt,
                                                config.rendezvous.heartbeat_interval)
            except OSError as exc:
                log.record("batch.heartbeat_failed", f"no supervisor heartbeat: {exc}; the "
                           "agents will not notice the loss of this node", error=str(exc))
        if len(nodes) < config.min_nodes:
            log.record("batch.not_started", f"only {len(nodes)} usable node(s), "
                       f"min {config.min_nodes}", nodes=nodes)
            return 1
        supervisor = Supervisor(jobdir, config, env, stop, log, attempt)
        rc = supervisor.run(nodes[:wanted])
        if supervisor.outcome == "agent.succeeded":
            _cancel_members(jobdir, job_id, pending_only=True)
        else:
            _cancel_members(jobdir, job_id)
        if (jobdir.path / "requeue" / f"attempt-{attempt}").exists():
            # What is known first (Slurm ends the batch step KillWait after the requeue), then
            # what the analysis adds, which reads every node's events.
            _exclude_from_next_attempt(jobdir, job_id, log)
            if _exclude_lost(jobdir, job_id, attempt, log):
                _exclude_from_next_attempt(jobdir, job_id, log)
        log.record("batch.end", f"ending with {rc} (outcome {supervisor.outcome})", rc=rc,
                   outcome=supervisor.outcome, generation=supervisor.generation)
        return rc
    finally:
        if heartbeat is not None:
            heartbeat.stop()
        log.close()


def _exclude_lost(jobdir: JobDir, job_id: str, attempt: int, log: BatchLog) -> bool:
    """Exclude the nodes the analysis finds lost in ``attempt`` (see exclude_lost_nodes); an
    analysis that fails (damaged files) must not stop the supervisor, so it is only logged.
    Whether it excluded a node."""
    try:
        found = exclude_lost_nodes(jobdir, job_id, attempt)
    except Exception as exc:  # noqa: BLE001 - the relaunch or requeue goes on without it
        log.record("node.exclude_failed", f"could not analyse attempt {attempt} for lost "
                   f"nodes: {exc!r}", error=repr(exc))
        return False
    for node, reason in found:
        log.record("node.excluded", f"{node} excluded from this run: {reason}", node=node,
                   reason=reason, new=True)
    return bool(found)


def _exclude_from_next_attempt(jobdir: JobDir, job_id: str, log: BatchLog) -> None:
    """The job was requeued (it pends now): ask Slurm not to give the next attempt the run's
    excluded nodes. Should Slurm refuse, the next attempt's supervisor still skips them."""
    failed = excluded_names(jobdir)
    if not failed or not job_id:
        return
    try:
        now = exclude_nodes(job_id, failed)
        log.record("requeue.excluded", f"the requeued job will not get {','.join(failed)} "
                   f"(ExcNodeList={','.join(now)})", nodes=failed)
    except SlurmError as exc:
        log.record("requeue.exclude_failed", f"could not set ExcNodeList: {exc}; the next "
                   "attempt skips the excluded nodes itself", nodes=failed, error=str(exc))


def _exclude_dead_batch_host(jobdir: JobDir, job_id: str, previous: int, log: BatchLog) -> None:
    """The previous attempt's supervisor left no ``batch.end``: it died, and with it most likely
    its node (Slurm requeues a job whose batch host fails). If Slurm no longer counts that node
    usable, it is excluded like any lost node."""
    path = jobdir.supervisor_events(job_id, previous)
    if not path.exists():
        return
    records = list(read_jsonl(path))
    starts = [r for r in records if r.get("kind") == "batch.start"]
    if not starts or any(r.get("kind") == "batch.end" for r in records):
        return
    host = starts[-1].get("host")
    if isinstance(host, str) and host and not usable([host]):
        reason = f"the batch host of attempt {previous} died with its supervisor"
        try:
            new = exclude_node(jobdir, host, reason, job_id, previous)
        except (OSError, ValueError) as exc:  # a name that cannot be a file name, a full disk
            log.record("node.exclude_failed", f"cannot exclude {host!r}: {exc}", node=host)
            return
        log.record("node.excluded", f"{host} excluded from this run: {reason}", node=host,
                   reason=reason, new=new)


def _run_member(jobdir: JobDir, env: dict[str, str]) -> int:
    """The batch step of a member job: its agents join the run's current rendezvous, one step
    per node of the member's allocation, never relaunched."""
    config = read_job_config(jobdir)
    pointer = read_run_pointer(jobdir, env[RUN_ID_ENV])
    job_id = env.get("SLURM_JOB_ID", "")
    log = BatchLog(jobdir, job_id, int(env.get("SLURM_RESTART_COUNT", "0")))
    log.record("batch.start", f"member of run {pointer.run_id}, joining attempt "
               f"{pointer.attempt} generation {pointer.step}", run_id=pointer.run_id,
               run_attempt=pointer.attempt, generation=pointer.step)
    env = {**env, RUN_ATTEMPT_ENV: str(pointer.attempt)}
    stop = _Stop(config.preemption.signal, leave_on_preempt=True, job_id=job_id)
    nodes = hostnames(env.get("SLURM_JOB_NODELIST", ""))
    try:
        supervisor = Supervisor(jobdir, config, env, stop, log, pointer.attempt, member=True,
                                generation=pointer.step)
        rc = supervisor.run(nodes)
        log.record("batch.end", f"ending with {rc} (outcome {supervisor.outcome})", rc=rc,
                   outcome=supervisor.outcome)
        return rc
    finally:
        log.close()


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
