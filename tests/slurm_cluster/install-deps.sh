#!/usr/bin/env bash
# Install the Debian packages the private Slurm test cluster and the GlusterFS test server need
# (Debian 12: Slurm 22.05, MUNGE 0.5, MariaDB 10.11, GlusterFS 10.3, iproute2). Does nothing
# when every program is already there, so it is cheap to call before every test run. Needs
# root (apt-get); on a machine without apt-get it only reports what is missing.
set -euo pipefail

# program -> Debian package that ships it
declare -A PKG_OF=(
    [slurmctld]=slurmctld
    [slurmd]=slurmd
    [slurmstepd]=slurmd
    [sbatch]=slurm-client
    [sacct]=slurm-client
    [sacctmgr]=slurm-client
    [sdiag]=slurm-client
    [munged]=munge
    [munge]=munge
    [slurmdbd]=slurmdbd
    [mariadbd]=mariadb-server
    [mariadb-install-db]=mariadb-server
    [mariadb]=mariadb-client
    [mariadb-admin]=mariadb-client
    [flock]=util-linux
    [setsid]=util-linux
    [nsenter]=util-linux
    [unshare]=util-linux
    [mountpoint]=util-linux
    # the GlusterFS file server and FUSE client (tests/sharedfs), namespaces and links
    [glusterd]=glusterfs-server
    [glusterfsd]=glusterfs-common
    [gluster]=glusterfs-cli
    [glusterfs]=glusterfs-client
    [ip]=iproute2
    [bridge]=iproute2
    [tc]=iproute2
)

missing=()
for prog in "${!PKG_OF[@]}"; do
    # The daemons live in /usr/sbin, which a non-login PATH may lack.
    if ! PATH="$PATH:/usr/sbin:/sbin" command -v "$prog" >/dev/null 2>&1; then
        missing+=("${PKG_OF[$prog]}")
    fi
done

if [ ${#missing[@]} -eq 0 ]; then
    echo "install-deps: slurm, munge, slurmdbd, mariadb, glusterfs and iproute2 are installed"
    exit 0
fi

# unique package names, stable order
mapfile -t pkgs < <(printf '%s\n' "${missing[@]}" | sort -u)
echo "install-deps: installing ${pkgs[*]}"
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-deps: apt-get not found; install these packages by hand: ${pkgs[*]}" >&2
    exit 1
fi
SUDO=()
[ "$(id -u)" -eq 0 ] || SUDO=(sudo)

# policy-rc.d exit 101 keeps the packages' maintainer scripts from starting the *system*
# munge/mariadb/slurm/glusterd services during the install: the test cluster runs its own
# private daemons and must never depend on (or collide with) the system ones. Only added when no
# policy file exists, and removed afterwards.
policy=/usr/sbin/policy-rc.d
added_policy=0
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' | "${SUDO[@]}" tee "$policy" >/dev/null
    "${SUDO[@]}" chmod 755 "$policy"
    added_policy=1
fi
cleanup() { if [ "$added_policy" = 1 ]; then "${SUDO[@]}" rm -f "$policy"; fi; }
trap cleanup EXIT

"${SUDO[@]}" apt-get update -qq
"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    "${pkgs[@]}"
echo "install-deps: done"
