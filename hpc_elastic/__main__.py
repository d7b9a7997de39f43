"""``python -m hpc_elastic`` is the same front door as the ``hpc-elastic`` console script."""

from hpc_elastic.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
