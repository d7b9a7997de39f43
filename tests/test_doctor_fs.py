"""``hpc-elastic doctor`` measures the shared filesystem between two clients (issue 18 part 4):
cross-client visibility delay of a rename and of an in-place write, and whether a lock held
through one client stops the other. On local disk (two processes, one client) and across two
real GlusterFS clients of both profiles (``tests/sharedfs``): ``cached`` shows a delay,
``coherent`` does not.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROW = re.compile(r"\[(ok  |FAIL)\] cross-node visibility: a file (renamed over another|rewritten "
                 r"in place): seen (\d+) ms later \(median of (\d+), max (\d+) ms\)")


def _doctor(directory: Path, prefixes: list[list[str]], timeout: float = 10) -> tuple[int, str]:
    argv = [sys.executable, "-m", "hpc_elastic", "doctor", "--dir", str(directory),
            "--heartbeat-timeout", str(timeout)]
    for prefix in prefixes:
        argv += ["--fs-client", " ".join(prefix) or "env"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=400)
    return proc.returncode, proc.stdout + proc.stderr


def _rows(out: str) -> dict[str, tuple[str, int, int]]:
    """{"rename"/"inplace": (mark, median ms, max ms)}"""
    found = {}
    for mark, what, med, count, worst in ROW.findall(out):
        assert int(count) == 10
        found["rename" if what.startswith("renamed") else "inplace"] = (mark, int(med),
                                                                        int(worst))
    assert set(found) == {"rename", "inplace"}, out
    return found


def test_doctor_fs_check_on_local_disk_is_coherent_and_locks_conflict(tmp_path):
    rc, out = _doctor(tmp_path, [["env"], ["env"]])
    assert rc == 0, out
    rows = _rows(out)
    assert all(mark == "ok  " and median < 200 for mark, median, _ in rows.values()), out
    assert "[ok  ] locks conflict across nodes: flock held on one node refuses the other" in out
    assert "coherent" in out


def test_doctor_fs_client_must_be_given_twice(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "hpc_elastic", "doctor", "--dir", str(tmp_path),
                           "--fs-client", "env"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "exactly twice" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.sharedfs
@pytest.mark.slurm
@pytest.mark.parametrize("profile", ["cached", "coherent"])
def test_doctor_measures_two_glusterfs_clients(sharedfs_clients, profile):
    fs = sharedfs_clients(2, profile)
    rc, out = _doctor(fs.path, [fs.cmd(0, []), fs.cmd(1, [])], timeout=10)
    print(out)
    rows = _rows(out)
    assert "[ok  ] locks conflict across nodes" in out, out
    # (a "delay" includes the writer's write + fsync + rename: tens of ms on this VM)
    if profile == "coherent":
        assert rc == 0, out
        assert all(median < 200 for _, median, _ in rows.values()), out
        assert out.count(": coherent") == 2, out
    else:
        # Gluster's default caches (1 s): a change is seen through the other client late
        assert max(worst for _, _, worst in rows.values()) >= 400, out
        assert "the client caches" in out or "[FAIL] cross-node visibility" in out, out


@pytest.mark.slurm
@pytest.mark.fs_profile("cached")
def test_doctor_inside_a_two_node_allocation_measures_the_shared_volume(slurm_cluster, tmp_path):
    """The way users run it: ``doctor`` inside a 2-node Slurm allocation probes the job
    directory's filesystem from two nodes (their own GlusterFS clients) through srun, and
    checks across the nodes that they see each other's files, agree on the clock and run the
    same python and torch."""
    script = tmp_path / "doctor.sh"
    script.write_text(f"#!/bin/bash\n{sys.executable} -m hpc_elastic doctor --dir {tmp_path}\n")
    job = slurm_cluster.sbatch("--nodes=2", "--ntasks-per-node=1", "--time=10",
                               f"--output={tmp_path}/slurm-%j.out", script)
    state = slurm_cluster.wait_job(job, timeout=420)
    log = (tmp_path / f"slurm-{job}.out").read_text(errors="replace")
    print(log)
    assert state in ("COMPLETED", "FAILED"), f"job {job}: {state}\n{log}"
    _rows(log)  # both delays measured, ten rounds each
    assert "[ok  ] locks conflict across nodes" in log, log
    assert "[ok  ] nodes see each other's files: 2 of 2 nodes' reports visible here" in log, log
    assert "[ok  ] node clocks agree" in log, log
    assert "[ok  ] python and torch match" in log, log
