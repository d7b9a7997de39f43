"""The batch supervisor's decisions (hpc_elastic/batch.py) with real agents and workers.

The supervisor runs ``hpc_elastic batch`` as Slurm's batch step would, but with Slurm's client
commands replaced by the small scripts in ``tests/fake_slurm/`` (``srun`` runs the command as
the named node on this machine; ``sinfo`` reports a node ``down*`` once the test lists it in
``$FAKE_SLURM_DIR/down``). Agents, workers, rendezvous and job directory are the real ones. The
same scenarios on the real Slurm test cluster: tests/test_e2e_slurm.py (node loss).

Timeouts are generous: on the shared 2-core machine (load average 50-70 at times) three agents
took over 100 s to start.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from polling import wait_for

from hpc_elastic.config import load_config
from hpc_elastic.excluded import read_excluded
from hpc_elastic.jobdir import JobDir
from hpc_elastic.submit import Submission, create_jobdir, write_submission
from hpc_elastic.telemetry import read_jsonl

REPO = Path(__file__).resolve().parent.parent
FAKE_SLURM = Path(__file__).resolve().parent / "fake_slurm"
pytestmark = pytest.mark.slow
NODES = ["n1", "n2", "n3"]


def make_jobdir(tmp_path: Path, *overrides: str) -> JobDir:
    config = load_config(REPO / "examples" / "demo.yaml", [
        f"job_root={tmp_path}", "nodes=2:3", "nproc_per_node=1", "max_restarts=2",
        "entrypoint.args=[--epochs, 3, --steps-per-epoch, 10, --step-sleep, 0.15]",
        "rendezvous.heartbeat_interval=0.5", "rendezvous.heartbeat_timeout=2",
        "rendezvous.last_call_timeout=1", *overrides])
    jobdir = JobDir(tmp_path / "job")
    create_jobdir(config, jobdir)
    write_submission(jobdir, Submission("slurm", "77", time.time(), config.name))
    return jobdir


def start_batch(jobdir: JobDir, fake: Path, nodes: list[str]) -> subprocess.Popen[str]:
    fake.mkdir()
    env = {**os.environ, "PATH": f"{FAKE_SLURM}:{os.environ['PATH']}",
           "FAKE_SLURM_DIR": str(fake), "SLURM_JOB_ID": "77",
           "SLURM_JOB_NODELIST": ",".join(nodes), "SLURM_RESTART_COUNT": "0",
           # Node names of this test resolve nowhere: never let an agent ask DNS.
           "HPC_ELASTIC_NODE_ADDR": "127.0.0.1", "OMP_NUM_THREADS": "1",
           "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    return subprocess.Popen([sys.executable, "-m", "hpc_elastic", "batch", str(jobdir.path)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def events(jobdir: JobDir, node: str) -> list[dict[str, Any]]:
    return list(read_jsonl(jobdir.events(node))) if jobdir.events(node).exists() else []


def batch_events(jobdir: JobDir) -> list[dict[str, Any]]:
    return list(read_jsonl(jobdir.supervisor_events("77", 0)))


def kill_agent(jobdir: JobDir, node: str) -> None:
    """SIGKILL the node's current agent and its workers, as a power cut would."""
    starts = [e for e in events(jobdir, node) if e["kind"] == "agent.start"]
    agent = int(starts[-1]["pid"])
    workers = [int(e["worker_id"]) for e in events(jobdir, node)
               if e["kind"] == "worker.started" and e["time"] >= starts[-1]["time"]]
    for pid in [agent, *workers]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def training(jobdir: JobDir) -> bool:
    return (jobdir.checkpoints / "last.pt").exists() and all(
        any(e["kind"] == "worker.started" for e in events(jobdir, n)) for n in NODES)


