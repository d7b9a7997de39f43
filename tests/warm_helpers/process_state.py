"""A plain script for the warm-worker tests: writes what its process looks like to
``$WARM_TEST_DIR/state-<RANK>-<pid>.json`` -- the things a worker forked from a standby must
share with one started as a new process (output buffering, umask, signal dispositions, open
descriptors, session, OpenMP threads from the job's ``env:``, logging, ``sys.path[0]``)."""

import contextlib
import json
import logging
import os
import signal
import sys

PRELOADED = "torch" in sys.modules
import torch  # noqa: E402

SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2", "SIGPIPE", "SIGCHLD", "SIGXFSZ", "SIGHUP")


def disposition(sig: signal.Signals) -> str:
    handler = signal.getsignal(sig)
    if handler is signal.default_int_handler:
        return "default_int_handler"
    if isinstance(handler, signal.Handlers):
        return handler.name
    return "python" if handler is not None else "unknown"


def open_fds() -> list[str]:
    fds = []
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the listing's own descriptor, closed by now
            fds.append(f"{name}->{os.readlink(f'/proc/self/fd/{name}')}")
    return sorted(fds)


def main() -> None:
    umask = os.umask(0)
    os.umask(umask)
    state = {
        "pid": os.getpid(), "ppid": os.getppid(), "preloaded": PRELOADED,
        "session_leader": os.getsid(0) == os.getpid(),
        "stdout_write_through": sys.stdout.write_through,
        "stderr_write_through": sys.stderr.write_through,
        "stdout_raw": type(sys.stdout.buffer).__name__, "umask": oct(umask),
        "threads": torch.get_num_threads(), "omp_env": os.environ.get("OMP_NUM_THREADS"),
        "signals": {name: disposition(getattr(signal, name)) for name in SIGNALS},
        "blocked": sorted(int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, [])),
        "fds": [fd.split("->")[0] for fd in open_fds() if "->/proc/" not in fd],
        "fd_targets": open_fds(),
        "root_handlers": len(logging.getLogger().handlers), "path0": sys.path[0],
        "argv": sys.argv, "main": __name__, "cwd": os.getcwd(),
        "python_threads": __import__("threading").active_count(),
    }
    out = os.environ["WARM_TEST_DIR"]
    path = os.path.join(out, f"state-{os.environ['RANK']}-{os.getpid()}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(state, f)
    os.rename(path + ".tmp", path)
    print("state written", flush=True)


if __name__ == "__main__":
    main()
