#!/usr/bin/env bash
# Stop the private Slurm test cluster: exactly the daemons start.sh started (by their recorded
# PIDs, never by name), after cancelling the cluster's jobs. Safe to run when nothing runs.
#
#   tests/slurm_cluster/stop.sh          # keep the state directory (accounting DB, logs)
#   tests/slurm_cluster/stop.sh --purge  # and delete it
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=common.sh
. "$HERE/common.sh"

purge=0
[ "${1:-}" = --purge ] && purge=1
[ -d "$STATE" ] || exit 0
take_lock
t_start=$(now)

# 1. Cancel every job of this cluster and give the steps a moment to end, so that no
#    slurmstepd or job process outlives its slurmd.
if alive slurmctld; then
    scancel --quiet --full --partition="$PARTITION" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do
        [ -z "$(squeue -h -o %i -t RUNNING,COMPLETING,SUSPENDED 2>/dev/null)" ] && break
        sleep 0.1
    done
    # Let slurmctld hand its queued accounting records to slurmdbd first (sacct of the last
    # jobs; a fresh start.sh also numbers new jobs after the highest ID sacct knows).
    if alive slurmdbd; then
        for ((i = 0; i < 50; i++)); do
            sdiag 2>/dev/null | grep -Eq '^DBD Agent queue size: +0$' && break
            sleep 0.1
        done
    fi
fi

# 2. The daemons, clients first.
for f in "$STATE"/pids/slurmd-*.pid; do
    [ -e "$f" ] || continue
    stop_pid "$(basename "$f" .pid)" TERM 10
done
stop_pid slurmctld TERM 10
stop_pid slurmdbd TERM 10
stop_pid mariadbd TERM 30
stop_pid munged TERM 10

# 3. slurmstepd processes forked by our slurmd that outlived it (a job still completing).
#    slurmstepd clears its environment, but it keeps its node's slurmd log file open
#    ($STATE/log/slurmd-<node>.log): that identifies ours and only ours.
for exe in /proc/[0-9]*/cmdline; do
    pid=${exe#/proc/}
    pid=${pid%/cmdline}
    cmd=$(tr '\0' ' ' 2>/dev/null <"$exe") || continue
    [[ $cmd == slurmstepd* ]] || continue
    if ls -l "/proc/$pid/fd" 2>/dev/null | grep -qF -- "-> $STATE/log/slurmd-"; then
        log "killing leftover $cmd(pid $pid)"
        kill -s KILL "$pid" 2>/dev/null || true
    fi
done

rm -f "$STATE/cluster.env" "$STATE/cluster.json"
log "stopped in $(awk "BEGIN{printf \"%.2f\", $(now) - $t_start}") s"
if [ "$purge" = 1 ]; then
    rm -rf "${STATE:?}"
    log "removed $STATE"
fi
