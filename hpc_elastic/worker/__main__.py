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
        if argv[0] == "-m":
            sys.argv = [argv[1], *argv[2:]]
            sys.path[0] = os.getcwd()
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = list(argv)
            sys.path[0] = os.path.dirname(os.path.abspath(argv[0]))
            runpy.run_path(argv[0], run_name="__main__")
    finally:
        beat.finished()


if __name__ == "__main__":
    main(sys.argv[1:])
