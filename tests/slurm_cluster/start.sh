#!/usr/bin/env bash
# Start the private multi-node Slurm test cluster, or heal the running one.
#
#   tests/slurm_cluster/start.sh        # then: source $HPC_ELASTIC_SLURM_DIR/cluster.env
#
# NNODES nodes (n1...), each in network, mount and UTS namespaces of its own: its own address
# and host name on a private bridge, its own GlusterFS FUSE client of the shared volumes at
# $STATE/shared/<profile> (the same path on every node), its slurmd. A "head" namespace on the
# same bridge runs slurmctld, slurmdbd and MariaDB; the file server (glusterd) has its own
# ("fs"); the machine itself gets a login client of each volume at the same path, its FUSE
# process in the head's network. munged runs in the machine's namespaces (a unix socket,
# reachable from all). Nothing has a link to the machine's own network (README.md: why). All state, logs and PID files live under $STATE
# (default /tmp/hpc_elastic_slurm). Returns when every node is up in sinfo.
#
# Idempotent: with the cluster running and its configuration unchanged it heals: undoes the
# fault tools (partition, slowed link, frozen node), remounts dead filesystem clients,
# restarts what died (a power-cut node's slurmd) and resumes DOWN/DRAINED nodes. If the
# configuration changed (other node count, ports, template) the cluster is restarted.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=common.sh
. "$HERE/common.sh"

t_start=$(now)

# --- 0. programs ------------------------------------------------------------------------------
for prog in slurmctld slurmd slurmstepd sbatch scontrol sinfo munged flock setsid nsenter unshare \
    ip bridge tc glusterd gluster glusterfs mountpoint; do
    if ! command -v "$prog" >/dev/null; then
        log "$prog is missing; running install-deps.sh"
        bash "$HERE/install-deps.sh" >&2
        break
    fi
done
# settings, checked before anything is touched
[[ $NNODES =~ ^[0-9]+$ ]] && ((NNODES >= 1 && NNODES <= 80)) ||
    die "HPC_ELASTIC_SLURM_NODES=$NNODES: use 1..80 nodes"
[[ $CPUS_PER_NODE =~ ^[0-9]+$ ]] || die "HPC_ELASTIC_SLURM_CPUS=$CPUS_PER_NODE: a number of CPUs"
[[ $PORT_BASE =~ ^[0-9]+$ ]] || die "HPC_ELASTIC_SLURM_PORT_BASE=$PORT_BASE: a port number"
case " $SFS_PROFILES " in
    *" $FS_PROFILE "*) ;;
    *) die "HPC_ELASTIC_SLURM_FS_PROFILE=$FS_PROFILE: use one of: $SFS_PROFILES" ;;
esac
case $PROCTRACK in
    auto | cgroup | linuxproc | pgid) ;;
    *) die "HPC_ELASTIC_SLURM_PROCTRACK=$PROCTRACK: use auto, cgroup, linuxproc or pgid" ;;
esac
[ "$(id -u)" -eq 0 ] || die "must run as root (daemons, namespaces, FUSE mounts); we are $(id -un)"

take_lock
mkdir -p "$STATE"/{etc,pids,run,log,ctld,spool,munge}
chmod 700 "$STATE/munge"

# --- 1. network, file server, namespaces ------------------------------------------------------
# Names resolve through a private hosts file, bound over /etc/hosts in the head's and every
# node's mount namespace; the machine's /etc/hosts is not touched (and the nodes' addresses
# must never reach it: from the machine's own network they would be routed off the machine).
sfs_init "$STATE"
mkdir -p "$STATE/etc"
{
    printf '127.0.0.1 localhost\n%s %s %s\n' "$HEAD_ADDR" "$HEAD" "$(hostname -s)"
    for ((i = 1; i <= NNODES; i++)); do printf '%s %s\n' "$(node_addr "$i")" "$(node_name "$i")"; done
} >"$STATE/etc/hosts"
HOSTS_BIND="mount --bind '$STATE/etc/hosts' /etc/hosts"
t_fs=$(now)
sfs_server
sfs_node "$HEAD" 1 "$HOSTS_BIND"
for ((i = 1; i <= NNODES; i++)); do
    # its own host name too (UTS namespace): torch's gloo takes its address from it
    sfs_node "$(node_name "$i")" "$(node_octet "$i")" "$HOSTS_BIND" "$(node_name "$i")"
