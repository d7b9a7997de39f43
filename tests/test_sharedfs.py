"""The GlusterFS test helper (tests/sharedfs): independent clients, faults, clean teardown."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
from sharedfs import Clients, SharedFS

pytestmark = pytest.mark.sharedfs

# Holds an exclusive flock on argv[1] and prints "locked" until its stdin closes.
HOLD_LOCK = (
    "import fcntl, sys; f = open(sys.argv[1], 'a'); fcntl.flock(f, fcntl.LOCK_EX); "
    "print('locked', flush=True); sys.stdin.read()"
)
TRY_LOCK = (
    "import fcntl, sys; f = open(sys.argv[1], 'a')\n"
    "try:\n    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)\nexcept OSError:\n    sys.exit(1)\n"
)


def python(fs: Clients, i: int, code: str, *args: str, timeout: float = 30):
    return fs.run(i, ["python3", "-c", code, *args], timeout=timeout)


def test_three_clients_share_one_volume_at_one_path(sharedfs_clients) -> None:
    fs = sharedfs_clients(3, "coherent")
    pids = {fs.client_pid(i) for i in range(3)}
    assert None not in pids and len(pids) == 3, "three distinct FUSE client processes"
    (fs.path / "from-test").write_text("hello")
    for i in range(3):
        assert fs.run(i, ["cat", fs.path / "from-test"]).stdout == "hello"
        # a node's own mount is a FUSE (glusterfs) mount, not the test's
        assert fs.run(i, ["stat", "-f", "-c", "%T", fs.path]).stdout.strip() == "fuseblk"
    fs.run(1, ["sh", "-c", f"echo from-1 > {fs.path}/from-1"], check=True)
    assert fs.run(2, ["cat", fs.path / "from-1"]).stdout == "from-1\n"  # coherent: at once


def test_flock_conflicts_across_clients(sharedfs_clients) -> None:
    fs = sharedfs_clients(2, "coherent")
    lock = fs.path / "lock"
    holder = fs.popen(0, ["python3", "-c", HOLD_LOCK, lock], stdin=subprocess.PIPE,
                      stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert python(fs, 1, TRY_LOCK, str(lock)).returncode == 1, "node 1 got node 0's lock"
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    assert python(fs, 1, TRY_LOCK, str(lock)).returncode == 0, "lock not free after release"


def test_killed_client_and_remount(sharedfs_clients) -> None:
    fs = sharedfs_clients(2, "cached")
    (fs.path / "f").write_text("x")
    fs.kill_client(0)
    # ECONNABORTED for the call the client was killed under (seen in CI), ENOTCONN after that
    for _ in range(2):
        dead = fs.run(0, ["stat", fs.path / "f"])
        assert dead.returncode != 0 and (
            "not connected" in dead.stderr or "connection abort" in dead.stderr
        ), dead.stderr
    assert "not connected" in dead.stderr, dead.stderr
    assert fs.run(1, ["cat", fs.path / "f"]).stdout == "x", "the other client is unaffected"
    fs.remount(0)
    assert fs.run(0, ["cat", fs.path / "f"]).stdout == "x"


def test_partition_and_heal(sharedfs_clients) -> None:
    fs = sharedfs_clients(2, "coherent")
    (fs.path / "f").write_text("x")
    t0 = time.monotonic()
    fs.partition(0)
    try:
        # node 0's client cannot reach the server: a read hangs (a process waiting on FUSE
        # cannot even be killed) until the client gives up after network.ping-timeout
        hung = fs.popen(0, ["cat", fs.path / "f"], stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE, text=True)
        time.sleep(3)
        assert hung.poll() is None, "a partitioned client answered"
        fs.run(1, ["sh", "-c", f"echo y > {fs.path}/g"], check=True, timeout=10)  # node 1 goes on
    finally:
        fs.heal(0)
    hung.communicate(timeout=120)
    print(f"partitioned read ended after {time.monotonic() - t0:.1f} s (rc {hung.returncode})")
    deadline = time.monotonic() + 60
    read_g = ["timeout", "-s", "KILL", "20", "cat", fs.path / "g"]
    while (back := fs.run(0, read_g)).stdout != "y\n":
        assert time.monotonic() < deadline, f"node 0 not back after heal: {back.stderr}"
        time.sleep(0.5)
    print(f"node 0 reads again {time.monotonic() - t0:.1f} s after the partition")


def test_start_and_stop_leave_nothing_behind(tmp_path: Path) -> None:
    """A second, private server: after stop no process, mount or namespace of it is left."""
    fs = SharedFS(Path(f"/tmp/hpce-sfs-t{tmp_path.name[-6:]}")).start()
    try:
        clients = fs.clients(2, "cached")
        (clients.path / "x").write_text("x")
        state = str(fs.state)
        assert processes_under(state) and mounts_under(state)
    finally:
        fs.stop()
    assert processes_under(state) == []
    assert mounts_under(state) == []
    assert not Path(state).exists()


def processes_under(state: str) -> list[int]:
    """Live processes marked as started for ``state`` or naming it on their command line."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue
            env = (proc / "environ").read_bytes().split(b"\0")
            cmd = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if f"HPC_ELASTIC_TESTNS={state}".encode() in env or state.encode() in cmd:
            found.append(int(proc.name))
    return found


def mounts_under(state: str) -> list[str]:
    return [line for line in Path("/proc/self/mountinfo").read_text().splitlines()
            if state in line]


def test_the_machine_has_no_way_out_to_the_test_network(sharedfs_clients) -> None:
    """Nothing in the machine's own network namespace can reach the server or a node: an address
    of the test network answers 'unreachable' there instead of leaving by the default route."""
    sharedfs_clients(1, "coherent")
    net = "10.199.0"  # sharedfs.sh's SFS_NET default
    for addr in (f"{net}.2", f"{net}.10"):
        route = subprocess.run(["ip", "route", "get", addr], capture_output=True, text=True)
        assert route.returncode != 0 or route.stdout.startswith("unreachable"), route.stdout
