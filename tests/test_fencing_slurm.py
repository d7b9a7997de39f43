"""A node cut off from the others and from the shared filesystem -- partitioned, frozen, or its
filesystem client dead -- on the real Slurm test cluster.

What a user relies on (issue #18, parts 2 and 3): the others train again within
``heartbeat_timeout`` + 5 s, without waiting for Slurm to notice; the cut-off node never goes on
as part of the old group (it takes part in no round after the others re-formed without it,
except a later one it rejoins); the job finishes from its checkpoint. The victim is neither the
batch host (its loss is a requeue, tests/test_e2e_slurm.py) nor rank 0's node.

Slurm ends the victim's step once it marks the node down (SlurmdTimeout is short here), so the
victim's own fencing is tested without Slurm, in tests/test_fencing_sharedfs.py, which in the
suite runs the partition (``cached``) and the freeze (``coherent``). The suite runs here the
third fault, a dead filesystem client, on ``coherent`` (issue #13's time budget: ~1 min each);
``HPC_ELASTIC_ALL_FAULTS=1`` runs all three faults on both volumes.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest
from e2e_helpers import node_events, slurm_logs, summary_json, summary_text
from polling import wait_for
from slurm_cluster.fixture import SlurmCluster
from test_e2e_slurm import round_without, slurmd_timeout, start_three_nodes

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

HEARTBEAT_TIMEOUT = 3  # e2e_helpers.FAST_RDZV


def cut_off(cluster: SlurmCluster, node: str, fault: str, profile: str) -> None:
    if fault == "partition":
        cluster.partition_node(node)
    elif fault == "freeze":
        cluster.freeze(node)
    else:
        cluster.kill_fs_client(node, profile)


def undo(cluster: SlurmCluster, node: str, fault: str) -> None:
    if fault == "partition":
        cluster.reconnect_node(node)
    elif fault == "freeze":
        cluster.thaw(node)
    # a dead filesystem client stays dead until heal()


def rounds_joined(events: list[dict[str, Any]], after: float) -> list[dict[str, Any]]:
    return [e for e in events if e["kind"] == "rendezvous.completed" and e["time"] > after]


FAULTS = ("partition", "freeze", "fs_client_dies")
ALL = [pytest.param(f, p, marks=pytest.mark.fs_profile(p)) for f in FAULTS
       for p in ("cached", "coherent")]
SUITE = [pytest.param("fs_client_dies", "coherent", marks=pytest.mark.fs_profile("coherent"))]
CASES = ALL if os.environ.get("HPC_ELASTIC_ALL_FAULTS", "") not in ("", "0") else SUITE


@pytest.mark.parametrize(("fault", "profile"), CASES)
def test_a_cut_off_node_is_fenced_and_the_others_train_again(
    slurm_cluster: SlurmCluster, tmp_path: Path, fault: str, profile: str
) -> None:
    launcher, jobdir, batch_host, nodes, rank0 = start_three_nodes(slurm_cluster, tmp_path)
    victim = next(n for n in nodes if n not in (batch_host, rank0))
    try:
        wait_for("epoch 0's checkpoint", (jobdir.checkpoints / "last.pt").exists, timeout=60)
        cut_at = time.time()
        cut_off(slurm_cluster, victim, fault, profile)
        reformed = wait_for("the others' round without the victim",
                            lambda: round_without(jobdir, victim, cut_at), timeout=60)
        # Keep it cut off well past heartbeat_timeout, then let it back: it must not go on
        # as a member of the group it was dropped from.
        time.sleep(max(0.0, reformed + 10 - time.time()))
        undone_at = time.time()
        undo(slurm_cluster, victim, fault)
        output, _ = launcher.communicate(timeout=300 + 3 * slurmd_timeout(slurm_cluster))
    finally:
        if launcher.poll() is None:
            launcher.kill()
        undo(slurm_cluster, victim, fault)
    try:
        survivors = [n for n in nodes if n != victim]
        summary = summary_json(jobdir)
        text = summary_text(jobdir)
        victim_events = node_events(jobdir, victim)
        print(f"{fault} on {profile}: the others trained again {reformed - cut_at:.1f} s after "
              f"the cut; undone {undone_at - cut_at:.1f} s after it; victim's events after it: "
              f"{[e['kind'] for e in victim_events if e['time'] > cut_at]}")
        assert launcher.returncode == 0, output[-3000:] + slurm_logs(jobdir)
        assert reformed - cut_at <= HEARTBEAT_TIMEOUT + 5
        assert summary["status"] == "succeeded", text
        for node in survivors:
            kinds = [e["kind"] for e in node_events(jobdir, node)]
            assert kinds.count("agent.start") == 1, f"{node}'s agent was started again"
        # Fenced: the victim joined no round between the cut and the others' re-formed round,
        # and any later round it joined has a higher number than that one.
        formed = [e for n in survivors for e in node_events(jobdir, n)
                  if e["kind"] == "rendezvous.completed" and e["time"] == reformed]
        new_round = formed[0].get("round") if formed else None
        for e in rounds_joined(victim_events, cut_at):
            assert new_round is not None and e.get("round", -1) > new_round, e
    finally:
        slurm_cluster.heal()
