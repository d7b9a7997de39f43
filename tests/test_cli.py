"""The command line as a user meets it: real subprocesses of ``python -m hpc_elastic``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

COMMANDS = ["submit", "agent", "status", "cancel", "list", "logs", "init", "doctor"]


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hpc_elastic", *args],
        capture_output=True, text=True, cwd=cwd, timeout=60,
    )


def test_top_level_help_lists_every_command_with_a_line_each() -> None:
    result = run_cli("--help")
    assert result.returncode == 0
    for command in COMMANDS:
        lines = [line for line in result.stdout.splitlines() if line.strip().startswith(command)]
        assert lines, f"{command} missing from --help"
        assert len(lines[0].split()) > 2, f"{command} has no description"


@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_has_its_own_help(command: str) -> None:
    result = run_cli(command, "--help")
    assert result.returncode == 0
    assert result.stdout.startswith(f"usage: hpc-elastic {command}")


def test_logs_help_lists_the_analysis_commands() -> None:
    result = run_cli("logs", "--help")
    for name in ("summary", "timeline", "failures", "metrics", "plot"):
        assert name in result.stdout


def test_console_script_is_installed() -> None:
    script = Path(sys.executable).parent / "hpc-elastic"
    result = subprocess.run([str(script), "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and "hpc_elastic" in result.stdout


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("name: a\nentrypoint: train.py\nslurm: {partiton: x}\n", "Did you mean 'slurm.partition'"),
        ("name: a\nentrypoint: train.py\nnproc_per_node: two\n", "whole number"),
        ("name: a\nentrypoint: train.py\nnodes: 3:1\n", "larger than max"),
        ("name: a\nentrypoint: missing.py\n", "does not exist"),
        ("name: a\nentrypoint: train.py\n  bad: [\n", "not valid YAML"),
    ],
)
def test_submit_bad_config_is_one_paragraph_and_exit_2(
    tmp_path: Path, text: str, expected: str
) -> None:
    (tmp_path / "train.py").write_text("")
    (tmp_path / "bad.yaml").write_text(text)
    result = run_cli("submit", "bad.yaml", cwd=tmp_path)
    assert result.returncode == 2
    assert expected in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0, result.stderr


def test_missing_subcommand_is_a_usage_error() -> None:
    result = run_cli()
    assert result.returncode == 2 and "COMMAND" in result.stderr


def test_help_examples_name_files_that_exist_in_a_checkout() -> None:
    """The examples in --help are what a new user types after the demo: the files they name
    must exist (job.yaml is the one the first example, 'init', writes)."""
    epilog = run_cli("--help").stdout.split("examples:")[1].split("exit codes:")[0]
    paths = [word for word in epilog.split() if "/" in word or word.endswith((".yaml", ".py"))]
    assert "examples/demo.yaml" in paths
    repo = Path(__file__).resolve().parent.parent
    missing = [p for p in paths if p != "job.yaml" and not (repo / p).exists()]
    assert not missing, f"--help names paths that do not exist: {missing}"


def test_list_has_a_description_and_logs_errors_look_like_every_other_command(
    tmp_path: Path,
) -> None:
    described = " ".join(run_cli("list", "--help").stdout.split())
    assert "Without --root: the jobs you submitted" in described
    logs = run_cli("logs", "summary", "no-such-job", cwd=tmp_path)
    status = run_cli("status", "no-such-job", cwd=tmp_path)
    assert logs.returncode == status.returncode == 2
    assert logs.stderr.startswith("error: no-such-job: not a job directory")
    assert logs.stderr.split(":")[0] == status.stderr.split(":")[0] == "error"
