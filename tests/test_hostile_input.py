"""Input nobody expected (issue 14, classes 2, 3, 5 and 10): every value is checked at ``submit``
and refused with one paragraph naming the file, the key and the fix, exit 2 -- never a traceback,
never a batch script with a line nobody wrote, never a job directory outside the job root.

The command line runs in-process (``cli.main``) so the checks are fast; ``test_cli.py`` covers the
real subprocess.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from hpc_elastic import cli
from hpc_elastic.config import NAME_MAX, ConfigError, load_config
from hpc_elastic.jobdir import JobDir
from hpc_elastic.rendezvous.settings import check_name as rendezvous_check_name


def job_file(tmp_path: Path, body: str = "", name: str = "demo") -> Path:
    (tmp_path / "train.py").write_text("print('hi')\n")
    path = tmp_path / "job.yaml"
    path.write_text(f"name: {name}\nentrypoint: train.py\njob_root: jobs\n"
                    + textwrap.dedent(body))
    return path


def refused(capsys: pytest.CaptureFixture[str], path: Path, *sets: str) -> str:
    """Run ``submit --dry-run`` and return its error paragraph; it must be refused with exit 2
    before anything is written."""
    args = ["submit", str(path), "--dry-run"]
    for item in sets:
        args += ["--set", item]
    code = cli.main(args)
    out, err = capsys.readouterr()
    assert code == 2, f"accepted (exit {code}); printed:\n{out}"
    assert out == "", "nothing may be rendered"
    message = err.strip()
    assert message.startswith("error: ") and "\n" not in message, message
    assert "Traceback" not in message
    assert "Fix" in message or "fix" in message, message
    assert not (path.parent / "jobs").exists()
    return message


# --- class 2: nothing the user writes becomes a line of the batch script -----------------------

@pytest.mark.parametrize(("body", "key"), [
    ("slurm: {partition: \"gpu\\nrm -rf $HOME\"}\n", "slurm.partition"),
    ("slurm: {account: \"acct\\r\\n#SBATCH --uid=0\"}\n", "slurm.account"),
    ("slurm: {time: \"1:00:00\\ntouch /tmp/owned\"}\n", "slurm.time"),
    ("slurm: {sbatch: {mail-type: \"END\\necho owned\"}}\n", "slurm.sbatch.mail-type"),
    ("slurm: {sbatch: {\"x\\ny\": \"1\"}}\n", "slurm.sbatch"),
    ("slurm: {sbatch: {\"comment=a b\": \"1\"}}\n", "slurm.sbatch"),
    ("slurm: {setup: [\"module load x\\u0000\"]}\n", "slurm.setup[0]"),
    ("env: {\"A=B\\nC\": x}\n", "env"),
    ("job_root: \"jobs\\n#SBATCH --x\"\n", "job_root"),
])
def test_control_characters_and_bad_flag_names_are_refused_in_the_file(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], body: str, key: str) -> None:
    message = refused(capsys, job_file(tmp_path, body))
    assert str(tmp_path / "job.yaml") in message and key in message


def test_a_newline_from_the_command_line_is_refused(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    message = refused(capsys, job_file(tmp_path), "slurm.qos=normal\nsrun evil")
    assert "slurm.qos" in message and "--set" in message


def test_env_values_may_hold_newlines_they_never_reach_the_script(tmp_path: Path) -> None:
    config = load_config(job_file(tmp_path, "env: {PEM: \"-----BEGIN-----\\nabc\"}\n"))
    assert config.env["PEM"] == "-----BEGIN-----\nabc"


def test_the_renderer_refuses_a_control_character_from_anywhere(tmp_path: Path) -> None:
    """The last line of defence: a value that did not come through ``load_config`` (here the job
    directory's path) still cannot inject a line."""
    from hpc_elastic.sbatch import render_sbatch

    config = load_config(job_file(tmp_path))
    with pytest.raises(ConfigError, match="control character U\\+000A"):
        render_sbatch(config, JobDir(tmp_path / "jobs\n#SBATCH --uid=0"), "python")


# --- class 3: job names ------------------------------------------------------------------------

@pytest.mark.parametrize("name", [
    "'../escape'", "'..'", "a/b", "'/abs'", "'has space'", "naïve", "'-leading-dash'",
    "x" * (NAME_MAX + 1), "x" * 110, "'a..b'",
])
def test_job_names_that_escape_or_break_the_run_are_refused(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str) -> None:
    message = refused(capsys, job_file(tmp_path, name=name))
    assert "key 'name'" in message


def test_the_longest_accepted_name_is_a_valid_rendezvous_run_id_in_every_mode(
        tmp_path: Path) -> None:
    """The name limit is derived from the rendezvous' own: the longest name still makes a local
    job id (the longest run id a job gets) the rendezvous accepts."""
    from hpc_elastic.local import local_job_id
    from hpc_elastic.submit import new_jobdir

    config = load_config(job_file(tmp_path, name="n" * NAME_MAX))
    run_id = local_job_id(new_jobdir(config))
    assert rendezvous_check_name(run_id, "run id", "test") == run_id
    assert new_jobdir(config).path.parent == Path(config.job_root)


# --- class 5: values that would only fail later --------------------------------------------------

@pytest.mark.parametrize(("body", "key"), [
    ("rendezvous: {join_timeout: .nan}\n", "rendezvous.join_timeout"),
    ("rendezvous: {join_timeout: .inf}\n", "rendezvous.join_timeout"),
    ("rendezvous: {close_timeout: -.inf}\n", "rendezvous.close_timeout"),
    ("rendezvous: {heartbeat_interval: 1e-9, heartbeat_timeout: 1}\n",
     "rendezvous.heartbeat_interval"),
    ("rendezvous: {heartbeat_timeout: .nan}\n", "rendezvous.heartbeat_timeout"),
    ("monitor_interval: 1e-9\n", "monitor_interval"),
    ("monitor_interval: .nan\n", "monitor_interval"),
    ("nodes: 100000000000000000000\n", "nodes"),
    ("nodes: 1:100000000000000000000\n", "nodes"),
    ("nproc_per_node: 100000000000000000000\n", "nproc_per_node"),
    ("max_restarts: 100000000000000000000\n", "max_restarts"),
    ("preemption: {grace: 100000}\n", "preemption.grace"),
    ("slurm: {gpus_per_node: 100000000000000000000}\n", "slurm.gpus_per_node"),
])
def test_out_of_range_numbers_are_refused_at_submit(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], body: str, key: str) -> None:
    message = refused(capsys, job_file(tmp_path, body))
    assert f"'{key}'" in message and "line" in message


def test_a_nan_from_the_command_line_is_refused(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    message = refused(capsys, job_file(tmp_path), "rendezvous.join_timeout=.nan")
    assert "rendezvous.join_timeout" in message


@pytest.mark.parametrize(("body", "line"), [
    ("nodes: 2\nnodes: 4\n", 5),
    ("slurm:\n  partition: a\n  partition: b\n", 6),
    ("env: {A: 1, A: 2}\n", 4),
])
def test_a_duplicated_key_is_refused_not_silently_overwritten(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], body: str, line: int) -> None:
    message = refused(capsys, job_file(tmp_path, body))
    assert f"line {line}" in message and "twice" in message


# --- class 10: job files that are not text ---------------------------------------------------

def test_a_job_file_that_is_not_utf8_is_one_paragraph(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = job_file(tmp_path)
    path.write_bytes(path.read_bytes() + b"env: {GREETING: gr\xfc\xdfe}\n")
    message = refused(capsys, path)
    assert "UTF-8" in message and str(path) in message
