"""The job directory on a filesystem other users share (issue 14, classes 4 and 10).

Everything under a job directory is private (0700/0600) whatever the umask, or readable by its
group with ``share_with_group``; nothing is created through a link someone else planted; a job
root that cannot be written is one paragraph, exit 2. A second, unprivileged user shows what
another person on the machine can and cannot do.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from other_users import as_user, ensure_group, ensure_user, needs_root, run_as

from hpc_elastic.config import load_config
from hpc_elastic.jobdir import JobDir, JobDirError, make_dir, write_atomic
from hpc_elastic.submit import batch_jobdir
from hpc_elastic.telemetry.jsonl import JsonlWriter, read_jsonl

OTHER = "hpce14other"  # not in the job's group
COLLEAGUE = "hpce14colleague"  # in the job's group
GROUP = "hpce14share"

SCRIPT = """\
import os, pathlib
ckpt = pathlib.Path(os.environ["HPC_ELASTIC_CHECKPOINT_DIR"])
ckpt.mkdir(parents=True, exist_ok=True)
(ckpt / "step-1.pt").write_text("weights")
print("trained")
"""


@pytest.fixture
def shared_root() -> Iterator[Path]:
    """A directory other users can reach (``tmp_path`` is root's own, 0700): like /scratch."""
    needs_root()
    base = Path(tempfile.mkdtemp(prefix="hpce14-"))
    base.chmod(0o755)
    yield base
    shutil.rmtree(base, ignore_errors=True)


def job_file(where: Path, *extra: str) -> Path:
    (where / "train.py").write_text(SCRIPT)
    path = where / "job.yaml"
    path.write_text("\n".join(["name: perms", "entrypoint: train.py", "job_root: jobs",
                               "env: {API_TOKEN: s3cret}", *extra]) + "\n")
    return path


def submit_local(path: Path) -> Path:
    """``submit --local`` at umask 022, the common default; returns the job directory."""
    result = subprocess.run(
        [sys.executable, "-m", "hpc_elastic", "submit", str(path), "--local"],
        capture_output=True, text=True, timeout=240, preexec_fn=lambda: os.umask(0o022),
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    (jobdir,) = (path.parent / "jobs").iterdir()
    return jobdir


def modes_under(jobdir: Path) -> dict[str, int]:
    found = {}
    for folder, dirs, files in os.walk(jobdir):
        for name in [*dirs, *files]:
            path = Path(folder, name)
            found[str(path.relative_to(jobdir))] = stat.S_IMODE(os.lstat(path).st_mode)
    found["."] = stat.S_IMODE(os.lstat(jobdir).st_mode)
    return found


@pytest.mark.slow
def test_a_job_is_private_whatever_the_umask(shared_root: Path) -> None:
    ensure_user(OTHER)
    jobdir = submit_local(job_file(shared_root))
    modes = modes_under(jobdir)
    # The files the agents, torch and the workers make: logs, worker output, a checkpoint.
    for name in ("job.yaml", "nodes/local0/events.jsonl", "checkpoints/step-1.pt",
                 "nodes/local0/workers/attempt-0/restart-0/rank-0/stdout.log"):
        assert name in modes, sorted(modes)
    loose = {name: oct(mode) for name, mode in modes.items() if mode & 0o077}
    assert not loose, f"readable by others at umask 022: {loose}"
    assert as_user(OTHER, "ls", str(shared_root)).returncode == 0, "the root is reachable"
    for name in ("job.yaml", "nodes/local0/events.jsonl"):
        result = as_user(OTHER, "cat", str(jobdir / name))
        assert result.returncode != 0 and "s3cret" not in result.stdout


@pytest.mark.slow
def test_share_with_group_lets_the_group_read_and_nobody_else(shared_root: Path) -> None:
    gid = ensure_group(GROUP)
    ensure_user(COLLEAGUE, groups=(GROUP,))
    ensure_user(OTHER)
    # What docs/security.md tells users to do: a job root of the group, setgid.
    jobs = shared_root / "jobs"
    jobs.mkdir()
    os.chown(jobs, -1, gid)
    jobs.chmod(0o2750)
    jobdir = submit_local(job_file(shared_root, "share_with_group: true"))
    modes = modes_under(jobdir)
    loose = {name: oct(mode) for name, mode in modes.items() if mode & 0o027}
    assert not loose, f"writable by the group or open to others: {loose}"
    assert modes["job.yaml"] == 0o640 and modes["nodes"] & 0o050 == 0o050
    assert os.stat(jobdir / "nodes/local0/events.jsonl").st_gid == gid
    for name in ("job.yaml", "nodes/local0/events.jsonl",
                 "nodes/local0/workers/attempt-0/restart-0/rank-0/stdout.log"):
        assert as_user(COLLEAGUE, "cat", str(jobdir / name)).returncode == 0, name
        assert as_user(OTHER, "cat", str(jobdir / name)).returncode != 0, name
    assert as_user(COLLEAGUE, "touch", str(jobdir / "nodes" / "x")).returncode != 0


def test_files_are_private_even_at_umask_000(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        folder = make_dir(tmp_path / "job" / "nodes" / "n1")
        write_atomic(folder / "a.json", "{}\n")
        writer = JsonlWriter(folder / "events.jsonl")
        assert writer.write({"kind": "x"})
        writer.close()
    finally:
        os.umask(old)
    for path in (tmp_path / "job", folder, folder / "a.json", folder / "events.jsonl"):
        assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, path


def test_a_link_planted_at_a_log_name_is_not_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    node = make_dir(tmp_path / "job" / "nodes" / "n1")
    (node / "events.jsonl").symlink_to(victim)
    writer = JsonlWriter(node / "events.jsonl")
    assert writer.write({"kind": "x"}) is False
    (node / ".a.json.tmp").symlink_to(victim)
    write_atomic(node / "a.json", "{}\n")
    assert victim.read_text() == "precious\n"


def test_a_job_directory_another_user_made_first_is_refused(shared_root: Path) -> None:
    """``<name>-slurm<id>`` (a plain batch script's job directory) is predictable: another user
    could create it first, writable by them, and read or plant the job's files."""
    uid = ensure_user(OTHER)
    config = load_config(job_file(shared_root))
    jobs = Path(config.job_root)
    jobs.mkdir()
    planted = jobs / "perms-slurm4242"
    planted.mkdir()
    os.chown(planted, uid, -1)
    with pytest.raises(JobDirError, match="another user"):
        batch_jobdir(config, "4242")
    assert not (planted / "job.yaml").exists()
    (jobs / "perms-slurm4343").symlink_to(planted)
    with pytest.raises(JobDirError, match="symbolic link"):
        batch_jobdir(config, "4343")


def test_an_unwritable_job_root_is_one_paragraph_and_exit_2(shared_root: Path) -> None:
    import hpc_elastic.api
    import hpc_elastic.jobindex
    import hpc_elastic.local
    import hpc_elastic.members
    import hpc_elastic.sbatch
    import hpc_elastic.slurm  # noqa: F401 - the child cannot import from /root
    from hpc_elastic.cli import main

    ensure_user(OTHER)
    path = job_file(shared_root)
    (shared_root / "jobs").mkdir(mode=0o755)  # root's: the other user cannot write it
    code, output = run_as(OTHER, lambda: main(["submit", str(path), "--local"]))
    assert code == 2, output
    message = output.strip()
    assert "Traceback" not in message and "\n" not in message, message
    assert "job_root" in message and "Permission denied" in message
    assert str(shared_root / "jobs") in message


def test_a_job_yaml_that_is_not_utf8_is_one_paragraph(tmp_path: Path) -> None:
    from hpc_elastic.cli import main

    jobdir = tmp_path / "perms-20260101-000000-abcd"
    jobdir.mkdir()
    (jobdir / "job.yaml").write_bytes(b"name: caf\xe9\n")
    (jobdir / "submission.json").write_bytes(b'{"mode": "local", "job_id": "\xff"}')
    result = subprocess.run([sys.executable, "-m", "hpc_elastic", "agent", str(jobdir)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "UTF-8" in result.stderr and "Traceback" not in result.stderr
    for command in (["status", str(jobdir)], ["list", "--root", str(tmp_path)],
                    ["logs", "summary", str(jobdir)]):
        assert main(command) in (0, 1), command
    # The agent that could not read job.yaml still said why, where status looks.
    (node,) = JobDir(jobdir).node_names()
    last = list(read_jsonl(JobDir(jobdir).events(node)))[-1]
    assert last["kind"] == "agent.failed" and "UTF-8" in last["reason"]


def test_an_over_long_log_line_is_skipped_without_reading_it_into_memory(tmp_path: Path) -> None:
    """A 32 MiB line (a runaway print, or a hostile file) between two good events: both good
    ones are read, the long one is counted and reported, and memory stays far below its size."""
    import tracemalloc

    from hpc_elastic.analysis import Job
    from hpc_elastic.telemetry.jsonl import ReadStats, read_jsonl

    jobdir = JobDir(tmp_path / "long-20260101-000000-abcd")
    events = jobdir.events("n1")
    events.parent.mkdir(parents=True)
    (jobdir.path / "job.yaml").write_text("name: long\n")
    good = b'{"v":1,"time":1700000000.0,"node":"n1","kind":"agent.start","attempt":0}\n'
    with open(events, "wb") as out:
        out.write(good)
        out.write(b'{"v":1,"time":1700000001.0,"kind":"x","junk":"')
        chunk = b"A" * (1 << 20)
        for _ in range(32):
            out.write(chunk)
        out.write(b'"}\n')
        out.write(good.replace(b"1700000000.0", b"1700000002.0"))
    stats = ReadStats()
    tracemalloc.start()
    try:
        records = list(read_jsonl(events, stats))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [r["time"] for r in records] == [1700000000.0, 1700000002.0]
    assert stats.long_lines == 1 and stats.bad_lines == [2]
    assert peak < 4 << 20, f"peak {peak >> 20} MiB for a 32 MiB line"
    job = Job(jobdir)
    list(job.events("n1"))
    assert any("longer than 1 MiB" in note for note in job.notes), job.notes


@pytest.mark.parametrize(("share", "modes"), [(False, (0o700, 0o600)), (True, (0o2750, 0o640))])
def test_files_the_batch_step_makes_follow_the_job_directory(
        tmp_path: Path, share: bool, modes: tuple[int, int]) -> None:
    """The exclusion records, the supervisor's log and the requeue claim, made by processes
    whose umask Slurm chose, at umask 000."""
    from hpc_elastic.agent.preemption import Preemption
    from hpc_elastic.batch import BatchLog
    from hpc_elastic.excluded import exclude_node

    jobdir = JobDir(make_dir(tmp_path / "job", share_with_group=share))
    old = os.umask(0)
    try:
        assert exclude_node(jobdir, "n1", "down", "42", 0)
        BatchLog(jobdir, "42", 0).record("batch.test", "hello")
        claim = Preemption(signal_name="USR1", grace=1, claim_path=jobdir.path / "requeue" / "a",
                           node="n1", requeue=lambda: None, record=lambda *a, **k: None,
                           worker_pids=list)
        assert claim._claim()
    finally:
        os.umask(old)
    made = [jobdir.excluded, jobdir.excluded_node("n1"), jobdir.supervisor,
            *jobdir.supervisor.iterdir(), jobdir.path / "requeue", jobdir.path / "requeue" / "a"]
    for path in made:
        want = modes[0] if path.is_dir() else modes[1]
        assert stat.S_IMODE(path.stat().st_mode) == want, (path, oct(path.stat().st_mode))
