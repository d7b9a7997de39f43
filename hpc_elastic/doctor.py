"""``doctor``: preflight checks before a cluster run, each failure saying what to change.

Checks on this node: the shared directory is writable and supports the file locks the rendezvous
needs; Slurm's commands exist, a controller answers, and accounting answers. Inside an
allocation with several nodes (``salloc -N3`` then ``hpc-elastic doctor --dir /shared/x``) it also
starts one report per node with ``srun`` and compares them: every node sees every other node's
file, clocks agree within the tolerance, and python/torch versions match -- and, on two of its
nodes, how late one node sees another's rename and in-place write and whether their locks
conflict (:mod:`hpc_elastic.fsprobe`; ``--fs-client`` twice does this through any two clients).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

SLURM_COMMANDS = ("sbatch", "srun", "squeue", "sacct", "scontrol", "scancel")


@dataclass
class Check:
    name: str
    ok: bool | None  # None: skipped, with the reason in detail
    detail: str
    fix: str = ""

    def render(self) -> str:
        mark = {True: "ok  ", False: "FAIL", None: "skip"}[self.ok]
        text = f"[{mark}] {self.name}: {self.detail}"
        return text + (f"\n       fix: {self.fix}" if self.ok is False and self.fix else "")


def check_writable(directory: Path) -> Check:
    name = "shared directory is writable"
    probe = directory / f".hpc_elastic-doctor-{uuid.uuid4().hex[:8]}"
    try:
        probe.write_text("probe\n")
        moved = probe.with_suffix(".moved")
        os.replace(probe, moved)
        ok = moved.read_text() == "probe\n"
        moved.unlink()
    except OSError as err:
        return Check(name, False, f"{directory}: {err.strerror}",
                     "use a directory on the shared filesystem that you own (job_root), e.g. "
                     "on /scratch, and check its permissions and quota")
    return Check(name, ok, f"{directory}: create, rename, read and delete work")


def check_locks(directory: Path) -> Check:
    from hpc_elastic.rendezvous.errors import LockingUnsupportedError
    from hpc_elastic.rendezvous.locking import probe_flock

    name = "file locks work (rendezvous)"
    try:
        probe_flock(directory)
    except LockingUnsupportedError as err:
        return Check(name, False, "flock is refused here", str(err))
    except OSError as err:
        return Check(name, False, f"{directory}: {err.strerror}", "see the writable check")
    return Check(name, True, f"flock on {directory} works")


def check_slurm_commands() -> Check:
    missing = [cmd for cmd in SLURM_COMMANDS if shutil.which(cmd) is None]
    if missing:
        return Check("Slurm commands", False, f"not on PATH: {', '.join(missing)}",
                     "run on a login node of the cluster (or 'module load slurm'); without "
                     "Slurm, use 'hpc-elastic submit --local'")
    return Check("Slurm commands", True, ", ".join(SLURM_COMMANDS) + " found")


def check_controller() -> Check:
    """A controller must answer: with Slurm's client installed but no configuration (or the
    controller down), every sbatch fails, and ``submit`` runs jobs locally instead."""
    from hpc_elastic.slurm import controller_answers

    name = "Slurm controller answers"
    if shutil.which("scontrol") is None:
        return Check(name, None, "scontrol not found")
    answers, said = controller_answers(timeout=15)
    if answers:
        return Check(name, True, said)
    return Check(name, False, f"scontrol ping: {said}",
                 "on a cluster, run this on a login node (check SLURM_CONF or /etc/slurm/"
                 "slurm.conf and that slurmctld runs); without a cluster, 'hpc-elastic submit' "
                 "runs jobs on this machine (as --local does) until a controller answers")


def check_accounting() -> Check:
    if shutil.which("sacct") is None:
        return Check("Slurm accounting", None, "sacct not found")
    try:
        result = subprocess.run(["sacct", "--noheader", "--parsable2", "-X", "--format=JobID",
                                 "--starttime=now-1hour"], capture_output=True, text=True,
                                timeout=15, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return Check("Slurm accounting", False, "sacct did not answer within 15 s",
                     "check that slurmctld/slurmdbd are reachable from here ('sinfo' works?)")
    if result.returncode != 0:
        said = " ".join(result.stderr.split())
        return Check("Slurm accounting", False, f"sacct fails: {said}",
                     "hpc-elastic still works; 'status' then reads squeue and the job directory "
                     "only. Ask your admins whether slurmdbd accounting is enabled.")
    return Check("Slurm accounting", True, "sacct answers")


def node_report(directory: Path) -> Path:
    """Write this node's facts for the cross-node checks (run by srun on every node)."""
    run = os.environ.get("SLURM_JOB_ID", "local") + "." + os.environ.get("SLURM_STEP_ID", "0")
    folder = directory / ".hpc_elastic-doctor" / run
    folder.mkdir(parents=True, exist_ok=True)
    import torch

    node = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
    report = {"node": node, "time": time.time(), "python": platform.python_version(),
              "torch": torch.__version__}
    path = folder / f"{node}.json"
    path.write_text(json.dumps(report))
    return path


