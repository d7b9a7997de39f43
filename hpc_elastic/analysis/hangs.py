"""Hang dumps: which rank was not where the others were, and every rank's stack, grouped.

The agents write one file per rank and hang, ``nodes/<node>/hangs/<stamp>/rank-<r>.txt``: a JSON
header line (process state, CPU use since its last progress, seconds without progress) and the
stack as py-spy or faulthandler printed it. Both formats are parsed here into the main thread's
frames (innermost first), without the ``runpy`` / ``hpc_elastic.worker`` frames that started the
script.

The culprit, in this order of evidence:

1. a rank whose process was stopped (state T): nothing else stops a process;
2. a rank that was *not* inside a collective (all_reduce, barrier, backward's gradient sync, ...)
   while others were: they waited for it;
3. the one rank whose stack differs from all others' (a minority of one);
4. in a job of one rank (one GPU), that rank.

Nothing else is guessed: with no such evidence the message says no rank stood out.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hpc_elastic.stacktext import collective, main_frames, where

from .loader import Job

HEADER = "# hpc_elastic hang dump "


def read_dump(path: Path) -> dict[str, Any] | None:
    """One rank's dump: its header fields plus frames, where, collective; None if not ours."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read(1 << 20)
    except OSError:
        return None
    first, _, rest = text.partition("\n")
    if not first.startswith(HEADER):
        return None
    try:
        head = json.loads(first[len(HEADER):])
    except ValueError:
        return None
    if not isinstance(head, dict):
        return None
    frames = main_frames(rest)
    return {**head, "frames": frames, "where": where(frames),
            "collective": collective(frames)}


def _ranks(ranks: list[int]) -> str:
    return ",".join(str(r) for r in sorted(ranks))


def _describe(r: dict[str, Any]) -> str:
    place = r.get("where") or "an unknown place (no stack)"
    who = f"rank {r.get('rank')} (node {r.get('node')})"
    state, cpu = r.get("state"), r.get("cpu_percent")
    if state in ("T", "t"):
        return f"{who} was stopped (state T) in {place}"
    if state == "R" or (isinstance(cpu, (int, float)) and cpu >= 50):
        return f"{who} was busy ({cpu:g}% CPU) in {place}" if cpu is not None else (
            f"{who} was busy in {place}")
    return f"{who} waited in {place}" + (", not in a collective" if not r.get("collective")
                                         else "")


def analyse(stamp: str, dumps: list[dict[str, Any]]) -> dict[str, Any]:
    """The culprit(s) and the groups of identical stacks of one hang."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for d in dumps:
        groups.setdefault(tuple(d["frames"]), []).append(d)
    stopped = [d for d in dumps if d.get("state") in ("T", "t")]
    in_coll = [d for d in dumps if d["collective"]]
    outside = [d for d in dumps if not d["collective"] and d["frames"]]
    if stopped:
        culprits, why = stopped, "stopped"
    elif in_coll and outside:
        culprits, why = outside, "outside a collective"
    elif len(dumps) == 1:  # a job of one rank (one GPU): nobody to compare with
        culprits, why = dumps, "the only rank"
    else:
        singles = [g[0] for g in groups.values() if len(g) == 1]
        culprits, why = (singles, "different stack") if len(singles) == 1 and len(dumps) > 2 \
            else ([], "none")
    others = [d for d in dumps if d not in culprits]
    if culprits:
        message = "; ".join(_describe(c) for c in culprits)
        waiting = [d for d in others if d["collective"]]
        if waiting:
            colls = sorted({d["collective"] for d in waiting})
            message += (f"; rank(s) {_ranks([d['rank'] for d in waiting])} waited in "
                        f"{'/'.join(colls)}")
    else:
        message = (f"no rank stood out: rank(s) {_ranks([d['rank'] for d in dumps])} "
                   "all without progress; see the stacks")
    ordered = sorted(groups.values(), key=lambda g: (len(g), min(d["rank"] for d in g)))
    return {
        "stamp": stamp,
        "culprits": [{"rank": c.get("rank"), "node": c.get("node"), "state": c.get("state"),
                      "where": c.get("where"), "worker_dir": c.get("worker_dir")}
                     for c in culprits],
        "evidence": why,
        "message": message,
        "ranks": [{k: d.get(k) for k in ("rank", "node", "pid", "state", "cpu_percent",
                                         "silent_s", "step", "where", "collective", "tool",
                                         "file")} for d in sorted(dumps, key=lambda d: d["rank"])],
        "groups": [{"ranks": sorted(d["rank"] for d in g),
                    "nodes": sorted({d.get("node") for d in g}),
                    "stack": [f"{func} ({file}:{line})" for func, file, line in g[0]["frames"]]}
                   for g in ordered],
    }


def collect(job: Job) -> list[dict[str, Any]]:
    """Every hang of the job (by stamp, oldest first), each analysed."""
    by_stamp: dict[str, list[dict[str, Any]]] = {}
    dirs: dict[str, list[str]] = {}
    for node in job.dir.node_names():
        root = job.dir.node(node) / "hangs"
        if not root.is_dir():
            continue
        for folder in sorted(p for p in root.iterdir() if p.is_dir()):
            dirs.setdefault(folder.name, []).append(str(folder.relative_to(job.path)))
            for path in sorted(folder.glob("rank-*.txt")):
                d = read_dump(path)
                if d is None or not isinstance(d.get("rank"), int):
                    job.note(f"{path}: not a hang dump, ignored")
                    continue
                d["file"] = str(path.relative_to(job.path))
                d.setdefault("node", node)
                by_stamp.setdefault(folder.name, []).append(d)
    out = []
    for stamp in sorted(by_stamp):
        result = analyse(stamp, by_stamp[stamp])
        result["dump_dirs"] = dirs.get(stamp, [])
        out.append(result)
    return out


def render(hangs: list[dict[str, Any]]) -> str:
    """``logs hangs``: per hang the culprit, one line per rank, then the stacks grouped."""
    if not hangs:
        return "no hangs recorded"
    out: list[str] = []
    for h in hangs:
        out.append(f"hang {h['stamp']}: {h['message']}")
        out.append(f"  dumps: {', '.join(h['dump_dirs'])}")
        out.append(f"  {'rank':>4}  {'node':<12} {'state':<5} {'cpu%':>5} {'silent':>7}  where")
        for r in h["ranks"]:
            cpu = "-" if r["cpu_percent"] is None else f"{r['cpu_percent']:g}"
            coll = f"  [in {r['collective']}]" if r["collective"] else ""
            out.append(f"  {r['rank']:>4}  {str(r['node']):<12} {str(r['state']):<5} {cpu:>5} "
                       f"{r['silent_s']!s:>6}s  {r['where']}{coll}")
        for g in h["groups"]:
            out.append("")
            out.append(f"  rank(s) {_ranks(g['ranks'])} (node(s) {', '.join(g['nodes'])}), "
                       "main thread, innermost first:")
            out.extend(f"    {frame}" for frame in g["stack"] or ["(no stack)"])
        out.append("")
    return "\n".join(out).rstrip()
