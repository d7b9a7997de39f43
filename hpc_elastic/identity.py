"""Who this agent is: job id, node name and index, Slurm attempt.

Inside Slurm the answer comes from Slurm's variables; in local mode the local launcher sets the
``HPC_ELASTIC_*`` equivalents, so the agent code path is the same in both.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass

from hpc_elastic.telemetry.schema import ENV_ATTEMPT, ENV_JOB_ID

# The local-mode equivalents of SLURM_JOB_ID, SLURMD_NODENAME, SLURM_NODEID, SLURM_RESTART_COUNT.
# Job id and attempt share their names with what workers see (telemetry's schema defines them).
LOCAL_JOB_ID = ENV_JOB_ID
LOCAL_NODE_NAME = "HPC_ELASTIC_NODE_NAME"
LOCAL_NODE_INDEX = "HPC_ELASTIC_NODE_INDEX"
LOCAL_ATTEMPT = ENV_ATTEMPT
LOCAL_NODE_ADDR = "HPC_ELASTIC_NODE_ADDR"
# The generation of the agents' rendezvous within one Slurm attempt, set by the batch supervisor
# (hpc_elastic/batch.py): it grows when every agent's step ended and the supervisor starts them
# all again, so that they do not join the rendezvous the dead ones abandoned mid-round.
STEP_ENV = "HPC_ELASTIC_STEP"
# How many times the supervisor started this node's agent step before in this generation (0 the
# first time): a relaunched agent is told apart from the one that ended before it.
LAUNCH_ENV = "HPC_ELASTIC_LAUNCH"
# A member job (``grow``, or a task of ``submit --array``) joins the rendezvous of another job:
# the run's id (the lead's job id, or the array's job id) and the run's current attempt. Set by
# the member's batch script and its batch supervisor (hpc_elastic/batch.py).
RUN_ID_ENV = "HPC_ELASTIC_RUN_ID"
RUN_ATTEMPT_ENV = "HPC_ELASTIC_RUN_ATTEMPT"
# How many agents the batch supervisor (or the local launcher) started together with this one:
# the rendezvous' first round completes once that many joined, without waiting for its last
# call (hpc_elastic/rendezvous/protocol.py, maybe_complete).
LAUNCHED_ENV = "HPC_ELASTIC_LAUNCHED_NODES"


@dataclass(frozen=True)
class NodeIdentity:
    job_id: str
    node: str
    node_index: int
    attempt: int
    address: str
    in_slurm: bool
    step: int = 0
    #: The run this agent trains in: its own job id, or the lead's (the array's) for a member.
    run_id: str = ""
    #: An agent of a ``grow`` job or of an array task: it joins a run that is not its own job,
    #: so it neither requeues nor relaunches that run (see hpc_elastic/members.py).
    is_member: bool = False
    #: 0 for the node's first agent in this generation, then 1, 2... for each relaunch.
    launch: int = 0
    #: Agents started together with this one (``None``: not known).
    launched_nodes: int | None = None

    @property
    def rendezvous_id(self) -> str:
        """The rendezvous run id: the run's id, plus ``-s<step>`` for a relaunched step, whose
        agents must not join the rendezvous the killed step abandoned mid-round."""
        run = self.run_id or self.job_id
        return run if self.step == 0 else f"{run}-s{self.step}"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> NodeIdentity:
        env = os.environ if env is None else env
        if "SLURM_JOB_ID" in env and LOCAL_NODE_NAME not in env:
            node = env.get("SLURMD_NODENAME") or socket.gethostname()
            return cls(
                job_id=env["SLURM_JOB_ID"],
                node=node,
                node_index=int(env.get("SLURM_NODEID", "0")),
                # A member trains in the run's attempt, whatever its own requeue count.
                attempt=int(env.get(RUN_ATTEMPT_ENV) or env.get("SLURM_RESTART_COUNT", "0")),
                address=env.get(LOCAL_NODE_ADDR) or _address_of(node),
                in_slurm=True,
                step=int(env.get(STEP_ENV, "0")),
                run_id=env.get(RUN_ID_ENV) or env["SLURM_JOB_ID"],
                is_member=bool(env.get(RUN_ID_ENV)),
                launch=int(env.get(LAUNCH_ENV, "0")),
                launched_nodes=_launched(env),
            )
        node = env.get(LOCAL_NODE_NAME) or socket.gethostname()
        return cls(
            job_id=env.get(LOCAL_JOB_ID, "local"),
            node=node,
            node_index=int(env.get(LOCAL_NODE_INDEX, "0")),
            attempt=int(env.get(LOCAL_ATTEMPT, "0")),
            address=env.get(LOCAL_NODE_ADDR) or "127.0.0.1",
            in_slurm=False,
            launched_nodes=_launched(env),
        )


def _launched(env: Mapping[str, str]) -> int | None:
    """``HPC_ELASTIC_LAUNCHED_NODES`` as a count; anything else is "not known" (set by our own
    launchers, so a bad value only costs the last call it would have saved)."""
    value = env.get(LAUNCHED_ENV, "")
    return int(value) if value.isdigit() and int(value) > 0 else None


def _address_of(node: str) -> str:
    """The address this node publishes for its workers' MASTER_ADDR.

    Resolved from the node's own name, as Slurm knows it (on clusters this is how nodes reach
    each other); ``HPC_ELASTIC_NODE_ADDR`` overrides it, e.g. to pick the InfiniBand address.
    """
    try:
        return socket.gethostbyname(node)
    except OSError:
        return socket.gethostbyname(socket.gethostname())
