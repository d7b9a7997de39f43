"""Telemetry cost: microseconds per event/metric, and agent CPU with telemetry on vs off.

    .venv/bin/python benchmarks/bench_telemetry.py   # ~10 min: micro + 4 rounds of ~130 s
    .venv/bin/python benchmarks/bench_telemetry.py --seconds 60 --drain-interval 60  # ~6 min
    .venv/bin/python benchmarks/bench_telemetry.py --smoke   # does it still run? (tiny sizes)

Part 1 times each path in-process (files in a temporary directory on local disk): warm loops,
and the per-tick metric calls *cold* (after a 20 ms sleep), paired against torch's own
NullMetricHandler.

Part 2 runs real torch ``LocalElasticAgent``s as the product does by default (hpc_elastic's
sharedfs rendezvous in a temporary directory, ``monitor_interval`` = hpc_elastic's default 0.5 s;
``--monitor-interval 0.1`` is torch's default, ``--rdzv c10d`` torch's rendezvous), each with 2
workers that sleep, one fresh process per agent. Why it is built this way: an idle agent uses
about 1 ms of CPU per second, and two agent processes started together differ by up to +-10 %
and more (which core, what else runs there, memory layout), so a 1 % effect needs references
measured the same way at the same moment. Each round therefore runs, *at the same time*: 2 agents
with telemetry off, 2 with it on, and one A/B agent (on, but switching torch's metric handler
between ours and torch's null handler every ``--ab-block`` ticks). Measured per agent: its own
CPU (``time.process_time``: all its threads, not the workers'):

* steady state: a ``--seconds`` window (default: one metric drain period, 120 s) that opens
  ``--warmup`` s after the start; ``on`` agents ``flush()`` once just before it, so that the
  window holds what a long run repeats (one metric drain per period), not the one-time creation
  of the metrics file;
* whole run: ``agent.run()`` plus ``close()`` (rendezvous, worker start, end, final flush);
* whole process: as ``sacct`` or ``time`` count the agent (``getrusage``), interpreter start and
  imports included; telemetry's share adds the import of its modules and ``install()``.

Reported: the on/off ratio per round (mean of the 2 on / mean of the 2 off), its median and range
over rounds and pooled over all runs, next to the on/on and off/off ratios of the same rounds:
the noise floor of that comparison. Then telemetry's own CPU, measured directly in the same
agents: the metric drain thread (``/proc/self/task/<tid>/schedstat``: exact), the event handler
(each call timed with ``thread_time_ns``), ``close()``, and the queue appends on the main thread,
measured in the A/B agents: the CPU of torch's per-tick ``put_metric`` calls (each timed) with
our handler minus with the null handler, ticks of both arms interleaved in one process (the
first 2 ticks after a switch are dropped: the interpreter re-specialises the call site). With
both arms ours, that difference came out at 0.5 and 0.1 us per tick on the dev VM: no bias.
Targets: < 100 us per event, < 1 % agent CPU.
"""

from __future__ import annotations

import argparse
import compileall
import inspect
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PER_TICK = (
    ("workers.trainer.healthy", 1),
    ("workers.trainer.remaining_restarts", 3),
    ("LocalElasticAgent._monitor_workers.success", 1),
    ("LocalElasticAgent._monitor_workers.duration.ms", 0),
)
# One round: the agents that run at the same time (the order they are started in alternates).
ROUND = ("off", "on", "off", "on", "ab")


def _per_call_us(fn: Callable[[int], object], n: int) -> float:
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
        handlers = {"null": torch_metrics.NullMetricHandler(), "ours": tel.metrics.queue}
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


