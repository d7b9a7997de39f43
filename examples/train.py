"""A small, real DDP training script that shows the hpc_elastic worker contract.

It runs unchanged under ``torchrun`` or under hpc_elastic's agent:

* **Distributed setup** comes from the usual torchrun environment (RANK, WORLD_SIZE,
  MASTER_ADDR/PORT, ...): ``init_process_group`` with gloo on CPU, NCCL on GPUs (each rank on
  the GPU of its ``LOCAL_RANK``).
* **Checkpoints**: rank 0 writes ``last.pt`` atomically (temp file + rename) at the end of every
  epoch, and every rank resumes from it on start. That is what makes restarts and requeues cheap.
  The directory is ``--checkpoint-dir``, else ``$HPC_ELASTIC_CHECKPOINT_DIR`` (set by the agent
  to ``<jobdir>/checkpoints``), else ``./checkpoints``.
* **Preemption contract**: when Slurm is about to stop the job, the agent forwards the job's
  preemption signal (``$HPC_ELASTIC_PREEMPT_SIGNAL``, default SIGUSR1) to every worker. The
  script only sets a flag in the handler; at the next step all ranks agree (an all_reduce of the
  flag, so no rank stops alone and hangs the others), rank 0 writes a mid-epoch checkpoint, all
  ranks wait for it (a barrier), and the workers exit 0. A handler installed late is fine: the
  agent starts workers with the signal ignored and forwards it once the handler is there.
  The agent then requeues the job, and the next attempt resumes here.
* **Failure injection** for demos and tests: ``--fail-at-step N --fail-rank R`` raises an
  exception on that rank at that global step, only in the first attempt and restart, so the
  restarted group gets past it. ``@record`` puts the traceback into ``error.json``.
  ``--hang-at-step N --fail-rank R`` makes that rank hang instead (first attempt and restart
  only): on a GPU in a CUDA kernel that spins for about an hour (``torch.cuda._sleep``), on the
  CPU in a sleep; either way outside any collective, with its peers waiting in the next one.
  hpc_elastic's hang detection finds it (``hang_timeout``).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.elastic.multiprocessing.errors import record
from torch.nn.parallel import DistributedDataParallel

FEATURES = 16


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--steps-per-epoch", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--step-sleep", type=float, default=0.0,
                        help="seconds to sleep per step, to make a short run observable")
    parser.add_argument("--checkpoint-dir", default=None)
    parser.add_argument("--metric-every", type=int, default=5,
                        help="report the loss every N steps (0: once per epoch)")
    parser.add_argument("--fail-at-step", type=int, default=-1,
                        help="inject an exception at this global step (first attempt only)")
    parser.add_argument("--fail-rank", type=int, default=0)
    parser.add_argument("--hang-at-step", type=int, default=-1,
                        help="make --fail-rank hang at this global step (first attempt only)")
    parser.add_argument("--fail-always", action="store_true",
                        help="inject the failure in every restart, not only the first")
    return parser.parse_args()


class PreemptionFlag:
    """Set by the preemption signal; read at step boundaries (signal handlers stay tiny)."""

    def __init__(self) -> None:
        self.requested = False
        name = os.environ.get("HPC_ELASTIC_PREEMPT_SIGNAL", "USR1").upper().removeprefix("SIG")
        signal.signal(getattr(signal, "SIG" + name), self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        self.requested = True

    def agreed(self, device: torch.device) -> bool:
        """True on every rank as soon as any rank got the signal."""
        flag = torch.tensor([1.0 if self.requested else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)


def checkpoint_dir(args: argparse.Namespace) -> Path:
    chosen = args.checkpoint_dir or os.environ.get("HPC_ELASTIC_CHECKPOINT_DIR", "checkpoints")
    return Path(chosen)


def save_checkpoint(path: Path, state: dict) -> None:
    """Write-then-rename so a crash mid-save never leaves a half checkpoint behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, path)


def synthetic_batch(epoch: int, step: int, rank: int, batch: int) -> tuple[torch.Tensor, ...]:
    """Deterministic data per (epoch, step, rank): a noisy linear target the model can learn."""
    gen = torch.Generator().manual_seed(epoch * 100_003 + step * 101 + rank)
    x = torch.randn(batch, FEATURES, generator=gen)
    true_w = torch.linspace(-1.0, 1.0, FEATURES).unsqueeze(1)
    y = x @ true_w + 0.01 * torch.randn(batch, 1, generator=gen)
    return x, y


