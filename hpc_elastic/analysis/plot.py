"""``logs plot``: one lane per node (what it did when, and every disruption) and the training
metric curves below, as a PNG; a plain-text timeline where matplotlib is missing.

Every kind of disruption has its own mark and legend entry, placed so that none hides another:
a failure (red X) sits on the lane, the worker-group restart that follows (orange triangle) on the
lane's upper edge, a preemption (purple diamond) on its lower edge, a lost or departed node (black
or grey square) at its last sign of life, a hung rank (brown plus: ``worker.hung``) on the lane of
its node, a straggler flag (olive triangle: ``node.straggler``) on the flagged node's lower edge,
and each root cause is a dashed line across all lanes
and the metric panels. The legend sits outside the axes, so it never covers a lane. Metric
curves are drawn per worker file (one rank in one attempt and restart), so a line stops at a
failure and a new one starts after the restart instead of running straight across the gap.

matplotlib is an optional extra (``hpc_elastic[plot]``): it is imported inside :func:`plot` only,
so every other command works without it. The Agg backend is forced: analysis runs on login nodes
without a display.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .fmt import dur
from .loader import Job
from .model import NODE_CAUSES, build

INSTALL_HINT = ("plotting needs matplotlib: pip install 'hpc_elastic[plot]' "
                "(or pip install matplotlib)")

_MARKS = ("failure", "restart", "preemption", "lost", "left", "hang", "straggler")


class PlotUnavailable(Exception):
    """matplotlib is not importable."""


def node_lanes(job: Job) -> tuple[dict[str, dict[str, list[Any]]], float | None]:
    """Per node: rendezvous and training intervals; failure, restart, preemption times; and
    when it was lost or left the run (from the model's node losses)."""
    lanes: dict[str, dict[str, list[Any]]] = {}
    t0: float | None = None
    for node in job.nodes():
        lane: dict[str, list[Any]] = {"rendezvous": [], "training": [],
                                      **{k: [] for k in _MARKS}}
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
            elif kind == "worker.hung":
                lane["hang"].append(t)
                if train is not None:
                    lane["training"].append((train, t))
                    train = None
            elif kind == "node.straggler":
                lane["straggler"].append(t)
            elif (kind in ("agent.succeeded", "agent.failed", "agent.preempted", "shutdown")
                  and train is not None):
                lane["training"].append((train, t))
                train = None
        if train is not None and last is not None:
            lane["training"].append((train, last))
    return lanes, t0


def _disruptions(job: Job, lanes: dict[str, dict[str, list[Any]]]) -> list[dict[str, Any]]:
    """Add node losses/departures to the lanes; return the root causes (time, label)."""
    model = build(Job(job.dir))  # its own notes: the lanes' reading reports the damage
    for loss in model.losses:
        lane = lanes.get(loss["node"])
        if lane is not None:
            lane["lost" if loss["kind"] == "node_lost" else "left"].append(loss["last_event"])
    roots = []
    for c in model.root_causes:
        what = (f"{c['node']} {'lost' if c['kind'] == 'node_lost' else 'left'}"
                if c["kind"] in NODE_CAUSES else f"{c['node']} rank {c['rank']}")
        roots.append({"time": c["time"], "label": f"root cause: {what}"})
    return roots


def metric_curves(job: Job, names: tuple[str, ...]) -> dict[str, dict[str, list[list[tuple]]]]:
    """name -> "node/rank r" -> one [(time, value)] segment per worker file (a rank's attempt
    and restart), so curves break where the workers were restarted."""
    curves: dict[str, dict[str, list[list[tuple]]]] = {n: {} for n in names}
    for node in job.nodes():
        for path in job.worker_metric_files(node):
            segments: dict[tuple[str, str], list[tuple]] = {}
            for rec in job.records(path, f"worker metrics of {node}", node):
                name = rec.get("name")
                v = rec.get("value")
                if name in curves and isinstance(v, (int, float)) and not isinstance(v, bool):
                    label = f"{node}/rank {rec.get('rank')}"
                    segments.setdefault((name, label), []).append((rec["time"], float(v)))
            for (name, label), points in segments.items():
                curves[name].setdefault(label, []).append(sorted(points))
    return curves


def plot(job: Job, out: Path, metrics: tuple[str, ...] = ("loss",)) -> dict[str, Any]:
    """Write the PNG; raises :class:`PlotUnavailable` without matplotlib."""
    fig, drawn = figure(job, metrics)
    import matplotlib.pyplot as plt

    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return {"png": str(out), **drawn}


def figure(job: Job, metrics: tuple[str, ...] = ("loss",)) -> tuple[Any, dict[str, Any]]:
    """The figure (not saved) and what it shows. Every mark's scatter has the ``gid``
    ``mark:<kind>:<node>``, so what was drawn where can be checked on the figure itself."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.lines import Line2D
        from matplotlib.patches import Patch
    except ImportError as exc:
        raise PlotUnavailable(INSTALL_HINT) from exc

    lanes, t0 = node_lanes(job)
    roots = _disruptions(job, lanes)
    curves = metric_curves(job, metrics)
    base = t0 or 0.0
    shown = [m for m in metrics if curves.get(m)]
    names = list(lanes)
    n = max(len(names), 1)
    many = n > 24
    lane_h = 0.2 if many else 0.42
    fig, axes = plt.subplots(
        1 + len(shown), 1, figsize=(13, 1.4 + lane_h * n + 2.6 * len(shown)), sharex=True,
        squeeze=False, gridspec_kw={"height_ratios": [lane_h * n + 0.8] + [2.6] * len(shown)})
    ax = axes[0][0]
    size = 28 if many else 70
    styles = {  # kind: (marker, colour, offset from the lane's centre, label)
        "failure": ("X", "tab:red", 0.0, "worker failed"),
        "restart": ("v", "darkorange", -0.36, "worker group restarted"),
        "preemption": ("D", "tab:purple", 0.36, "preemption signal"),
        "lost": ("s", "black", 0.0, "node lost (last sign of life)"),
        "left": ("s", "grey", 0.0, "node left the run"),
        "hang": ("P", "tab:brown", 0.0, "rank hung (no progress)"),
        "straggler": ("^", "tab:olive", 0.36, "straggler flagged"),
    }
    present: set[str] = set()
    for y, node in enumerate(names):
        lane = lanes[node]
        ax.broken_barh([(a - base, b - a) for a, b in lane["training"]], (y - 0.28, 0.56),
                       color="tab:green", alpha=0.85)
        ax.broken_barh([(a - base, max(b - a, 0.05)) for a, b in lane["rendezvous"]],
                       (y - 0.28, 0.56), color="tab:blue")
        present.update(k for k in ("training", "rendezvous") if lane[k])
        for key, (marker, color, dy, _label) in styles.items():
            ts = lane[key]
            if ts:
                present.add(key)
                ax.scatter([t - base for t in ts], [y + dy] * len(ts), marker=marker,
                           color=color, s=size, zorder=4 if key in ("failure", "hang") else 3,
                           edgecolors="white" if key in ("lost", "left") else None,
                           linewidths=0.5, gid=f"mark:{key}:{node}")
    for i, root in enumerate(roots):
        for row in axes:
            row[0].axvline(root["time"] - base, color="tab:red", ls="--", lw=1, zorder=1)
        ax.annotate(root["label"], (root["time"] - base, 1.0),
                    xycoords=("data", "axes fraction"), xytext=(3, 3 + 9 * (i % 3)),
                    textcoords="offset points", fontsize="x-small", color="tab:red",
                    annotation_clip=False)
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels(names, fontsize=6 if many else "small")
    ax.set_ylim(-0.6, n - 0.4)
    ax.invert_yaxis()
    ax.set_title(f"job {job.path.name}: {len(names)} node(s)", loc="left", pad=14 + 9 * min(
        len(roots), 3))
    handles = [Patch(color="tab:green", label="training"),
               Patch(color="tab:blue", label="rendezvous")]
    handles = [h for h in handles if h.get_label() in present]
    handles += [Line2D([], [], ls="", marker=m, color=c, markersize=7, label=label)
                for key, (m, c, _dy, label) in styles.items() if key in present]
    if roots:
        handles.append(Line2D([], [], color="tab:red", ls="--", lw=1, label="root cause"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.005, 1.0),
              fontsize="small", frameon=False)
    for i, name in enumerate(shown, start=1):
        mx = axes[i][0]
        series = sorted(curves[name].items())
        few = len(series) <= 8
        cmap = plt.get_cmap("tab10" if few else "viridis")
        for j, (label, segments) in enumerate(series):
            color = cmap(j % 10) if few else cmap(j / max(len(series) - 1, 1))
            for k, seg in enumerate(segments):
                mx.plot([t - base for t, _ in seg], [v for _, v in seg], color=color,
                        lw=1 if few else 0.6, alpha=1 if few else 0.5, marker="." if few else None,
                        markersize=3, label=label if k == 0 and few else None)
        if not few:
            mx.plot([], [], color=cmap(0.5), label=f"{len(series)} ranks, one line each")
        mx.set_ylabel(name)
        mx.grid(alpha=0.3)
        mx.legend(loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize="x-small",
                  frameon=False)
    axes[-1][0].set_xlabel("seconds since the first event")
    fig.tight_layout()
    return fig, {"nodes": names, "metrics": shown,
                 "marks": sorted(k for k in present if k in _MARKS),
                 "root_causes": len(roots), "notes": job.notes}


# Drawn in this order; a mark whose column is taken moves right, so a restart in the same
# column as its failure shows next to it instead of over it.
_TEXT_MARKS = {"failure": "X", "hang": "H", "lost": "L", "left": "l", "preemption": "P",
               "restart": "R", "straggler": "S"}


def text_timeline(job: Job, width: int = 72) -> str:
    """The lanes as text, for a terminal without matplotlib: one row per node, ``width``
    columns of equal time; a column shows the strongest thing that happened in it."""
    lanes, t0 = node_lanes(job)
    roots = _disruptions(job, lanes)
    ends = [b for lane in lanes.values() for k in ("training", "rendezvous") for _, b in lane[k]]
    ends += [t for lane in lanes.values() for k in _MARKS for t in lane[k]]
    if t0 is None or not ends:
        return "no events to draw"
    span = max(max(ends) - t0, 1e-9)

    def col(t: float) -> int:
        return min(width - 1, int((t - t0) / span * width))

    name_w = min(max(len(n) for n in lanes), 16)
    rows = []
    for node, lane in lanes.items():
        cells = [" "] * width
        for key, ch in (("training", "="), ("rendezvous", "r")):
            for a, b in lane[key]:
                for c in range(col(a), col(b) + 1):
                    cells[c] = ch
        marked: set[int] = set()
        for key, ch in _TEXT_MARKS.items():
            for t in lane[key]:
                c = col(t)
                while c in marked and c < width - 1:
                    c += 1
                cells[c] = ch
                marked.add(c)
        rows.append(f"{node[:name_w]:<{name_w}} |{''.join(cells)}|")
    axis = f"{'':<{name_w}}  0{dur(span):>{width - 1}}"
    root_lines = [f"  {r['label']} at +{r['time'] - t0:.1f}s" for r in roots]
    return "\n".join([*rows, axis, "= training  r rendezvous  X worker failed  H rank hung  "
                      "R restart  P preemption  S straggler  L node lost  l node left",
                      *root_lines])
