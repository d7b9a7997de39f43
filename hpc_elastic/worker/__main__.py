"""``python -m hpc_elastic.worker SCRIPT ARGS...`` / ``... -m MODULE ARGS...``.

Installs the progress reporter, the store wait of store_wait.py (and, in a worker forked by the
warm-start standby, the process group keeper of keep_groups.py), then runs the script as
``python SCRIPT ARGS`` would (``runpy``, ``__name__ == "__main__"``, ``sys.argv`` and
``sys.path[0]`` as Python sets them). The agent starts every worker this way.
"""

from __future__ import annotations

import contextlib
import json
import os
import runpy
import sys
import time
import traceback

from hpc_elastic.worker import beat, keep_groups, store_wait


def main(argv: list[str]) -> None:
    if not argv or argv == ["-m"]:
        sys.exit("usage: python -m hpc_elastic.worker SCRIPT [ARGS...] | -m MODULE [ARGS...]")
    beat.install()
    keep_groups.install()  # forked warm workers only: see keep_groups.py
    store_wait.install_on_import()  # now in a forked warm worker, else at import torch
    try:
        _run(argv)
    except BaseException as exc:
        if not isinstance(exc, (SystemExit, KeyboardInterrupt)):
            _record_error(exc)
        raise
    finally:
        beat.finished()
        keep_groups.release()


def _record_error(exc: BaseException) -> None:
    """What torch's ``@record`` does, for scripts without it: the exception's type, message and
    traceback into ``TORCHELASTIC_ERROR_FILE``, so the agent's failure (and the restart-storm
    guard, ``logs failures``) names it. A file the script's own ``@record`` wrote is kept.

    Written whole or not at all: torch's own writer opens the final path and then writes, so on
    a full disk it leaves an empty file, which torch's parser in the agent fails on (and logs a
    traceback for). Here the record goes to a private temporary file first and is linked into
    place only when it was written completely (``link`` also never replaces a file the script
    wrote meanwhile); when the disk is full there is no error file, as for a signal."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path or os.path.lexists(path):
        return
    data = json.dumps({"message": {
        "message": f"{type(exc).__name__}: {exc}",
        "extraInfo": {"py_callstack": "".join(traceback.format_exception(exc)),
                      "timestamp": str(int(time.time()))}}}).encode()
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    except OSError:
        return
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        os.link(tmp, path)
    except OSError:
        pass  # never hide the script's own exception
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def _run(argv: list[str]) -> None:
    if argv[0] == "-m":
        sys.argv = [argv[1], *argv[2:]]
        sys.path[0] = os.getcwd()
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = list(argv)
        sys.path[0] = os.path.dirname(os.path.abspath(argv[0]))
        runpy.run_path(argv[0], run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
