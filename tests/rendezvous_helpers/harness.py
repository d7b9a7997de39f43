"""Start, watch and reliably stop the processes of a multi-"node" test on one machine.

Every process a test starts gets a unique marker in its environment (``HPC_ELASTIC_TEST_TAG``);
workers inherit it. Cleanup finds processes by that marker in ``/proc`` and kills them by PID, so
workers orphaned by a SIGKILLed agent (torch starts them in their own session) are stopped too,
and nothing that this test did not start is ever touched.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

HERE = Path(__file__).parent
AGENT = HERE / "agent.py"
WORKER = HERE / "worker.py"
TAG_VAR = "HPC_ELASTIC_TEST_TAG"


def base_env(tag: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            TAG_VAR: tag,
            "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
            "OMP_NUM_THREADS": "1",
            "GLOO_SOCKET_IFNAME": "lo",
            "PYTHONUNBUFFERED": "1",
            "PYTHONWARNINGS": "ignore",
        }
    )
    return env


def _children(pid: int) -> list[int]:
    kids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # the command name may contain spaces/parens: parse after the last ')'
        fields = stat[stat.rfind(")") + 2 :].split()
        if int(fields[1]) == pid:
            kids.append(int(entry.name))
    return kids


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants that are alive now."""
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(_children(current))
    return tree


def tagged_pids(tag: str) -> list[int]:
    needle = f"{TAG_VAR}={tag}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def kill(pids: list[int], sig: int = signal.SIGKILL) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


class Cluster:
    """A set of agent processes ("nodes") sharing one rendezvous directory."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.tag = uuid.uuid4().hex
        self.root = tmp / "rdzv"
        self.out = tmp / "out"
        self.out.mkdir(parents=True, exist_ok=True)
        self.nodes: dict[str, subprocess.Popen] = {}
        self.env = base_env(self.tag)

    def start(self, name: str, argv: list[str]) -> subprocess.Popen:
        log = open(self.tmp / f"{name}.log", "wb")  # noqa: SIM115 - closed by the OS at exit
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                cwd=self.tmp)
        log.close()
        self.nodes[name] = proc
        return proc

    def start_agent(self, name: str, run_id: str, nnodes: str, conf: dict[str, object],
                    worker_args: list[str], nproc: int = 2, max_restarts: int = 3) -> None:
        argv = [sys.executable, str(AGENT), "--root", str(self.root), "--run-id", run_id,
                "--nnodes", nnodes, "--nproc", str(nproc), "--max-restarts", str(max_restarts),
                "--out", str(self.out)]
        for key, value in conf.items():
            argv += ["--conf", f"{key}={value}"]
        self.start(name, [*argv, "--", *worker_args])

    def kill_node(self, name: str) -> None:
        """SIGKILL a node's agent and every worker it started (as a dead machine would)."""
        proc = self.nodes[name]
        tree = process_tree(proc.pid)
        kill(tree, signal.SIGSTOP)  # freeze first, so nobody forks or exits cleanly meanwhile
        kill(tree)
        proc.wait(timeout=10)

    def wait(self, name: str, timeout: float) -> int:
        try:
            return self.nodes[name].wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            log = self.log(name)
            raise AssertionError(f"{name} did not finish in {timeout} s:\n{log}") from None

    def log(self, name: str) -> str:
        path = self.tmp / f"{name}.log"
        return path.read_text(errors="replace")[-6000:] if path.exists() else ""

    def records(self, kind: str) -> list[dict]:
        folder = self.out / kind
        if not folder.is_dir():
            return []
        found = []
        for path in sorted(folder.glob("*.json")):
            try:
                found.append(json.loads(path.read_text()))
            except (OSError, ValueError):
                continue
        return found

    def cleanup(self) -> None:
        for proc in self.nodes.values():
            if proc.poll() is None:
                kill(process_tree(proc.pid))
        for _ in range(3):
            pids = tagged_pids(self.tag)
            if not pids:
                break
            kill(pids)
            time.sleep(0.2)
        for proc in self.nodes.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
