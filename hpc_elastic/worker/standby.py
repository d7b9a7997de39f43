"""``python -u -m hpc_elastic.worker.standby``: a process that has imported torch and forks the
agent's workers (``warm_workers``).

Why: after a failure, most of a restart's time is not detecting it or re-forming the group but
starting the new workers -- a new Python, ``import torch`` (2.6 s of CPU here), and in the
script's first ``DistributedDataParallel(...)`` torch's lazy import of ``torch._dynamo`` (1.8 s
more). With ``warm_workers`` the agent starts one of these per node ahead of time
(hpc_elastic/agent/standby.py): it imports all that once and waits. When the agent starts a
worker, it sends the worker's whole start -- the command line, the complete environment (RANK,
WORLD_SIZE, MASTER_ADDR/PORT, TORCHELASTIC_* ... exactly what a new process would have got), the
working directory and the already opened ``stdout.log``/``stderr.log`` (as file descriptors,
``SCM_RIGHTS``) -- and the standby forks: the child leads a new session, takes on that identity
and runs the script exactly as ``python -m hpc_elastic.worker SCRIPT`` would. The fork shares
the imported modules copy-on-write, so a start costs milliseconds whatever ``nproc_per_node``,
and the standby is ready again at once.

One forking process instead of one waiting process per local rank (the first version): each of
those imported torch on its own, so after a requeue a node with 2 local ranks imported torch
three times at once (agent and two standbys, with the CPUs the new workers needed), and after
every restart the used standbys had to be replaced by new imports while the group trained.

The standby never runs a script itself, so nothing of one worker leaks into the next; only
what the imports did is shared. What differs from a fresh process: torch is already imported,
so environment variables that torch or its libraries read at import time (``OMP_NUM_THREADS``,
``TORCH_*`` import flags) take their values from the agent's environment and the job's
``env:``, not from changes the script makes to ``os.environ`` before ``import torch``
(docs/configuration.md). CUDA is not initialized by these imports; it is initialized in each
worker, after the fork.

Protocol, one JSON message per datagram (``SOCK_SEQPACKET``):

- agent -> standby: ``{"argv", "env", "cwd"}`` with the worker's stdout and stderr descriptors;
- standby -> agent: ``{"pid": N}`` once forked, or ``{"error": text}``;
- standby -> agent: ``{"exit": N, "code": C}`` when worker N ended (``C`` as
  ``Popen.returncode``: the exit status, or minus the signal). The workers are the standby's
  children, so it reaps them and reports how they ended.

The standby exits when the agent's end of the socket closes (the agent ended, or no longer needs
it); workers still running are the agent's to stop.

Usually the agent forks its standby from itself, right after its own ``import torch``
(hpc_elastic/agent/standby.py, ``fork_from_agent``): the child then raises
:class:`BecomeStandby`, and ``hpc_elastic.cli.main`` runs :func:`run_forked` with its socket, so
only ``torch._dynamo`` is left to import. ``main`` is the standby started as a new process.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import sys

#: The file descriptor number of this process's end of the agent's socket pair.
ENV_STANDBY_FD = "HPC_ELASTIC_STANDBY_FD"
#: The largest start order (argv + environment, JSON) a standby accepts.
MAX_ORDER = 1 << 20

Order = tuple[dict[str, object], list[int]]


def preload() -> None:
    """Import what every worker imports, including ``torch._dynamo``, which the script's first
    ``DistributedDataParallel(...)`` (and FSDP, ``torch.compile``) imports on first use: 1.8 s
    of CPU per worker measured here, more than noticing a worker crash and re-forming the
    group take together (about 1 s). A failure here is not reported: the script's own
    ``import torch`` fails the same way and says why in its own ``stderr.log``.

    Forked after that import, DDP workers on gloo deadlocked at exit in 7 of 30 runs (a race
    in torch's teardown, see hpc_elastic/worker/keep_groups.py, which every forked worker
    installs: 0 of 60 with it)."""
    try:
        import torch  # noqa: F401
        import torch._dynamo  # noqa: F401
        import torch.distributed  # noqa: F401
    except Exception:  # noqa: BLE001, S110
        pass


def receive_order(sock: socket.socket) -> Order | None:
    """One start order from the agent; None when it closed the socket instead."""
    try:
        data, fds, _flags, _addr = socket.recv_fds(sock, MAX_ORDER, 2)
    except OSError:
        return None
    if not data:
        return None
    try:
        order = json.loads(data)
    except ValueError:
        order = None
    if not isinstance(order, dict) or len(fds) != 2:
        for fd in fds:
            os.close(fd)
        raise ValueError("the agent's start order is not a JSON object with two descriptors")
    return order, list(fds)


def become_worker(order: dict[str, object], fds: list[int]) -> list[str]:
    """Take on the worker's identity: stdout/stderr, working directory, environment. Returns
    the argv for ``hpc_elastic.worker``."""
    out, err = fds
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(out, 1)
    os.dup2(err, 2)
    os.close(out)
    os.close(err)
    os.chdir(str(order["cwd"]))
    env = order["env"]
    if not isinstance(env, dict):
        raise ValueError("the start order's env is not a mapping")
    os.environ.clear()  # putenv/unsetenv: the C library and torch's C++ side see it too
    os.environ.update({str(k): str(v) for k, v in env.items()})
    argv = order["argv"]
    if not isinstance(argv, list):
        raise ValueError("the start order's argv is not a list")
    return [str(a) for a in argv]


def _send(sock: socket.socket, message: dict[str, object]) -> None:
    with contextlib.suppress(OSError):  # the agent is gone: the next receive says so
        sock.send(json.dumps(message).encode())


def _report_ended(sock: socket.socket) -> None:
    """Reap every ended worker and tell the agent how it ended."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        _send(sock, {"exit": pid, "code": os.waitstatus_to_exitcode(status)})


