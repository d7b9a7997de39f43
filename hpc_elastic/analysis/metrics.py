"""``logs metrics``: count, mean, p50, p95, max per metric name, over agents' and workers' files.

Files are streamed line by line; only the numeric values are kept (an ``array('d')`` per series,
8 bytes a sample) because exact percentiles need them. Aggregate lines of the throttled agent
file (``count``/``sum``/``max`` of one window) contribute their full count, sum and max, so mean
and max stay exact. Their samples are gone, so a percentile of such a series is taken over the
windows' means, each weighted by its count (``approx``). It used to take the one sample each
line carries (its window's last), which put the median above the mean of series whose last
sample is typical but whose window holds a few small ones (``.duration.ms`` of a monitor tick).
"""

from __future__ import annotations

import math
from array import array
from dataclasses import dataclass, field
from typing import Any

from .fmt import footer
from .loader import Job


@dataclass
class Series:
    """Running statistics of one metric (one name, optionally one node)."""

    values: array = field(default_factory=lambda: array("d"))
    weights: array = field(default_factory=lambda: array("d"))  # samples behind each value
    count: int = 0
    total: float = 0.0
    maximum: float = -math.inf
    approx: bool = False
    sources: set[str] = field(default_factory=set)

    def add(self, rec: dict[str, Any], value: float) -> None:
        n = rec.get("count")
        s, mx = rec.get("sum"), rec.get("max")
        if isinstance(n, int) and n > 1 and isinstance(s, (int, float)) and math.isfinite(s):
            self.values.append(s / n)  # the window's mean stands for its n samples
            self.weights.append(n)
            self.count += n
            self.total += s
            self.maximum = max(self.maximum, mx if isinstance(mx, (int, float)) else value)
            self.approx = True
        else:
            self.values.append(value)
            self.weights.append(1.0)
            self.count += 1
            self.total += value
            self.maximum = max(self.maximum, value)

    def stats(self) -> dict[str, Any]:
        if self.approx:
            pairs = sorted(zip(self.values, self.weights, strict=True))
            p50, p95 = _weighted_pct(pairs, 50), _weighted_pct(pairs, 95)
        else:
            vals = sorted(self.values)
            p50, p95 = _pct(vals, 50), _pct(vals, 95)
        return {"count": self.count, "mean": self.total / self.count if self.count else None,
                "p50": p50, "p95": p95,
                "max": self.maximum if self.count else None, "approx": self.approx,
                "sources": sorted(self.sources)}


def _pct(sorted_vals: list[float], p: float) -> float | None:
    """Linear-interpolated percentile (numpy's default), without numpy."""
    if not sorted_vals:
        return None
    k = (len(sorted_vals) - 1) * p / 100.0
    lo = math.floor(k)
    hi = min(lo + 1, len(sorted_vals) - 1)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (k - lo)


def _weighted_pct(pairs: list[tuple[float, float]], p: float) -> float | None:
    """The smallest value whose cumulative weight reaches ``p`` percent of the total."""
    total = sum(w for _, w in pairs)
    if not pairs or total <= 0:
        return None
    goal, seen = total * p / 100.0, 0.0
    for value, weight in pairs:
        seen += weight
        if seen >= goal:
            return value
    return pairs[-1][0]


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    f = float(v)
    return f if math.isfinite(f) else None


def collect(job: Job, *, per_node: bool = False, name_prefix: str | None = None,
            workers: bool = True) -> dict[str, Any]:
    """Statistics per metric name (``per_node``: per node and name), JSON-ready."""
    table: dict[tuple[str, str], Series] = {}
    skipped = 0
    for node in job.nodes():
        files = [(job.dir.metrics(node), "agent")]
        if workers:
            files += [(p, "worker") for p in job.worker_metric_files(node)]
        for path, source in files:
            label = f"metrics of {node}" if source == "agent" else f"worker metrics of {node}"
            for rec in job.records(path, label, node):
                name = rec.get("name")
                if not isinstance(name, str):
                    continue
                if name_prefix is not None and not name.startswith(name_prefix):
                    continue
                value = _number(rec.get("value"))
                if value is None:
                    skipped += 1
                    continue
                key = (node if per_node else "*", name)
                s = table.get(key)
                if s is None:
                    s = table[key] = Series()
                s.sources.add(source)
                s.add(rec, value)
    if skipped:
        job.note(f"{skipped} non-numeric or non-finite metric value(s) left out")
    rows = []
    for (node, name), s in sorted(table.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        row = {"name": name, **s.stats()}
        if per_node:
            row = {"node": node, **row}
        rows.append(row)
    return {"per_node": per_node, "metrics": rows, "notes": job.notes}


def _g(v: float | None) -> str:
    return "-" if v is None else f"{v:.6g}"


def render(data: dict[str, Any]) -> str:
    """A fixed-width table; ``~`` marks percentiles from throttled (aggregated) lines."""
    rows = data["metrics"]
    if not rows:
        out = ["no metrics recorded"]
    else:
        width = min(max(len(r["name"]) for r in rows), 60)
        head = f"{'metric':<{width}} {'count':>8} {'mean':>12} {'p50':>12} {'p95':>12} {'max':>12}"
        if data["per_node"]:
            head = f"{'node':<12} " + head
        out = [head]
        for r in rows:
            line = (f"{r['name'][:width]:<{width}} {r['count']:>8} {_g(r['mean']):>12} "
                    f"{_g(r['p50']):>12} {_g(r['p95']):>12} {_g(r['max']):>12}"
                    + (" ~" if r["approx"] else ""))
            out.append((f"{r['node']:<12} " if data["per_node"] else "") + line)
        if any(r["approx"] for r in rows):
            out.append("~ throttled series: the agent keeps count, sum and max per 120 s window, "
                       "not each sample; count, mean and max are exact, p50/p95 are over the "
                       "windows' means (weighted by their counts), so they are smoother than "
                       "the samples")
    foot = footer(data["notes"])
    if foot:
        out.append(foot)
    return "\n".join(out)
