"""The --wait display's incremental reading of the agents' event files."""

from __future__ import annotations

import io
import json
from pathlib import Path

from hpc_elastic.jobdir import JobDir
from hpc_elastic.progress import EventsTail, follow_job


def append(jobdir: JobDir, node: str, *events: dict, partial: str = "") -> None:
    path = jobdir.events(node)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write("".join(json.dumps(e) + "\n" for e in events) + partial)


def test_tail_reads_only_new_whole_lines_and_counts_a_restart_once(tmp_path: Path) -> None:
    jobdir = JobDir(tmp_path)
    tail = EventsTail(jobdir)
    append(jobdir, "n1", {"kind": "workers.started"})
    append(jobdir, "n2", {"kind": "workers.started"}, partial='{"kind": "workers.rest')
    tail.poll()
    assert tail.running == {"n1", "n2"} and tail.restarts == 0
    with open(jobdir.events("n2"), "a") as f:  # the partial line is completed later
        f.write('art", "restart_count": 1}\n')
    append(jobdir, "n1", {"kind": "workers.restart", "restart_count": 1})
    tail.poll()
    assert tail.restarts == 1, "both nodes log the same group restart"
    append(jobdir, "n1", {"kind": "agent.succeeded"})
    tail.poll()
    assert tail.running == {"n2"}


def test_follow_job_prints_changes_and_returns_the_final_state(tmp_path: Path) -> None:
    jobdir = JobDir(tmp_path)
    append(jobdir, "n1", {"kind": "workers.started"})
    states = iter(["PENDING", "RUNNING", "RUNNING", "COMPLETED"])
    out = io.StringIO()
    final = follow_job("42", jobdir, poll_s=0, out=out, state_of=lambda _id: next(states))
    assert final == "COMPLETED"
    lines = out.getvalue().splitlines()
    assert [line.split()[2] for line in lines] == ["PENDING", "RUNNING", "COMPLETED"]
    assert "nodes training 1  restarts 0" in lines[1]
