"""One node's side of a create race: at the same moments as the other nodes, open a lock file
that does not exist yet, through this node's own filesystem client (``O_CREAT`` without
``O_EXCL``: GlusterFS fails the loser's create with ``EEXIST``, see
hpc_elastic/rendezvous/locking.py, ``open_or_create``).

    create_race.py ROOT ROUNDS START SPACING MODE

Round k (0-based) starts at wall-clock time START + k * SPACING (all processes run on one
machine, so they share the clock) and opens ROOT/<k>/state.lock, ROOT/<k> made beforehand.
MODE ``raw``: ``os.open`` with ``O_CREAT``, as the lock did before; ``lock``: the rendezvous
lock's ``try_hold``. Prints one JSON line: rounds whose open failed with ``EEXIST``, and every
other error.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from hpc_elastic.rendezvous.locking import ProcessFileLock


def main() -> None:
    root, rounds, start, spacing, mode = (Path(sys.argv[1]), int(sys.argv[2]),
                                          float(sys.argv[3]), float(sys.argv[4]), sys.argv[5])
    eexist, errors = [], []
    for k in range(rounds):
        path = root / str(k) / "state.lock"
        delay = start + k * spacing - time.time()
        if delay > 0:
            time.sleep(delay)
        try:
            if mode == "raw":
                os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600))
            else:
                with ProcessFileLock(path).try_hold():
                    pass
        except FileExistsError:
            eexist.append(k)
        except Exception as exc:  # noqa: BLE001 - reported, the test judges
            errors.append(f"round {k}: {type(exc).__name__}: {exc}")
    print(json.dumps({"eexist": eexist, "errors": errors}))


if __name__ == "__main__":
    main()
