"""Node loss in local mode: the rank-0 node's agent and workers are SIGKILLed mid-run; the
survivors re-form as 2 nodes and finish, and ``logs summary`` tells exactly that: the killed node
is the root cause, the survivors' gloo errors follow from it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hpc_elastic.jobdir import JobDir
from hpc_elastic.telemetry import read_jsonl

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def events(jobdir: JobDir, node: str) -> list[dict]:
    return list(read_jsonl(jobdir.events(node))) if jobdir.events(node).exists() else []


def test_rank0_node_killed_survivors_finish_and_summary_says_so(tmp_path: Path) -> None:
    launcher = subprocess.Popen(
        [sys.executable, "-m", "hpc_elastic", "submit", str(REPO / "examples" / "demo.yaml"),
         "--local", "--set", f"job_root={tmp_path}", "--set", "nodes=2:3",
         "--set", "nproc_per_node=1",  # 3 nodes: 3 workers importing torch, not 6, per start
         "--set", "entrypoint.args=[--epochs, 4, --steps-per-epoch, 10, --step-sleep, 0.1]",
         "--set", "rendezvous.heartbeat_interval=0.5", "--set", "rendezvous.heartbeat_timeout=2",
         "--set", "rendezvous.last_call_timeout=1"],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 90
        jobdir: JobDir | None = None
        while time.monotonic() < deadline:
            dirs = [p for p in tmp_path.iterdir() if p.is_dir()]
            if dirs and (Path(dirs[0]) / "checkpoints" / "last.pt").exists():
                jobdir = JobDir(dirs[0])  # training runs: epoch 0 was checkpointed
                break
            time.sleep(0.3)
        assert jobdir is not None, "training did not start"
        agents = json.loads((jobdir.path / "local-agents.json").read_text())["pids"]
        victim = next(n for n in jobdir.node_names() if any(
            e["kind"] == "worker.started" and e.get("rank") == 0 for e in events(jobdir, n)))
        victim_workers = [int(e["worker_id"]) for e in events(jobdir, victim)
                          if e["kind"] == "worker.started"]
        killed_at = time.time()
        for pid in [agents[int(victim.removeprefix("local"))], *victim_workers]:
            os.kill(pid, signal.SIGKILL)

        output, _ = launcher.communicate(timeout=150)
        assert launcher.returncode == 0, output[-4000:]
    finally:
        if launcher.poll() is None:
            launcher.kill()

    survivors = [n for n in jobdir.node_names() if n != victim]
    assert len(survivors) == 2
    for node in survivors:
        after = [e for e in events(jobdir, node) if e["time"] > killed_at]
        assert any(e["kind"] == "rendezvous.completed" and e.get("world_size") == 2
                   for e in after), f"{node} did not re-form as 2 nodes"
        assert after[-1]["kind"] == "agent.succeeded"

    summary = json.loads(subprocess.run(
        [sys.executable, "-m", "hpc_elastic", "logs", "summary", str(jobdir.path), "--json"],
        capture_output=True, text=True, timeout=60).stdout)
    assert summary["status"] == "succeeded"
    assert sorted(summary["nodes"]) == sorted(jobdir.node_names())
    rounds = summary["rendezvous_rounds"]
    assert sorted(rounds[0]["participants"]) == sorted(jobdir.node_names())
    assert sorted(rounds[-1]["participants"]) == sorted(survivors)
    health = {h["node"]: h["ended"] for h in summary["node_health"]}
    assert health[victim] == "vanished"
    assert all(health[n] == "ok" for n in survivors)

    # The root cause is the killed node, not a survivor's "Connection closed by peer".
    root = summary["root_cause"]
    assert root["kind"] == "node_lost" and root["node"] == victim, summary["root_causes"]
    assert root["message"].startswith(f"node {victim} lost: "), root
    (loss,) = summary["node_losses"]
    if loss["heartbeat_lost_at"] is not None:  # a survivor declared it dead (heartbeat_timeout 2)
        assert abs(loss["heartbeat_lost_at"] - killed_at) < 2.0, (loss, killed_at)
    assert summary["failures"] and not any(f["root"] for f in summary["failures"])
    assert {f["node"] for f in summary["failures"]} <= set(survivors)
    assert all(f["secondary_to"] == {"kind": "node_lost", "node": victim, "rank": None}
               for f in summary["failures"]), summary["failures"]
    text = subprocess.run(
        [sys.executable, "-m", "hpc_elastic", "logs", "summary", str(jobdir.path)],
        capture_output=True, text=True, timeout=60).stdout
    assert f"node {victim} lost: " in text.split("root causes:")[1].split("node health:")[0]
