"""``logs plot``: a PNG with one lane per node and the training metric curves below.

matplotlib is an optional extra (``hpc_elastic[plot]``): it is imported inside :func:`plot` only,
so every other command works without it. The Agg backend is forced: analysis runs on login nodes
without a display.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .loader import Job

INSTALL_HINT = ("plotting needs matplotlib: pip install 'hpc_elastic[plot]' "
                "(or pip install matplotlib)")


class PlotUnavailable(Exception):
    """matplotlib is not importable."""


def node_lanes(job: Job) -> tuple[dict[str, dict[str, list[Any]]], float | None]:
    """Per node: rendezvous and training intervals, restart/failure/preemption times."""
    lanes: dict[str, dict[str, list[Any]]] = {}
    t0: float | None = None
    for node in job.nodes():
        lane: dict[str, list[Any]] = {"rendezvous": [], "training": [], "restart": [],
                                      "failure": [], "preemption": []}
        lanes[node] = lane
        join: float | None = None
        train: float | None = None
        last: float | None = None
        for rec in job.events(node):
            t, kind = rec["time"], rec.get("kind")
            t0 = t if t0 is None else min(t0, t)
            last = t
            if kind in ("rendezvous.started", "rendezvous.join"):
                if train is not None:
                    lane["training"].append((train, t))
                    train = None
                join = t if join is None else join
            elif kind in ("rendezvous.completed", "rendezvous.complete", "agent.rendezvous"):
                if join is not None:
                    lane["rendezvous"].append((join, t))
                    join = None
            elif kind == "workers.started":
                train = t
            elif kind == "workers.restart":
                lane["restart"].append(t)
            elif kind in ("worker.failed",) or (kind == "worker.exit"
                                                  and rec.get("exit_code") not in (0, None)):
                lane["failure"].append(t)
                if train is not None:
                    lane["training"].append((train, t))
                    train = None
            elif kind == "preemption.signal":
                lane["preemption"].append(t)
            elif (kind in ("agent.succeeded", "agent.failed", "agent.preempted", "shutdown")
                  and train is not None):
                lane["training"].append((train, t))
                train = None
        if train is not None and last is not None:
            lane["training"].append((train, last))
    return lanes, t0


def metric_curves(job: Job, names: tuple[str, ...]) -> dict[str, dict[str, list[tuple]]]:
    """name -> "node/rank r" -> [(time, value)] from the workers' metric files."""
    curves: dict[str, dict[str, list[tuple]]] = {n: {} for n in names}
    for node in job.nodes():
        for path in job.worker_metric_files(node):
            for rec in job.records(path, f"worker metrics of {node}", node):
                name = rec.get("name")
                v = rec.get("value")
                if name in curves and isinstance(v, (int, float)) and not isinstance(v, bool):
                    curves[name].setdefault(f"{node}/rank {rec.get('rank')}", []).append(
                        (rec["time"], float(v)))
    return curves


def plot(job: Job, out: Path, metrics: tuple[str, ...] = ("loss",)) -> dict[str, Any]:
    """Write the PNG; raises :class:`PlotUnavailable` without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise PlotUnavailable(INSTALL_HINT) from exc

    lanes, t0 = node_lanes(job)
    curves = metric_curves(job, metrics)
    base = t0 or 0.0
    shown = [m for m in metrics if curves.get(m)]
    n_axes = 1 + len(shown)
    fig, axes = plt.subplots(n_axes, 1, figsize=(12, 1.2 + 0.5 * max(len(lanes), 1)
                                                  + 2.5 * len(shown)),
                             sharex=True, squeeze=False,
                             gridspec_kw={"height_ratios": [max(len(lanes), 1) * 0.5 + 0.6]
                                          + [2.5] * len(shown)})
    ax = axes[0][0]
    names = list(lanes)
    for y, node in enumerate(names):
        lane = lanes[node]
        ax.broken_barh([(a - base, b - a) for a, b in lane["training"]], (y - 0.3, 0.6),
                       color="tab:green", label="training" if y == 0 else None)
        ax.broken_barh([(a - base, max(b - a, 0.05)) for a, b in lane["rendezvous"]],
                       (y - 0.3, 0.6), color="tab:blue", label="rendezvous" if y == 0 else None)
        for key, marker, color, label in (("restart", "|", "tab:orange", "restart"),
                                          ("failure", "x", "tab:red", "failure"),
                                          ("preemption", "v", "tab:purple", "preemption")):
            ts = lane[key]
            if ts:
                ax.scatter([t - base for t in ts], [y] * len(ts), marker=marker, color=color,
                           s=80, zorder=3, label=label if y == 0 else None)
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels(names)
    ax.set_ylim(-0.7, max(len(names), 1) - 0.3)
    ax.invert_yaxis()
    ax.set_title(f"job {job.path.name}")
    handles, labels = ax.get_legend_handles_labels()
    uniq = dict(zip(labels, handles, strict=True))
    if uniq:
        ax.legend(uniq.values(), uniq.keys(), loc="upper right", fontsize="small", ncol=5)
    for i, name in enumerate(shown, start=1):
        mx = axes[i][0]
        for label, pts in sorted(curves[name].items()):
            pts.sort()
            mx.plot([t - base for t, _ in pts], [v for _, v in pts], label=label, lw=1, marker=".")
        mx.set_ylabel(name)
        mx.legend(fontsize="x-small", ncol=4)
    axes[-1][0].set_xlabel("seconds since the first event")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return {"png": str(out), "nodes": names, "metrics": shown, "notes": job.notes}
