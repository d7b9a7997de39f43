"""The store wait (hpc_elastic/worker/store_wait.py): a rank that calls ``init_process_group``
before rank 0 has opened the group's store connects the moment it opens, instead of at torch's
next retry (0.2-0.8 s later, measured here)."""

from __future__ import annotations

import importlib
import json
import os
import socket
import statistics
import subprocess
import sys
import textwrap
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch.distributed  # noqa: F401 - install() wraps what this import registered
from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, Std, start_processes

from hpc_elastic.agent.standby import StandbyPool
from hpc_elastic.rendezvous.handler import free_port
from hpc_elastic.worker import store_wait

# torch.distributed.rendezvous is also the name of a function in torch.distributed
torch_rendezvous = importlib.import_module("torch.distributed.rendezvous")
REPO = Path(__file__).resolve().parent.parent
LATE_MASTER = REPO / "tests" / "warm_helpers" / "late_master.py"


def listen_after(delay: float, port: int, opened: list[float]) -> threading.Thread:
    """Open a listening socket on ``port`` after ``delay`` seconds, in a thread; its time goes
    into ``opened``. The socket stays open until the test process ends."""
    def run() -> None:
        time.sleep(delay)
        server = socket.socket()
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", port))
        server.listen(8)
        opened.append(time.monotonic())
        time.sleep(30)
        server.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_the_wait_ends_right_after_the_port_opens() -> None:
    port = free_port()
    opened: list[float] = []
    listen_after(0.6, port, opened)
    assert store_wait.wait_until_listening("127.0.0.1", port, limit_s=10) is True
    returned = time.monotonic()
    assert opened, "returned before anything listened"
    # the pause between tries is at most 20 ms (+20 %) in a small group
    assert returned - opened[0] < 0.2, returned - opened[0]


def test_the_wait_gives_up_at_its_limit() -> None:
    port = free_port()  # nothing will listen there
    began = time.monotonic()
    assert store_wait.wait_until_listening("127.0.0.1", port, limit_s=0.5) is False
    assert 0.5 <= time.monotonic() - began < 2.0


def test_a_large_group_tries_less_often_per_rank() -> None:
    assert store_wait.longest_pause(4) == store_wait.longest_pause(200) == 0.02
    assert store_wait.longest_pause(4096) == pytest.approx(0.4096)


@pytest.mark.parametrize("env, url, expected", [
    ({"RANK": "1", "MASTER_ADDR": "n1", "MASTER_PORT": "29400"}, "env://", ("n1", 29400, 1)),
    ({"RANK": "1", "WORLD_SIZE": "8", "MASTER_ADDR": "n1", "MASTER_PORT": "29400"}, "env://",
     ("n1", 29400, 8)),
    # torch puts the rank and the world size into the URL's query; those count
    ({"RANK": "0", "MASTER_ADDR": "n1", "MASTER_PORT": "29400"}, "env://?rank=3&world_size=4",
     ("n1", 29400, 4)),
    # rank 0 opens the store itself
    ({"RANK": "0", "MASTER_ADDR": "n1", "MASTER_PORT": "29400"}, "env://", None),
    ({"RANK": "2", "MASTER_ADDR": "n1", "MASTER_PORT": "29400"}, "env://?rank=0", None),
    # the agent's store is open before any worker starts
    ({"RANK": "1", "MASTER_ADDR": "n1", "MASTER_PORT": "29400",
      "TORCHELASTIC_USE_AGENT_STORE": "True"}, "env://", None),
    # torch's own handler refuses these and says why: no wait before that
    ({"RANK": "1", "MASTER_PORT": "29400"}, "env://", None),
    ({"RANK": "1", "MASTER_ADDR": "n1", "MASTER_PORT": "http"}, "env://", None),
    ({"RANK": "1", "MASTER_ADDR": "n1", "MASTER_PORT": "70000"}, "env://", None),
])
def test_only_ranks_that_connect_to_a_worker_hosted_store_wait(
        monkeypatch: pytest.MonkeyPatch, env: dict[str, str], url: str,
        expected: tuple[str, int, int] | None) -> None:
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                "TORCHELASTIC_USE_AGENT_STORE"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert store_wait._store_endpoint(url) == expected


def test_install_wraps_torchs_env_handler_once_and_hands_over_its_result(
        monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, dict]] = []

    def original(url: str, **kwargs: object) -> str:
        calls.append((url, kwargs))
        return "torch's result"

    handlers = dict(torch_rendezvous._rendezvous_handlers)
    handlers["env"] = original
    monkeypatch.setattr(torch_rendezvous, "_rendezvous_handlers", handlers)
    monkeypatch.setenv("RANK", "0")  # rank 0: nothing to wait for
    assert store_wait.install() is True
    assert store_wait.install() is False  # already wrapped
    assert handlers["env"] is not original and handlers["tcp"] is not original
    assert handlers["env"]("env://", timeout=timedelta(seconds=5)) == "torch's result"
    assert calls == [("env://", {"timeout": timedelta(seconds=5)})]


