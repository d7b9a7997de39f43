"""The one place that knows the job directory's layout.

Every other module asks a :class:`JobDir` for paths instead of joining strings itself, so the
layout can change in one place and the analysis commands read exactly what the agents wrote.

Layout (``<root>`` is ``job_root`` from the config, one directory per submitted job)::

    <root>/<name>-<stamp>/
        job.yaml                 the resolved config (overrides applied), read by every agent
        submission.json          how and when the job was submitted (mode, Slurm job ids)
        local-agents.json        local mode: the agents' PIDs, start times and command lines
        sbatch.sh                the exact batch script that was submitted (Slurm mode)
        members/<job id>.json    every Slurm job that takes part in the run (the first one,
                                 ``grow`` jobs, array jobs), one file each, written by whoever
                                 submitted it; ``members/<stamp>.sbatch`` their scripts
        slurm/                   Slurm's own stdout/stderr: the batch step's, and each node's
                                 agent step (``<job>_<node>[_s<gen>][_r<launch>]_log.out``)
        batch/<job>.attempt-<a>.jsonl
                                 one writer: that job attempt's batch supervisor (the agents'
                                 steps it started, how each ended, relaunches, exclusions)
        excluded/<node>.json     nodes that failed and are not used again by this run, each
                                 created once (O_EXCL) by the supervisor that excluded it
        rendezvous/              the shared-filesystem rendezvous root (unless configured elsewhere)
            current.json         the run's current rendezvous (attempt, step): written by the
                                 first job's batch step, read by member jobs joining the run
        checkpoints/             where the example (and the templates) keep checkpoints
        nodes/<node>/
            events.jsonl         one writer: that node's agent
            metrics.jsonl        one writer: that node's agent
            agent.log            local mode: torch's log lines of that node's agent
            workers/attempt-<a>/restart-<n>/rank-<r>/{stdout.log,stderr.log,error.json}

Per-node files have exactly one writer (the node's agent), because ``O_APPEND`` is not atomic
across NFS clients.

Safe creation (docs/security.md): the job root is shared with other users of the filesystem, so
everything under a job directory is created here, by :func:`make_dir`, :func:`write_atomic` and
:func:`open_append`, with explicit modes that do not depend on the umask -- 0700/0600, or
0750/0640 with ``share_with_group`` -- and without following a symbolic link someone else put at
the name. Files that torch and the workers create themselves (worker logs, ``error.json``) get
the same modes through the umask the agent sets (:func:`umask_for`).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

from hpc_elastic.config import ConfigError

JOB_CONFIG = "job.yaml"
SUBMISSION = "submission.json"
SBATCH_SCRIPT = "sbatch.sh"
LOCAL_AGENTS = "local-agents.json"
EVENTS = "events.jsonl"
METRICS = "metrics.jsonl"
AGENT_LOG = "agent.log"

_SAFE_NAME = re.compile(r"^[A-Za-z0-9._-]+$")


def _check_name(name: str, what: str = "node name") -> str:
    """Node names and job ids become file names: refuse anything that could escape the
    directory they are meant for."""
    if not _SAFE_NAME.match(name) or name in {".", ".."}:
        raise ValueError(
            f"{what} {name!r} cannot be used as a file name; "
            "use letters, digits, '.', '_' or '-'"
        )
    return name


class JobDirError(ConfigError):
    """A job directory (or the job root) that cannot be created, written or trusted: one
    paragraph naming the path and the fix, exit 2, like a bad job file."""


#: Modes (directory, file): private by default; ``share_with_group`` lets the job directory's
#: group read (setgid, so every file made later, on any node, keeps that group).
PRIVATE_MODES = (0o700, 0o600)
GROUP_MODES = (0o2750, 0o640)
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


def modes_for(share_with_group: bool) -> tuple[int, int]:
    return GROUP_MODES if share_with_group else PRIVATE_MODES


def umask_for(share_with_group: bool) -> int:
    """The umask for processes that create job files themselves (the agent, its workers)."""
    return 0o027 if share_with_group else 0o077


def _shared(directory: Path) -> bool:
    """Whether files made in ``directory`` are for its group too (it grants the group read)."""
    try:
        return bool(os.stat(directory).st_mode & stat.S_IRGRP)
    except OSError:
        return False


def file_mode_in(directory: Path) -> int:
    """The mode for a new file in ``directory`` of a job directory: 0600, or 0640 where the
    job is shared with its group (for callers that open files themselves, with ``O_EXCL``)."""
    return modes_for(_shared(directory))[1]


def make_dir(path: Path, *, share_with_group: bool | None = None, exist_ok: bool = True) -> Path:
    """Create ``path`` and its missing parents with the job directory's mode, whatever the
    umask. ``share_with_group`` None: like the nearest existing parent (group-readable or not).

    An existing ``path`` must be a real directory (not a symbolic link) owned by this user: a
    directory another user created at a predictable name (``<name>-slurm<id>``) is refused.
    """
    path = Path(path)
    missing: list[Path] = []
    probe = path
    while not os.path.lexists(probe) and probe != probe.parent:
        missing.append(probe)
        probe = probe.parent
    if share_with_group is None:
        share_with_group = _shared(probe)
    dir_mode = modes_for(share_with_group)[0]
    try:
        for directory in reversed(missing):
            try:
                os.mkdir(directory, 0o700)
            except FileExistsError:
                if directory is path and not exist_ok:
                    raise
                continue  # made by a peer (another node's agent) at the same moment
            os.chmod(directory, dir_mode)
        if not missing and not exist_ok:
            raise FileExistsError(f"{path} exists")
    except FileExistsError:
        raise JobDirError(f"{path}: already exists. Fix: choose another job name or job root."
                          ) from None
    except OSError as err:
        raise JobDirError(
            f"{path}: cannot create this directory ({err.strerror}). Fix: make its parent "
            f"{path.parent} writable for you, or set 'job_root' in the job file (or --set "
            "job_root=DIR) to a directory you can write."
        ) from None
    _check_own_dir(path)
    return path


def _check_own_dir(path: Path) -> None:
    try:
        info = os.lstat(path)
    except OSError as err:
        raise JobDirError(f"{path}: cannot be read ({err.strerror}).") from None
    if not stat.S_ISDIR(info.st_mode):
        raise JobDirError(
            f"{path}: is not a directory (a symbolic link or a file is at its name). Nobody "
            "but you should create anything in a job directory. Fix: remove it, or use another "
            "job root.")
    if info.st_uid != os.geteuid() or info.st_mode & stat.S_IWOTH:
        raise JobDirError(
            f"{path}: belongs to another user (uid {info.st_uid}) or anybody may write it "
            f"(mode {stat.S_IMODE(info.st_mode):o}), so its files cannot be trusted. Fix: use "
            "a job root only you can write (docs/security.md).")


def write_atomic(path: Path, text: str) -> None:
    """Write-then-rename (same directory), so readers on other nodes never see half a file.

    The temporary name is new (``O_EXCL``) and never followed if it is a link (``O_NOFOLLOW``);
    the mode is the directory's (0600, or 0640 in a group-shared job directory)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}-{secrets.token_hex(4)}")
    mode = modes_for(_shared(path.parent))[1]
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, mode)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            fd = -1
            out.write(text)
        os.replace(tmp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        tmp.unlink(missing_ok=True)
        raise


def open_append(path: Path) -> int:
    """An ``O_APPEND`` descriptor for a log file of the job directory, creating it (and its
    directories) with the job directory's modes; never follows a link at the name."""
    path = Path(path)
    make_dir(path.parent)
    mode = modes_for(_shared(path.parent))[1]
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | _NOFOLLOW, mode)
    try:
        info = os.fstat(fd)
        if info.st_uid == os.geteuid() and stat.S_IMODE(info.st_mode) != mode:
            os.fchmod(fd, mode)
    except OSError:
        os.close(fd)
        raise
    return fd


