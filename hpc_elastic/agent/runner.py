"""Build and run one node's torch ``LocalElasticAgent`` for a job directory.

The agent reads everything from the job directory (the resolved ``job.yaml``) and from its
identity (Slurm variables, or local mode's equivalents), so ``srun`` needs to pass nothing but
the directory. Workers get the standard torchrun environment from torch's agent, so any torchrun
script runs unchanged, plus ``HPC_ELASTIC_*`` extras (checkpoint dir, preemption signal, attempt).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch.distributed.elastic.agent.server.api import (
    RunResult,
    WorkerGroup,
    WorkerSpec,
    WorkerState,
)
from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent
from torch.distributed.elastic.multiprocessing import SignalException
from torch.distributed.elastic.rendezvous.api import RendezvousClosedError

from hpc_elastic.agent import console, stop_signals
from hpc_elastic.agent.ending import Ending
from hpc_elastic.agent.error_files import quiet_torch_parser, set_aside_unreadable
from hpc_elastic.agent.hang import HangWatch
from hpc_elastic.agent.preemption import EXIT_REQUEUED, Preemption
from hpc_elastic.agent.standby import StandbyPool, fork_from_agent
from hpc_elastic.agent.start import Prepared
from hpc_elastic.agent.storm import StormGuard, failure_signature, hang_signature
from hpc_elastic.agent.straggler import StragglerWatch
from hpc_elastic.agent.worker_logs import JobDirLogsSpecs
from hpc_elastic.batch_heartbeat import SupervisorWatch, batch_host
from hpc_elastic.excluded import exclude_node, read_excluded, requeue_without_excluded
from hpc_elastic.identity import NodeIdentity
from hpc_elastic.jobdir import JobDir
from hpc_elastic.rendezvous import create_handler
from hpc_elastic.telemetry import install as install_telemetry
from hpc_elastic.worker.record import PROGRESS_FILE
from hpc_elastic.worker.record import read as read_progress

EXIT_OK = 0
EXIT_FAILED = 1
ROLE = "trainer"


class NodeExcluded(Exception):
    """This node was excluded from the run (a straggler under ``stragglers: exclude``)."""


class ObservedAgent(LocalElasticAgent):
    """torch's LocalElasticAgent, plus a ``worker.failed`` event the moment a failure is seen,
    and the preemption rules.

    torch records worker events only for the final result, so a failure that leads to a
    restart would leave no trace in the logs. ``_monitor_workers`` is the one place every
    failure passes through, restarted or final -- and so also the place where a preempted
    agent stops restarting, and stops its workers when the grace has run out.
    """

    def __init__(self, *args: object, record: Callable[..., None],
                 preemption: Preemption | None = None, hangs: HangWatch | None = None,
                 storm: StormGuard | None = None, stragglers: StragglerWatch | None = None,
                 on_failure: Callable[[dict[int, Any], int, int], None] | None = None,
                 standby: StandbyPool | None = None, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._record = record
        #: local mode: one short console line per failed worker group (agent/console.py)
        self._on_failure = on_failure
        self.preemption = preemption
        self.hangs = hangs
        self.storm = storm
        self.stragglers = stragglers
        #: ``warm_workers``: a standby that has imported torch forks the workers (agent/standby.py)
        self.standby = standby
        quiet_torch_parser()  # _monitor_workers handles (and records) an unreadable error file

    def _start_workers(self, worker_group: WorkerGroup) -> dict[int, Any]:
        """Start workers with the preemption signal ignored until they install a handler (see
        ``Preemption.ignored_while``); workers started after the signal get it forwarded. The
        hang watch starts watching the new group. With ``warm_workers`` the starts go to the
        standby, which forks them (agent/standby.py)."""
        with contextlib.ExitStack() as stack:
            if self.preemption is not None:
                stack.enter_context(self.preemption.ignored_while())
            if self.standby is not None:
                stack.enter_context(self.standby.serving())
            started = super()._start_workers(worker_group)
        stop_signals.reinstall()  # torch set its own SIGTERM/SIGINT handler
        if self.preemption is not None:
            self.preemption.forward_again()
        if self.standby is not None:
            self._record("workers.warm", warm=self.standby.last_warm,
                         cold=self.standby.last_cold,
                         pids=[started.get(r) for r in self.standby.last_warm])
        for worker in worker_group.workers:  # torch sets the ids after this returns
            worker.id = started.get(worker.local_rank, worker.id)
        folders = getattr(self._logs_specs, "folders", {})
        if self.hangs is not None:
            self.hangs.watch(worker_group, folders)
        if self.stragglers is not None:
            self.stragglers.watch(worker_group, folders)
        return started

    def _restart_workers(self, worker_group: WorkerGroup) -> None:
        """A node excluded as a straggler (``stragglers: exclude``) does not rejoin: it leaves
        the run here, at the group's next restart, like a lost node (the others re-form without
        it). torch's ``run`` stops its workers on the way out."""
        stop_signals.raise_if_swallowed()
        if self.stragglers is not None and self.stragglers.excluded is not None:
            raise NodeExcluded(self.stragglers.excluded)
        super()._restart_workers(worker_group)

    def _exit_barrier(self) -> None:
        """No exit barrier. torch's keeps an agent whose workers succeeded waiting (300 s by
        default, deaf to SIGTERM inside the store wait) until every agent's workers succeeded,
        so that an agent hosting the TCP store does not take it away early. Our store is a file
        in the shared directory that no agent hosts, and a peer whose workers *failed* never
        arrives: measured, a 2-node job whose second node failed at the end took 5 min to end
        instead of seconds."""
        return

    def _monitor_workers(self, worker_group: WorkerGroup) -> RunResult:
        stop_signals.raise_if_swallowed()
        try:
            result = super()._monitor_workers(worker_group)
        except (ValueError, KeyError, TypeError):
            # torch's parser of a worker's error file crashed (an empty or cut-off file after
            # the disk filled): set it aside and look again, so the failure counts as a failure
            # and uses a restart instead of ending the agent.
            if not set_aside_unreadable(self._pcontext, self._record):
                raise
            result = super()._monitor_workers(worker_group)
        if (result.state == WorkerState.HEALTHY and self.hangs is not None
                and not self._stopping()):
            hung = self.hangs.check()
            if hung is not None:
                # worker.hung / hang.dumped are recorded; the restart is torch's, as for any
                # failure (the failures name the dump files).
                last = self.hangs.last_hang or {}
                self._guard_storm(hang_signature(last.get("infos", {}), last.get("files", {}),
                                                 self.hangs.jobdir.path))
                return hung
        if result.state == WorkerState.HEALTHY and self.stragglers is not None:
            self.stragglers.check()
        if (result.state == WorkerState.HEALTHY and self.standby is not None
                and not self._stopping() and self.standby.due(self._first_steps_done)):
            self.fill_standby()
        if result.state in (WorkerState.FAILED, WorkerState.UNHEALTHY):
            restart = worker_group.spec.max_restarts - self._remaining_restarts
            for rank, failure in sorted(result.failures.items()):
                self._record(
                    "worker.failed", rank=rank, local_rank=failure.local_rank,
                    exitcode=failure.exitcode, pid=failure.pid, restart_count=restart,
                    message=failure_message(failure.message),
                    error_file=failure.error_file or None, error_time=failure.timestamp,
                    signal=failure.signal_name() if failure.exitcode < 0 else None)
            if not self._stopping() and (
                    self._lost_a_member(worker_group)
                    or (echoes_a_lost_peer(result.failures)
                        and self._member_loss_comes(worker_group))):
                # A peer of this round left (a grow job ended) or was declared dead: the
                # failures are its echo. Reported as healthy, torch's loop sees the membership
                # change (num_nodes_waiting > 0) and re-forms without using up a restart.
                self._record("workers.peer_left", restart_count=restart)
                return RunResult(state=WorkerState.HEALTHY)
            self._guard_storm(failure_signature(result.failures))
            if self._on_failure is not None:
                self._on_failure(result.failures, self._remaining_restarts,
                                 worker_group.spec.max_restarts)
        preemption = self.preemption
        if preemption is not None and preemption.received:
            # The job is going away: a restart would only start from the checkpoint the next
            # attempt starts from anyway, so end the run (torch stops the workers on FAILED
            # with no restarts left).
            self._remaining_restarts = 0
            if result.state == WorkerState.HEALTHY:
                if preemption.grace_expired:
                    return RunResult(state=WorkerState.FAILED)
                # Workers that still ignored the signal when it came (starting up) get it as
                # soon as their handler is installed.
                preemption.forward_again()
        return result


    def fill_standby(self) -> None:
        """Start the standby if it is missing, with the preemption signal ignored as for any
        worker start (it and the workers it forks inherit that)."""
        if self.standby is None:
            return
        if self.preemption is None:
            self.standby.fill()
            return
        with self.preemption.ignored_while():
            self.standby.fill()

    def _first_steps_done(self) -> bool:
        """Every current worker reported its first training step (hpc_elastic.worker.beat)."""
        folders = getattr(self._logs_specs, "folders", {})
        if not folders:
            return False
        for folder in folders.values():
            progress = read_progress(folder / PROGRESS_FILE)
            if progress is None or progress.n <= 0:
                return False
        return True

    def _guard_storm(self, signature: str) -> None:
        """Count the failure; at the limit, take the remaining restarts away (torch then stops
        the workers and ``agent.failed`` follows) and say why."""
        if self.storm is None or not self.storm.observe(signature):
            return
        if self._remaining_restarts > 0:
            self._record("restarts.stopped", repeats=self.storm.count, cause=signature,
                         remaining_restarts=self._remaining_restarts,
                         reason=f"the same failure repeated {self.storm.count} times: "
                                f"{signature}")
            self._remaining_restarts = 0

    @staticmethod
    def _lost_a_member(worker_group: WorkerGroup) -> bool:
        lost = getattr(worker_group.spec.rdzv_handler, "lost_a_member", None)
        return bool(lost is not None and lost())

    @staticmethod
    def _member_loss_comes(worker_group: WorkerGroup) -> bool:
        wait = getattr(worker_group.spec.rdzv_handler, "wait_for_member_loss", None)
        return bool(wait is not None and wait())

    def _stopping(self) -> bool:
        return self.preemption is not None and self.preemption.received


