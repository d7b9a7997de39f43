#!/usr/bin/env bash
# Hang detection on a CUDA GPU with NCCL (issue 16, item 6): one node, one GPU, world size 1.
#
#   bash benchmarks/gpu_hang_check.sh          # on a machine with one CUDA GPU (< 5 min)
#   bash benchmarks/gpu_hang_check.sh --cpu    # the same steps on the CPU with gloo (a dry run)
#
# Runs examples/train.py in local mode (`hpc-elastic submit --local`, 1 node x 1 worker) twice,
# with hang_timeout 20 s:
#   A. the rank hangs inside a CUDA kernel (examples/train.py --hang-at-step: torch.cuda._sleep
#      of ~1 h, then torch.cuda.synchronize -- a runaway kernel as Python sees it);
#   B. the rank is frozen from outside with SIGSTOP after 20 progress reports.
# For each it prints the time to detection, the summary naming the hung rank, `logs hangs` and
# `logs failures`, and checks that the job restarted and finished. The NCCL watchdog and
# flight-recorder settings it gives the workers are printed with the reason for each.
#
# Installs nothing from the network. If ./.whl/ holds wheels (py-spy, submitit, PyYAML,
# filelock, ...), they are installed with `pip install --no-deps --no-index` into a private
# temporary directory (nothing system-wide); hpc_elastic itself comes from this checkout through
# PYTHONPATH. Everything it writes (job directories, logs, this script's output) goes to $OUT
# when set, else to a new temporary directory. Exit 0: every check passed.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
MODE=gpu
[ "${1:-}" = "--cpu" ] && MODE=cpu
OUT=${OUT:-$(mktemp -d /tmp/gpu_hang_check.XXXXXX)}
mkdir -p "$OUT"
WORK=$(mktemp -d /tmp/gpu_hang_check_work.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
exec > >(tee -a "$OUT/gpu_hang_check.log") 2>&1
PY=${PYTHON:-python3}
HANG_TIMEOUT=20
STARTED=$(date +%s)
FAILED=0
check() {  # check "what" command...: print PASS/FAIL, remember a failure
  local what=$1; shift
  if "$@"; then echo "PASS: $what"; else echo "FAIL: $what"; FAILED=1; fi
}

echo "== gpu_hang_check ($MODE) $(date -u +%FT%TZ); output in $OUT"
if [ -d .whl ] && compgen -G ".whl/*.whl" > /dev/null; then
  echo "-- installing wheels from .whl/ into $WORK/site (no network)"
  "$PY" -m pip install --quiet --no-deps --no-index --target "$WORK/site" .whl/*.whl \
    || echo "WARNING: pip could not install every wheel in .whl/"
  export PYTHONPATH="$REPO:$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
  export PATH="$WORK/site/bin:$PATH"   # py-spy's binary
else
  export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
fi
if [ "$MODE" = cpu ]; then
  export CUDA_VISIBLE_DEVICES=""       # examples/train.py then uses gloo on the CPU
fi

echo "-- environment"
"$PY" - <<'EOF' || { echo "FAIL: a module hpc_elastic needs is missing (see above)"; exit 1; }
import importlib, subprocess, sys
print("python", sys.version.split()[0], sys.executable)
missing = []
for name in ("torch", "yaml", "submitit", "filelock", "hpc_elastic"):
    try:
        mod = importlib.import_module(name)
        print(f"{name:12s}", getattr(mod, "__version__", ""), getattr(mod, "__file__", ""))
    except Exception as err:  # noqa: BLE001
        print(f"{name:12s} MISSING: {err}")
        missing.append(name)
import torch
print("cuda available", torch.cuda.is_available(), "devices", torch.cuda.device_count(),
      "nccl", torch.distributed.is_nccl_available())
if torch.cuda.is_available():
    print("gpu", torch.cuda.get_device_name(0), "cuda", torch.version.cuda,
          "nccl version", ".".join(map(str, torch.cuda.nccl.version())))
from hpc_elastic.agent.stacks import py_spy_path
spy = py_spy_path()  # what the agent will use
print("py-spy", spy and subprocess.run([spy, "--version"], capture_output=True,
                                        text=True).stdout.strip())
try:
    print("ptrace_scope", open("/proc/sys/kernel/yama/ptrace_scope").read().strip())
except OSError:
    print("ptrace_scope: no Yama")
sys.exit(1 if missing else 0)
EOF
if [ "$MODE" = gpu ] && ! "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  echo "FAIL: no CUDA device; use --cpu for a dry run"; exit 1
fi

# NCCL settings for the workers (env of the job), and why:
FR="$OUT/nccl-flight-recorder"
mkdir -p "$FR"
declare -A NCCL_ENV=(
  # Abort the communicator and end the process when a collective times out or fails, instead
  # of leaving the rank blocked: a NCCL-level hang then becomes an exit the agent sees.
  [TORCH_NCCL_ASYNC_ERROR_HANDLING]=1
  # Flight recorder on: the last 2000 collectives per rank (seq, op, sizes, state) in memory.
  # torch 2.13 reads TORCH_FR_BUFFER_SIZE and warns that the older name is deprecated; older
  # torch reads only the older name, so both are set.
  [TORCH_FR_BUFFER_SIZE]=2000
  [TORCH_NCCL_TRACE_BUFFER_SIZE]=2000
  # Dump the flight recorder when the watchdog sees a collective time out ...
  [TORCH_NCCL_DUMP_ON_TIMEOUT]=1
  # ... to files next to the job's logs (one per rank: <prefix><rank>; both names as above).
  [TORCH_FR_DUMP_TEMP_FILE]="$FR/nccl_trace_rank_"
  [TORCH_NCCL_DEBUG_INFO_TEMP_FILE]="$FR/nccl_trace_rank_"
  # A named pipe per rank (<prefix><rank>.pipe): writing to it asks for a dump on demand, so a
  # dump exists before hpc_elastic kills a hung rank (tried below; not in every torch).
  [TORCH_NCCL_DEBUG_INFO_PIPE_FILE]="$FR/nccl_trace_rank_"
)
echo "-- NCCL settings given to the workers (the collective timeout stays NCCL's 600 s, above"
echo "   hang_timeout, so hpc_elastic's detection with stacks comes first):"
for k in "${!NCCL_ENV[@]}"; do echo "   $k=${NCCL_ENV[$k]}"; done

write_job() {  # write_job NAME EXTRA_ARGS -> $WORK/NAME.yaml
  local name=$1 extra=$2
  {
    echo "name: $name"
    echo "nodes: 1"
    echo "nproc_per_node: 1"
    echo "entrypoint: $REPO/examples/train.py --epochs 3 --steps-per-epoch 40 --step-sleep 0.05 $extra"
    echo "max_restarts: 2"
    echo "hang_timeout: $HANG_TIMEOUT"
    echo "job_root: $OUT/jobs-$name"
    echo "env:"
    echo "  OMP_NUM_THREADS: 1"
    for k in "${!NCCL_ENV[@]}"; do echo "  $k: \"${NCCL_ENV[$k]}\""; done
  } > "$WORK/$name.yaml"
}

report() {  # report JOBDIR: time to detection, summary, hangs, failures; checks
  local jobdir=$1
  "$PY" - "$jobdir" "$HANG_TIMEOUT" <<'EOF'
import json, sys
from pathlib import Path
jobdir, timeout = Path(sys.argv[1]), float(sys.argv[2])
events = [json.loads(line) for f in sorted(jobdir.glob("nodes/*/events.jsonl"))
          for line in f.read_text().splitlines() if line.strip()]