@dataclass(frozen=True)
class JobDir:
    """Paths inside one job directory. Creating the object touches nothing on disk."""

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    @property
    def config(self) -> Path:
        return self.path / JOB_CONFIG

    @property
    def submission(self) -> Path:
        return self.path / SUBMISSION

    @property
    def sbatch_script(self) -> Path:
        return self.path / SBATCH_SCRIPT

    @property
    def local_agents(self) -> Path:
        """Local mode: the agents the launcher started (PID, start time, command line)."""
        return self.path / LOCAL_AGENTS

    @property
    def slurm_logs(self) -> Path:
        return self.path / "slurm"

    @property
    def rendezvous(self) -> Path:
        return self.path / "rendezvous"

    @property
    def run_pointer(self) -> Path:
        return self.rendezvous / "current.json"

    @property
    def members(self) -> Path:
        return self.path / "members"

    def member(self, job_id: str) -> Path:
        return self.members / f"{_check_name(job_id, 'job id')}.json"

    @property
    def supervisor(self) -> Path:
        return self.path / "batch"

    def supervisor_events(self, job_id: str, attempt: int) -> Path:
        """The events of one job attempt's batch supervisor (hpc_elastic/batch.py)."""
        return self.supervisor / f"{_check_name(job_id, 'job id')}.attempt-{int(attempt)}.jsonl"

    @property
    def excluded(self) -> Path:
        return self.path / "excluded"

    def excluded_node(self, node: str) -> Path:
        return self.excluded / f"{_check_name(node)}.json"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def nodes(self) -> Path:
        return self.path / "nodes"

    def node(self, node: str) -> Path:
        return self.nodes / _check_name(node)

    def events(self, node: str) -> Path:
        return self.node(node) / EVENTS

    def metrics(self, node: str) -> Path:
        return self.node(node) / METRICS

    def agent_log(self, node: str) -> Path:
        """Local mode: torch's own log lines of the node's agent (hpc_elastic/agent/console.py);
        on a cluster they are in the node's Slurm log."""
        return self.node(node) / AGENT_LOG

    def worker_logs(self, node: str, attempt: int, restart: int, rank: int) -> Path:
        """One worker's files: ``attempt`` counts Slurm requeues, ``restart`` the starts of this
        node's worker group within the attempt (0 first), ``rank`` the worker's global rank."""
        return (self.node(node) / "workers" / f"attempt-{attempt}" / f"restart-{restart}"
                / f"rank-{rank}")

    def node_names(self) -> list[str]:
        """Nodes that wrote anything, sorted; empty when the job never started."""
        if not self.nodes.is_dir():
            return []
        return sorted(p.name for p in self.nodes.iterdir() if p.is_dir())


