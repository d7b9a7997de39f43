#!/usr/bin/env bash
# A private GlusterFS "world" for tests: a bridge, a file server and any number of client
# "nodes", each in network namespaces of its own, all state under one directory. Sourced by
# tests/slurm_cluster/start.sh and stop.sh; run directly it is a small CLI (used by
# tests/sharedfs/__init__.py):
#
#   sharedfs.sh up STATE                     bridge + server (glusterd, volumes cached, coherent)
#   sharedfs.sh node STATE NAME ADDR [SETUP [HOST]]  netns NAME on the bridge (ADDR: last
#                                            octet) + mount ns (+ UTS ns with host name HOST)
#   sharedfs.sh mount STATE NAME PROFILE DIR [host]
#                                            a FUSE client in NAME's netns, mounted at DIR in
#                                            NAME's mount ns (or, with "host", in the caller's)
#   sharedfs.sh umount STATE NAME PROFILE    stop that client (by PID), unmount
#   sharedfs.sh rmnode STATE NAME            a node's clients, processes and namespaces
#   sharedfs.sh partition|heal STATE NAME    silent drop of NAME's bridge port / forward again
#   sharedfs.sh slow STATE NAME RATE|off     tbf on both ends of NAME's link (e.g. 1mbit)
#   sharedfs.sh down STATE                   everything under STATE, by PID and namespace
#
# Layout of STATE: ns/ (a private bind mount holding the namespace files NAME.net, NAME.mnt,
# NAME.uts),
# pids/ (PIDs we started), gluster/{lib,run,log} (bound over /var/lib/glusterd, /run,
# /var/log/glusterfs in the server's own mount namespace: the system's are never touched),
# bricks/<volume>, log/.
#
# Network: 10.199.0.0/24 on a bridge (br0) that lives in namespace "br"; the server "fs" is
# .2. None of these namespaces has a link to the machine's own network namespace or a route
# anywhere else, so nothing sent in them can leave them. Two worlds (two STATE directories) are
# independent: same addresses, separate bridges.
#
# Every process we start carries HPC_ELASTIC_TESTNS=STATE in its environment and is stopped by
# its recorded PID; in `down`/`rmnode` every process still inside one of our network
# namespaces (ours by construction) is killed too.

SFS_NET=${HPC_ELASTIC_SHAREDFS_NET:-10.199.0}
SFS_SERVER_ADDR=$SFS_NET.2
SFS_PROFILES="cached coherent"
# Gluster's performance translators; the coherent profile turns them all off.
SFS_PERF_XLATORS="stat-prefetch quick-read open-behind write-behind read-ahead io-cache readdir-ahead nl-cache"
# FUSE kernel caches off for the coherent profile (client binary: `mount -o fopen-keep-cache=off`
# is broken in glusterfs 10.3).
SFS_COHERENT_CLIENT_ARGS="--attribute-timeout=0 --entry-timeout=0 --negative-timeout=0 --fopen-keep-cache=off"
PATH="$PATH:/usr/sbin:/sbin"

sfs_log() { printf 'sharedfs: %s\n' "$*" >&2; }
sfs_die() {
    sfs_log "ERROR: $*"
    exit 1
}
sfs_now() { date +%s.%3N; }

sfs_init() { # STATE
    S=$1
    [ -n "$S" ] || sfs_die "no state directory"
    mkdir -p "$S"/{ns,pids,log,gluster/lib,gluster/run,gluster/log,bricks}
    # Namespace files can only be bind-mounted below a private mount: make ns/ one.
    if ! mountpoint -q "$S/ns"; then
        mount --bind "$S/ns" "$S/ns"
        mount --make-private "$S/ns"
    fi
}

sfs_is_ns() { [ "$(stat -f -c %T "$1" 2>/dev/null)" = nsfs ]; }
sfs_net() { echo "$S/ns/$1.net"; }
sfs_mnt() { echo "$S/ns/$1.mnt"; }
# in_net NAME CMD...: run CMD in namespace NAME's network (mounts: the caller's)
sfs_in_net() {
    local n=$1
    shift
    nsenter --net="$(sfs_net "$n")" -- "$@"
}

sfs_netns() { # NAME: its network namespace (loopback up)
    local f
    f=$(sfs_net "$1")
    sfs_is_ns "$f" && return 0
    : >"$f"
    unshare --net="$f" ip link set lo up
}

