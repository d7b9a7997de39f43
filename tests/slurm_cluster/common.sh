# Shared settings and helpers of start.sh and stop.sh (sourced, not run).
# Every knob is an environment variable with a default; see README.md.

STATE=${HPC_ELASTIC_SLURM_DIR:-/tmp/hpc_elastic_slurm}
NNODES=${HPC_ELASTIC_SLURM_NODES:-4}
CPUS_PER_NODE=${HPC_ELASTIC_SLURM_CPUS:-4}
PORT_BASE=${HPC_ELASTIC_SLURM_PORT_BASE:-26810}
# auto: use slurmdbd + MariaDB when they can be started, else run without accounting;
# 1: accounting is required (start fails without it); 0: never.
ACCOUNTING=${HPC_ELASTIC_SLURM_ACCOUNTING:-auto}
# Failure detection: seconds until a silent node is DOWN / an RPC gives up.
SLURMD_TIMEOUT=${HPC_ELASTIC_SLURM_SLURMD_TIMEOUT:-5}
MESSAGE_TIMEOUT=${HPC_ELASTIC_SLURM_MESSAGE_TIMEOUT:-5}
# How slurmd tracks a job's processes: cgroup, linuxproc, or auto (cgroup where the cgroup v1
# freezer is usable, else linuxproc). See slurm.conf.in.
PROCTRACK=${HPC_ELASTIC_SLURM_PROCTRACK:-auto}
CLUSTER=hpcelastic
PARTITION=debug
NODE_PREFIX=n

# Which volume job directories go on by default (the tests' tmp_path): cached or coherent.
FS_PROFILE=${HPC_ELASTIC_SLURM_FS_PROFILE:-cached}

# Ports, each inside the namespace of its daemon: slurmctld, slurmdbd, MariaDB (head), then one
# per slurmd (its node).
CTLD_PORT=$PORT_BASE
DBD_PORT=$((PORT_BASE + 1))
DB_PORT=$((PORT_BASE + 2))
FIRST_SLURMD_PORT=$((PORT_BASE + 10))

PATH="$PATH:/usr/sbin:/sbin"
export SLURM_CONF="$STATE/etc/slurm.conf"
# Never let a client pick up a job's or a user's Slurm settings from the environment.
unset SLURM_JOB_ID SLURM_JOBID SLURM_CLUSTERS SLURM_PARTITION SBATCH_PARTITION

# Network namespaces, files and GlusterFS: tests/sharedfs/sharedfs.sh (S = our state dir).
# shellcheck source=../sharedfs/sharedfs.sh
. "$HERE/../sharedfs/sharedfs.sh"
S=$STATE
HEAD=head                   # namespace of slurmctld, slurmdbd, MariaDB, the login mounts
HEAD_ADDR=$SFS_NET.1
SHARED="$STATE/shared"      # $SHARED/<profile>: the volume, same path on every node and here
# Slurm client wrappers (bin/sbatch ...): from the machine's own network namespace they run
# the real command in the head's, elsewhere (in a job on a node) the real one directly.
[ -d "$STATE/bin" ] && PATH="$STATE/bin:$PATH"

node_name() { echo "${NODE_PREFIX}$1"; }               # 1 -> n1
node_octet() { echo $((10 + $1)); }                    # 1 -> 11
node_addr() { echo "$SFS_NET.$(node_octet "$1")"; }    # 1 -> 10.199.0.11
node_port() { echo $((FIRST_SLURMD_PORT + $1 - 1)); }  # 1 -> first slurmd port
# in_ns NAME CMD...: CMD in namespace NAME's network and mount namespaces
in_ns() {
    local n=$1
    shift
    nsenter --net="$(sfs_net "$n")" --mount="$(sfs_mnt "$n")" -- "$@"
}

log() { printf 'slurm-cluster: %s\n' "$*" >&2; }
die() {
    log "ERROR: $*"
    exit 1
}

# now in seconds with milliseconds, for timings
now() { date +%s.%3N; }

# pid_of NAME -> the PID start.sh recorded for daemon NAME if that process is still ours and
# alive. "Ours" = its command line still names the expected program and its environment
# carries the HPC_ELASTIC_SLURM_DIR=$STATE marker launch() gave it, which guards against a
# recycled PID (and against daemons of another state directory).
pid_of() {
    local name=$1 f="$STATE/pids/$1.pid" pid cmd
    [ -s "$f" ] || return 1
    pid=$(<"$f")
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    cmd=$(tr '\0' ' ' 2>/dev/null <"/proc/$pid/cmdline") || return 1
    # a zombie has an empty command line
    [ -n "$cmd" ] || return 1
    case $name in
        slurmd-*) [[ $cmd == *slurmd* ]] || return 1 ;;
        *) [[ $cmd == *"$name"* ]] || return 1 ;;
    esac
    grep -qzxF "HPC_ELASTIC_SLURM_DIR=$STATE" "/proc/$pid/environ" 2>/dev/null || return 1
    echo "$pid"
}

alive() { pid_of "$1" >/dev/null; }

# stop_pid NAME [SIGNAL] [GRACE_SECONDS]: signal daemon NAME (by its recorded PID only), wait
# for it to exit, SIGKILL it after the grace period. Removes the PID file.
stop_pid() {
    local name=$1 sig=${2:-TERM} grace=${3:-10} pid i
    if pid=$(pid_of "$name"); then
        kill -s "$sig" "$pid" 2>/dev/null || true
        for ((i = 0; i < grace * 10; i++)); do
            alive "$name" || break
            sleep 0.1
        done
        if alive "$name"; then
            log "$name (pid $pid) ignored SIG$sig for ${grace}s; SIGKILL"
            kill -s KILL "$pid" 2>/dev/null || true
            for ((i = 0; i < 50; i++)); do
                alive "$name" || break
                sleep 0.1
            done
        fi
    fi
    rm -f "$STATE/pids/$name.pid"
}

# Serialize start/stop between concurrent callers (several pytest sessions may share the
# cluster). Re-entrant through HPC_ELASTIC_SLURM_LOCKED (start.sh calls stop.sh).
take_lock() {
    [ "${HPC_ELASTIC_SLURM_LOCKED:-}" = 1 ] && return 0
    mkdir -p "$STATE"
    exec 9>"$STATE/.lock"
    flock -w 300 9 || die "could not lock $STATE/.lock within 300 s"
    export HPC_ELASTIC_SLURM_LOCKED=1
}
