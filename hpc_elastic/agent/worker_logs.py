"""Worker stdout/stderr and error files inside the job directory.

torch's ``DefaultLogsSpecs`` invents a temporary directory per run and deletes an attempt's
directory when the attempt number repeats, which loses logs across Slurm requeues. This spec
writes to ``<jobdir>/nodes/<node>/workers/attempt-<a>/restart-<n>/rank-<r>/`` (see ``JobDir``),
where ``a`` is the Slurm attempt, so nothing is ever overwritten, and it sets
``TORCHELASTIC_ERROR_FILE`` so a ``@record``-decorated worker leaves its traceback in
``error.json``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from torch.distributed.elastic.multiprocessing.api import LogsDest, LogsSpecs, Std

from hpc_elastic.identity import LOCAL_NODE_NAME
from hpc_elastic.jobdir import JobDir, JobDirError, fallback_dir_path, make_dir
from hpc_elastic.telemetry.schema import ENV_WORKER_DIR


class JobDirLogsSpecs(LogsSpecs):
    """Redirect every worker's stdout/stderr to files, and also tee them to the agent's console
    so ``srun``'s per-node log shows them as they happen.

    In local mode the console is the submitting terminal, shared by every simulated node: only
    stdout is teed there, because one failure's tracebacks (the root's and every peer's
    consequences) filled it; the submit command ends with the root cause instead, and the
    tracebacks are in each rank's ``stderr.log`` (``hpc-elastic logs failures``).
    """

    def __init__(self, jobdir: JobDir, node: str, attempt: int, tee: bool = True,
                 tee_stderr: bool | None = None) -> None:
        if tee_stderr is None:
            tee_stderr = LOCAL_NODE_NAME not in os.environ
        super().__init__(log_dir=str(jobdir.node(node) / "workers"), redirects=Std.ALL,
                         tee=(Std.ALL if tee_stderr else Std.OUT) if tee else Std.NONE)
        self._jobdir = jobdir
        self._node = node
        self._attempt = attempt
        # A relaunched agent (a new srun step after a node loss, see hpc_elastic/batch.py)
        # continues this node's count instead of overwriting the killed step's logs.
        attempt_dir = jobdir.worker_logs(node, attempt, 0, 0).parent.parent
        self._group_starts = (len(list(attempt_dir.glob("restart-*")))
                              if attempt_dir.is_dir() else 0)
        #: local rank -> folder of the group started last (the hang watch reads them).
        self.folders: dict[int, Path] = {}

    @property
    def root_log_dir(self) -> str:
        return str(self._root_log_dir)

    def reify(self, envs: dict[int, dict[str, str]]) -> LogsDest:
        """Called once per start of the worker group. ``restart-<n>`` counts those starts on
        this node: torch's TORCHELASTIC_RESTART_COUNT does not grow when the group restarts
        for a membership change, and reusing its number would overwrite the earlier logs."""
        restart = self._group_starts
        self._group_starts += 1
        dest = LogsDest()
        self.folders = {}
        for local_rank, env in envs.items():
            rank = int(env.get("RANK", str(local_rank)))
            folder = self._make_folder(
                self._jobdir.worker_logs(self._node, self._attempt, restart, rank))
            dest.stdouts[local_rank] = str(folder / "stdout.log")
            dest.stderrs[local_rank] = str(folder / "stderr.log")
            if self._tee in (Std.ALL, Std.OUT):
                dest.tee_stdouts[local_rank] = dest.stdouts[local_rank]
            if self._tee == Std.ALL:
                dest.tee_stderrs[local_rank] = dest.stderrs[local_rank]
            dest.error_files[local_rank] = str(folder / "error.json")
            env["TORCHELASTIC_ERROR_FILE"] = dest.error_files[local_rank]
            env[ENV_WORKER_DIR] = str(folder)  # worker metrics go next to its logs
            self.folders[local_rank] = folder
        return dest

    def _make_folder(self, folder: Path) -> Path:
        """Create a worker's folder; if the job directory is not writable (full disk, lost
        mount), fall back to a local temporary directory and say where, so training goes on
        and the logs still exist."""
        try:
            return make_dir(folder)
        except JobDirError as err:
            fallback = fallback_dir(self._jobdir) / folder.relative_to(self._jobdir.path)
            make_dir(fallback)  # a JobDirError here ends the agent with its reason
            print(f"hpc_elastic: warning: {err} Writing the worker logs to {fallback} instead",
                  file=sys.stderr, flush=True)
            return fallback


def fallback_dir(jobdir: JobDir) -> Path:
    """This user's own directory for logs the job directory cannot take, on the node's local
    disk: ``$TMPDIR/hpc_elastic-logs-<uid>/<job>``. Per user and checked (owned by this user,
    not a link, nobody else may write it), since ``/tmp`` is shared with everybody."""
    folder = fallback_dir_path(jobdir)
    make_dir(folder.parent, share_with_group=False)
    return folder
