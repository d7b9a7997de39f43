"""File MetricHandler for ``torch.distributed.elastic.metrics``, with throttling.

Why throttle: torch's agent publishes several metrics on *every* monitor tick (default every
0.1 s): ``workers.<role>.remaining_restarts``, ``workers.<role>.healthy`` and the ``@prof``
metrics of ``LocalElasticAgent._monitor_workers`` (``.success``, ``.duration.ms``). Written raw
that is ~40 lines/s/node of near-constant values. Everything else torch emits (rendezvous,
start/stop/restart durations, run totals) is rare and worth a line each. The rule, per series
``(group, name)`` and per window of ``interval_s`` seconds (120 s: the drain's period, see below;
a window opens with a sample and closes with the first sample ``interval_s`` or more later):

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
``burst + 1 + interval_s/change_gap_s`` lines per window. Windows shorter than the drain's period
(it was 10 s) only meant several aggregate lines per series written at once, each line a cost of
the drain (about a third of it went into encoding and writing them).

Why a queue and a thread: the agent is nearly idle (about 1 ms of CPU per second at a 0.5 s
monitor tick), and Python code that runs once per tick runs cold - a handful of Python-level calls
there cost tens of µs, several percent of the agent. So what torch calls is a list whose class
attribute ``emit`` is ``list.extend`` (one C call, as cheap as torch's own
``NullMetricHandler.emit``; see :class:`SampleQueue`), and a daemon thread applies the rule to the
queued samples every ``drain_interval_s`` (120 s) in one batch. The drain runs cold too (once
per two minutes), so what it costs is mostly how much Python it executes, not how many samples it
sees: a steady agent's batch is recognised as the same few series repeating in a fixed order and
each series is folded with C builtins (no sort), the wait between drains is one C call, and the
batch is freed while it is still in the cache. Lines keep the samples' own timestamps and reach
the file up to ``drain_interval_s`` later; a SIGKILLed agent loses those queued samples and its
open windows' aggregates (the events file is written synchronously).

Why 120 s: a drain costs about the same whatever it holds (~300 µs of CPU on the dev VM, cold code
and the thread's wake-up), so its period sets most of telemetry's steady cost. Measured with
benchmarks/bench_telemetry.py: 30 s -> 10.4 µs/s for the drain (1.2 % of an idle agent with the
appends), 60 s -> 4.3 µs/s (0.9 %), 120 s -> 2.5-2.7 µs/s (0.5-0.6 %). About half of what is left
at 120 s is the queue's appends (~1-2 µs per tick of 4 samples, measured against torch's null
handler: samples kept alive until the drain instead of freed at once). The price: lines of the
agent's metrics land up to two minutes late, and a SIGKILL loses up to the last two minutes of them
(never an event).
"""

from __future__ import annotations

import contextlib
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

__all__ = ["FileMetricHandler", "SampleQueue"]

MEASUREMENT_SUFFIX = ".duration.ms"
# Series torch publishes on every monitor tick (torch 2.13 SimpleElasticAgent._invoke_run).
PER_TICK: tuple[re.Pattern[str], ...] = (
    re.compile(r"^workers\.[^.]+\.(remaining_restarts|healthy)$"),
    re.compile(r"(^|\.)_monitor_workers\.(success|failure|duration\.ms)$"),
)


def _is_per_tick(name: str) -> bool:
    return any(p.search(name) for p in PER_TICK)


_NUMBER_TYPES = frozenset({int, float})  # exact types: bool is not a number here


def _cycle(groups: list[str], names: list[str]) -> int:
    """``p`` if sample ``i`` belongs to series ``i % p`` and the first ``p`` series differ, else 0.

    That is every batch of a steady agent (torch publishes its per-tick metrics in a fixed order),
    and splitting it with slices costs a few C calls, where sorting it by name (and gathering the
    columns in that order) was ~40 % of the drain. Any other batch (a rare metric, a restart)
    returns 0: the caller sorts. "Periodic with period ``p``" is one list comparison per column
    (``names[p:] == names[:-p]``), not one slice and count per series: the drain runs cold, so the
    fewer Python-level steps the better.
    """
    try:
        p = names.index(names[0], 1)
    except ValueError:
        return 0
    if len(set(names[:p])) != p or names[p:] != names[:-p] or groups[p:] != groups[:-p]:
        return 0
    return p


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


class SampleQueue(list[Any]):
    """What torch's ``put_metric`` calls: ``emit(metric_data)`` appends the sample's 4 fields.

    ``emit`` is ``list.extend`` itself, found on the class of a list without ``__dict__``: the
    interpreter specialises the call site to a direct C call, and the ``MetricData`` tuple is freed
    at once, as with torch's null handler. Measured in a real agent (the A/B agent of
    benchmarks/bench_telemetry.py, 4 ``put_metric`` calls per tick, against torch's
    ``NullMetricHandler``): +0.1 to +2.2 µs per tick like this (the median of 4 agents, in each
    of five runs of the benchmark; the samples stay alive until the drain, where torch's null
    handler frees them at once); +2.8 µs with the bound
    ``extend`` stored on the handler instance, +4.7 µs with the bound ``__iadd__`` there (an
    instance attribute shadowing a method: no specialisation, and a cold instance dict and
    bound-method object on every call). The queue is flat (``[t0, g0, n0, v0, t1, ...]``), which
    needs ``MetricData`` to stay the 4-tuple it has been since torch 1.9 (checked at import: see
    ``_FieldsQueue``).
    """

    __slots__ = ()
    emit = list.extend


