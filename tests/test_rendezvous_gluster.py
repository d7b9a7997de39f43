"""Issue 18 part 1 on a real multi-client filesystem: the rendezvous state across 3
independent GlusterFS clients of one volume (``tests/sharedfs``), on both profiles --
``cached`` (Gluster's defaults: renames seen late, ESTALE) and ``coherent``.

Every writer runs through its node's own FUSE client (its mount namespace) at the same path.
Marked ``sharedfs`` (= ``slurm``): not in the fast lane.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from rendezvous_helpers.harness import base_env  # noqa: E402

pytestmark = [pytest.mark.sharedfs, pytest.mark.slurm, pytest.mark.slow]
HERE = Path(__file__).parent
WRITER = HERE / "rendezvous_helpers" / "fs_writer.py"
PROFILES = ["cached", "coherent"]
TUNED = {"heartbeat_interval": 0.25, "heartbeat_timeout": 3, "last_call_timeout": 3}


def _env(tag: str) -> dict[str, str]:
    env = base_env(tag)
    env["PYTHONPATH"] = str(HERE.parent)
    return env


@pytest.mark.parametrize("profile", PROFILES)
def test_no_update_is_lost_with_nine_writers_on_three_clients(sharedfs_clients, profile):
    fs = sharedfs_clients(3, profile)
    env = _env(f"gw-{profile}")
    procs = []
    for who in range(9):
        mode = "txn" if who % 2 == 0 else "cas"
        procs.append(fs.popen(who % 3, [sys.executable, WRITER, fs.path, str(who), "15", mode],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True))
    outputs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=300)
            outputs.append(out)
            assert p.returncode == 0, out
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert all("sync=True" in o for o in outputs), "writes on GlusterFS are fsync'ed"
    final = fs.run(0, [sys.executable, "-c", (
        "import json,sys; from pathlib import Path; "
        "from hpc_elastic.rendezvous.layout import RunLayout; "
        "from hpc_elastic.rendezvous.state import StateFile; "
        f"s=StateFile(RunLayout(Path({str(fs.path)!r}),'run'),5).read(); "
        "print(json.dumps([s.version, s.waiting, s.prev]))")], env=env)
    assert final.returncode == 0, final.stderr
    version, waiting, prev = json.loads(final.stdout)
    txn = [w for w in range(9) if w % 2 == 0]
    cas = [w for w in range(9) if w % 2 == 1]
    assert sorted(waiting) == sorted(f"w{w}-{j}" for w in txn for j in range(15))
    assert sorted(prev) == sorted(f"c{w}-{j}" for w in cas for j in range(15))
    assert version == 9 * 15, "one version per committed change"
    print(f"{profile}: transient-read retries per writer: "
          f"{[o.strip().split()[0] for o in outputs]}")
