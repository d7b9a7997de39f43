"""Goodput under a fault storm on the Slurm test cluster: hpc_elastic against plain torchrun c10d.

    .venv/bin/python benchmarks/bench_goodput.py            # ~5 min of training per launcher
    .venv/bin/python benchmarks/bench_goodput.py --smoke    # both at once, tiny, one fault

# smoke: slurm

The same job, ``examples/train.py`` with 2 workers per node on ``nodes 2:3`` (3 of the cluster's
4 nodes), is run twice on the private Slurm test cluster (tests/slurm_cluster): once submitted
with ``hpc-elastic submit``, once by a plain batch script, ``srun torchrun --rdzv-backend=c10d``
with the store on the job's first node and the same ``--max-restarts``. Both get the same fault
schedule, counted from the moment training first started: one fault every ``--interval``
seconds, in this order -- a worker crash (SIGKILL of one worker), a node power cut (every
process of the node SIGKILLed), a preemption (``scancel --signal=USR1``; after 20 s the
"scheduler" requeues the job itself if it has not been requeued), a node freeze (SIGSTOP of the
whole node, thawed 20 s later), a worker crash, a preemption. Node faults never hit the batch host
(the first node: torch's store; hpc_elastic's supervisor), unless ``--node-faults-on-batch-host``
(then the power cut and the freeze hit it, whichever node it is at the time). A power-cut
node is healed (new slurmd) 20 s later, as a repaired node would come back. Every requeued job
that pends is released at once (``StartTime=now+2``) for both launchers: Slurm's ~2 min
``BeginTime`` hold after a requeue is a property of the queue, not of the launcher.

Goodput = kept progress / wall time. Wall time runs from the submission to the job's end (or
to ``--cap`` x the duration, when a launcher never finishes). Kept progress = the global steps
that were not lost (all of them for a finished job, else the last checkpoint's) x the time a
healthy group takes per step, measured in the same run as the median interval between two
consecutive epochs' "epoch N done" lines (the harness timestamps every line of the workers'
output when it first sees it, polling every 0.5 s). Also reported per fault: the time from the
fault until the next group started training again (the first "starting at" line after it).

Targets (issue #15): hpc_elastic >= 0.85 and >= 2x torchrun c10d.

hpc_elastic runs with ``warm_workers: true`` (standby workers that have imported torch, see
docs/configuration.md); ``--cold-workers`` runs it without.

``--smoke`` (the test suite's check that the harness still works, not a measurement): both
launchers at the same time, each on exactly 2 of the 4 nodes with 1 worker per node, ~8 s of
training and one worker crash each -- the same submission, fault injection, recovery timing
and goodput report as the full run, in well under a minute instead of 3.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from slurm_cluster.fixture import SlurmCluster, start_cluster, stop_cluster  # noqa: E402

from hpc_elastic.jobdir import JobDir  # noqa: E402
from hpc_elastic.telemetry import read_jsonl  # noqa: E402

PYTHON = str(REPO / ".venv" / "bin" / "python") if (REPO / ".venv").exists() else sys.executable
EPOCH_DONE = re.compile(r"epoch (\d+) done")
STARTING = re.compile(r"starting at epoch \d+ step \d+ \(global step (\d+)\)")
FINISHED = re.compile(r"training finished at global step (\d+)")
# Two node faults at most: the cluster has 4 nodes, the job 2-3, and hpc_elastic never uses a
# failed node again in the run (a third lost node would leave it fewer than 2).
FAULTS = ("crash", "power_cut", "preempt", "freeze", "crash", "preempt")
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "BOOT_FAIL",
         "DEADLINE", "NODE_FAIL", "PREEMPTED"}
HEAL_AFTER_S = 20.0
SCHEDULER_REQUEUE_AFTER_S = 20.0
MAX_RESTARTS = 10

TORCHRUN_SBATCH = """#!/bin/bash
#SBATCH --job-name=goodput-torchrun
#SBATCH --nodes={nodes}
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --time=30
#SBATCH --output={out}
# Plain torchrun, as a user would write it: the c10d store on the first node.
export OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1 HPC_ELASTIC_CHECKPOINT_DIR={ckpt}
head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
srun --ntasks-per-node=1 --kill-on-bad-exit=0 {torchrun} --nnodes={nnodes} \\
    --nproc-per-node={nproc} --max-restarts={restarts} --rdzv-backend=c10d \\
    --rdzv-endpoint="$head:29533" --rdzv-id="$SLURM_JOB_ID-${{SLURM_RESTART_COUNT:-0}}" \\
    {script} {args}
