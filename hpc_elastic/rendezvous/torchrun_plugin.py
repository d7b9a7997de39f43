"""torchrun entry point: ``--rdzv-backend=sharedfs --rdzv-endpoint=/shared/dir``.

``pyproject.toml`` registers :func:`sharedfs_handler_creator` in the ``torchrun.handlers``
entry-point group. torch calls it with no arguments and registers what it returns as the
creator ``f(RendezvousParameters) -> RendezvousHandler`` for the name ``sharedfs``.

torch loads entry points while ``torch.distributed.elastic.rendezvous`` itself is being imported
(possibly triggered by importing this very package), so this module imports nothing at the top
level and defers everything to the moment a handler is actually created.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import socket
import sys
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch.distributed.elastic.rendezvous.api import RendezvousHandler, RendezvousParameters

BACKEND_NAME = "sharedfs"


def create_from_parameters(params: RendezvousParameters) -> RendezvousHandler:
    """Build the handler from torchrun's parameters (``--rdzv-conf`` keys in ``params.config``)."""
    from .errors import SharedFSConfigError
    from .handler import SharedFSRendezvousHandler
    from .settings import Settings

    if params.backend != BACKEND_NAME:
        raise SharedFSConfigError(
            f"create_from_parameters builds the {BACKEND_NAME!r} backend, not {params.backend!r}."
        )
    endpoint = (params.endpoint or "").strip()
    if not endpoint or not os.path.isabs(endpoint):
        raise SharedFSConfigError(
            f"--rdzv-endpoint={endpoint!r} is not usable by the sharedfs backend: it must be the "
            "absolute path of a directory on a filesystem every node mounts at the same path "
            "(e.g. --rdzv-endpoint=/shared/project/rdzv), not a host:port."
        )
    config = dict(params.config)
    if config.get("run_key") is None:
        config["run_key"] = default_run_key(params.min_nodes, params.max_nodes)
    settings = Settings.from_config(params.run_id, params.min_nodes, params.max_nodes, config)
    handler = SharedFSRendezvousHandler(endpoint, settings, local_addr=params.local_addr)
    # Hang detection for workers run as `torchrun ... -m hpc_elastic.worker SCRIPT`: torchrun's
    # agent is torch's, so the watch hangs off this handler (agent/torchrun_hangs.py).
    from hpc_elastic.agent import torchrun_hangs

    try:
        torchrun_hangs.install(handler)
    except ValueError as err:
        raise SharedFSConfigError(str(err)) from None
    return handler


#: What every node of one run shares when a launcher started them: set by the user's launch script
#: (one value per run, e.g. ``uuidgen``), or the job id of the batch system that runs them.
RUN_KEY_ENV = "HPC_ELASTIC_RUN_KEY"
_SCHEDULER_JOB_ENVS = (("slurm", "SLURM_JOB_ID"), ("pbs", "PBS_JOBID"), ("lsf", "LSB_JOBID"),
                       ("flux", "FLUX_JOB_ID"))


def default_run_key(min_nodes: int, max_nodes: int) -> str | None:
    """What tells this torchrun's run apart from an unrelated one that uses the same --rdzv-id.

    In order: ``$HPC_ELASTIC_RUN_KEY`` (a launch script sets one value on every node of a run);
    the batch system's job id (Slurm, PBS, LSF, Flux: every node of one torchrun job runs in
    the same batch job). Otherwise:

    * ``--nnodes=1`` (no other node ever belongs to the run): a key of this launch alone, so
      a second run with the same id and command line is refused while this one lives;
    * several nodes: a digest of what every node of one run has in common on its command line --
      ``--nnodes``, ``--nproc-per-node`` and the training command with its arguments (not
      ``--node-rank`` or ``--local-addr``, which differ per node). Such a key cannot tell two
      runs with identical commands apart; the handler refuses a node that a run already
      training with all its nodes alive does not need (``SharedFSRendezvousHandler``).

    ``None`` when this process is not torchrun: no check, as before. ``--rdzv-conf run_key=``
    overrides all of this.
    """
    given = os.environ.get(RUN_KEY_ENV, "")
    if given:
        return _as_key("env", given)
    for scheduler, name in _SCHEDULER_JOB_ENVS:
        job = os.environ.get(name, "")
        if scheduler == "slurm" and re.fullmatch(r"[0-9]{1,20}", job):
            return f"slurm-{job}"  # as before: readable in the state and in messages
        if job and scheduler != "slurm":
            return _as_key(scheduler, job)
    if os.path.basename(sys.argv[0]) not in ("torchrun", "run.py"):
        return None
    if max_nodes == 1:
        launch = [socket.gethostname(), os.getpid(), time.time_ns(), secrets.token_hex(8)]
        return _as_key("solo", json.dumps(launch))
    try:
        from torch.distributed.run import parse_args

        args = parse_args(sys.argv[1:])
    except (Exception, SystemExit):
        return None
    from .settings import COMMAND_KEY_PREFIX

    what = [min_nodes, max_nodes, str(args.nproc_per_node), bool(args.module),
            bool(args.no_python), args.training_script, list(args.training_script_args)]
    return _as_key(COMMAND_KEY_PREFIX.rstrip("-"), json.dumps(what))


def _as_key(kind: str, value: str) -> str:
    """``kind-<digest>``: any text becomes a valid key of fixed length."""
    return f"{kind}-{hashlib.sha256(value.encode()).hexdigest()[:16]}"


def sharedfs_handler_creator():
    """Entry point: return the creator torch registers under the backend name ``sharedfs``."""
    return create_from_parameters