def _cannot_fork() -> str | None:
    """Why forking a worker now would give it a broken CUDA, if it would: a forked child
    cannot use a CUDA context its parent created (torch then refuses: "Cannot re-initialize
    CUDA in forked subprocess"). The imports in :func:`preload` do not create one; this
    guards against one that does in some torch version -- the workers are then started cold."""
    torch = sys.modules.get("torch")
    cuda = getattr(torch, "cuda", None)
    try:
        if cuda is not None and cuda.is_initialized():
            return "CUDA was initialized in the standby process"
    except Exception:  # noqa: BLE001 - a torch without it: nothing initialized
        return None
    return None


def serve(sock: socket.socket) -> Order | None:
    """Fork a worker for each start order. Returns only in a forked child (its order), or with
    None in the standby when the agent closed the socket."""
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda _signum, _frame: None)  # wakes select via wake_w
    while True:
        _report_ended(sock)
        ready, _, _ = select.select([sock, wake_r], [], [], 5.0)
        if wake_r in ready:
            with contextlib.suppress(BlockingIOError):
                os.read(wake_r, 4096)
        if sock not in ready:
            continue
        try:
            received = receive_order(sock)
        except ValueError as err:
            _send(sock, {"error": str(err)})
            continue
        if received is None:
            return None
        order, fds = received
        pid = -1
        refused = _cannot_fork()
        if refused:
            _send(sock, {"error": f"fork refused: {refused}"})
        else:
            try:
                pid = os.fork()
            except OSError as err:
                _send(sock, {"error": f"fork failed: {err}"})
        if pid == 0:
            os.setsid()  # its own process group, as torch starts workers: killpg reaches it
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            for fd in (wake_r, wake_w):
                os.close(fd)
            sock.close()
            return order, fds
        for fd in fds:
            os.close(fd)
        if pid > 0:
            _send(sock, {"pid": pid})


class BecomeStandby(BaseException):
    """Raised in the process the agent forked to be its standby. A ``BaseException`` that
    nothing of the agent handles: it unwinds the agent's frames up to ``hpc_elastic.cli.main``,
    which then calls :func:`run_forked` -- outside its ``except`` clause, so that a worker's
    own exceptions are not chained to this one."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__("the agent's standby")
        self.sock = sock


def run_forked(sock: socket.socket) -> int:
    """The standby's life, forked from the agent or started anew (:func:`main`): preload,
    serve; in a forked worker, run it. Returns the exit code of the standby, or of a worker
    whose script returned."""
    preload()
    from hpc_elastic.worker.__main__ import main as run_worker

    served = serve(sock)
    if served is None:
        return 0
    run_worker(become_worker(*served))
    return 0


def main() -> None:
    sys.exit(run_forked(socket.socket(fileno=int(os.environ.pop(ENV_STANDBY_FD)))))


if __name__ == "__main__":
    main()
