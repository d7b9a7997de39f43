"""Telemetry: real files, real torch metric/event APIs, real processes."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from torch.distributed.elastic import events as torch_events
from torch.distributed.elastic import metrics as torch_metrics
from torch.distributed.elastic.events.api import Event, EventSource, NodeState, RdzvEvent
from torch.distributed.elastic.metrics import MetricData

from hpc_elastic import telemetry
from hpc_elastic.jobdir import JobDir
from hpc_elastic.telemetry import jsonl
from hpc_elastic.telemetry.events import EventLog, TorchEventHandler
from hpc_elastic.telemetry.jsonl import JsonlWriter, ReadStats, read_jsonl
from hpc_elastic.telemetry.metrics import FileMetricHandler
from hpc_elastic.telemetry.schema import ENV_WORKER_METRICS, SCHEMA_VERSION, Context

REPO = Path(__file__).resolve().parents[1]
CTX = Context(job_id="job-1", attempt=2, node="n0")


@pytest.fixture(autouse=True)
def _fresh_warnings():
    """Each test sees its own one-time warnings."""
    jsonl._warned.clear()
    yield
    jsonl._warned.clear()


@pytest.fixture
def tel(tmp_path):
    t = telemetry.install(JobDir(tmp_path / "job"), "n0", job_id="job-1", attempt=2)
    yield t
    t.close()


def lines(path: Path) -> list[dict]:
    stats = ReadStats()
    out = list(read_jsonl(path, stats))
    assert stats.skipped == 0, stats
    return out


def metric_handler(path: Path, **kw) -> FileMetricHandler:
    return FileMetricHandler(JsonlWriter(path), CTX, **kw)


# --- metrics ------------------------------------------------------------------------------------


def test_put_metric_and_prof_land_in_file_with_all_fields(tel):
    torch_metrics.put_metric("samples", 42, "myapp")

    @torch_metrics.prof(group="myapp")
    def step():
        return 1

    step()
    before = time.time()
    tel.close()
    got = lines(tel.jobdir.metrics("n0"))
    by_name = {ln["name"]: ln for ln in got}
    assert by_name["samples"] == {
        "v": SCHEMA_VERSION, "time": by_name["samples"]["time"], "job_id": "job-1",
        "attempt": 2, "node": "n0", "group": "myapp", "name": "samples", "value": 42,
    }
    assert abs(by_name["samples"]["time"] - before) < 5
    prof_names = {n for n in by_name if ".step." in n}  # @prof names it by qualname
    assert {n.rsplit(".step.", 1)[1] for n in prof_names} == {"success", "duration.ms"}
    assert all(by_name[n]["group"] == "myapp" for n in prof_names)
    # after close torch is back to its null handler: nothing more is written
    torch_metrics.put_metric("after", 1, "myapp")
    assert "after" not in {ln["name"] for ln in lines(tel.jobdir.metrics("n0"))}


def test_per_tick_metrics_are_throttled_and_last_value_kept(tel):
    for i in range(1000):
        torch_metrics.put_metric("workers.default.healthy", 1)
        torch_metrics.put_metric("LocalElasticAgent._monitor_workers.duration.ms", i % 7)
    torch_metrics.put_metric("LocalElasticAgent._monitor_workers.duration.ms", 99)
    tel.close()
    got = lines(tel.jobdir.metrics("n0"))
    healthy = [ln for ln in got if ln["name"] == "workers.default.healthy"]
    dur = [ln for ln in got if ln["name"].endswith("_monitor_workers.duration.ms")]
    assert 1 <= len(healthy) <= 3 and 1 <= len(dur) <= 3
    assert sum(ln.get("count", 1) for ln in healthy) == 1000
    assert sum(ln.get("count", 1) for ln in dur) == 1001
    assert dur[-1]["value"] == 99 and dur[-1]["max"] == 99 and dur[-1]["min"] == 0
    assert sum(ln.get("sum", ln["value"]) for ln in dur) == sum(i % 7 for i in range(1000)) + 99


def test_throttle_rule_windows_levels_and_burst(tmp_path):
    path = tmp_path / "m.jsonl"
    h = metric_handler(path, interval_s=10.0, change_gap_s=1.0, burst=5)
    g = "torchelastic"
    for i in range(1000):  # 100 s of ticks every 0.1 s
        t = 1000.0 + i * 0.1
        h.emit(MetricData(t, g, "LocalElasticAgent._monitor_workers.success", 1))
        h.emit(MetricData(t, g, "workers.trainer.remaining_restarts", 3 if i < 500 else 2))
    for i in range(50):  # unknown series at 10 Hz: burst, then aggregate (+ changes of a level)
        h.emit(MetricData(2000.0 + i * 0.1, "app", "x.duration.ms", i))
        h.emit(MetricData(2000.0 + i * 0.1, "app", "level", i))
    h.emit(MetricData(3000.0, g, "SimpleElasticAgent._restart_workers.duration.ms", 10))
    h.emit(MetricData(3001.0, g, "SimpleElasticAgent._restart_workers.duration.ms", 12))
    h.close()
    got = lines(path)
    mon = [ln for ln in got if ln["name"].endswith("success")]
    assert 9 <= len(mon) <= 12  # one line per 10 s window
    assert sum(ln.get("count", 1) for ln in mon) == 1000
    rr = [ln for ln in got if ln["name"].endswith("remaining_restarts")]
    change = [ln for ln in rr if "count" not in ln and ln["value"] == 2]
    assert change and change[0]["time"] == pytest.approx(1050.0)  # written at once
    assert sum(ln.get("count", 1) for ln in rr) == 1000
    x = [ln for ln in got if ln["name"] == "x.duration.ms"]
    assert [ln["value"] for ln in x[:5]] == [0, 1, 2, 3, 4] and "count" not in x[4]
    assert x[-1]["count"] == 45 and x[-1]["value"] == 49 and x[-1]["sum"] == sum(range(5, 50))
    level = [ln for ln in got if ln["name"] == "level"]
    assert len(level) <= 5 + 5 + 6 and level[-1]["value"] == 49  # burst, 1 change/s, aggregates
    assert sum(ln.get("count", 1) for ln in level) == 50
    restarts = [ln for ln in got if "_restart_workers" in ln["name"]]
    assert [ln["value"] for ln in restarts] == [10, 12]  # rare series: every sample, plain


def test_bulk_drain_writes_what_sample_by_sample_writes(tmp_path):
    """The drain folds runs with builtins; the result must equal applying the rule per sample."""
    import random

    rng = random.Random(7)
    samples = []
    for i in range(3000):
        t = 1000.0 + i * 0.1
        samples.append(MetricData(t, "torchelastic", "workers.r.remaining_restarts",
                                  3 - (i > 1000) - (i > 1005) - (i > 2500)))
        samples.append(MetricData(t, "torchelastic", "workers.r.healthy", 1))
        samples.append(MetricData(t, "torchelastic",
                                  "LocalElasticAgent._monitor_workers.duration.ms",
                                  rng.randrange(5)))
        if rng.random() < 0.05:
            samples.append(MetricData(t, "app", "phase", rng.choice(["a", "b", 1, 2.5])))
    one = metric_handler(tmp_path / "one.jsonl", drain_interval_s=1e9)
    bulk = metric_handler(tmp_path / "bulk.jsonl", drain_interval_s=1e9)
    for md in samples:
        one._apply(*md)  # the rule, sample by sample
        bulk.emit(md)
        if rng.random() < 0.01:
            bulk._drain()  # batches of ~100
    one.close()
    bulk.close()

    def key(ln):
        return (ln["name"], ln["time"])

    got_one = sorted(lines(tmp_path / "one.jsonl"), key=key)
    got_bulk = sorted(lines(tmp_path / "bulk.jsonl"), key=key)
    assert got_one == got_bulk
    assert 30 < len(got_one) < 400


def test_queue_samples_arriving_during_a_drain_and_misuse(tmp_path, capfd):
    from hpc_elastic.telemetry.metrics import SampleQueue

    path = tmp_path / "m.jsonl"
    h = metric_handler(path, drain_interval_s=1e9)
    late = [MetricData(2.0, "app", "b", 2)]

    class TorchAppendsRightAfterTheDrainLooked(SampleQueue):
        __slots__ = ()

        def __len__(self) -> int:
            n = list.__len__(self)
            if late:
                self.extend(late.pop())  # torch's thread, between the drain's len() and del
            return n

    h.emit(MetricData(1.0, "app", "a", 1))
    h.queue.__class__ = TorchAppendsRightAfterTheDrainLooked
    h._drain()  # takes a; b arrived behind it and must stay queued, once
    h.queue.__class__ = SampleQueue
    assert list(h.queue) == [2.0, "app", "b", 2]
    h._drain()
    h.emit((3.0, "app", "c"))  # not a MetricData: the batch cannot be realigned, it is dropped
    h.close()
    assert [(r["name"], r["value"]) for r in lines(path)] == [("a", 1), ("b", 2)]
    assert capfd.readouterr().err.count("misaligned") == 1
    assert len(h.queue) == 0


def test_torch_calls_a_c_method_of_the_queue_class(tel):
    """The per-tick cost: torch's ``handler.emit(...)`` must be ``list.extend`` found on a
    class without instance dict (an instance attribute cost ~14x more per tick, measured)."""
    q = torch_metrics.getStream("torchelastic").handler
    assert q is tel.metrics.queue
    assert type(q).emit is list.extend and not hasattr(q, "__dict__")
    torch_metrics.put_metric("workers.trainer.healthy", 1)
    assert q[2:] == ["workers.trainer.healthy", 1] and len(q) == 4


def test_dead_file_or_forked_child_turns_torch_calls_into_no_ops(tmp_path):
    h = FileMetricHandler(JsonlWriter("/dev/full"), CTX, drain_interval_s=1e9)
    h.emit(MetricData(1.0, "app", "a", 1))
    h._drain()  # the write fails: the writer is disabled ...
    h._drain()  # ... and the next drain stops the queue
    q = h.queue
    q.emit(MetricData(2.0, "app", "b", 2))
    assert len(q) == 0 and isinstance(q, list)
    h.close()


def test_cycle_of_a_steady_batch_is_found_else_sorted(tmp_path):
    from hpc_elastic.telemetry.metrics import _cycle

    g = "torchelastic"
    tick = ["a.success", "a.duration.ms", "w.remaining_restarts", "w.healthy"]
    names = tick[2:] + tick * 5 + tick[:1]  # a drain can start and end mid-tick
    assert _cycle([g] * len(names), names) == 4
    assert _cycle([g] * 8, tick * 2) == 4
    assert _cycle([g] * 9, tick * 2 + ["a.success"]) == 4
    assert _cycle([g] * 9, tick * 2 + ["w.healthy"]) == 0  # out of order
    assert _cycle([g] * 13, tick + ["rare"] + tick * 2) == 0  # a rare metric in between
    assert _cycle([g] * 9, tick + ["rare"] + tick) == 5  # still a valid split: 5 series
    assert _cycle([g] * 6, ["x", "y", "y", "x", "y", "y"]) == 0  # a name twice per cycle
    assert _cycle([g] * 3, ["x", "y", "z"]) == 0  # nothing repeats
    assert _cycle([g, "app"] * 4, ["x"] * 8) == 0  # same name, two groups: two series
    # the slices of a cyclic batch give what the rule gives sample by sample
    samples = [MetricData(1000.0 + i * 0.5, g, n, (i % 3) * (n == tick[1]) + 1)
               for i in range(400) for n in tick][3:]
    one = metric_handler(tmp_path / "one.jsonl", drain_interval_s=1e9)
    bulk = metric_handler(tmp_path / "bulk.jsonl", drain_interval_s=1e9)
    for k, md in enumerate(samples):
        one._apply(*md)
        bulk.emit(md)
        if k % 237 == 0:
            bulk._drain()
    one.close()
    bulk.close()
    got_one = sorted(lines(tmp_path / "one.jsonl"), key=lambda ln: (ln["name"], ln["time"]))
    assert got_one == sorted(lines(tmp_path / "bulk.jsonl"),
                             key=lambda ln: (ln["name"], ln["time"]))


def test_default_window_is_the_drain_period(tmp_path):
    """A per-tick series gets one aggregate line per window; the window is the drain's period."""
    default = metric_handler(tmp_path / "d.jsonl")
    assert default.interval_s == default.drain_interval_s == 120.0
    default.close()
    h = metric_handler(tmp_path / "m.jsonl", drain_interval_s=1e9, interval_s=60.0)
    for i in range(300):  # 150 s of 0.5 s ticks
        h.emit(MetricData(1000.0 + i * 0.5, "torchelastic", "workers.trainer.healthy", 1))
    h.close()
    got = lines(tmp_path / "m.jsonl")
    assert [ln.get("count", 1) for ln in got] == [1, 120, 120, 59]
    assert [ln["time"] for ln in got[:3]] == [1000.0, 1060.0, 1120.0]
    assert got[1]["since"] == 1000.5 and got[1]["sum"] == 120


