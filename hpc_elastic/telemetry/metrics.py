"""File MetricHandler for ``torch.distributed.elastic.metrics``, with throttling.

Why throttle: torch's agent publishes several metrics on *every* monitor tick (default every
0.1 s): ``workers.<role>.remaining_restarts``, ``workers.<role>.healthy`` and the ``@prof``
metrics of ``LocalElasticAgent._monitor_workers`` (``.success``, ``.duration.ms``). Written raw
that is ~40 lines/s/node of near-constant values. Everything else torch emits (rendezvous,
start/stop/restart durations, run totals) is rare and worth a line each. The rule, per series
``(group, name)`` and per window of ``interval_s`` seconds (a window opens with a sample and
closes with the first sample ``interval_s`` or more later):

1. The first sample of a series is written as is.
2. A *level* (a name not ending in ``.duration.ms``) whose value differs from the last written
   value is written as is (after the series' pending aggregate), at most once per
   ``change_gap_s`` - so ``remaining_restarts`` going 3 -> 2 gets its own line and time.
3. Otherwise a sample is written as is while its series has written fewer than ``burst`` lines
   in the current window - except the per-tick series (``PER_TICK``), whose budget is 0.
4. Every other sample is folded into the series' pending aggregate, written as ONE line
   (``value`` = last value, ``count``, ``since`` and, for numbers, ``sum``/``min``/``max``) when
   the window closes, and on ``flush()``/``close()``. An aggregate of one sample is written as a
   plain line.

So a per-tick series costs one line per ``interval_s``, any series at most
``burst + 1 + interval_s/change_gap_s`` lines per window.

Why a queue and a thread: the agent is nearly idle (2-3 ms of CPU per second), and Python code
that runs once per 0.1 s tick runs cold - a handful of Python-level calls there cost tens of µs,
several percent of the agent. So ``emit`` is a list's ``__iadd__`` itself (a C call, about as cheap
as torch's own ``NullMetricHandler.emit``), and a daemon thread applies the rule to the queued
samples every ``drain_interval_s`` (30 s) in one batch, folding runs of per-tick samples with C
builtins. Lines keep the samples' own timestamps and reach the file up to ``drain_interval_s``
later; a SIGKILLed agent loses those queued samples and its open windows' aggregates (the events
file is written synchronously).
"""

from __future__ import annotations

import os
import re
import threading
import weakref
from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import groupby
from operator import itemgetter
from typing import Any

from torch.distributed.elastic.metrics import MetricData, MetricHandler

from .jsonl import JsonlWriter, warn_once
from .schema import Context

__all__ = ["FileMetricHandler"]

MEASUREMENT_SUFFIX = ".duration.ms"
# Series torch publishes on every monitor tick (torch 2.13 SimpleElasticAgent._invoke_run).
PER_TICK: tuple[re.Pattern[str], ...] = (
    re.compile(r"^workers\.[^.]+\.(remaining_restarts|healthy)$"),
    re.compile(r"(^|\.)_monitor_workers\.(success|failure|duration\.ms)$"),
)


def _is_per_tick(name: str) -> bool:
    return any(p.search(name) for p in PER_TICK)


_NUMBER_TYPES = frozenset({int, float})  # exact types: bool is not a number here


@dataclass(slots=True)
class _Series:
    """Throttling state of one (group, name) series, and its pending aggregate."""

    level: bool  # not a .duration.ms measurement: rule 2 applies
    budget: int  # plain lines allowed per window (rule 3)
    written_at: float
    written_value: Any
    window_start: float
    window_lines: int = 1
    count: int = 0
    since: float = 0.0
    last_time: float = 0.0
    last_value: Any = None
    numeric: bool = True
    total: float = 0.0
    low: Any = 0.0
    high: Any = 0.0


# The queue is a flat list of MetricData's fields, extended by ``list.__iadd__`` (see the class
# docstring); that needs MetricData to stay the 4-tuple it has been since torch 1.9.
_FIELDS = len(MetricData._fields)
_FLAT = _FIELDS == 4
_handlers: weakref.WeakSet[FileMetricHandler] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    """A forked child inherits the handler but not its drain thread: stop queueing there."""
    for h in list(_handlers):
        h.emit = h._discard  # type: ignore[method-assign]
        h._queue = []
        h._prev = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _drain_loop(
    ref: weakref.ref[FileMetricHandler], stop: threading.Event, interval_s: float
) -> None:
    while not stop.wait(interval_s):
        handler = ref()
        if handler is None:
            return
        handler._drain()
        del handler