sfs_mntns() { # NAME [SETUP-COMMAND]: its mount namespace, private propagation
    local f
    f=$(sfs_mnt "$1")
    sfs_is_ns "$f" && return 0
    : >"$f"
    unshare --mount="$f" --propagation private sh -c "${2:-true}"
}

sfs_bridge() {
    # A guard in the machine's own network namespace: if anything there ever addresses one of
    # our nodes (a wrapper that did not enter a namespace, a stray MASTER_ADDR), it fails at once
    # with "no route to host" instead of leaving through the default gateway -- which happened
    # once while the cluster was being built. Left in place on stop: it routes nothing, and
    # other worlds (other STATE directories) share the same addresses.
    ip route replace unreachable "$SFS_NET.0/24" 2>/dev/null ||
        sfs_log "warning: could not add the guard route 'unreachable $SFS_NET.0/24'"
    sfs_netns br
    sfs_in_net br ip link show br0 >/dev/null 2>&1 && return 0
    sfs_in_net br ip link add br0 type bridge
    sfs_in_net br ip link set br0 up
}

sfs_attach() { # NAME OCTET: veth NAME:eth0 <-> br:p-NAME, address $SFS_NET.OCTET
    local n=$1 addr=$SFS_NET.$2
    sfs_netns "$n"
    sfs_in_net br ip link show "p-$n" >/dev/null 2>&1 && return 0
    sfs_in_net br ip link add "p-$n" type veth peer name eth0 netns "$(sfs_net "$n")"
    sfs_in_net br ip link set "p-$n" master br0 up
    sfs_in_net "$n" ip addr add "$addr/24" dev eth0
    sfs_in_net "$n" ip link set eth0 up
}

