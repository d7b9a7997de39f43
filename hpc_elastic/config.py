"""Job configuration: one YAML file describes one job.

Why a hand-written validator instead of a schema library: the errors are the product here. A user
with a typo in ``slurm.partiton`` must get one paragraph that names the file, the line, the key and
the fix, never a traceback from deep inside yaml. The schema is the dataclasses below; the
validator walks them generically, so adding a key means adding one typed field with a default.

Public entry points: :func:`load_config` (file + ``--set`` overrides), :func:`config_from_dict`
(the resolved config an agent reads back) and :meth:`JobConfig.to_dict`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import signal
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A job configuration problem, worded for the person who wrote the file."""


#: The shortest ``hang_timeout``: workers write their progress once a second.
MIN_HANG_TIMEOUT = 3.0
#: The default ``hang_timeout``: half of NCCL's default collective timeout (600 s), so a hang is
#: caught, with its stacks, well before the library aborts the ranks without them; and far
#: above the longest gaps between steps measured in healthy runs (docs/configuration.md).
DEFAULT_HANG_TIMEOUT = 300.0
#: Keys where ``off`` (YAML reads it as false) switches the feature off like 0 or null.
_OFF_MEANS_NONE = ("hang_timeout",)


# --------------------------------------------------------------------------------------------
# The schema. Every optional key has a default; docs/configuration.md documents each one.
# --------------------------------------------------------------------------------------------


@dataclass
class Entrypoint:
    """What each worker runs: a script path or a module (``-m``), plus its arguments."""

    script: str | None = None
    module: str | None = None
    args: list[str] = field(default_factory=list)

    def command(self) -> list[str]:
        """The argv after ``python``: ``[script, *args]`` or ``['-m', module, *args]``."""
        head = [self.script] if self.script else ["-m", str(self.module)]
        return [*head, *self.args]


@dataclass
class SlurmOptions:
    """Options that become ``#SBATCH`` lines; ``sbatch`` passes any other key through untouched."""

    partition: str | None = None
    time: str = "01:00:00"
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    cpus_per_task: int | None = None
    mem: str | None = None
    gpus_per_node: int | None = None
    sbatch: dict[str, str] = field(default_factory=dict)
    setup: list[str] = field(default_factory=list)


@dataclass
class RendezvousOptions:
    """Shared-filesystem rendezvous settings (seconds). ``directory`` defaults to the job dir's."""

    directory: str | None = None
    join_timeout: float = 600.0
    last_call_timeout: float = 2.0
    close_timeout: float = 30.0
    heartbeat_interval: float = 1.0
    heartbeat_timeout: float = 5.0


@dataclass
class PreemptionOptions:
    """How Slurm warns of the end (preemption or time limit) and what the agent does then."""

    signal: str = "USR1"
    grace: int = 60
    requeue: bool = True


