"""A plain DDP (gloo) training script with hangs injected on request; no hpc_elastic code.

Checkpoints its step to ``HPC_ELASTIC_CHECKPOINT_DIR`` (or ``--ckpt``) every step so a restart
resumes. The fault is injected once per job: the injecting rank creates ``<ckpt>/injected``
with O_EXCL first, so the restarted group runs clean (unless ``--every-start``: a restart storm).

Faults (``--fault``): ``stop`` (the rank SIGSTOPs itself), ``deadlock`` (acquires a lock it
holds), ``loop`` (spins in Python forever), ``long`` (one step sleeps ``--long-s``: legitimate),
``raise`` (a ValueError), ``slow`` (the rank burns ``--slow-factor`` times the others'
``--work-s`` of CPU per step: a straggler), ``none``.
"""

from __future__ import annotations

import argparse
import os
import signal
import threading
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


def inject_once(ckpt: Path) -> bool:
    try:
        fd = os.open(ckpt / "injected", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:  # when: the tests measure detection latency from it
        f.write(f"{time.time()} {dist.get_rank()}\n")
    return True


def burn(cpu_s: float) -> None:
    """Busy work: ``cpu_s`` seconds of this thread's CPU time."""
    end = time.thread_time() + cpu_s
    while time.thread_time() < end:
        pass


def spin_forever() -> None:
    x = 0
    while True:
        x = (x + 1) % 1000


def deadlock() -> None:
    lock = threading.Lock()
    lock.acquire()
    lock.acquire()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--step-sleep", type=float, default=0.05)
    parser.add_argument("--fault", default="none",
                        choices=["none", "stop", "deadlock", "loop", "long", "slow", "raise"])
    parser.add_argument("--every-start", action="store_true",
                        help="inject on every start, not once per job (a restart storm)")
    parser.add_argument("--fault-rank", type=int, default=1)
    parser.add_argument("--fault-step", type=int, default=10)
    parser.add_argument("--long-s", type=float, default=3.0)
    parser.add_argument("--slow-factor", type=float, default=1.5)
    parser.add_argument("--slow-until-restart", action="store_true",
                        help="slow only in the first start (the slow node is gone after it)")
    parser.add_argument("--work-s", type=float, default=0.0,
                        help="CPU seconds every rank burns per step (a stand-in for compute)")
    parser.add_argument("--ckpt", default=os.environ.get("HPC_ELASTIC_CHECKPOINT_DIR", "."))
    args = parser.parse_args()

    ckpt = Path(args.ckpt)
    ckpt.mkdir(parents=True, exist_ok=True)
    dist.init_process_group("gloo", timeout=timedelta(seconds=600))
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = DistributedDataParallel(torch.nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    state = ckpt / "step.txt"
    start = int(state.read_text()) if state.exists() else 0
    if rank == 0:
        print(f"starting at step {start}", flush=True)
    for step in range(start, args.steps):
        if rank == args.fault_rank and step == args.fault_step and args.fault != "slow":
            if args.fault == "long":
                time.sleep(args.long_s)
            elif args.every_start or inject_once(ckpt):
                print(f"rank {rank}: injecting {args.fault} at step {step}", flush=True)
                if args.fault == "stop":
                    os.kill(os.getpid(), signal.SIGSTOP)
                elif args.fault == "deadlock":
                    deadlock()
                elif args.fault == "loop":
                    spin_forever()
                elif args.fault == "raise":
                    raise ValueError(f"bad batch at step {step}")
        loss = model(torch.randn(4, 8)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        slow = args.fault == "slow" and rank == args.fault_rank and not (
            args.slow_until_restart and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0")
        burn(args.work_s * (args.slow_factor if slow else 1.0))
        time.sleep(args.step_sleep)
        if rank == 0:
            tmp = state.with_suffix(".tmp")
            tmp.write_text(str(step + 1))
            os.replace(tmp, state)
    dist.barrier()
    dist.destroy_process_group()
    if rank == 0:
        print("done", flush=True)


if __name__ == "__main__":
    main()
