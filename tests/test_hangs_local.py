"""Hung ranks in local mode, for real: 2 simulated nodes x 1 gloo DDP worker, a fault injected
into rank 1 (SIGSTOP, a Python deadlock, an endless loop). Without hang detection each of these
jobs waits forever (gloo's timeout in the script is 10 min, the test's 300 s); with it, the hung
rank is found within ``hang_timeout`` + 15 s, every rank's stack is dumped on both nodes, and
the job restarts and finishes from its checkpoint. A legitimate long step shorter than
``hang_timeout`` is left alone.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from hpc_elastic.jobdir import JobDir
from hpc_elastic.telemetry import read_jsonl
from tests.polling import wait_for

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "tests" / "hang_helpers" / "train_ddp.py"
pytestmark = pytest.mark.slow

HANG_TIMEOUT = 6.0


def run_job(root: Path, fault: str, *extra: str, steps: int = 30, timeout: float = 300,
            max_restarts: int = 2, sets: list[str] | None = None, nodes: int = 2
            ) -> tuple[subprocess.CompletedProcess, JobDir]:
    """Submit the DDP script locally (2 nodes x 1 worker) and wait for the end."""
    job = root / "job.yaml"
    job.write_text(
        f"name: hang\nnodes: {nodes}\nnproc_per_node: 1\n"
        f"entrypoint: {SCRIPT} --steps {steps} --step-sleep 0.05 --fault {fault} "
        f"--fault-rank 1 --fault-step 8 {' '.join(extra)}\n"
        f"max_restarts: {max_restarts}\nhang_timeout: {HANG_TIMEOUT}\njob_root: {root / 'jobs'}\n"
        "env:\n  OMP_NUM_THREADS: 1\nrendezvous:\n  last_call_timeout: 1\n")
    args = [sys.executable, "-m", "hpc_elastic", "submit", str(job), "--local"]
    # A restarted group may take > 20 s to import torch on a busy machine: judge its start
    # with a margin (the storm test sets its own).
    for item in ["hang_startup_timeout=240", *(sets or [])]:
        args += ["--set", item]
    launcher = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = launcher.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_local_job(root / "jobs")
        launcher.kill()
        out, err = launcher.communicate()
        pytest.fail(f"the job hung for {timeout:g} s:\n{(out + err)[-3000:]}")
    (path,) = (root / "jobs").iterdir()
    return subprocess.CompletedProcess(args, launcher.returncode, out, err), JobDir(path)


def stop_local_job(jobs: Path) -> None:
    """SIGKILL a hung local job's agents and their workers (the agents run in their own
    sessions, so killing the launcher leaves them behind)."""
    for agents in jobs.glob("*/local-agents.json"):
        for pid in json.loads(agents.read_text())["pids"]:
            children = Path(f"/proc/{pid}/task/{pid}/children")
            kids = children.read_text().split() if children.exists() else []
            for victim in [*map(int, kids), pid]:
                with contextlib.suppress(OSError):
                    os.kill(victim, signal.SIGKILL)


def events(jobdir: JobDir, kind: str) -> list[dict]:
    return [e for node in jobdir.node_names() for e in read_jsonl(jobdir.events(node))
            if e["kind"] == kind]


def summary(jobdir: JobDir) -> dict:
    out = subprocess.run([sys.executable, "-m", "hpc_elastic", "logs", "summary",
                          str(jobdir.path), "--json"], capture_output=True, text=True, timeout=60)
    return json.loads(out.stdout)


def check_hang_handled(result: subprocess.CompletedProcess, jobdir: JobDir,
                       culprit_state: set[str]) -> dict:
    """The checks every hang kind shares; returns the culprit's dump header."""
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    injected_at = float((jobdir.checkpoints / "injected").read_text().split()[0])
    assert (jobdir.checkpoints / "step.txt").read_text() == "30", "the job did not finish"

    hung = events(jobdir, "worker.hung")
    assert hung and all(e["silent_s"] >= HANG_TIMEOUT for e in hung), hung
    dumped = events(jobdir, "hang.dumped")
    assert sorted(e["node"] for e in dumped) == ["local0", "local1"], "stacks from every node"
    assert len({e["stamp"] for e in dumped}) == 1
    # Detection and every node's dumps within hang_timeout + 15 s of the fault.
    assert max(e["time"] for e in dumped) - injected_at <= HANG_TIMEOUT + 15, (
        max(e["time"] for e in dumped) - injected_at)
    ranks = {r["rank"]: r for e in dumped for r in e["ranks"]}
    assert sorted(ranks) == [0, 1]
    for rank, info in ranks.items():
        text = (jobdir.path / info["dump"]).read_text()
        assert "train_ddp.py" in text, f"rank {rank}'s dump has no stack:\n{text}"
    assert ranks[1]["state"] in culprit_state, ranks[1]
    # The restart came from the hang: one more group start on each node.
    assert len(events(jobdir, "workers.restart")) == 2

    # The analysis names rank 1 on its node as the culprit, whichever node noticed first.
    s = summary(jobdir)
    assert s["status"] == "succeeded"
    root = s["root_cause"]
    assert root["kind"] == "hang" and root["rank"] == 1 and root["node"] == ranks[1]["node"], root
    assert root["message"].startswith(f"hang: rank 1 (node {ranks[1]['node']}) "), root
    assert "rank(s) 0 waited in backward" in root["message"], root
    (hang,) = s["hangs"]
    assert sorted(hang["dump_dirs"]) == [f"nodes/{n}/hangs/{hang['stamp']}"
                                         for n in ("local0", "local1")]
    text = logs(jobdir, "failures")
    assert "HANG" in text and f"stacks: nodes/{ranks[1]['node']}/hangs/" in text, text
    assert "/restart-0/rank-1/stderr.log" in text, "the culprit's own stderr"
    text = logs(jobdir, "hangs")
    assert f"hang {hang['stamp']}: rank 1 (node {ranks[1]['node']})" in text, text
    assert text.count("main thread, innermost first") == 2, "two different stacks, two groups"
    return ranks[1]