# pid_of NAME: the PID recorded for NAME if that process is alive, not a zombie and carries
# our marker (a recycled PID does not).
sfs_pid_of() {
    local f="$S/pids/$1.pid" pid stat
    [ -s "$f" ] || return 1
    pid=$(<"$f")
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    # (read, not $(<...): under set -e a failed $(<file) ends the whole script)
    { read -r stat <"/proc/$pid/stat"; } 2>/dev/null || return 1
    stat=${stat##*) }
    [ "${stat:0:1}" != Z ] || return 1
    grep -qzxF "HPC_ELASTIC_TESTNS=$S" "/proc/$pid/environ" 2>/dev/null || return 1
    echo "$pid"
}

# start NAME CMD...: CMD in the background in its own session; PID recorded once it has
# exec'd (before that it is a copy of this shell, without the marker).
sfs_start() {
    local name=$1 pid i
    shift
    HPC_ELASTIC_TESTNS=$S setsid "$@" </dev/null >>"$S/log/$name.out" 2>&1 9>&- &
    pid=$!
    echo "$pid" >"$S/pids/$name.pid"
    for ((i = 0; i < 500; i++)); do
        sfs_pid_of "$name" >/dev/null && return 0
        [ -e "/proc/$pid" ] || return 0
        sleep 0.01
    done
}

sfs_stop() { # NAME [SIGNAL] [GRACE]: by its recorded PID only; SIGKILL after GRACE seconds
    local name=$1 sig=${2:-TERM} grace=${3:-5} pid i
    if pid=$(sfs_pid_of "$name"); then
        kill -s "$sig" "$pid" 2>/dev/null || true
        for ((i = 0; i < grace * 20; i++)); do
            sfs_pid_of "$name" >/dev/null || break
            sleep 0.05
        done
        kill -s KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$S/pids/$name.pid"
}

# pids_in NAME: every process in network namespace NAME (a zombie has no namespace links).
# One find, not a readlink per process: this runs often, with hundreds of processes around.
sfs_pids_in() {
    local f
    f=$(sfs_net "$1")
    sfs_is_ns "$f" || return 0
    # (find fails on processes that end meanwhile: not an error here)
    { find /proc/[0-9]*/ns/net -maxdepth 0 -lname "net:\[$(stat -L -c %i "$f")\]" 2>/dev/null ||
        true; } | cut -d/ -f3
}

# kill_in NAME SIGNAL: signal every process in NAME's network namespace; prints their PIDs
sfs_kill_in() {
    local pids
    pids=$(sfs_pids_in "$1")
    [ -n "$pids" ] || return 0
    # shellcheck disable=SC2086
    kill -s "$2" $pids 2>/dev/null || true
    echo "$pids"
}

# sweep NAME: TERM, then KILL whatever is left in NAME's network namespace
sfs_sweep() {
    local i
    [ -n "$(sfs_kill_in "$1" TERM)" ] || return 0
    for ((i = 0; i < 40; i++)); do
        [ -z "$(sfs_pids_in "$1")" ] && return 0
        sleep 0.05
    done
    sfs_kill_in "$1" KILL >/dev/null
    for ((i = 0; i < 40; i++)); do
        [ -z "$(sfs_pids_in "$1")" ] && return 0
        sleep 0.05
    done
    sfs_log "processes left in namespace $1: $(sfs_pids_in "$1" | paste -sd' ')"
}

sfs_gluster() { nsenter --net="$(sfs_net fs)" --mount="$(sfs_mnt fs)" -- gluster --mode=script "$@"; }

sfs_wait() { # SECONDS WHAT CMD...
    local secs=$1 what=$2 deadline
    shift 2
    deadline=$((SECONDS + secs))
    while ((SECONDS < deadline)); do
        "$@" >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    sfs_log "timed out after ${secs}s waiting for $what"
    return 1
}

# server: glusterd + one single-brick volume per profile, in namespace "fs"
sfs_server() {
    local v t
    sfs_bridge
    sfs_attach fs 2
    # glusterd's state directories, private to its own mount namespace. All of /run: glusterd
    # also makes /run/glusterd.socket, which its CLI finds first -- shared, a second world's
    # CLI would drive the first one's glusterd.
    mkdir -p "$S/gluster/run/gluster"
    sfs_mntns fs "mkdir -p /var/lib/glusterd /var/log/glusterfs &&
        mount --bind '$S/gluster/lib' /var/lib/glusterd &&
        mount --bind '$S/gluster/run' /run &&
        mount --bind '$S/gluster/log' /var/log/glusterfs"
    # Option groups. Both: a partitioned client loses its locks after ~5 s, not 42 s (turn 2).
    mkdir -p "$S/gluster/lib/groups"
    # network.ping-timeout 10 (default 42): a partitioned client's calls hang that long.
    printf '%s\n' server.keepalive-time=3 server.keepalive-interval=1 server.keepalive-count=3 \
        server.tcp-user-timeout=6 network.ping-timeout=10 >"$S/gluster/lib/groups/hpce-cached"
    { cat "$S/gluster/lib/groups/hpce-cached"; for x in $SFS_PERF_XLATORS; do echo "performance.$x=off"; done; } \
        >"$S/gluster/lib/groups/hpce-coherent"
    if ! sfs_pid_of glusterd >/dev/null; then
        t=$(sfs_now)
        # -N: no daemon, so its PID is the one we record
        sfs_start glusterd nsenter --net="$(sfs_net fs)" --mount="$(sfs_mnt fs)" -- \
            glusterd -N --log-file="$S/gluster/log/glusterd.log"
        sfs_wait 60 glusterd sfs_gluster volume list ||
            { tail -n 20 "$S/gluster/log/glusterd.log" >&2 || true; sfs_die "glusterd did not start"; }
        sfs_log "glusterd up in $(awk "BEGIN{printf \"%.1f\", $(sfs_now) - $t}") s"
    fi
    # volumes checked already under this glusterd: skip ~4 CLI calls of ~0.5-2 s each
    local gpid
    gpid=$(sfs_pid_of glusterd)
    [ "$(cat "$S/pids/volumes-ok" 2>/dev/null)" = "$gpid" ] && return 0
    for v in $SFS_PROFILES; do
        if ! sfs_gluster volume info "$v" >/dev/null 2>&1; then
            mkdir -p "$S/bricks/$v"
            # the CLI refuses 127.0.0.1 as the brick host; force: the brick is on the root fs
            sfs_gluster volume create "$v" transport tcp "$SFS_SERVER_ADDR:$S/bricks/$v" force >/dev/null
            # One CLI call per option group (each call costs ~1 s on a busy machine): the
            # groups are files in glusterd's private /var/lib/glusterd/groups.
            sfs_gluster volume set "$v" group "hpce-$v" >/dev/null
        fi
        if ! sfs_gluster volume status "$v" >/dev/null 2>&1; then
            sfs_gluster volume start "$v" force >/dev/null
        fi
    done
    echo "$gpid" >"$S/pids/volumes-ok"
}

sfs_node() { # NAME OCTET [MNT-SETUP [HOSTNAME]]: netns on the bridge + own mount namespace
    sfs_bridge
    sfs_attach "$1" "$2"
    sfs_mntns "$1" "${3:-true}"
    if [ -n "${4:-}" ]; then sfs_utsns "$1" "$4"; fi
}

# utsns NAME HOSTNAME: a UTS namespace of its own, so that the node has its own host name
# (torch's gloo resolves the host name for its own address, as on a real cluster)
sfs_uts() { echo "$S/ns/$1.uts"; }
sfs_utsns() {
    local f
    f=$(sfs_uts "$1")
    sfs_is_ns "$f" && return 0
    : >"$f"
    unshare --uts="$f" hostname "$2"
}

# in_mnt NAME|host CMD...: run CMD in that mount namespace
sfs_in_mnt() {
    local m=$1
    shift
    if [ "$m" = host ]; then "$@"; else nsenter --mount="$(sfs_mnt "$m")" -- "$@"; fi
}

sfs_mounted() { # MNT DIR: a live (answering) FUSE mount at DIR
    [ "$(sfs_in_mnt "$1" timeout 5 stat -f -c %T "$2" 2>/dev/null)" = fuseblk ] &&
        sfs_in_mnt "$1" timeout 5 stat "$2" >/dev/null 2>&1
}

sfs_unmount_all() { # MNT DIR: lazily unmount everything stacked on DIR
    local i
    for ((i = 0; i < 10; i++)); do sfs_in_mnt "$1" umount -l "$2" 2>/dev/null || return 0; done
}

# mount NAME PROFILE DIR [host]: a FUSE client of volume PROFILE in NAME's network namespace,
# at DIR in NAME's mount namespace (or the caller's with "host"). Idempotent; a dead client's
# stale mount is lazily unmounted first.
sfs_mount() {
    local n=$1 v=$2 dir=$3 m=${4:-$1} name extra=""
    name="client-$n-$v"
    case " $SFS_PROFILES " in *" $v "*) ;; *) sfs_die "unknown profile '$v' (cached or coherent)" ;; esac
    if sfs_pid_of "$name" >/dev/null && sfs_mounted "$m" "$dir"; then return 0; fi
    sfs_stop "$name" KILL 2
    mkdir -p "$dir"
    # whatever is mounted there (a dead client's mount, or a copy of the host's mount that a
    # new mount namespace inherited) goes first
    # (not `mountpoint`: it stats the directory, which fails on a dead client's mount)
    sfs_unmount_all "$m" "$dir"
    [ "$v" = coherent ] && extra=$SFS_COHERENT_CLIENT_ARGS
    local ns_args=(--net="$(sfs_net "$n")") try
    [ "$m" = host ] || ns_args+=(--mount="$(sfs_mnt "$m")")
    # The client gives up at once if it cannot reach glusterd ("Exhausted all volfile
    # servers"): a link just created may not carry packets yet, glusterd may not listen yet.
    sfs_wait 30 "glusterd from $n" sfs_in_net "$n" bash -c "exec 3<>/dev/tcp/$SFS_SERVER_ADDR/24007" ||
        return 1
    for try in 1 2 3; do
        # shellcheck disable=SC2086
        sfs_start "$name" nsenter "${ns_args[@]}" -- glusterfs -N \
            --volfile-server="$SFS_SERVER_ADDR" --volfile-id="/$v" $extra \
            --log-file="$S/log/$name.log" "$dir"
        if sfs_wait_mount 30 "$name" "$m" "$dir"; then
            echo "$m $dir" >"$S/pids/$name.mnt"
            return 0
        fi
        sfs_stop "$name" KILL 2
        sfs_unmount_all "$m" "$dir"
        sfs_log "$name: no mount (try $try of 3)"
    done
    tail -n 20 "$S/log/$name.log" >&2 || true
    return 1
}

