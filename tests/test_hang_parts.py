"""The parts of hang detection on their own: the progress record, the worker's reporter (real
worker processes through ``python -m hpc_elastic.worker``), the stack dumps, the config key."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from hpc_elastic.agent import stacks
from hpc_elastic.agent.error_files import unreadable_reason
from hpc_elastic.agent.storm import StormGuard
from hpc_elastic.analysis.hangs import analyse
from hpc_elastic.config import ConfigError, load_config
from hpc_elastic.worker import record
from tests.polling import wait_for


def test_record_round_trips_and_rejects_garbage(tmp_path: Path) -> None:
    p = record.Progress(n=7, step=42, time=1.5, pid=99, signal=40, step_time=0.0101, ended=True)
    data = record.encode(p)
    assert len(data) == record.RECORD_SIZE
    assert record.decode(data) == record.Progress(7, 42, 1.5, 99, 40, 0.0101, True)
    for bad in (b"", b"{", b'{"n": "7", "pid": 1, "sig": 0}', b"\xff\xfe", b"[1, 2]"):
        assert record.decode(bad) is None
    path = tmp_path / "progress"
    path.write_bytes(data)
    assert record.read(path) == record.decode(data)
    link = tmp_path / "link"
    link.symlink_to(path)
    assert record.read(link) is None, "a link in the shared directory is not followed"
    assert record.read(tmp_path / "missing") is None


def run_worker(tmp_path: Path, body: str, **env: str) -> subprocess.CompletedProcess:
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(body))
    return subprocess.run(
        [sys.executable, "-m", "hpc_elastic.worker", str(script), "a1", "--b"],
        env={**os.environ, "HPC_ELASTIC_WORKER_DIR": str(tmp_path), **env},
        capture_output=True, text=True, timeout=120, cwd=tmp_path)


def test_worker_counts_optimizer_steps_without_changing_the_script(tmp_path: Path) -> None:
    done = run_worker(tmp_path, """
        import sys, time, torch
        assert __name__ == "__main__" and sys.argv[1:] == ["a1", "--b"], sys.argv
        assert sys.path[0] == __file__.rsplit("/", 1)[0]
        time.sleep(0.5)  # the reporter hooks torch.optim within 0.1 s of its import
        model = torch.nn.Linear(2, 1)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(5):
            model(torch.ones(1, 2)).sum().backward()
            opt.step()
        time.sleep(1.5)
        print(open("progress").read())
        """, HPC_ELASTIC_PROGRESS_INTERVAL="0.2")
    assert done.returncode == 0, done.stderr
    during = record.decode(done.stdout.encode()[:record.RECORD_SIZE])
    assert during is not None and during.n == 5 and not during.ended, done.stdout
    after = record.read(tmp_path / "progress")
    assert after is not None and after.n == 5 and after.ended and after.pid != os.getpid()


def test_explicit_reports_replace_the_optimizer_count(tmp_path: Path) -> None:
    done = run_worker(tmp_path, """
        import time, torch, hpc_elastic
        time.sleep(0.5)
        model = torch.nn.Linear(2, 1)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for step in range(3):
            opt.step()
            hpc_elastic.report_progress(100 + step)
        """)
    assert done.returncode == 0, done.stderr
    after = record.read(tmp_path / "progress")
    # the first optimizer step counts (before any explicit call), then only explicit ones
    assert after is not None and after.n == 4 and after.step == 102, after


def test_worker_writes_a_whole_error_file_for_an_uncaught_exception(tmp_path: Path) -> None:
    """What torch's ``@record`` would write, for a script without it; torch's agent parses it."""
    error_file = tmp_path / "error.json"
    done = run_worker(tmp_path, """
        def inner():
            raise ValueError("boom")
        inner()
        """, TORCHELASTIC_ERROR_FILE=str(error_file))
    assert done.returncode == 1 and "ValueError: boom" in done.stderr
    assert unreadable_reason(str(error_file)) is None
    message = json.loads(error_file.read_text())["message"]
    assert message["message"] == "ValueError: boom"
    assert "in inner" in message["extraInfo"]["py_callstack"]
    assert sorted(p.name for p in tmp_path.iterdir() if "error" in p.name) == ["error.json"]


def test_worker_leaves_no_empty_error_file_on_a_full_disk(tmp_path: Path) -> None:
    """torch's own writer leaves an empty file on a full disk, which its parser in the agent
    chokes on; the worker's is whole or absent (the cause of a traceback in issue 16)."""
    if os.geteuid() != 0:
        pytest.skip("mounts a small tmpfs: needs root")
    mount = tmp_path / "fs"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], check=True)
    try:
        with contextlib.suppress(OSError), open(mount / "fill", "wb") as out:
            while True:
                out.write(b"x" * 4096)
                out.flush()
        error_file = mount / "error.json"
        done = run_worker(tmp_path, "raise ValueError('x' * 100000)\n",
                          TORCHELASTIC_ERROR_FILE=str(error_file))
        assert done.returncode == 1 and "ValueError" in done.stderr
        assert sorted(p.name for p in mount.iterdir()) == ["fill"], "no error file, no temp file"
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_report_progress_is_a_no_op_outside_hpc_elastic(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "HPC_ELASTIC_WORKER_DIR"}
    code = "import hpc_elastic; hpc_elastic.report_progress(1)"
    done = subprocess.run([sys.executable, "-c", code],
                          env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert done.returncode == 0 and not list(tmp_path.iterdir()), done.stderr


@pytest.mark.parametrize("tool", ["faulthandler", "py-spy"])
def test_stack_dump_of_a_deadlocked_worker(tmp_path: Path, tool: str,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    if tool == "py-spy" and stacks.py_spy_path() is None:
        pytest.skip("py-spy is not installed (optional extra 'hangs')")
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent("""
        import threading
        def wait_for_myself():
            lock = threading.Lock()
            lock.acquire()
            lock.acquire()
        wait_for_myself()
        """))
    proc = subprocess.Popen([sys.executable, "-m", "hpc_elastic.worker", str(script)],
                            env={**os.environ, "HPC_ELASTIC_WORKER_DIR": str(tmp_path)})
    try:
        progress = wait_for("the progress record", lambda: record.read(tmp_path / "progress"),
                            60)
        time.sleep(0.3)
        monkeypatch.setenv(stacks.ENV_STACK_TOOL, tool)
        text, how = stacks.dump_stack(proc.pid, tmp_path, progress.signal,
                                      stacks.proc_sample(proc.pid).state)
        assert how == tool and text is not None, how
        assert "wait_for_myself" in text, text
        out = tmp_path / "rank-0.txt"
        stacks.write_dump(out, {"rank": 0, "state": "S"}, text, how)
        assert out.read_text().startswith(stacks.HEADER)
        with pytest.raises(FileExistsError):  # never overwritten
            stacks.write_dump(out, {"rank": 0}, text, how)
    finally:
        proc.kill()
        proc.wait()


def test_faulthandler_is_not_asked_of_a_stopped_process(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        os.kill(proc.pid, signal.SIGSTOP)
        wait_for("state T", lambda: stacks.proc_sample(proc.pid).state == "T", 10)
        os.environ[stacks.ENV_STACK_TOOL] = "faulthandler"
        try:
            text, how = stacks.dump_stack(proc.pid, tmp_path, 40, "T")
        finally:
            del os.environ[stacks.ENV_STACK_TOOL]
        assert text is None and "stopped" in how
        assert proc.poll() is None, "no real-time signal was sent to a process without a handler"
    finally:
        proc.kill()
        proc.wait()


def test_hang_timeout_key(tmp_path: Path) -> None:
    (tmp_path / "train.py").write_text("")
    job = tmp_path / "job.yaml"
    job.write_text("name: a\nentrypoint: train.py\n")
    assert load_config(job).hang_timeout == 300.0, "on by default (docs/configuration.md)"
    assert load_config(job, ["hang_timeout=45"]).hang_timeout == 45.0
    for off in ("0", "null", "off", "false"):
        assert load_config(job, [f"hang_timeout={off}"]).hang_timeout is None, off
    job.write_text("name: a\nentrypoint: train.py\nhang_timeout: off\n")
    assert load_config(job).hang_timeout is None
    for bad in ("1", "-5", "soon"):
        with pytest.raises(ConfigError) as info:
            load_config(job, [f"hang_timeout={bad}"])
        assert "'hang_timeout'" in str(info.value) and "Fix:" in str(info.value)


def test_storm_and_straggler_keys(tmp_path: Path) -> None:
    (tmp_path / "train.py").write_text("")
    job = tmp_path / "job.yaml"
    job.write_text("name: a\nentrypoint: train.py\n")
    config = load_config(job)
    assert (config.same_failure_limit, config.stragglers, config.hang_startup_timeout) == (
        3, "off", None)
    assert load_config(job, ["same_failure_limit=0", "stragglers=exclude"]).stragglers == "exclude"
    for bad in ("same_failure_limit=-1", "stragglers=kick", "hang_startup_timeout=1"):
        with pytest.raises(ConfigError) as info:
            load_config(job, [bad])
        assert f"'{bad.split('=')[0]}'" in str(info.value) and "Fix:" in str(info.value)


def test_storm_guard_counts_identical_failures_in_a_row() -> None:
    guard = StormGuard(3)
    assert [guard.observe(s) for s in ("a", "a", "b", "b", "b")] == [
        False, False, False, False, True]
    assert not any(StormGuard(0).observe("a") for _ in range(5)), "0 switches it off"


def test_the_only_rank_of_a_one_rank_job_is_the_culprit() -> None:
    """One GPU, one rank: no peer to compare with, so a hung rank is named all the same."""
    dump = {"rank": 0, "node": "n1", "state": "R", "cpu_percent": 99.0, "collective": None,
            "where": "train.py:9 (main)",
            "frames": [("synchronize", "torch/cuda/__init__.py", 1), ("main", "train.py", 9)]}
    result = analyse("20260101-000000", [dump])
    assert result["evidence"] == "the only rank" and result["culprits"][0]["rank"] == 0
    assert result["message"] == "rank 0 (node n1) was busy (99% CPU) in train.py:9 (main)"


def test_torchrun_hang_timeout_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    from hpc_elastic.agent.torchrun_hangs import ENV_HANG_TIMEOUT, hang_timeout_from_env

    monkeypatch.delenv(ENV_HANG_TIMEOUT, raising=False)
    assert hang_timeout_from_env() == 300.0
    for off in ("0", "off", "OFF"):
        monkeypatch.setenv(ENV_HANG_TIMEOUT, off)
        assert hang_timeout_from_env() is None
    monkeypatch.setenv(ENV_HANG_TIMEOUT, "45")
    assert hang_timeout_from_env() == 45.0
    for bad in ("soon", "1", "nan"):
        monkeypatch.setenv(ENV_HANG_TIMEOUT, bad)
        with pytest.raises(ValueError, match="Fix:"):
            hang_timeout_from_env()