class _FieldsQueue(SampleQueue):
    """For a torch whose MetricData is not a 4-tuple: keep its first 4 fields (slower)."""

    __slots__ = ()

    def emit(self, metric_data: Any) -> None:  # type: ignore[override]
        self.extend(tuple(metric_data)[:4])


class _Discarding(SampleQueue):
    """Swapped in (``__class__``; same layout) where nobody will drain: a forked child, a dead
    file. torch keeps calling ``emit`` on the same object, which then does nothing."""

    __slots__ = ()

    @staticmethod
    def emit(metric_data: Any) -> None:  # type: ignore[override]
        return None


_QUEUE_CLASS: type[SampleQueue] = (
    SampleQueue if len(MetricData._fields) == 4 else _FieldsQueue)
_handlers: weakref.WeakSet[FileMetricHandler] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    """A forked child inherits the handler but not its drain thread: stop queueing there."""
    for h in list(_handlers):
        h._stop_queueing()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _drain_loop(
    ref: weakref.ref[FileMetricHandler], stop: threading.Lock, interval_s: float
) -> None:
    """Drain every ``interval_s`` until ``stop`` (held by the handler) is released.

    A plain lock's timed ``acquire`` is one C call; ``Event.wait`` runs ~30 lines of
    ``threading`` Python per wake-up: 150 instead of 110 µs of CPU per wake-up on the dev VM
    (most of it is the kernel's; waking a thread is not cheap there), a sixth of a steady drain.
    """
    while not stop.acquire(timeout=interval_s):
        handler = ref()
        if handler is None:
            return
        handler._drain()
        del handler


class FileMetricHandler(MetricHandler):
    """Writes torch elastic metrics to one node's ``metrics.jsonl`` (see module doc for the rule).

    Install its ``queue`` with ``torch.distributed.elastic.metrics.configure(handler.queue)``
    (no group: every group); ``handler.emit`` does the same for direct callers. Both are
    thread-safe and never raise or block. Call ``close()`` at the end (``flush()`` to write
    everything queued and pending without closing).

    The drain slices the flat queue into columns (``[0::4]`` ...) and deletes what it took; what
    torch appends meanwhile lands behind it and waits for the next drain.
    """

    def __init__(
        self,
        writer: JsonlWriter,
        context: Context,
        *,
        interval_s: float | None = None,
        change_gap_s: float = 1.0,
        burst: int = 5,
        drain_interval_s: float = 120.0,
    ) -> None:
        self.writer = writer
        self.context = context
        # The window defaults to the drain's period: one aggregate line per series and drain.
        self.interval_s = drain_interval_s if interval_s is None else interval_s
        self.change_gap_s = change_gap_s
        self.burst = burst
        self.drain_interval_s = drain_interval_s
        self._series: dict[tuple[str, str], _Series] = {}
        self._lock = threading.RLock()  # the rule's state; taken by the drain thread and flush
        self.queue: SampleQueue = _QUEUE_CLASS()  # torch's handler; never replaced
        self.drained = 0  # samples taken from the queue so far (for benchmarks and debugging)
        self._out: list[dict[str, Any]] = []  # lines of the current drain/flush: ONE os.write
        self._stop = threading.Lock()  # held while the drain thread should run; close() releases
        self._stop.acquire()
        self._thread = threading.Thread(  # holds only a weak reference: no leak if never closed
            target=_drain_loop, args=(weakref.ref(self), self._stop, drain_interval_s),
            name="hpc-elastic-metrics", daemon=True,
        )
        self._thread.start()
        _handlers.add(self)

    def emit(self, metric_data: MetricData) -> None:
        """Queue one sample (what torch does through ``queue.emit``)."""
        self.queue.emit(metric_data)

    def _stop_queueing(self) -> None:
        """Nobody will drain (forked child, dead file): make torch's calls no-ops, drop the rest."""
        self.queue.__class__ = _Discarding
        del self.queue[:]

    def _drain(self) -> None:
        """Apply the rule to every queued sample (per series, in arrival order)."""
        if self.writer.disabled:  # broken file or forked child
            self._stop_queueing()
            return
        try:
            with self._lock:
                q = self.queue
                n = len(q)  # torch may append while we read: everything stays below n
                m = n
                if m % 4:
                    m = 0  # somebody called emit() with something else: cannot realign
                    warn_once("metrics-queue", "metric queue misaligned; samples dropped")
                columns = q[0:m:4], q[1:m:4], q[2:m:4], q[3:m:4]
                # Taken: what torch appended since stays. The samples are freed when the columns
                # go, at the end of this drain, while they are still in the cache.
                del q[:n]
                self.drained += m // 4
                if m:
                    self._apply_batch(*columns)
                self._commit()
        except Exception as exc:  # noqa: BLE001 - telemetry must never break the agent
            warn_once("metrics-handler", f"metric handler error (further ones hidden): {exc!r}")

    def _apply_batch(
        self, times: list[float], groups: list[str], names: list[str], values: list[Any]
    ) -> None:
        """Split the columns by series (C-level slices, or sort and gathers), apply the rule."""
        n = len(names)
        if n == 1:
            self._apply(times[0], groups[0], names[0], values[0])
            return
        period = _cycle(groups, names)
        if period:  # a steady agent: its per-tick series, in the same order every tick
            for j in range(period):
                self._apply_series((groups[j], names[j]), times[j::period], values[j::period])
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
        with contextlib.suppress(RuntimeError):  # already released: a second close()
            self._stop.release()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5.0)
        self.flush()
        self.writer.close()