def micro(n: int, ticks: int) -> dict[str, float]:
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
        out["metric: put_metric (our emit is list.extend)"] = _per_call_us(
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
    out["cold (after a 20 ms sleep), per-tick put_metric with torch's NullMetricHandler (CPU)"] = (
        null)
    out["cold (after a 20 ms sleep), per-tick put_metric with ours (CPU)"] = ours
    return out


# One agent process. argv: jobdir mode warmup window monitor_interval rdzv ab_block repo
# torch_rdzv_events(0/1) drain_interval
_AGENT = r"""
import json, os, statistics, sys, threading, time
jd, mode, warmup, window = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
interval, rdzv_kind, ab_block = float(sys.argv[5]), sys.argv[6], int(sys.argv[7])
rdzv_events, drain_interval = sys.argv[9] == "1", float(sys.argv[10])
sys.path.insert(0, sys.argv[8])
os.environ["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
from torch.distributed.elastic import metrics as torch_metrics
from torch.distributed.elastic.agent.server.api import WorkerSpec
from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent
from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs

seconds = warmup + window + 1.0  # the workers' life: the run ends about 1 s after the window
tel = None
events_ns = [0]
install_cpu = time.process_time_ns()
if mode != "off":
    from hpc_elastic import telemetry
    from hpc_elastic.telemetry.events import TorchEventHandler

    emit = TorchEventHandler.emit
    def timed_emit(self, record):
        t = time.thread_time_ns()
        try:
            return emit(self, record)
        finally:
            events_ns[0] += time.thread_time_ns() - t
    TorchEventHandler.emit = timed_emit
    tel = telemetry.install(jd, "n0", job_id="bench", attempt=0, torch_rdzv_events=rdzv_events,
                            metric_drain_interval_s=drain_interval)
install_cpu = time.process_time_ns() - install_cpu
if rdzv_kind == "sharedfs":
    from hpc_elastic.rendezvous import create_handler
    rdzv = create_handler(os.path.join(jd, "rdzv"), "r", 1, 1, local_addr="127.0.0.1")
else:
    from torch.distributed import TCPStore
    from torch.distributed.elastic.rendezvous.c10d_rendezvous_backend import (
        C10dRendezvousBackend)
    from torch.distributed.elastic.rendezvous.dynamic_rendezvous import DynamicRendezvousHandler
    store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    rdzv = DynamicRendezvousHandler.from_backend(
        "r", store, C10dRendezvousBackend(store, "r"), 1, 1)
spec = WorkerSpec(role="trainer", local_world_size=2, rdzv_handler=rdzv,
                  entrypoint=sys.executable, args=("-c", f"import time; time.sleep({seconds})"),
                  max_restarts=0, monitor_interval=interval)
agent = LocalElasticAgent(spec, DefaultLogsSpecs(log_dir=os.path.join(jd, "tlogs")))
t_start = time.monotonic()
in_window = [False]

def drain_ns():
    if tel is None:
        return 0
    with open(f"/proc/self/task/{tel.metrics._thread.native_id}/schedstat") as fh:
        return int(fh.read().split()[0])

# A/B agent: time torch's per-tick put_metric calls; switch handlers every ab_block ticks.
ab = {"ours": [], "null": []}  # per-tick CPU of the put_metric calls (ns), inside the window
if mode == "ab":
    import torch.distributed.elastic.agent.server.api as agent_api
    import torch.distributed.elastic.metrics.api as metrics_api

    put = metrics_api.put_metric
    null = torch_metrics.NullMetricHandler()
    st = {"arm": "ours", "tick_ns": 0, "ticks": 0}
    clock = time.thread_time_ns

    def timed_put(name, value, group="torchelastic"):
        t = clock()
        put(name, value, group)
        st["tick_ns"] += clock() - t
        if name.startswith("workers.") and not name.endswith(".remaining_restarts"):
            end_of_tick()

    def end_of_tick():  # torch's last put_metric of a tick: its worker-group state
        st["ticks"] += 1
        if st["ticks"] > 2 and in_window[0]:  # not the 2 ticks after a switch
            ab[st["arm"]].append(st["tick_ns"])
        st["tick_ns"] = 0
        if st["ticks"] == ab_block:
            st["ticks"] = 0
            st["arm"] = "null" if st["arm"] == "ours" else "ours"
            torch_metrics.configure(null if st["arm"] == "null" else tel.metrics.queue)

    metrics_api.put_metric = timed_put  # @prof's calls
    agent_api.put_metric = timed_put  # the agent loop's own

w = {}
def snap(tag):
    w["cpu" + tag], w["t" + tag] = time.process_time_ns(), time.monotonic()
    w["drain" + tag], w["ev" + tag] = drain_ns(), events_ns[0]
    w["drained" + tag] = tel.metrics.drained if tel is not None else 0

def sampler():
    time.sleep(max(0.0, warmup - 1.0 - (time.monotonic() - t_start)))
    if tel is not None:
        t = time.thread_time_ns()
        tel.flush()  # file created, first lines written: the window sees only what repeats
        w["bench_flush_ns"] = time.thread_time_ns() - t
    time.sleep(max(0.0, warmup - (time.monotonic() - t_start)))
    snap("0")
    in_window[0] = True
    time.sleep(max(0.0, window - (time.monotonic() - w["t0"])))
    in_window[0] = False
    snap("1")

threading.Thread(target=sampler, daemon=True).start()
cpu0 = time.process_time_ns()
state = agent.run().state.name
out = {"mode": mode, "state": state, "install_ms": install_cpu / 1e6}
if tel is not None:
    out["drain_run_ms"] = drain_ns() / 1e6
    out["events_run_ms"] = events_ns[0] / 1e6
    out["metric_calls"] = tel.metrics.drained + len(tel.metrics.queue) // 4
    t = time.thread_time_ns()
    tel.close()
    out["close_ms"] = (time.thread_time_ns() - t) / 1e6
out["run_cpu_ms"] = (time.process_time_ns() - cpu0) / 1e6
# The whole process, as sacct or time(1) count the agent: interpreter start and imports included.
import resource
ru = resource.getrusage(resource.RUSAGE_SELF)  # this process only: the workers are children
out["process_cpu_ms"] = (ru.ru_utime + ru.ru_stime) * 1e3
if tel is not None:
    out["bench_flush_ms"] = w.get("bench_flush_ns", 0) / 1e6
span = w["t1"] - w["t0"]
out["steady_us_s"] = (w["cpu1"] - w["cpu0"]) / 1e3 / span
if tel is not None:
    out["drain_us_s"] = (w["drain1"] - w["drain0"]) / 1e3 / span
    out["events_us_s"] = (w["ev1"] - w["ev0"]) / 1e3 / span
    out["samples_per_s"] = (w["drained1"] - w["drained0"]) / span
if mode == "ab":
    out["ab_ticks"] = [len(ab["ours"]), len(ab["null"])]
    out["ab_tick_us"] = {k: statistics.mean(v) / 1e3 for k, v in ab.items()}
print(json.dumps(out))
"""


def agent_args(jobdir: str, mode: str, args: argparse.Namespace) -> list[str]:
    return [sys.executable, "-c", _AGENT, jobdir, mode, str(args.warmup), str(args.seconds),
            str(args.monitor_interval), args.rdzv, str(args.ab_block), str(REPO),
            str(int(args.torch_rdzv_events)), str(args.drain_interval)]


def run_round(modes: Sequence[str], args: argparse.Namespace) -> list[dict]:
    """Start one agent per mode at once; wait for all; their results in ``modes`` order."""
    with tempfile.TemporaryDirectory() as tmp:
        procs = []
        for i, mode in enumerate(modes):
            jd = os.path.join(tmp, f"a{i}")
            procs.append(subprocess.Popen(agent_args(jd, mode, args), stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, text=True))
        results = []
        for proc in procs:
            out, err = proc.communicate(timeout=args.warmup + args.seconds + 180)
            if proc.returncode != 0:
                raise RuntimeError(err[-3000:])
            results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def _mean(runs: list[dict], mode: str, key: str) -> float:
    return statistics.mean(r[key] for r in runs if r["mode"] == mode)


def _ratio(runs: list[dict], key: str, a: str, b: str) -> float:
    return _mean(runs, a, key) / _mean(runs, b, key)


def _pair_ratio(runs: list[dict], mode: str, key: str) -> float:
    """First / second agent of the same mode in a round: the noise floor of the on/off ratio."""
    vals = [r[key] for r in runs if r["mode"] == mode]
    return vals[0] / vals[1]


def _pct(x: float) -> str:
    return f"{100 * (x - 1):+.1f} %"


def _spread(xs: list[float]) -> str:
    return f"{_pct(statistics.median(xs))} ({_pct(min(xs))} .. {_pct(max(xs))})"


def report_agents(rounds: list[list[dict]], args: argparse.Namespace) -> None:
    print(f"\n## Agent CPU: LocalElasticAgent, 2 sleeping workers, {args.rdzv} rendezvous, "
          f"monitor_interval {args.monitor_interval} s; {len(rounds)} rounds of "
          f"{' + '.join(ROUND)} agents at once, steady window {args.seconds:.0f} s\n")
    print("| round | off: steady us/s (each) | on: steady us/s (each) | on/off | on/on | off/off "
          "| whole run ms: off | on | on/off |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for i, runs in enumerate(rounds):
        each = {m: ", ".join(f"{r['steady_us_s']:.0f}" for r in runs if r["mode"] == m)
                for m in ("off", "on")}
        whole = {m: ", ".join(f"{r['run_cpu_ms']:.1f}" for r in runs if r["mode"] == m)
                 for m in ("off", "on")}
        print(f"| {i + 1} | {each['off']} | {each['on']} | "
              f"{_pct(_ratio(runs, 'steady_us_s', 'on', 'off'))} | "
              f"{_pct(_pair_ratio(runs, 'on', 'steady_us_s'))} | "
              f"{_pct(_pair_ratio(runs, 'off', 'steady_us_s'))} | {whole['off']} | {whole['on']} | "
              f"{_pct(_ratio(runs, 'run_cpu_ms', 'on', 'off'))} |")
    allruns = [r for runs in rounds for r in runs]
    steady = [_ratio(runs, "steady_us_s", "on", "off") for runs in rounds]
    whole = [_ratio(runs, "run_cpu_ms", "on", "off") for runs in rounds]
    floor = [abs(_pair_ratio(runs, m, "steady_us_s") - 1) for runs in rounds for m in ("on", "off")]
    print(f"\non/off, steady state, median (min .. max) over rounds: {_spread(steady)}; pooled "
          f"over all runs: {_pct(_ratio(allruns, 'steady_us_s', 'on', 'off'))}")
    print(f"on/off, whole run: {_spread(whole)}; pooled: "
          f"{_pct(_ratio(allruns, 'run_cpu_ms', 'on', 'off'))}")
    print(f"noise floor: |on/on - 1| and |off/off - 1| of the same rounds, median "
          f"{100 * statistics.median(floor):.1f} %, max {100 * max(floor):.1f} %")


def report_ab(rounds: list[list[dict]]) -> float:
    """The A/B agents' table; returns the extra CPU per tick of our emit (median over agents)."""
    abs_ = [r for runs in rounds for r in runs if r["mode"] == "ab"]
    per_tick = [r["ab_tick_us"]["ours"] - r["ab_tick_us"]["null"] for r in abs_]
    print("\n### A/B agents: torch's per-tick put_metric calls, our handler vs torch's null "
          "handler, ticks interleaved in one process\n")
    print("| round | ticks (ours, null) | CPU per tick: null | ours | extra per tick |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for i, r in enumerate(abs_):
        t = r["ab_tick_us"]
        print(f"| {i + 1} | {r['ab_ticks'][0]}, {r['ab_ticks'][1]} | {t['null']:.2f} us | "
              f"{t['ours']:.2f} us | {t['ours'] - t['null']:+.2f} us |")
    extra = statistics.median(per_tick)
    print(f"\nextra CPU of our emit per tick ({len(PER_TICK)} put_metric calls), median over A/B "
          f"agents: {extra:+.2f} us (range {min(per_tick):+.2f} .. {max(per_tick):+.2f})")
    return extra


def report_accounting(rounds: list[list[dict]], extra_tick_us: float) -> None:
    """Telemetry's own CPU, measured in the 'on' agents, against the 'off' agents' CPU."""
    allruns = [r for runs in rounds for r in runs]
    ons = [r for r in allruns if r["mode"] == "on"]
    base = statistics.mean(r["steady_us_s"] for r in allruns if r["mode"] == "off")
    drain = statistics.mean(r["drain_us_s"] for r in ons)
    events = statistics.mean(r["events_us_s"] for r in ons)
    rate = statistics.mean(r["samples_per_s"] for r in ons)
    appends = rate / len(PER_TICK) * extra_tick_us
    total = drain + events + appends
    print("\n### Telemetry's own CPU, steady state, measured directly (mean of the 'on' agents)"
          "\n")
    print("| metric samples/s | drain thread | event handler | appends (ticks/s x extra per "
          "tick) | total | agent CPU (off) | share |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    print(f"| {rate:.1f} | {drain:.2f} us/s | {events:.2f} us/s | {appends:.2f} us/s | "
          f"{total:.2f} us/s | {base:.0f} us/s | {100 * total / base:.2f} % |")
    shares = [(r["drain_us_s"] + r["events_us_s"] + r["samples_per_s"] / len(PER_TICK)
               * extra_tick_us) / base for r in ons]
    print(f"\nshare per 'on' agent: {', '.join(f'{100 * x:.2f} %' for x in shares)}")

    run_base = statistics.mean(r["run_cpu_ms"] for r in allruns if r["mode"] == "off")
    proc_base = statistics.mean(r["process_cpu_ms"] for r in allruns if r["mode"] == "off")
    parts = {k: statistics.mean(r[k] for r in ons)
             for k in ("drain_run_ms", "events_run_ms", "close_ms", "metric_calls", "install_ms",
                       "bench_flush_ms", "process_cpu_ms")}
    run_appends = parts["metric_calls"] / len(PER_TICK) * extra_tick_us / 1e3
    run_total = parts["drain_run_ms"] + parts["events_run_ms"] + parts["close_ms"] + run_appends
    proc_total = run_total + parts["install_ms"]
    print("\n### Telemetry's own CPU, whole run (agent.run() + close(), mean of the 'on' agents)\n")
    print("| drain thread | event handler | close() (flush, fsync) | appends | total | agent CPU "
          "(off) | share |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    print(f"| {parts['drain_run_ms']:.2f} ms | {parts['events_run_ms']:.2f} ms | "
          f"{parts['close_ms']:.2f} ms | {run_appends:.2f} ms | {run_total:.2f} ms | "
          f"{run_base:.1f} ms | {100 * run_total / run_base:.2f} % |")
    print("\n(not in the total: the benchmark's own flush() before the steady window, "
          f"{parts['bench_flush_ms']:.2f} ms, which a real agent does not do)")
    print("\n### Telemetry's own CPU, whole agent process (interpreter start and imports "
          "included, as sacct and time(1) count it)\n")
    print("| import + install() | run (as above) | total | process CPU: off | on | share |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    print(f"| {parts['install_ms']:.1f} ms | {run_total:.2f} ms | {proc_total:.1f} ms | "
          f"{proc_base:.0f} ms | {parts['process_cpu_ms']:.0f} ms | "
          f"{100 * proc_total / proc_base:.2f} % |")


def install_default(name: str) -> float:
    """A default of ``telemetry.install``, so that the benchmark follows the product's."""
    from hpc_elastic.telemetry.wiring import install

    return float(inspect.signature(install).parameters[name].default)


def main() -> None:
    from hpc_elastic.config import JobConfig

    default_interval = JobConfig.__dataclass_fields__["monitor_interval"].default
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=20000, help="calls per micro benchmark")
    ap.add_argument("--ticks", type=int, default=300, help="paired cold ticks in part 1")
    ap.add_argument("--seconds", type=float, default=None,
                    help="steady-state window of each agent; default: the metric drain interval "
                    "(use a multiple of it, so that every window holds the same number of drains)")
    ap.add_argument("--repeats", type=int, default=4,
                    help=f"rounds of agent runs ({len(ROUND)} agents at once: {', '.join(ROUND)})")
    ap.add_argument("--warmup", type=float, default=8.0,
                    help="seconds after the start before the steady-state window opens")
    ap.add_argument("--monitor-interval", type=float, default=default_interval,
                    help="the agents' monitor_interval (hpc_elastic's default; torch's is 0.1)")
    ap.add_argument("--rdzv", choices=("sharedfs", "c10d"), default="sharedfs",
                    help="rendezvous: hpc_elastic's (default) or torch's c10d over a TCPStore")
    ap.add_argument("--torch-rdzv-events", action="store_true",
                    help="install(torch_rdzv_events=True) (with --rdzv c10d: torch's own "
                    "rendezvous events, ~1 ms of torch's CPU each)")
    ap.add_argument("--drain-interval", type=float,
                    default=install_default("metric_drain_interval_s"),
                    help="install(metric_drain_interval_s=...) of the 'on' and A/B agents")
    ap.add_argument("--ab-block", type=int, default=10,
                    help="ticks per handler switch in the A/B agents")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny sizes, to check that the benchmark runs (the test suite does); "
                    "its numbers mean nothing")
    args = ap.parse_args()
    if args.smoke:
        args.n, args.ticks, args.repeats, args.ab_block = 500, 20, 1, 3
        args.seconds, args.warmup, args.drain_interval = 4.0, 3.0, 1.0
        args.monitor_interval = 0.1  # enough A/B ticks in the short window
    if args.seconds is None:
        args.seconds = args.drain_interval

    # Import costs count (part of "import + install()"): measure them as an installed package
    # pays them, from bytecode. The dev VM sets PYTHONDONTWRITEBYTECODE=1, which would make every
    # agent compile hpc_elastic from source (~6 ms instead of ~2 ms for the telemetry modules).
    compileall.compile_dir(str(REPO / "hpc_elastic"), quiet=1)
    results = micro(args.n, args.ticks)
    print(f"## Telemetry micro benchmark ({args.n} calls each, local disk)\n")
    print("| path | us per call |\n| --- | ---: |")
    for name, us in results.items():
        print(f"| {name} | {us:.2f} |")

    rounds = []
    for i in range(args.repeats):
        modes = ROUND if i % 2 == 0 else ROUND[1::-1] + ROUND[2:]  # alternate who starts first
        runs = run_round(modes, args)
        bad = [r for r in runs if r["state"] != "SUCCEEDED"]
        if bad:
            raise RuntimeError(f"agent did not succeed: {bad}")
        rounds.append(runs)
        print(f"\n(round {i + 1} done, load average {os.getloadavg()[0]:.1f})", flush=True)
    report_agents(rounds, args)
    report_accounting(rounds, report_ab(rounds))


if __name__ == "__main__":
    main()
