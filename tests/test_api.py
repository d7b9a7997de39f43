"""The public Python API (``import hpc_elastic``), through its public names only, on real local
jobs: submit, wait, summary, failures, events, cancel, and the one job lookup (``Job.find``)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from polling import wait_for

import hpc_elastic

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "examples" / "demo.yaml"
FAIL_ONCE = ("entrypoint.args=[--epochs, 2, --steps-per-epoch, 8, --fail-at-step, 10, "
             "--fail-rank, 1]")
SLOW = "entrypoint.args=[--epochs, 50, --steps-per-epoch, 20, --step-sleep, 0.05]"
FAST_RDZV = ["rendezvous.heartbeat_interval=0.5", "rendezvous.heartbeat_timeout=2",
             "rendezvous.last_call_timeout=1"]


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def test_import_is_light_and_the_cli_help_imports_no_torch() -> None:
    code = ("import sys, hpc_elastic, hpc_elastic.cli; hpc_elastic.Job; hpc_elastic.submit; "
            "hpc_elastic.cli.build_parser(); "
            "print(sorted(m for m in ('torch', 'submitit', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    assert out.strip() == "[]"


def wait_until(what: str, check, timeout: float = 90):  # type: ignore[no-untyped-def]
    return wait_for(what, check, timeout, every=0.3)


@pytest.mark.slow
def test_submit_wait_and_read_what_happened(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                            ) -> None:
    cfg = hpc_elastic.load_config(DEMO, [f"job_root={tmp_path / 'jobs'}", FAIL_ONCE])
    job = hpc_elastic.submit(cfg, local=True)
    assert job.job_id.startswith("local-") and job.jobdir.parent == tmp_path / "jobs"
    outcome = job.wait(timeout=180, progress=False)
    assert outcome.ok and outcome.state == "succeeded" and outcome.exit_code == 0, outcome
    assert outcome.agent_codes == {"local0": 0, "local1": 0}
    assert job.state().queue == "ENDED" and job.state().status == "succeeded"

    summary = job.summary()
    assert summary.status == "succeeded" and summary.restarts >= 1
    assert summary.nodes == ["local0", "local1"]
    (root,) = summary.root_causes
    assert root.kind == "worker_failed" and root.rank == 1
    assert "injected failure at global step 10 on rank 1" in (root.message or "")
    assert summary.data["failures_count"] == len(summary.failures)

    failures = job.failures(lines=30)
    assert failures[0].root, "the root cause leads"
    assert not any(f.root for f in failures[1:])
    assert any("injected failure" in line for line in failures[0].stderr_tail)
    kinds = [e["kind"] for e in job.events()]
    assert "workers.restart" in kinds and kinds[-1] in ("agent.succeeded", "shutdown")
    assert all(e["kind"].startswith("worker.") for e in job.events(kind="worker."))

    # One lookup everywhere: by id from any directory (the per-user index), by directory
    # name under a root, by path.
    monkeypatch.chdir(tmp_path)
    assert hpc_elastic.Job.find(job.job_id).jobdir == job.jobdir
    assert hpc_elastic.Job.find(job.jobdir.name, roots=[tmp_path / "jobs"]).jobdir == job.jobdir
    assert hpc_elastic.Job.find(str(job.jobdir)).job_id == job.job_id
    assert [j.job_id for j in hpc_elastic.recent_jobs()][0] == job.job_id
    with pytest.raises(hpc_elastic.JobNotFound, match="'hpc-elastic list'"):
        hpc_elastic.Job.find("no-such-job")


@pytest.mark.slow
def test_cancel_is_reported_as_cancelled(tmp_path: Path) -> None:
    cfg = hpc_elastic.load_config(DEMO, [f"job_root={tmp_path}", SLOW])
    job = hpc_elastic.submit(cfg, local=True)
    try:
        wait_until("training", lambda: job.state().status == "running"
                   and len(job.state().nodes) == 2)
        with pytest.raises(TimeoutError):
            job.wait(timeout=1, progress=False)
        time.sleep(3)  # agents log nothing while training goes well
        summary = job.summary()  # of a running job: its clock runs to now
        assert summary.status == "running" and summary.data["clock_to_now"]
        assert summary.wall_s >= time.time() - summary.data["submitted_at"] - 1
        assert summary.wall_s > summary.data["last_event"] - summary.data["submitted_at"] + 2
        said = job.cancel()
        assert "cancelled" in said
        outcome = job.wait(timeout=60, progress=False)
    finally:
        if not job.done():
            job.cancel()
    assert outcome.state == "cancelled" and outcome.exit_code == 3, outcome
    assert job.state().queue == "ENDED"
    assert job.summary().status == "cancelled"


@pytest.mark.slow
def test_a_sigkilled_agent_of_a_fixed_size_job_is_reported_with_its_real_code(
    tmp_path: Path,
) -> None:
    cfg = hpc_elastic.load_config(DEMO, [f"job_root={tmp_path}", SLOW, "nodes=2",
                                         "max_restarts=0", "rendezvous.join_timeout=5",
                                         *FAST_RDZV])
    job = hpc_elastic.submit(cfg, local=True)
    workers: list[int] = []
    try:
        wait_until("training", lambda: job.state().status == "running"
                   and len(job.state().nodes) == 2)
        agents = wait_until("agent pids", lambda: _agent_pids(job.jobdir))
        # Both of local1's workers must be on record before the node "dies": a worker whose
        # start was not yet logged would be left running, orphaned, after the test.
        def local1_workers() -> list[int]:
            pids = [int(e["worker_id"])
                    for e in job.events(node="local1", kind="worker.started")]
            return pids if len(pids) >= 2 else []

        workers = wait_until("local1's two workers", local1_workers)
        for pid in [agents[1], *workers]:  # the node dies: its agent and its workers
            os.kill(pid, signal.SIGKILL)
        outcome = job.wait(timeout=120, progress=False)
    finally:
        if not job.done():
            job.cancel()
        for pid in workers:  # never leave a worker of this test behind
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert outcome.state == "failed" and outcome.exit_code == 1
    assert outcome.agent_codes["local1"] == -9
    assert "local1 killed by SIGKILL (-9)" in outcome.detail, outcome.detail
    survivor = outcome.agent_codes["local0"]
    assert f"local0 exit {survivor}" in outcome.detail, outcome.detail


def _agent_pids(jobdir: Path) -> list[int]:
    import json

    try:
        return json.loads((jobdir / "local-agents.json").read_text())["pids"]
    except (OSError, ValueError, KeyError):
        return []