#: What a worker's error says when a peer's connection closed under it (gloo, TCPStore, NCCL),
#: lower case.
PEER_CONNECTION_LOST = ("connection closed by peer", "connection reset by peer", "broken pipe",
                        "remote process exited", "ncclremoteerror")


def echoes_a_lost_peer(failures: dict[int, Any]) -> bool:
    """Whether every failed rank failed because a peer's connection closed: the echo of a
    failure elsewhere, perhaps of a whole node (see ``wait_for_member_loss`` in the rendezvous
    handler). A rank killed by a signal, or with any other error, is a fault of its own."""
    messages = [failure_message(f.message).lower() for f in failures.values()]
    return bool(messages) and all(
        any(lost in message for lost in PEER_CONNECTION_LOST) for message in messages)


def failure_message(message: object) -> str:
    """The root-cause line of a failure: torch gives the error file's dict when there is one
    (``{"message": "RuntimeError: ...", "extraInfo": {...traceback...}}``), else a string."""
    if isinstance(message, dict):
        inner = message.get("message", message)
        return inner if isinstance(inner, str) else str(inner)
    return str(message)


def run_agent(prepared: Prepared, ending: Ending) -> int:
    """Run this node's agent to the end, from where hpc_elastic/agent/start.py left off (the
    job read, torch imported); return the process exit code."""
    try:
        return _run_agent(prepared, ending)
    except SignalException as err:  # stopped while setting up, before torch's agent ran
        return ending.stopped(err)
    except Exception as err:  # noqa: BLE001 - every end gets its final event, then the code
        return ending.crashed(err)


