"""The Slurm test cluster's nodes and fault tools (tests/slurm_cluster): each fault does what it
says, heal() undoes it, and start/stop leave nothing behind. Times measured here are printed
(run with -s) and written down in tests/slurm_cluster/README.md."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from slurm_cluster.fixture import START, STOP, SlurmCluster

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def wait_for(what: str, check: Callable[[], object], timeout: float, poll: float = 0.2) -> float:
    """Seconds until ``check()`` is true; fails after ``timeout``."""
    t0 = time.monotonic()
    while not check():
        assert time.monotonic() - t0 < timeout, f"no {what} within {timeout} s"
        time.sleep(poll)
    return time.monotonic() - t0


def idle_node(cluster: SlurmCluster) -> str:
    """The last node, once idle (faults are tried on it; jobs usually land on the first)."""
    node = cluster.nodes[-1]
    wait_for(f"{node} idle", lambda: cluster.node_states().get(node) == "idle", 60)
    return node


def can_connect(cluster: SlurmCluster, from_node: str, addr: str, port: int) -> bool:
    """A TCP connection from ``from_node`` to addr:port succeeds within 3 s."""
    probe = f"exec 3<>/dev/tcp/{addr}/{port}"
    return cluster.on_node(from_node, ["timeout", "-s", "KILL", "3", "bash", "-c", probe],
                           check=False).returncode == 0


def slurmd_port(cluster: SlurmCluster, node: str) -> int:
    line = cluster.run(["scontrol", "show", "node", node, "-o"]).stdout
    return int(next(t for t in line.split() if t.startswith("Port=")).split("=")[1])


def test_nodes_are_namespaces_with_their_own_address_name_and_client(
    slurm_cluster: SlurmCluster, tmp_path: Path
) -> None:
    probe = tmp_path / "probe"
    probe.write_text("written by the test process")
    seen = {}
    for node in slurm_cluster.nodes:
        out = slurm_cluster.on_node(node, [
            "sh", "-c", f"hostname; hostname -I; stat -f -c %T {tmp_path}; cat {probe}"]).stdout
        seen[node] = out.split("\n")
        host, addr, fstype, text = seen[node][:4]
        assert host == node and addr.strip() == slurm_cluster.node_addrs[node], seen[node]
        assert fstype == "fuseblk" and text == "written by the test process", seen[node]
    clients = {slurm_cluster.fs_client_pid(n) for n in slurm_cluster.nodes}
    assert None not in clients and len(clients) == len(slurm_cluster.nodes), "one client each"
    # the test process's tmp_path is on the shared volume too, through its own (login) client
    assert tmp_path.is_relative_to(slurm_cluster.shared_dir())


def test_partition_marks_the_node_down_and_cuts_it_off_until_reconnected(
    slurm_cluster: SlurmCluster,
) -> None:
    node, other = idle_node(slurm_cluster), slurm_cluster.nodes[0]
    addr, port = slurm_cluster.node_addrs[node], slurmd_port(slurm_cluster, node)
    assert can_connect(slurm_cluster, other, addr, port), "reachable before the partition"
    t0 = time.monotonic()
    slurm_cluster.partition_node(node)
    try:
        assert not can_connect(slurm_cluster, other, addr, port), f"{other} still reaches {node}"
        state = slurm_cluster.wait_node_state(node, ["down*"], timeout=120)
        down = time.monotonic() - t0
        assert slurm_cluster.slurmd_pid(node) is not None, "a partition kills nothing"
        # the node's own filesystem client is cut off too: a lookup hangs (unkillable)
        stuck = subprocess.Popen(["nsenter", f"--mount={slurm_cluster.mntns(node)}", "--", "stat",
                                  str(slurm_cluster.shared_dir() / "nonexistent")],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(2)
        assert stuck.poll() is None, "a partitioned node's filesystem answered"
    finally:
        slurm_cluster.reconnect_node(node)
    healed = time.monotonic()
    assert can_connect(slurm_cluster, other, addr, port), f"{other} cannot reach {node} again"
    stuck.wait(timeout=60)
    back = wait_for(f"{node} back in service",
                    lambda: slurm_cluster.node_states().get(node) == "idle", 120)
    print(f"partition: {state} after {down:.1f} s; idle {back:.1f} s after the heal"
          f" ({time.monotonic() - healed:.1f} s)")


def test_power_cut_kills_everything_on_the_node_and_heal_restores_it(
    slurm_cluster: SlurmCluster, tmp_path: Path
) -> None:
    node = idle_node(slurm_cluster)
    before = slurm_cluster.node_processes(node)
    slurmd, client = slurm_cluster.slurmd_pid(node), slurm_cluster.fs_client_pid(node)
    assert slurmd in before and client in before
    t0 = time.monotonic()
    killed = slurm_cluster.power_cut(node)
    assert set(before) <= set(killed)
    gone = wait_for("every process of the node gone",
                    lambda: not slurm_cluster.node_processes(node), 10, poll=0.05)
    state = slurm_cluster.wait_node_state(node, ["down*"], timeout=120)
    down = time.monotonic() - t0
    t1 = time.monotonic()
    slurm_cluster.heal()
    healed = time.monotonic() - t1
    assert slurm_cluster.node_states()[node] == "idle"
    assert slurm_cluster.fs_client_pid(node) not in (None, client), "a new filesystem client"
    job = slurm_cluster.sbatch("-w", node, "-N1", "--time=1", f"--output={tmp_path}/%j.out",
                               "--wrap", f"hostname > {tmp_path}/ran")
    assert slurm_cluster.wait_job(job, timeout=60) == "COMPLETED"
    assert (tmp_path / "ran").read_text().strip() == node
    print(f"power cut: all gone in {gone:.2f} s, {state} after {down:.1f} s, heal {healed:.1f} s")


def test_freeze_stops_the_node_and_thaw_brings_it_back(slurm_cluster: SlurmCluster) -> None:
    node = idle_node(slurm_cluster)
    t0 = time.monotonic()
    frozen = slurm_cluster.freeze(node)
    try:
        assert slurm_cluster.slurmd_pid(node) in frozen
        # SIGSTOP takes effect when the process is next scheduled: on a loaded machine a
        # running one may still show R for a moment.
        wait_for("every process of the node stopped (T)",
                 lambda: stopped_states(frozen) == {"T"}, 10)
        state = slurm_cluster.wait_node_state(node, ["down*"], timeout=120)
        down = time.monotonic() - t0
    finally:
        slurm_cluster.thaw(node)
    t1 = time.monotonic()
    back = wait_for(f"{node} back in service",
                    lambda: slurm_cluster.node_states().get(node) == "idle", 120)
    print(f"freeze: {state} after {down:.1f} s; idle {back:.1f} s after the thaw")
    assert time.monotonic() - t1 < 120


def test_killed_filesystem_client_fails_on_that_node_only_until_heal(
    slurm_cluster: SlurmCluster, tmp_path: Path
) -> None:
    node, other = slurm_cluster.nodes[-1], slurm_cluster.nodes[0]
    (tmp_path / "f").write_text("x")
    assert slurm_cluster.kill_fs_client(node) is not None
    try:
        # ECONNABORTED for the call the client was killed under, ENOTCONN after that
        for _ in range(2):
            dead = slurm_cluster.on_node(node, ["cat", tmp_path / "f"], check=False)
            assert dead.returncode != 0 and (
                "not connected" in dead.stderr or "connection abort" in dead.stderr
            ), dead.stderr
        assert "not connected" in dead.stderr, dead.stderr
        assert slurm_cluster.on_node(other, ["cat", tmp_path / "f"]).stdout == "x"
        assert slurm_cluster.node_states()[node] in ("idle", "mixed"), "Slurm does not notice"
    finally:
        t0 = time.monotonic()
        slurm_cluster.heal()
    assert slurm_cluster.on_node(node, ["cat", tmp_path / "f"]).stdout == "x"
    print(f"killed client: ENOTCONN on {node} only; heal {time.monotonic() - t0:.1f} s")


def test_slowed_link_slows_the_node_filesystem_traffic(
    slurm_cluster: SlurmCluster, tmp_path: Path
) -> None:
    node = slurm_cluster.nodes[-1]
    write = ["dd", "if=/dev/zero", f"of={tmp_path}/blob", "bs=64k", "count=8", "conv=fsync",
             "status=none"]  # 512 KiB through the node's client

    def timed() -> float:
        t0 = time.monotonic()
        slurm_cluster.on_node(node, write, timeout=120)
        return time.monotonic() - t0

    fast = timed()
    slurm_cluster.slow_link(node, "1mbit")
    try:
        slow = timed()
    finally:
        slurm_cluster.slow_link(node, "off")
    print(f"512 KiB write: {fast:.2f} s, at 1mbit {slow:.2f} s")
    assert slow > 3 and slow > 2 * fast, (fast, slow)


def test_start_is_idempotent_and_stop_leaves_nothing_behind(tmp_path: Path) -> None:
    """A second, small, private cluster (own state directory, ports, namespaces)."""
    state = f"/tmp/hpce-t{os.getpid()}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_"))}
    env.update(HPC_ELASTIC_SLURM_DIR=state, HPC_ELASTIC_SLURM_NODES="2",
               HPC_ELASTIC_SLURM_ACCOUNTING="0", HPC_ELASTIC_SLURM_PROCTRACK="linuxproc",
               HPC_ELASTIC_SLURM_PORT_BASE="27810")
    env["PATH"] = env.get("PATH", "/usr/bin:/bin") + ":/usr/sbin:/sbin"

    def script(path: Path, *args: str) -> str:
        proc = subprocess.run(["bash", str(path), *args], env=env, capture_output=True,
                              text=True, timeout=300, stdin=subprocess.DEVNULL)
        assert proc.returncode == 0, proc.stderr
        return proc.stderr

    try:
        t0 = time.monotonic()
        script(START)
        cold = time.monotonic() - t0
        ctld = Path(state, "pids", "slurmctld.pid").read_text()
        assert processes_of(state) and mounts_under(state)
        t1 = time.monotonic()
        again = script(START)
        warm = time.monotonic() - t1
        assert "already running" in again
        assert Path(state, "pids", "slurmctld.pid").read_text() == ctld, "restarted"
    finally:
        t2 = time.monotonic()
        script(STOP, "--purge")
        stop = time.monotonic() - t2
    assert processes_of(state) == [], "processes left"
    assert mounts_under(state) == [], "mounts (FUSE, namespace files) left"
    assert not Path(state).exists()
    print(f"private 2-node cluster: cold start {cold:.1f} s, warm {warm:.1f} s, stop {stop:.1f} s")


def processes_of(state: str) -> list[int]:
    """Live processes started for ``state`` (by their environment marker) or naming it."""
    markers = {f"HPC_ELASTIC_SLURM_DIR={state}".encode(), f"HPC_ELASTIC_TESTNS={state}".encode()}
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue
            env = set((proc / "environ").read_bytes().split(b"\0"))
            cmd = (proc / "cmdline").read_bytes()
        except (OSError, IndexError):
            continue
        if env & markers or state.encode() in cmd:
            found.append(int(proc.name))
    return found


def mounts_under(state: str) -> list[str]:
    return [ln for ln in Path("/proc/self/mountinfo").read_text().splitlines() if state in ln]


def stopped_states(pids: list[int]) -> set[str]:
    """The scheduler states (R, S, T, ...) of those of ``pids`` that still exist."""
    states = set()
    for pid in pids:
        try:
            states.add(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0])
        except OSError:
            continue
    return states