"""


@dataclass
class Lines:
    """Every matching line of the workers' output, with the time the harness first saw it."""

    files: Callable[[], list[Path]]
    seen: dict[Path, int] = field(default_factory=dict)
    lines: list[tuple[float, Path, str]] = field(default_factory=list)

    def poll(self) -> None:
        now = time.time()
        for path in self.files():
            try:
                text = path.read_text(errors="replace").splitlines()
            except OSError:
                continue
            for line in text[self.seen.get(path, 0):]:
                if EPOCH_DONE.search(line) or STARTING.search(line) or FINISHED.search(line):
                    self.lines.append((now, path, line))
            self.seen[path] = len(text)

    def epoch_times(self) -> list[tuple[float, int]]:
        return [(t, int(m.group(1))) for t, _, line in self.lines
                if (m := EPOCH_DONE.search(line))]

    def starts(self) -> list[float]:
        return [t for t, _, line in self.lines if STARTING.search(line)]

    def first_start_after(self, since: float) -> tuple[float, int] | None:
        """The first "starting at" line seen after ``since``: when, and its global step."""
        found = [(t, int(m.group(1))) for t, _, line in self.lines
                 if t > since and (m := STARTING.search(line))]
        return min(found) if found else None

    def step_at(self, when: float, steps_per_epoch: int, step_s: float) -> int | None:
        """The global step training had reached at ``when``: the last epoch finished before it,
        plus the steps a healthy group makes in the time since (at most one epoch)."""
        done = [(t, e) for t, e in self.epoch_times() if t <= when]
        if not done:
            return None
        t, epoch = max(done)
        return (epoch + 1) * steps_per_epoch + min(steps_per_epoch - 1,
                                                   int((when - t) / step_s))


@dataclass
class Fault:
    kind: str
    at: float  # wall clock
    target: str
    note: str = ""
    recovered_s: float | None = None
    resumed_step: int | None = None
    #: Seconds from the fault to each phase of the recovery (hpc_elastic: from its events).
    phases: dict[str, float] = field(default_factory=dict)


class Launcher:
    """One launcher's job: submit, find its id and output, release its requeues."""

    name = ""

    def __init__(self, cluster: SlurmCluster, work: Path, script_args: list[str],
                 nodes: tuple[int, int] = (2, 3), nproc: int = 2) -> None:
        self.cluster = cluster
        self.work = work
        self.script_args = script_args
        self.nodes = nodes  # (min, max)
        self.nproc = nproc
        self.job_id = 0
        work.mkdir(parents=True, exist_ok=True)

    def submit(self) -> None:
        raise NotImplementedError

    def output_files(self) -> list[Path]:
        raise NotImplementedError


class HpcElastic(Launcher):
    name = "hpc_elastic"
    #: ``warm_workers`` (docs/configuration.md): standby workers that have imported torch.
    warm = True

    def submit(self) -> None:
        entry_args = "[" + ", ".join(self.script_args) + "]"
        settings = [f"job_root={self.work}", f"nodes={self.nodes[0]}:{self.nodes[1]}",
                    f"nproc_per_node={self.nproc}", f"max_restarts={MAX_RESTARTS}",
                    f"entrypoint.args={entry_args}", "slurm.time=30", "preemption.grace=20",
                    "rendezvous.heartbeat_interval=1", "rendezvous.heartbeat_timeout=5",
                    "rendezvous.last_call_timeout=1", "same_failure_limit=0",
                    f"warm_workers={'true' if self.warm else 'false'}"]
        cmd = [PYTHON, "-m", "hpc_elastic", "submit", str(REPO / "examples" / "demo.yaml"),
               "--slurm", *(arg for setting in settings for arg in ("--set", setting))]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                             env={**self.cluster.env, "OMP_NUM_THREADS": "1"},
                             stdin=subprocess.DEVNULL, cwd=REPO / "examples")
        if out.returncode != 0:
            raise RuntimeError(f"submit failed: {out.stdout}{out.stderr}")
        (jobdir,) = [p for p in self.work.iterdir() if p.is_dir()]
        self.jobdir = jobdir
        self.job_id = int(json.loads((jobdir / "submission.json").read_text())["job_id"])

    def output_files(self) -> list[Path]:
        return sorted(self.jobdir.glob("nodes/*/workers/attempt-*/restart-*/rank-*/stdout.log"))

    def phases(self, since: float) -> dict[str, float]:
        """Where a fault's time went, from the agents' events: until an agent noticed it (a
        worker failure, a node declared dead, the preemption signal, the batch host lost),
        until a rendezvous round completed after that, and until the workers were started."""
        events = sorted((float(e["time"]), str(e.get("kind"))) for node in
                        JobDir(self.jobdir).node_names()
                        for e in read_jsonl(JobDir(self.jobdir).events(node), missing_ok=True)
                        if isinstance(e.get("time"), (int, float)) and e["time"] > since)
        out: dict[str, float] = {}
        marks = [("detected", ("worker.failed", "rendezvous.node_dead", "preemption.signal",
                               "batch.lost")),
                 ("rendezvous", ("rendezvous.completed",)),
                 ("workers_started", ("workers.started",))]
        t0 = since
        for name, kinds in marks:
            hit = next((t for t, kind in events if t >= t0 and kind in kinds), None)
            if hit is None:
                break
            out[name] = round(hit - since, 1)
            t0 = hit
        return out