# wait_mount SECONDS NAME MNT DIR: until the client's mount answers; early out if it died
sfs_wait_mount() {
    local deadline=$((SECONDS + $1))
    while ((SECONDS < deadline)); do
        sfs_mounted "$3" "$4" && return 0
        sfs_pid_of "$2" >/dev/null || return 1
        sleep 0.1
    done
    return 1
}

sfs_umount() { # NAME PROFILE
    local name="client-$1-$2" m dir
    sfs_stop "$name" TERM 5
    if [ -s "$S/pids/$name.mnt" ]; then
        read -r m dir <"$S/pids/$name.mnt"
        if [ "$m" = host ] || sfs_is_ns "$(sfs_mnt "$m")"; then
            sfs_unmount_all "$m" "$dir"
        fi
        rm -f "$S/pids/$name.mnt"
    fi
}

sfs_rmnode() { # NAME
    local n=$1 f
    for f in "$S/pids/client-$n-"*.pid; do
        [ -e "$f" ] || continue
        f=$(basename "$f" .pid)
        sfs_umount "$n" "${f#client-"$n"-}"
    done
    sfs_sweep "$n"
    if sfs_is_ns "$(sfs_net br)"; then sfs_in_net br ip link del "p-$n" 2>/dev/null || true; fi
    for f in "$(sfs_net "$n")" "$(sfs_mnt "$n")" "$(sfs_uts "$n")"; do
        if sfs_is_ns "$f"; then umount "$f" || umount -l "$f"; fi
        rm -f "$f"
    done
}