def exit_without_teardown() -> None:
    """Exit 0 now, after the ranks' last barrier, without tearing the process group down.

    Measured on torch 2.13 with gloo: when all ranks exit at the same moment, the teardown in
    one of them sometimes aborts ("terminate called without an active exception", exit -6).
    The agent counts that as a failure and restarts the whole group for nothing. Every rank has
    passed a barrier and rank 0's checkpoint is on disk, so there is nothing left to clean up.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def hang_forever(rank: int, step: int) -> None:
    """The injected hang: on a GPU a kernel that spins for about an hour and a wait for it (the
    way a deadlocked or runaway kernel looks from Python), else a sleep."""
    print(f"rank {rank}: hanging at global step {step} "
          f"({'in a CUDA kernel' if torch.cuda.is_available() else 'in a sleep'})", flush=True)
    if torch.cuda.is_available():
        torch.cuda._sleep(1 << 42)  # GPU clock cycles: ~1 h at 1.5 GHz
        torch.cuda.synchronize()
    while True:
        time.sleep(3600)


def emit_metric(name: str, value: float) -> None:
    """Report a metric through hpc_elastic when it is installed; a no-op elsewhere."""
    try:
        from hpc_elastic.telemetry import log_metric
    except ImportError:
        return
    log_metric(name, value)


@record
def main() -> None:
    args = parse_args()
    if torch.cuda.is_available():
        backend, device = "nccl", torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        backend, device = "gloo", torch.device("cpu")
    dist.init_process_group(backend=backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    attempt = int(os.environ.get("HPC_ELASTIC_ATTEMPT", os.environ.get("SLURM_RESTART_COUNT", "0")))
    preemption = PreemptionFlag()

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(FEATURES, 32), nn.ReLU(), nn.Linear(32, 1)).to(device)
    ddp = DistributedDataParallel(model, device_ids=[device.index] if backend == "nccl" else None)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=args.lr)

    ckpt_path = checkpoint_dir(args) / "last.pt"
    epoch, step_in_epoch, global_step = 0, 0, 0
    if ckpt_path.exists():
        state = torch.load(ckpt_path, weights_only=True, map_location=device)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        epoch, step_in_epoch, global_step = state["epoch"], state["step"], state["global_step"]
    print(f"rank {rank}/{world}: attempt {attempt} restart {restart}, starting at epoch {epoch} "
          f"step {step_in_epoch} (global step {global_step})", flush=True)

    def snapshot(next_epoch: int, next_step: int) -> dict:
        return {"epoch": next_epoch, "step": next_step, "global_step": global_step,
                "model": model.state_dict(), "optimizer": optimizer.state_dict()}

    inject = args.fail_at_step >= 0 and rank == args.fail_rank and (
        args.fail_always or (restart == 0 and attempt == 0))
    hang = args.hang_at_step >= 0 and rank == args.fail_rank and restart == 0 and attempt == 0
    last_loss = float("nan")
    while epoch < args.epochs:
        started = time.monotonic()
        for step in range(step_in_epoch, args.steps_per_epoch):
            if preemption.agreed(device):
                if rank == 0:
                    save_checkpoint(ckpt_path, snapshot(epoch, step))
                # Nobody exits before the checkpoint is on disk (the agent requeues as soon as
                # the workers are done).
                dist.barrier()
                print(f"rank {rank}: preemption signal, checkpointed at epoch {epoch} step "
                      f"{step} (global step {global_step}); exiting for requeue", flush=True)
                exit_without_teardown()
            if inject and global_step == args.fail_at_step:
                raise RuntimeError(f"injected failure at global step {global_step} on rank {rank}")
            if hang and global_step == args.hang_at_step:
                hang_forever(rank, global_step)
            x, y = (t.to(device) for t in synthetic_batch(epoch, step, rank, args.batch_size))
            optimizer.zero_grad()
            loss = nn.functional.mse_loss(ddp(x), y)
            loss.backward()
            optimizer.step()
            last_loss = loss.item()
            global_step += 1
            if args.metric_every > 0 and global_step % args.metric_every == 0:
                emit_metric("loss", last_loss)
            if args.step_sleep:
                time.sleep(args.step_sleep)
        epoch, step_in_epoch = epoch + 1, 0
        elapsed = time.monotonic() - started
        if args.metric_every <= 0:
            emit_metric("loss", last_loss)
        emit_metric("samples_per_s", args.steps_per_epoch * args.batch_size / max(elapsed, 1e-9))
        if rank == 0:
            save_checkpoint(ckpt_path, snapshot(epoch, 0))
            print(f"epoch {epoch - 1} done: loss {last_loss:.4f}, checkpoint {ckpt_path}",
                  flush=True)
        dist.barrier()
    print(f"rank {rank}: training finished at global step {global_step}, "
          f"final loss {last_loss:.4f}", flush=True)
    exit_without_teardown()


if __name__ == "__main__":
    try:
        main()
    except Exception:
        # @record has written error.json (the root cause the agent reports). Exit 1 now: the
        # process group's teardown after an exception sometimes aborts (exit -6, measured),
        # which would hide that this rank failed by raising.
        sys.excepthook(*sys.exc_info())  # torch's hook prints it as "[rank<N>]: ..." lines
        sys.stderr.flush()
        os._exit(1)