done
IN_HEAD=(nsenter --net="$(sfs_net "$HEAD")" --mount="$(sfs_mnt "$HEAD")" --)

# Undo the fault tools (fixture.py): a partitioned port forwards again, a slowed link is
# fast again, a frozen node's processes continue.
for ((i = 1; i <= NNODES; i++)); do
    name=$(node_name "$i")
    sfs_heal "$name"
    sfs_slow "$name" off
    sfs_kill_in "$name" CONT >/dev/null
done

# The volumes: the login clients (for the machine: pytest, sbatch's output files) and one
# client per node and volume; a dead client (killed, or its node power-cut) is replaced.
for v in $SFS_PROFILES; do
    sfs_mount "$HEAD" "$v" "$SHARED/$v" host || die "the login client of volume $v did not mount"
done
for ((i = 1; i <= NNODES; i++)); do
    for v in $SFS_PROFILES; do
        sfs_mount "$(node_name "$i")" "$v" "$SHARED/$v" ||
            die "$(node_name "$i"): volume $v did not mount"
    done
done
log "namespaces and file system ready in $(awk "BEGIN{printf \"%.2f\", $(now) - $t_fs}") s"

# Slurm client wrappers: a command run in one of the cluster's own network namespaces (a job
# on a node) is the real command; run anywhere else (pytest, a user's shell) it runs in the
# head's network namespace, where slurmctld and slurmdbd are. Never the real command outside
# our namespaces: from the machine's own network the cluster's addresses would be routed off
# the machine. (Decided by the namespace files' inodes: /proc/1/ns may be unreadable.)
mkdir -p "$STATE/bin"
for prog in sbatch srun salloc squeue scontrol scancel sinfo sacct sacctmgr sdiag sstat sattach \
    sprio sshare sreport strigger sbcast; do
    real=$(PATH=/usr/bin:/bin:/usr/sbin:/sbin command -v "$prog") || continue
    cat >"$STATE/bin/$prog.new" <<WRAPPER