def logs(jobdir: JobDir, command: str) -> str:
    out = subprocess.run([sys.executable, "-m", "hpc_elastic", "logs", command,
                          str(jobdir.path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_frozen_rank_sigstop_is_detected_dumped_and_restarted(tmp_path: Path) -> None:
    result, jobdir = run_job(tmp_path, "stop")
    culprit = check_hang_handled(result, jobdir, {"T"})
    assert "main (hang_helpers/train_ddp.py" in (jobdir.path / culprit["dump"]).read_text()
    assert "was stopped (state T) in hang_helpers/train_ddp.py" in summary(jobdir)[
        "root_cause"]["message"]


def test_python_deadlock_is_detected_dumped_and_restarted(tmp_path: Path) -> None:
    result, jobdir = run_job(tmp_path, "deadlock")
    culprit = check_hang_handled(result, jobdir, {"S"})
    assert "deadlock (hang_helpers/train_ddp.py" in (jobdir.path / culprit["dump"]).read_text()


def test_endless_loop_is_detected_dumped_and_restarted(tmp_path: Path) -> None:
    result, jobdir = run_job(tmp_path, "loop")
    culprit = check_hang_handled(result, jobdir, {"R", "S"})
    # It burns CPU while the rank waiting for it does not (the share depends on the machine's
    # load: 16 % was seen on 2 busy cores, so the test compares, not a fixed number).
    (peer,) = [r for e in events(jobdir, "hang.dumped") for r in e["ranks"] if r["rank"] == 0]
    assert culprit["cpu_percent"] > 5 * max(peer["cpu_percent"], 1.0), (culprit, peer)
    assert "spin_forever (hang_helpers/train_ddp.py" in (
        jobdir.path / culprit["dump"]).read_text()


def test_faulthandler_fallback_dumps_a_deadlocked_rank(tmp_path: Path) -> None:
    """Without py-spy the workers' own faulthandler answers the stack signal."""
    os.environ["HPC_ELASTIC_STACK_TOOL"] = "faulthandler"
    try:
        result, jobdir = run_job(tmp_path, "deadlock")
    finally:
        del os.environ["HPC_ELASTIC_STACK_TOOL"]
    culprit = check_hang_handled(result, jobdir, {"S"})
    text = (jobdir.path / culprit["dump"]).read_text()
    assert "stack by faulthandler" in text and 'line' in text and "in deadlock" in text, text


def test_long_legitimate_step_below_hang_timeout_is_not_a_hang(tmp_path: Path) -> None:
    result, jobdir = run_job(tmp_path, "long", f"--long-s {HANG_TIMEOUT * 0.5}")
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert not events(jobdir, "worker.hung")
    assert not events(jobdir, "hang.dumped")
    assert not events(jobdir, "workers.restart")


def test_restart_storm_same_exception_stops_after_the_limit(tmp_path: Path) -> None:
    """The same ValueError at the same line on every start: with max_restarts 5 and
    same_failure_limit 3 the job fails after the third failure, not the sixth."""
    result, jobdir = run_job(tmp_path, "raise", "--every-start", max_restarts=5,
                             sets=["same_failure_limit=3"], timeout=450)
    assert result.returncode != 0
    stopped = events(jobdir, "restarts.stopped")
    assert stopped and all(e["repeats"] == 3 for e in stopped), stopped
    assert any("ValueError at hang_helpers/train_ddp.py:" in e["cause"] for e in stopped), stopped
    assert len(events(jobdir, "workers.restart")) == 2 * 2, "2 restarts on each node, then stop"
    s = summary(jobdir)
    assert s["status"] == "failed"
    assert any("the same failure repeated 3 times: ValueError at hang_helpers/train_ddp.py:"
               in r["reason"] for r in s["restarts_stopped"]), s["restarts_stopped"]
    assert "restarts stopped on " in logs(jobdir, "summary")


def test_restart_storm_same_hang_stops_after_the_limit(tmp_path: Path) -> None:
    """The restarted group deadlocks again before its first step: judged from its start
    (hang_startup_timeout), it is a hang too, the same one, and the second stops restarts."""
    result, jobdir = run_job(tmp_path, "deadlock", "--every-start", max_restarts=5,
                             sets=["same_failure_limit=2", "hang_startup_timeout=30"],
                             timeout=300)
    assert result.returncode != 0
    assert len({e["stamp"] for e in events(jobdir, "hang.dumped")}) == 2
    assert any(e["before_first_step"] for e in events(jobdir, "worker.hung"))
    stopped = events(jobdir, "restarts.stopped")
    assert stopped and all(e["cause"].startswith("hang: ") for e in stopped), stopped
    assert any("hang_helpers/train_ddp.py" in e["cause"] and "(deadlock)" in e["cause"]
               for e in stopped), stopped


def test_straggler_node_is_flagged_and_a_healthy_run_is_not(tmp_path: Path) -> None:
    """3 nodes x 1 rank burn CPU every step; rank 1 burns twice as much. Wall step times are
    equal (DDP waits for the slowest); busy times are not: rank 1's node flags itself, the
    others never do. Windows of 2 s (HPC_ELASTIC_STEP_WINDOW) keep the test short."""
    result, jobdir = run_job(
        tmp_path, "slow", "--work-s 0.02 --slow-factor 2.0", steps=200, nodes=3,
        sets=["env.HPC_ELASTIC_STEP_WINDOW=2", "stragglers=exclude"], timeout=400)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    flags = events(jobdir, "node.straggler")
    started = {e["rank"]: e["node"] for e in events(jobdir, "worker.started")}
    assert flags and {e["node"] for e in flags} == {started[1]}, flags
    first = flags[0]
    assert first["ratio"] >= 1.5 and first["windows"] <= 3, first
    assert first["policy"] == "exclude" and first["action"].startswith("excluded"), first
    # No restart came, so the flagged node trained to the end; the next requeue would skip it.
    assert (jobdir.path / "excluded" / f"{started[1]}.json").exists()
    s = summary(jobdir)
    (straggler,) = s["stragglers"]
    assert straggler["node"] == started[1] and straggler["ranks"] == [1], straggler
    assert f"straggler: node {started[1]}" in logs(jobdir, "summary")
    metrics = [m for n in jobdir.node_names() for m in read_jsonl(
        jobdir.worker_logs(n, 0, 0, next(r for r, nn in started.items() if nn == n))
        / "metrics.jsonl")]
    assert {m["name"] for m in metrics} >= {"step_time_s", "step_busy_s"}


def test_straggler_excluded_leaves_at_the_next_restart(tmp_path: Path) -> None:
    """stragglers: exclude on an elastic job (nodes 2:3): the slow node is flagged and recorded
    in excluded/; when a healthy rank then dies, the group restarts without the slow node (it
    leaves instead of rejoining, like a lost node), and the other two finish."""
    job = tmp_path / "job.yaml"
    job.write_text(
        f"name: strag\nnodes: '2:3'\nnproc_per_node: 1\n"
        f"entrypoint: {SCRIPT} --steps 100000 --step-sleep 0.01 --fault slow --work-s 0.02 "
        "--slow-factor 2.0 --slow-until-restart\n"
        f"max_restarts: 2\nstragglers: exclude\njob_root: {tmp_path / 'jobs'}\n"
        "env:\n  OMP_NUM_THREADS: 1\n  HPC_ELASTIC_STEP_WINDOW: 2\n"
        "rendezvous:\n  last_call_timeout: 1\n")
    launcher = subprocess.Popen([sys.executable, "-m", "hpc_elastic", "submit", str(job),
                                 "--local"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
    try:
        def flagged() -> list[dict]:
            dirs = list((tmp_path / "jobs").glob("strag-*"))
            return dirs and events(JobDir(dirs[0]), "node.straggler")

        flags = wait_for("a straggler flag", flagged, 240)
        (jobdir_path,) = (tmp_path / "jobs").glob("strag-*")
        jobdir = JobDir(jobdir_path)
        slow_node = flags[0]["node"]
        started = events(jobdir, "worker.started")
        (victim,) = [e for e in started if e["rank"] == 0]
        assert victim["node"] != slow_node, (victim, slow_node)
        # The run is long on purpose: a healthy rank dies now, and after the restart (without
        # the slow node) the step counter is set to the end so the others finish at once.
        os.kill(int(victim["worker_id"]), signal.SIGKILL)
        (jobdir.checkpoints / "step.txt").write_text("99990")
        out, err = launcher.communicate(timeout=240)
    finally:
        if launcher.poll() is None:
            stop_local_job(tmp_path / "jobs")
            launcher.kill()
            launcher.communicate()
    assert launcher.returncode == 0, (out + err)[-3000:]
    excluded = json.loads((jobdir.path / "excluded" / f"{slow_node}.json").read_text())
    assert excluded["reason"].startswith("straggler: its ranks needed "), excluded
    last = {n: list(read_jsonl(jobdir.events(n)))[-1] for n in jobdir.node_names()}
    assert last[slow_node]["kind"] == "agent.left" and last[slow_node]["excluded"], last
    assert all(e["kind"] == "agent.succeeded" for n, e in last.items() if n != slow_node), last
    rounds = events(jobdir, "rendezvous.completed")
    assert max(rounds, key=lambda e: e["time"])["world_size"] == 2, "re-formed without it"
    s = summary(jobdir)
    assert s["status"] == "succeeded"
    assert [x["node"] for x in s["excluded_nodes"]] == [slow_node]
