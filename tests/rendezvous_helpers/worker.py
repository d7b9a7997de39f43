"""Stand-in training script: gloo ``all_reduce`` steps, with failures injected on request.

Started by the elastic agent (``LocalElasticAgent`` or torchrun) with the usual env
(``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ...). Contains no hpc_elastic code on purpose: the
torchrun test proves the backend works for an unmodified script.

Files it writes under ``--out`` (one writer per file):
  progress/<agent pid>-<local rank>.json   latest step, rewritten every step
  done/<agent pid>-<local rank>.json       written once the last step passed
"""

from __future__ import annotations

import argparse
import json
import os
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist


def _write(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--step-time", type=float, default=0.05)
    parser.add_argument("--fail-rank", type=int, default=-1, help="global rank that raises")
    parser.add_argument("--fail-step", type=int, default=2)
    args = parser.parse_args()

    out = Path(args.out)
    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    me = f"{os.getppid()}-{local_rank}"
    info = {
        "agent": os.getppid(),
        "pid": os.getpid(),
        "rank": rank,
        "world": world,
        "group_rank": int(os.environ["GROUP_RANK"]),
        "restart": restart,
        "master": f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}",
    }
    dist.init_process_group("gloo", timeout=timedelta(seconds=30))
    for step in range(args.steps):
        if rank == args.fail_rank and restart == 0 and step == args.fail_step:
            raise RuntimeError(f"injected failure on rank {rank} at step {step}")
        value = torch.tensor([float(rank + 1)])
        dist.all_reduce(value)
        expected = world * (world + 1) / 2
        if value.item() != expected:
            raise RuntimeError(f"all_reduce gave {value.item()}, expected {expected}")
        _write(out / "progress" / f"{me}.json", {**info, "step": step, "time": time.time()})
        time.sleep(args.step_time)
    dist.destroy_process_group()
    _write(out / "done" / f"{me}.json", {**info, "steps": args.steps, "time": time.time()})


if __name__ == "__main__":
    main()
