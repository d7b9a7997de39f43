#!/usr/bin/env bash
# Stop the private Slurm test cluster: exactly what start.sh started -- the daemons by their
# recorded PIDs (never by name), then whatever is left inside the cluster's own namespaces
# (a node's job processes, slurmstepd, FUSE clients; ours by construction), the FUSE mounts,
# the file server and the namespaces themselves. Safe to run when nothing runs.
#
#   tests/slurm_cluster/stop.sh          # keep the state directory (accounting DB, volumes, logs)
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

# 1. Cancel every job of this cluster and give the steps a moment to end.
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

# 2. The nodes: a frozen node's processes continue (else they ignore SIGTERM), then slurmd,
#    then everything else in the node (slurmstepd and job processes that outlived it).
for f in "$STATE"/ns/*.net; do
    [ -e "$f" ] || continue
    n=$(basename "$f" .net)
    if [[ $n == "$NODE_PREFIX"* ]]; then sfs_kill_in "$n" CONT >/dev/null; fi
done
for f in "$STATE"/pids/slurmd-*.pid; do
    [ -e "$f" ] || continue
    stop_pid "$(basename "$f" .pid)" TERM 10
done

# 3. The head's daemons, clients first; munged last.
stop_pid slurmctld TERM 10
stop_pid slurmdbd TERM 10
stop_pid mariadbd TERM 30
stop_pid munged TERM 10

# 4. File system clients (nodes' and login), the file server, every namespace (sweeping what
#    is left in each), the namespace files' mount.
sfs_down

rm -f "$STATE/cluster.env" "$STATE/cluster.json"
log "stopped in $(awk "BEGIN{printf \"%.2f\", $(now) - $t_start}") s"
if [ "$purge" = 1 ]; then
    # never delete through a mount that is still there
    if grep -qF " $STATE/" /proc/self/mountinfo; then
        die "not purging $STATE: something is still mounted below it"
    fi
    rm -rf "${STATE:?}"
    log "removed $STATE"
fi
