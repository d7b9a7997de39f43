"""A plain torchrun-style DDP script on a GPU (no hpc_elastic import): benchmarks/gpu_warm_check.sh.

Writes one JSON line per start to ``$GPU_CHECK_DIR/starts.jsonl`` (pid, parent, whether torch
was imported before the script, the device, the backend, the restart count), trains a small
model on ``cuda:0`` for ``--steps`` steps and ends with ``destroy_process_group()``. In the
first attempt (``TORCHELASTIC_RESTART_COUNT`` 0) rank 0 can ``--crash`` after 3 steps, or
``--hang`` there: it spins the GPU and waits for it (``cudaStreamSynchronize``) for ever.
"""

import argparse
import json
import os
import sys
import time

PRELOADED = "torch" in sys.modules
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backend", default="nccl")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--crash", action="store_true")
    parser.add_argument("--hang", action="store_true")
    args = parser.parse_args()
    rank = int(os.environ["RANK"])
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    torch.cuda.set_device(0)
    line = {"pid": os.getpid(), "ppid": os.getppid(), "preloaded": PRELOADED, "rank": rank,
            "world": int(os.environ["WORLD_SIZE"]), "restart": restart,
            "device": torch.cuda.get_device_name(0), "backend": args.backend}
    with open(os.path.join(os.environ["GPU_CHECK_DIR"], "starts.jsonl"), "a") as f:
        f.write(json.dumps(line) + "\n")
    dist.init_process_group(args.backend)
    model = DistributedDataParallel(torch.nn.Linear(256, 256).cuda(), device_ids=[0])
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for step in range(args.steps):
        opt.zero_grad()
        model(torch.randn(64, 256, device="cuda")).sum().backward()
        opt.step()
        torch.cuda.synchronize()
        if restart == 0 and rank == 0 and step == 3:
            if args.crash:
                raise RuntimeError("injected crash after step 3")
            if args.hang:
                print("hanging in the GPU now", flush=True)
                while True:
                    torch.cuda._sleep(1 << 30)
                    torch.cuda.synchronize()
        time.sleep(0.05)
    total = torch.ones(1, device="cuda")
    dist.all_reduce(total)
    print(f"rank {rank} done, world {int(total.item())}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
