"""A small per-user index of recent job directories, so a job id works from any directory.

Why: job directories live under each job file's ``job_root`` (the demo's is ``./demo-jobs``, a
cluster job's is on ``/scratch``), so "which directory holds job 12345?" has no answer from the
id alone. ``submit`` appends one line per job to ``$XDG_STATE_HOME/hpc_elastic/jobs.jsonl``
(``~/.local/state/...`` by default); every command that takes a JOB looks there first.

The index is a hint, never trusted: an entry counts only if its directory is still a job
directory whose ``submission.json`` names the same job id. It lives in the user's own home
(created ``0700``/``0600``, opened with ``O_NOFOLLOW``); a write that fails is reported by the
caller and loses nothing, since the job directory itself is the record.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from hpc_elastic.jobdir import JobDir, is_jobdir

INDEX_FILE = "jobs.jsonl"
#: Entries kept when the index is compacted (older ones drop out; their directories remain).
KEEP = 500
# Read at most this much from the end of the index: lookups stay fast however old it is.
_TAIL_BYTES = 256 * 1024


@dataclass(frozen=True)
class Entry:
    """One submitted job: its id, its directory (absolute) and when it was submitted."""

    job_id: str
    jobdir: Path
    submitted_at: float
    mode: str
    name: str


def index_path() -> Path:
    """``$XDG_STATE_HOME/hpc_elastic/jobs.jsonl``, else ``~/.local/state/hpc_elastic/...``."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "hpc_elastic" / INDEX_FILE


def record(entry: Entry) -> None:
    """Append ``entry``; compact to the newest :data:`KEEP` entries now and then.

    Raises OSError when the index cannot be written (read-only home, a link where the file
    should be); the caller says so and goes on.
    """
    path = index_path()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    line = json.dumps({"v": 1, "job_id": entry.job_id, "jobdir": str(entry.jobdir.resolve()),
                       "submitted_at": entry.submitted_at, "mode": entry.mode,
                       "name": entry.name}) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        info = os.fstat(fd)
        if info.st_uid != os.getuid() or not stat.S_ISREG(info.st_mode):
            raise OSError(f"{path} is not a regular file of yours; remove it")
        os.write(fd, line.encode())
        size = info.st_size + len(line)
    finally:
        os.close(fd)
    if size > 2 * _TAIL_BYTES:
        _compact(path)


def _compact(path: Path) -> None:
    """Rewrite the index with its newest entries (write-then-rename, so readers never see half)."""
    lines = _tail_lines(path)[-KEEP:]
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as out:
        out.writelines(line + "\n" for line in lines)
    os.replace(tmp, path)


def _tail_lines(path: Path) -> list[str]:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return []
    with os.fdopen(fd, "rb") as fh:
        fh.seek(0, os.SEEK_END)
        size = fh.tell()
        fh.seek(max(0, size - _TAIL_BYTES))
        data = fh.read()
    lines = data.decode("utf-8", errors="replace").splitlines()
    return lines[1:] if size > _TAIL_BYTES else lines  # the first may be cut


def entries() -> Iterator[Entry]:
    """Valid entries, newest first. A malformed line is skipped (the index is only a hint)."""
    for line in reversed(_tail_lines(index_path())):
        try:
            d = json.loads(line)
            yield Entry(str(d["job_id"]), Path(d["jobdir"]), float(d["submitted_at"]),
                        str(d.get("mode", "")), str(d.get("name", "")))
        except (ValueError, KeyError, TypeError):
            continue


def recent_jobdirs() -> list[JobDir]:
    """The indexed job directories that still exist, newest first, each once."""
    seen: set[Path] = set()
    out = []
    for entry in entries():
        if entry.jobdir not in seen and is_jobdir(entry.jobdir):
            seen.add(entry.jobdir)
            out.append(JobDir(entry.jobdir))
    return out


def lookup(spec: str) -> JobDir | None:
    """The newest indexed job whose id or directory name is ``spec`` and whose directory still
    says so itself (its ``submission.json``)."""
    for entry in entries():
        if spec not in (entry.job_id, entry.jobdir.name) or not is_jobdir(entry.jobdir):
            continue
        try:
            data = json.loads((entry.jobdir / "submission.json").read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and str(data.get("job_id")) == entry.job_id:
            return JobDir(entry.jobdir)
    return None
