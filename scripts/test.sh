#!/usr/bin/env bash
# Set up everything and run the whole test suite, the private Slurm cluster included.
#   scripts/test.sh               the full suite (what CI runs)
#   scripts/test.sh -m "not slurm"  the fast lane, no Slurm needed
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup-venv.sh
# Debian's slurmctld/slurmd/munge/slurmdbd/mariadb for the test cluster (skipped if present).
bash tests/slurm_cluster/install-deps.sh
.venv/bin/ruff check hpc_elastic tests benchmarks examples
# Two workers (pytest-xdist): most of the suite waits on timeouts, not on the CPU. The Slurm
# cluster's tests stay together in one of them (tests/parallel_groups.py); "-n 0" runs serially.
exec .venv/bin/python -m pytest -n 2 --dist loadgroup "$@"
