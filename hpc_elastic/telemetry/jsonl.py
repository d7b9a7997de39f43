"""The one JSON-lines writer and the tolerant reader.

Why a custom writer instead of ``logging.FileHandler``: a telemetry file must survive the agent
being SIGKILLed at any instant and must never take training down with it.

* Each record is encoded first and then handed to the kernel in a single ``os.write`` on an
  ``O_APPEND`` descriptor, so a crash leaves at most one partial *last* line and never interleaves
  two records. There is no user-space buffer to lose and nothing to flush.
* No ``fsync`` per line (it would cost milliseconds on a network filesystem); one at ``close()``.
* Any ``OSError`` (full disk, unwritable or vanished directory, file removed under us) prints ONE
  warning per directory on stderr and turns the writer into a cheap no-op for the rest of the run.
* The writer belongs to the process that created it: after a ``fork`` the child's calls are
  no-ops, which keeps the job directory's rule of exactly one writer per file.

This module must not import torch: the analysis commands and the worker helper import it.
"""

from __future__ import annotations

import contextlib
import json
import json.encoder
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["JsonlWriter", "ReadStats", "encode_line", "read_jsonl", "warn_once"]

# How often (seconds) a writer checks that its file still has a name on disk. Cheap (one fstat),
# but not worth doing on every line.
_LINK_CHECK_INTERVAL_S = 5.0

_warned: set[str] = set()
_warned_lock = threading.Lock()

# Incremented in the child after every fork. An object remembers the generation it was created in
# and goes quiet in a forked child: one writer per file, at the cost of one global read per call
# (cheaper than os.getpid(), a system call, on the per-tick metric path).
FORK_GENERATION = 0


def _after_fork_in_child() -> None:
    global FORK_GENERATION
    FORK_GENERATION += 1


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def warn_once(key: str, message: str) -> None:
    """Print ``message`` on stderr the first time ``key`` is seen in this process.

    Written straight to ``sys.stderr`` on purpose: ``warnings.warn`` can be turned into an
    exception by ``-W error`` and ``logging`` may be configured to drop it, and a telemetry
    problem must neither crash the run nor go unseen.
    """
    with _warned_lock:
        if key in _warned:
            return
        _warned.add(key)
    try:
        sys.stderr.write(f"hpc_elastic telemetry: WARNING: {message}\n")
        sys.stderr.flush()
    except Exception:  # noqa: BLE001 - stderr itself may be gone; nothing left to tell
        pass


def _finite(obj: Any) -> Any:
    """Replace NaN/Infinity (not valid JSON, jq refuses them) by the strings Python uses."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return "NaN" if math.isnan(obj) else ("Infinity" if obj > 0 else "-Infinity")
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


# One encoder for every line: json.dumps() with options builds a new encoder per call, which
# costs more than encoding a short line.
_ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=False, default=str)


def _c_encoder() -> Callable[[dict[str, Any]], str]:
    """``_ENCODER.encode`` without its per-call set-up, where json's C encoder exists.

    ``JSONEncoder.encode`` builds a C encoder object, a circular-reference dict and a closure
    on every call, then runs it; building the C encoder once, with the same options, gives the
    same text for less (a metric aggregate line: 3.3 -> 2.8 µs warm; the metric drain runs cold,
    once per drain period (120 s), where fewer Python frames matter more). No circular-reference
    check: a self-containing value raises RecursionError instead of ValueError, and the writer
    drops the record with its one warning either way.
    """
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:
        return _ENCODER.encode
    encoder = make(None, _ENCODER.default, json.encoder.encode_basestring_ascii, None, ":", ",",
                   False, False, False)

    def encode(record: dict[str, Any]) -> str:
        return "".join(encoder(record, 0))

    return encode


_encode = _c_encoder()


def encode_line(record: dict[str, Any]) -> bytes:
    """One record as one compact UTF-8 line ending in ``\\n``; unknown objects become ``str``."""
    try:
        text = _encode(record)
    except ValueError:  # a non-finite float somewhere: rare, so pay for the walk only then
        text = _ENCODER.encode(_finite(record))
    return (text + "\n").encode("utf-8", "backslashreplace")


class JsonlWriter:
    """Appends whole lines to one file; thread-safe, fork-aware, never raises.

    The file (and its parent directories) are created on the first write, so constructing a
    writer touches nothing on disk. ``write`` returns ``False`` once the writer is disabled.
    """

    def __init__(self, path: str | os.PathLike[str], *, fsync_on_close: bool = True) -> None:
        self.path = Path(path)
        self._fsync_on_close = fsync_on_close
        self._gen = FORK_GENERATION
        # Re-entrant: the agent may record an event from a signal handler that interrupted a
        # write in the same thread; a plain Lock would deadlock there.
        self._lock = threading.RLock()
        self._fd: int | None = None
        self._disabled = False
        self._next_link_check = 0.0
        # A write cut short (a full disk) left the file ending mid-line: the next write after
        # retry() starts with a newline, or its record would be glued to the broken one.
        self._cut_line = False
        self.lines_written = 0

    @property
    def disabled(self) -> bool:
        """True once an error turned the writer off, or in a forked child."""
        return self._disabled or self._gen != FORK_GENERATION

    def write(self, record: dict[str, Any]) -> bool:
        """Encode and append ``record``; ``False`` if the writer is disabled or not ours."""
        if self._disabled or self._gen != FORK_GENERATION:
            return False
        try:
            data = encode_line(record)
        except Exception as exc:  # noqa: BLE001 - a bad value must not stop training
            warn_once(f"encode:{self.path}", f"could not encode a record for {self.path}: {exc!r}")
            return False
        return self.write_bytes(data)

    def write_many(self, records: list[dict[str, Any]]) -> bool:
        """Append several records with ONE ``os.write`` (whole lines; a crash can cut only the
        last one). Used by batch producers to pay one system call per batch."""
        if self._disabled or self._gen != FORK_GENERATION or not records:
            return False
        chunks = []
        for record in records:
            try:
                chunks.append(encode_line(record))
            except Exception as exc:  # noqa: BLE001
                warn_once(f"encode:{self.path}", f"could not encode a record: {exc!r}")
        return bool(chunks) and self.write_bytes(b"".join(chunks), lines=len(chunks))

    def write_bytes(self, data: bytes, *, lines: int = 1) -> bool:
        """Append already-encoded whole lines (ending in ``\\n``) with a single ``os.write``."""
        if self._disabled or self._gen != FORK_GENERATION:
            return False
        with self._lock:
            if self._disabled:
                return False
            if self._cut_line:
                data = b"\n" + data
            written = 0
            try:
                fd = self._fd if self._fd is not None else self._open()
                now = time.monotonic()
                if now >= self._next_link_check:
                    self._next_link_check = now + _LINK_CHECK_INTERVAL_S
                    if os.fstat(fd).st_nlink == 0:
                        raise FileNotFoundError(f"{self.path} was removed while being written")
                written = os.write(fd, data)
                if written != len(data):
                    # Only on a filling disk or similar: finish the line once, else give up.
                    written += os.write(fd, data[written:])
                    if written != len(data):
                        raise OSError(f"short write to {self.path}: {written} of {len(data)}")
            except OSError as exc:
                self._cut_line = 0 < written < len(data) or (self._cut_line and written == 0)
                self._disable(exc)
                return False
            self._cut_line = False
            self.lines_written += lines
            return True

    def retry(self) -> None:
        """Turn a writer that an error disabled on again (the next write reopens the file):
        for the agent's final event, after room was made on a full filesystem."""
        with self._lock:
            self._disabled = False

    def _open(self) -> int:
        # The job directory's modes, no symbolic links followed (hpc_elastic/jobdir.py).
        from hpc_elastic.jobdir import JobDirError, open_append

        try:
            self._fd = open_append(self.path)
        except JobDirError as err:  # its directory cannot be made: like any I/O error here
            raise OSError(str(err)) from None
        return self._fd

    def _disable(self, exc: BaseException) -> None:
        self._disabled = True
        self._close_fd(fsync=False)
        warn_once(
            f"dir:{self.path.parent}",
            f"cannot write {self.path} ({exc}); telemetry to {self.path.parent} is off for the "
            "rest of this run, training goes on",
        )

    def _close_fd(self, *, fsync: bool) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        with contextlib.suppress(OSError):
            if fsync:
                os.fsync(fd)
        with contextlib.suppress(OSError):
            os.close(fd)

    def close(self) -> None:
        """Sync once and close; later writes reopen the file (appending)."""
        if self._gen != FORK_GENERATION:
            return
        with self._lock:
            self._close_fd(fsync=self._fsync_on_close)


