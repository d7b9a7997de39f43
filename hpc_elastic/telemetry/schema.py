"""Names shared by every telemetry file: schema version, context fields, worker env vars.

Kept apart from the writers so the worker helper and the analysis code can import them without
torch. docs/logs.md is the human-readable version of this module; change both together.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Bumped only for incompatible changes (a field renamed, removed or its meaning changed). Adding a
# field or a new event kind keeps the version: readers must ignore fields they do not know.
SCHEMA_VERSION = 1

# Environment variables the agent puts into every worker's environment (see Telemetry.worker_env).
ENV_WORKER_METRICS = "HPC_ELASTIC_WORKER_METRICS"  # path template of the rank's metrics file
# The worker's own directory, set per worker by the agent's LogsSpecs (hpc_elastic.agent); when
# present it wins over the template: the helper writes <dir>/metrics.jsonl next to stdout.log.
ENV_WORKER_DIR = "HPC_ELASTIC_WORKER_DIR"
ENV_JOB_ID = "HPC_ELASTIC_JOB_ID"
ENV_ATTEMPT = "HPC_ELASTIC_ATTEMPT"
ENV_NODE = "HPC_ELASTIC_NODE"

# Placeholders a worker substitutes in ENV_WORKER_METRICS, from the variables torch sets.
PLACEHOLDERS = {
    "{rank}": "RANK",
    "{local_rank}": "LOCAL_RANK",
    "{restart}": "TORCHELASTIC_RESTART_COUNT",
}

# Fields every line starts with; record() renames caller fields that collide (``x_<name>``).
RESERVED_FIELDS = frozenset({"v", "time", "job_id", "attempt", "node", "source", "kind"})


@dataclass(frozen=True)
class Context:
    """Who wrote a line: the same three values on every line of one agent process.

    ``attempt`` is the job attempt the agent runs for (0 for the first allocation, +1 per Slurm
    requeue) - not torch's worker-group restart count, which events carry as ``restart_count``.
    """

    job_id: str
    attempt: int
    node: str

    def head(self, when: float) -> dict[str, Any]:
        """The leading fields of a line (dicts keep insertion order, so lines read well)."""
        return {
            "v": SCHEMA_VERSION,
            "time": when,
            "job_id": self.job_id,
            "attempt": self.attempt,
            "node": self.node,
        }
