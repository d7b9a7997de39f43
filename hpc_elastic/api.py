"""The public Python API: load a job file, submit it, follow and analyse the job.

The command line is a thin layer over these names (``hpc-elastic submit`` is :func:`submit` then
:meth:`Job.wait`; every command that takes a JOB resolves it with :meth:`Job.find`), so a
notebook and a terminal see the same behaviour. See docs/python-api.md for a worked example.

Everything heavy (submitit, the analysis) is imported inside the function that needs it, and
torch is never imported here: ``import hpc_elastic`` stays cheap.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hpc_elastic.config import JobConfig
from hpc_elastic.jobdir import JobDir, find_jobdir, is_jobdir

if TYPE_CHECKING:
    from hpc_elastic.jobs import JobStatus

#: Exit codes of ``hpc-elastic`` (and :attr:`Outcome.exit_code`).
EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_CANCELLED = 0, 1, 2, 3

#: Where a JOB id is looked for when no root is given (after the per-user index).
DEFAULT_ROOTS = (Path("jobs"),)


class JobNotFound(LookupError):
    """A JOB argument named no job directory and no known job id."""


class SubmitError(RuntimeError):
    """The job could not be submitted (Slurm said no, or Slurm was asked for and is absent)."""


def load_config(path: str | os.PathLike[str], overrides: Sequence[str] = ()) -> JobConfig:
    """Read and validate a job file; ``overrides`` are ``--set`` items (``"nodes=2:4"``).

    Raises :class:`hpc_elastic.config.ConfigError` (one paragraph naming file, key and fix).
    """
    from hpc_elastic.config import load_config as _load

    return _load(path, list(overrides))


# --------------------------------------------------------------------------------------------
# What a job reports
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """How a job ended: ``state`` is succeeded, failed or cancelled; ``detail`` says why."""

    job_id: str
    state: str
    detail: str
    #: Slurm's final state (COMPLETED, FAILED, TIMEOUT, ...); None for a local job.
    slurm_state: str | None = None
    #: A local job's agents' exit codes by node (negative: killed by that signal).
    agent_codes: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.state == "succeeded"

    @property
    def exit_code(self) -> int:
        """0 succeeded, 1 failed, 3 cancelled (the codes of ``hpc-elastic submit``)."""
        return {"succeeded": EXIT_OK, "cancelled": EXIT_CANCELLED}.get(self.state, EXIT_FAILED)


@dataclass(frozen=True)
class Cause:
    """A root cause: a worker that failed on its own (``kind`` worker_failed), or a node lost
    (``node_lost``) or stopped (``node_left``) while the run went on."""

    kind: str
    time: float
    node: str | None
    rank: int | None
    exitcode: int | None
    message: str | None

    @classmethod
    def of(cls, d: dict[str, Any]) -> Cause:
        return cls(d["kind"], d["time"], d.get("node"), d.get("rank"), d.get("exitcode"),
                   d.get("message"))

    def line(self) -> str:
        if self.kind != "worker_failed":
            return str(self.message)
        return f"{self.node} rank {self.rank} exit {self.exitcode}: {self.message or '?'}"


@dataclass(frozen=True)
class Failure:
    """One failed worker. ``root`` is True for the cause of its cascade; the others name theirs
    in ``secondary_to`` (gloo errors of the ranks that lost a peer, SIGTERMs of the agent)."""

    time: float
    node: str | None
    rank: int | None
    exitcode: int | None
    message: str | None
    attempt: int
    round: int | None
    root: bool
    secondary_to: dict[str, Any] | None
    stderr_path: Path | None = None
    stderr_tail: tuple[str, ...] = ()

    @classmethod
    def of(cls, d: dict[str, Any]) -> Failure:
        path = d.get("stderr_path")
        return cls(d["time"], d.get("node"), d.get("rank"), d.get("exitcode"), d.get("message"),
                   d.get("attempt") or 0, d.get("round"), bool(d.get("root")),
                   d.get("secondary_to"), Path(path) if path else None,
                   tuple(d.get("stderr_tail") or ()))


@dataclass(frozen=True)
class Summary:
    """``logs summary --json`` as typed fields; ``data`` holds the whole JSON document."""

    job_id: str | None
    status: str  # succeeded | failed | running | cancelled | unknown
    wall_s: float | None
    time_split_s: dict[str, float]
    nodes: list[str]
    attempts: int
    restarts: int
    rendezvous_rounds: int
    failures: list[Failure]
    root_causes: list[Cause]
    preemptions: int
    requeues: int
    notes: list[str]
    data: dict[str, Any]

    @classmethod
    def of(cls, d: dict[str, Any]) -> Summary:
        return cls(d["job_id"], d["status"], d["wall_s"], dict(d["time_split_s"]),
                   list(d["nodes"]), d["attempts"], d["restarts"], len(d["rendezvous_rounds"]),
                   [Failure.of(f) for f in d["failures"]],
                   [Cause.of(c) for c in d["root_causes"]], len(d["preemptions"]),
                   d["requeues"], list(d["notes"]), d)

    def render(self) -> str:
        """The text of ``hpc-elastic logs summary``."""
        from hpc_elastic.analysis.summary import render

        return render(self.data)


@dataclass(frozen=True)
class JobState:
    """Where a job stands: ``queue`` (Slurm's state, or RUNNING/ENDED for a local job) and
    ``status``, what its agents wrote (running, succeeded, failed, cancelled, unknown)."""

    job_id: str | None
    mode: str | None
    queue: str
    status: str
    nodes: list[str]
    restarts: int
    attempts: int
    last_failure: dict[str, Any] | None
    _status: JobStatus = field(repr=False, compare=False)

    def as_dict(self) -> dict[str, Any]:
        """The JSON of ``hpc-elastic status --json``."""
        return self._status.as_dict()

    def render(self) -> str:
        return self._status.render()


# --------------------------------------------------------------------------------------------
# A job
# --------------------------------------------------------------------------------------------


class Job:
    """A submitted job: its id, its directory, and what can be asked of it."""

    def __init__(self, jobdir: str | os.PathLike[str], *,
                 _launcher: subprocess.Popen | None = None) -> None:
        from hpc_elastic.submit import read_submission

        self.jobdir = Path(jobdir)
        self._dir = JobDir(self.jobdir)
        sub = read_submission(self._dir)
        #: Slurm's job id, or ``local-<directory name>`` for a local job.
        self.job_id: str = sub.job_id if sub else self.jobdir.name
        #: "slurm" or "local" (None: no submission.json, the job was started by hand).
        self.mode: str | None = sub.mode if sub else None
        self._launcher = _launcher

    def __repr__(self) -> str:
        return f"Job({self.job_id!r}, jobdir={str(self.jobdir)!r})"

    @classmethod
    def find(cls, spec: str | os.PathLike[str],
             roots: Sequence[str | os.PathLike[str]] | None = None) -> Job:
        """The job named by ``spec``: a job directory, or a job id (or directory name) from the
        per-user index of submitted jobs, else found under ``roots`` (default ``./jobs``).

        Every command that takes a JOB uses this. Raises :class:`JobNotFound`.
        """
        from hpc_elastic import jobindex

        text = os.fspath(spec)
        path = Path(text)
        if path.is_dir() and is_jobdir(path):
            return cls(path)
        search = [Path(r) for r in roots] if roots is not None else list(DEFAULT_ROOTS)
        found = None if roots is not None else jobindex.lookup(text)
        found = found or find_jobdir(text, search)
        if found is None:
            where = ", ".join(str(r) for r in search)
            index = "" if roots is not None else (
                f"the index of your recent jobs ({jobindex.index_path()}) nor ")
            raise JobNotFound(
                f"{text}: not a job directory, and neither {index}the job root {where} has a "
                "job with that id. Give the job directory, or --root with the job file's "
                "job_root ('hpc-elastic list' shows your recent jobs).")
        return cls(found.path)

    # -- state ---------------------------------------------------------------------------

    def state(self) -> JobState:
        """Queue state (squeue, then sacct, then the job directory) and what the agents wrote."""
        from hpc_elastic.jobs import job_status

        st = job_status(self._dir)
        d = st.as_dict()
        return JobState(d["job_id"], d["mode"], d["queue_state"], d["status"] or "unknown",
                        list(d["nodes"]), d["restarts"], d["attempts"], d["last_failure"], st)

    def done(self) -> bool:
        """Whether the job has ended (a local launcher exited, or Slurm reports a final state)."""
        return self._outcome_now() is not None

    def wait(self, timeout: float | None = None, progress: bool = True,
             out: Any = None) -> Outcome:
        """Block until the job ends and return its :class:`Outcome`.

        ``progress`` prints a one-line display of the queue state and nodes training (to
        ``out``, default stderr). Raises TimeoutError after ``timeout`` seconds (the job goes
        on; call ``wait`` again or :meth:`cancel`).
        """
        stream = out if out is not None else sys.stderr
        if self.mode == "slurm":
            from hpc_elastic.progress import follow_job

            state = follow_job(self.job_id, self._dir, out=stream if progress else _Null(),
                               timeout=timeout)
            if state is None:
                raise TimeoutError(f"job {self.job_id} still runs after {timeout:g} s")
            return _slurm_outcome(self.job_id, state)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            outcome = self._outcome_now()
            if outcome is not None:
                return outcome
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"job {self.job_id} still runs after {timeout:g} s")
            if self._launcher is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self._launcher.wait(timeout=0.5)
            else:
                time.sleep(0.5)

    def _outcome_now(self) -> Outcome | None:
        if self.mode == "slurm":
            from hpc_elastic import slurm

            state = slurm.job_state(self.job_id)
            return _slurm_outcome(self.job_id, state) if state in slurm.FINAL_STATES else None
        from hpc_elastic import local

        result = local.read_result(self._dir)
        if result is not None:
            if self._launcher is not None:
                self._launcher.wait()  # reap it
            return Outcome(self.job_id, result.state, result.detail, None, result.codes)
        if self._launcher is not None and self._launcher.poll() is not None:
            return Outcome(self.job_id, "failed",
                           f"the local launcher exited with {self._launcher.returncode} "
                           "without a result")
        if self._launcher is None and not _local_running(self._dir):
            return Outcome(self.job_id, "unknown", "no launcher or agent runs and no "
                           f"{local.RESULT_FILE} was written")
        return None

    def cancel(self, wait_s: float = 60.0) -> str:
        """Stop the job (Slurm: scancel the run's jobs; local: stop the launcher and agents).
        Returns a sentence saying what was done."""
        from hpc_elastic.jobs import cancel_job

        said = cancel_job(self._dir, wait_s)
        if self._launcher is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._launcher.wait(timeout=wait_s)
        return said

    # -- analysis ------------------------------------------------------------------------

    def summary(self) -> Summary:
        """Outcome, time split, rounds, restarts, root causes (``logs summary``); a running
        job's clock runs to now."""
        from hpc_elastic.analysis import Job as Logs
        from hpc_elastic.analysis.summary import summarize

        return Summary.of(summarize(Logs(self._dir)))

    def failures(self, lines: int = 10) -> list[Failure]:
        """Every worker failure, roots first, with the last ``lines`` of each rank's stderr."""
        from hpc_elastic.analysis import Job as Logs
        from hpc_elastic.analysis.failures import collect

        found = [Failure.of(f) for f in collect(Logs(self._dir), lines)["failures"]]
        return sorted(found, key=lambda f: (not f.root, f.time))

    def events(self, *, node: str | None = None, kind: str | None = None
               ) -> Iterator[dict[str, Any]]:
        """Every node's events merged in time order (``logs timeline``), streamed; ``kind`` is a
        prefix ("worker.", "rendezvous")."""
        from hpc_elastic.analysis import Job as Logs
        from hpc_elastic.analysis.timeline import events

        yield from events(Logs(self._dir), node=node, kind=kind)


class _Null:
    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


def _local_running(jobdir: JobDir) -> bool:
    from hpc_elastic import local
    from hpc_elastic.jobs import alive, local_agent_pids

    pid = local.launcher_pid(jobdir)
    return (pid is not None and alive(pid)) or bool(local_agent_pids(jobdir))


def _slurm_outcome(job_id: str, state: str) -> Outcome:
    named = {"COMPLETED": "succeeded", "CANCELLED": "cancelled"}
    return Outcome(job_id, named.get(state, "failed"), f"Slurm state {state}", state)


# --------------------------------------------------------------------------------------------
# Submitting
# --------------------------------------------------------------------------------------------


def _jobfiles() -> Any:
    """The ``hpc_elastic.submit`` module (job directory and files): the package's attribute of
    that name is :func:`submit`, so the module is taken from the import system."""
    import importlib

    return importlib.import_module("hpc_elastic.submit")


def _notice(text: str) -> None:
    print(f"hpc-elastic: {text}", file=sys.stderr, flush=True)


def choose_local(local: bool | None, notify: Callable[[str], None] = _notice,
                 nodes: int = 1) -> bool:
    """Whether a job runs here: ``local`` forces it either way; None picks Slurm when its
    commands are installed AND a controller answers, else local mode (saying why)."""
    from hpc_elastic import slurm

    if local is not None:
        if not local and not slurm.slurm_available():
            raise SubmitError("Slurm was asked for, but sbatch is not on PATH here. Run on a "
                              "login node of the cluster, or without local=False/--slurm.")
        return local
    if not slurm.slurm_available():
        notify(f"Slurm's sbatch is not on PATH, so the job runs on this machine with {nodes} "
               "simulated node(s) (--local says this on purpose).")
        return True
    answers, said = slurm.controller_answers()
    if not answers:
        notify(f"Slurm's commands are installed but no Slurm controller answers ({said}), so "
               f"the job runs on this machine with {nodes} simulated node(s) (--local says "
               "this on purpose; --slurm insists on Slurm; 'hpc-elastic doctor' checks the "
               "set-up).")
        return True
    return False


def dry_run(config: JobConfig, local: bool | None = None, array: int | None = None,
            notify: Callable[[str], None] = _notice) -> str:
    """What :func:`submit` would do, submitting nothing: the batch script, or a local run's
    one-line plan."""
    submitting = _jobfiles()

    jobdir = submitting.new_jobdir(config)
    if choose_local(local, notify, config.max_nodes):
        return (f"would run locally: {config.max_nodes} agent(s) x {config.nproc_per_node} "
                f"worker(s) of {' '.join(config.entrypoint.command())} in {jobdir.path}\n")
    from hpc_elastic.sbatch import render_sbatch

    return render_sbatch(config, jobdir, sys.executable, member=_member(config, array))


def _member(config: JobConfig, array: int | None) -> Any:
    if array is None:
        return None
    from hpc_elastic.sbatch import MemberScript

    if not config.min_nodes <= array <= config.max_nodes:
        raise SubmitError(
            f"--array {array} (array={array}): the job's nodes are {config.nodes}, so an "
            f"array start needs between {config.min_nodes} tasks (training starts when "
            f"min_nodes have joined) and {config.max_nodes} (more could never join). "
            f"Use {config.max_nodes}, or change nodes.")
    return MemberScript(array_tasks=array)


def submit(config: JobConfig | str | os.PathLike[str], local: bool | None = None, *,
           array: int | None = None, notify: Callable[[str], None] = _notice) -> Job:
    """Create the job directory and start the job; return at once with its :class:`Job`.

    ``local``: None runs on Slurm when a controller answers, else here with simulated nodes
    (``notify`` says why); True/False force it. ``array`` starts a Slurm run as N single-node
    jobs (docs/elastic-across-jobs.md). A path is loaded with :func:`load_config` first.
    The job is recorded in the per-user index, so ``Job.find(job_id)`` works from anywhere.
    """
    from hpc_elastic import jobindex
    submitting = _jobfiles()

    if not isinstance(config, JobConfig):
        config = load_config(config)
    member = _member(config, array)
    use_local = choose_local(local, notify, config.max_nodes)
    if use_local and member is not None:
        raise SubmitError("--array needs Slurm (array= in Python): its single-node jobs join "
                          "as Slurm schedules them. Without it, a local run starts all "
                          "simulated nodes at once.")
    jobdir = submitting.new_jobdir(config)
    launcher = None
    if use_local:
        from hpc_elastic import local as local_mode

        submitting.create_jobdir(config, jobdir)
        job_id = local_mode.local_job_id(jobdir)
        sub = submitting.Submission("local", job_id, time.time(), config.name)
        submitting.write_submission(jobdir, sub)
        launcher = local_mode.start_local(jobdir)
    else:
        sub = _submit_slurm(config, jobdir, member, array)
    try:
        jobindex.record(jobindex.Entry(sub.job_id, jobdir.path, sub.submitted_at, sub.mode,
                                       sub.name))
    except OSError as err:
        notify(f"could not record the job in {jobindex.index_path()} ({err}); give its "
               "directory to the other commands")
    return Job(jobdir.path, _launcher=launcher)


def _submit_slurm(config: JobConfig, jobdir: JobDir, member: Any, array: int | None) -> Any:
    import shutil

    from hpc_elastic import slurm
    submitting = _jobfiles()
    from hpc_elastic.members import ARRAY, LEAD, MemberJob, record_member

    submitting.prepare_slurm_job(config, jobdir, member)
    try:
        job_id = slurm.submit_script(str(jobdir.sbatch_script))
    except slurm.SlurmError as err:
        shutil.rmtree(jobdir.path)  # only our own fresh files: nothing ran, nothing is lost
        raise SubmitError(f"{err}. Nothing was submitted.") from None
    now = time.time()
    sub = submitting.Submission("slurm", job_id, now, config.name)
    submitting.write_submission(jobdir, sub)
    record_member(jobdir, MemberJob(
        job_id, ARRAY if member else LEAD, "1" if member else config.nodes.replace(":", "-"),
        now, script=jobdir.sbatch_script.name, tasks=array))
    return sub


def recent_jobs() -> list[Job]:
    """Your recently submitted jobs (the per-user index), newest first."""
    from hpc_elastic import jobindex

    return [Job(jd.path) for jd in jobindex.recent_jobdirs()]


__all__ = ["Cause", "Failure", "Job", "JobNotFound", "JobState", "Outcome", "SubmitError",
           "Summary", "dry_run", "load_config", "recent_jobs", "submit"]
