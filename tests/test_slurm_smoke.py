"""Smoke test of the private multi-node Slurm test cluster (tests/slurm_cluster)."""

from __future__ import annotations

import time

import pytest
from slurm_cluster.fixture import SlurmCluster, accounting_required

pytestmark = pytest.mark.slurm


def test_cluster_is_up(slurm_cluster: SlurmCluster) -> None:
    states = slurm_cluster.node_states()
    assert sorted(states) == sorted(slurm_cluster.nodes)
    assert len(slurm_cluster.nodes) >= 3
    bad = {n: s for n, s in states.items() if s not in ("idle", "mixed", "allocated")}
    assert not bad, f"nodes not up: {bad}"


def test_three_node_job(slurm_cluster: SlurmCluster, tmp_path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    script = tmp_path / "job.sh"
    # one task per node, each writes "<SLURM_NODEID> <SLURMD_NODENAME>" to its own file
    script.write_text(
        "#!/bin/bash\n"
        f"srun bash -c 'echo \"$SLURM_NODEID $SLURMD_NODENAME\" > {out}/task.$SLURM_NODEID'\n"
    )
    t0 = time.monotonic()
    job_id = slurm_cluster.sbatch(
        "--nodes=3",
        "--ntasks-per-node=1",
        "--time=2",
        f"--output={tmp_path}/slurm-%j.out",
        script,
    )
    state = slurm_cluster.wait_job(job_id, timeout=60)
    elapsed = time.monotonic() - t0
    log = (tmp_path / f"slurm-{job_id}.out").read_text(errors="replace")
    assert state == "COMPLETED", f"job {job_id}: {state}\n{log}\n{slurm_cluster.tail_logs()}"

    rows = sorted(p.read_text().split() for p in out.glob("task.*"))
    assert [r[0] for r in rows] == ["0", "1", "2"], rows
    names = [r[1] for r in rows]
    assert len(set(names)) == 3, f"tasks did not run on 3 distinct nodes: {rows}"
    assert set(names) <= set(slurm_cluster.nodes)
    print(f"3-node job {job_id}: submit -> COMPLETED in {elapsed:.2f} s")

    # Accounting is required unless the caller switched it off (HPC_ELASTIC_SLURM_ACCOUNTING).
    if not slurm_cluster.accounting and not accounting_required():
        pytest.skip(f"accounting switched off ({slurm_cluster.accounting_mode}): no sacct check")
    assert slurm_cluster.accounting, f"accounting is {slurm_cluster.accounting_mode}"
    assert slurm_cluster.wait_sacct(job_id, ["COMPLETED"], timeout=30) == "COMPLETED"


def wait_for_idle_node(cluster: SlurmCluster, timeout: float = 60) -> str:
    """The last idle node (sessions sharing the cluster may keep the others busy a while)."""
    deadline = time.monotonic() + timeout
    while True:
        states = cluster.node_states()
        idle = [n for n in cluster.nodes if states.get(n) == "idle"]
        if idle:
            return idle[-1]
        assert time.monotonic() < deadline, f"no idle node within {timeout} s: {states}"
        time.sleep(0.5)


@pytest.mark.slow
def test_kill_node_then_heal(slurm_cluster: SlurmCluster) -> None:
    """The node-loss helpers: slurmctld notices a killed node (not responding: '*'), heal()
    brings it back."""
    # An idle node, drained first so that no job (of a session sharing the cluster) lands on it.
    node = wait_for_idle_node(slurm_cluster)
    slurm_cluster.run(["scontrol", "update", f"nodename={node}", "state=drain", "reason=test"])
    assert slurm_cluster.slurmd_pid(node) is not None
    t0 = time.monotonic()
    try:
        killed = slurm_cluster.kill_node(node)
        assert killed, f"nothing to kill for {node}"
        # drained, so it shows as "drained*" rather than "down*"
        state = slurm_cluster.wait_node_state(node, ["down*", "drained*"], timeout=60)
        down_after = time.monotonic() - t0
    finally:
        slurm_cluster.heal()  # restarts its slurmd, resumes the node
    assert slurm_cluster.slurmd_pid(node) is not None
    assert slurm_cluster.node_states()[node] == "idle"
    print(f"{node}: {state} {down_after:.1f} s after its slurmd was killed")