#: The longest line :func:`read_jsonl` reads. Our lines are a few hundred bytes (an event with a
#: worker's error message is a few KiB); a longer line is garbage or hostile, and reading it
#: whole would take as much memory as the line is long.
MAX_LINE_BYTES = 1 << 20


@dataclass
class ReadStats:
    """What :func:`read_jsonl` skipped, so callers can report it instead of failing."""

    records: int = 0
    skipped: int = 0
    truncated_tail: bool = False
    bad_lines: list[int] = field(default_factory=list)  # 1-based line numbers, first 100
    long_lines: int = 0  # of the skipped: longer than MAX_LINE_BYTES, never read whole

    def _skip(self, lineno: int) -> None:
        self.skipped += 1
        if len(self.bad_lines) < 100:
            self.bad_lines.append(lineno)


def read_jsonl(
    path: str | os.PathLike[str],
    stats: ReadStats | None = None,
    *,
    missing_ok: bool = False,
    max_line: int = MAX_LINE_BYTES,
) -> Iterator[dict[str, Any]]:
    """Stream the JSON objects of a JSON-lines file, skipping what cannot be parsed.

    Skipped (and counted in ``stats``): garbage lines, lines that are not JSON objects, and a last
    line without its newline that does not parse (a writer killed mid-write; a strict prefix of a
    JSON object is never valid JSON, so a complete object whose newline is missing is kept).
    Leading NUL bytes, which some filesystems leave after a crash, are ignored. A line longer
    than ``max_line`` bytes is skipped (counted in ``stats.long_lines``) without being held in
    memory: it is read past in small pieces.
    """
    st = stats if stats is not None else ReadStats()
    try:
        fh = open(path, "rb")  # noqa: SIM115 - closed in finally, generator may stop early
    except FileNotFoundError:
        if missing_ok:
            return
        raise
    try:
        lineno = 0
        while raw := fh.readline(max_line + 1):
            lineno += 1
            complete = raw.endswith(b"\n")
            if len(raw) > max_line and not complete:
                while (piece := fh.readline(1 << 16)) and not piece.endswith(b"\n"):
                    pass  # the rest of an over-long line, dropped piece by piece
                st._skip(lineno)
                st.long_lines += 1
                continue
            line = raw.strip(b"\x00 \t\r\n")
            if not line:
                continue
            try:
                obj = json.loads(line)
            except ValueError:
                obj = None
            if not isinstance(obj, dict):
                st._skip(lineno)
                if not complete:
                    st.truncated_tail = True
                continue
            st.records += 1
            yield obj
    finally:
        fh.close()
