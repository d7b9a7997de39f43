"""How the suite is split over pytest-xdist workers (``scripts/test.sh`` runs ``-n 2``).

Most of the suite's time is waiting, not computing: for Slurm to notice a lost node, for a
heartbeat to time out, for a hung rank to be judged hung. Two workers overlap that waiting.
What must not run side by side is kept together with ``xdist_group`` (``--dist loadgroup``):

* ``slurm-cluster``: every test on the one private Slurm cluster. Its tests cut power to nodes,
  partition them and expect the nodes for themselves; two at once would break each other.
* ``sharedfs``: the tests with a private GlusterFS server (one per worker that runs them): one
  worker starts it once instead of both.

The two groups are put first, so that each worker starts on one of them and the rest of the
suite fills in around them. Without xdist these markers change nothing.
"""

from __future__ import annotations

import sys

import pytest

SLURM_CLUSTER_GROUP = "slurm-cluster"
SHAREDFS_GROUP = "sharedfs"


def group_of(item: pytest.Item) -> str | None:
    """The xdist group an item must run in, or None if it may run anywhere."""
    if item.get_closest_marker("sharedfs") is not None:
        return SHAREDFS_GROUP
    if item.get_closest_marker("slurm") is not None:
        return SLURM_CLUSTER_GROUP
    return None


def group_for_workers(items: list[pytest.Item]) -> None:
    """Mark each grouped item with ``xdist_group`` and move the groups to the front (in place;
    the relative order inside each group and of the rest is kept)."""
    order = {SLURM_CLUSTER_GROUP: 0, SHAREDFS_GROUP: 1}
    ranked = []
    for index, item in enumerate(items):
        group = group_of(item)
        if group is not None:
            item.add_marker(pytest.mark.xdist_group(group))
        ranked.append((order.get(group, len(order)), index, item))
    items[:] = [item for _, _, item in sorted(ranked, key=lambda r: r[:2])]


def check_groups_took_effect(config: pytest.Config, items: list[pytest.Item]) -> None:
    """In an xdist worker under ``--dist loadgroup``, every grouped item's id must carry its
    group (``...@group``): that is how xdist keeps a group on one worker. A pytest/xdist pair
    that drops it would run the Slurm cluster's tests on two workers at once, and they would
    fail in confusing ways; stop the run with the reason instead."""
    if not getattr(config.option, "loadgroup", False):
        return
    for item in items:
        if group_of(item) is not None and "@" not in item.nodeid:
            # A worker's UsageError reaches the console only as an INTERNALERROR traceback:
            # say why on stderr (which the worker shares with the console) first.
            reason = (
                f"pytest-xdist did not apply the test groups ({item.nodeid} has no '@group' "
                "suffix), so the Slurm cluster's tests would run on two workers at once. This "
                "pytest/pytest-xdist pair does not work together (see pyproject.toml's dev "
                "extra); reinstall with `bash scripts/setup-venv.sh`, or run serially with -n 0."
            )
            print(f"\nERROR: {reason}", file=sys.stderr, flush=True)
            raise pytest.UsageError(reason)