def _run_agent(prepared: Prepared, ending: Ending) -> int:
    ident, config, jobdir = prepared.ident, prepared.config, prepared.jobdir
    # A member job (grow, array task) does not own the run: its end shrinks the run, and only
    # the lead requeues it (hpc_elastic/members.py).
    handles_preemption = config.preemption.requeue and not ident.is_member
    preemption_signum = signal.Signals[f"SIG{config.preemption.signal}"]
    # First, before any thread or file: the standby, forked from here (agent/standby.py).
    standby, not_forked = (fork_from_agent(
        prepared.inherited_fds, preemption_signum if handles_preemption else None)
        if config.warm_workers else (None, None))

    telemetry = install_telemetry(jobdir, ident.node, job_id=ident.job_id, attempt=ident.attempt)
    # Local mode: torch's log lines go to the node's agent.log, the shared terminal gets one
    # short line per failure (agent/console.py). On a cluster stderr is the node's own log.
    local_console = not ident.in_slurm and console.route_torch_logs(
        jobdir.agent_log(ident.node)) is not None
    os.environ.update(telemetry.worker_env())
    events = telemetry.events
    ending.attach(events)
    rdzv = config.rendezvous
    handler = create_handler(
        root=Path(rdzv.directory) if rdzv.directory else jobdir.rendezvous,
        run_id=ident.rendezvous_id,
        attempt=ident.attempt,
        min_nodes=config.min_nodes,
        max_nodes=config.max_nodes,
        local_addr=ident.address,
        join_timeout=rdzv.join_timeout,
        last_call_timeout=rdzv.last_call_timeout,
        close_timeout=rdzv.close_timeout,
        heartbeat_interval=rdzv.heartbeat_interval,
        heartbeat_timeout=rdzv.heartbeat_timeout,
        # A member joins a run it did not start: the count of its own launch says nothing
        # about the run's first round.
        launched_nodes=None if ident.is_member else ident.launched_nodes,
    )
    ending.handler = handler
    # Fenced (cut off from the shared filesystem, or frozen, for heartbeat_timeout): the workers
    # die at once, from the handler's watch thread -- the main thread may be stuck in the
    # filesystem -- so that they never write a checkpoint after the others re-formed.
    handler.on_fenced = lambda: kill_workers(agent)
    spec = WorkerSpec(
        role=ROLE,
        local_world_size=config.nproc_per_node,
        rdzv_handler=handler,
        entrypoint=sys.executable,
        # Through hpc_elastic.worker: it installs the progress reporter the hang watch reads,
        # then runs the script exactly as `python SCRIPT` would (docs/architecture.md).
        args=("-u", "-m", "hpc_elastic.worker", *config.entrypoint.command()),
        max_restarts=config.max_restarts,
        monitor_interval=config.monitor_interval,
        local_addr=ident.address,
    )
    preemption = Preemption(
        signal_name=config.preemption.signal,
        grace=config.preemption.grace,
        claim_path=jobdir.path / "requeue" / f"attempt-{ident.attempt}",
        node=ident.node,
        # Local mode: the launcher relaunches when every agent exits EXIT_REQUEUED; the claim
        # still picks one node, so both modes log exactly one ``requeue`` event.
        requeue=(lambda: _requeue(jobdir, ident, events.record)) if ident.in_slurm
        else (lambda: None),
        record=events.record,
        worker_pids=lambda: worker_pids(agent),
        round_size=lambda: round_size(agent),
        lost_nodes=lambda: len(lost_in_this_attempt(jobdir, ident)),
    )
    hangs = (HangWatch(jobdir, ident.node, config.hang_timeout, events.record,
                       startup_timeout=config.hang_startup_timeout)
             if config.hang_timeout else None)
    agent = ObservedAgent(
        spec, JobDirLogsSpecs(jobdir, ident.node, ident.attempt), start_method="spawn",
        log_line_prefix_template=f"[{ident.node}/rank${{rank}}]: ", record=events.record,
        preemption=preemption if handles_preemption else None, hangs=hangs,
        storm=StormGuard(config.same_failure_limit) if config.same_failure_limit else None,
        stragglers=(StragglerWatch(jobdir, ident.node, events.record, config.stragglers,
                                   job_id=ident.job_id, attempt=ident.attempt)
                    if config.stragglers != "off" else None),
        on_failure=(lambda failures, remaining, most: console.say(console.failure_line(
            ident.node, failures, remaining, most))) if local_console else None,
        standby=(StandbyPool(events.record, forked=standby, not_forked=not_forked)
                 if config.warm_workers else None),
    )
    watch = None
    if handles_preemption:
        preemption.install()
        if ident.in_slurm:
            watch = SupervisorWatch(
                jobdir, ident.job_id, ident.attempt, rdzv.heartbeat_interval,
                rdzv.heartbeat_timeout,
                lambda silent: _batch_host_lost(jobdir, ident, silent, events.record,
                                                preemption.signum))
            watch.start()
    elif ident.is_member:
        stop_signals.also_stop_on(preemption.signum)

    events.record("agent.start", pid=os.getpid(), address=ident.address,
                  nodes=config.nodes, nproc_per_node=config.nproc_per_node,
                  step=ident.step, launch=ident.launch, run_id=ident.run_id or ident.job_id,
                  member=ident.is_member)
    started = time.monotonic()
    # The first group's workers, too, come from the standby started now: it imports torch while
    # this node waits in the rendezvous for the others.
    agent.fill_standby()
    try:
        result = _run_watched(agent, watch)
    except RendezvousClosedError as err:
        if not ident.is_member:
            # Another node ended the run for good (its restarts ran out, or its restart-storm
            # guard stopped them) while this one was about to restart: it cannot go on alone.
            events.record("agent.failed", elapsed_s=round(time.monotonic() - started, 3),
                          failures=[], reason=f"the run was closed by another node: {err}")
            telemetry.close()
            return EXIT_FAILED
        # The run ended (the lead closed its rendezvous) before or while this member took part:
        # nothing left to do here, and nothing failed.
        events.record("agent.left", reason=f"the run has ended: {err}")
        telemetry.close()
        return EXIT_OK
    except NodeExcluded as err:
        # Leave without closing the rendezvous: the other nodes re-form without this one.
        handler.depart()
        events.record("agent.left", reason=f"excluded from the run: {err}", excluded=True)
        telemetry.close()
        return EXIT_OK
    except SignalException as err:
        if preemption.received:
            # After ``scontrol requeue`` Slurm ends the step with SIGTERM: part of the
            # preemption, not a failure (and the rendezvous of this attempt is left as is).
            return _preempted(preemption, events, telemetry, ident, ended_by=err.sigval.name)
        # Stopped from outside (scancel, the end of a grow job): leave the run without closing
        # it, so the other nodes -- of other jobs, too -- re-form at once and go on. A second
        # signal (the launcher and ``cancel`` both send one) must not cut this wrap-up short.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)
        handler.depart()
        events.record("shutdown", signal=err.sigval.name)
        telemetry.close()
        if ident.is_member and err.sigval == preemption.signum:
            return EXIT_OK  # a member leaving at the preemption signal did what it should
        return 128 + int(err.sigval)

    if preemption.received:
        return _preempted(preemption, events, telemetry, ident, ended_by=None)

    handler.shutdown()  # close the rendezvous: the other nodes stop waiting for us
    elapsed = round(time.monotonic() - started, 3)
    if result is None or not result.is_failed():
        events.record("agent.succeeded", elapsed_s=elapsed)
        telemetry.close()
        return EXIT_OK
    events.record("agent.failed", elapsed_s=elapsed, failures=[
        {"rank": rank, "exitcode": f.exitcode, "error_file": f.error_file or None,
         "message": failure_message(f.message)} for rank, f in result.failures.items()])
    telemetry.close()
    return EXIT_FAILED