def test_the_switch_leaves_torchs_handler_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    handlers = dict(torch_rendezvous._rendezvous_handlers)
    monkeypatch.setattr(torch_rendezvous, "_rendezvous_handlers", handlers)
    monkeypatch.setenv(store_wait.ENV_SWITCH, "0")
    before = handlers["env"]
    assert store_wait.install() is False
    assert handlers["env"] is before


def test_a_cold_worker_gets_the_wait_when_its_script_imports_torch() -> None:
    """A fresh interpreter, as a cold worker: nothing of torch is imported until the script
    does it, and then torch's env:// handler is the waiting one."""
    code = textwrap.dedent("""
        import importlib, sys
        from hpc_elastic.worker import store_wait
        assert store_wait.install_on_import() is True
        assert not any(name.startswith("torch") for name in sys.modules), "imported torch"
        import torch.distributed
        handlers = importlib.import_module("torch.distributed.rendezvous")._rendezvous_handlers
        assert getattr(handlers["env"], "_hpc_elastic_waits_for_store", False)
        assert handlers["tcp"] is not handlers["env"]
        assert not any(type(f).__name__ == "_InstallAfterImport" for f in sys.meta_path)
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120, env={k: v for k, v in os.environ.items()
                                              if k != store_wait.ENV_SWITCH})
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


def start_late_master_group(tmp: Path, tag: str, pool: StandbyPool | None, delay: float,
                            extra_env: dict[str, str]) -> list[dict]:
    """Start a 3-rank group of LATE_MASTER -- forked from the pool's standby, as a warm start
    does, or as new processes without a pool -- and return the ranks' lines."""
    out = tmp / tag
    out.mkdir()
    port = str(free_port())
    envs = {r: {"RANK": str(r), "WORLD_SIZE": "3", "LOCAL_RANK": str(r), "WARM_TEST_DIR":
                str(out), "TORCHELASTIC_RESTART_COUNT": "0", "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": port, "LATE_MASTER_DELAY": str(delay), **extra_env}
            for r in range(3)}
    args = {r: ("-u", "-m", "hpc_elastic.worker", str(LATE_MASTER)) for r in range(3)}
    specs = DefaultLogsSpecs(log_dir=str(tmp / f"logs-{tag}"), redirects=Std.ALL)
    if pool is None:
        ctx = start_processes("w", sys.executable, args, envs, specs)
    else:
        with pool.serving():
            ctx = start_processes("w", sys.executable, args, envs, specs)
    result = None
    deadline = time.monotonic() + 120
    while result is None and time.monotonic() < deadline:
        result = ctx.wait(timeout=1)
    ctx.close()
    assert result is not None, f"group {tag} did not end within 120 s"
    assert result.failures == {}, {r: Path(f.error_file).name for r, f in result.failures.items()}
    if pool is not None:
        assert pool.last_warm == [0, 1, 2]
    lines = [json.loads(x) for x in (out / "inits.jsonl").read_text().splitlines()]
    assert sorted(x["rank"] for x in lines) == [0, 1, 2]
    return lines


def forming(lines: list[dict]) -> float:
    """Seconds from the last rank's call of ``init_process_group`` to the last return (rank 0
    is the last to call it, unless another rank was slower still to get there)."""
    return max(x["returned"] for x in lines) - max(x["called"] for x in lines)


@pytest.mark.slow
def test_forked_ranks_join_a_late_rank_0_as_soon_as_its_store_opens(tmp_path: Path) -> None:
    """Warm workers (forked by the standby) whose rank 0 calls ``init_process_group`` 0.5 s
    after the others: the last rank is in the group within a fraction of torch's retry pause
    after rank 0 called it. Three groups; without the wait (the last one, switched off) torch's
    client retried 0.2-0.8 s later (measured here), so the median would fail the bound."""
    pool = StandbyPool()
    try:
        pool.fill()
        waits = []
        for trial in range(3):
            lines = start_late_master_group(tmp_path, f"wait{trial}", pool, 0.5, {})
            assert all(x["waiting_handler"] for x in lines)
            waits.append(forming(lines))
        off = start_late_master_group(tmp_path, "off", pool, 0.5, {store_wait.ENV_SWITCH: "0"})
    finally:
        pool.close()
    print(f"last call of init_process_group -> every rank in the group: {waits}; "
          f"switched off: {forming(off):.3f}")
    assert statistics.median(waits) < 0.15, waits
    # the switch reaches the forked worker: torch's own handler
    assert not any(x["waiting_handler"] for x in off)
    assert os.environ.get(store_wait.ENV_SWITCH) is None  # the test process is left alone


@pytest.mark.slow
def test_cold_ranks_join_a_late_rank_0_as_soon_as_its_store_opens(tmp_path: Path) -> None:
    """The same with workers started as new processes (``warm_workers: false``, the default):
    each imports torch itself, and rank 0 calls ``init_process_group`` 0.5 s after its import."""
    waits = []
    for trial in range(3):
        lines = start_late_master_group(tmp_path, f"cold{trial}", None, 0.5, {})
        assert all(x["waiting_handler"] for x in lines)
        waits.append(forming(lines))
    print(f"last call of init_process_group -> every rank in the group: {waits}")
    assert statistics.median(waits) < 0.15, waits
