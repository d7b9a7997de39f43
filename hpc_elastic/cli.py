"""The command-line front door: ``hpc-elastic`` / ``python -m hpc_elastic``.

Each command is one small function that parses nothing itself; the heavy modules (torch, submitit)
are imported inside the command so that ``--help`` stays instant.

Exit codes: 0 success, 1 the job or check failed, 2 bad input (config, arguments).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from hpc_elastic import __version__
from hpc_elastic.analysis import cli as analysis_cli
from hpc_elastic.config import ConfigError
from hpc_elastic.jobdir import JobDir

if TYPE_CHECKING:  # the API module is imported by the commands that use it
    from hpc_elastic.api import Job, Outcome

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_CANCELLED = 3  # a job that submit waited for was cancelled

Command = Callable[[argparse.Namespace], int]


class UsageError(Exception):
    """Bad input from the command line: printed as one paragraph, exit code 2."""


# --------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------


def cmd_submit(args: argparse.Namespace) -> int:
    from hpc_elastic import api

    if args.local and args.slurm:
        raise UsageError("--local and --slurm contradict each other; give one of them.")
    config = api.load_config(args.job_file, args.set)
    local = True if args.local else (False if args.slurm else None)
    if args.dry_run:
        print(api.dry_run(config, local, args.array), end="")
        return EXIT_OK
    job = api.submit(config, local, array=args.array)
    if job.mode == "local":
        print(f"job {job.job_id} runs locally\njob directory: {job.jobdir}", flush=True)
    else:
        print(f"submitted job {job.job_id}\njob directory: {job.jobdir}", flush=True)
        if not args.wait:
            return EXIT_OK
    return _wait_and_report(job)


def _wait_and_report(job: Job) -> int:
    """Follow the job to its end; then its outcome, the root cause of its failures (the rest
    as a count and a pointer), and where to read more. Ctrl-C or SIGTERM cancels the job."""
    import signal

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        outcome = job.wait(progress=job.mode == "slurm")
    except KeyboardInterrupt:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print(f"\ninterrupted: cancelling job {job.job_id}", file=sys.stderr, flush=True)
        print(job.cancel(), file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(outcome_report(job, outcome), flush=True)
    return outcome.exit_code


def outcome_report(job: Job, outcome: Outcome) -> str:
    """What the submitting terminal says at the end (see _wait_and_report)."""
    lines = [f"job {job.job_id} {outcome.state}"
             + ("" if outcome.ok else f" ({outcome.detail})")]
    try:
        summary = job.summary()
    except (OSError, ValueError) as err:  # the logs are damaged: the outcome still stands
        lines.append(f"(no summary: {err})")
        summary = None
    if summary is not None and summary.root_causes:
        roots = summary.root_causes
        label = "root cause" if len(roots) == 1 else f"root causes ({len(roots)})"
        recovered = " (recovered)" if outcome.ok else ""
        lines.append(f"{label}{recovered}:")
        lines += [f"  {cause.line()}" for cause in roots]
        secondary = sum(1 for f in summary.failures if not f.root)
        if secondary:
            lines.append(f"  + {secondary} secondary failure(s) that followed from it: "
                         f"hpc-elastic logs failures {job.job_id}")
    lines.append(f"logs: {job.jobdir}\nwhat happened: hpc-elastic logs summary {job.job_id}")
    return "\n".join(lines)


def cmd_grow(args: argparse.Namespace) -> int:
    from hpc_elastic.grow import GrowRefused, grow
    from hpc_elastic.slurm import SlurmError

    jobdir = JobDir(_find_job(args).jobdir)
    try:
        member = grow(jobdir, args.nodes, args.set, args.config)
    except (GrowRefused, SlurmError) as err:
        raise UsageError(f"{err}") from None
    print(f"submitted grow job {member.job_id} ({member.nodes} node(s)); its agents join the "
          f"run when Slurm starts it\njob directory: {jobdir.path}\n"
          f"follow it: hpc-elastic status {jobdir.path}")
    return EXIT_OK


def cmd_agent(args: argparse.Namespace) -> int:
    from hpc_elastic.agent.quick_exit import exit_now
    from hpc_elastic.agent.start import start_agent

    # The process ends here, without the half second of teardown of an interpreter that has
    # imported torch: Slurm ends the step, and a requeue starts, only once it is gone.
    exit_now(start_agent(args.jobdir))


def _find_job(args: argparse.Namespace) -> Job:
    """The one JOB lookup of every command (see :meth:`hpc_elastic.api.Job.find`)."""
    from hpc_elastic.api import Job, JobNotFound

    try:
        return Job.find(args.job, [args.root] if args.root else None)
    except JobNotFound as err:
        raise UsageError(str(err)) from None


def cmd_batch(args: argparse.Namespace) -> int:
    from hpc_elastic.batch import run_batch

    return run_batch(args.jobdir)


def cmd_status(args: argparse.Namespace) -> int:
    import json

    state = _find_job(args).state()
    print(json.dumps(state.as_dict(), indent=2) if args.json else state.render())
    return EXIT_OK


def cmd_cancel(args: argparse.Namespace) -> int:
    try:
        print(_find_job(args).cancel())
    except ValueError as err:
        raise UsageError(str(err)) from None
    return EXIT_OK


def cmd_list(args: argparse.Namespace) -> int:
    import json

    from hpc_elastic import jobindex
    from hpc_elastic.jobdir import jobdirs_under
    from hpc_elastic.jobs import list_jobs

    dirs = jobdirs_under(Path(args.root)) if args.root else jobindex.recent_jobdirs()
    rows = list_jobs(dirs)
    if args.json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    if not rows:
        print(f"no jobs under {args.root}" if args.root else
              f"no recent jobs in {jobindex.index_path()} (--root DIR lists a job root)")
    width = max([12, *(len(row["job_id"] or "-") for row in rows)])
    for row in rows:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(row["submitted_at"] or 0))
        print(f"{when}  {row['job_id'] or '-':<{width}} {row['mode'] or '-':<6} "
              f"{row['outcome']:<22} {row['jobdir']}")
    return EXIT_OK


def cmd_init(args: argparse.Namespace) -> int:
    from hpc_elastic.init import write_template

    try:
        path = write_template(args.template, Path(args.output), force=args.force)
    except ValueError as err:
        raise UsageError(str(err)) from None
    print(f"wrote {path} (template '{args.template}'). Edit it, then: "
          f"hpc-elastic submit {path} --dry-run")
    return EXIT_OK


def cmd_doctor(args: argparse.Namespace) -> int:
    from hpc_elastic import doctor

    if args.node_report:
        doctor.node_report(Path(args.dir))
        return EXIT_OK
    if args.fs_probe_side:
        from hpc_elastic import fsprobe

        return fsprobe.main_side(Path(args.dir), args.fs_probe_side)
    if args.fs_client:
        if len(args.fs_client) != 2:
            raise UsageError("--fs-client must be given exactly twice (two command prefixes "
                             "that reach two different clients of the directory, e.g. "
                             "--fs-client 'ssh node1' --fs-client 'ssh node2').")
        clients = [shlex.split(c) for c in args.fs_client]
        checks = doctor.run_fs_doctor(Path(args.dir), clients, args.heartbeat_timeout)
    else:
        checks = doctor.run_doctor(Path(args.dir), args.clock_tolerance, args.heartbeat_timeout)
    for check in checks:
        print(check.render())
    failed = [c for c in checks if c.ok is False]
    print(f"{len(failed)} check(s) failed" if failed else "all checks passed")
    return EXIT_FAILED if failed else EXIT_OK


def _logs_command(name: str) -> Command:
    def command(args: argparse.Namespace) -> int:
        args.job = str(_find_job(args).jobdir)
        return analysis_cli.run(name, args)

    return command


# --------------------------------------------------------------------------------------------
# The parser
# --------------------------------------------------------------------------------------------

_DESCRIPTION = """\
Fault-tolerant, elastic PyTorch training on Slurm: one torch elastic agent per node,
agents meet through a shared directory (no etcd, no port to guess), every node writes
JSON-lines logs into the job directory, and the 'logs' commands explain what happened."""

_EPILOG = """\
examples:
  hpc-elastic init --template cpu          write a starter job.yaml
  hpc-elastic submit job.yaml --dry-run    show the batch script, submit nothing
  hpc-elastic submit examples/demo.yaml --local
                                           the demo: run on this machine, simulated nodes
  hpc-elastic list                         your recent jobs, newest first, with their ids
  hpc-elastic logs summary JOB             what happened; JOB is a job id from 'list' (it
                                           works from any directory) or a job directory

