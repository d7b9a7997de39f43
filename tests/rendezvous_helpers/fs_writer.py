"""One writer of the multi-client conformance test: ``UPDATES`` changes to a run's state.

``python fs_writer.py ROOT WHO UPDATES MODE`` (MODE ``txn``: locked transactions appending
``w<WHO>-<j>`` to ``waiting``; ``cas``: lock-free read + compare_and_set appending ``c<WHO>-<j>``
to ``prev``). Run on a node of ``tests/sharedfs``, i.e. through that node's own GlusterFS
client. Exit 0 when every change was committed; prints retries (transient errors seen).
"""

from __future__ import annotations

import sys
from pathlib import Path

from hpc_elastic.rendezvous.errors import SharedFSRendezvousError
from hpc_elastic.rendezvous.layout import RunLayout
from hpc_elastic.rendezvous.state import State, StateFile


def main() -> int:
    root, who, updates, mode = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    layout = RunLayout(Path(root), "run")
    layout.create()
    store = StateFile(layout, lock_timeout=120)
    done = 0
    while done < updates:
        if mode == "txn":
            store.transact(lambda st, j=done: st.waiting.append(f"w{who}-{j}") or True)
            done += 1
            continue
        try:
            current = store.read() or State()
        except (OSError, SharedFSRendezvousError):
            continue  # retried inside already; an unreadable moment: poll again
        new = current.copy()
        new.prev.append(f"c{who}-{done}")
        ok, _ = store.compare_and_set(new, current.version)
        done += ok
    print(f"retries={store.ops.retries} sync={store.sync}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