sfs_partition() { sfs_in_net br bridge link set dev "p-$1" state 0; } # silent drop
sfs_heal() { sfs_in_net br bridge link set dev "p-$1" state 3; }      # forwarding

sfs_slow() { # NAME RATE|off: token bucket on both ends of NAME's link (netem: not in this kernel)
    local n=$1 rate=$2
    sfs_in_net br tc qdisc del dev "p-$n" root 2>/dev/null || true
    sfs_in_net "$n" tc qdisc del dev eth0 root 2>/dev/null || true
    [ "$rate" = off ] && return 0
    sfs_in_net br tc qdisc add dev "p-$n" root tbf rate "$rate" burst 16kbit latency 500ms
    sfs_in_net "$n" tc qdisc add dev eth0 root tbf rate "$rate" burst 16kbit latency 500ms
}

# down: every client, the server, every namespace, the ns/ mount; nothing left under STATE
sfs_down() {
    local f n
    [ -d "$S" ] || return 0
    for f in "$S"/pids/client-*.pid; do
        [ -e "$f" ] || continue
        f=$(basename "$f" .pid)
        f=${f#client-}
        sfs_umount "${f%-*}" "${f##*-}"
    done
    sfs_stop glusterd TERM 5
    for f in "$S"/ns/*.net; do
        [ -e "$f" ] || continue
        n=$(basename "$f" .net)
        [ "$n" = br ] || sfs_rmnode "$n"
    done
    for f in "$S"/ns/*.mnt "$S"/ns/*.uts; do
        [ -e "$f" ] || continue
        f=$(basename "$f")
        sfs_rmnode "${f%.*}"
    done
    sfs_rmnode br
    if mountpoint -q "$S/ns"; then umount "$S/ns" || umount -l "$S/ns"; fi
    rm -f "$S"/pids/*.pid "$S"/pids/*.mnt "$S/pids/volumes-ok"
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    set -euo pipefail
    cmd=${1:-}
    [ $# -ge 2 ] || sfs_die "usage: sharedfs.sh up|node|mount|umount|rmnode|partition|heal|slow|down STATE ..."
    [ "$(id -u)" -eq 0 ] || sfs_die "must run as root (namespaces, FUSE mounts)"
    if [ "$cmd" = down ]; then
        S=$2
        [ -d "$S" ] || exit 0
    else
        sfs_init "$2"
    fi
    shift 2
    exec 9>"$S/.lock"
    flock -w 120 9 || sfs_die "could not lock $S/.lock"
    case $cmd in
        up) sfs_server ;;
        node) sfs_node "$@" ;;
        mount) sfs_mount "$@" ;;
        umount) sfs_umount "$@" ;;
        rmnode) sfs_rmnode "$@" ;;
        partition) sfs_partition "$@" ;;
        heal) sfs_heal "$@" ;;
        slow) sfs_slow "$@" ;;
        down) sfs_down ;;
        *) sfs_die "unknown command $cmd" ;;
    esac
fi