@dataclass
class JobConfig:
    """One job. ``nodes`` is kept as written ("2", "1:3"); use ``min_nodes``/``max_nodes``."""

    name: str
    entrypoint: Entrypoint
    nodes: str = "1"
    nproc_per_node: int = 1
    max_restarts: int = 3
    #: Hot spares: this many more nodes whose agents stand by in the rendezvous and take a lost
    #: node's place in the very next round (Slurm jobs; see hpc_elastic/batch.py).
    spares: int = 0
    monitor_interval: float = 0.5
    hang_timeout: float | None = DEFAULT_HANG_TIMEOUT
    hang_startup_timeout: float | None = None
    same_failure_limit: int = 3
    #: Keep one pre-started process that has imported torch, and fork each worker group's
    #: workers from it (hpc_elastic/agent/standby.py): restarts skip ``import torch``. Off by
    #: default: the script then runs in a process whose torch was imported before the script
    #: could change the environment (docs/configuration.md).
    warm_workers: bool = False
    stragglers: str = "off"
    job_root: str = "./jobs"
    #: False: everything under the job directory is private (0700/0600). True: the job
    #: directory's group may read it (0750/0640); see docs/security.md.
    share_with_group: bool = False
    env: dict[str, str] = field(default_factory=dict)
    slurm: SlurmOptions = field(default_factory=SlurmOptions)
    rendezvous: RendezvousOptions = field(default_factory=RendezvousOptions)
    preemption: PreemptionOptions = field(default_factory=PreemptionOptions)

    @property
    def min_nodes(self) -> int:
        return parse_nodes(self.nodes)[0]

    @property
    def max_nodes(self) -> int:
        return parse_nodes(self.nodes)[1]

    @property
    def elastic(self) -> bool:
        return self.min_nodes != self.max_nodes

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def load_config(path: str | os.PathLike[str], overrides: list[str] | None = None) -> JobConfig:
    """Read a job YAML file, apply ``key.sub=value`` overrides, validate, resolve paths.

    Relative paths in the file (the script, ``job_root``, ``rendezvous.directory``) are taken
    relative to the file's directory, so a job runs the same from any working directory.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: no such file. Check the path, or create a job file with "
            "'hpc-elastic init --template cpu'."
        ) from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot be read ({err.strerror}).") from None
    except UnicodeDecodeError as err:
        raise ConfigError(not_utf8(str(path), err)) from None
    data, lines = _parse_yaml(text, str(path))
    for item in overrides or []:
        _apply_override(data, item, lines)
    return _build(data, _Source(str(path), lines), base_dir=path.resolve().parent)


def config_from_dict(data: dict[str, Any], source: str = "<resolved config>") -> JobConfig:
    """Rebuild a config from :meth:`JobConfig.to_dict` output (what the agent reads back)."""
    return _build(data, _Source(source, {}), base_dir=None)


def not_utf8(filename: str, err: UnicodeDecodeError) -> str:
    """The one-paragraph error for a job file that is not UTF-8 text."""
    byte = err.object[err.start]
    return (f"{filename}: this is not UTF-8 text (byte {err.start} is 0x{byte:02x}). Fix: save "
            "the file as UTF-8 (for example 'iconv -f latin1 -t utf-8'), or remove the "
            "character.")


#: Job names: what Slurm, file names and the rendezvous run id all accept (a run id is at most
#: 128 characters and local runs add 27 to the name: ``local-<name>-<stamp>-<hex>``).
NAME_MAX = 64
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
#: Control characters (C0, DEL, C1): a newline in a value that reaches the batch script would
#: become a shell line of its own.
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f]")
#: ``slurm.sbatch`` keys become ``#SBATCH --<key>`` flags.
_FLAG_RE = re.compile(r"^[a-z][a-z0-9-]*$")
#: ``env`` keys become environment variable names.
_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
MAX_NODES = 100_000


def check_name(name: str) -> str | None:
    """Why ``name`` cannot be a job name, or None when it can."""
    if len(name) > NAME_MAX:
        return f"it is {len(name)} characters long, the limit is {NAME_MAX}"
    if not _NAME_RE.match(name) or ".." in name:
        return ("it must start with a letter or digit and contain only ASCII letters, digits, "
                "'.', '_' and '-' (no '..', '/', spaces or other characters)")
    return None


def control_character(text: str) -> str | None:
    """The first control character in ``text`` as ``U+000A``, or None."""
    found = _CONTROL_RE.search(text)
    return f"U+{ord(found.group()):04X}" if found else None


def parse_nodes(value: str | int) -> tuple[int, int]:
    """``"2"`` -> (2, 2), ``"1:3"`` -> (1, 3). Raises ValueError with a plain message."""
    text = str(value).strip()
    lo, sep, hi = text.partition(":")
    try:
        low, high = int(lo), int(hi if sep else lo)
    except ValueError:
        raise ValueError(f"expected a number or 'min:max' (like 2 or 1:4), got {text!r}") from None
    if low < 1:
        raise ValueError(f"the minimum number of nodes must be at least 1, got {low}")
    if low > high:
        raise ValueError(f"min {low} is larger than max {high}; write it as '{high}:{low}'")
    if high > MAX_NODES:
        raise ValueError(f"{high} nodes is more than {MAX_NODES}, which no cluster has")
    return low, high


# --------------------------------------------------------------------------------------------
# Internals: YAML with line numbers, overrides, the generic dataclass validator
# --------------------------------------------------------------------------------------------


@dataclass
class _Source:
    """Where values came from: the file name and a map of dotted key -> line (or '--set')."""

    file: str
    lines: dict[str, int | str]

    def where(self, key: str) -> str:
        origin = self.lines.get(key)
        if isinstance(origin, str):  # an override
            return f"{origin} (for {self.file})"
        if origin is None:
            parent = key.rpartition(".")[0]
            origin = self.lines.get(parent) if parent else None
        return f"{self.file}, line {origin}" if isinstance(origin, int) else self.file


class _JobYamlLoader(yaml.SafeLoader):
    """SafeLoader without YAML 1.1's base-60 numbers.

    Plain YAML 1.1 reads ``nodes: 1:3`` as the integer 63 and ``time: 1:30`` as 90; here both
    stay strings. Floats also accept ``1e3`` (YAML 1.1 insists on ``1.0e+3``).
    """


_INT_TAG = "tag:yaml.org,2002:int"
_FLOAT_TAG = "tag:yaml.org,2002:float"
_JobYamlLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in (_INT_TAG, _FLOAT_TAG)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_JobYamlLoader.add_implicit_resolver(
    _INT_TAG,
    re.compile(r"^(?:[-+]?0b[01_]+|[-+]?0x[0-9a-fA-F_]+|[-+]?(?:0|[1-9][0-9_]*))$"),
    list("-+0123456789"),
)
_JobYamlLoader.add_implicit_resolver(
    _FLOAT_TAG,
    re.compile(
        r"^(?:[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?(?:[eE][-+]?[0-9]+)?"
        r"|[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
    ),
    list("-+0123456789."),
)


class DuplicateKeyError(yaml.MarkedYAMLError):
    """A key written twice in one mapping (YAML 1.1 lets the last one win silently)."""


def _refuse_duplicates(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False
                       ) -> dict[Any, Any]:
    seen: dict[Any, yaml.Node] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if isinstance(key, typing.Hashable) and key in seen:
            first = seen[key].start_mark.line + 1
            raise DuplicateKeyError(
                None, None, f"the key '{key}' appears twice (first on line {first})",
                key_node.start_mark)
        seen[key] = key_node
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_JobYamlLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _refuse_duplicates)  # type: ignore[arg-type]


def _yaml_value(text: str) -> Any:
    return yaml.load(text, Loader=_JobYamlLoader)  # noqa: S506 - a SafeLoader subclass


def _parse_yaml(text: str, filename: str) -> tuple[dict[str, Any], dict[str, int | str]]:
    try:
        root = yaml.compose(text, Loader=_JobYamlLoader)
        data = _yaml_value(text)
    except DuplicateKeyError as err:
        mark = err.problem_mark
        raise ConfigError(
            f"{filename}, line {mark.line + 1 if mark else '?'}: {err.problem}; only one of them "
            "would be used. Fix: remove one of the two, or merge them into one."
        ) from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{filename}, line {mark.line + 1}" if mark else filename
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(
            f"{where}: this is not valid YAML ({problem}). Check indentation (spaces, not tabs) "
            "and that every 'key: value' pair has a space after the colon."
        ) from None
    if data is None:
        raise ConfigError(f"{filename}: the file is empty. A job needs at least 'name' and "
                          "'entrypoint'; see 'hpc-elastic init'.")
    if not isinstance(data, dict):
        raise ConfigError(f"{filename}, line 1: the top level must be a mapping of keys "
                          f"(name: ..., entrypoint: ...), not a {type(data).__name__}.")
    lines: dict[str, int | str] = {}
    _record_lines(root, "", lines)
    return data, lines


def _record_lines(node: yaml.Node, prefix: str, lines: dict[str, int | str]) -> None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = f"{prefix}{key_node.value}"
            lines[key] = key_node.start_mark.line + 1
            _record_lines(value_node, key + ".", lines)


def _apply_override(data: dict[str, Any], item: str, lines: dict[str, int | str]) -> None:
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(
            f"--set {item!r}: expected KEY=VALUE with a dotted key, "
            "for example --set slurm.partition=gpu or --set nodes=2:4."
        )
    bad = control_character(item)
    if bad is not None:  # YAML would fold a newline into a space; refuse it as it was typed
        raise ConfigError(
            f"--set {key}: the value contains the control character {bad} (a newline, tab or "
            "similar), which would break the batch script. Fix: give the value on one line.")
    try:
        value = _yaml_value(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    target = data
    parts = key.split(".")
    for depth, part in enumerate(parts[:-1]):
        if part == "entrypoint" and depth == 0 and isinstance(target.get(part), str):
            target[part] = _entrypoint_shorthand(target[part])  # one-liner -> its mapping
        nxt = target.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ConfigError(
                f"--set {item!r}: '{'.'.join(parts[: depth + 1])}' is not a section, so "
                f"'{key}' cannot be set. Set '{'.'.join(parts[: depth + 1])}' itself instead."
            )
        target = nxt
    target[parts[-1]] = value
    lines[key] = f"--set {key}"


_NODES_HINT = "write a number of nodes (2) or an elastic range 'min:max' (1:4)"


def _build(data: dict[str, Any], source: _Source, base_dir: Path | None) -> JobConfig:
    config = _to_dataclass(JobConfig, data, "", source)
    try:
        parse_nodes(config.nodes)
    except ValueError as err:
        message = f"{source.where('nodes')}: key 'nodes': {err}. Fix: {_NODES_HINT}."
        raise ConfigError(message) from None
    _check_name(config, source)
    _check_ranges(config, source)
    _check_entrypoint(config, source, base_dir)
    _check_signal(config, source)
    _check_hang_timeout(config, source)
    if base_dir is not None:
        config.job_root = str((base_dir / config.job_root).resolve())
        if config.rendezvous.directory:
            config.rendezvous.directory = str((base_dir / config.rendezvous.directory).resolve())
    return config


def _to_dataclass(cls: type, data: Any, prefix: str, source: _Source) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    section = prefix.rstrip(".") or "the top level"
    if not isinstance(data, dict):
        raise ConfigError(
            f"{source.where(prefix.rstrip('.'))}: key '{section}' must be a mapping of keys, "
            f"got {_describe(data)}. Fix: indent its keys under it."
        )
    for key in data:
        if key not in fields:
            guess = difflib.get_close_matches(str(key), fields, n=1)
            hint = f"Did you mean '{prefix}{guess[0]}'?" if guess else (
                f"Known keys in {section}: {', '.join(sorted(fields))}.")
            raise ConfigError(
                f"{source.where(prefix + str(key))}: unknown key '{prefix}{key}'. {hint} "
                "Fix: rename or remove it (docs/configuration.md lists every key)."
            )
    values: dict[str, Any] = {}
    for name, f in fields.items():
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(
                    f"{source.where(prefix.rstrip('.'))}: required key '{prefix}{name}' is "
                    f"missing. Fix: add it, for example: {_EXAMPLES.get(prefix + name, name)}."
                )
            continue
        value = data[name]
        if prefix + name in _OFF_MEANS_NONE and (value is False or value == "off"):
            value = None
        values[name] = _convert(hints[name], value, prefix + name, source)
    return cls(**values)


_EXAMPLES = {
    "name": "'name: my-training'",
    "entrypoint": "'entrypoint: train.py' or 'entrypoint: {module: mypkg.train}'",
}


def _convert(hint: Any, value: Any, key: str, source: _Source) -> Any:
    """Check ``value`` against a type hint, converting the few lenient cases users expect."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        if hint is Entrypoint:
            value = _entrypoint_shorthand(value)
        return _to_dataclass(hint, value, key + ".", source)
    if hint is str and key == "nodes" and isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if origin is list:
        if isinstance(value, str) and key.endswith("args"):
            return value.split()
        if not isinstance(value, list):
            _type_error(key, value, "a list", source)
        return [_scalar_str(v, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            _type_error(key, value, "a mapping of NAME: value", source)
        return {_mapping_key(k, key, source): _scalar_str(v, f"{key}.{k}", source)
                for k, v in value.items()}
    if hint is bool:
        if not isinstance(value, bool):
            _type_error(key, value, "true or false", source)
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            _type_error(key, value, "a whole number", source)
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            _type_error(key, value, "a number of seconds", source)
        if not math.isfinite(value):
            _type_error(key, value, "a finite number of seconds (not .nan or .inf)", source)
        return float(value)
    if hint is str:
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            _type_error(key, value, "a text value", source)
        return _text(str(value), key, source)
    raise TypeError(f"unsupported type hint {hint!r} for {key}")  # a bug in the schema


def _entrypoint_shorthand(value: Any) -> Any:
    """``entrypoint: train.py --lr 1`` and ``entrypoint: -m pkg.mod`` as one-line shorthands."""
    if not isinstance(value, str):
        return value
    words = value.split()
    if len(words) >= 2 and words[0] == "-m":
        return {"module": words[1], "args": words[2:]}
    return {"script": words[0] if words else "", "args": words[1:]}


def _scalar_str(value: Any, key: str, source: _Source) -> str:
    if isinstance(value, dict | list) or value is None:
        _type_error(key, value, "a single value (text or number)", source)
    if isinstance(value, bool):
        return "true" if value else "false"
    return _text(str(value), key, source)


def _text(value: str, key: str, source: _Source) -> str:
    """Refuse control characters. ``env`` values are the exception (they reach the workers'
    environment, never the batch script): only NUL, which no environment can hold."""
    bad = "U+0000" if "\x00" in value else None
    if not key.startswith("env."):
        bad = control_character(value)
    if bad is not None:
        raise ConfigError(
            f"{source.where(key)}: key '{key}' contains the control character {bad} (a newline, "
            "tab or similar), which would break the batch script or a file name. Fix: write the "
            "value on one line, without control characters."
        )
    return value


def _mapping_key(name: Any, key: str, source: _Source) -> str:
    """Keys of ``slurm.sbatch`` become ``#SBATCH --<key>`` flags, keys of ``env`` variable
    names: anything else could inject a line into the batch script or break the environment."""
    text = str(name)
    pattern, what = {
        "slurm.sbatch": (_FLAG_RE, "an sbatch option name (lower-case letters, digits and '-', "
                         "like 'mail-type')"),
        "env": (_ENV_NAME_RE, "an environment variable name (letters, digits and '_', not "
                "starting with a digit)"),
    }.get(key, (None, ""))
    if pattern is not None and not pattern.match(text):
        raise ConfigError(
            f"{source.where(f'{key}.{text}')}: key {text!r} in '{key}' must be {what}. "
            f"Fix: rename it."
        )
    return text


def _describe(value: Any) -> str:
    if value is None:
        return "nothing (an empty value)"
    return f"{type(value).__name__} {value!r}"


def _type_error(key: str, value: Any, expected: str, source: _Source) -> typing.NoReturn:
    raise ConfigError(
        f"{source.where(key)}: key '{key}' must be {expected}, got {_describe(value)}. "
        f"Fix: change the value of '{key}'."
    )


def _check_name(config: JobConfig, source: _Source) -> None:
    why = check_name(config.name)
    if why is not None:
        raise ConfigError(
            f"{source.where('name')}: key 'name' ({config.name!r}) cannot be a job name: {why}. "
            "It names the job directory, the Slurm job and the rendezvous run. Fix: use a short "
            "name such as 'resnet50-run2'."
        )


#: Bounds of every number (inclusive): what Slurm, torch and the rendezvous can work with. Below
#: the minimum an interval makes a loop spin; above the maximum a count is no real cluster and a
#: timeout means "never" (use a large but real one).
_DAY = 86400.0
_RANGES: dict[str, tuple[float, float, str]] = {
    "nproc_per_node": (1, 1024, "workers per node"),
    "max_restarts": (0, 100_000, "restarts"),
    "spares": (0, 100_000, "nodes"),
    "monitor_interval": (0.01, 3600, "seconds"),
    "preemption.grace": (0, 65535, "seconds (Slurm's --signal limit)"),
    "rendezvous.join_timeout": (0.1, 30 * _DAY, "seconds"),
    "rendezvous.last_call_timeout": (0, _DAY, "seconds"),
    "rendezvous.close_timeout": (0.1, _DAY, "seconds"),
    "rendezvous.heartbeat_interval": (0.05, 3600, "seconds"),
    "rendezvous.heartbeat_timeout": (0.1, _DAY, "seconds"),
    "slurm.cpus_per_task": (1, 4096, "CPUs"),
    "slurm.gpus_per_node": (0, 256, "GPUs"),
}


def _value_of(config: JobConfig, key: str) -> Any:
    value: Any = config
    for part in key.split("."):
        value = getattr(value, part)
    return value


def _check_ranges(config: JobConfig, source: _Source) -> None:
    for key, (low, high, unit) in _RANGES.items():
        value = _value_of(config, key)
        if value is not None and not low <= value <= high:
            raise ConfigError(
                f"{source.where(key)}: key '{key}' is {value:g}, out of range. Fix: use a value "
                f"from {low:g} to {high:g} {unit}."
            )
    rdzv = config.rendezvous
    if rdzv.heartbeat_timeout < 2 * rdzv.heartbeat_interval:
        raise ConfigError(
            f"{source.where('rendezvous.heartbeat_timeout')}: key 'rendezvous.heartbeat_timeout' "
            f"({rdzv.heartbeat_timeout:g} s) must be at least twice 'rendezvous.heartbeat_interval'"
            f" ({rdzv.heartbeat_interval:g} s), or a busy node looks dead. Fix: make it 3 to 5 "
            "heartbeat intervals."
        )


def _check_entrypoint(config: JobConfig, source: _Source, base_dir: Path | None) -> None:
    ep = config.entrypoint
    if bool(ep.script) == bool(ep.module):
        raise ConfigError(
            f"{source.where('entrypoint')}: key 'entrypoint' needs exactly one of 'script' or "
            "'module'. Fix: 'entrypoint: train.py' or 'entrypoint: {module: mypkg.train}'."
        )
    if ep.script and base_dir is not None:
        script = (base_dir / ep.script).resolve()
        if not script.is_file():
            raise ConfigError(
                f"{source.where('entrypoint.script')}: key 'entrypoint.script': the file "
                f"{script} does not exist. Paths are taken relative to the job file's "
                "directory. Fix: correct the path."
            )
        ep.script = str(script)


def _check_hang_timeout(config: JobConfig, source: _Source) -> None:
    """``hang_timeout``: seconds without progress; 0, null or off switch hang detection off.
    ``same_failure_limit``: 0 switches the restart-storm guard off."""
    if config.same_failure_limit < 0:
        raise ConfigError(
            f"{source.where('same_failure_limit')}: key 'same_failure_limit' "
            f"({config.same_failure_limit}) must not be negative. Fix: the number of identical "
            "failures in a row after which restarts stop (default 3), or 0 to never stop early."
        )
    if config.stragglers not in ("off", "report", "exclude"):
        raise ConfigError(
            f"{source.where('stragglers')}: key 'stragglers' is {config.stragglers!r}. Fix: use "
            "'report' (flag slow nodes), 'exclude' (flag them and leave them out from the next "
            "restart or requeue on) or 'off' (the default)."
        )
    startup = config.hang_startup_timeout
    if startup is not None and not startup >= MIN_HANG_TIMEOUT:
        raise ConfigError(
            f"{source.where('hang_startup_timeout')}: key 'hang_startup_timeout' ({startup:g} s) "
            f"is too short. Fix: seconds longer than a restart takes to reach its first step "
            "(start-up, checkpoint load), or leave it out (twice hang_timeout, at least 600 s)."
        )
    value = config.hang_timeout
    if value is None or value == 0:
        config.hang_timeout = None
        return
    if not value >= MIN_HANG_TIMEOUT:  # also catches nan
        raise ConfigError(
            f"{source.where('hang_timeout')}: key 'hang_timeout' ({value:g} s) is too short: "
            f"workers report progress once a second, so anything under {MIN_HANG_TIMEOUT:g} s "
            "would call a healthy rank hung. Fix: use seconds longer than your slowest step or "
            f"checkpoint (the default is {DEFAULT_HANG_TIMEOUT:g}), or 0 or off to switch hang "
            "detection off."
        )


def _check_signal(config: JobConfig, source: _Source) -> None:
    name = config.preemption.signal.upper().removeprefix("SIG")
    # KILL/STOP cannot be caught; TERM/INT/HUP/QUIT already mean "shut down" to torch's agent
    # (TORCHELASTIC_SIGNALS_TO_HANDLE) and to Slurm's scancel.
    if not hasattr(signal, "SIG" + name) or name in {"KILL", "STOP", "TERM", "INT", "HUP", "QUIT"}:
        raise ConfigError(
            f"{source.where('preemption.signal')}: key 'preemption.signal': {name!r} cannot be "
            "the preemption signal (it cannot be caught, or already means 'shut down' to torch "
            "and Slurm). Fix: use USR1 (the default) or USR2."
        )
    config.preemption.signal = name
