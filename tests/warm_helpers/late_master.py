"""A plain script whose rank 0 starts its group late, for the store-wait tests.

Rank 0 sleeps ``$LATE_MASTER_DELAY`` seconds before ``init_process_group("gloo")`` (``env://``);
the other ranks call it at once, so they try to reach rank 0's store before it listens. Each
rank appends one JSON line to ``$WARM_TEST_DIR/inits.jsonl``: when it called
``init_process_group``, when that returned, and whether torch's ``env://`` handler was the
store-waiting one (hpc_elastic/worker/store_wait.py).
"""

import importlib
import json
import os
import time

import torch.distributed as dist


def main() -> None:
    rank = int(os.environ["RANK"])
    if rank == 0:
        time.sleep(float(os.environ["LATE_MASTER_DELAY"]))
    # (torch.distributed.rendezvous is also the name of a function in torch.distributed)
    handlers = importlib.import_module("torch.distributed.rendezvous")._rendezvous_handlers
    handler = handlers["env"]
    called = time.time()
    dist.init_process_group("gloo")
    returned = time.time()
    dist.barrier()
    dist.destroy_process_group()
    line = {"rank": rank, "called": called, "returned": returned,
            "waiting_handler": bool(getattr(handler, "_hpc_elastic_waits_for_store", False))}
    with open(os.path.join(os.environ["WARM_TEST_DIR"], "inits.jsonl"), "a") as f:
        f.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