exit codes: 0 ok, 1 the job or a check failed, 2 bad input, 3 the job was cancelled,
130 interrupted (Ctrl-C cancels a job that 'submit' is waiting for)."""


def _job_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("job", metavar="JOB", help="a job id (or job directory name) from "
                        "'hpc-elastic list', or a job directory")


def _root_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", metavar="DIR",
                        help="the job root to look for JOB in (a job file's job_root); default: "
                        "your recent jobs (every submit records its job), then ./jobs")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hpc-elastic",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"hpc_elastic {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "submit",
        help="submit a job from a YAML file (Slurm, or --local on this machine)",
        description="Validate JOB_FILE, create the job directory, render the batch script "
        "through submitit and submit it with sbatch (one agent per node). Without Slurm on "
        "this machine (no sbatch, or no controller answers), or with --local, the job runs "
        "here with simulated nodes, and submit waits for it. Exit codes after waiting: 0 "
        "succeeded, 1 failed, 3 cancelled, 130 interrupted (Ctrl-C cancels the job).",
    )
    p.add_argument("job_file", metavar="JOB_FILE", help="the job's YAML file")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a key, dotted for sections: --set nodes=2:4 --set slurm.partition=gpu "
        "--set warm_workers=true (workers are forked from a standby that has imported torch; see "
        "docs/configuration.md) (repeatable)",
    )
    p.add_argument("--dry-run", action="store_true", help="print the batch script, submit nothing")
    p.add_argument("--local", action="store_true", help="run on this machine, nodes simulated")
    p.add_argument("--slurm", action="store_true",
                   help="insist on Slurm: fail instead of running locally when no Slurm "
                   "controller answers")
    p.add_argument(
        "--wait", action="store_true", help="follow the job to its end; exit 0 only on success"
    )
    p.add_argument(
        "--array", type=int, metavar="N",
        help="start the run as a Slurm array of N single-node jobs that join as Slurm "
        "schedules them; training starts once min_nodes have joined "
        "(docs/elastic-across-jobs.md)")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser(
        "grow",
        help="add nodes to a running job from a separate Slurm job",
        description="Submit a separate Slurm job of K nodes whose agents join JOB's run (up to "
        "its max_nodes). The running workers re-form at their next monitor tick with the larger "
        "world and resume from their checkpoint; when the grow job ends or is cancelled, the run "
        "shrinks back. Refused for a finished job, beyond max_nodes, or with a config that "
        "differs from the run's (only slurm.* may differ).",
    )
    _job_arg(p)
    _root_arg(p)
    p.add_argument("--nodes", type=int, required=True, metavar="K", help="nodes to add")
    p.add_argument("--config", metavar="JOB_FILE",
                   help="the job file to check against the run's config (default: the run's "
                   "own resolved job.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key for the grow job, e.g. --set slurm.partition=other "
                   "(only slurm.* may differ from the run)")
    p.set_defaults(func=cmd_grow)

    p = sub.add_parser(
        "agent",
        help="the per-node launcher that srun starts (you rarely call it yourself)",
        description="Run one node's elastic agent: join the shared rendezvous, start the "
        "workers, restart them on failure, write the node's logs. 'submit' starts it with the "
        "job directory; a plain batch script may start it with the job file instead "
        "(srun --ntasks-per-node=1 hpc-elastic agent job.yaml, see sbatch/).",
    )
    p.add_argument("jobdir", metavar="JOBDIR|JOB_FILE",
                   help="the job directory created by 'submit', or a job YAML file")
    p.set_defaults(func=cmd_agent)

    p = sub.add_parser(
        "batch",
        help="the batch step of a submitted job: runs the agents with srun (internal)",
        description="Run 'srun ... hpc-elastic agent JOBDIR' on the allocation, and again on the "
        "surviving nodes when Slurm kills the step after a node loss (--no-kill jobs). "
        "'submit' writes it into the batch script.",
    )
    p.add_argument("jobdir", metavar="JOBDIR", help="the job directory created by 'submit'")
    p.set_defaults(func=cmd_batch)

    p = sub.add_parser(
        "status",
        help="queue state and what the agents report (nodes up, restarts, last failure)",
        description="Show a job's state from squeue (live), then sacct (after the end), then "
        "the job directory, and what its agents wrote: nodes, rendezvous rounds, restarts, "
        "the last failure.",
    )
    _job_arg(p)
    _root_arg(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser(
        "cancel", help="stop a job cleanly: agents, workers and the allocation",
        description="scancel a Slurm job (each agent gets SIGTERM and stops its workers), or "
        "stop a local job's agents; waits until they are gone.")
    _job_arg(p)
    _root_arg(p)
    p.set_defaults(func=cmd_cancel)

    p = sub.add_parser(
        "list", help="list your recent jobs (or those under --root), newest first",
        description="List jobs newest first with their id, mode, outcome (from each node's last "
        "event, without asking Slurm) and directory. Without --root: the jobs you submitted "
        "from this account (recorded in ~/.local/state/hpc_elastic/jobs.jsonl, or under "
        "$XDG_STATE_HOME), wherever their job_root is.")
    p.add_argument("--root", metavar="DIR", help="list the jobs under this job root (a job "
                   "file's job_root) instead of your recent jobs")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_list)

    logs = sub.add_parser(
        "logs",
        help="post-run analysis of a job's logs: summary, timeline, failures, metrics, plot",
        description="Read a job directory's JSON-lines logs and explain what happened.",
    )
    logs_sub = logs.add_subparsers(dest="logs_command", metavar="WHAT", required=True)
    for name, text in [
        ("summary", "outcome, time split, rendezvous rounds, restarts, failures"),
        ("timeline", "all nodes' events merged in time order"),
        ("failures", "each failure with its root cause and the failing rank's stderr"),
        ("hangs", "hung ranks: the culprit and every rank's stack, identical stacks grouped"),
        ("metrics", "count, mean, p50, p95, max per metric"),
        ("plot", "a PNG timeline and metric curves (needs the 'plot' extra)"),
    ]:
        lp = logs_sub.add_parser(name, help=text, description=text.capitalize() + ".")
        _job_arg(lp)
        _root_arg(lp)
        lp.add_argument("--json", action="store_true", help="machine-readable output")
        analysis_cli.add_arguments(lp, name)
        lp.set_defaults(func=_logs_command(name))

    p = sub.add_parser("init", help="write a starter job.yaml from a template",
                       description="Copy a commented template job file to the current "
                       "directory. Templates: cpu, single-node-gpu, multi-node-gpu, "
                       "elastic-preemptible.")
    p.add_argument("--template", default="cpu", help="template name (default: cpu)")
    p.add_argument("--output", "-o", default="job.yaml", help="file to write (default: job.yaml)")
    p.add_argument("--force", action="store_true", help="overwrite an existing file")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser(
        "doctor", help="preflight checks: shared dir, locks, clocks, versions, Slurm commands",
        description="Check that DIR (the shared job root) is writable and supports file locks, "
        "that Slurm's commands and accounting answer, and, inside a multi-node allocation, that "
        "every node sees every other node's files with agreeing clocks and versions.")
    p.add_argument("--dir", default=".", help="the shared directory to check (default: .)")
    p.add_argument("--clock-tolerance", type=float, default=2.0, metavar="SECONDS",
                   help="largest clock difference between nodes accepted (default: 2)")
    p.add_argument("--heartbeat-timeout", type=float, default=10.0, metavar="SECONDS",
                   help="the rendezvous heartbeat_timeout the filesystem is judged against "
                   "(default: 10)")
    p.add_argument("--fs-client", action="append", metavar="PREFIX",
                   help="check only the filesystem, through two clients: give twice a command "
                   "prefix that runs a process on a client of DIR (e.g. 'ssh node1', 'nsenter "
                   "--mount=/run/ns1 --'); without it, two nodes of the Slurm allocation")
    p.add_argument("--node-report", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--fs-probe-side", choices=("A", "B", "auto"), help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_doctor)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from hpc_elastic.worker.standby import BecomeStandby, run_forked

    try:
        return _main(argv)
    except BecomeStandby as forked:
        sock = forked.sock  # a process the agent forked to be its standby (agent/standby.py)
    # Outside the except clause, with the agent's frames gone: from here it is the standby,
    # or one of its workers, as if started anew.
    return run_forked(sock)


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from hpc_elastic.api import SubmitError

    try:
        return int(args.func(args))
    except (ConfigError, UsageError, SubmitError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