class TorchrunC10d(Launcher):
    name = "torchrun c10d"

    def submit(self) -> None:
        self.out = self.work / "slurm.out"
        ckpt = self.work / "checkpoints"
        ckpt.mkdir(exist_ok=True)
        script = self.work / "torchrun.sbatch"
        script.write_text(TORCHRUN_SBATCH.format(
            out=self.out, ckpt=ckpt, torchrun=REPO / ".venv" / "bin" / "torchrun",
            nodes=f"{self.nodes[0]}-{self.nodes[1]}", nnodes=f"{self.nodes[0]}:{self.nodes[1]}",
            nproc=self.nproc,
            restarts=MAX_RESTARTS, script=REPO / "examples" / "train.py",
            args=" ".join(self.script_args)))
        self.job_id = self.cluster.sbatch(script)

    def output_files(self) -> list[Path]:
        return [self.out]


def workers_on(cluster: SlurmCluster, node: str) -> list[int]:
    """PIDs of training workers on ``node`` (not agents: no torchrun, no ``hpc_elastic agent``).
    A warm worker (``warm_workers``) is a fork of the standby, itself a fork of the agent or a
    ``hpc_elastic.worker.standby`` process, so its command line is one of theirs; it is a
    worker once its stdout is a worker's log file (a standby writes to /dev/null, an agent to
    the node's Slurm log)."""
    found = []
    for pid in cluster.node_processes(node):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        text = b" ".join(argv).decode(errors="replace")
        if "train.py" in text and "torchrun" not in text and "hpc_elastic agent" not in text:
            found.append(pid)
        elif "hpc_elastic" in text:
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{pid}/fd/1").endswith("stdout.log"):
                    found.append(pid)
    return found


def job_nodes(cluster: SlurmCluster, job_id: int) -> tuple[list[str], str]:
    info = cluster.scontrol_job(job_id) or {}
    nodelist = info.get("NodeList", "")
    if not nodelist or nodelist == "(null)":
        return [], ""
    names = cluster.run(["scontrol", "show", "hostnames", nodelist], check=False).stdout.split()
    return names, info.get("BatchHost", "")


def inject(cluster: SlurmCluster, launcher: Launcher, kind: str,
           later: list[tuple[float, Callable[[], None]]], on_batch_host: bool = False) -> Fault:
    """Inject one fault now; follow-ups (thaw, heal, the scheduler's requeue) go to ``later``.
    ``on_batch_host``: node faults hit the job's first node instead of another one."""
    now = time.time()
    nodes, host = job_nodes(cluster, launcher.job_id)
    others = [n for n in nodes if n != host]
    if on_batch_host and kind in ("power_cut", "freeze") and host:
        others = [host]
    if kind == "crash":
        for node in others + [host]:
            pids = workers_on(cluster, node)
            if pids:
                os.kill(pids[-1], signal.SIGKILL)
                return Fault(kind, now, node, f"worker pid {pids[-1]}")
        return Fault(kind, now, "", "no worker found")
    if kind in ("power_cut", "freeze"):
        if not others:
            return Fault(kind, now, "", "no node besides the batch host")
        victim = others[-1]
        if kind == "power_cut":
            cluster.power_cut(victim)
            later.append((now + HEAL_AFTER_S, lambda: cluster.heal()))
        else:
            cluster.freeze(victim)
            later.append((now + HEAL_AFTER_S, lambda: cluster.thaw(victim)))
        return Fault(kind, now, victim)
    restarts = (cluster.scontrol_job(launcher.job_id) or {}).get("Restarts", "0")
    cluster.run(["scancel", "--signal=USR1", str(launcher.job_id)], check=False)

    def scheduler_requeue() -> None:
        info = cluster.scontrol_job(launcher.job_id) or {}
        if info.get("Restarts", "0") == restarts and info.get("JobState") not in (
                "PENDING", "COMPLETED"):
            cluster.run(["scontrol", "requeue", str(launcher.job_id)], check=False)

    scheduler_requeue.requeues = True  # type: ignore[attr-defined]
    later.append((now + SCHEDULER_REQUEUE_AFTER_S, scheduler_requeue))
    return Fault(kind, now, "job")