class FileMetricHandler(MetricHandler):
    """Writes torch elastic metrics to one node's ``metrics.jsonl`` (see module doc for the rule).

    Install with ``torch.distributed.elastic.metrics.configure(handler)`` (no group: every group).
    ``emit`` is thread-safe and never raises or blocks. Call ``close()`` at the end (``flush()``
    to write everything queued and pending without closing).

    ``emit`` is the bound ``__iadd__`` of a list: ``queue += metric_data`` appends the sample's
    four fields in one C call, and the MetricData tuple itself is freed at once, as with torch's
    null handler - keeping ~40 tuples a second alive measurably cost the agent (cache misses,
    garbage-collector passes). The drain slices the flat list back into columns (``[0::4]`` ...).
    """

    def __init__(
        self,
        writer: JsonlWriter,
        context: Context,
        *,
        interval_s: float = 10.0,
        change_gap_s: float = 1.0,
        burst: int = 5,
        drain_interval_s: float = 30.0,
    ) -> None:
        self.writer = writer
        self.context = context
        self.interval_s = interval_s
        self.change_gap_s = change_gap_s
        self.burst = burst
        self.drain_interval_s = drain_interval_s
        self._series: dict[tuple[str, str], _Series] = {}
        self._lock = threading.RLock()  # the rule's state; taken by the drain thread and flush
        self._queue: list[Any] = []
        # The queue handed to the previous drain, and how long it was: a thread that fetched the
        # old ``emit`` just before the swap may still extend it (see _take).
        self._prev: list[Any] | None = None
        self._prev_n = 0
        self.drained = 0  # samples taken from the queue so far (for benchmarks and debugging)
        self._out: list[dict[str, Any]] = []  # lines of the current drain/flush: ONE os.write
        self._set_emit()
        self._stop = threading.Event()
        self._thread = threading.Thread(  # holds only a weak reference: no leak if never closed
            target=_drain_loop, args=(weakref.ref(self), self._stop, drain_interval_s),
            name="hpc-elastic-metrics", daemon=True,
        )
        self._thread.start()
        _handlers.add(self)

    def _set_emit(self) -> None:
        # mypy: the instance attribute shadows the method on purpose (a C call, see class doc)
        self.emit = self._queue.__iadd__ if _FLAT else self._emit_fields  # type: ignore

    def emit(self, metric_data: MetricData) -> None:  # replaced per instance, see _set_emit
        self._emit_fields(metric_data)

    def _emit_fields(self, metric_data: MetricData) -> None:
        self._queue += tuple(metric_data)[:4]

    def _discard(self, metric_data: MetricData) -> None:
        return None

    def _take(self) -> list[Any]:
        """Everything queued so far (flat), without a Python-level loop over the samples.

        The queue is swapped for a fresh one (``emit`` with it). A publisher that looked up the
        old ``emit`` just before the swap extends the old queue afterwards; those stragglers
        are picked up from it at the next drain. Caller holds the lock.
        """
        old = self._queue
        self._queue = []
        self._set_emit()
        stragglers = self._prev[self._prev_n:] if self._prev is not None else []
        n = len(old)  # a straggler lands after this length: read up to it only
        self._prev, self._prev_n = old, n
        return stragglers + old[:n] if stragglers else old

    def _drain(self) -> None:
        """Apply the rule to every queued sample (per series, in arrival order)."""
        if self.writer.disabled:  # broken file or forked child: stop queueing, drop what is there
            self.emit = self._discard  # type: ignore[method-assign]
            self._queue = []
            self._prev = None
            return
        try:
            with self._lock:
                flat = self._take()
                m = len(flat)  # may be the live old queue: stay below this length
                if m % 4:
                    m = 0  # somebody called emit() with something else: cannot realign
                    warn_once("metrics-queue", "metric queue misaligned; samples dropped")
                self.drained += m // 4
                if m:
                    self._apply_batch(flat[0:m:4], flat[1:m:4], flat[2:m:4], flat[3:m:4])
                self._commit()
        except Exception as exc:  # noqa: BLE001 - telemetry must never break the agent
            warn_once("metrics-handler", f"metric handler error (further ones hidden): {exc!r}")

    def _apply_batch(
        self, times: list[float], groups: list[str], names: list[str], values: list[Any]
    ) -> None:
        """Group the columns by series with C-level sort and gathers, then apply the rule."""
        n = len(names)
        if n == 1:
            self._apply(times[0], groups[0], names[0], values[0])
            return
        order = sorted(range(n), key=names.__getitem__)  # stable: arrival order per series
        gather = itemgetter(*order)
        times_s, groups_s, names_s, values_s = (
            gather(times), gather(groups), gather(names), gather(values))
        i = 0
        for name, same in groupby(names_s):
            j = i + len(list(same))
            run_groups = set(groups_s[i:j])
            if len(run_groups) == 1:
                self._apply_series((groups_s[i], name), times_s[i:j], values_s[i:j])
            else:  # one name in several groups: rare, split keeping the order
                for group in sorted(run_groups):
                    idx = [k for k in range(i, j) if groups_s[k] == group]
                    self._apply_series((group, name), [times_s[k] for k in idx],
                                       [values_s[k] for k in idx])
            i = j

    def _apply_series(
        self, key: tuple[str, str], times: Sequence[float], values: Sequence[Any]
    ) -> None:
        """Rule 4 for runs of samples with C builtins; anything else goes through ``_apply``.

        A run is folded in bulk while the series is out of plain-line budget, no sample in it
        closes the window and (for a level) every value equals the last written one; that is
        nearly every sample of the per-tick series, so the drain costs a fraction of a µs each.
        """
        group, name = key
        i, n = 0, len(values)
        while i < n:
            s = self._series.get(key)
            if s is not None and s.window_lines >= s.budget and s.numeric:
                j = bisect_left(times, s.window_start + self.interval_s, i)
                run = values[i:j]
                if (
                    run
                    and (not s.level or run.count(s.written_value) == len(run))
                    and set(map(type, run)) <= _NUMBER_TYPES
                ):
                    if s.count == 0:
                        s.since, s.total, s.low, s.high = times[i], 0, run[0], run[0]
                    s.count += len(run)
                    s.total += sum(run)
                    s.low = min(s.low, min(run))
                    s.high = max(s.high, max(run))
                    s.last_time, s.last_value = times[j - 1], run[-1]
                    i = j
                    continue
            self._apply(times[i], group, name, values[i])
            i += 1

    def _apply(self, when: float, group: str, name: str, value: Any) -> None:
        """The rule of the module docstring for one sample; caller holds the lock."""
        key = (group, name)
        s = self._series.get(key)
        if s is None:  # rule 1
            budget = 0 if _is_per_tick(name) else self.burst
            level = not name.endswith(MEASUREMENT_SUFFIX)
            self._series[key] = _Series(level, budget, when, value, when)
            self._write_plain(when, group, name, value)
            return
        if s.level and value != s.written_value and when - s.written_at >= self.change_gap_s:
            self._flush_series(key, s)  # rule 2
            self._plain(key, s, when, value)
            return
        closing = when - s.window_start >= self.interval_s
        if closing:
            s.window_start, s.window_lines = when, 0
            if not s.count:
                closing = False  # nothing pending: the sample opens the new window
        if not closing and s.window_lines < s.budget:  # rule 3
            self._plain(key, s, when, value)
            return
        # rule 4: fold
        if s.count == 0:
            s.since, s.numeric, s.total, s.low, s.high = when, True, 0, value, value
        s.count += 1
        s.last_time, s.last_value = when, value
        if s.numeric:
            if type(value) in _NUMBER_TYPES:
                s.total += value
                if value < s.low:
                    s.low = value
                elif value > s.high:
                    s.high = value
            else:
                s.numeric = False
        if closing:
            self._flush_series(key, s)

    def _plain(self, key: tuple[str, str], s: _Series, when: float, value: Any) -> None:
        self._write_plain(when, key[0], key[1], value)
        s.written_at, s.written_value = when, value
        s.window_lines += 1

    def _write_plain(self, when: float, group: str, name: str, value: Any) -> None:
        line = self.context.head(when)
        line["group"] = group
        line["name"] = name
        line["value"] = value
        self._out.append(line)

    def _flush_series(self, key: tuple[str, str], s: _Series) -> None:
        if s.count == 0:
            return
        if s.count == 1:
            self._write_plain(s.last_time, key[0], key[1], s.last_value)
        else:
            line = self.context.head(s.last_time)
            line["group"] = key[0]
            line["name"] = key[1]
            line["value"] = s.last_value
            line["count"] = s.count
            line["since"] = s.since
            if s.numeric:
                line["sum"] = s.total
                line["min"] = s.low
                line["max"] = s.high
            self._out.append(line)
        s.written_at, s.written_value = s.last_time, s.last_value
        s.count = 0

    def _commit(self) -> None:
        """Write the lines collected under the lock with one system call."""
        out, self._out = self._out, []
        if out:
            self.writer.write_many(out)

    def flush(self) -> None:
        """Write what is queued and every pending aggregate now."""
        self._drain()
        if self.writer.disabled:
            return
        try:
            with self._lock:
                for key, s in self._series.items():
                    self._flush_series(key, s)
                self._commit()
        except Exception as exc:  # noqa: BLE001
            warn_once("metrics-handler", f"metric handler error (further ones hidden): {exc!r}")

    def close(self) -> None:
        """Stop the drain thread, write everything, close the file. Idempotent."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5.0)
        self.flush()
        self.writer.close()
