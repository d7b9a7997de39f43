#!/usr/bin/env bash
# Set up ./.venv and run the demo job (examples/demo.yaml) on this machine: 2 simulated nodes x 2
# workers of examples/train.py, one injected worker failure, an automatic restart from the last
# checkpoint, success, and then the post-run summary of the job's logs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-venv.sh
export OMP_NUM_THREADS=1
status=0
.venv/bin/hpc-elastic submit examples/demo.yaml --local || status=$?
latest=$(ls -dt demo-jobs/demo-*/ | head -n 1)
echo
.venv/bin/hpc-elastic logs summary "$latest"
exit "$status"