def summary(jobdir: JobDir) -> dict[str, Any]:
    """``logs summary --json`` (and the text printed, for ``-s`` runs); its time split must add
    up to the wall time."""
    text = subprocess.run([sys.executable, "-m", "hpc_elastic", "logs", "summary",
                           str(jobdir.path)], capture_output=True, text=True, timeout=60).stdout
    print(text)
    out = subprocess.run([sys.executable, "-m", "hpc_elastic", "logs", "summary",
                          str(jobdir.path), "--json"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    s = json.loads(out.stdout)
    assert abs(sum(s["time_split_s"].values()) - s["wall_s"]) < 0.01, s["time_split_s"]
    return s


def finish(batch: subprocess.Popen[str], fake: Path, timeout: float = 400) -> str:
    """The supervisor's output once it ended. Whatever is left of the test's processes (a fake
    srun, an agent, its workers: they hold the output pipe open) is killed afterwards, so a
    failing test fails instead of waiting for ever on that pipe."""
    try:
        output, _ = batch.communicate(timeout=timeout)
    finally:
        if batch.poll() is None:
            batch.kill()
        kill_tagged(f"FAKE_SLURM_DIR={fake}")
    return output


def kill_tagged(tag: str) -> list[int]:
    """SIGKILL every process whose environment holds ``tag`` (this test's FAKE_SLURM_DIR,
    inherited by the fake srun, the agents and their workers): by PID, nothing else."""
    killed = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if tag.encode() in environ:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(proc.name), signal.SIGKILL)
                killed.append(int(proc.name))
    return killed


def test_lost_node_ends_only_its_step_costs_one_restart_and_is_excluded(
        tmp_path: Path) -> None:
    """A node is lost (its agent and workers die, Slurm reports it down): only its step ends;
    the survivors' agents are never started again, re-form once and finish; the node is
    excluded and recorded."""
    jobdir = make_jobdir(tmp_path)
    fake = tmp_path / "fake"
    batch = start_batch(jobdir, fake, NODES)
    try:
        wait_for("3 nodes training after a checkpoint", lambda: training(jobdir), timeout=300)
        (fake / "down").write_text("n2\n")
        kill_agent(jobdir, "n2")
    finally:
        output = finish(batch, fake)
    assert batch.returncode == 0, output
    kinds = [(e["kind"], e.get("node")) for e in batch_events(jobdir)]
    assert ("node.excluded", "n2") in kinds and not [k for k in kinds if k[0] == "step.relaunched"]
    assert [k for k in kinds if k[0] == "step.started"] == [
        ("step.started", n) for n in NODES], "a survivor's step was started again"
    assert [r.node for r in read_excluded(jobdir)] == ["n2"]
    for node in ("n1", "n3"):
        assert [e["kind"] for e in events(jobdir, node)].count("agent.start") == 1
        assert events(jobdir, node)[-1]["kind"] == "agent.succeeded"
    s = summary(jobdir)
    assert s["status"] == "succeeded"
    assert s["restarts"] == 1, s["rendezvous_rounds"]
    assert sorted(s["rendezvous_rounds"][-1]["participants"]) == ["n1", "n3"]
    (restart,) = s["disruptions"]
    assert restart["kind"] == "restart" and 0 < restart["cost_s"] < 30
    assert s["step_relaunches"] == 0 and s["generations"] == 1
    assert [x["node"] for x in s["excluded_nodes"]] == ["n2"]
    assert any(c["kind"] == "node_lost" and c["node"] == "n2" for c in s["root_causes"])


def test_vanished_agent_on_a_live_node_is_relaunched_once_then_excluded(tmp_path: Path) -> None:
    """The node stays up but its agent dies: its step starts again (launch 1) and the new agent
    joins the running rendezvous; when that one dies too, the node is excluded."""
    jobdir = make_jobdir(tmp_path, "entrypoint.args=[--epochs, 5, --steps-per-epoch, 10, "
                         "--step-sleep, 0.15]")
    fake = tmp_path / "fake"
    batch = start_batch(jobdir, fake, NODES)
    try:
        wait_for("3 nodes training after a checkpoint", lambda: training(jobdir), timeout=300)
        kill_agent(jobdir, "n3")

        def relaunched_trains() -> bool:
            starts = [e for e in events(jobdir, "n3") if e["kind"] == "agent.start"]
            return len(starts) == 2 and any(
                e["kind"] == "worker.started" and e["time"] > starts[-1]["time"]
                for e in events(jobdir, "n3"))
        wait_for("n3's relaunched agent training", relaunched_trains, timeout=240)
        kill_agent(jobdir, "n3")
    finally:
        output = finish(batch, fake)
    assert batch.returncode == 0, output
    kinds = [(e["kind"], e.get("node")) for e in batch_events(jobdir)]
    assert kinds.count(("step.relaunched", "n3")) == 1, kinds
    assert ("node.excluded", "n3") in kinds
    launches = [e.get("launch") for e in events(jobdir, "n3") if e["kind"] == "agent.start"]
    assert launches == [0, 1]
    (record,) = read_excluded(jobdir)
    assert record.node == "n3" and "vanished 2 times" in record.reason
    s = summary(jobdir)
    assert s["status"] == "succeeded" and s["step_relaunches"] == 1
    (relaunch,) = [d for d in s["disruptions"] if d["kind"] == "relaunch"]
    assert relaunch["nodes"] == ["n3"] and relaunch["cost_s"] is not None
    # Both of n3's agents were lost: the first one (replaced by the relaunch) too.
    assert [c["node"] for c in s["root_causes"] if c["kind"] == "node_lost"] == ["n3", "n3"]


def test_requeued_attempt_excludes_a_dead_batch_host_and_asks_slurm_to(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Attempt 0's supervisor left no ``batch.end`` (its node died with it) and Slurm reports
    that node down: attempt 1 excludes it and does not start an agent there. Slurm still counts
    n2 up, but the agents' events show it lost in attempt 0 (the others declared it dead and
    re-formed without it, the analysis' ``node_lost``): excluded too. The one node left is below
    ``min_nodes``, so it starts none and says why. A requeue then asks Slurm to leave the
    excluded nodes out of the next allocation (``ExcNodeList``)."""
    from test_analysis import lost_n2_run, write_events

    jobdir = make_jobdir(tmp_path)
    jobdir.supervisor.mkdir()
    jobdir.supervisor_events("77", 0).write_text(json.dumps(
        {"v": 1, "time": time.time(), "kind": "batch.start", "host": "n1"}) + "\n")
    for node, lines in lost_n2_run(heartbeat=True).items():
        write_events(jobdir, node, lines)
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "down").write_text("n1\n")
    env = {**os.environ, "PATH": f"{FAKE_SLURM}:{os.environ['PATH']}",
           "FAKE_SLURM_DIR": str(fake), "SLURM_JOB_ID": "77", "SLURM_JOB_NODELIST": "n1,n2,n3",
           "SLURM_RESTART_COUNT": "1", "SLURMD_NODENAME": "n3"}
    out = subprocess.run([sys.executable, "-m", "hpc_elastic", "batch", str(jobdir.path)],
                         env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "n1 excluded from this run: the batch host of attempt 0 died" in out.stdout
    assert "n2 excluded from this run: the analysis finds it lost in attempt 0: node n2 lost: " \
        "no heartbeat since" in out.stdout
    assert "only 1 usable node(s), min 2" in out.stdout
    assert [(r.node, r.attempt) for r in read_excluded(jobdir)] == [("n1", 0), ("n2", 0)]
    assert not list(jobdir.slurm_logs.glob("*_log.out")), "an agent step was started"

    from hpc_elastic.batch import BatchLog, _exclude_from_next_attempt
    monkeypatch.setenv("PATH", env["PATH"])
    monkeypatch.setenv("FAKE_SLURM_DIR", str(fake))
    _exclude_from_next_attempt(jobdir, "77", BatchLog(jobdir, "77", 1))
    calls = (fake / "calls").read_text().splitlines()
    assert "scontrol update JobId=77 ExcNodeList=n1,n2" in calls


def test_too_few_nodes_left_requeues_the_job_without_the_lost_node(tmp_path: Path) -> None:
    """2 nodes, ``min_nodes`` 2: one is lost. The survivor alone could only wait for
    ``join_timeout``, so the supervisor requeues the job (once: the attempt's requeue claim)
    and, once Slurm ends the attempt (SIGTERM, sent here by the test), asks Slurm to leave the
    lost node out of the next allocation."""
    jobdir = make_jobdir(tmp_path, "nodes=2:3")
    fake = tmp_path / "fake"
    batch = start_batch(jobdir, fake, ["n1", "n2"])
    try:
        wait_for("2 nodes training after a checkpoint", lambda: (
            jobdir.checkpoints / "last.pt").exists() and all(
            any(e["kind"] == "worker.started" for e in events(jobdir, n)) for n in ["n1", "n2"]),
            timeout=300)
        (fake / "down").write_text("n2\n")
        kill_agent(jobdir, "n2")
        wait_for("the supervisor's requeue", lambda: (fake / "calls").exists()
                 and "scontrol requeue 77" in (fake / "calls").read_text(), timeout=120)
        batch.send_signal(signal.SIGTERM)  # what Slurm does to the batch step after a requeue
    finally:
        output = finish(batch, fake, timeout=200)
    assert batch.returncode == 128 + signal.SIGTERM, output
    calls = (fake / "calls").read_text().splitlines()
    assert calls.count("scontrol requeue 77") == 1
    assert "scontrol update JobId=77 ExcNodeList=n2" in calls
    assert (jobdir.path / "requeue" / "attempt-0").exists()
    assert events(jobdir, "n1")[-1]["kind"] == "shutdown"  # stopped, not failed
    assert summary(jobdir)["requeues"] == 1


def test_hot_spare_takes_the_lost_nodes_place_in_the_next_round(tmp_path: Path) -> None:
    """``nodes: 2``, ``spares: 1`` on 3 nodes: two train, the third's agent stands by in the
    rendezvous -- longer than ``join_timeout`` without giving up. When a training node is lost,
    the spare is in the very next round: the world size stays 2, one restart, one spare swap."""
    jobdir = make_jobdir(tmp_path, "nodes=2", "spares=1", "rendezvous.join_timeout=8",
                         "entrypoint.args=[--epochs, 15, --steps-per-epoch, 10, "
                         "--step-sleep, 0.2]")
    fake = tmp_path / "fake"
    batch = start_batch(jobdir, fake, NODES)

    def trainers() -> list[str]:
        return [n for n in NODES if any(e["kind"] == "worker.started" for e in events(jobdir, n))]
    try:
        wait_for("2 nodes training after a checkpoint", lambda: len(trainers()) == 2 and (
            jobdir.checkpoints / "last.pt").exists(), timeout=300)
        (spare,) = [n for n in NODES if n not in trainers()]
        time.sleep(10)  # the spare stands by past join_timeout (8 s)
        assert batch.poll() is None and trainers() == [n for n in NODES if n != spare]
        victim = trainers()[0]
        (fake / "down").write_text(f"{victim}\n")
        kill_agent(jobdir, victim)
    finally:
        output = finish(batch, fake)
    assert batch.returncode == 0, output
    s = summary(jobdir)
    assert s["status"] == "succeeded"
    rounds = s["rendezvous_rounds"]
    assert {r["world_size"] for r in rounds} == {2}, rounds
    assert sorted(rounds[-1]["participants"]) == sorted(n for n in NODES if n != victim)
    assert s["restarts"] == 1 and s["spare_swaps"] == 1
    (restart,) = s["disruptions"]
    assert restart["swapped_in"] == [spare] and restart["left"] == [victim]
