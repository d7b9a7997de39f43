"""Warm worker starts (``warm_workers``, hpc_elastic/agent/standby.py), for real.

First torch's own ``start_processes`` (what the agent calls) with and without the standby pool:
the warm worker is a fork of the standby process, already has torch imported, gets the exact
torchrun environment, argv, cwd and log files of a cold one, its exit code and error file reach
torch (through the standby, its parent) -- and it starts faster; a killed standby costs cold
starts and lost exit codes, never a hang. Then a local job (3 agents, a plain DDP script that
ends with ``destroy_process_group``) through a node loss (world size 3 -> 2): both groups are
forked by standbys with the right ranks and environment.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, Std, start_processes

from hpc_elastic.agent.standby import ForkedWorker, Standby, StandbyPool, _WarmHandler
from hpc_elastic.jobdir import JobDir
from hpc_elastic.rendezvous.handler import free_port
from hpc_elastic.telemetry import read_jsonl

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "tests" / "warm_helpers" / "ddp_env.py"


def starts(out: Path) -> list[dict]:
    path = out / "starts.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_group(tmp: Path, tag: str, pool: StandbyPool | None, script_args: tuple[str, ...],
              timeout: float = 120, done: bool = False) -> tuple[dict, float, dict]:
    """Start two workers of SCRIPT with torch's start_processes; wait for them; return the
    result, the seconds from the start call to the later script's first line, and the pids.
    ``done``: the stop file exists from the start (a DDP group then makes one step and ends)."""
    out = tmp / tag
    out.mkdir()
    if done:
        (out / "done").touch()
    port = str(free_port())
    envs = {r: {"RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": str(r), "WARM_TEST_DIR":
                str(out), "TORCHELASTIC_RESTART_COUNT": "0", "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": port} for r in (0, 1)}
    args = {r: ("-u", "-m", "hpc_elastic.worker", str(SCRIPT), *script_args) for r in (0, 1)}
    specs = DefaultLogsSpecs(log_dir=str(tmp / f"logs-{tag}"), redirects=Std.ALL)
    began = time.time()
    if pool is None:
        ctx = start_processes("w", sys.executable, args, envs, specs)
    else:
        with pool.serving():
            ctx = start_processes("w", sys.executable, args, envs, specs)
    pids = ctx.pids()
    result = None
    deadline = time.monotonic() + timeout
    while result is None and time.monotonic() < deadline:
        result = ctx.wait(timeout=1)
    ctx.close()
    assert result is not None, f"workers {tag} did not end within {timeout} s"
    lines = starts(out)
    ready = max(x["t0"] + x["import_s"] for x in lines)  # the script has torch
    return {"result": result, "lines": lines}, ready - began, pids


def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def ready_standby(pool: StandbyPool) -> int:
    """Start the pool's standby and wait until it has done its imports (what a running group
    gives it time for): its CPU time stops growing. Returns its pid."""
    (pid,) = pool.fill()
    deadline = time.monotonic() + 90
    last, still_since = -1, time.monotonic()
    while time.monotonic() < deadline:
        ticks = cpu_ticks(pid)
        if ticks != last:
            last, still_since = ticks, time.monotonic()
        elif last > 0 and time.monotonic() - still_since > 1.0:
            return pid
        time.sleep(0.1)
    raise AssertionError("the standby did not finish its imports within 90 s")


def test_a_standby_forks_the_worker_faster_and_exactly_like_a_cold_one(tmp_path: Path) -> None:
    pool = StandbyPool()
    try:
        standby = ready_standby(pool)
        warm, warm_s, warm_pids = run_group(tmp_path, "warm", pool, ("--no-dist",))
        assert pool.last_warm == [0, 1] and pool.last_cold == []
        cold, cold_s, _ = run_group(tmp_path, "cold", None, ("--no-dist",))
        # one standby serves every start: still there for the next group
        assert pool.fill() == [] and pool.standby is not None and pool.standby.alive()
    finally:
        pool.close()
    # The workers are forks of the standby, which had torch imported before the script ran.
    assert {x["ppid"] for x in warm["lines"]} == {standby}
    assert standby not in warm_pids.values() and len(set(warm_pids.values())) == 2
    assert all(x["preloaded"] for x in warm["lines"])
    assert not any(x["preloaded"] for x in cold["lines"])
    for group in (warm, cold):
        assert group["result"].failures == {}
        by_rank = {x["env"]["RANK"]: x for x in group["lines"]}
        assert sorted(by_rank) == ["0", "1"]
        for rank, x in by_rank.items():
            assert x["env"]["LOCAL_RANK"] == rank and x["env"]["WORLD_SIZE"] == "2"
            assert x["env"]["HPC_ELASTIC_STANDBY_FD"] is None  # nothing of the standby leaks
            assert x["argv"] == [str(SCRIPT), "--no-dist"] and x["main"] == "__main__"
            assert x["cwd"] == os.getcwd()
            # stdout goes to torch's log file for that rank, as for a cold start
            stdout = Path(group["result"].stdouts[int(rank)]).read_text()
            assert f"hello from rank {rank} pid {x['pid']}" in stdout
    print(f"start call -> script past its import torch: warm {warm_s:.2f} s, cold {cold_s:.2f} s")
    assert warm_s < cold_s / 2, (warm_s, cold_s)


def test_failures_of_forked_and_cold_workers_reach_torch_alike(tmp_path: Path) -> None:
    """Rank 0 raises: torch sees its failure with pid, exit code and error file, and stops rank 1
    (SIGTERM to its process group) -- exit codes the standby reaped and reported. Then the
    standby is killed: the next group starts cold and fails the same way."""
    pool = StandbyPool()
    try:
        standby = ready_standby(pool)
        warm, _, warm_pids = run_group(tmp_path, "warm", pool, ("--raise",))
        assert pool.last_warm == [0, 1]
        os.kill(standby, signal.SIGKILL)
        time.sleep(0.5)
        cold, _, cold_pids = run_group(tmp_path, "cold", pool, ("--raise",))
        assert pool.last_warm == [] and pool.last_cold == [0, 1]
    finally:
        pool.close()
    assert {x["ppid"] for x in warm["lines"]} == {standby}
    assert {x["ppid"] for x in cold["lines"]} == {os.getpid()}
    for group, pids in ((warm, warm_pids), (cold, cold_pids)):
        failures = group["result"].failures
        assert failures[0].exitcode == 1 and failures[0].pid == pids[0]
        assert Path(failures[0].error_file).exists()  # written by hpc_elastic.worker
        assert "injected crash at start" in str(failures[0].message)
        assert "injected crash at start" in Path(group["result"].stderrs[0]).read_text()
        if 1 in failures:
            assert failures[1].pid == pids[1] and failures[1].exitcode == -signal.SIGTERM


def test_workers_outlive_a_killed_standby_and_still_end_the_group(tmp_path: Path) -> None:
    """The standby is killed while its workers run (the OOM killer, a user): they go on, and
    when they end the agent still sees them end -- with exit code 1 (their real one was lost
    with the standby), so torch restarts the group rather than waiting forever."""
    pool = StandbyPool()
    out = tmp_path / "wait"
    try:
        standby = ready_standby(pool)
        result: dict = {}

        def in_background() -> None:
            result["group"] = run_group(tmp_path, "wait", pool, ("--wait",))

        runner = threading.Thread(target=in_background)
        runner.start()
        deadline = time.monotonic() + 60
        while len(starts(out)) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        os.kill(standby, signal.SIGKILL)
        time.sleep(1.0)
        workers = [x["pid"] for x in starts(out)]
        assert len(workers) == 2 and all(Path(f"/proc/{w}").exists() for w in workers)
        (out / "done").touch()
        runner.join(timeout=120)
        assert not runner.is_alive()
    finally:
        pool.close()
    group, _, _ = result["group"]
    assert {f.exitcode for f in group["result"].failures.values()} == {1}


def test_forked_ddp_workers_that_destroy_their_group_all_exit(tmp_path: Path) -> None:
    """Ten 2-rank gloo DDP groups in a row, each forked by the standby (which imported
    ``torch._dynamo``), one step each, ``destroy_process_group``, return. Without
    hpc_elastic/worker/keep_groups.py 7 of 30 such groups hung at exit for good (a race in
    torch's teardown), so ten in a row pass without it about once in fourteen tries."""
    pool = StandbyPool()
    try:
        standby = ready_standby(pool)
        for trial in range(10):
            group, _, _ = run_group(tmp_path, f"ddp{trial}", pool, (), timeout=45, done=True)
            assert pool.last_warm == [0, 1]
            assert group["result"].failures == {}
            assert {x["ppid"] for x in group["lines"]} == {standby}
    finally:
        pool.close()


def exited(proc: subprocess.Popen) -> bool:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return True
        time.sleep(0.2)
    return False


def test_the_standby_ends_when_the_agent_is_gone_or_the_pool_is_closed() -> None:
    # An agent that dies (SIGKILL included): the kernel closes its socket end, and the
    # standby, once its import is done, reads the end of the socket and exits on its own.
    pool = StandbyPool()
    pool.fill()
    assert pool.standby is not None
    standby = pool.standby
    standby.sock.close()
    assert exited(standby.proc) and standby.proc.returncode == 0
    second = StandbyPool()
    second.fill()
    assert second.standby is not None
    proc = second.standby.proc
    second.close()  # the agent ending: the standby is killed and reaped
    assert proc.returncode is not None


@pytest.mark.slow
def test_a_local_job_restarts_from_standbys_with_the_right_ranks(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    job = tmp_path / "job.yaml"
    job.write_text(
        f"name: warm\nnodes: '2:3'\nnproc_per_node: 1\nentrypoint: {SCRIPT}\nmax_restarts: 3\n"
        f"job_root: {tmp_path / 'jobs'}\nwarm_workers: true\n"
        f"env:\n  OMP_NUM_THREADS: 1\n  WARM_TEST_DIR: {out}\n"
        "rendezvous:\n  last_call_timeout: 1\n  heartbeat_interval: 0.5\n"
        "  heartbeat_timeout: 2\n")
    launcher = subprocess.Popen(
        [sys.executable, "-m", "hpc_elastic", "submit", str(job), "--local", "--set",
         "nodes=2:3"], env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def wait_for(what: str, cond, timeout: float = 150) -> None:  # noqa: ANN001
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if cond():
                return
            time.sleep(0.3)
        raise AssertionError(f"timed out waiting for {what}: {starts(out)}")

    def events(jobdir: JobDir, node: str) -> list[dict]:
        path = jobdir.events(node)
        return list(read_jsonl(path)) if path.exists() else []

    try:
        wait_for("3 workers", lambda: len(starts(out)) >= 3)
        jobdir = JobDir(next(p for p in (tmp_path / "jobs").iterdir() if p.is_dir()))
        nodes = sorted(jobdir.node_names())
        victim_pid = next(x for x in starts(out) if x["env"]["GROUP_RANK"] == "2")["pid"]
        agents = json.loads((jobdir.path / "local-agents.json").read_text())["pids"]
        victim = next(n for n in nodes if any(
            e["kind"] == "workers.warm" and victim_pid in e["pids"] for e in events(jobdir, n)))
        # a warm worker leads its own process group, as torch's workers do: fencing's
        # killpg(SIGKILL) (agent/runner.py kill_workers) reaches it and its children
        assert os.getpgid(victim_pid) == victim_pid
        for pid in (agents[int(victim.removeprefix("local"))], victim_pid):
            os.kill(pid, signal.SIGKILL)
        wait_for("the survivors' new group", lambda: len(starts(out)) >= 5)
        (out / "done").touch()
        output, _ = launcher.communicate(timeout=120)
        assert launcher.returncode == 0, output[-4000:]
    finally:
        if launcher.poll() is None:
            # SIGTERM: the local launcher stops its agents and they their workers. A worker
            # hung past that still holds the output pipe: never wait for it forever.
            launcher.terminate()
            try:
                launcher.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                launcher.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    launcher.communicate(timeout=10)

    lines = starts(out)
    # the 3-node group, then the survivors' 2-node group; under load the survivors sometimes
    # re-form once more (one of them joined the new round before the other saw the loss):
    # every later group is a 2-node group from standbys too
    assert len(lines) >= 5 and (len(lines) - 3) % 2 == 0, lines
    groups = [lines[0:3]] + [lines[i:i + 2] for i in range(3, len(lines), 2)]
    for group, world in zip(groups, [3] + [2] * (len(groups) - 1), strict=True):
        envs = [x["env"] for x in group]
        assert sorted(int(e["RANK"]) for e in envs) == list(range(world))
        assert {e["WORLD_SIZE"] for e in envs} == {str(world)}
        assert {e["GROUP_WORLD_SIZE"] for e in envs} == {str(world)}
        assert {e["LOCAL_RANK"] for e in envs} == {"0"}
        assert len({e["MASTER_PORT"] for e in envs}) == 1
        assert all(x["preloaded"] for x in group), "a worker was started cold"
        assert all(e["HPC_ELASTIC_STANDBY_FD"] is None for e in envs)
    # a membership change: torch re-forms without using a restart
    assert {x["env"]["TORCHELASTIC_RESTART_COUNT"] for x in lines} == {"0"}
    assert {x["env"]["GROUP_RANK"] for x in groups[1]} == {"0", "1"}
    # every worker was forked by a standby its agent had started, and it says so in its events
    warm_pids, standbys = set(), set()
    for node in nodes:
        evs = events(jobdir, node)
        standbys |= {p for e in evs if e["kind"] == "standby.started" for p in e["pids"]}
        for e in evs:
            if e["kind"] == "workers.warm":
                assert e["cold"] == []
                warm_pids.update(e["pids"])
    assert {x["pid"] for x in lines} <= warm_pids
    assert {x["ppid"] for x in lines} <= standbys
    # the survivors ended cleanly (destroy_process_group, exit 0) and left no standby behind
    for node in nodes:
        if node != victim:
            assert events(jobdir, node)[-1]["kind"] == "agent.succeeded"
    for pid in warm_pids | {p for n in nodes for e in events(jobdir, n)
                            if e["kind"] == "standby.started" for p in e["pids"]}:
        stat = Path(f"/proc/{pid}/stat")
        assert not stat.exists() or stat.read_text().split()[2] == "Z", pid


def test_a_reused_pid_does_not_inherit_an_earlier_workers_exit_code(tmp_path: Path) -> None:
    """The kernel may give a later fork the pid of a worker that ended. The standby reports
    that worker's end before it forks again, and the report goes to that worker alone: the
    new worker with the same pid still runs. (The standby's side is played by this test.)"""
    agent_end, standby_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    standby = Standby(proc, agent_end)
    log = (tmp_path / "log").open("w")

    def fork_answered_with(*messages: dict) -> ForkedWorker:
        def answer() -> None:
            socket.recv_fds(standby_end, 1 << 20, 2)
            for message in messages:
                standby_end.send(json.dumps(message).encode())
        t = threading.Thread(target=answer)
        t.start()
        worker = standby.fork(["x.py"], {}, log, log, timeout=10)
        t.join()
        assert worker is not None
        return worker

    try:
        first = fork_answered_with({"pid": 4242})
        assert first.poll() is None
        standby_end.send(json.dumps({"exit": 4242, "code": 3}).encode())
        second = fork_answered_with({"pid": 4242})
        assert first.poll() == 3 and second.poll() is None
        standby_end.send(json.dumps({"exit": 4242, "code": -9}).encode())
        assert second.wait(timeout=5) == -9 and first.returncode == 3
    finally:
        standby.discard()
        standby_end.close()
        log.close()


def test_closing_a_forked_worker_that_just_ended_does_not_end_the_agent(tmp_path: Path) -> None:
    """torch closes every worker whose ``poll()`` says it runs with ``killpg``. A forked
    worker that has just ended is already reaped by its standby while its exit report is still
    on the way: its pid is gone, and ``killpg`` failed with ESRCH, which ended a whole agent in
    the fault-storm benchmark (run M). The handler closes it quietly, log files included.
    (The standby's side is played by this test; the worker is a process already reaped.)"""
    agent_end, standby_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    standby = Standby(proc, agent_end)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # ended and reaped: no process, no process group with its pid
    out, err = (tmp_path / "out").open("w"), (tmp_path / "err").open("w")
    try:
        t = threading.Thread(target=lambda: (socket.recv_fds(standby_end, 1 << 20, 2),
                                             standby_end.send(json.dumps({"pid": gone.pid})
                                                              .encode())))
        t.start()
        worker = standby.fork(["x.py"], {}, out, err, timeout=10)
        t.join()
        assert worker is not None and worker.poll() is None  # its exit report is not here yet
        handler = object.__new__(_WarmHandler)  # torch's handler as its PContext holds it
        handler.proc, handler._stdout, handler._stderr = worker, out, err
        handler.close(death_sig=signal.SIGTERM)
        assert out.closed and err.closed
    finally:
        standby.discard()
        standby_end.close()
        out.close()
        err.close()


STATE_SCRIPT = REPO / "tests" / "warm_helpers" / "process_state.py"


def run_state_job(tmp: Path, tag: str, warm: bool) -> tuple[list[dict], list[dict]]:
    """A one-node local job of STATE_SCRIPT, 2 workers; returns their states and the node's
    events. The job's ``env:`` sets OMP_NUM_THREADS=1, the agent's own environment 2 (torch
    uses no more threads than cores: 2 is the most this tells apart on a 2-core machine)."""
    out = tmp / f"out-{tag}"
    out.mkdir()
    job = tmp / f"{tag}.yaml"
    job.write_text(
        f"name: {tag}\nnodes: 1\nnproc_per_node: 2\nentrypoint: {STATE_SCRIPT}\n"
        f"job_root: {tmp / 'jobs' / tag}\nwarm_workers: {'true' if warm else 'false'}\n"
        f"env:\n  OMP_NUM_THREADS: 1\n  WARM_TEST_DIR: {out}\n")
    done = subprocess.run(
        [sys.executable, "-m", "hpc_elastic", "submit", str(job), "--local"],
        env={**os.environ, "OMP_NUM_THREADS": "2"}, capture_output=True, text=True,
        timeout=180)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    jobdir = JobDir(next(p for p in (tmp / "jobs" / tag).iterdir() if p.is_dir()))
    (node,) = jobdir.node_names()
    states = [json.loads(p.read_text()) for p in sorted(out.glob("state-*.json"))]
    return states, list(read_jsonl(jobdir.events(node)))


@pytest.mark.slow
def test_workers_forked_from_the_agents_standby_look_like_new_processes(tmp_path: Path) -> None:
    """The agent forks its standby from itself right after its own ``import torch``
    (agent/start.py, agent/standby.py fork_from_agent): the workers of that standby must see
    what workers started as new processes see -- the OpenMP threads of the job's ``env:``
    (read when torch is imported), the umask, unbuffered output, signal dispositions (SIGUSR1,
    the preemption signal, ignored until the script sets a handler), no descriptor of the
    agent, their own session, no logging handler, ``sys.path[0]``."""
    warm, warm_events = run_state_job(tmp_path, "warm", warm=True)
    cold, _ = run_state_job(tmp_path, "cold", warm=False)
    assert len(warm) == 2 and len(cold) == 2
    # the warm ones were forked by a standby that the agent forked from itself
    agent_pid = next(e["pid"] for e in warm_events if e["kind"] == "agent.start")
    (started,) = [e for e in warm_events if e["kind"] == "standby.started"]
    assert started["forked_from_agent"] is True, started
    (standby_pid,) = started["pids"]
    assert {s["ppid"] for s in warm} == {standby_pid}
    assert all(s["preloaded"] for s in warm) and not any(s["preloaded"] for s in cold)
    warm_event = next(e for e in warm_events if e["kind"] == "workers.warm")
    assert warm_event["cold"] == [] and sorted(warm_event["pids"]) == sorted(
        s["pid"] for s in warm)
    assert agent_pid != standby_pid
    assert {s["threads"] for s in warm + cold} == {1}, "the job's OMP_NUM_THREADS was not used"

    def comparable(state: dict) -> dict:
        return {k: v for k, v in state.items()
                if k not in ("pid", "ppid", "preloaded", "fd_targets")}

    for w, c in zip(warm, cold, strict=True):
        assert comparable(w) == comparable(c), (w, c)
    assert warm[0]["signals"]["SIGUSR1"] == "SIG_IGN"
    # nothing open but /dev/null and the worker's own files (logs, progress, stacks)
    for state in warm:
        for fd in state["fd_targets"]:
            target = fd.split("->", 1)[1]
            assert target == "/dev/null" or "/workers/attempt-0/" in target, state["fd_targets"]


@pytest.mark.parametrize("setup, reason", [
    ("", "without python -u"),
    ("import threading; threading.Thread(target=time.sleep, args=(5,), daemon=True).start()",
     "already runs threads"),
    ("kept = open(os.devnull)", "has files open"),
])
def test_the_agent_forks_its_standby_only_when_that_is_safe(setup: str, reason: str) -> None:
    """A fork copies every open file and only the calling thread: the agent forks its standby
    only before it has either, and only with ``python -u`` (else the workers would buffer their
    output); otherwise it says why, and the standby is a new process (agent/standby.py)."""
    unbuffered = ["-u"] if "python -u" not in reason else []
    code = textwrap.dedent(f"""
        import os, time
        from hpc_elastic.agent.start import open_fds
        inherited = frozenset(open_fds())
        from hpc_elastic.agent.standby import fork_from_agent
        {setup}
        standby, why = fork_from_agent(inherited, None)
        print(standby is None, why)
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    result = subprocess.run([sys.executable, *unbuffered, "-c", code], capture_output=True,
                            text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("True ") and reason in result.stdout, result.stdout