def _run_watched(agent: LocalElasticAgent, watch: SupervisorWatch | None) -> RunResult | None:
    """``agent.run``; the supervisor watch ends with it (the supervisor's own end, after the
    agents', must not look like a lost batch host), and so does the standby."""
    try:
        return agent.run(ROLE)
    finally:
        if watch is not None:
            watch.stop()
        standby = getattr(agent, "standby", None)
        if standby is not None:
            standby.close()


def _batch_host_lost(jobdir: JobDir, ident: NodeIdentity, silent: float,
                     record: Callable[..., None], signum: int) -> None:
    """The batch supervisor's heartbeat stopped (hpc_elastic/batch_heartbeat.py): nothing else
    will end or requeue this job, so the agents do, as after a preemption signal -- delivered to
    this very process, so that the preemption handler runs in the main thread as usual. The
    batch host is excluded from the run, unless it is this node (then only the supervisor
    died, and this node is fine)."""
    host = batch_host(jobdir, ident.job_id, ident.attempt)
    excluded = False
    if host and host != ident.node:
        try:
            exclude_node(jobdir, host, f"the batch host of attempt {ident.attempt} was lost "
                         f"(its supervisor's heartbeat stopped for {silent:.1f} s)",
                         ident.job_id, ident.attempt)
            excluded = True
        except (OSError, ValueError):  # a full disk, a name that is no file name: still requeue
            pass
    record("batch.lost", host=host, silent_s=round(silent, 3), excluded=excluded)
    os.kill(os.getpid(), signum)


