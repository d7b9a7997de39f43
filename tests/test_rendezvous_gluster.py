"""Issue 18 part 1 on a real multi-client filesystem: the rendezvous state across 3
independent GlusterFS clients of one volume (``tests/sharedfs``), on both profiles --
``cached`` (Gluster's defaults: renames seen late, ESTALE) and ``coherent``.

Every writer runs through its node's own FUSE client (its mount namespace) at the same path.
Marked ``sharedfs`` (= ``slurm``): not in the fast lane.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hpc_elastic.rendezvous.layout import RunLayout
from hpc_elastic.rendezvous.state import StateFile

sys.path.insert(0, str(Path(__file__).parent))
from rendezvous_helpers.harness import WORKER, Cluster, base_env  # noqa: E402

pytestmark = [pytest.mark.sharedfs, pytest.mark.slurm, pytest.mark.slow]
HERE = Path(__file__).parent
WRITER = HERE / "rendezvous_helpers" / "fs_writer.py"
PROFILES = ["cached", "coherent"]
TUNED = {"heartbeat_interval": 0.25, "heartbeat_timeout": 3, "last_call_timeout": 3}


def _env(tag: str) -> dict[str, str]:
    env = base_env(tag)
    env["PYTHONPATH"] = str(HERE.parent)
    return env


@pytest.mark.parametrize("profile", PROFILES)
def test_no_update_is_lost_with_nine_writers_on_three_clients(sharedfs_clients, profile):
    fs = sharedfs_clients(3, profile)
    env = _env(f"gw-{profile}")
    procs = []
    for who in range(9):
        mode = "txn" if who % 2 == 0 else "cas"
        procs.append(fs.popen(who % 3, [sys.executable, WRITER, fs.path, str(who), "15", mode],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True))
    outputs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=300)
            outputs.append(out)
            assert p.returncode == 0, out
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert all("sync=True" in o for o in outputs), "writes on GlusterFS are fsync'ed"
    final = fs.run(0, [sys.executable, "-c", (
        "import json,sys; from pathlib import Path; "
        "from hpc_elastic.rendezvous.layout import RunLayout; "
        "from hpc_elastic.rendezvous.state import StateFile; "
        f"s=StateFile(RunLayout(Path({str(fs.path)!r}),'run'),5).read(); "
        "print(json.dumps([s.version, s.waiting, s.prev]))")], env=env)
    assert final.returncode == 0, final.stderr
    version, waiting, prev = json.loads(final.stdout)
    txn = [w for w in range(9) if w % 2 == 0]
    cas = [w for w in range(9) if w % 2 == 1]
    assert sorted(waiting) == sorted(f"w{w}-{j}" for w in txn for j in range(15))
    assert sorted(prev) == sorted(f"c{w}-{j}" for w in cas for j in range(15))
    assert version == 9 * 15, "one version per committed change"
    print(f"{profile}: transient-read retries per writer: "
          f"{[o.strip().split()[0] for o in outputs]}")


def _py_spy(pid: int) -> str:
    """The stacks of a process that did not finish (for the failure message)."""
    spy = Path(sys.executable).with_name("py-spy")
    if not spy.exists():
        return "(py-spy not installed)"
    try:
        out = subprocess.run([str(spy), "dump", "--pid", str(pid)], capture_output=True,
                             text=True, timeout=30)
        return out.stdout[-3000:] + out.stderr[-500:]
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"(py-spy failed: {exc})"


@pytest.mark.parametrize("profile", PROFILES)
def test_torchrun_agents_on_three_clients_recover_from_a_worker_failure(
        sharedfs_clients, tmp_path, profile):
    """Real ``torchrun --rdzv-backend=sharedfs`` agents, one per GlusterFS client, one worker
    each, a plain DDP-style gloo script whose rank 1 fails once: every agent re-rendezvouses
    once through its own client and the job succeeds."""
    fs = sharedfs_clients(3, profile)
    cluster = Cluster(tmp_path)
    cluster.env["PYTHONPATH"] = str(HERE.parent)
    conf = ",".join(f"{k}={v}" for k, v in TUNED.items())
    names = [f"a{i}" for i in range(3)]
    try:
        for i, name in enumerate(names):
            cluster.start(name, fs.cmd(i, [
                sys.executable, "-m", "torch.distributed.run",
                "--rdzv-backend=sharedfs", f"--rdzv-endpoint={fs.path}", "--rdzv-id=agents",
                "--nnodes=3", "--nproc-per-node=1", "--local-addr=127.0.0.1",
                "--max-restarts=2", "--monitor-interval=0.1", f"--rdzv-conf={conf}",
                str(WORKER), "--out", str(cluster.out), "--steps", "8", "--fail-rank", "1",
            ]))
        deadline = time.monotonic() + 180
        for name in names:
            proc = cluster.nodes[name]
            try:
                rc = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                stacks = "\n".join(f"--- {n} (pid {p.pid}) ---\n{_py_spy(p.pid)}"
                                   for n, p in cluster.nodes.items() if p.poll() is None)
                logs = "\n".join(f"--- {n} log ---\n{cluster.log(n)[-2500:]}" for n in names)
                pytest.fail(f"{profile}: {name} did not finish in 180 s\n{stacks}\n{logs}")
            assert rc == 0, f"{profile}: {name} exited {rc}:\n{cluster.log(name)}"
    finally:
        cluster.cleanup()
    done = cluster.records("done")
    assert len(done) == 3 and {d["world"] for d in done} == {3}
    assert sorted(d["rank"] for d in done) == [0, 1, 2]
    assert 1 in {d["restart"] for d in done}, "the failed worker was restarted"
    final = StateFile(RunLayout(fs.path, "agents"), 5).read()
    assert final is not None and final.closed and final.round == 1, "exactly one re-rendezvous"


def _create_race(fs, mode: str, rounds: int, tag: str) -> list[dict]:
    """Six processes, two per client, open ``rounds`` new lock files, each at the same moment
    (tests/rendezvous_helpers/create_race.py); their reports."""
    root = Path(fs.path) / f"race-{mode}"
    made = fs.run(0, [sys.executable, "-c", "import os, sys\n"
                      "for k in range(int(sys.argv[2])): os.makedirs(f'{sys.argv[1]}/{k}')",
                      str(root), str(rounds)])
    assert made.returncode == 0, made.stderr
    time.sleep(2)  # every client sees the new directories before the race starts
    start = time.time() + 3
    procs = [fs.popen(i % 3, [sys.executable, HERE / "rendezvous_helpers" / "create_race.py",
                              root, str(rounds), str(start), "0.05", mode],
                      env=_env(tag), stdout=subprocess.PIPE, text=True) for i in range(6)]
    try:
        return [json.loads(p.communicate(timeout=300)[0]) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


@pytest.mark.parametrize("profile", PROFILES)
def test_nodes_creating_the_lock_file_at_once_all_get_it(sharedfs_clients, profile):
    """Every node of a first round opens the state lock at once, and the first open creates
    it. GlusterFS fails a racing ``O_CREAT`` (without ``O_EXCL``) with EEXIST; that ended an
    agent of a 16-node first rendezvous. The rendezvous lock opens it again instead."""
    fs = sharedfs_clients(3, profile)
    reports = _create_race(fs, "lock", 150, f"race-{profile}")
    assert not [e for r in reports for e in r["errors"]]
    assert not [k for r in reports for k in r["eexist"]], "a racing create reached the caller"
    raw = _create_race(fs, "raw", 150, f"race-{profile}")
    print(f"{profile}: plain O_CREAT opens that failed with EEXIST in the same race: "
          f"{sum(len(r['eexist']) for r in raw)} of {6 * 150}")
