"""``python -m hpc_elastic.worker SCRIPT ARGS...`` / ``... -m MODULE ARGS...``.

Installs the progress reporter, then runs the script as ``python SCRIPT ARGS`` would (``runpy``,
``__name__ == "__main__"``, ``sys.argv`` and ``sys.path[0]`` as Python sets them). The agent
starts every worker this way.
"""

from __future__ import annotations

import os
import runpy
import sys

from hpc_elastic.worker import beat


def main(argv: list[str]) -> None:
    if not argv or argv == ["-m"]:
        sys.exit("usage: python -m hpc_elastic.worker SCRIPT [ARGS...] | -m MODULE [ARGS...]")
    beat.install()
    try:
        _run(argv)
    except BaseException as exc:
        if not isinstance(exc, (SystemExit, KeyboardInterrupt)):
            _record_error(exc)
        raise
    finally:
        beat.finished()


def _record_error(exc: BaseException) -> None:
    """What torch's ``@record`` does, for scripts without it: the exception's type, message and
    traceback into ``TORCHELASTIC_ERROR_FILE``, so the agent's failure (and the restart-storm
    guard, ``logs failures``) names it. A file the script's own ``@record`` wrote is kept."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path or os.path.exists(path):
        return
    try:
        from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

        ErrorHandler().record_exception(exc)
    except Exception:  # noqa: BLE001 - never hide the script's own exception
        pass


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