def test_non_numeric_and_non_finite_values(tmp_path):
    path = tmp_path / "m.jsonl"
    h = metric_handler(path, interval_s=10.0, burst=0)
    for i in range(5):
        h.emit(MetricData(1.0 + i, "app", "phase", "warmup"))
    h.emit(MetricData(1.0, "app", "loss", float("nan")))
    h.close()
    got = lines(path)
    phase = [ln for ln in got if ln["name"] == "phase"]
    assert phase[-1]["count"] == 4 and "sum" not in phase[-1]
    assert [ln["value"] for ln in got if ln["name"] == "loss"] == ["NaN"]


# --- events -------------------------------------------------------------------------------------


def _agent_event(state: str, source: EventSource, **md) -> Event:
    inner = {"group_world_size": 2, "entry_point": "train.py",
             "local_rank": [md.pop("local_rank", 0)], "exit_code": [md.pop("exit_code", None)],
             "worker_pid": [md.pop("pid", None)]}
    metadata = {"run_id": "r1", "global_rank": md.pop("rank", None), "group_rank": 0,
                "role": "trainer", "state": state, "raw_error": md.pop("raw_error", None),
                "metadata": json.dumps(inner), "agent_restarts": md.pop("restarts", 0),
                "duration_ms": md.pop("duration_ms", None)}
    return Event(f"torchelastic.worker.status.{state}", source=source, metadata=metadata)


