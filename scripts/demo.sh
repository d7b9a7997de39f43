#!/usr/bin/env bash
# Set up ./.venv and run the demo job (examples/demo.yaml) on this machine.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-venv.sh
# The job file is checked exactly as 'submit' would check it.
.venv/bin/hpc-elastic submit examples/demo.yaml --dry-run 2>&1 | head -n 1 || true
# Until local mode lands, the demo runs the example's real DDP training under plain torchrun.
export OMP_NUM_THREADS=1
exec .venv/bin/torchrun --standalone --nproc-per-node=2 examples/train.py \
    --epochs 2 --steps-per-epoch 20 --checkpoint-dir "demo-jobs/torchrun-$(date +%Y%m%d-%H%M%S)/checkpoints"