def _requeue(jobdir: JobDir, ident: NodeIdentity, record: Callable[..., None]) -> None:
    """``scontrol requeue`` and, at once, the run's excluded nodes into the pending job's
    ``ExcNodeList`` (after the batch host's loss nobody else is left to set it)."""
    excluded = requeue_without_excluded(jobdir, ident.job_id)
    if excluded:
        record("requeue.excluded", nodes=excluded)


def worker_pids(agent: LocalElasticAgent) -> list[int]:
    """PIDs of the agent's current workers (none before the first start)."""
    group = agent.get_worker_group()
    return [w.id for w in group.workers if isinstance(w.id, int) and w.id > 0]


def kill_workers(agent: LocalElasticAgent) -> None:
    """SIGKILL the current workers (their process groups: binary workers lead their own)."""
    for pid in worker_pids(agent):
        with contextlib.suppress(OSError):
            if os.getpgid(pid) == pid:
                os.killpg(pid, signal.SIGKILL)
            else:
                os.kill(pid, signal.SIGKILL)


def round_size(agent: LocalElasticAgent) -> int:
    """Nodes (agents) in the agent's current round; 1 before its first rendezvous."""
    return int(agent.get_worker_group().group_world_size or 1)


def lost_in_this_attempt(jobdir: JobDir, ident: NodeIdentity) -> list[str]:
    """Other nodes excluded as lost by this job attempt (hpc_elastic/excluded.py)."""
    return [x.node for x in read_excluded(jobdir)
            if x.job_id == ident.job_id and x.attempt == ident.attempt and x.node != ident.node]


def _preempted(preemption: Preemption, events: Any, telemetry: Any, ident: NodeIdentity,
               ended_by: str | None) -> int:
    """End of a preempted agent: ask for the requeue (one node wins), log, and exit so that
    Slurm does not count the node as failed (0) or local mode relaunches (EXIT_REQUEUED).

    SIGTERM/SIGINT are ignored from here on: the requeue makes Slurm end the step with SIGTERM,
    and torch's handler (still installed) would raise in the middle of this wrap-up; Slurm's
    SIGKILL after KillWait still bounds it."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    preemption.finish()
    events.record("agent.preempted", requeued_by_this_node=preemption.requeued_by_us,
                  ended_by_signal=ended_by, grace_expired=preemption.grace_expired,
                  since_signal_s=round(time.time() - (preemption.received_at or time.time()), 3))
    telemetry.close()
    return EXIT_OK if ident.in_slurm else EXIT_REQUEUED
