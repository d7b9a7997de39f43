"""Settings of one shared-filesystem rendezvous, and how they are parsed from torchrun.

Kept apart from the protocol so that every knob is validated in one place, with messages that
name the knob (``--rdzv-conf key=value`` for torchrun users, keyword arguments for
:func:`hpc_elastic.rendezvous.create_handler`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import SharedFSConfigError

#: Lock modes accepted by ``lock_mode``. Only ``flock`` exists today; the key is there so that a
#: filesystem without locks fails with a message instead of silently using a weaker lock.
LOCK_MODES = ("flock",)

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")

#: ``--rdzv-conf`` keys and their defaults (seconds for every ``*_timeout``/``*_interval``).
DEFAULTS: dict[str, Any] = {
    "join_timeout": 600.0,
    "last_call_timeout": 30.0,
    "close_timeout": 30.0,
    "heartbeat_interval": 2.0,
    "heartbeat_timeout": 10.0,
    "lock_timeout": 120.0,
    "poll_interval": 0.02,
    "poll_interval_max": 0.2,
    "lock_mode": "flock",
    "attempt": None,
    "run_key": None,
    "launched_nodes": None,
}

#: Keys torch itself puts into ``rdzv_configs`` (``LaunchConfig`` always adds ``timeout``) or
#: that users of torch's own backends commonly pass. Accepted and ignored, so switching
#: ``--rdzv-backend`` does not break a working command line.
IGNORED_KEYS = frozenset({"timeout", "read_timeout", "store_type", "is_host"})


def check_name(value: str, what: str, key: str) -> str:
    """Refuse a run id or attempt that could escape the rendezvous root or be ambiguous.

    Names become directory names under the shared root, so ``..``, ``/`` and friends must never
    get through.
    """
    if not isinstance(value, str) or not _NAME.match(value) or ".." in value:
        raise SharedFSConfigError(
            f"The rendezvous {what} {value!r} cannot be used: it becomes a directory name under "
            f"the shared rendezvous root, so it must be 1-128 characters of letters, digits, "
            f"'.', '_' or '-', start with a letter or digit and not contain '..'. "
            f"Fix {key} (for torchrun: --rdzv-id, or --rdzv-conf attempt=...)."
        )
    return value


def _seconds(key: str, value: Any) -> float:
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise SharedFSConfigError(
            f"The rendezvous setting {key}={value!r} is not a number of seconds. "
            f"Pass e.g. --rdzv-conf {key}={DEFAULTS[key]} (or {key}=... to create_handler)."
        ) from None
    if not math.isfinite(seconds) or seconds <= 0:
        raise SharedFSConfigError(
            f"The rendezvous setting {key}={value!r} must be a positive, finite number of "
            f"seconds; the default is {DEFAULTS[key]}."
        )
    return seconds


#: Run keys that torchrun derives from its command line (torchrun_plugin.default_run_key): the
#: only kind that cannot tell two runs apart, so the handler checks such runs' need for a node.
COMMAND_KEY_PREFIX = "cmd-"


@dataclass(frozen=True)
class Settings:
    """Everything that shapes one node's behaviour in the rendezvous.

    All durations are seconds. Liveness is judged only with the local monotonic clock (see
    ``docs/rendezvous.md``), so none of these values depends on clocks agreeing across nodes.
    """

    run_id: str
    min_nodes: int
    max_nodes: int
    join_timeout: float = DEFAULTS["join_timeout"]
    last_call_timeout: float = DEFAULTS["last_call_timeout"]
    close_timeout: float = DEFAULTS["close_timeout"]
    heartbeat_interval: float = DEFAULTS["heartbeat_interval"]
    heartbeat_timeout: float = DEFAULTS["heartbeat_timeout"]
    lock_timeout: float = DEFAULTS["lock_timeout"]
    poll_interval: float = DEFAULTS["poll_interval"]
    poll_interval_max: float = DEFAULTS["poll_interval_max"]
    lock_mode: str = DEFAULTS["lock_mode"]
    attempt: str | None = None
    #: Which run this node belongs to, when the run id alone may not say (torchrun:
    #: $HPC_ELASTIC_RUN_KEY, the batch job, the launch itself for one node, or a digest of the
    #: command line; see torchrun_plugin.default_run_key). Nodes with another key find the run
    #: id taken.
    run_key: str | None = None
    #: How many nodes were started together for this run's first round (the batch
    #: supervisor's or the local launcher's count): that round completes as soon as that many
    #: joined (and at least ``min_nodes``), instead of waiting the last call out for nodes that
    #: were never started -- an elastic job given fewer than ``max_nodes`` would wait
    #: ``last_call_timeout`` at every start and requeue. ``None``: unknown (torchrun).
    launched_nodes: int | None = None

    def __post_init__(self) -> None:
        check_name(self.run_id, "run id", "the run id")
        if self.attempt is not None:
            check_name(self.attempt, "attempt", "attempt")
        if self.run_key is not None and (not isinstance(self.run_key, str)
                                         or not _KEY.match(self.run_key)):
            raise SharedFSConfigError(
                f"The rendezvous setting run_key={self.run_key!r} must be 1-128 characters of "
                "letters, digits, '.', '_', ':' or '-' (e.g. the Slurm job id). Fix "
                "--rdzv-conf run_key=... (or run_key= of create_handler)."
            )
        for key in ("min_nodes", "max_nodes"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int):
                raise SharedFSConfigError(
                    f"The rendezvous setting {key}={value!r} must be an integer "
                    "(torchrun: --nnodes=MIN:MAX)."
                )
        if self.launched_nodes is not None:
            text = str(self.launched_nodes)
            launched = int(text) if text.isdigit() else 0
            if isinstance(self.launched_nodes, bool) or launched < 1:
                raise SharedFSConfigError(
                    f"The rendezvous setting launched_nodes={self.launched_nodes!r} must be a "
                    "whole number of nodes, at least 1 (how many nodes were started together "
                    "for the first round). Fix --rdzv-conf launched_nodes=N, or leave it out."
                )
            object.__setattr__(self, "launched_nodes", launched)
        if self.min_nodes < 1 or self.max_nodes < self.min_nodes:
            raise SharedFSConfigError(
                f"The node range min_nodes={self.min_nodes}, max_nodes={self.max_nodes} is "
                "impossible: it needs 1 <= min_nodes <= max_nodes. Fix --nnodes=MIN:MAX "
                "(or min_nodes/max_nodes of create_handler)."
            )
        for key in (
            "join_timeout",
            "last_call_timeout",
            "close_timeout",
            "heartbeat_interval",
            "heartbeat_timeout",
            "lock_timeout",
            "poll_interval",
            "poll_interval_max",
        ):
            object.__setattr__(self, key, _seconds(key, getattr(self, key)))
        if self.heartbeat_timeout < 2 * self.heartbeat_interval:
            raise SharedFSConfigError(
                f"heartbeat_timeout={self.heartbeat_timeout} must be at least twice "
                f"heartbeat_interval={self.heartbeat_interval}: a node is declared dead when its "
                "heartbeat counter has not advanced for heartbeat_timeout, and one missed beat "
                "must not kill it. Raise heartbeat_timeout or lower heartbeat_interval."
            )
        if self.poll_interval_max < self.poll_interval:
            object.__setattr__(self, "poll_interval_max", self.poll_interval)
        if self.lock_mode not in LOCK_MODES:
            raise SharedFSConfigError(
                f"lock_mode={self.lock_mode!r} is not supported; the only mode is 'flock' "
                "(fcntl.flock on a lock file in the rendezvous directory). On Lustre mount with "
                "'-o flock' (not 'localflock'); on NFS do not mount with 'nolock'/'local_lock'."
            )

    @property
    def run_dir_name(self) -> str:
        """Directory of this run (and attempt) under the rendezvous root."""
        if self.attempt is None:
            return self.run_id
        return f"{self.run_id}.attempt-{self.attempt}"

    @classmethod
    def from_config(
        cls, run_id: str, min_nodes: int, max_nodes: int, config: Mapping[str, Any]
    ) -> Settings:
        """Build settings from ``--rdzv-conf`` style ``key -> value`` pairs (values may be str).

        Unknown keys are an error: a misspelt ``hearbeat_timeout`` silently ignored would cost
        hours of debugging on a cluster.
        """
        values: dict[str, Any] = {}
        config = dict(config)
        # torch's own DynamicRendezvousHandler spells the heartbeat differently; accept it so
        # that a command line written for --rdzv-backend=c10d keeps its meaning.
        interval = config.pop("keep_alive_interval", None)
        attempts = config.pop("keep_alive_max_attempt", None)
        if interval is not None:
            values["heartbeat_interval"] = interval
        if attempts is not None:
            base = _seconds("heartbeat_interval", values.get("heartbeat_interval", 5.0))
            values.setdefault("heartbeat_interval", base)
            values["heartbeat_timeout"] = base * int(attempts)
        for key, value in config.items():
            if key in IGNORED_KEYS:
                continue
            if key not in DEFAULTS:
                known = ", ".join(sorted(DEFAULTS))
                raise SharedFSConfigError(
                    f"Unknown rendezvous setting {key!r} for the sharedfs backend. Known "
                    f"settings: {known}. Check the spelling in --rdzv-conf."
                )
            values[key] = value
        for key in ("attempt", "run_key"):
            if values.get(key) is not None:
                values[key] = str(values[key])
        return cls(run_id=run_id, min_nodes=min_nodes, max_nodes=max_nodes, **values)
