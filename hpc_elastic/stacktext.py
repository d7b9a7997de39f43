"""Reading the stack dumps py-spy and faulthandler print: threads, the main thread's frames, the
innermost frame of the user's own code, and whether a rank waited in a collective.

Shared by the agent (the restart-storm guard compares hung frames) and the analysis
(``logs hangs``), which must not import each other.
"""

from __future__ import annotations

import re

# Functions that wait for other ranks (torch.distributed's and the autograd engine, where DDP's
# gradient all_reduce waits).
COLLECTIVES = frozenset({
    "all_reduce", "allreduce", "all_gather", "all_gather_into_tensor", "reduce_scatter",
    "reduce_scatter_tensor", "broadcast", "barrier", "monitored_barrier", "all_to_all",
    "all_to_all_single", "reduce", "gather", "scatter", "send", "recv", "irecv", "isend",
    "broadcast_object_list", "all_gather_object", "_engine_run_backward", "backward",
    "wait_for_work", "synchronize"})
_LIBRARY = ("torch/", "threading.py", "<frozen", "site-packages/", "/lib/python", "queue.py",
            "selectors.py", "socket.py", "runpy")
_WRAPPER = ("runpy", "hpc_elastic/worker/")

_PYSPY_THREAD = re.compile(r'^Thread (\S+) \(([^)]*)\)(?::\s*"(.*)")?')
_PYSPY_FRAME = re.compile(r"^\s+(\S.*?) \((.+):(\d+)\)\s*$")
_FH_THREAD = re.compile(r"^(Current thread|Thread) (0x[0-9a-fA-F]+)")
_FH_FRAME = re.compile(r'^\s+File "(.+)", line (\d+) in (.+)$')


def _short(path: str) -> str:
    """Comparable file names across tools: py-spy prints paths relative to ``sys.path``,
    faulthandler absolute ones; keep what follows site-packages, else the last two parts."""
    if "site-packages/" in path:
        return path.split("site-packages/", 1)[1]
    if not path.startswith("/"):
        return path
    parts = path.split("/")
    return "/".join(parts[-2:])


def parse_threads(text: str) -> list[tuple[str, list[tuple[str, str, int]]]]:
    """Threads as (name, frames innermost first); frames are (function, file, line)."""
    threads: list[tuple[str, list[tuple[str, str, int]]]] = []
    for line in text.splitlines():
        m = _PYSPY_THREAD.match(line)
        if m:
            threads.append((m.group(3) or m.group(1), []))
            continue
        m = _FH_THREAD.match(line)
        if m:
            threads.append((m.group(1) + " " + m.group(2), []))
            continue
        if not threads:
            continue
        m = _PYSPY_FRAME.match(line)
        if m:
            func = m.group(1).rsplit(".", 1)[-1]
            threads[-1][1].append((func, _short(m.group(2)), int(m.group(3))))
            continue
        m = _FH_FRAME.match(line)
        if m:
            threads[-1][1].append((m.group(3), _short(m.group(1)), int(m.group(2))))
    return threads


def main_frames(text: str) -> list[tuple[str, str, int]]:
    """The main thread's frames, innermost first, cut below the script's own ``<module>``."""
    threads = parse_threads(text)
    main = next((f for name, f in threads if name == "MainThread"), None)
    if main is None:  # faulthandler names no threads: the main one runs the script
        main = next((f for _, f in threads
                     if any(fn in ("<module>", "_run_module_as_main") for fn, _, _ in f)), None)
    if main is None:
        return []
    for i, (_, file, _) in enumerate(main):
        if any(w in file for w in _WRAPPER):
            return main[:i]
    return main


def where(frames: list[tuple[str, str, int]]) -> str | None:
    """The innermost frame in the user's own code (else the innermost of all)."""
    for func, file, line in frames:
        if not any(lib in file for lib in _LIBRARY):
            return f"{file}:{line} ({func})"
    if frames:
        func, file, line = frames[0]
        return f"{file}:{line} ({func})"
    return None


def collective(frames: list[tuple[str, str, int]]) -> str | None:
    """The outermost waiting function (``backward`` rather than the engine call inside it)."""
    for func, _, _ in reversed(frames):
        if func in COLLECTIVES:
            return func
    return None
