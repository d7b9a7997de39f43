"""Every ``benchmarks/bench_*.py`` runs with ``--smoke`` (tiny sizes, well under a minute), so a
benchmark that rots (an import that moved, an API that changed) fails the test suite instead of
the next person who wants a number.

Benchmarks are found by glob: a new one is covered without touching this file, and must accept
``--smoke``. One that needs the private Slurm test cluster says so with a line ``# smoke: slurm``;
it then runs under the ``slurm`` marker with the cluster's environment.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BENCHMARKS = sorted((REPO / "benchmarks").glob("bench_*.py"))
SMOKE_LIMIT_S = 60


def needs_slurm(path: Path) -> bool:
    return any(line.strip() == "# smoke: slurm" for line in path.read_text().splitlines())


@pytest.mark.slow
@pytest.mark.parametrize("bench", [
    pytest.param(path, id=path.stem, marks=[pytest.mark.slurm] if needs_slurm(path) else [])
    for path in BENCHMARKS])
def test_benchmark_smoke(bench: Path, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    if "--smoke" not in bench.read_text():
        pytest.fail(f"{bench.name} has no --smoke mode; every benchmark needs one (tiny sizes, "
                    f"< {SMOKE_LIMIT_S} s) so that the test suite runs it")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if needs_slurm(bench):
        env.update(request.getfixturevalue("slurm_cluster").env)
    started = time.monotonic()
    result = subprocess.run([sys.executable, str(bench), "--smoke"], capture_output=True,
                            text=True, cwd=tmp_path, env=env, stdin=subprocess.DEVNULL,
                            timeout=10 * SMOKE_LIMIT_S)  # slack for a loaded machine: the
    # telemetry smoke (5 agents importing torch at once) took 117 s at load average 22 on the
    # 2-core dev VM, 15 s of it CPU
    took = time.monotonic() - started
    assert result.returncode == 0, (result.stdout[-3000:] + result.stderr[-3000:])
    print(f"{bench.name} --smoke: {took:.1f} s")


def test_benchmarks_are_found() -> None:
    assert {p.name for p in BENCHMARKS} >= {"bench_analysis.py", "bench_rendezvous.py",
                                            "bench_telemetry.py"}
