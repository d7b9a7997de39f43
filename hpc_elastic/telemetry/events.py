"""Events: our ``EventLog`` and the ``logging.Handler`` that turns torch's events into lines.

torch's ``events.record(event, destination)`` logs ``event.serialize()`` (a JSON string) at INFO
through the Python logger ``torchelastic-events-<destination>``; attaching a handler to that logger
is public API. :class:`TorchEventHandler` parses the string, maps torch's name/state to one of our
short stable ``kind`` names (the tables below are the only place that knows torch's names) and
hands the result to :class:`EventLog`, which is also what the agent calls directly for what torch
does not emit (preemption, requeue, shutdown, worker exits with their error file).

Every line gets a real timestamp: torch's agent ``Event.timestamp`` is always 0, so we use the
moment the log record was created (``time.time()``), or the caller's ``time=``.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time as _time
from collections.abc import Callable
from typing import Any

from .jsonl import JsonlWriter, warn_once
from .schema import RESERVED_FIELDS, Context

__all__ = [
    "AGENT_EVENT_KINDS",
    "CHATTY_KINDS",
    "DIRECT_KINDS",
    "EVENT_NAME_PREFIXES",
    "FINAL_KINDS",
    "RDZV_METHOD_KINDS",
    "EventLog",
    "TorchEventHandler",
    "translate_torch_event",
]

# --- the one mapping table from torch's names to our kinds ---------------------------------------

# torch agent/worker events are named "torchelastic.worker.status.<STATE>"; key: (source, STATE).
AGENT_EVENT_KINDS: dict[tuple[str, str], str] = {
    ("AGENT", "RENDEZVOUS"): "agent.rendezvous",  # duration_ms of one next_rendezvous() call
    ("AGENT", "ASSIGN_WORKER_RANKS"): "agent.ranks_assigned",
    ("AGENT", "SUCCEEDED"): "agent.succeeded",
    ("AGENT", "FAILED"): "agent.failed",
    ("WORKER", "START"): "worker.started",
    ("WORKER", "SUCCEEDED"): "worker.succeeded",  # final result only, one per worker
    # Final result only: the agent records every failure itself as worker.failed the moment it
    # sees it, so torch's copy gets its own kind and is never counted twice.
    ("WORKER", "FAILED"): "worker.failed_final",
    ("WORKER", "TERMINATED"): "worker.terminated",  # stopped by the agent, final result
    ("WORKER", "UNHEALTHY"): "worker.unhealthy",
}
# torch rendezvous events (RdzvEvent) are named "<file>:<Class>.<method>"; key: method.
# FAILED events become rendezvous.failed (rendezvous.heartbeat_failed for heartbeats).
# The names follow hpc_elastic's own rendezvous (started, completed, failed, closed, ...).
RDZV_METHOD_KINDS: dict[str, str] = {
    "next_rendezvous": "rendezvous.started",  # with a rank: rendezvous.completed
    "_add_to_participants": "rendezvous.participant_added",
    "_add_to_wait_list": "rendezvous.waiting",
    "_add_to_redundancy_list": "rendezvous.redundant",
    "_remove_from_participants": "rendezvous.participant_removed",
    "_remove_from_wait_list": "rendezvous.wait_removed",
    "_remove_from_redundancy_list": "rendezvous.redundant_removed",
    "_mark_rendezvous_complete": "rendezvous.round_complete",
    "_mark_rendezvous_closed": "rendezvous.closing",
    "_close": "rendezvous.closed",
    "sync": "rendezvous.nodes_removed",  # dead nodes dropped (torch logs it at DEBUG only)
    "run": "rendezvous.sync",
    "_keep_alive": "rendezvous.heartbeat",
}
# Kinds torch has no event for; the agent records them with EventLog.record(kind, **fields).
# Not enforced (any dotted lower-case name works), but these are the documented ones.
DIRECT_KINDS: dict[str, str] = {
    "agent.start": "the agent is up: pid, address, ...",
    "worker.failed": "a failure as the agent sees it, every one (torch reports only the final "
    "result): rank, local_rank, exitcode, pid, restart_count, message, error_file, signal",
    "preemption.signal": "a preemption / time-limit signal arrived: signal, grace_s, forwarded_to",
    "requeue": "this node requeues the job: reason, claim",
    "batch.lost": "the batch supervisor's heartbeat stopped (its node, the batch host, is most "
    "likely lost): the agents checkpoint and requeue as after a preemption signal: host, "
    "silent_s, excluded",
    "requeue.failed": "the requeue failed: error",
    "requeue.excluded": "after its requeue, this node asked Slurm to leave the run's excluded "
    "nodes out of the next allocation (ExcNodeList): nodes",
    "agent.preempted": "the agent ends after a preemption: requeued_by_this_node",
    "agent.succeeded": "the agent ends, workers succeeded: elapsed_s",
    "agent.failed": "the agent ends, workers failed: elapsed_s, failures; or the agent itself "
    "failed (join timeout, unreadable state, unwritable job directory): reason, error_type, "
    "traceback",
    "shutdown": "the agent was told to stop (a signal): signal",
    "workers.peer_left": "the workers failed right after a node of their round departed or was "
    "declared dead: a membership change, no restart used: restart_count",
    "agent.left": "a member job's agent found the run's rendezvous closed (the run ended): reason",
    "worker.error_file_unreadable": "a worker left an error file torch cannot parse (empty, "
    "cut off by a full disk): set aside as <file>.unreadable, the failure counts as usual: "
    "error_file, reason",
    "worker.hung": "a rank made no progress for hang_timeout (agent/hang.py): rank, silent_s, "
    "state, cpu_percent, step, dump, stamp, before_first_step",
    "hang.dumped": "this node dumped its ranks' stacks for a hang: stamp, detected_by, dump_dir, "
    "ranks, acked_nodes, expected_nodes, dump_s",
    "standby.started": "warm_workers: the standby started (forked from the agent after its "
    "import torch, or a new process that imports it), then forks the workers: pids, "
    "forked_from_agent, not_forked",
    "standby.failed": "warm_workers: the standby could not be started: error",
    "workers.warm": "warm_workers: a worker group started; local ranks forked by the standby and "
    "those started cold: warm, cold, pids",
    "restarts.stopped": "the same failure repeated same_failure_limit times: repeats, cause, "
    "reason",
    "node.straggler": "this node's ranks are >= 1.45x the median busy time per step: ratio, "
    "node_busy_s, median_busy_s, ranks, windows, policy, action",
    "node.straggler_cleared": "the node is back under the straggler ratio: ratio, windows",
}
#: The kinds that end an agent: every agent's last event is one of them (hpc_elastic/agent/
#: ending.py makes sure of it). One that cannot be written goes to ``EventLog.final_lost``.
FINAL_KINDS = frozenset({"agent.succeeded", "agent.failed", "agent.preempted", "shutdown",
                         "agent.left"})
# Events (agent-style ``Event``) whose name starts with a key here: kind = value + rest of the name.
# hpc_elastic's shared-filesystem rendezvous names its events "sharedfs.rendezvous.<what>".
EVENT_NAME_PREFIXES: dict[str, tuple[str, str]] = {  # prefix -> (kind prefix, source)
    "sharedfs.rendezvous.": ("rendezvous.", "rendezvous"),
}
# Periodic, information-free-when-fine kinds: at most one line per CHATTY_INTERVAL_S per kind,
# carrying ``suppressed`` = how many were dropped since the previous line.
CHATTY_KINDS = frozenset({"rendezvous.heartbeat", "rendezvous.sync"})
CHATTY_INTERVAL_S = 60.0

# A torch event whose name already looks like one of our kinds is taken as is, so code that emits
# through torch (our own rendezvous) can pick its kind: Event("rendezvous.complete", ...).
_KIND_RE = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z0-9_]+)+$")
_ROUND_RE = re.compile(r"\bround (\d+)\b")
_WORLD_RE = re.compile(r"world of size (\d+)")
# torch names -> our field names (flattened from Event.metadata and its inner JSON "metadata").
_RENAME = {
    "global_rank": "rank",
    "agent_restarts": "restart_count",
    "worker_pid": "pid",
    "total_run_time": "total_run_time_s",
    "state": "torch_state",
}


def _unwrap(value: Any) -> Any:
    """torch wraps some per-worker values in 1-tuples (``(local_rank,)``); unwrap them."""
    if isinstance(value, (list, tuple)) and len(value) == 1:
        return value[0]
    return value


def _maybe_json(text: Any) -> Any:
    if isinstance(text, str) and text[:1] in "{[":
        try:
            return json.loads(text)
        except ValueError:
            return text
    return text


def _agent_fields(data: dict[str, Any]) -> tuple[str, str, dict[str, Any]]:
    name = str(data.get("name", ""))
    source = str(data.get("source", "AGENT")).upper()
    md = data.get("metadata") or {}
    fields: dict[str, Any] = {"torch_name": name}
    inner = _maybe_json(md.get("metadata")) if isinstance(md, dict) else None
    for src in (md, inner):
        if not isinstance(src, dict):
            continue
        for k, v in src.items():
            if k == "metadata" or v is None:
                continue
            v = _unwrap(v)
            if v is None:
                continue
            fields[_RENAME.get(k, k)] = v
    if "raw_error" in fields:
        fields["error"] = _maybe_json(fields.pop("raw_error"))
    state = str(md.get("state", "")) if isinstance(md, dict) else ""
    prefix = next((p for p in EVENT_NAME_PREFIXES if name.startswith(p)), None)
    if prefix is not None:
        kind_prefix, source = EVENT_NAME_PREFIXES[prefix]
        return kind_prefix + name[len(prefix):], source, fields
    if name.startswith("torchelastic.worker.status."):
        state = state or name.rsplit(".", 1)[-1]
        kind = AGENT_EVENT_KINDS.get((source, state), f"{source.lower()}.{state.lower()}")
    elif "watchdog_event" in fields:
        kind = "agent.watchdog"
    elif _KIND_RE.match(name):
        kind = name
    else:
        kind = "torch.event"
    return kind, source.lower(), fields


def _rdzv_fields(data: dict[str, Any]) -> tuple[str, str, dict[str, Any]]:
    name = str(data.get("name", ""))
    node_state = str(data.get("node_state", ""))
    method = name.rsplit(":", 1)[-1].rsplit(".", 1)[-1]
    fields: dict[str, Any] = {"torch_name": name}
    for k, v in data.items():
        if k == "name" or v is None or v == "":
            continue
        fields[k] = v
    message = str(data.get("message", ""))
    if m := _ROUND_RE.search(message):
        fields["round"] = int(m.group(1))
    if m := _WORLD_RE.search(message):
        fields["world_size"] = int(m.group(1))
    bare = name.rsplit(":", 1)[-1]
    if _KIND_RE.match(bare) and bare.startswith("rendezvous."):
        kind = bare
    elif node_state == "FAILED":
        kind = "rendezvous.heartbeat_failed" if method == "_keep_alive" else "rendezvous.failed"
    elif method == "next_rendezvous" and data.get("rank") is not None:
        kind = "rendezvous.completed"
    else:
        kind = RDZV_METHOD_KINDS.get(method, "rendezvous.event")
    return kind, "rendezvous", fields


def translate_torch_event(data: dict[str, Any]) -> tuple[str, str, dict[str, Any]]:
    """``(kind, source, fields)`` for a deserialized torch ``Event`` or ``RdzvEvent``."""
    if "node_state" in data:
        return _rdzv_fields(data)
    return _agent_fields(data)


class EventLog:
    """Writes one node's ``events.jsonl``; the agent's direct API for events torch lacks.

    ``record`` never raises, is thread-safe and may be called from a signal handler.
    """

    def __init__(
        self,
        writer: JsonlWriter,
        context: Context,
        *,
        chatty_kinds: frozenset[str] = CHATTY_KINDS,
        chatty_interval_s: float = CHATTY_INTERVAL_S,
    ) -> None:
        self.writer = writer
        self.context = context
        self.chatty_kinds = chatty_kinds
        self.chatty_interval_s = chatty_interval_s
        self._chatty: dict[str, tuple[float, int]] = {}  # kind -> (last written, suppressed)
        self._lock = threading.RLock()
        #: Called with a final event (FINAL_KINDS) the writer could not write.
        self.final_lost: Callable[[dict[str, Any]], None] | None = None

    def record(
        self, kind: str, *, source: str = "agent", time: float | None = None, **fields: Any
    ) -> None:
        """Append one event: ``{v, time, job_id, attempt, node, source, kind, **fields}``.

        A field named like a leading one is dropped when it repeats the line's value, else renamed
        ``x_<name>``; it never overwrites.
        """
        final = kind in FINAL_KINDS and self.final_lost is not None
        if self.writer.disabled and not final:  # also true in a forked child
            return
        try:
            when = _time.time() if time is None else float(time)
            if kind in self.chatty_kinds:
                with self._lock:
                    last, suppressed = self._chatty.get(kind, (float("-inf"), 0))
                    if when - last < self.chatty_interval_s:
                        self._chatty[kind] = (last, suppressed + 1)
                        return
                    self._chatty[kind] = (when, 0)
                if suppressed:
                    fields["suppressed"] = suppressed
            line = self.context.head(when)
            line["source"] = source
            line["kind"] = kind
            for k, v in fields.items():
                if k in RESERVED_FIELDS:
                    if str(v) == str(line.get(k)):
                        continue  # e.g. the rendezvous repeating our node name: no news
                    k = f"x_{k}"
                line[k] = v
            if not self.writer.write(line) and final and self.final_lost is not None:
                self.final_lost(line)
        except Exception as exc:  # noqa: BLE001 - telemetry must never break the agent
            warn_once("event-log", f"event log error (further ones hidden): {exc!r}")

    def close(self) -> None:
        self.writer.close()


class TorchEventHandler(logging.Handler):
    """Attach to ``torchelastic-events-<destination>`` loggers; feeds an :class:`EventLog`.

    Besides the 1:1 mapping it derives group-level lines from torch's per-worker START events
    (torch has no restart event): ``workers.started`` for every start of the local worker group,
    preceded by ``workers.restart`` when it is not the first, with ``reason`` = ``failure``
    (torch's restart counter went up) or ``membership`` (a node joined or left).
    """

    def __init__(self, log: EventLog) -> None:
        super().__init__(level=logging.NOTSET)
        self.log = log
        self._group_starts = 0
        self._last_restart_count = 0

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = record.msg if isinstance(record.msg, str) and not record.args else (
                record.getMessage()
            )
            data = json.loads(msg)
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
        except Exception:  # noqa: BLE001 - somebody logged free text to an events logger
            self.log.record("torch.log", source="torch", time=record.created,
                            logger=record.name, message=str(record.msg)[:2000])
            return
        try:
            kind, source, fields = translate_torch_event(data)
            if kind == "worker.started" and fields.get("local_rank") == 0:
                self._group_start(record.created, fields)
            self.log.record(kind, source=source, time=record.created, **fields)
        except Exception as exc:  # noqa: BLE001
            warn_once("event-handler", f"torch event handler error (further ones hidden): {exc!r}")

    def _group_start(self, when: float, fields: dict[str, Any]) -> None:
        restart_count = int(fields.get("restart_count") or 0)
        extra = {
            k: fields[k] for k in ("role", "group_rank", "group_world_size", "run_id")
            if k in fields
        }
        if self._group_starts > 0:
            reason = "failure" if restart_count > self._last_restart_count else "membership"
            self.log.record("workers.restart", time=when, restart_count=restart_count,
                            reason=reason, **extra)
        self.log.record("workers.started", time=when, restart_count=restart_count, **extra)
        self._group_starts += 1
        self._last_restart_count = restart_count
