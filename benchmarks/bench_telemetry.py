"""Telemetry cost: microseconds per event/metric, and agent CPU with telemetry on vs off.

    .venv/bin/python benchmarks/bench_telemetry.py   # ~8 min: micro + 2 rounds x 3 modes x 70 s
    .venv/bin/python benchmarks/bench_telemetry.py --seconds 35 --repeats 1   # quicker

Part 1 times each path in-process (files in a temporary directory on local disk): warm loops,
and the per-tick metric calls *cold* (after a sleep, as in the agent's monitor loop), paired
against torch's own NullMetricHandler.

Part 2 runs a real ``LocalElasticAgent`` (torch's dynamic rendezvous over a loopback TCPStore,
2 workers that sleep, ``monitor_interval`` 0.1 s = torch's default) in a fresh process per run,
interleaving three modes: telemetry off, on (default install), on with torch's rendezvous events
switched on. It reads the agent process's CPU time (all its threads, not the workers) over the
whole ``agent.run()`` and over a steady-state window (``--warmup`` s after the start to 1 s
before the workers end). The agent is nearly idle (a few ms of CPU per second), so on a shared
machine an on/off difference of 1 % is far below run-to-run noise. The "on" runs therefore also
measure telemetry's own CPU: the metric drain thread's CPU (from
``/proc/self/task/<tid>/schedstat``, no instrumentation; in the steady window per drained sample,
times the sample rate), the event handler's CPU (each call timed with ``thread_time_ns``; the
timer's cost is included) and the queue appends (counted from the file x the cold per-call extra
of Part 1). Targets: < 100 us per event, < 1 % agent CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PER_TICK = (
    ("workers.trainer.healthy", 1),
    ("workers.trainer.remaining_restarts", 3),
    ("LocalElasticAgent._monitor_workers.success", 1),
    ("LocalElasticAgent._monitor_workers.duration.ms", 0),
)


def _per_call_us(fn, n: int) -> float:
    fn(0)  # open files, warm caches
    start = time.perf_counter()
    for i in range(n):
        fn(i)
    return (time.perf_counter() - start) / n * 1e6


def _cold_tick_us(ticks: int, sleep_s: float) -> tuple[float, float]:
    """CPU per put_metric of the 4 per-tick series after a sleep: (torch's null handler, ours).

    Paired: each round runs one tick with each handler, in alternating order, and the medians of
    the per-tick CPU times are compared.
    """
    from torch.distributed.elastic import metrics as torch_metrics

    from hpc_elastic import telemetry

    def tick() -> None:
        for name, value in PER_TICK:
            torch_metrics.put_metric(name, value)

    with tempfile.TemporaryDirectory() as tmp:
        tel = telemetry.install(tmp, "n0", job_id="bench")
        handlers = {"null": torch_metrics.NullMetricHandler(), "ours": tel.metrics}
        cpu: dict[str, list[int]] = {"null": [], "ours": []}
        for i in range(ticks):
            for mode in ("null", "ours") if i % 2 else ("ours", "null"):
                torch_metrics.configure(handlers[mode])
                time.sleep(sleep_s)
                t = time.thread_time_ns()
                tick()
                cpu[mode].append(time.thread_time_ns() - t)
        tel.close()
    null, ours = (statistics.median(cpu[m]) / 1e3 / len(PER_TICK) for m in ("null", "ours"))
    return null, ours


def micro(n: int, ticks: int) -> tuple[dict[str, float], float]:
    from torch.distributed.elastic import events as torch_events
    from torch.distributed.elastic import metrics as torch_metrics
    from torch.distributed.elastic.events.api import Event, EventSource, NodeState, RdzvEvent

    from hpc_elastic import telemetry
    from hpc_elastic.telemetry import worker_metrics

    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tel = telemetry.install(tmp, "n0", job_id="bench", attempt=0, metric_burst=10**9)
        md = {"run_id": "r", "global_rank": 3, "group_rank": 0, "worker_id": "123",
              "role": "trainer", "hostname": "h", "state": "START", "total_run_time": 0,
              "rdzv_backend": "sharedfs", "raw_error": None, "agent_restarts": 0,
              "duration_ms": None,
              "metadata": json.dumps({"group_world_size": 2, "entry_point": "train.py",
                                      "local_rank": [1], "role_rank": [3],
                                      "role_world_size": [8], "exit_code": [None],
                                      "worker_pid": [123]})}
        ev = Event("torchelastic.worker.status.START", EventSource.WORKER, metadata=md)
        rd = RdzvEvent("dynamic_rendezvous.py:DynamicRendezvousHandler.next_rendezvous", "r",
                       "The node 'x' has joined round 1 of the rendezvous 'r' as rank 0 in a "
                       "world of size 2.", "h", 1, NodeState.RUNNING, rank=0)
        out["event: EventLog.record (the agent's direct API) -> line"] = _per_call_us(
            lambda i: tel.events.record("preemption.signal", signal="SIGUSR1", i=i), n)
        out["event: torch events.record(Event) -> line (torch's own part included)"] = _per_call_us(
            lambda i: torch_events.record(ev, "null"), n)
        out["event: torch record_rdzv_event(RdzvEvent) -> line (torch's part included)"] = (
            _per_call_us(lambda i: torch_events.record_rdzv_event(rd), n))
        out["metric: put_metric (our emit is list += the sample)"] = _per_call_us(
            lambda i: torch_metrics.put_metric("bench.value", i, "app"), n)
        start = time.perf_counter()
        tel.metrics._drain()  # n samples of a rare series (burst huge): every one a line
        out["metric: drain, per sample written as a line"] = (time.perf_counter() - start) / n * 1e6
        tel.close()
        tel = telemetry.install(tmp, "n1", job_id="bench", attempt=0)
        for i in range(n // len(PER_TICK)):
            for name, value in PER_TICK:
                torch_metrics.put_metric(name, value + i % 2 * (name.endswith(".ms")))
        start = time.perf_counter()
        tel.metrics._drain()
        out["metric: drain, per per-tick sample (folded)"] = (
            (time.perf_counter() - start) / (n // len(PER_TICK) * len(PER_TICK)) * 1e6)
        tel.close()
        os.environ[telemetry.ENV_WORKER_METRICS] = os.path.join(tmp, "rank-{rank}.jsonl")
        os.environ.setdefault("RANK", "0")
        worker_metrics._state = None  # resolve again with the variables just set
        out["worker: log_metric -> line"] = _per_call_us(
            lambda i: worker_metrics.log_metric("loss", 0.5, step=i), n)
        del os.environ[telemetry.ENV_WORKER_METRICS]
        torch_metrics.configure(torch_metrics.NullMetricHandler())
        out["baseline: put_metric with torch's NullMetricHandler"] = _per_call_us(
            lambda i: torch_metrics.put_metric("bench.value", i, "app"), n)
        # telemetry closed: torch serializes and logs the events, nobody writes them
        out["baseline: torch events.record(Event) without telemetry"] = _per_call_us(
            lambda i: torch_events.record(ev, "null"), n)
        out["baseline: torch record_rdzv_event(RdzvEvent) without telemetry"] = _per_call_us(
            lambda i: torch_events.record_rdzv_event(rd), n)
    null, ours = _cold_tick_us(ticks, 0.02)
    out["cold, per-tick put_metric with torch's NullMetricHandler (CPU)"] = null
    out["cold, per-tick put_metric with ours (CPU)"] = ours
    return out, max(0.0, ours - null)


_AGENT = r"""
import json, os, sys, threading, time
sys.path.insert(0, sys.argv[4])
os.environ["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
from torch.distributed import TCPStore
from torch.distributed.elastic.agent.server.api import WorkerSpec
from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent
from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
from torch.distributed.elastic.rendezvous.c10d_rendezvous_backend import C10dRendezvousBackend
from torch.distributed.elastic.rendezvous.dynamic_rendezvous import DynamicRendezvousHandler

jd, mode, seconds, warmup = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[5])
events_ns = [0]
if mode != "off":
    from hpc_elastic import telemetry
    from hpc_elastic.telemetry.events import TorchEventHandler
    from hpc_elastic.telemetry.jsonl import read_jsonl

    emit = TorchEventHandler.emit
    def timed_emit(self, record):
        t = time.thread_time_ns()
        try:
            return emit(self, record)
        finally:
            events_ns[0] += time.thread_time_ns() - t
    TorchEventHandler.emit = timed_emit
    tel = telemetry.install(jd, "n0", job_id="bench", attempt=0,
                            torch_rdzv_events=mode == "on+rdzv")
store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
rdzv = DynamicRendezvousHandler.from_backend("r", store, C10dRendezvousBackend(store, "r"), 1, 1)
spec = WorkerSpec(role="trainer", local_world_size=2, rdzv_handler=rdzv,
                  entrypoint=sys.executable, args=("-c", f"import time; time.sleep({seconds})"),
                  max_restarts=0, monitor_interval=0.1)
agent = LocalElasticAgent(spec, DefaultLogsSpecs(log_dir=os.path.join(jd, "tlogs")))
window = {}

def drain_state():
    if mode == "off":
        return 0.0, 0
    with open(f"/proc/self/task/{tel.metrics._thread.native_id}/schedstat") as fh:
        return int(fh.read().split()[0]) / 1e9, tel.metrics.drained

def sample():  # steady state: from `warmup` s after the start to 1 s before the workers end
    t0 = time.monotonic()
    time.sleep(warmup)
    window["drain0"], window["drained0"] = drain_state()
    window["ev0"] = events_ns[0]
    window["cpu0"], window["t0"] = time.process_time(), time.monotonic()
    time.sleep(max(0.0, seconds - 1.0 - (time.monotonic() - t0)))
    window["cpu1"], window["t1"] = time.process_time(), time.monotonic()
    window["drain1"], window["drained1"] = drain_state()
    window["ev1"] = events_ns[0]

threading.Thread(target=sample, daemon=True).start()
cpu0, wall0 = time.process_time(), time.monotonic()
state = agent.run().state.name
cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
span = window["t1"] - window["t0"]
out = {"state": state, "cpu_s": cpu, "wall_s": wall,
       "steady_cpu_per_s": (window["cpu1"] - window["cpu0"]) / span}
if mode != "off":
    out["drain_cpu_s"] = drain_state()[0]  # before close(), which drains once more
    out["events_cpu_s"] = events_ns[0] / 1e9
    drained = window["drained1"] - window["drained0"]
    out["steady_drain_s_per_sample"] = (
        (window["drain1"] - window["drain0"]) / drained if drained else None)
    out["steady_events_cpu_per_s"] = (window["ev1"] - window["ev0"]) / 1e9 / span
    tel.close()
    node = os.path.join(jd, "nodes", "n0")
    ev = list(read_jsonl(os.path.join(node, "events.jsonl")))
    me = list(read_jsonl(os.path.join(node, "metrics.jsonl")))
    out["lines"] = [len(ev), len(me)]
    out["metric_calls"] = sum(m.get("count", 1) for m in me)
    out["event_calls"] = len(ev) + sum(e.get("suppressed", 0) for e in ev)
    out["metric_calls_per_s"] = out["metric_calls"] / wall
print(json.dumps(out))
"""

MODES = {
    "off": "telemetry off",
    "on": "telemetry on (default install)",
    "on+rdzv": "on + torch_rdzv_events=True",
}


def agent_run(mode: str, seconds: float, warmup: float) -> dict:
    with tempfile.TemporaryDirectory() as jd:
        proc = subprocess.run(
            [sys.executable, "-c", _AGENT, jd, mode, str(seconds), str(REPO), str(warmup)],
            capture_output=True, text=True, timeout=seconds + 120,
        )
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr[-3000:])
        return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=20000, help="calls per micro benchmark")
    ap.add_argument("--ticks", type=int, default=300, help="paired cold ticks in part 1")
    ap.add_argument("--seconds", type=float, default=70.0,
                    help="length of one agent run (> 2 metric drains of 30 s for the steady "
                    "state)")
    ap.add_argument("--repeats", type=int, default=2, help="rounds of agent runs (one per mode)")
    ap.add_argument("--warmup", type=float, default=5.0,
                    help="seconds after the start before the steady-state window opens")
    args = ap.parse_args()

    results, cold_extra_us = micro(args.n, args.ticks)
    print(f"## Telemetry micro benchmark ({args.n} calls each, local disk)\n")
    print("| path | us per call |\n| --- | ---: |")
    for name, us in results.items():
        print(f"| {name} | {us:.2f} |")

    runs: dict[str, list[dict]] = {m: [] for m in MODES}
    for _ in range(args.repeats):
        for mode in MODES:  # interleaved, so slow drifts of the machine hit every mode
            runs[mode].append(agent_run(mode, args.seconds, args.warmup))

    def mean(mode: str, key: str) -> float:
        return statistics.mean(r[key] for r in runs[mode])

    def each(mode: str, key: str, scale: float, fmt: str = ".1f") -> str:
        return ", ".join(f"{r[key] * scale:{fmt}}" for r in runs[mode])

    print(f"\n## Agent CPU: LocalElasticAgent, 2 workers, {args.seconds:.0f} s runs, "
          f"monitor_interval 0.1 s, torch dynamic rendezvous (c10d), {args.repeats} rounds\n")
    print("| mode | whole run: agent CPU, ms (each run) | vs off | steady state: agent CPU "
          "ms/s (each run) | vs off |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for mode, label in MODES.items():
        row = [label, f"{mean(mode, 'cpu_s') * 1e3:.1f} ({each(mode, 'cpu_s', 1e3)})", "",
               f"{mean(mode, 'steady_cpu_per_s') * 1e3:.2f} "
               f"({each(mode, 'steady_cpu_per_s', 1e3, '.2f')})", ""]
        if mode != "off":
            for col, key in ((2, "cpu_s"), (4, "steady_cpu_per_s")):
                row[col] = f"{100 * (mean(mode, key) / mean('off', key) - 1):+.1f} %"
        print("| " + " | ".join(row) + " |")

    base = mean("off", "cpu_s")
    print("\n### Telemetry's own CPU, whole run (per run, mean; includes one-time start-up)\n")
    print("| mode | metric calls | drain thread | event calls | event handler | queue appends "
          f"(x {cold_extra_us:.2f} us) | total | of agent CPU (off) | lines (events, metrics) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for mode in ("on", "on+rdzv"):
        calls = mean(mode, "metric_calls")
        drain, events = mean(mode, "drain_cpu_s"), mean(mode, "events_cpu_s")
        appends = calls * cold_extra_us / 1e6
        total = drain + events + appends
        lines = ", ".join(str(x) for x in runs[mode][0]["lines"])
        print(f"| {MODES[mode]} | {calls:.0f} | {drain * 1e3:.2f} ms | "
              f"{mean(mode, 'event_calls'):.0f} | {events * 1e3:.2f} ms | {appends * 1e3:.2f} ms | "
              f"{total * 1e3:.2f} ms | {100 * total / base:.2f} % | {lines} |")

    steady_base = mean("off", "steady_cpu_per_s")
    print("\n### Telemetry's own CPU, steady state (the part that grows with the run)\n")
    print("| mode | metric calls/s | drain, us per sample | drain | event handler | appends | "
          "total | of agent CPU (off) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for mode in ("on", "on+rdzv"):
        rate = mean(mode, "metric_calls_per_s")
        if any(r["steady_drain_s_per_sample"] is None for r in runs[mode]):
            print(f"| {MODES[mode]} | no drain in the window: use --seconds > 65 | | | | | | |")
            continue
        per_sample = mean(mode, "steady_drain_s_per_sample")
        drain = rate * per_sample
        events = mean(mode, "steady_events_cpu_per_s")
        appends = rate * cold_extra_us / 1e6
        total = drain + events + appends
        print(f"| {MODES[mode]} | {rate:.1f} | {per_sample * 1e6:.2f} | {drain * 1e6:.1f} us/s | "
              f"{events * 1e6:.1f} us/s | {appends * 1e6:.1f} us/s | {total * 1e6:.1f} us/s | "
              f"{100 * total / steady_base:.2f} % |")


if __name__ == "__main__":
    main()