def run_one(cluster: SlurmCluster, launcher: Launcher, duration: float, interval: float,
            cap: float, faults: tuple[str, ...], on_batch_host: bool = False) -> dict[str, Any]:
    submitted = time.time()
    launcher.submit()
    lines = Lines(launcher.output_files)
    later: list[tuple[float, Callable[[], None]]] = []
    injected: list[Fault] = []
    released: set[str] = set()
    training_from: float | None = None
    state = None
    requeues = 0
    while time.time() - submitted < cap:
        time.sleep(0.5)
        lines.poll()
        info = cluster.scontrol_job(launcher.job_id) or {}
        state = info.get("JobState")
        restarts = info.get("Restarts", "0")
        if state == "PENDING" and restarts != "0" and restarts not in released:
            time.sleep(1.0)
            cluster.release(launcher.job_id)
            released.add(restarts)
            requeues = int(restarts)
        if training_from is None and lines.starts():
            training_from = min(lines.starts())
        due = [job for job in later if job[0] <= time.time()]
        requeued_now = False
        for job in due:
            later.remove(job)
            if getattr(job[1], "requeues", False):
                job[1]()  # at once: the next look at the job must see its effect
                requeued_now = True
            else:
                threading.Thread(target=job[1], daemon=True).start()  # heal: 10-20 s
        if (training_from is not None and len(injected) < len(faults)
                and time.time() >= training_from + interval * (len(injected) + 1)
                and training_from + interval * (len(injected) + 1) < training_from + duration
                and state == "RUNNING"):
            fault = inject(cluster, launcher, faults[len(injected)], later, on_batch_host)
            injected.append(fault)
            print(f"  {launcher.name}: {fault.kind} {fault.target} {fault.note} at "
                  f"+{fault.at - submitted:.0f} s", flush=True)
        if state in FINAL and not requeued_now and not any(
                getattr(a, "requeues", False) for _, a in later):
            break  # (a preempted job that ended by itself is requeued by the scheduler first)
    ended = time.time()
    lines.poll()
    if state not in FINAL:
        cluster.run(["scancel", str(launcher.job_id)], check=False)
        cluster.wait_job(launcher.job_id, timeout=120)
    for _when, action in later:
        action()
    for fault in injected:
        again = lines.first_start_after(fault.at)
        if again is not None:
            fault.recovered_s = round(again[0] - fault.at, 1)
            fault.resumed_step = again[1]
        if isinstance(launcher, HpcElastic):
            fault.phases = launcher.phases(fault.at)
    return {"launcher": launcher.name, "job_id": launcher.job_id, "state": state,
            "wall_s": round(ended - submitted, 1), "requeues": requeues,
            "lines": lines, "faults": injected}


