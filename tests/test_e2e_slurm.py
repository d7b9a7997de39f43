"""End-to-end fault scenarios on the real multi-node Slurm test cluster (issue #7).

Each test drives ``python -m hpc_elastic submit`` with ``examples/train.py`` and checks three
things a user relies on: the final outcome, resume from the checkpoint where there is one, and
that ``logs summary --json`` tells exactly what happened -- plus that no process of the job is
left on any node afterwards. Scenarios covered elsewhere: preemption
(tests/test_preemption.py, Slurm variant), the torchrun path (tests/test_sbatch_scripts.py),
cancel (tests/test_jobs.py). What a user sees in each case: docs/fault-tolerance.md.
"""

from __future__ import annotations

import contextlib
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e_helpers import (
    RESUMED,
    assert_nothing_left,
    env_of,
    job_id_of,
    node_events,
    rank0_node,
    slurm_logs,
    submit_args,
    submit_wait,
    summary_json,
    summary_text,
    the_jobdir,
    training_nodes,
)
from polling import wait_for
from slurm_cluster.fixture import SlurmCluster

from hpc_elastic.jobdir import JobDir

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


# -- 1. happy path ---------------------------------------------------------------------------

def test_happy_path_three_nodes_one_round_no_restart(
    slurm_cluster: SlurmCluster, tmp_path: Path
) -> None:
    t0 = time.monotonic()
    result = submit_wait(slurm_cluster, tmp_path, "--set", "nodes=3", "--set", "nproc_per_node=2",
                         "--set", "entrypoint.args=[--epochs, 2, --steps-per-epoch, 5]")
    jobdir = the_jobdir(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr + slurm_logs(jobdir)
    summary = summary_json(jobdir)
    summary_text(jobdir)
    assert summary["job_id"] == job_id_of(jobdir)
    assert summary["status"] == "succeeded"
    assert summary["restarts"] == 0 and summary["attempts"] == 1
    assert len(summary["nodes"]) == 3 and set(summary["nodes"]) <= set(slurm_cluster.nodes)
    (only,) = summary["rendezvous_rounds"]
    assert sorted(only["participants"]) == sorted(summary["nodes"])
    assert not [f for f in summary["failures"]]
    assert_nothing_left(slurm_cluster, jobdir)
    print(f"happy path: {time.monotonic() - t0:.1f} s")


# -- 2. worker crash -------------------------------------------------------------------------

def test_worker_crash_one_restart_resumes_and_finishes(
    slurm_cluster: SlurmCluster, tmp_path: Path
) -> None:
    result = submit_wait(slurm_cluster, tmp_path, "--set", "nodes=2", "--set", "max_restarts=2",
                         "--set", "entrypoint.args=[--epochs, 2, --steps-per-epoch, 5,"
                         " --fail-at-step, 7, --fail-rank, 1]")
    jobdir = the_jobdir(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr + slurm_logs(jobdir)
    summary = summary_json(jobdir)
    summary_text(jobdir)
    assert summary["job_id"] == job_id_of(jobdir) and summary["status"] == "succeeded"
    assert summary["restarts"] == 1 and summary["attempts"] == 1
    assert set(summary["nodes"]) <= set(slurm_cluster.nodes) and len(summary["nodes"]) == 2
    (root,) = [f for f in summary["failures"] if f.get("root")]
    assert root["message"] == "RuntimeError: injected failure at global step 7 on rank 1"
    assert root["rank"] == 1 and root["node"] in slurm_cluster.nodes
    # The restarted group resumed from epoch 0's checkpoint (global step 5), not from 0.
    resumed = [RESUMED.search(p.read_text()) for p in
               jobdir.path.glob("nodes/*/workers/attempt-0/restart-1/rank-0/stdout.log")]
    assert [m.group(3) for m in resumed if m] == ["5"]
    assert_nothing_left(slurm_cluster, jobdir)


# -- 5. restarts exhausted -------------------------------------------------------------------

def test_restarts_exhausted_job_fails_with_the_root_cause(
    slurm_cluster: SlurmCluster, tmp_path: Path
) -> None:
    result = submit_wait(slurm_cluster, tmp_path, "--set", "nodes=2", "--set", "max_restarts=1",
                         "--set", "entrypoint.args=[--epochs, 2, --steps-per-epoch, 5,"
                         " --fail-at-step, 3, --fail-rank, 1, --fail-always]")
    jobdir = the_jobdir(tmp_path)
    assert result.returncode != 0, result.stdout + result.stderr
    summary = summary_json(jobdir)
    summary_text(jobdir)
    assert summary["status"] == "failed"
    assert summary["restarts"] == 1
    # Each of the 2 runs (first + 1 restart) failed at its root on the same rank.
    roots = [f for f in summary["failures"] if f.get("root")]
    assert len(roots) == 2 and {f["rank"] for f in roots} == {1}
    assert {f["message"] for f in roots} == {
        "RuntimeError: injected failure at global step 3 on rank 1"}
    assert_nothing_left(slurm_cluster, jobdir)


# -- 3. node loss ----------------------------------------------------------------------------

def start_three_nodes(cluster: SlurmCluster, job_root: Path
                      ) -> tuple[subprocess.Popen[str], JobDir, str, list[str], str | None]:
    """Submit ``nodes: 2:3`` with ``--wait`` and return once 3 nodes train: the launcher, the
    job directory, the batch host, the nodes, the rank-0 node. No ``ntasks``: with 4 idle
    nodes Slurm gives the job its maximum, 3."""
    launcher = subprocess.Popen(
        submit_args(job_root, "--wait", "--set", "nodes=2:3", "--set",
                    "entrypoint.args=[--epochs, 4, --steps-per-epoch, 10, --step-sleep, 0.4]"),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env_of(cluster),
        stdin=subprocess.DEVNULL)
    job_root.mkdir(exist_ok=True)
    try:
        jobdir = wait_for("3 nodes training", lambda: next(
            (JobDir(p) for p in job_root.iterdir() if len(training_nodes(JobDir(p))) == 3),
            None), timeout=120)
    except BaseException:
        # Leave no job behind for the next test (seen: a job whose agents failed at start kept
        # a node until a later test power-cut it, and Slurm requeued it into that test).
        launcher.kill()
        for path in job_root.iterdir():
            with contextlib.suppress(Exception):
                cluster.run(["scancel", job_id_of(JobDir(path))], check=False)
        raise
    job = cluster.scontrol_job(int(job_id_of(jobdir))) or {}
    assert job.get("NumNodes", "").startswith("3"), job  # the maximum, not the minimum
    return launcher, jobdir, job.get("BatchHost", ""), jobdir.node_names(), rank0_node(jobdir)


def power_cut(cluster: SlurmCluster, node: str) -> None:
    """The node loses power: its slurmd and everything on it die at once (the namespace
    cluster's ``power_cut``, else ``kill_node``)."""
    cut = getattr(cluster, "power_cut", None)
    if cut is not None:
        cut(node)
    else:
        cluster.kill_node(node)


def slurmd_timeout(cluster: SlurmCluster) -> float:
    """The cluster's SlurmdTimeout (``scontrol show config``)."""
    for line in cluster.run(["scontrol", "show", "config"]).stdout.splitlines():
        if line.startswith("SlurmdTimeout"):
            return float(line.split("=", 1)[1].split()[0])
    return 300.0


@contextlib.contextmanager
def slurmd_timeout_of(cluster: SlurmCluster, seconds: int) -> Iterator[None]:
    """Run with Slurm's ``SlurmdTimeout`` set to ``seconds`` (slurm.conf and ``scontrol
    reconfigure``: ~1 s, no restart), then back to the cluster's own. Issue 15 wants a node loss
    tested with Slurm's default of 300 s too: the job must not wait for Slurm to notice."""
    conf = Path(cluster.slurm_conf)
    original = conf.read_text()
    before = slurmd_timeout(cluster)

    def apply(text: str, want: float) -> None:
        conf.write_text(text)
        cluster.run(["scontrol", "reconfigure"])
        wait_for(f"SlurmdTimeout={want:g}", lambda: slurmd_timeout(cluster) == want, timeout=30)

    apply(re.sub(r"(?m)^SlurmdTimeout=\d+", f"SlurmdTimeout={seconds}", original), seconds)
    try:
        yield
    finally:
        apply(original, before)


def round_without(jobdir: JobDir, victim: str, after: float) -> float | None:
    """When a survivor completed a rendezvous round of 2 (without ``victim``) after ``after``."""
    for node in jobdir.node_names():
        for e in node_events(jobdir, node):
            if (node != victim and e["kind"] == "rendezvous.completed" and e["time"] > after
                    and e.get("world_size") == 2):
                return float(e["time"])
    return None


@pytest.mark.parametrize("victim_kind", ["other", "rank0"])
def test_node_loss_costs_one_restart_and_the_node_is_excluded(
    slurm_cluster: SlurmCluster, tmp_path: Path, victim_kind: str
) -> None:
    """``nodes: 2:3`` gets 3 of the 4 idle nodes; one node's slurmd and everything under it are
    killed mid-run (a power cut). Each node's agent runs in a step of its own, so Slurm marking
    the node DOWN ends only the victim's step: the survivors re-form once, on their own, after
    ``heartbeat_timeout`` (not after SlurmdTimeout), resume from the checkpoint and finish. Their
    agents are never started again; the summary counts exactly one worker-group restart; the
    victim is excluded from the run. The batch host cannot be the victim (Slurm ends a job whose
    batch host dies), so when rank 0 lands on the batch host the rank-0 case starts again.

    The ``other`` case runs the loss with Slurm's default ``SlurmdTimeout`` of 300 s (the
    cluster's own 5 s is put back once the survivors re-formed, so that the job can end): the
    survivors re-form just as fast, while Slurm still counts the victim up."""
    t0 = time.monotonic()
    for attempt in range(6):
        launcher, jobdir, batch_host, nodes, rank0 = start_three_nodes(
            slurm_cluster, tmp_path / f"try{attempt}")
        if victim_kind == "other" or rank0 != batch_host:
            break
        launcher.kill()
        slurm_cluster.run(["scancel", job_id_of(jobdir)])
        slurm_cluster.wait_job(int(job_id_of(jobdir)), timeout=60)
    try:
        assert len(nodes) == 3 and batch_host in nodes
        victim = rank0 if victim_kind == "rank0" else next(
            n for n in nodes if n not in (batch_host, rank0))
        assert victim not in (None, batch_host), f"rank 0 on the batch host {attempt + 1} times"
        wait_for("epoch 0's checkpoint", (jobdir.checkpoints / "last.pt").exists, timeout=60)
        with (slurmd_timeout_of(slurm_cluster, 300) if victim_kind == "other"
              else contextlib.nullcontext()):
            killed_at = time.time()
            power_cut(slurm_cluster, victim)
            reformed = wait_for("the survivors' round without the victim",
                                lambda: round_without(jobdir, victim, killed_at), timeout=60)
            down_seen = slurm_cluster.node_states().get(victim, "")
        # Training ends without Slurm; the job's end waits for Slurm to mark the victim down
        # (SlurmdTimeout: 5 s here, 300 s by Slurm's default), as Slurm completes a job on
        # every node it had.
        output, _ = launcher.communicate(timeout=240 + 3 * slurmd_timeout(slurm_cluster))
    finally:
        if launcher.poll() is None:
            launcher.kill()
    try:
        assert launcher.returncode == 0, output[-3000:] + slurm_logs(jobdir)
        survivors = [n for n in nodes if n != victim]
        summary = summary_json(jobdir)
        summary_text(jobdir)
        print(f"power cut -> survivors re-formed: {reformed - killed_at:.1f} s "
              f"(victim's Slurm state then: {down_seen})")
        # Re-formed within heartbeat_timeout (3 s here) + 5 s, before Slurm marked the node
        # down: the survivors never wait for Slurm to notice.
        assert reformed - killed_at <= 3 + 5
        assert not down_seen.startswith("down"), down_seen
        assert summary["status"] == "succeeded"
        assert summary["restarts"] == 1, summary["rendezvous_rounds"]
        assert sorted(summary["nodes"]) == sorted(nodes)
        rounds = summary["rendezvous_rounds"]
        assert any(sorted(r["participants"]) == sorted(nodes) for r in rounds)
        assert sorted(rounds[-1]["participants"]) == sorted(survivors)
        assert {r["step"] for r in rounds} == {0}  # no new generation: nothing was relaunched
        health = {h["node"]: h["ended"] for h in summary["node_health"]}
        assert health[victim] == "vanished" and all(health[n] == "ok" for n in survivors)
        for node in survivors:
            kinds = [e["kind"] for e in node_events(jobdir, node)]
            assert kinds.count("agent.start") == 1, f"{node}'s agent was started again"
            assert kinds[-1] == "agent.succeeded"
        assert [x["node"] for x in summary["excluded_nodes"]] == [victim]
        # Resumed from a checkpoint after the loss, not from global step 0.
        starts = [int(m.group(3)) for p in
                  jobdir.path.glob("nodes/*/workers/attempt-0/restart-*/rank-0/stdout.log")
                  if p.stat().st_mtime > killed_at and (m := RESUMED.search(p.read_text()))]
        assert starts and min(starts) >= 10, starts
        assert_nothing_left(slurm_cluster, jobdir)
        print(f"node loss ({victim_kind}: {victim}): {time.monotonic() - t0:.1f} s")
    finally:
        slurm_cluster.heal()


def test_hot_spare_keeps_the_world_size_after_a_node_loss(
    slurm_cluster: SlurmCluster, tmp_path: Path
) -> None:
    """``nodes: 2``, ``spares: 1``: the job gets 3 nodes, 2 train and 1 stands by. A training
    node that is not the batch host is power-cut: the spare is in the very next round, the world
    size stays 2, the summary counts one restart and one spare swap, and the lost node is
    excluded."""
    launcher = subprocess.Popen(
        submit_args(tmp_path, "--wait", "--set", "nodes=2", "--set", "spares=1", "--set",
                    "entrypoint.args=[--epochs, 4, --steps-per-epoch, 10, --step-sleep, 0.4]"),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env_of(slurm_cluster),
        stdin=subprocess.DEVNULL)
    try:
        jobdir = wait_for("2 nodes training", lambda: next(
            (JobDir(p) for p in tmp_path.iterdir() if len(training_nodes(JobDir(p))) == 2),
            None), timeout=120)
        job = slurm_cluster.scontrol_job(int(job_id_of(jobdir))) or {}
        assert job.get("NumNodes", "").startswith("3"), job
        wait_for("epoch 0's checkpoint", (jobdir.checkpoints / "last.pt").exists, timeout=60)
        trainers = training_nodes(jobdir)
        victim = next(n for n in trainers if n != job.get("BatchHost"))
        power_cut(slurm_cluster, victim)
        output, _ = launcher.communicate(timeout=240 + 3 * slurmd_timeout(slurm_cluster))
    finally:
        if launcher.poll() is None:
            launcher.kill()
    try:
        assert launcher.returncode == 0, output[-3000:] + slurm_logs(jobdir)
        summary = summary_json(jobdir)
        summary_text(jobdir)
        assert summary["status"] == "succeeded"
        assert {r["world_size"] for r in summary["rendezvous_rounds"]} == {2}
        assert summary["restarts"] == 1 and summary["spare_swaps"] == 1
        assert [x["node"] for x in summary["excluded_nodes"]] == [victim]
        assert_nothing_left(slurm_cluster, jobdir)
    finally:
        slurm_cluster.heal()


def test_batch_host_loss_requeues_and_resumes_without_it(
    slurm_cluster: SlurmCluster, tmp_path: Path
) -> None:
    """The batch host (the supervisor's node, where every agent step's srun runs) is power-cut.
    Slurm alone never ends or requeues such a ``--no-kill`` job (measured: it stays RUNNING on
    the other nodes without a batch script), so the surviving agents notice the supervisor's
    heartbeat stop, checkpoint as after a preemption signal, exclude the batch host and requeue
    the job (one of them) and, right after, put the host into the pending job's ``ExcNodeList``
    (no supervisor is left to). Attempt 1 resumes from that checkpoint on nodes without it, and
    the summary counts the requeue."""
    result = subprocess.run(
        submit_args(tmp_path, "--set", "nodes=2:3", "--set", "preemption.grace=30", "--set",
                    "entrypoint.args=[--epochs, 4, --steps-per-epoch, 10, --step-sleep, 0.4]"),
        capture_output=True, text=True, timeout=60, env=env_of(slurm_cluster),
        stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stdout + result.stderr
    jobdir = the_jobdir(tmp_path)
    job_id = int(job_id_of(jobdir))
    try:
        wait_for("3 nodes training", lambda: len(training_nodes(jobdir)) == 3, timeout=120)
        wait_for("epoch 0's checkpoint", (jobdir.checkpoints / "last.pt").exists, timeout=60)
        host = (slurm_cluster.scontrol_job(job_id) or {}).get("BatchHost", "")
        cut_at = time.time()
        power_cut(slurm_cluster, host)
        try:
            wait_for("the agents' requeue", lambda: (slurm_cluster.scontrol_job(job_id) or {})
                     .get("Restarts") == "1", timeout=90)
        except pytest.fail.Exception:
            print(f"batch host {host}; job {slurm_cluster.scontrol_job(job_id)}")
            for node in jobdir.node_names():  # what each agent saw last (the failure's story)
                print(node, [(e["kind"], round(e["time"] - cut_at, 1))
                             for e in node_events(jobdir, node)][-12:])
            print(slurm_logs(jobdir))
            raise
        requeued_s = time.time() - cut_at
        wait_for("the requeued job pending", lambda: slurm_cluster.job_state(job_id)
                 == "PENDING", timeout=60 + 3 * slurmd_timeout(slurm_cluster))
        pending_s = time.time() - cut_at
        excluded_by_slurm = (slurm_cluster.scontrol_job(job_id) or {}).get("ExcNodeList", "")
        slurm_cluster.release(job_id)
        state = slurm_cluster.wait_job(job_id, timeout=240)
        assert state == "COMPLETED", slurm_logs(jobdir)
    finally:
        if slurm_cluster.job_state(job_id) not in (None, "COMPLETED", "CANCELLED", "FAILED"):
            slurm_cluster.run(["scancel", str(job_id)])
    try:
        print(f"batch host {host} cut -> requeued {requeued_s:.1f} s, pending (Slurm marked it "
              f"down) {pending_s:.1f} s")
        summary = summary_json(jobdir)
        summary_text(jobdir)
        assert summary["status"] == "succeeded" and summary["attempts"] == 2
        assert summary["requeues"] == 1
        assert any(d["kind"] == "requeue" for d in summary["disruptions"])
        assert [x["node"] for x in summary["excluded_nodes"]] == [host]
        lost = [e for n in jobdir.node_names() if n != host for e in node_events(jobdir, n)
                if e["kind"] == "batch.lost"]
        assert lost and all(e["host"] == host for e in lost)
        asked = [e for n in jobdir.node_names() if n != host for e in node_events(jobdir, n)
                 if e["kind"] == "requeue.excluded"]
        assert [e["nodes"] for e in asked] == [[host]], asked
        assert excluded_by_slurm == host, excluded_by_slurm
        last = [r for r in summary["rendezvous_rounds"] if r["attempt"] == 1]
        assert last and all(host not in r["participants"] for r in last)
        starts = [int(m.group(3)) for p in
                  jobdir.path.glob("nodes/*/workers/attempt-1/restart-0/rank-0/stdout.log")
                  if (m := RESUMED.search(p.read_text()))]
        assert starts and min(starts) >= 10, starts
        assert_nothing_left(slurm_cluster, jobdir)
    finally:
        slurm_cluster.heal()


# -- 6. stale directory ----------------------------------------------------------------------

def test_second_job_is_not_confused_by_a_crashed_first_ones_leftovers(
    slurm_cluster: SlurmCluster, tmp_path: Path
) -> None:
    """Both jobs share the job root and one rendezvous directory; the first is SIGKILLed
    (``scancel --signal=KILL``) while its agents rendezvous, leaving lock, state and store files
    of a round nobody will close. The second one right after it meets in a fresh run and
    succeeds with one round and no restart."""
    rdzv = ("--set", f"rendezvous.directory={tmp_path / 'rdzv'}")
    first = subprocess.run(submit_args(tmp_path, "--set", "nodes=2", *rdzv),
                           capture_output=True, text=True, timeout=60, env=env_of(slurm_cluster))
    assert first.returncode == 0, first.stderr
    first_id = first.stdout.split("submitted job ")[1].split()[0]
    wait_for("the first job's rendezvous", lambda: any((tmp_path / "rdzv").glob("*/*")),
             timeout=60, every=0.05)
    slurm_cluster.run(["scancel", "--signal=KILL", "--full", first_id])
    slurm_cluster.run(["scancel", first_id])
    slurm_cluster.wait_job(int(first_id), timeout=60)
    first_dir = next(JobDir(p) for p in tmp_path.iterdir()
                     if (p / "submission.json").exists() and job_id_of(JobDir(p)) == first_id)
    assert_nothing_left(slurm_cluster, first_dir)

    second = submit_wait(slurm_cluster, tmp_path, "--set", "nodes=2", *rdzv,
                         "--set", "entrypoint.args=[--epochs, 1, --steps-per-epoch, 5]")
    assert second.returncode == 0, second.stdout + second.stderr
    second_id = second.stdout.split("submitted job ")[1].split()[0]
    jobdir = next(JobDir(p) for p in tmp_path.iterdir()
                  if (p / "submission.json").exists() and job_id_of(JobDir(p)) == second_id)
    summary = summary_json(jobdir)
    summary_text(jobdir)
    assert summary["status"] == "succeeded" and summary["restarts"] == 0
    assert len(summary["rendezvous_rounds"]) == 1
    assert_nothing_left(slurm_cluster, jobdir)
