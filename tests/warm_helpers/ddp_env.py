"""A plain torchrun-style DDP script (no hpc_elastic import) for the warm-worker tests.

Writes one JSON line per start to ``$WARM_TEST_DIR/starts.jsonl``: what the process saw when
the script began (the torchrun environment, whether torch was already imported, argv, cwd),
then trains a tiny DDP model until ``$WARM_TEST_DIR/done`` exists. ``--no-dist``: only the line;
``--raise``: the line, then rank 0 raises (the others wait to be stopped); ``--wait``: the
line, then waits for ``done`` without torch.distributed. Ends with ``destroy_process_group``.
"""

import json
import os
import sys
import time

T0 = time.time()
PRELOADED = "torch" in sys.modules
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402

IMPORT_S = time.time() - T0
KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
        "ROLE_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RESTART_COUNT",
        "TORCHELASTIC_RUN_ID", "TORCHELASTIC_ERROR_FILE", "HPC_ELASTIC_WORKER_DIR",
        "WARM_TEST_DIR", "HPC_ELASTIC_STANDBY_FD")


def main() -> None:
    out = os.environ["WARM_TEST_DIR"]
    line = {"pid": os.getpid(), "ppid": os.getppid(), "t0": T0, "preloaded": PRELOADED,
            "import_s": IMPORT_S,
            "argv": sys.argv, "cwd": os.getcwd(), "main": __name__,
            "env": {k: os.environ.get(k) for k in KEYS}}
    with open(os.path.join(out, "starts.jsonl"), "a") as f:
        f.write(json.dumps(line) + "\n")
    print(f"hello from rank {os.environ['RANK']} pid {os.getpid()}", flush=True)
    if sys.argv[1:] == ["--no-dist"]:
        return
    if sys.argv[1:] == ["--wait"]:
        while not os.path.exists(os.path.join(out, "done")):
            time.sleep(0.05)
        return
    if sys.argv[1:] == ["--raise"]:
        if os.environ["RANK"] == "0":
            raise RuntimeError("injected crash at start")
        time.sleep(60)  # ended by torch when rank 0 failed
    dist.init_process_group("gloo")
    model = DistributedDataParallel(torch.nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    while True:
        opt.zero_grad()
        model(torch.randn(8, 4)).sum().backward()
        opt.step()
        stop = torch.tensor([float(os.path.exists(os.path.join(out, "done")))])
        dist.all_reduce(stop)
        if stop.item() > 0:
            break
        time.sleep(0.05)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