def goodput(result: dict[str, Any], total_steps: int, steps_per_epoch: int,
            window: float = 0.0) -> dict[str, Any]:
    """Kept steps x healthy s/step / wall time. A job that ended without finishing training is
    charged at least ``window`` seconds of wall time (the other launcher's): its user still
    waits for the result, so it is compared over the same stretch of time."""
    lines: Lines = result["lines"]
    epochs = lines.epoch_times()
    per_file: dict[Path, list[tuple[float, int]]] = {}
    for t, path, line in lines.lines:
        if m := EPOCH_DONE.search(line):
            per_file.setdefault(path, []).append((t, int(m.group(1))))
    # Two epochs first seen in the same poll (a loaded machine, a short smoke run) say nothing
    # about the time per step: only gaps the harness saw open count.
    gaps = [(b[0] - a[0]) / steps_per_epoch for runs in per_file.values()
            for a, b in zip(runs, runs[1:], strict=False) if b[1] == a[1] + 1 and b[0] > a[0]]
    step_s = statistics.median(gaps) if gaps else float("nan")
    if result["state"] == "COMPLETED":
        kept = total_steps
    else:
        kept = (max(e for _, e in epochs) + 1) * steps_per_epoch if epochs else 0
    wall = result["wall_s"] if result["state"] == "COMPLETED" else max(window, result["wall_s"])

    def redone(fault: Fault) -> int | None:
        """Steps trained again after the fault: progress since the last checkpoint, lost."""
        reached = lines.step_at(fault.at, steps_per_epoch, step_s) if gaps else None
        if reached is None or fault.resumed_step is None:
            return None
        return max(0, reached - fault.resumed_step)
    value = kept * step_s / wall if gaps else 0.0
    return {"launcher": result["launcher"], "state": result["state"], "wall_s": round(wall, 1),
            "ended_after_s": result["wall_s"],
            "kept_steps": kept, "step_s": round(step_s, 4), "goodput": round(value, 3),
            "requeues": result["requeues"],
            "faults": [{"kind": f.kind, "target": f.target, "at_s": round(f.at, 1),
                        "training_again_s": f.recovered_s, **f.phases,
                        "steps_redone": redone(f), "note": f.note}
                       for f in result["faults"]]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true",
                        help="both launchers at once, 2 nodes x 1 worker each, ~8 s of "
                             "training, one worker crash")
    parser.add_argument("--duration", type=float, default=300.0,
                        help="seconds of fault-free training the job is sized for")
    parser.add_argument("--interval", type=float, default=45.0, help="seconds between faults")
    parser.add_argument("--step-sleep", type=float, default=0.25)
    parser.add_argument("--cap", type=float, default=2.5,
                        help="a launcher that has not finished after CAP x duration is stopped")
    parser.add_argument("--only", choices=["hpc_elastic", "torchrun"], default=None)
    parser.add_argument("--window", type=float, default=0.0,
                        help="charge a launcher that did not finish at least this wall time "
                             "(with --only: the other launcher's wall time)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--cold-workers", action="store_true",
                        help="hpc_elastic without warm_workers (every worker start imports "
                             "torch anew)")
    parser.add_argument("--node-faults-on-batch-host", action="store_true",
                        help="the power cut and the freeze hit the job's first node (torch's "
                             "c10d store, hpc_elastic's batch supervisor) instead of another")
    parser.add_argument("--keep", type=Path, default=None,
                        help="copy each launcher's job directory here before the test cluster "
                             "(and its shared volume) is removed, for a closer look")
    args = parser.parse_args()
    HpcElastic.warm = not args.cold_workers
    steps_per_epoch, nodes, nproc = 20, (2, 3), 2
    if args.smoke:
        args.duration, args.interval, args.step_sleep = 8.0, 3.0, 0.1
        # ~40 s here at load 2-3; a loaded CI machine may need several times that before a
        # launcher counts as never finishing (2.5 x 8 s + 60 s would be 80 s).
        args.cap = 30.0
        steps_per_epoch, nodes, nproc = 10, (2, 2), 1
    # ~0.05 s of work per step besides the sleep on this machine: size the job to --duration.
    epochs = max(2, round(args.duration / ((args.step_sleep + 0.05) * steps_per_epoch)))
    total = epochs * steps_per_epoch
    script_args = ["--epochs", str(epochs), "--steps-per-epoch", str(steps_per_epoch),
                   "--step-sleep", str(args.step_sleep)]
    faults = ("crash",) if args.smoke else tuple(
        FAULTS[i % len(FAULTS)] for i in range(int(args.duration // args.interval)))
    cluster = start_cluster()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    root = cluster.shared_dir() / "bench-goodput" / stamp
    results: list[dict[str, Any]] = []
    try:
        kinds = [HpcElastic, TorchrunC10d]
        if args.only:
            kinds = [k for k in kinds if k.name.startswith(args.only)]
        launchers = [kind(cluster, root / kind.name.replace(" ", "-"), script_args, nodes, nproc)
                     for kind in kinds]
        print(f"hpc_elastic: warm_workers {'off' if args.cold_workers else 'on'}", flush=True)
        for launcher in launchers:
            print(f"{launcher.name}: {epochs} epochs x {steps_per_epoch} steps on "
                  f"{nodes[0]}-{nodes[1]} nodes x {nproc} workers, faults {', '.join(faults)} "
                  f"every {args.interval:g} s", flush=True)
        cap = args.cap * args.duration + 60

        def one(launcher: Launcher) -> dict[str, Any]:
            raw = run_one(cluster, launcher, args.duration, args.interval, cap, faults,
                          args.node_faults_on_batch_host)
            if any(f.kind in ("power_cut", "freeze") for f in raw["faults"]):
                cluster.heal()
            return raw

        if args.smoke:
            # Both at once (2 + 2 of the 4 nodes): the harness is what is checked, not a number.
            raws: list[dict[str, Any] | BaseException] = [RuntimeError("no result")] * 2

            def keep(i: int, launcher: Launcher) -> None:
                try:
                    raws[i] = one(launcher)
                except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
                    raws[i] = exc

            threads = [threading.Thread(target=keep, args=(i, launcher))
                       for i, launcher in enumerate(launchers)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            for raw in raws[:len(launchers)]:
                if isinstance(raw, BaseException):
                    raise raw
            done = [r for r in raws[:len(launchers)] if isinstance(r, dict)]
            window = max([args.window] + [r["wall_s"] for r in done])
            results = [goodput(raw, total, steps_per_epoch, window) for raw in done]
        else:
            for launcher in launchers:
                raw = one(launcher)
                window = max([args.window] + [r["wall_s"] for r in results])
                results.append(goodput(raw, total, steps_per_epoch, window))
                print(json.dumps(results[-1]), flush=True)
    finally:
        if args.keep is not None:
            try:
                shutil.copytree(root, args.keep / stamp, symlinks=True, dirs_exist_ok=True)
                print(f"job directories kept in {args.keep / stamp}", flush=True)
            except (OSError, shutil.Error) as err:
                print(f"could not keep every file of the job directories: {err}", flush=True)
        if cluster.started_here:
            stop_cluster()
    print("\n| launcher | state | wall s | kept steps | s/step | goodput | requeues |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        print(f"| {r['launcher']} | {r['state']} | {r['wall_s']} | {r['kept_steps']} | "
              f"{r['step_s']} | {r['goodput']} | {r['requeues']} |")
    if len(results) == 2 and results[1]["goodput"]:
        print(f"ratio hpc_elastic / torchrun: {results[0]['goodput'] / results[1]['goodput']:.2f}")
    for r in results:
        print(f"{r['launcher']}: fault -> training again: " + ", ".join(
            f"{f['kind']} {f['training_again_s']} s" for f in r["faults"]))
    print("\nper fault, seconds after it (detected: an agent noticed; rendezvous: a round "
          "completed; workers: started; training: the first 'starting at' line) and steps "
          "trained again:")
    for r in results:
        for f in r["faults"]:
            print(f"  {r['launcher']:<14} {f['kind']:<9} detected {f.get('detected', '-')}, "
                  f"rendezvous {f.get('rendezvous', '-')}, workers {f.get('workers_started', '-')}"
                  f", training {f['training_again_s']}; redone {f['steps_redone']} steps")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    if args.smoke:
        # The harness worked end to end: each launcher got its fault into a running worker and
        # kept progress; hpc_elastic finished, trained again after the crash (its events show
        # each phase of the recovery), and has a goodput -- unless no two of its epochs were
        # seen in different polls, which a loaded machine does to a run of a few seconds (CI,
        # 2026-11-27: the harness's first fault came 19 s late); then there is no healthy time
        # per step to measure with, and the smoke says so instead of failing.
        hpc = results[0]
        unmeasured = math.isnan(hpc["step_s"])
        if unmeasured:
            print("smoke: hpc_elastic's time per step could not be measured (every epoch line "
                  "was first seen in one poll): goodput not checked")
        ok = (all(r["kept_steps"] > 0 and [f["kind"] for f in r["faults"]] == ["crash"]
                  and r["faults"][0]["target"] for r in results)
              and hpc["state"] == "COMPLETED" and (hpc["goodput"] > 0 or unmeasured)
              and hpc["faults"][0]["training_again_s"] is not None
              and "workers_started" in hpc["faults"][0])
        return 0 if ok else 1
    return 0

if __name__ == "__main__":
    sys.exit(main())
