"""argparse glue for ``hpc-elastic logs <command> JOB``; the main CLI owns JOB and ``--json``.

Exit codes: 0 ok, 1 the job directory has no logs (or a command failed, e.g. no matplotlib),
2 bad input (JOB not found, a bad option value).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from hpc_elastic.ended import agents_gone, no_final_event_note

from . import failures, hangs, metrics, summary, timeline
from .fmt import emit_json, footer
from .loader import Job, JobNotFound, open_job

COMMANDS = ("summary", "timeline", "failures", "hangs", "metrics", "plot")


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    """Add ``command``'s own options (JOB and --json are added by the caller)."""
    if command == "timeline":
        parser.add_argument("--since", type=float, metavar="SECONDS",
                            help="only events at least this many seconds after the first one")
        parser.add_argument("--node", metavar="NAME", help="only this node's events")
        parser.add_argument("--kind", metavar="PREFIX",
                            help="only kinds starting with PREFIX (e.g. 'worker.', 'rendezvous')")
    elif command == "failures":
        parser.add_argument("--lines", "-n", type=int, default=10, metavar="N",
                            help="stderr lines to show per failing rank (default 10)")
    elif command == "metrics":
        parser.add_argument("--per-node", action="store_true",
                            help="one row per node and metric instead of merged over nodes")
        parser.add_argument("--name", metavar="PREFIX", help="only metrics starting with PREFIX")
        parser.add_argument("--no-workers", action="store_true",
                            help="agent metrics only, not the ranks' metrics.jsonl")
    elif command == "plot":
        parser.add_argument("--out", "-o", metavar="PNG",
                            help="output file (default <jobdir>/analysis.png)")
        parser.add_argument("--metric", action="append", metavar="NAME",
                            help="worker metric to plot (repeatable; default loss)")
        parser.add_argument("--text", action="store_true",
                            help="print a plain-text timeline instead (also what happens "
                            "when matplotlib is not installed)")
    elif command not in ("summary", "hangs"):
        raise ValueError(f"unknown logs command {command!r}")


def _err(msg: str) -> None:
    sys.stderr.write(f"error: {msg}\n")  # as every other command says it


def run(command: str, args: argparse.Namespace) -> int:
    """Run ``logs <command>`` and print its output; returns the exit code."""
    if command not in COMMANDS:
        _err(f"unknown command {command!r} (one of {', '.join(COMMANDS)})")
        return 2
    try:
        job = open_job(str(args.job))
    except JobNotFound as exc:
        _err(str(exc))
        return 2
    if not job.nodes():
        why = agents_gone(job.dir)
        if why is None:
            _err(f"{job.path}: no logs yet (no nodes/<node>/ directory)")
        else:
            _err(f"{job.path}: no logs in the job directory; "
                 + no_final_event_note(job.dir, [], why))
        return 1
    as_json = bool(getattr(args, "json", False))
    try:
        return _COMMANDS[command](job, args, as_json)
    except BrokenPipeError:  # `... | head` is normal use
        return 0


def _summary(job: Job, args: argparse.Namespace, as_json: bool) -> int:
    data = summary.summarize(job)
    if as_json:
        emit_json(data)
    else:
        print(summary.render(data))
    return 0


def _timeline(job: Job, args: argparse.Namespace, as_json: bool) -> int:
    since = getattr(args, "since", None)
    if since is not None and since < 0:
        _err("--since must be >= 0")
        return 2
    n = 0
    for rec in timeline.events(job, since=since, node=getattr(args, "node", None),
                               kind=getattr(args, "kind", None)):
        n += 1
        if as_json:  # JSON lines: stays streaming for a million events
            sys.stdout.write(json.dumps(timeline.row_json(rec), default=str) + "\n")
        else:
            print(timeline.row_text(rec))
    if as_json:
        if job.notes:
            sys.stdout.write(json.dumps({"notes": job.notes}) + "\n")
    else:
        print(f"{n} event(s)")
        if job.notes:
            print(footer(job.notes))
    return 0


def _failures(job: Job, args: argparse.Namespace, as_json: bool) -> int:
    lines = getattr(args, "lines", 10)
    if lines is None or lines < 0:
        _err("--lines must be >= 0")
        return 2
    data = failures.collect(job, lines)
    if as_json:
        emit_json(data)
    else:
        print(failures.render(data))
    return 0


def _hangs(job: Job, args: argparse.Namespace, as_json: bool) -> int:
    data = hangs.collect(job)
    if as_json:
        emit_json({"hangs": data, "notes": job.notes})
    else:
        print(hangs.render(data))
        if job.notes:
            print(footer(job.notes))
    return 0


def _metrics(job: Job, args: argparse.Namespace, as_json: bool) -> int:
    data = metrics.collect(job, per_node=bool(getattr(args, "per_node", False)),
                           name_prefix=getattr(args, "name", None),
                           workers=not getattr(args, "no_workers", False))
    if as_json:
        emit_json(data)
    else:
        print(metrics.render(data))
    return 0


def _plot(job: Job, args: argparse.Namespace, as_json: bool) -> int:
    from . import plot  # matplotlib is imported inside plot.plot only

    out = Path(getattr(args, "out", None) or job.path / "analysis.png")
    names = tuple(getattr(args, "metric", None) or ("loss",))
    if getattr(args, "text", False):
        print(plot.text_timeline(job))
        return 0
    try:
        data = plot.plot(job, out, names)
    except plot.PlotUnavailable as exc:  # the text timeline instead, and how to get the PNG
        print(plot.text_timeline(job))
        _err(f"{exc}; printed a text timeline instead of {out}")
        return 0
    if as_json:
        emit_json(data)
    else:
        print(f"wrote {data['png']}")
        if data["notes"]:
            print(footer(data["notes"]))
    return 0


_COMMANDS = {"summary": _summary, "timeline": _timeline, "failures": _failures, "hangs": _hangs,
             "metrics": _metrics, "plot": _plot}


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (``python -m hpc_elastic.analysis.cli summary JOB``) for testing."""
    parser = argparse.ArgumentParser(prog="hpc-elastic logs")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        p = sub.add_parser(name)
        p.add_argument("job", metavar="JOB")
        p.add_argument("--json", action="store_true")
        add_arguments(p, name)
    args = parser.parse_args(argv)
    return run(args.command, args)


if __name__ == "__main__":
    sys.exit(main())