hung = [e for e in events if e["kind"] == "worker.hung"]
dumped = [e for e in events if e["kind"] == "hang.dumped"]
for e in hung:
    print(f"detected: rank {e['rank']} silent {e['silent_s']} s (hang_timeout {timeout:g} s), "
          f"state {e['state']}, cpu {e['cpu_percent']} %, dump {e['dump']}")
for e in dumped:
    print(f"dumps on {e['node']}: {e['dump_dir']} in {e['dump_s']} s; "
          f"time to detection and dumps (last progress -> dumps written): "
          f"{max(r['silent_s'] for r in e['ranks']) + e['dump_s']:.1f} s")
EOF
  for cmd in summary hangs failures; do
    echo "---- hpc-elastic logs $cmd"
    "$PY" -m hpc_elastic logs "$cmd" "$jobdir"
  done
}

run_job() {  # run_job NAME: submit and wait (bounded); prints the job directory on fd 3
  local name=$1 t0 rc
  t0=$(date +%s)
  timeout 120 "$PY" -m hpc_elastic submit "$WORK/$name.yaml" --local > "$OUT/$name.submit.log" 2>&1
  rc=$?
  echo "job $name ended with exit code $rc after $(( $(date +%s) - t0 )) s (log: $OUT/$name.submit.log)"
  tail -n 5 "$OUT/$name.submit.log"
  return $rc
}

