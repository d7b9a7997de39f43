"""Job config: defaults, shorthands, overrides, and one clear error per kind of bad input."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from hpc_elastic.config import ConfigError, config_from_dict, load_config, parse_nodes


@pytest.fixture
def job_dir(tmp_path: Path) -> Path:
    (tmp_path / "train.py").write_text("print('hi')\n")
    return tmp_path


def write(job_dir: Path, text: str, name: str = "job.yaml") -> Path:
    path = job_dir / name
    path.write_text(textwrap.dedent(text))
    return path


def error_of(path: Path, overrides: list[str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    message = str(info.value)
    assert "\n" not in message, "errors are one paragraph"
    assert "Traceback" not in message
    return message


def test_minimal_job_gets_defaults_and_absolute_paths(job_dir: Path) -> None:
    config = load_config(write(job_dir, "name: demo\nentrypoint: train.py --lr 0.1\n"))
    assert (config.min_nodes, config.max_nodes, config.elastic) == (1, 1, False)
    assert config.entrypoint.script == str(job_dir / "train.py")
    assert config.entrypoint.command() == [str(job_dir / "train.py"), "--lr", "0.1"]
    assert config.job_root == str(job_dir / "jobs")
    assert config.preemption.signal == "USR1"
    assert config.rendezvous.heartbeat_timeout > config.rendezvous.heartbeat_interval


def test_full_job_round_trips_through_the_resolved_dict(job_dir: Path) -> None:
    path = write(job_dir, """\
        name: big
        nodes: 2:8
        nproc_per_node: 4
        entrypoint: {module: mypkg.train, args: [--epochs, 3]}
        env: {OMP_NUM_THREADS: 1, NCCL_DEBUG: WARN}
        job_root: /scratch/jobs
        max_restarts: 5
        slurm:
          partition: gpu
          time: "1:30:00"
          gpus_per_node: 4
          sbatch: {exclusive: "", gres: "gpu:4"}
          setup: ["module load cuda/12"]
        rendezvous: {heartbeat_interval: 2, heartbeat_timeout: 10, last_call_timeout: 1e1}
        preemption: {signal: SIGUSR2, grace: 120}
        """)
    config = load_config(path)
    assert (config.min_nodes, config.max_nodes, config.elastic) == (2, 8, True)
    assert config.entrypoint.command() == ["-m", "mypkg.train", "--epochs", "3"]
    assert config.env == {"OMP_NUM_THREADS": "1", "NCCL_DEBUG": "WARN"}
    assert config.slurm.time == "1:30:00", "YAML 1.1 would have read this as 5400"
    assert config.rendezvous.last_call_timeout == 10.0
    assert config.preemption.signal == "USR2"
    again = config_from_dict(config.to_dict())
    assert again == config


def test_elastic_range_stays_a_range_not_a_base_60_number(job_dir: Path) -> None:
    config = load_config(write(job_dir, "name: a\nentrypoint: train.py\nnodes: 1:3\n"))
    assert (config.min_nodes, config.max_nodes) == (1, 3)


def test_overrides_apply_before_validation(job_dir: Path) -> None:
    path = write(job_dir, "name: a\nentrypoint: train.py\n")
    config = load_config(path, ["nodes=2:4", "slurm.partition=debug", "rendezvous.join_timeout=30",
                                "env.SEED=7"])
    assert (config.min_nodes, config.max_nodes) == (2, 4)
    assert config.slurm.partition == "debug"
    assert config.rendezvous.join_timeout == 30.0
    assert config.env == {"SEED": "7"}


def test_override_reaches_into_a_one_line_entrypoint(job_dir: Path) -> None:
    path = write(job_dir, "name: a\nentrypoint: train.py --lr 0.1\n")
    config = load_config(path, ["entrypoint.args=[--epochs, 2]"])
    assert config.entrypoint.command() == [str(job_dir / "train.py"), "--epochs", "2"]


def test_unknown_key_suggests_the_right_one_with_file_and_line(job_dir: Path) -> None:
    path = write(job_dir, "name: a\nentrypoint: train.py\nslurm:\n  partiton: gpu\n")
    message = error_of(path)
    assert f"{path}, line 4" in message
    assert "slurm.partiton" in message
    assert "Did you mean 'slurm.partition'?" in message


def test_unknown_override_key_names_the_set_option(job_dir: Path) -> None:
    message = error_of(write(job_dir, "name: a\nentrypoint: train.py\n"), ["max_restart=2"])
    assert "--set max_restart" in message and "Did you mean 'max_restarts'?" in message


def test_malformed_override(job_dir: Path) -> None:
    message = error_of(write(job_dir, "name: a\nentrypoint: train.py\n"), ["nodes"])
    assert "KEY=VALUE" in message


def test_wrong_type_names_key_line_and_expectation(job_dir: Path) -> None:
    path = write(job_dir, "name: a\nentrypoint: train.py\nnproc_per_node: two\n")
    message = error_of(path)
    assert "line 3" in message and "'nproc_per_node'" in message and "whole number" in message


def test_min_greater_than_max(job_dir: Path) -> None:
    message = error_of(write(job_dir, "name: a\nentrypoint: train.py\nnodes: 4:2\n"))
    assert "line 3" in message and "min 4 is larger than max 2" in message and "'2:4'" in message


def test_missing_entrypoint_file(job_dir: Path) -> None:
    message = error_of(write(job_dir, "name: a\nentrypoint: nope.py\n"))
    assert "line 2" in message and "nope.py does not exist" in message


def test_missing_required_key(job_dir: Path) -> None:
    message = error_of(write(job_dir, "name: a\n"))
    assert "required key 'entrypoint' is missing" in message


def test_unreadable_yaml_points_at_the_line(job_dir: Path) -> None:
    message = error_of(write(job_dir, "name: a\nentrypoint: train.py\n  nodes: 2\n"))
    assert "line 3" in message and "not valid YAML" in message


def test_missing_file_and_empty_file(job_dir: Path) -> None:
    assert "no such file" in error_of(job_dir / "absent.yaml")
    assert "empty" in error_of(write(job_dir, ""))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("preemption: {signal: KILL}", "preemption.signal"),
        ("preemption: {signal: SIGTERM}", "cannot be the preemption signal"),
        ("rendezvous: {heartbeat_interval: 5, heartbeat_timeout: 5}", "heartbeat_timeout"),
        ("max_restarts: -1", "max_restarts"),
        ("slurm: gpu", "must be a mapping"),
        ("env: [A, B]", "mapping of NAME: value"),
    ],
)
def test_semantic_checks(job_dir: Path, text: str, expected: str) -> None:
    message = error_of(write(job_dir, f"name: a\nentrypoint: train.py\n{text}\n"))
    assert expected in message and "line 3" in message


def test_parse_nodes() -> None:
    assert parse_nodes(3) == (3, 3)
    assert parse_nodes("2:5") == (2, 5)
    for bad in ("0", "a:b", "3:2"):
        with pytest.raises(ValueError):
            parse_nodes(bad)