#!/bin/sh
# $prog for the hpc_elastic test cluster (written by tests/slurm_cluster/start.sh)
me=\$(readlink /proc/self/ns/net)
for f in $STATE/ns/*.net; do
    [ "net:[\$(stat -L -c %i "\$f" 2>/dev/null)]" = "\$me" ] && exec $real "\$@"
done
exec nsenter --net=$(sfs_net "$HEAD") -- $real "\$@"
WRAPPER
    chmod 755 "$STATE/bin/$prog.new"
    mv -f "$STATE/bin/$prog.new" "$STATE/bin/$prog"
done
PATH="$STATE/bin:$PATH"

# --- 2. configuration --------------------------------------------------------------------------
CTLD_HOST=$(hostname -s)
CTLD_ADDR=$HEAD_ADDR
nodes_conf=""
for ((i = 1; i <= NNODES; i++)); do
    nodes_conf+="NodeName=$(node_name "$i") NodeHostname=$(node_name "$i") NodeAddr=$(node_addr "$i") Port=$(node_port "$i") CPUs=$CPUS_PER_NODE RealMemory=4096 State=UNKNOWN"$'\n'
done
NODELIST="${NODE_PREFIX}[1-$NNODES]"

# Accounting: slurmdbd + MariaDB unless switched off or the programs are missing.
use_acct=0
case $ACCOUNTING in
    0 | no | false) ;;
    *)
        if command -v slurmdbd >/dev/null && command -v mariadbd >/dev/null &&
            command -v mariadb-install-db >/dev/null && command -v mariadb >/dev/null; then
            use_acct=1
        elif [ "$ACCOUNTING" = 1 ]; then
            die "accounting required (HPC_ELASTIC_SLURM_ACCOUNTING=1) but slurmdbd/mariadb missing"
        fi
        ;;
esac

# render TEMPLATE: fill the @NAME@ placeholders
render() {
    local text
    text=$(<"$1")
    text=${text//@STATE@/$STATE}
    text=${text//@CLUSTER@/$CLUSTER}
    text=${text//@PARTITION@/$PARTITION}
    text=${text//@CTLD_HOST@/$CTLD_HOST}
    text=${text//@CTLD_ADDR@/$CTLD_ADDR}
    text=${text//@CTLD_PORT@/$CTLD_PORT}
    text=${text//@DBD_PORT@/$DBD_PORT}
    text=${text//@DB_PORT@/$DB_PORT}
    text=${text//@FIRST_SLURMD_PORT@/$FIRST_SLURMD_PORT}
    text=${text//@SLURMD_TIMEOUT@/$SLURMD_TIMEOUT}
    text=${text//@MESSAGE_TIMEOUT@/$MESSAGE_TIMEOUT}
    text=${text//@PROCTRACK@/$PROCTRACK}
    text=${text//@NODES@/$nodes_conf}
    text=${text//@NODELIST@/$NODELIST}
    text=${text//@ACCOUNTING@/$acct_conf}
    printf '%s\n' "$text"
}

# Process tracking: proctrack/cgroup (cgroup v1 freezer; each node gets its own slurm_<node>
# tree) kills every process of a step when it ends, as on a real cluster, including ones that
# left the process tree (setsid + reparenting: an agent's workers after the agent was
# SIGKILLed). proctrack/linuxproc needs no cgroups but loses such processes: they outlive
# the step (and, holding its output pipes, can keep it from ending).
if [ "$PROCTRACK" = auto ]; then
    PROCTRACK=linuxproc
    probe=/sys/fs/cgroup/freezer/hpc_elastic_probe.$$
    if [ -f /sys/fs/cgroup/freezer/cgroup.procs ] && mkdir "$probe" 2>/dev/null; then
        rmdir "$probe"
        PROCTRACK=cgroup
    fi
fi
case $PROCTRACK in
    cgroup | linuxproc | pgid) ;;
    *) die "HPC_ELASTIC_SLURM_PROCTRACK=$PROCTRACK: use auto, cgroup, linuxproc or pgid" ;;
esac

# make_conf: set new_conf (slurm.conf without FirstJobId, which changes on every fresh start)
# and its fingerprint for the current $use_acct.
make_conf() {
    if [ "$use_acct" = 1 ]; then
        acct_conf="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=$HEAD_ADDR
AccountingStoragePort=$DBD_PORT
# Not a password: with slurmdbd this names the MUNGE socket for talking to slurmdbd. Left
# out, clients (sacct, sacctmgr, slurmctld) use the system socket instead of AuthInfo's.
AccountingStoragePass=$STATE/munge/munge.socket
JobCompType=jobcomp/none"
    else
        # No slurmdbd: sacct does not work. Finished jobs are still listed by squeue/scontrol
        # for MinJobAge seconds and in a plain-text completion log.
        acct_conf="AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$STATE/log/jobcomp.txt"
    fi
    new_conf=$(render "$HERE/slurm.conf.in")
    fingerprint=$(printf '%s\n%s\n' "$new_conf" "$(render "$HERE/slurmdbd.conf.in")" | md5sum | cut -d' ' -f1)
}
make_conf
old_fingerprint=$(cat "$STATE/etc/fingerprint" 2>/dev/null || true)

if alive slurmctld && [ "$fingerprint" != "$old_fingerprint" ]; then
    log "configuration changed: restarting the cluster"
    bash "$HERE/stop.sh"
    # from the top (namespaces and mounts are gone too); we keep the lock (fd 9)
    exec bash "${BASH_SOURCE[0]}"
fi
mkdir -p "$STATE"/{etc,pids,run,log,ctld,spool,munge}

# launch NAME CMD...: start a daemon in the foreground of its own session (setsid: a Ctrl-C or
# a killed process group of the caller does not reach it), output to log/NAME.out, and record
# its PID. fd 9 (our lock) is closed for it, else the daemon would hold the lock for good.
# HPC_ELASTIC_SLURM_DIR in its environment marks it as ours (pid_of in common.sh).
#
# Returns only once the background child has exec'd the daemon (or died). Until its exec the
# child is a copy of this shell: its command line is start.sh's and its environment lacks the
# marker, so pid_of would call it "not ours" -- and a wait_until in that window reported
# "munged exited while starting" for a munged that was running fine (the start race of
# issue 13: it hit when the child was scheduled later than our first, failing, probe).
launch() {
    local name=$1 pid i
    shift
    HPC_ELASTIC_SLURM_DIR=$STATE setsid "$@" </dev/null >>"$STATE/log/$name.out" 2>&1 9>&- &
    pid=$!
    echo "$pid" >"$STATE/pids/$name.pid"
    for ((i = 0; i < 500; i++)); do
        alive "$name" && return 0
        running "$pid" || return 0 # exec failed or the daemon died at once: wait_until tells
        sleep 0.01
    done
    log "$name (pid $pid) did not exec within 5 s"
}

# running PID: the process exists and is not a zombie (whoever it is now)
running() {
    local stat
    # (read, not $(<...): under set -e a failed $(<file) ends the whole script)
    { read -r stat <"/proc/$1/stat"; } 2>/dev/null || return 1
    stat=${stat##*) } # after "PID (comm) ": the state letter first
    [ -n "$stat" ] && [ "${stat:0:1}" != Z ]
}

# wait_until SECONDS WHAT CMD...: poll CMD every 0.1 s. When WHAT is the name of a daemon we
# launched, give up as soon as that daemon has died.
wait_until() {
    local secs=$1 what=$2
    shift 2
    local deadline=$((SECONDS + secs))
    # a deadline in wall time: one probe can itself take seconds (a client retrying munge)
    while ((SECONDS < deadline)); do
        "$@" >/dev/null 2>&1 && return 0
        # died = its recorded process is gone (or a zombie): launch() waited for its exec
        if [ -s "$STATE/pids/$what.pid" ] && ! running "$(<"$STATE/pids/$what.pid")"; then
            log "$what exited while starting"
            return 1
        fi
        sleep 0.1
    done
    log "timed out after ${secs}s waiting for $what"
    return 1
}

# show_log FILE...: the end of daemon logs, for failures
show_log() {
    local f
    for f in "$@"; do
        [ -f "$f" ] && { log "--- tail of $f"; tail -n 25 "$f" >&2; }
    done
    return 0
}

# --- 3. munge: private key and socket ----------------------------------------------------------
MUNGE_SOCKET="$STATE/munge/munge.socket"
if [ ! -s "$STATE/munge/munge.key" ]; then
    (umask 077 && dd if=/dev/urandom of="$STATE/munge/munge.key" bs=1024 count=1 status=none)
fi
chmod 400 "$STATE/munge/munge.key"
munge_ok() { munge -S "$MUNGE_SOCKET" -n | unmunge -S "$MUNGE_SOCKET"; }
if ! alive munged; then
    rm -f "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock"
    # -F: foreground (we keep its PID); --force: /tmp is world-writable, munged would refuse
    launch munged munged -F --force --socket="$MUNGE_SOCKET" \
        --key-file="$STATE/munge/munge.key" --pid-file="$STATE/run/munged.pid" \
        --log-file="$STATE/log/munged.log" --seed-file="$STATE/munge/munged.seed"
    wait_until 10 munged munge_ok || { show_log "$STATE/log/munged.log" "$STATE/log/munged.out"; die "munged did not start"; }
fi

# --- 4. accounting: MariaDB + slurmdbd -----------------------------------------------------------
DB="$STATE/mysql"
DB_SOCKET="$DB/mysqld.sock"
db_ping() { mariadb-admin --no-defaults --socket="$DB_SOCKET" -uroot ping; }
db_sql() { mariadb --no-defaults --socket="$DB_SOCKET" -uroot -N -B -e "$1"; }
start_accounting() {
    if ! alive mariadbd; then
        if [ ! -d "$DB/data/mysql" ]; then
            rm -rf "$DB/data"
            mkdir -p "$DB/data"
            local t
            t=$(now)
            mariadb-install-db --no-defaults --user=root --datadir="$DB/data" \
                --auth-root-authentication-method=socket --skip-test-db \
                >"$STATE/log/mariadb-install.log" 2>&1 ||
                { show_log "$STATE/log/mariadb-install.log"; return 1; }
            log "MariaDB data directory created in $(awk "BEGIN{printf \"%.1f\", $(now) - $t}") s"
        fi
        rm -f "$DB_SOCKET"
        # Small and unsafe-but-fast settings: a throwaway test database.
        launch mariadbd "${IN_HEAD[@]}" mariadbd --no-defaults --user=root --datadir="$DB/data" \
            --socket="$DB_SOCKET" --pid-file="$STATE/run/mariadbd.pid" \
            --port="$DB_PORT" --bind-address=127.0.0.1 --skip-name-resolve \
            --log-error="$STATE/log/mariadb.log" --skip-log-bin \
            --innodb-buffer-pool-size=64M --innodb-log-file-size=16M \
            --innodb-flush-log-at-trx-commit=0 --innodb-doublewrite=0 \
            --innodb-use-native-aio=0 --performance-schema=0
        wait_until 60 MariaDB db_ping || { show_log "$STATE/log/mariadb.log"; return 1; }
        db_sql "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm';
                GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';" || return 1
    fi
    if ! alive slurmdbd; then
        # The first start creates the tables (a few seconds).
        # (slurmdbd has no -f: it reads slurmdbd.conf next to $SLURM_CONF)
        launch slurmdbd "${IN_HEAD[@]}" slurmdbd -D
        wait_until 60 slurmdbd sacctmgr -n show cluster ||
            { show_log "$STATE/log/slurmdbd.log" "$STATE/log/slurmdbd.out"; return 1; }
    fi
    if ! sacctmgr -n -P show cluster format=cluster | grep -qx "$CLUSTER"; then
        sacctmgr -i add cluster "$CLUSTER" >/dev/null || return 1
    fi
}

# --- 5. write the configuration; fresh start or heal? -------------------------------------------
fresh=0
alive slurmctld || fresh=1
if [ "$fresh" = 1 ]; then
    # slurmctld is gone: stop leftover slurmd so that every node registers with the new one.
    for f in "$STATE"/pids/slurmd-*.pid; do
        [ -e "$f" ] || continue
        n=$(basename "$f" .pid)
        stop_pid "$n" TERM 5
    done
fi
render "$HERE/slurmdbd.conf.in" >"$STATE/etc/slurmdbd.conf"
chmod 600 "$STATE/etc/slurmdbd.conf" # slurmdbd refuses a readable config (it holds a password)
# read by slurmd only with ProctrackType=proctrack/cgroup: freezer only, no constraints
printf 'CgroupPlugin=cgroup/v1\nCgroupMountpoint=/sys/fs/cgroup\nConstrainCores=no\nConstrainRAMSpace=no\n' \
    >"$STATE/etc/cgroup.conf"

acct_state=none
if [ "$use_acct" = 1 ]; then
    # sacctmgr/sacct read slurm.conf to find slurmdbd; a fresh start may still have an old one.
    if [ "$fresh" = 1 ]; then printf '%s\n' "$new_conf" >"$STATE/etc/slurm.conf"; fi
    if start_accounting; then
        acct_state=slurmdbd
    elif [ "$ACCOUNTING" = 1 ]; then
        die "accounting (slurmdbd + MariaDB) did not start"
    elif [ "$fresh" = 1 ]; then
        log "WARNING: accounting (slurmdbd + MariaDB) did not start; running without it (no sacct)"
        stop_pid slurmdbd TERM 5
        stop_pid mariadbd TERM 10
        # The next start.sh sees a changed fingerprint and tries accounting again.
        use_acct=0
        make_conf
    else
        log "WARNING: accounting (slurmdbd + MariaDB) is down and did not restart; sacct is stale"
        acct_state=broken
    fi
fi

if [ "$fresh" = 1 ]; then
    # A clean controller: no jobs of earlier runs (they would be requeued onto this cluster).
    # (dbd.messages -- accounting records slurmctld could not hand to slurmdbd -- is kept:
    # slurmctld sends them on start.)
    find "$STATE/ctld" -mindepth 1 -maxdepth 1 ! -name dbd.messages -exec rm -rf {} +
    rm -rf "${STATE:?}/spool"
    mkdir -p "$STATE/ctld" "$STATE/spool"
    # Job IDs continue after the highest one accounting has ever seen, so that sacct never
    # mixes a new job with an old one of the same ID.
    first_id=1
    if [ "$acct_state" = slurmdbd ]; then
        last_id=$(sacct -a -X -n -P -o JobIDRaw -S 2000-01-01 -E now 2>/dev/null |
            grep -Eo '^[0-9]+' | sort -n | tail -n 1 || true)
        [ -n "$last_id" ] && first_id=$((last_id + 1))
    fi
    printf '%s\nFirstJobId=%s\n' "$new_conf" "$first_id" >"$STATE/etc/slurm.conf"
    echo "$fingerprint" >"$STATE/etc/fingerprint"

    launch slurmctld "${IN_HEAD[@]}" slurmctld -D -f "$STATE/etc/slurm.conf"
    wait_until 30 slurmctld scontrol ping ||
        { show_log "$STATE/log/slurmctld.log" "$STATE/log/slurmctld.out"; die "slurmctld did not start"; }
fi

# --- 6. slurmd, one per node -------------------------------------------------------------------
for ((i = 1; i <= NNODES; i++)); do
    name=$(node_name "$i")
    alive "slurmd-$name" && continue
    mkdir -p "$STATE/spool/$name"
    # (nsenter, not `ip netns exec`: that remounts /sys, and slurmd then finds no cgroups)
    launch "slurmd-$name" nsenter --net="$(sfs_net "$name")" --mount="$(sfs_mnt "$name")" \
        --uts="$(sfs_uts "$name")" -- \
        slurmd -D -N "$name" -f "$STATE/etc/slurm.conf"
done

# --- 7. wait until every node is up ------------------------------------------------------------
# Healthy: idle / mixed / allocated / completing, no '*' (not responding), not down or drained.
# A node left DOWN or DRAINED by an earlier test is resumed once its slurmd answers.
nodes_up() {
    local states bad
    states=$(sinfo -h -N -p "$PARTITION" -o '%N %T' 2>/dev/null) || return 1
    [ "$(wc -l <<<"$states")" -ge "$NNODES" ] || return 1
    bad=$(awk '$2 !~ /^(idle|mixed|allocated|completing)$/' <<<"$states")
    [ -z "$bad" ]
}
resume_down_nodes() {
    local node state
    while read -r node state; do
        case ${state%\*} in # a trailing '*' means "not responding (yet)"
            down | drained | draining | drain | fail | failing)
                log "resuming $node (was $state)"
                scontrol update nodename="$node" state=resume 2>/dev/null || true
                ;;
        esac
    done < <(sinfo -h -N -p "$PARTITION" -o '%N %T' 2>/dev/null)
}
t_wait=$(now)
[ "$fresh" = 1 ] || resume_down_nodes
wait_until 30 "all nodes up" nodes_up || {
    sinfo -N -l >&2 || true
    show_log "$STATE/log/slurmctld.log" "$STATE"/log/slurmd-*.out
    die "nodes did not come up"
}

# --- 8. what clients need ----------------------------------------------------------------------
nodes_csv=$(for ((i = 1; i <= NNODES; i++)); do node_name "$i"; done | paste -sd, -)
cat >"$STATE/cluster.env" <<EOF
# source this file to use the hpc_elastic test cluster
export SLURM_CONF=$STATE/etc/slurm.conf
export PATH=$STATE/bin:\$PATH
export HPC_ELASTIC_SLURM_SHARED=$SHARED
export HPC_ELASTIC_SLURM_FS_PROFILE=$FS_PROFILE
export HPC_ELASTIC_SLURM_DIR=$STATE
export HPC_ELASTIC_SLURM_CLUSTER=$CLUSTER
export HPC_ELASTIC_SLURM_PARTITION=$PARTITION
export HPC_ELASTIC_SLURM_NODELIST=$nodes_csv
export HPC_ELASTIC_SLURM_ACCOUNTING=$acct_state
EOF
cat >"$STATE/cluster.json" <<EOF
{
  "state_dir": "$STATE",
  "slurm_conf": "$STATE/etc/slurm.conf",
  "cluster": "$CLUSTER",
  "partition": "$PARTITION",
  "nodes": [$(for ((i = 1; i <= NNODES; i++)); do printf '%s"%s"' "$([ "$i" -gt 1 ] && echo ', ')" "$(node_name "$i")"; done)],
  "node_addrs": {$(for ((i = 1; i <= NNODES; i++)); do printf '%s"%s": "%s"' "$([ "$i" -gt 1 ] && echo ', ')" "$(node_name "$i")" "$(node_addr "$i")"; done)},
  "cpus_per_node": $CPUS_PER_NODE,
  "shared": "$SHARED",
  "fs_profile": "$FS_PROFILE",
  "fs_profiles": [$(for v in $SFS_PROFILES; do printf '"%s" ' "$v"; done | sed 's/" "/", "/g; s/ $//')],
  "head": "$HEAD",
  "accounting": "$acct_state",
  "ports": {"slurmctld": $CTLD_PORT, "slurmdbd": $DBD_PORT, "mariadb": $DB_PORT, "first_slurmd": $FIRST_SLURMD_PORT}
}
EOF

t_end=$(now)
mode=$([ "$fresh" = 1 ] && echo started || echo "checked (already running)")
log "$mode: $NNODES nodes up, accounting=$acct_state, in $(awk "BEGIN{printf \"%.2f\", $t_end - $t_start}") s (nodes: $(awk "BEGIN{printf \"%.2f\", $t_end - $t_wait}") s); source $STATE/cluster.env"