jobdir_of() { ls -d "$OUT/jobs-$1"/*/ 2>/dev/null | head -n 1; }

echo
echo "== A: the rank hangs in a CUDA kernel (on --cpu: in a sleep) at step 30"
write_job kernel "--hang-at-step 30 --fail-rank 0"
# While the rank hangs (before hpc_elastic kills it), ask NCCL's flight recorder for a dump
# through its pipe, if this torch made one.
ask_for_dump() {
  local end=$(( $(date +%s) + 60 )) pipe="${FR}/nccl_trace_rank_0.pipe"
  while [ "$(date +%s)" -lt "$end" ]; do
    if grep -qs "hanging at global step" "$OUT"/jobs-kernel/*/nodes/*/workers/*/restart-0/rank-0/stdout.log; then
      if [ -p "$pipe" ]; then
        timeout 5 bash -c "echo 1 > '$pipe'" && sleep 3
        echo "flight-recorder dump asked through $pipe during the hang; files now:" > "$WORK/pipe.txt"
        ls -la "$FR" >> "$WORK/pipe.txt"
      else
        echo "no NCCL dump pipe during the hang ($pipe)" > "$WORK/pipe.txt"
      fi
      return
    fi
    sleep 0.5
  done
}
ask_for_dump &
ASK_PID=$!
PIPE_TRIED=1
run_job kernel; rc=$?
wait "$ASK_PID"
JA=$(jobdir_of kernel)
check "A: the job finished after the hang (exit 0)" test "$rc" = 0
if [ -n "$JA" ]; then
  report "$JA" | tee "$OUT/kernel.report.txt"
  check "A: summary names rank 0 as hung" grep -q "hang: rank 0 (node" "$OUT/kernel.report.txt"
  DUMP=$(ls "$JA"/nodes/*/hangs/*/rank-0.txt 2>/dev/null | head -n 1)
  check "A: a stack of rank 0 was dumped" test -n "$DUMP"
  if [ -n "$DUMP" ]; then
    echo "---- $DUMP"; head -n 40 "$DUMP"
    check "A: the dump shows the script's frame" grep -q "train.py" "$DUMP"
  fi
fi
if [ -n "$PIPE_TRIED" ]; then cat "$WORK/pipe.txt"; fi

echo
echo "== B: the rank is frozen with SIGSTOP after 20 progress reports"
write_job stopped ""
run_job stopped &
JOB_PID=$!
deadline=$(( $(date +%s) + 90 ))
stopped_pid=""
while [ "$(date +%s)" -lt "$deadline" ] && [ -z "$stopped_pid" ]; do
  sleep 0.5
  JB=$(jobdir_of stopped)
  [ -n "$JB" ] || continue
  stopped_pid=$("$PY" - "$JB" <<'EOF'
import sys
from pathlib import Path
from hpc_elastic.worker import record
for f in Path(sys.argv[1]).glob("nodes/*/workers/*/restart-0/rank-0/progress"):
    p = record.read(f)
    if p is not None and p.n >= 20 and not p.ended:
        print(p.pid)
EOF
)
done
if [ -n "$stopped_pid" ]; then
  kill -STOP "$stopped_pid" && echo "SIGSTOP sent to rank 0 (pid $stopped_pid) at $(date -u +%T)"
else
  echo "FAIL: B: rank 0 never reported 20 steps"; FAILED=1
fi
wait "$JOB_PID"; rc=$?
JB=$(jobdir_of stopped)
check "B: the job finished after the hang (exit 0)" test "$rc" = 0
if [ -n "$JB" ]; then
  report "$JB" | tee "$OUT/stopped.report.txt"
  check "B: summary names rank 0 as stopped" grep -q "rank 0 (node .*) was stopped (state T)" "$OUT/stopped.report.txt"
fi

echo
echo "== NCCL flight recorder"
ls -la "$FR"
for pipe in "$FR"/*.pipe; do
  [ -p "$pipe" ] && echo "a dump pipe exists: $pipe (torch created it)"
done
compgen -G "$FR/*.pipe" > /dev/null || echo "no dump pipe was created (this torch does not offer TORCH_NCCL_DEBUG_INFO_PIPE_FILE, or the rank ended first)"

echo
echo "== done in $(( $(date +%s) - STARTED )) s: $([ "$FAILED" = 0 ] && echo 'every check passed' || echo 'SOME CHECKS FAILED')"
exit "$FAILED"