@pytest.fixture
def tel_rdzv(tmp_path):
    t = telemetry.install(JobDir(tmp_path / "job"), "n0", job_id="job-1", attempt=2,
                          torch_rdzv_events=True)
    yield t
    t.close()


def test_torch_agent_and_rdzv_events_land_with_real_time_and_kinds(tel_rdzv):
    tel = tel_rdzv
    t0 = time.time()
    torch_events.record(_agent_event("RENDEZVOUS", EventSource.AGENT, duration_ms=12.5), "null")
    torch_events.record(_agent_event("START", EventSource.WORKER, rank=0, pid=11), "null")
    err = json.dumps({"message": {"message": "boom"}, "timestamp": 1})
    torch_events.record(
        _agent_event("FAILED", EventSource.WORKER, rank=1, local_rank=1, exit_code=3,
                     raw_error=err, pid=12), "console")
    rdzv = RdzvEvent(name="dynamic_rendezvous.py:DynamicRendezvousHandler.next_rendezvous",
                     run_id="r1", message="The node 'a' has joined round 3 of the rendezvous "
                     "'r1' as rank 1 in a world of size 4.", hostname="h", pid=5,
                     node_state=NodeState.RUNNING, rank=1)
    torch_events.record_rdzv_event(rdzv)
    # torch's DynamicRendezvousHandler path (gated on its handler table: torch_rdzv_events=True)
    torch_events.construct_and_record_rdzv_event(
        run_id="r1", message="RendezvousTimeoutError: x", node_state=NodeState.FAILED)
    # hpc_elastic's own shared-filesystem rendezvous
    torch_events.record(Event("sharedfs.rendezvous.completed", EventSource.AGENT, 5,
                              {"run_id": "r1", "node": "n0", "attempt": "2", "round": 4}),
                        "dynamic_rendezvous")
    tel.events.record("preemption.signal", signal="SIGUSR1", node="other")
    got = lines(tel.jobdir.events("n0"))
    assert [ln["kind"] for ln in got] == [
        "agent.rendezvous", "workers.started", "worker.started", "worker.failed_final",
        "rendezvous.completed", "rendezvous.failed", "rendezvous.completed", "preemption.signal",
    ]
    for ln in got:
        assert ln["v"] == SCHEMA_VERSION and ln["job_id"] == "job-1" and ln["attempt"] == 2
        assert ln["node"] == "n0" and t0 - 1 <= ln["time"] <= time.time() + 1
    assert got[0]["duration_ms"] == 12.5 and got[0]["source"] == "agent"
    assert got[2]["rank"] == 0 and got[2]["local_rank"] == 0 and got[2]["source"] == "worker"
    failed = got[3]
    assert failed["exit_code"] == 3 and failed["pid"] == 12 and failed["local_rank"] == 1
    assert failed["error"]["message"]["message"] == "boom"
    assert got[4]["round"] == 3 and got[4]["world_size"] == 4 and got[4]["rank"] == 1
    assert got[5]["source"] == "rendezvous" and "Timeout" in got[5]["message"]
    assert got[6]["round"] == 4 and "x_node" not in got[6] and "x_attempt" not in got[6]
    assert got[7]["x_node"] == "other" and got[7]["source"] == "agent"


