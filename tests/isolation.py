"""No stray Slurm traffic, no writes to the user's home, for every test (an autouse fixture).

With Slurm's client installed but no slurm.conf, a Slurm command looks for its controller in DNS
(configless mode), and ``submit`` asks ``scontrol ping`` before choosing Slurm. Every test process
therefore sees a ``SLURM_CONF`` naming a controller on a closed loopback port (the Slurm cluster
fixture passes its own ``SLURM_CONF``), and its own ``XDG_STATE_HOME``, so the per-user job index
(hpc_elastic/jobindex.py) of whoever runs the tests is never touched.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

UNREACHABLE_SLURM_CONF = ("ClusterName=none\nSlurmctldHost=localhost(127.0.0.1)\n"
                          "SlurmctldPort=1\nMessageTimeout=2\n")


def write_unreachable_slurm_conf(directory: Path) -> Path:
    """A slurm.conf whose controller is a closed port on loopback: commands fail at once."""
    conf = directory / "slurm.conf"
    conf.write_text(UNREACHABLE_SLURM_CONF)
    return conf


@pytest.fixture(scope="session", autouse=True)
def isolated_slurm_and_state(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    base = tmp_path_factory.mktemp("isolation")
    saved = {k: os.environ.get(k) for k in ("SLURM_CONF", "XDG_STATE_HOME")}
    os.environ["SLURM_CONF"] = str(write_unreachable_slurm_conf(base))
    os.environ["XDG_STATE_HOME"] = str(base / "state")
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
