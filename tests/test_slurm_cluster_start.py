"""The Slurm test cluster's fixture never turns a failed start into a skip (issue 13)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def test_a_cluster_that_does_not_start_fails_the_slurm_tests(tmp_path: Path) -> None:
    (tmp_path / "test_needs_slurm.py").write_text(
        "import pytest\n\n@pytest.mark.slurm\ndef test_x():\n    pass\n"
    )
    env = {
        **os.environ,
        "PYTHONPATH": str(TESTS),
        # a private state directory and a setting start.sh refuses before touching anything
        "HPC_ELASTIC_SLURM_DIR": str(tmp_path / "state"),
        "HPC_ELASTIC_SLURM_NODES": "0",
    }
    env.pop("CI", None)  # not only in CI
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "slurm_cluster.fixture", "-p", "no:cacheprovider",
         "-W", "ignore::pytest.PytestUnknownMarkWarning", "-q", str(tmp_path)],
        capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path,
    )
    out = result.stdout + result.stderr
    assert result.returncode == 1, out
    assert "1 error" in out and "skipped" not in out, out
    assert 'pytest -m "not slurm"' in out, "the error names the explicit way out"
    assert "HPC_ELASTIC_SLURM_NODES=0: use 1..80 nodes" in out, "the start log's tail is shown"
    assert not (tmp_path / "state").exists(), "start.sh touched nothing"