FALLBACK_BASE = "hpc_elastic-logs-{uid}"


def fallback_dir_path(jobdir: JobDir, uid: int | None = None) -> Path:
    """Where an agent puts what its job directory cannot take (worker logs, the final event),
    on its own node: ``$TMPDIR/hpc_elastic-logs-<uid>/<job directory's name>``. Only the path:
    the agent creates it (``agent/worker_logs.py``), readers look whether it is there."""
    base = FALLBACK_BASE.format(uid=os.getuid() if uid is None else uid)
    return Path(tempfile.gettempdir()) / base / jobdir.path.name


def fallback_events(jobdir: JobDir, node: str) -> Path:
    """A node's final events that its job directory could not take (see ``agent/ending.py``)."""
    return fallback_dir_path(jobdir) / "nodes" / _check_name(node) / EVENTS


def readable_fallback(jobdir: JobDir) -> Path | None:
    """This user's fallback directory of the job on *this* machine, when it exists and can be
    trusted (the per-user base is a real directory of ours that nobody else may write), else
    None. On the node that ran an agent (and in local mode) it holds what the job directory
    could not take; elsewhere it is absent."""
    folder = fallback_dir_path(jobdir)
    try:
        info = os.lstat(folder.parent)
    except OSError:
        return None
    if (not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid()
            or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)):
        return None
    return folder if folder.is_dir() and not folder.is_symlink() else None


def fallback_node_names(jobdir: JobDir) -> list[str]:
    """Nodes with files in this machine's fallback directory of the job (see above)."""
    folder = readable_fallback(jobdir)
    if folder is None or not (folder / "nodes").is_dir():
        return []
    return sorted(p.name for p in (folder / "nodes").iterdir()
                  if p.is_dir() and not p.is_symlink() and _SAFE_NAME.match(p.name))


def is_jobdir(path: Path) -> bool:
    """A job directory is one that holds the resolved config ``submit`` writes first."""
    return (path / JOB_CONFIG).is_file()


def jobdirs_under(root: Path) -> list[JobDir]:
    """Every job directory directly under ``root``, newest first (by the name's time stamp,
    never by mtime, which shared filesystems do not keep reliably)."""
    if not root.is_dir():
        return []
    found = [JobDir(p) for p in root.iterdir() if p.is_dir() and is_jobdir(p)]
    return sorted(found, key=lambda jd: _stamp_of(jd.path.name), reverse=True)


def _stamp_of(name: str) -> str:
    """``demo-20261124-052812-2aa7`` -> ``20261124-052812`` (names without a stamp sort last)."""
    match = re.search(r"(\d{8}-\d{6})-[0-9a-f]{4}$", name)
    return match.group(1) if match else ""


def find_jobdir(spec: str, roots: list[Path]) -> JobDir | None:
    """Resolve a JOB argument: a job directory path, else a job id (or directory name) found in
    the ``submission.json`` of a job directory under one of ``roots``."""
    path = Path(spec)
    if path.is_dir():
        return JobDir(path)
    for root in roots:
        for jobdir in jobdirs_under(root):
            if jobdir.path.name == spec:
                return jobdir
            try:
                data = json.loads(jobdir.submission.read_text())
            except (OSError, ValueError):
                continue
            if str(data.get("job_id", "")) == spec:
                return jobdir
    return None
