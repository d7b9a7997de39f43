"""Wiring the file handlers into torch: the one call the agent makes.

``install`` configures our :class:`FileMetricHandler`'s queue as torch's default metric handler
(every group), attaches a :class:`TorchEventHandler` to the ``torchelastic-events-<destination>``
loggers and returns a :class:`Telemetry` whose ``events`` is the agent's direct :class:`EventLog`.
"""

from __future__ import annotations

import atexit
import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path

from torch.distributed.elastic import metrics as torch_metrics

from ..jobdir import METRICS, JobDir
from .events import EventLog, TorchEventHandler
from .jsonl import JsonlWriter, warn_once
from .metrics import FileMetricHandler
from .schema import ENV_ATTEMPT, ENV_JOB_ID, ENV_NODE, ENV_WORKER_METRICS, Context

__all__ = ["DEFAULT_DESTINATIONS", "Telemetry", "install", "uninstall"]

# Event destinations torch can log to (``WorkerSpec.event_log_handler`` picks one for the agent;
# rendezvous events use "dynamic_rendezvous"). torch only accepts names in its own table.
DEFAULT_DESTINATIONS: tuple[str, ...] = ("null", "console", "dynamic_rendezvous")
_LOGGER_PREFIX = "torchelastic-events-"

_current: Telemetry | None = None


class _RdzvEventsOn(logging.Handler):
    """Placeholder registered as torch's "dynamic_rendezvous" handler; it drops everything.

    torch's ``construct_and_record_rdzv_event`` returns early while that handler is a
    ``logging.NullHandler`` (the default), so DynamicRendezvousHandler's events never reach the
    logger we listen to. Registering any other handler switches them on; the lines themselves
    come from our handler on the logger.
    """

    def emit(self, record: logging.LogRecord) -> None:
        return None


def _enable_torch_rdzv_events() -> Callable[[], None] | None:
    """Switch torch's rendezvous events on; returns the undo, or None if nothing was changed.

    This touches torch's private handler table (there is no public setter); if torch changes
    it we lose only the DynamicRendezvousHandler's own events, never the run.
    """
    try:
        from torch.distributed.elastic.events import handlers

        table = handlers._log_handlers  # noqa: SLF001 - see docstring
        original = table.get("dynamic_rendezvous")
        if not isinstance(original, logging.NullHandler):
            return None
        table["dynamic_rendezvous"] = _RdzvEventsOn()

        def undo() -> None:
            table["dynamic_rendezvous"] = original

        return undo
    except Exception:  # noqa: BLE001
        return None


