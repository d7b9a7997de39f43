#!/usr/bin/env bash
# Set up ./.venv and run the demo job (examples/demo.yaml) on this machine: 2 simulated nodes x 2
# workers of examples/train.py, one injected worker failure, an automatic restart from the last
# checkpoint, then success. The job directory is printed; its logs are under nodes/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-venv.sh
export OMP_NUM_THREADS=1
exec .venv/bin/hpc-elastic submit examples/demo.yaml --local