def check_across_nodes(directory: Path, clock_tolerance_s: float) -> list[Check]:
    nodes = int(os.environ.get("SLURM_JOB_NUM_NODES", "1"))
    if "SLURM_JOB_ID" not in os.environ or nodes < 2:
        reason = "run inside a multi-node allocation (salloc -N2 ...) to check across nodes"
        return [Check("nodes see each other's files", None, reason)]
    result = subprocess.run(
        ["srun", "--ntasks-per-node=1", f"--nodes={nodes}", sys.executable, "-m", "hpc_elastic",
         "doctor", "--node-report", "--dir", str(directory)],
        capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        return [Check("nodes see each other's files", False,
                      f"srun failed: {' '.join(result.stderr.split())[-400:]}",
                      "check that this python and hpc_elastic are installed on every node")]
    pattern = f"{os.environ['SLURM_JOB_ID']}.*/*.json"  # every step of this allocation
    reports = [json.loads(p.read_text())
               for p in sorted((directory / ".hpc_elastic-doctor").glob(pattern))]
    seen = {r["node"] for r in reports}
    checks = [Check("nodes see each other's files", len(seen) >= nodes,
                    f"{len(seen)} of {nodes} nodes' reports visible here",
                    "the directory is not shared by all nodes (or caches hide new files); "
                    "use a filesystem every node mounts")]
    if reports:
        times = [r["time"] for r in reports]
        spread = max(times) - min(times)
        checks.append(Check("node clocks agree", spread <= clock_tolerance_s,
                            f"reports written within {spread:.2f} s of each other "
                            f"(tolerance {clock_tolerance_s:g} s, srun start jitter included)",
                            "ask your admins to check NTP/chrony on the nodes"))
        versions = {(r["python"], r["torch"]) for r in reports}
        checks.append(Check("python and torch match", len(versions) == 1,
                            ", ".join(f"python {p} torch {t}" for p, t in sorted(versions)),
                            "install the same environment on every node (one shared venv)"))
    return checks


def _probe_argv(directory: Path, role: str) -> list[str]:
    return [sys.executable, "-m", "hpc_elastic", "doctor", "--fs-probe-side", role, "--dir",
            str(directory)]


def check_fs_coherence(directory: Path, heartbeat_timeout: float,
                       clients: list[list[str]] | None = None) -> list[Check]:
    """Cross-client visibility of a rename and an in-place write, and cross-node locks
    (:mod:`hpc_elastic.fsprobe`), through two clients: the two command prefixes ``clients``,
    or two nodes of this Slurm allocation."""
    from hpc_elastic import fsprobe

    name = "cross-node filesystem coherence"
    probe = directory / ".hpc_elastic-doctor" / f"fsprobe-{uuid.uuid4().hex[:8]}"
    probe.mkdir(parents=True, exist_ok=True)
    try:
        if clients:
            sides = [subprocess.Popen([*prefix, *_probe_argv(probe, role)], text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL)
                     for prefix, role in zip(clients, "AB", strict=False)]
            try:
                outputs = [side.communicate(timeout=fsprobe.TOTAL_PATIENCE)[0] for side in sides]
            except subprocess.TimeoutExpired:
                for side in sides:
                    side.kill()
                return [Check(name, False, "the probes did not finish in time",
                              "check that both commands reach the directory")]
            output = "\n".join(outputs)
        elif "SLURM_JOB_ID" in os.environ and int(os.environ.get("SLURM_JOB_NUM_NODES",
                                                                  "1")) >= 2:
            run = subprocess.run(["srun", "--nodes=2", "--ntasks=2", "--ntasks-per-node=1",
                                  *_probe_argv(probe, "auto")], capture_output=True, text=True,
                                 timeout=fsprobe.TOTAL_PATIENCE, stdin=subprocess.DEVNULL)
            output = run.stdout + run.stderr
        else:
            return [Check(name, None, "run inside a multi-node allocation (salloc -N2 ...), or "
                          "name two clients with --fs-client")]
    finally:
        shutil.rmtree(probe, ignore_errors=True)
    result = fsprobe.parse_output(output)
    if result is None:
        return [Check(name, False, f"the probe gave no result: {' '.join(output.split())[-300:]}",
                      "check that hpc_elastic is installed where the probes run")]
    return [Check(title, v.ok, v.detail, v.fix)
            for title, v in fsprobe.judge(result, heartbeat_timeout)]


def run_fs_doctor(directory: Path, clients: list[list[str]],
                  heartbeat_timeout: float) -> list[Check]:
    """Only the shared-filesystem checks, through the given clients (``--fs-client``)."""
    checks = [check_writable(directory)]
    if not checks[0].ok:
        return checks
    checks.append(check_locks(directory))
    return checks + check_fs_coherence(directory, heartbeat_timeout, clients)


def run_doctor(directory: Path, clock_tolerance_s: float = 2.0,
               heartbeat_timeout: float = 10.0) -> list[Check]:
    checks = [check_writable(directory)]
    checks.append(check_locks(directory) if checks[0].ok else
                  Check("file locks work (rendezvous)", None, "directory not writable"))
    checks.append(check_slurm_commands())
    controller = check_controller()
    checks.append(controller)
    checks.append(check_accounting() if controller.ok else
                  Check("Slurm accounting", None, "no Slurm controller answers"))
    checks += check_across_nodes(directory, clock_tolerance_s)
    if checks[0].ok:
        checks += check_fs_coherence(directory, heartbeat_timeout)
    return checks
