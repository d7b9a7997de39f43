#!/usr/bin/env bash
# Warm workers (warm_workers: true) on a real GPU (CUDA, NCCL): run by hand on a GPU machine; not
# part of the suite (CI has no GPU). benchmarks/gpu_hang_check.sh covers hang detection itself.
# Three local jobs of benchmarks/gpu_warm_check/ddp_cuda.py (a plain DDP script), then
# benchmarks/gpu_warm_check/check.py judges their job directories:
#   warm-gloo-crash  2 simulated nodes x 1 worker, gloo on CUDA tensors, rank 0 crashes once
#   warm-nccl-hang   1 node x 1 worker, NCCL, rank 0 hangs in the GPU once (hang_timeout 10 s)
#   cold-nccl-hang   the same without warm_workers: the reference
# Usage: bash benchmarks/gpu_warm_check.sh [OUTDIR]   (PYTHON=... to pick the interpreter)
# Wheels in ./.whl/ (submitit, py-spy) are installed to a private directory first, for machines
# that cannot download (as benchmarks/gpu_hang_check.sh does).
set -u
cd "$(dirname "$0")/.."
OUT=${1:-/tmp/gpu-warm-check}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-deps --no-index --target /tmp/gpu-extra .whl/*.whl
    export PYTHONPATH=/tmp/gpu-extra PATH=/tmp/gpu-extra/bin:$PATH
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi -L
"$PY" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.cuda.is_available())"
run_job() {  # name nodes warm hang_timeout script-args...
    local name=$1 nodes=$2 warm=$3 hang=$4
    shift 4
    mkdir -p "$OUT/$name"
    cat > "$OUT/$name.yaml" <<YAML
name: $name
nodes: $nodes
nproc_per_node: 1
entrypoint: $PWD/benchmarks/gpu_warm_check/ddp_cuda.py $*
max_restarts: 2
job_root: $OUT/jobs
warm_workers: $warm
hang_timeout: $hang
env:
  GPU_CHECK_DIR: $OUT/$name
  OMP_NUM_THREADS: 2
rendezvous:
  last_call_timeout: 1
YAML
    local t0=$SECONDS
    timeout 150 "$PY" -u -m hpc_elastic submit "$OUT/$name.yaml" --local > "$OUT/$name.out" 2>&1
    echo "$name: exit $? after $((SECONDS - t0)) s"
    tail -4 "$OUT/$name.out"
}
run_job warm-gloo-crash 2 true 300 --backend gloo --crash
run_job warm-nccl-hang 1 true 10 --backend nccl --hang
run_job cold-nccl-hang 1 false 10 --backend nccl --hang
"$PY" benchmarks/gpu_warm_check/check.py "$OUT"
