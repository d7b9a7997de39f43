"""Shared pytest fixtures. Keep each topic in its own section (or its own helper module)."""

# --- Isolation (tests/isolation.py) -----------------------------------------------------------
# `isolated_slurm_and_state` (autouse, session): SLURM_CONF names an unreachable loopback
# controller (no DNS lookups by Slurm's commands), XDG_STATE_HOME is private (the job index).
#
# --- Slurm test cluster (tests/slurm_cluster/) ------------------------------------------------
# `slurm_cluster`: session-scoped, a real multi-node Slurm cluster (SlurmCluster:
# .env, .nodes, .partition, .state_dir, .sbatch(), .wait_job(), fault tools, .heal(), ...);
# nodes are network/mount/UTS namespaces with their own GlusterFS client. `tmp_path` of a
# slurm test is on the cluster's shared volume (same path on every node).
# Tests marked @pytest.mark.slurm get it automatically; without a cluster they error (never
# skip; leave them out explicitly with -m "not slurm"). Details: tests/slurm_cluster/README.md.
from isolation import isolated_slurm_and_state  # noqa: F401, I001  (fixtures are found by name)
from slurm_cluster.fixture import (  # noqa: F401  (fixtures are found by name)
    SlurmCluster,
    _slurm_marker_needs_cluster,
    slurm_cluster,
    tmp_path,
)

# --- GlusterFS clients without Slurm (tests/sharedfs/) -------------------------------------------
# `sharedfs_clients(k, profile)`: K real GlusterFS clients of one volume, each in its own
# "node", same path everywhere (see tests/sharedfs/__init__.py). Marked `sharedfs` (= slurm).
from sharedfs.fixture import (  # noqa: F401
    mark_sharedfs_tests_as_slurm,
    sharedfs,
    sharedfs_clients,
)

# --- Parallel workers (tests/parallel_groups.py) -------------------------------------------------
# scripts/test.sh runs two pytest-xdist workers (--dist loadgroup); the Slurm cluster's tests run
# in one worker, the GlusterFS server's tests in one worker, the rest fills in around them.
import pytest  # noqa: E402
from parallel_groups import check_groups_took_effect, group_for_workers  # noqa: E402


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Before -m deselects (tryfirst) and before xdist reads the groups."""
    mark_sharedfs_tests_as_slurm(items)
    group_for_workers(items)


def pytest_collection_finish(session: pytest.Session) -> None:
    check_groups_took_effect(session.config, session.items)


# --- (next section) ----------------------------------------------------------------------------