class Telemetry:
    """One agent's telemetry: ``events`` (EventLog), ``metrics`` (our MetricHandler; torch calls
    its ``queue``)."""

    def __init__(
        self,
        jobdir: JobDir,
        node: str,
        context: Context,
        events: EventLog,
        metrics: FileMetricHandler,
        loggers: list[logging.Logger],
        handler: TorchEventHandler,
        undo_rdzv: Callable[[], None] | None,
    ) -> None:
        self.jobdir = jobdir
        self.node = node
        self.context = context
        self.events = events
        self.metrics = metrics
        self._loggers = loggers
        self._handler = handler
        self._undo_rdzv = undo_rdzv
        self._closed = False

    @property
    def node_dir(self) -> Path:
        return self.jobdir.node(self.node)

    def worker_metrics_template(self) -> str:
        """``<node>/workers/attempt-<a>/restart-{restart}/rank-{rank}/metrics.jsonl``.

        Built by JobDir.worker_logs itself (placeholders in place of the numbers), so the layout
        stays defined in one place; each worker fills the placeholders in from its environment.
        """
        rank_dir = self.jobdir.worker_logs(
            self.node, self.context.attempt, "{restart}", "{rank}"  # type: ignore[arg-type]
        )
        return str(rank_dir / METRICS)

    def worker_env(self, path_template: str | None = None) -> dict[str, str]:
        """Variables workers need so that their ``log_metric`` writes to per-rank files.

        Put them into the agent's ``os.environ`` before ``agent.run()``: torch builds each
        worker's environment as a copy of the agent's plus its own variables (``WorkerSpec``
        has no env field). ``path_template`` may contain ``{rank}``, ``{local_rank}`` and
        ``{restart}``, filled in by each worker from ``RANK``, ``LOCAL_RANK`` and
        ``TORCHELASTIC_RESTART_COUNT``.
        """
        return {
            ENV_WORKER_METRICS: path_template or self.worker_metrics_template(),
            ENV_JOB_ID: self.context.job_id,
            ENV_ATTEMPT: str(self.context.attempt),
            ENV_NODE: self.context.node,
        }

    def flush(self) -> None:
        """Write queued metric samples and pending aggregates now (events are never held back)."""
        self.metrics.flush()

    def close(self) -> None:
        """Detach from torch, write what is pending, close both files. Idempotent."""
        global _current
        if self._closed:
            return
        self._closed = True
        try:
            for lg in self._loggers:
                lg.removeHandler(self._handler)
            queue = self.metrics.queue
            if getattr(torch_metrics.api, "_default_metrics_handler", queue) is queue:
                torch_metrics.configure(torch_metrics.NullMetricHandler())
            if self._undo_rdzv is not None:
                self._undo_rdzv()
            self.metrics.close()
            self.events.close()
        except Exception as exc:  # noqa: BLE001
            warn_once("telemetry-close", f"error while closing telemetry: {exc!r}")
        finally:
            atexit.unregister(self.close)
            if _current is self:
                _current = None

    def __enter__(self) -> Telemetry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def install(
    jobdir: JobDir | str | os.PathLike[str],
    node: str,
    *,
    job_id: str,
    attempt: int = 0,
    metric_interval_s: float | None = None,
    metric_change_gap_s: float = 1.0,
    metric_burst: int = 5,
    metric_drain_interval_s: float = 120.0,
    event_destinations: Iterable[str] = DEFAULT_DESTINATIONS,
    torch_rdzv_events: bool = False,
) -> Telemetry:
    """Route torch's metrics and events (and ours) into ``<jobdir>/nodes/<node>/*.jsonl``.

    Call once per agent process, before the rendezvous handler and the agent are created. A second
    call closes the first installation. Files are created on the first line, never raises for
    I/O problems (one warning on stderr instead). ``close()`` (also run at interpreter exit)
    writes pending metric aggregates.

    ``torch_rdzv_events`` switches on the events of torch's own DynamicRendezvousHandler (c10d,
    etcd backends), which torch suppresses by default. Off by default: hpc_elastic's rendezvous
    does not need it, and torch pays ~1 ms (``inspect.stack()``) per such event, 3 per heartbeat.
    """
    global _current
    if _current is not None:
        _current.close()
    jd = jobdir if isinstance(jobdir, JobDir) else JobDir(Path(jobdir))
    context = Context(job_id=str(job_id), attempt=int(attempt), node=node)
    events = EventLog(JsonlWriter(jd.events(node)), context)
    metric_handler = FileMetricHandler(
        JsonlWriter(jd.metrics(node)), context,
        interval_s=metric_interval_s, change_gap_s=metric_change_gap_s, burst=metric_burst,
        drain_interval_s=metric_drain_interval_s,
    )
    # torch calls the queue itself, not the handler: see metrics.SampleQueue for why.
    torch_metrics.configure(metric_handler.queue)  # type: ignore[arg-type]
    handler = TorchEventHandler(events)
    loggers = []
    for dest in dict.fromkeys(event_destinations):
        lg = logging.getLogger(_LOGGER_PREFIX + dest)
        lg.addHandler(handler)
        loggers.append(lg)
    undo = _enable_torch_rdzv_events() if torch_rdzv_events else None
    tel = Telemetry(jd, node, context, events, metric_handler, loggers, handler, undo)
    atexit.register(tel.close)
    _current = tel
    return tel


def uninstall() -> None:
    """Close the current installation, if any."""
    if _current is not None:
        _current.close()
