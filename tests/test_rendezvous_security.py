"""Issue 14 classes 1, 7 and 9 for the rendezvous: directories and state it did not create,
the liveness blind spot, and two unrelated runs with one run id.

Where the owner matters, a second unprivileged user (``hpce-mallory``) creates the files,
through ``tests/other_users.py`` (tests run as root).
"""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from other_users import ensure_user, needs_root, run_as  # noqa: E402
from rendezvous_helpers.harness import WORKER, Cluster  # noqa: E402

from hpc_elastic.rendezvous import SharedFSConfigError, create_handler  # noqa: E402
from hpc_elastic.rendezvous.errors import RunIdInUseError, StateCorruptError  # noqa: E402
from hpc_elastic.rendezvous.state import State, StateFile  # noqa: E402

FORK = multiprocessing.get_context("fork")
FAST = {"heartbeat_interval": 0.1, "heartbeat_timeout": 0.8, "join_timeout": 20,
        "last_call_timeout": 1}
MALLORY = "hpce-mallory"


@pytest.fixture
def shared_root():
    """A world-writable sticky directory (like /tmp or a project scratch area)."""
    path = Path(tempfile.mkdtemp(prefix="rdzv-shared-", dir="/tmp"))
    path.chmod(0o1777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


# ------------------------------------------------------------------------ class 1: directories
def test_a_run_directory_precreated_by_another_user_is_refused_and_nothing_followed(
        shared_root, tmp_path):
    needs_root()
    ensure_user(MALLORY)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    tmp_path.chmod(0o755)
    names = ("state.json", "state.json.tmp", "state.lock", "versions", "hb", "stores")

    def plant() -> int:
        run = shared_root / "job42"
        run.mkdir()
        run.chmod(0o777)
        for name in names:
            os.symlink(victim, run / name)
        return 0

    code, err = run_as(MALLORY, plant)
    assert code == 0, err
    with pytest.raises(SharedFSConfigError, match="belongs to user 'hpce-mallory'") as info:
        h = create_handler(shared_root, "job42", 1, 1, local_addr="127.0.0.1", **FAST)
        h.next_rendezvous()  # today's code got here and wrote through the planted links
    assert "another run id" in str(info.value)
    assert victim.read_text() == "precious"


def test_own_directories_that_others_can_write_are_refused(tmp_path):
    root = tmp_path / "rdzv"
    create_handler(root, "run", 1, 1, **FAST)  # creates everything 0700
    for sub in ("run", "run/versions", "run/hb"):
        assert (root / sub).stat().st_mode & 0o777 == 0o700
    (root / "run" / "hb").chmod(0o777)
    with pytest.raises(SharedFSConfigError, match=r"mode 0o777.*chmod 700"):
        create_handler(root, "run", 1, 1, **FAST)


def test_an_endpoint_others_can_write_needs_the_sticky_bit(tmp_path, shared_root):
    open_root = tmp_path / "open"
    open_root.mkdir()
    open_root.chmod(0o777)
    with pytest.raises(SharedFSConfigError, match="sticky"):
        create_handler(open_root, "run", 1, 1, **FAST)
    h = create_handler(shared_root, "run", 1, 1, local_addr="127.0.0.1", **FAST)
    assert h.next_rendezvous().world_size == 1  # a sticky shared root is fine
    assert (shared_root / "run").stat().st_mode & 0o777 == 0o700
    h.shutdown()


def test_state_written_by_another_user_is_not_trusted(tmp_path):
    needs_root()
    uid = ensure_user(MALLORY)
    h = create_handler(tmp_path, "run", 1, 1, local_addr="127.0.0.1", **FAST)
    forged = State(version=1, round=0, phase="complete", participants=["evil-1-abcdef"],
                   endpoints={"evil-1-abcdef": "6.6.6.6:29500"})
    path = h._layout.version(1)
    path.write_bytes(forged.encode())
    os.chown(path, uid, -1)  # as if another user had written it
    with pytest.raises(StateCorruptError, match="owned by this user"):
        h.next_rendezvous()
    h._hb_stop.set()


@pytest.mark.parametrize("field,value", [
    ("token", "../../../../tmp/escape"),
    ("participants", ["../../outside"]),
    ("endpoints", {"a-1-000000": "evil"}),
    ("endpoints", {"a-1-000000": "10.0.0.1:99999"}),
    ("round", -1),
    ("phase", "whatever"),
])
def test_every_field_read_from_the_state_is_validated(tmp_path, field, value):
    good = State(version=1, participants=["a-1-000000"], endpoints={"a-1-000000": "h:1"})
    head, body = (json.loads(line) for line in good.encode().splitlines())
    if field in body:
        body[field] = value
    else:
        head[field] = value
    data = (json.dumps(head) + "\n" + json.dumps(body) + "\n").encode()
    with pytest.raises(StateCorruptError):
        State.decode(data, "/x/versions/000000000001")


def test_a_path_like_token_in_the_state_creates_nothing_outside(tmp_path):
    h = create_handler(tmp_path / "rdzv", "run", 1, 1, local_addr="127.0.0.1", **FAST)
    escape = tmp_path / "escape"
    store = StateFile(h._layout, 5)
    store.transact(lambda st: st.__dict__.update(token="00ff") or True)
    data = h._layout.version(1).read_bytes().replace(b'"00ff"', b'"../../../escape"')
    (h._layout.versions / ".forge").write_bytes(data.replace(b'"v":1', b'"v":2'))
    os.rename(h._layout.versions / ".forge", h._layout.version(2))
    with pytest.raises(StateCorruptError, match="token"):
        h.next_rendezvous()
    assert not list(tmp_path.glob("escape*")) and not escape.exists()
    h._hb_stop.set()


# ---------------------------------------------------------------- class 7: liveness blind spot
def _frozen_peer(root: str, ready, conf: dict) -> None:
    h = create_handler(root, "run", 2, 2, local_addr="127.0.0.1", **conf)
    h.next_rendezvous()
    ready.set()
    time.sleep(120)


def test_a_node_whose_own_heartbeat_fails_still_finds_a_frozen_peer_dead(tmp_path):
    conf = {**FAST, "heartbeat_timeout": 1.0}
    ready = FORK.Event()
    peer = FORK.Process(target=_frozen_peer, args=(str(tmp_path), ready, conf))
    peer.start()
    me = create_handler(tmp_path, "run", 2, 2, local_addr="127.0.0.1", **conf)
    try:
        me.next_rendezvous()
        assert ready.wait(20)

        def broken():
            raise OSError(errno.EIO, "Input/output error")

        # The peer freezes; a little later our own heartbeat can no longer be written. Until
        # we are fenced ourselves (heartbeat_timeout - interval after our last good beat; from
        # then on a fenced node judges nobody) we still judge the frozen peer.
        os.kill(peer.pid, signal.SIGSTOP)
        time.sleep(0.8)
        me._beater.beat = broken
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            state = StateFile(me._layout, 5).read()
            if state.dead:
                break
            time.sleep(0.1)
        assert state.dead and state.dead[0] != me.node_id, "the frozen peer was not judged"
    finally:
        me._hb_stop.set()
        os.kill(peer.pid, signal.SIGKILL)
        peer.join(10)


# ------------------------------------------------------------ class 9: one run id, two runs
def _other_run(root: str, ready, conf: dict) -> None:
    h = create_handler(root, "shared-id", 1, 1, local_addr="127.0.0.1", run_key="job-a", **conf)
    h.next_rendezvous()
    ready.set()
    time.sleep(120)


def test_a_run_id_used_by_a_live_different_run_is_refused_and_a_dead_one_taken_over(tmp_path):
    ready = FORK.Event()
    other = FORK.Process(target=_other_run, args=(str(tmp_path), ready, FAST))
    other.start()
    try:
        assert ready.wait(20)
        h = create_handler(tmp_path, "shared-id", 1, 1, local_addr="127.0.0.1",
                           run_key="job-b", **FAST)
        start = time.monotonic()
        with pytest.raises(RunIdInUseError, match="another --rdzv-id") as info:
            h.next_rendezvous()
        assert time.monotonic() - start < FAST["heartbeat_timeout"] + 3
        assert "job-a" in str(info.value) and "job-b" in str(info.value)
        h._hb_stop.set()
        same = create_handler(tmp_path, "shared-id", 1, 2, local_addr="127.0.0.1",
                              run_key="job-a", **FAST)
        assert same.num_nodes_waiting() == 0  # a node of the same run is not refused
        same._hb_stop.set()
    finally:
        os.kill(other.pid, signal.SIGKILL)
        other.join(10)
    # The other run is dead now: its leftovers are taken over, not merged with.
    h2 = create_handler(tmp_path, "shared-id", 1, 1, local_addr="127.0.0.1", run_key="job-b",
                        **FAST)
    info = h2.next_rendezvous()
    assert info.world_size == 1 and info.rank == 0
    state = StateFile(h2._layout, 5).read()
    assert state.key == "job-b" and state.participants == [h2.node_id]
    h2.shutdown()


@pytest.mark.slow
def test_two_unrelated_torchrun_runs_with_one_rdzv_id_do_not_merge(tmp_path):
    cluster = Cluster(tmp_path)
    conf = "heartbeat_interval=0.25,heartbeat_timeout=1.5,last_call_timeout=1"
    try:
        def torchrun(name: str, steps: str) -> None:
            cluster.start(name, [
                sys.executable, "-m", "torch.distributed.run", "--rdzv-backend=sharedfs",
                f"--rdzv-endpoint={cluster.root}", "--rdzv-id=same", "--nnodes=1:2",
                "--nproc-per-node=1", "--local-addr=127.0.0.1", "--monitor-interval=0.1",
                f"--rdzv-conf={conf}", str(WORKER), "--out", str(cluster.out),
                "--steps", steps, "--step-time", "0.1"])

        torchrun("first", "3000")  # runs until cleanup kills it
        deadline = time.monotonic() + 60
        while not cluster.records("progress") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert cluster.records("progress"), cluster.log("first")
        torchrun("second", "7")  # another script command: another run
        rc = cluster.wait("second", 60)
        assert rc != 0
        assert "in use by another run that is alive" in cluster.log("second")
        assert {r["world"] for r in cluster.records("progress")} == {1}, "the runs merged"
        assert cluster.nodes["first"].poll() is None, "the first run goes on undisturbed"
    finally:
        cluster.cleanup()


def _torchrun(cluster: Cluster, name: str, nnodes: str) -> None:
    """One node of a torchrun run; every call has the same command line (only the log differs)."""
    cluster.start(name, [
        sys.executable, "-m", "torch.distributed.run", "--rdzv-backend=sharedfs",
        f"--rdzv-endpoint={cluster.root}", "--rdzv-id=same", f"--nnodes={nnodes}",
        "--nproc-per-node=1", "--local-addr=127.0.0.1", "--monitor-interval=0.1",
        "--rdzv-conf=heartbeat_interval=0.25,heartbeat_timeout=1.5,last_call_timeout=1",
        str(WORKER), "--out", str(cluster.out), "--steps", "3000", "--step-time", "0.1"])


def _training_world(cluster: Cluster, world: int, name: str) -> None:
    deadline = time.monotonic() + 90
    while not [r for r in cluster.records("progress") if r["world"] == world]:
        assert time.monotonic() < deadline, cluster.log(name)
        time.sleep(0.1)


@pytest.mark.slow
@pytest.mark.parametrize("nodes", [1, 2])
def test_two_torchrun_runs_with_identical_command_lines_do_not_merge(tmp_path, nodes):
    """Issue 14, gap B: outside a batch system, a second run with the same --rdzv-id *and* the
    same command line is refused while the first one trains with all its nodes -- the nodes of
    the first run (same id, same command) still form one run."""
    cluster = Cluster(tmp_path)
    for name in ("HPC_ELASTIC_RUN_KEY", "SLURM_JOB_ID", "PBS_JOBID", "LSB_JOBID", "FLUX_JOB_ID"):
        cluster.env.pop(name, None)
    try:
        for n in range(nodes):
            _torchrun(cluster, f"first{n}", str(nodes))
        _training_world(cluster, nodes, "first0")
        _torchrun(cluster, "second", str(nodes))
        rc = cluster.wait("second", 60)
        assert rc != 0, cluster.log("second")
        assert "RunIdInUseError" in cluster.log("second"), cluster.log("second")
        assert {r["world"] for r in cluster.records("progress")} == {nodes}, "the runs merged"
        for n in range(nodes):
            assert cluster.nodes[f"first{n}"].poll() is None, cluster.log(f"first{n}")
    finally:
        cluster.cleanup()


def test_the_run_key_comes_from_what_the_nodes_of_one_run_share(monkeypatch):
    from hpc_elastic.rendezvous.torchrun_plugin import default_run_key

    for name in ("HPC_ELASTIC_RUN_KEY", "SLURM_JOB_ID", "PBS_JOBID", "LSB_JOBID", "FLUX_JOB_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(sys, "argv", ["/venv/bin/torchrun", "--nnodes=1", "train.py"])
    assert default_run_key(1, 1) != default_run_key(1, 1), "two single-node launches, one key"
    monkeypatch.setattr(sys, "argv", ["/venv/bin/torchrun", "--nnodes=2", "train.py"])
    assert default_run_key(2, 2) == default_run_key(2, 2)
    assert default_run_key(2, 2).startswith("cmd-")
    monkeypatch.setenv("PBS_JOBID", "123.server")
    pbs = default_run_key(1, 1)
    assert pbs.startswith("pbs-") and pbs == default_run_key(2, 2)
    monkeypatch.setenv("HPC_ELASTIC_RUN_KEY", "run 7/b")  # any text: digested into a key
    env_key = default_run_key(1, 1)
    assert env_key.startswith("env-") and env_key == default_run_key(1, 1)