def test_worker_group_restart_is_derived(tmp_path):
    log = EventLog(JsonlWriter(tmp_path / "e.jsonl"), CTX)
    h = TorchEventHandler(log)
    lg = logging.getLogger("test-telemetry-restart")
    lg.addHandler(h)
    lg.propagate = False
    for restarts in (0, 1, 1):  # start, restart after a failure, restart for a new node
        for lr in (0, 1):
            lg.warning(_agent_event("START", EventSource.WORKER, rank=lr, local_rank=lr,
                                    restarts=restarts).serialize())
    lg.removeHandler(h)
    kinds = [(ln["kind"], ln.get("reason")) for ln in lines(tmp_path / "e.jsonl")
             if ln["kind"].startswith("workers.")]
    assert kinds == [("workers.started", None), ("workers.restart", "failure"),
                     ("workers.started", None), ("workers.restart", "membership"),
                     ("workers.started", None)]


def test_chatty_kinds_are_throttled(tmp_path):
    log = EventLog(JsonlWriter(tmp_path / "e.jsonl"), CTX, chatty_interval_s=60.0)
    for i in range(100):
        log.record("rendezvous.heartbeat", time=1000.0 + i * 5)  # 500 s of 5 s heartbeats
    log.record("rendezvous.heartbeat_failed", time=2000.0)
    got = lines(tmp_path / "e.jsonl")
    beats = [ln for ln in got if ln["kind"] == "rendezvous.heartbeat"]
    assert len(beats) == 9 and beats[1]["suppressed"] == 11
    assert got[-1]["kind"] == "rendezvous.heartbeat_failed"


