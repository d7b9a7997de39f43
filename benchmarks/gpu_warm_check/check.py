"""Judge the three jobs of benchmarks/gpu_warm_check.sh from their job directories; print what was
seen and exit 1 if anything the check asks for is missing."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def lines(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def job_events(out: Path, name: str) -> dict[str, list[dict]]:
    jobdir = next((p for p in (out / "jobs").iterdir() if p.name.startswith(f"{name}-")), None)
    if jobdir is None:
        return {}
    return {node.name: lines(node / "events.jsonl") for node in (jobdir / "nodes").iterdir()}


def main() -> int:
    out = Path(sys.argv[1])
    problems: list[str] = []
    for name, warm, hang in (("warm-gloo-crash", True, False), ("warm-nccl-hang", True, True),
                             ("cold-nccl-hang", False, True)):
        starts = lines(out / name / "starts.jsonl")
        events = job_events(out, name)
        kinds = [e["kind"] for evs in events.values() for e in evs]
        print(f"== {name}: {len(starts)} worker starts, events {len(kinds)}")
        for s in starts:
            print("  start", json.dumps(s))
        last = {node: evs[-1]["kind"] if evs else None for node, evs in events.items()}
        print("  last events", last)
        if set(last.values()) != {"agent.succeeded"}:
            problems.append(f"{name}: the job did not succeed ({last})")
        if sorted({s["restart"] for s in starts}) != [0, 1]:
            problems.append(f"{name}: expected a first group and one restart")
        standbys = {p for evs in events.values() for e in evs if e["kind"] == "standby.started"
                    for p in e["pids"]}
        forked = [e.get("forked_from_agent") for evs in events.values() for e in evs
                  if e["kind"] == "standby.started"]
        cold = [r for evs in events.values() for e in evs if e["kind"] == "workers.warm"
                for r in e["cold"]]
        if warm:
            print(f"  standbys {sorted(standbys)} forked_from_agent {forked}; cold ranks {cold}")
            if not all(s["preloaded"] and s["ppid"] in standbys for s in starts):
                problems.append(f"{name}: a worker was not forked by its node's standby")
            if cold or not forked or not all(forked):
                problems.append(f"{name}: cold starts {cold}, standby forked {forked}")
        elif any(s["preloaded"] for s in starts):
            problems.append(f"{name}: a cold worker had torch imported already")
        if hang:
            hung = [e for evs in events.values() for e in evs if e["kind"] == "worker.hung"]
            dumped = [e for evs in events.values() for e in evs if e["kind"] == "hang.dumped"]
            for e in hung + dumped:
                print("  ", json.dumps({k: e.get(k) for k in (
                    "kind", "rank", "silent_s", "state", "cpu_percent", "step", "dump_s",
                    "ranks", "dump")}))
            if not hung or not dumped:
                problems.append(f"{name}: the hang was not detected and dumped")
            for dump in out.glob(f"jobs/{name}-*/nodes/*/hangs/*/*"):
                if dump.is_file() and dump.stat().st_size:
                    text = dump.read_text(errors="replace")
                    print(f"  dump {dump.name} ({len(text)} chars):")
                    print("    " + "\n    ".join(text.splitlines()[:25]))
    for p in problems:
        print("PROBLEM:", p)
    print("gpu check:", "FAILED" if problems else "passed")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
