"""``python -u -m hpc_elastic.worker.standby``: a worker process started before it is needed.

Why: after a failure, most of a restart's time is not detecting it or re-forming the group but
starting the new workers -- a new Python, ``import torch`` (seconds of CPU each), and only then
the script. With ``warm_workers`` the agent starts one of these per local rank ahead of time
(hpc_elastic/agent/standby.py): it imports torch and waits. When the agent starts a worker
group, it hands a waiting process the worker's whole start -- the command line, the complete
environment (RANK, WORLD_SIZE, MASTER_ADDR/PORT, TORCHELASTIC_* ... exactly what a new process
would have got), the working directory and the already opened ``stdout.log``/``stderr.log``
(passed as file descriptors, ``SCM_RIGHTS``) -- and the process then runs the script exactly as
``python -m hpc_elastic.worker SCRIPT`` would. It stays the agent's child, so its exit code,
error file, PID (hang dumps, fencing's SIGKILL) are those of an ordinary worker.

Each standby runs one script at most: nothing of a previous run can leak into the next one.
What differs from a fresh process: torch is already imported, so environment variables that
torch or its libraries read at import time (``OMP_NUM_THREADS``, ``TORCH_*`` import flags)
take their values from the agent's environment and the job's ``env:``, not from changes the
script makes to ``os.environ`` before ``import torch`` (docs/configuration.md).
"""

from __future__ import annotations

import json
import os
import socket
import sys

#: The file descriptor number of this process's end of the agent's socket pair.
ENV_STANDBY_FD = "HPC_ELASTIC_STANDBY_FD"
#: The largest start order (argv + environment, JSON) a standby accepts.
MAX_ORDER = 1 << 20


def preload() -> None:
    """Import what every worker imports. A failure here is not reported: the script's own
    ``import torch`` fails the same way and says why in its own ``stderr.log``."""
    try:
        import torch  # noqa: F401
        import torch.distributed  # noqa: F401
    except Exception:  # noqa: BLE001, S110
        pass


def wait_for_order(sock: socket.socket) -> tuple[dict[str, object], list[int]] | None:
    """Block until the agent sends the start order; None when it closed the socket instead
    (the agent ended, or no longer needs this standby): then this process just exits."""
    try:
        data, fds, _flags, _addr = socket.recv_fds(sock, MAX_ORDER, 2)
    except OSError:
        return None
    if not data:
        return None
    order = json.loads(data)
    if not isinstance(order, dict):
        raise ValueError("the agent's start order is not a JSON object")
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


def main() -> None:
    fd = int(os.environ.pop(ENV_STANDBY_FD))
    sock = socket.socket(fileno=fd)
    preload()
    from hpc_elastic.worker.__main__ import main as run_worker

    received = wait_for_order(sock)
    if received is None:
        sys.exit(0)
    order, fds = received
    argv = become_worker(order, fds)
    sock.close()
    run_worker(argv)


if __name__ == "__main__":
    main()