def test_real_local_elastic_agent_run(tmp_path):
    """End to end: a real LocalElasticAgent, one worker failing once, then succeeding."""
    script = tmp_path / "agent.py"
    script.write_text(textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(REPO)!r})
        os.environ["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
        from torch.distributed import TCPStore
        from torch.distributed.elastic.agent.server.api import WorkerSpec
        from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent
        from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
        from torch.distributed.elastic.rendezvous.c10d_rendezvous_backend import (
            C10dRendezvousBackend)
        from torch.distributed.elastic.rendezvous.dynamic_rendezvous import (
            DynamicRendezvousHandler)
        from hpc_elastic import telemetry
        jd = sys.argv[1]
        tel = telemetry.install(jd, "n0", job_id="j", attempt=0, torch_rdzv_events=True)
        os.environ.update(tel.worker_env())
        store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
        rdzv = DynamicRendezvousHandler.from_backend(
            "r", store, C10dRendezvousBackend(store, "r"), 1, 1)
        worker = ("import os, sys; sys.path.insert(0, {str(REPO)!r});"
                  "from hpc_elastic.telemetry import log_metric;"
                  "log_metric('loss', 0.5, step=1);"
                  "sys.exit(3 if os.environ['TORCHELASTIC_RESTART_COUNT'] == '0' else 0)")
        spec = WorkerSpec(role="trainer", local_world_size=1, rdzv_handler=rdzv,
                          entrypoint=sys.executable, args=("-c", worker), max_restarts=1,
                          monitor_interval=0.05)
        agent = LocalElasticAgent(spec, DefaultLogsSpecs(log_dir=jd + "/tlogs"))
        print(agent.run().state.name)
        tel.close()
    """))
    jd = tmp_path / "job"
    proc = subprocess.run([sys.executable, str(script), str(jd)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "SUCCEEDED" in proc.stdout
    kinds = [ln["kind"] for ln in lines(JobDir(jd).events("n0"))]
    for k in ("rendezvous.started", "rendezvous.completed", "agent.rendezvous", "workers.started",
              "worker.started", "workers.restart", "worker.succeeded"):
        assert k in kinds, (k, kinds)
    names = {ln["name"] for ln in lines(JobDir(jd).metrics("n0"))}
    assert {"workers.trainer.remaining_restarts", "SimpleElasticAgent.run.success"} <= names
    rank_files = sorted((jd / "nodes/n0/workers/attempt-0").glob("restart-*/rank-0/metrics.jsonl"))
    assert [p.parent.parent.name for p in rank_files] == ["restart-0", "restart-1"]
    assert lines(rank_files[1])[0]["restart"] == 1


# --- the writer and the reader ------------------------------------------------------------------


_KILLED_WRITER = """
import sys
sys.path.insert(0, {repo!r})
from hpc_elastic.telemetry.jsonl import JsonlWriter
w = JsonlWriter(sys.argv[1])
i = 0
while True:
    w.write({{"i": i, "pad": "x" * 200}})
    i += 1
    if i == 200:
        print("ready", flush=True)
"""


def test_sigkilled_writer_and_truncated_tail(tmp_path):
    path = tmp_path / "e.jsonl"
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER.format(repo=str(REPO)),
                             str(path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    with open(path, "ab") as fh:  # what a torn write would leave
        fh.write(b'{"i": -1, "pad": "xx')
    stats = ReadStats()
    got = list(read_jsonl(path, stats))
    assert len(got) >= 200 and [r["i"] for r in got] == list(range(len(got)))
    assert stats.skipped == 1 and stats.truncated_tail and stats.records == len(got)
    # garbage in the middle and a complete last object without its newline
    with open(path, "ab") as fh:
        fh.write(b'\nnot json\n\x00\x00{"i": "last"}')
    stats = ReadStats()
    got2 = list(read_jsonl(path, stats))
    assert got2[-1] == {"i": "last"} and stats.skipped == 2 and not stats.truncated_tail
    assert list(read_jsonl(tmp_path / "missing.jsonl", missing_ok=True)) == []


def test_unwritable_dir_warns_once_and_goes_on(tmp_path, capfd):
    afile = tmp_path / "afile"
    afile.write_text("a regular file, not a directory")
    t = telemetry.install(afile, "n0", job_id="j", attempt=0)
    try:
        for _ in range(3):
            t.events.record("shutdown", reason="test")
            torch_metrics.put_metric("x", 1, "app")
            torch_events.record(_agent_event("START", EventSource.WORKER, rank=0), "null")
        start = time.perf_counter()
        for _ in range(1000):
            t.events.record("shutdown")
        assert (time.perf_counter() - start) / 1000 < 50e-6  # a no-op now
    finally:
        t.close()
    err = capfd.readouterr().err
    assert err.count("hpc_elastic telemetry: WARNING") == 1, err
    assert "afile" in err


def test_full_disk_warns_once(capfd):
    w = JsonlWriter("/dev/full")  # every write: ENOSPC
    assert not w.write({"a": 1}) and not w.write({"a": 2}) and w.disabled
    err = capfd.readouterr().err
    assert err.count("WARNING") == 1 and "No space" in err


def test_removed_file_is_noticed(tmp_path, capfd):
    path = tmp_path / "d" / "e.jsonl"
    w = JsonlWriter(path)
    assert w.write({"a": 1})
    path.unlink()
    path.parent.rmdir()
    w._next_link_check = 0.0  # do not wait for the periodic check
    assert not w.write({"a": 2}) and not w.write({"a": 3})
    assert capfd.readouterr().err.count("WARNING") == 1


def test_concurrent_threads_every_line_parses(tmp_path):
    log = EventLog(JsonlWriter(tmp_path / "e.jsonl"), CTX)
    h = metric_handler(tmp_path / "m.jsonl", burst=10**9)  # no throttling: every sample a line
    n_threads, n = 8, 300

    def work(t: int) -> None:
        for i in range(n):
            log.record("test.event", thread=t, i=i, pad="y" * (i % 50))
            h.emit(MetricData(time.time(), "app", f"t{t}", i))

    threads = [threading.Thread(target=work, args=(t,)) for t in range(n_threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    h.close()
    ev = lines(tmp_path / "e.jsonl")
    assert len(ev) == n_threads * n
    assert sorted((e["thread"], e["i"]) for e in ev) == [
        (t, i) for t in range(n_threads) for i in range(n)]
    assert len(lines(tmp_path / "m.jsonl")) == n_threads * n


def test_forked_child_does_not_write(tmp_path):
    path = tmp_path / "e.jsonl"
    w = JsonlWriter(path)
    w.write({"who": "parent"})
    pid = os.fork()
    if pid == 0:  # child
        os._exit(0 if w.write({"who": "child"}) is False else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert [r["who"] for r in lines(path)] == ["parent"]


# --- the worker helper --------------------------------------------------------------------------


_WORKER = """
import sys
sys.path.insert(0, {repo!r})
from hpc_elastic.telemetry.worker_metrics import enabled, log_metric, log_metrics
log_metric("loss", 0.25, step=3)
log_metrics({{"samples_per_s": 1000.5, "lr": 0.1}}, step=3)
print(enabled(), "torch" in sys.modules)
"""


def test_worker_metrics_helper_writes_rank_file(tmp_path, tel):
    env = {**os.environ, **tel.worker_env(), "RANK": "5", "LOCAL_RANK": "1",
           "TORCHELASTIC_RESTART_COUNT": "2"}
    proc = subprocess.run([sys.executable, "-c", _WORKER.format(repo=str(REPO))], env=env,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["True", "False"]  # enabled, and torch not imported
    path = tel.jobdir.worker_logs("n0", 2, 2, 5) / "metrics.jsonl"
    got = lines(path)
    assert [(g["name"], g["value"]) for g in got] == [
        ("loss", 0.25), ("samples_per_s", 1000.5), ("lr", 0.1)]
    assert got[0] | {"time": 0} == {
        "v": SCHEMA_VERSION, "time": 0, "job_id": "job-1", "attempt": 2, "node": "n0",
        "rank": 5, "local_rank": 1, "restart": 2, "group": "worker", "name": "loss",
        "value": 0.25, "step": 3}


def test_worker_metrics_helper_prefers_the_worker_dir(tmp_path, tel):
    env = {**os.environ, **tel.worker_env(), "RANK": "5",
           "HPC_ELASTIC_WORKER_DIR": str(tmp_path / "w")}  # set per worker by the agent
    subprocess.run([sys.executable, "-c", _WORKER.format(repo=str(REPO))], env=env, check=True,
                   timeout=30)
    assert len(lines(tmp_path / "w" / "metrics.jsonl")) == 3


def test_worker_metrics_helper_is_a_noop_outside_hpc_elastic(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("HPC_ELASTIC_")}
    proc = subprocess.run([sys.executable, "-c", _WORKER.format(repo=str(REPO))], env=env,
                          capture_output=True, text=True, timeout=30, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False", "False"] and proc.stderr == ""
    assert list(tmp_path.iterdir()) == []


def test_worker_metrics_unwritable_path_is_quiet_noop(tmp_path):
    (tmp_path / "afile").write_text("x")
    env = {**os.environ, ENV_WORKER_METRICS: str(tmp_path / "afile/rank-{rank}/m.jsonl"),
           "RANK": "0"}
    proc = subprocess.run([sys.executable, "-c", _WORKER.format(repo=str(REPO))], env=env,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0 and proc.stderr.count("WARNING") == 1, proc.stderr


_FORKING_WORKER = """
import os, sys
sys.path.insert(0, {repo!r})
from hpc_elastic.telemetry.worker_metrics import log_metric
pid = os.fork()  # like a DataLoader worker: same environment, same rank
log_metric("who", "child" if pid == 0 else "parent")
if pid == 0:
    os._exit(0)
os.waitpid(pid, 0)
"""


def test_worker_metrics_forked_child_stays_quiet(tmp_path):
    env = {**os.environ, ENV_WORKER_METRICS: str(tmp_path / "rank-{rank}.jsonl"), "RANK": "3"}
    proc = subprocess.run([sys.executable, "-c", _FORKING_WORKER.format(repo=str(REPO))],
                          env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert [r["value"] for r in lines(tmp_path / "rank-3.jsonl")] == ["parent"]
    env.pop("RANK")  # the template names RANK but this is no worker (e.g. the agent): no-op
    subprocess.run([sys.executable, "-c", _FORKING_WORKER.format(repo=str(REPO))], env=env,
                   check=True, timeout=30)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rank-3.jsonl"]


# --- install / close ----------------------------------------------------------------------------


def test_install_close_restores_torch(tmp_path):
    from torch.distributed.elastic.events import handlers

    t = telemetry.install(tmp_path, "n0", job_id="j")
    assert isinstance(handlers.get_logging_handler("dynamic_rendezvous"), logging.NullHandler)
    t = telemetry.install(tmp_path, "n0", job_id="j", torch_rdzv_events=True)
    assert not isinstance(handlers.get_logging_handler("dynamic_rendezvous"), logging.NullHandler)
    t2 = telemetry.install(tmp_path, "n1", job_id="j")  # replaces the first
    assert t._closed
    t2.close()
    assert isinstance(handlers.get_logging_handler("dynamic_rendezvous"), logging.NullHandler)
    for dest in ("null", "console", "dynamic_rendezvous"):
        assert not any(isinstance(h, TorchEventHandler)
                       for h in logging.getLogger(f"torchelastic-events-{dest}").handlers)
    assert isinstance(torch_metrics.getStream("x").handler, torch_metrics.NullMetricHandler)
