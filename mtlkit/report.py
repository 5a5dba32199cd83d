"""``mtlkit report RUN [RUN ...]``: one self-contained HTML page of what the runs did.

The page (no web access needed to view it: every plot is a PNG embedded as base64, the style is inline) holds

* a table of the runs: dataset, model, method, seed, budget (epochs trained of those planned, training-set size,
  batch size, optimizer and learning rate), the selected epoch and the per-task test metrics; a run on the Pareto
  front of the primary test metrics (no other run at least as good on every task and better on one) is marked;
* loss and validation-metric curves per epoch (``metrics.jsonl``), all runs overlaid;
* per run, from ``monitor.jsonl`` (:mod:`mtlkit.monitor`): the per-step losses, the task-weight trajectories (the
  weighting's loss weights and the aggregator's weights), the per-task gradient norms, the conflict heatmap
  (the cosine of every task pair over training, with the number of conflicting pairs) and the update's cosine with
  each task gradient;
* for several runs, a Pareto scatter of the per-task test metrics (each pair of the first tasks' primary metrics).

Axes start where the quantity does: accuracies and other metrics on [0, 1] are drawn on [0, 100 %], losses,
gradient norms and conflict counts from 0, cosines on [-1, 1]. The Pareto scatter is drawn twice: on the full
range, and zoomed onto the points, that panel's title saying that its axes do not start at 0 (on the full range,
runs within a point of each other at 97 % are one dot). Each figure's caption states the budget and the seeds.

Runs may still be training: the files are read as they stand (a half-written last monitor row is skipped).

Example:
    >>> from mtlkit.report import axis_range
    >>> axis_range("accuracy", [0.47, 0.98]), axis_range("loss", [0.2, 1.3])[0]
    ((0.0, 1.0), 0.0)
"""

from __future__ import annotations

import base64
import html
import io
import itertools
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mtlkit.errors import ConfigError
from mtlkit.monitor import MONITOR_FILE, read_monitor

log = logging.getLogger("mtlkit")

#: Marks a page written by this module: only such a file is replaced without ``overwrite``.
GENERATOR = "mtlkit report"
#: Metrics whose values lie in [0, 1] whatever the data (their axes are [0, 100 %]).
UNIT_INTERVAL = {
    "accuracy",
    "joint_accuracy",
    "label_accuracy",
    "auc",
    "average_precision",
    "micro_f1",
    "map",
    "hamming_loss",
}
#: The Pareto scatter shows the pairs among the first this many tasks.
PARETO_TASKS = 3
#: Up to this many tasks the epoch curves get one panel per task and quantity; beyond, one panel per quantity.
PANELS_PER_TASK_MAX_T = 4


@dataclass
class RunData:
    """What the report reads from one run directory."""

    path: Path
    config: dict[str, Any]
    metrics: list[dict[str, Any]]
    monitor: list[dict[str, Any]]
    results: dict[str, Any] | None
    label: str = ""
    tasks: list[str] = field(default_factory=list)

    @property
    def method(self) -> str:
        return str((self.config.get("method") or {}).get("name", "?"))

    @property
    def seed(self) -> Any:
        return (self.config.get("train") or {}).get("seed", "?")


def load_run(path: str | Path) -> RunData:
    """Read a run directory (finished or still training).

    Raises:
        ConfigError: ``path`` is not a directory, or holds neither ``config.yaml`` nor ``metrics.jsonl`` (not an
            mtlkit run), or a file there cannot be parsed.

    Example:
        >>> load_run("/nonexistent-run")
        Traceback (most recent call last):
        ...
        mtlkit.errors.ConfigError: run directory /nonexistent-run does not exist
    """
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"run directory {p} does not exist")
    if not p.is_dir():
        raise ConfigError(f"{p} is a file, not a run directory (mtlkit train --run-dir)")
    cfg_path, metrics_path = p / "config.yaml", p / "metrics.jsonl"
    if not cfg_path.is_file() and not metrics_path.is_file():
        raise ConfigError(f"{p} is not an mtlkit run: it has neither config.yaml nor metrics.jsonl")
    try:
        config = (yaml.safe_load(cfg_path.read_text()) or {}) if cfg_path.is_file() else {}
        metrics = (
            [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
            if metrics_path.is_file()
            else []
        )
        res_path = p / "results.json"
        results = json.loads(res_path.read_text()) if res_path.is_file() else None
    except (yaml.YAMLError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot read the run {p}: {e}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{cfg_path} does not hold a config mapping")
    monitor = read_monitor(p / MONITOR_FILE)
    tasks = list(monitor[0]["tasks"]) if monitor else _tasks_from_metrics(metrics)
    return RunData(p, config, metrics, monitor, results, tasks=tasks)


def _tasks_from_metrics(rows: list[dict[str, Any]]) -> list[str]:
    names: list[str] = []
    for r in rows[:1]:
        for k in r:
            if k.startswith("train/") and k.endswith("/loss"):
                names.append(k[len("train/") : -len("/loss")])
    return names


def _legend(ax: Any, lines: int) -> None:
    """A legend inside the axes for up to 10 lines, beside them (small, outside the plot) for up to 40: every line
    stays named without hiding the curves; more than 40 get none (the runs table names them)."""
    if lines <= 10:
        ax.legend(fontsize=7)
    elif lines <= 40:
        ax.legend(fontsize=5, loc="center left", bbox_to_anchor=(1.01, 0.5), ncol=1 if lines <= 20 else 2)


def axis_range(metric: str, values: Sequence[float]) -> tuple[float, float]:
    """The y-range a metric is drawn on: [0, 1] for metrics on the unit interval (also any metric whose values all
    lie there and that is higher-is-better), else from min(0, lowest) to 5 % above the highest.

    Example:
        >>> axis_range("mae", [2.0, 4.0])
        (0.0, 4.2)
    """
    from mtlkit.metrics import HIGHER_IS_BETTER

    vals = [v for v in values if v is not None and math.isfinite(v)]
    if metric in UNIT_INTERVAL or (vals and HIGHER_IS_BETTER.get(metric, False) and min(vals) >= 0 and max(vals) <= 1):
        return 0.0, 1.0
    if not vals:
        return 0.0, 1.0
    lo, hi = min(0.0, min(vals)), max(vals)
    span = (hi - lo) or 1.0
    return lo, round(hi + 0.05 * span, 12)


def _higher_is_better(metric: str) -> bool:
    from mtlkit.metrics import HIGHER_IS_BETTER

    return HIGHER_IS_BETTER.get(metric, metric not in ("loss", "mae", "mse", "rmse"))


def pareto_front(points: Sequence[Sequence[float]], higher: Sequence[bool]) -> list[bool]:
    """Which points no other point dominates (at least as good on every coordinate, better on one).

    Example:
        >>> pareto_front([(0.9, 0.5), (0.8, 0.8), (0.7, 0.4)], [True, True])
        [True, True, False]
    """
    signs = [1.0 if h else -1.0 for h in higher]
    pts = [[s * v for s, v in zip(signs, p, strict=True)] for p in points]
    out = []
    for i, p in enumerate(pts):
        dominated = any(
            all(q[k] >= p[k] for k in range(len(p))) and any(q[k] > p[k] for k in range(len(p)))
            for j, q in enumerate(pts)
            if j != i
        )
        out.append(not dominated)
    return out


# -- the page ----------------------------------------------------------------------------------------------------


def write_report(runs: Sequence[str | Path], out: str | Path, overwrite: bool = False) -> Path:
    """Write the HTML report of ``runs`` to ``out`` and return its path.

    An existing ``out`` is replaced only if it is an earlier report (or with ``overwrite``).

    Raises:
        ConfigError: no run given, a run directory that is not one, or ``out`` exists and is something else.

    Example:
        >>> write_report([], "r.html")
        Traceback (most recent call last):
        ...
        mtlkit.errors.ConfigError: mtlkit report needs at least one run directory
    """
    from mtlkit import runs as runs_mod

    if not runs:
        raise ConfigError("mtlkit report needs at least one run directory")
    out = Path(out)
    if out.is_dir():
        raise ConfigError(f"--out {out} is a directory; give the HTML file to write (e.g. {out / 'report.html'})")
    if out.exists() and not overwrite and GENERATOR not in out.read_text(errors="replace")[:2000]:
        raise ConfigError(f"{out} exists and is not an mtlkit report; pass --overwrite to replace it")
    data = [load_run(r) for r in runs]
    _label(data)
    page = build_html(data)
    runs_mod.atomic_write_text(out, page)
    log.info(f"mtlkit: report of {len(data)} run{'s' if len(data) != 1 else ''} written to {out}")
    return out


def _label(data: list[RunData]) -> None:
    """``method s<seed>``, with the directory name where two runs would read the same."""
    base = [f"{d.method} s{d.seed}" for d in data]
    for d, b in zip(data, base, strict=True):
        d.label = b if base.count(b) == 1 else f"{b} ({d.path.name})"


def build_html(data: list[RunData]) -> str:
    """The page for the loaded runs (see the module docstring)."""
    import matplotlib

    matplotlib.use("Agg")  # no display: render to PNG bytes
    sections = [_runs_table(data)]
    fig = _epoch_curves(data)
    if fig:
        sections.append(fig)
    for d in data:
        sections.append(_monitor_section(d))
    if sum(1 for d in data if d.results) >= 2:
        sections.append(_pareto_section(data))
    title = "mtlkit report: " + ", ".join(d.label for d in data)
    return _PAGE.format(
        generator=GENERATOR, title=html.escape(title), body="\n".join(s for s in sections if s), style=_STYLE
    )


_STYLE = """
body { font-family: sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #bbb; padding: 0.25em 0.6em; text-align: right; }
th { background: #eee; } td.l, th.l { text-align: left; }
figure { margin: 1.5em 0; } figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-size: 0.9em; color: #444; margin-top: 0.4em; }
.note { color: #7a4b00; }
"""

_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="generator" content="{generator}">
<title>{title}</title><style>{style}</style></head>
<body><h1>{title}</h1>
{body}
</body></html>
"""


def _budget(d: RunData) -> str:
    """One run's budget in words: epochs trained of planned, training-set size, batch, optimizer, lr."""
    tc = d.config.get("train") or {}
    planned = tc.get("epochs", "?")
    done = len(d.metrics)
    n = (d.results or {}).get("n_train")
    ds = (d.config.get("dataset") or {}).get("name", "?")
    opts = (d.config.get("dataset") or {}).get("options") or {}
    size = f"{n:,} training samples" if isinstance(n, int) else "training-set size not yet known"
    parts = [
        f"dataset {ds}" + (f" ({', '.join(f'{k}={v}' for k, v in opts.items())})" if opts else ""),
        f"model {(d.config.get('model') or {}).get('name', '?')}",
        f"{done} of {planned} epochs" + ("" if d.results else " (still training or stopped)"),
        size,
        f"batch {tc.get('batch_size', '?')}",
        f"{tc.get('optimizer', '?')} lr {tc.get('lr', '?')}",
    ]
    return ", ".join(parts)


def _caption(data: Sequence[RunData], what: str) -> str:
    budgets = sorted({_budget(d) for d in data})
    seeds: dict[str, list[str]] = {}
    for d in data:
        seeds.setdefault(d.method, []).append(str(d.seed))
    seed_text = "; ".join(f"{m}: seed{'s' if len(s) > 1 else ''} {', '.join(s)}" for m, s in seeds.items())
    budget_text = budgets[0] if len(budgets) == 1 else "budgets differ: " + " | ".join(budgets)
    return f"{html.escape(what)} Budget: {html.escape(budget_text)}. Seeds: {html.escape(seed_text)}."


def _primary_metrics(d: RunData) -> dict[str, tuple[str, float]]:
    """Per task, its primary test metric (the first non-loss one in results.json's order) and value."""
    out: dict[str, tuple[str, float]] = {}
    for key, v in ((d.results or {}).get("test") or {}).items():
        if "/" not in key:
            continue
        task, metric = key.split("/", 1)
        if metric != "loss" and task not in out:
            out[task] = (metric, float(v))
    return out


def _runs_table(data: list[RunData]) -> str:
    tasks: list[str] = []
    for d in data:
        tasks += [t for t in _primary_metrics(d) if t not in tasks]
    finished = [d for d in data if d.results and all(t in _primary_metrics(d) for t in tasks)]
    front: dict[int, bool] = {}
    if len(finished) >= 2 and tasks:
        metric_of = {t: _primary_metrics(finished[0])[t][0] for t in tasks}
        flags = pareto_front(
            [[_primary_metrics(d)[t][1] for t in tasks] for d in finished],
            [_higher_is_better(metric_of[t]) for t in tasks],
        )
        front = {id(d): f for d, f in zip(finished, flags, strict=True)}
    head = "".join(
        f"<th>{html.escape(t)} {html.escape(_primary_metrics(finished[0])[t][0] if finished else '')}</th>"
        for t in tasks
    )
    rows = []
    for d in data:
        pm = _primary_metrics(d)
        cells = "".join(f"<td>{_fmt(pm[t][0], pm[t][1])}</td>" if t in pm else "<td>–</td>" for t in tasks)
        best = (d.results or {}).get("best_epoch", "–")
        mark = "yes" if front.get(id(d)) else ("no" if id(d) in front else "–")
        rows.append(
            f"<tr><td class='l'>{html.escape(d.label)}</td><td class='l'>{html.escape(str(d.path))}</td>"
            f"<td class='l'>{html.escape(_budget(d))}</td><td>{html.escape(str(best))}</td>{cells}"
            f"<td>{mark}</td></tr>"
        )
    return (
        "<h2>Runs</h2><table><tr><th class='l'>run</th><th class='l'>directory</th><th class='l'>budget</th>"
        f"<th>selected epoch</th>{head}<th>Pareto front</th></tr>{''.join(rows)}</table>"
        "<p>Test metrics are those of the epoch selected on validation. Pareto front: no other run listed is at "
        "least as good on every task's metric and better on one.</p>"
    )


def _fmt(metric: str, v: float) -> str:
    return f"{100 * v:.2f} %" if metric in UNIT_INTERVAL else f"{v:.4g}"


def _png(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _figure(fig: Any, caption: str, alt: str) -> str:
    return (
        f"<figure><img alt='{html.escape(alt)}' src='data:image/png;base64,{_png(fig)}'>"
        f"<figcaption>{caption}</figcaption></figure>"
    )


def _percent_axis(ax: Any) -> None:
    from matplotlib.ticker import PercentFormatter

    ax.yaxis.set_major_formatter(PercentFormatter(1.0))


def _epoch_curves(data: list[RunData]) -> str:
    """Training loss and validation metrics per epoch, runs overlaid: one panel per task and quantity, or, with
    more than :data:`PANELS_PER_TASK_MAX_T` tasks, one panel per quantity with a line per task."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    keys: list[str] = []
    for d in data:
        for r in d.metrics:
            keys += [
                k
                for k in r
                if k not in keys and (k.startswith("train/") or (k.startswith("val/") and not k.endswith("/loss")))
            ]
    if not keys:
        return ""
    T = max((len(d.tasks) for d in data), default=0)
    groups: dict[str, list[str]] = {}
    for k in keys:  # "val/<task>/<metric>" -> panel "val/*/<metric>" when there are many tasks
        parts = k.split("/")
        g = f"{parts[0]}/*/{parts[-1]}" if T > PANELS_PER_TASK_MAX_T and len(parts) == 3 else k
        groups.setdefault(g, []).append(k)
    cols = min(3, len(groups))
    rows = -(-len(groups) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax, (group, members) in zip(axes.flat, groups.items(), strict=False):
        metric = group.rsplit("/", 1)[-1]
        values: list[float] = []
        lines = 0
        for d in data:
            for key in members:
                pts = [(r["epoch"], r[key]) for r in d.metrics if key in r and r[key] is not None]
                if pts:
                    label = d.label if len(members) == 1 else f"{d.label} {key.split('/')[1]}"
                    ax.plot(*zip(*pts, strict=True), marker="o", ms=3, lw=1, label=label)
                    values += [v for _, v in pts]
                    lines += 1
        lo, hi = axis_range(metric, values)
        ax.set_ylim(lo, hi)
        if (lo, hi) == (0.0, 1.0):
            _percent_axis(ax)
        ax.set_title(group if len(members) == 1 else f"{group} ({len(members)} tasks)", fontsize=9)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        _legend(ax, lines)
    for ax in list(axes.flat)[len(groups) :]:
        ax.axis("off")
    fig.tight_layout()
    cap = _caption(data, "Per-epoch training loss (mean over the epoch's steps) and validation metrics.")
    return "<h2>Loss and metric curves</h2>" + _figure(fig, cap, "loss and metric curves")


def _series(rows: list[dict[str, Any]], key: str, t: int) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for r in rows:
        vals = r.get(key)
        if vals is not None and t < len(vals) and vals[t] is not None:
            xs.append(r["step"])
            ys.append(vals[t])
    return xs, ys


def _monitor_section(d: RunData) -> str:
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    head = f"<h2>Monitoring: {html.escape(d.label)}</h2>"
    rows = d.monitor
    if not rows:
        return head + (
            f"<p class='note'>{html.escape(str(d.path))} has no {MONITOR_FILE} (trained with train.log_every=0 or "
            f"before monitoring existed).</p>"
        )
    names = list(rows[0]["tasks"])
    T = len(names)
    grad_rows = [r for r in rows if r.get("cos") is not None]
    weight_keys = [k for k in ("loss_weight", "agg_weight") if any(k in r for r in rows)]
    panels = ["loss"] + weight_keys + (["grad_norm", "heatmap", "conflicts", "update_cos"] if grad_rows else [])
    cols = 2
    nrows = -(-len(panels) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(12, 3.2 * nrows), squeeze=False)
    flat = list(axes.flat)
    titles = {
        "loss": "per-step task loss (unweighted)",
        "loss_weight": "loss weight (weighting)",
        "agg_weight": "aggregator weight w (update = wᵀJ)",
        "grad_norm": "task gradient norm",
        "update_cos": "cos(update, task gradient)",
    }
    for ax, panel in zip(flat, panels, strict=False):
        if panel == "heatmap":
            pairs = [(i, j) for i in range(T) for j in range(i + 1, T)]
            steps = [r["step"] for r in grad_rows]
            mat = np.array(
                [[np.nan if r["cos"][i][j] is None else r["cos"][i][j] for r in grad_rows] for i, j in pairs],
                dtype=float,
            )
            im = ax.imshow(
                mat,
                aspect="auto",
                cmap="RdBu",
                vmin=-1,
                vmax=1,
                interpolation="nearest",
                extent=(steps[0] - 0.5, steps[-1] + 0.5, len(pairs) - 0.5, -0.5),
            )
            if len(pairs) <= 20:
                ax.set_yticks(range(len(pairs)), [f"{names[i]}~{names[j]}" for i, j in pairs], fontsize=7)
            else:
                ax.set_ylabel(f"{len(pairs)} task pairs")
            fig.colorbar(im, ax=ax, label="cosine")
            ax.set_title("conflict heatmap: cosine of each task pair (red: conflict)", fontsize=9)
            ax.set_xlabel("step")
            continue
        if panel == "conflicts":
            ax.plot([r["step"] for r in grad_rows], [r["conflicts"] for r in grad_rows], color="C3")
            ax.set_ylim(0, max(1, T * (T - 1) // 2))
            ax.set_title(f"conflicting pairs (cos < 0) of {T * (T - 1) // 2}", fontsize=9)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            continue
        values: list[float] = []
        for t, name in enumerate(names):
            xs, ys = _series(rows, panel, t)
            if xs:
                ax.plot(xs, ys, label=name, lw=1)
                values += ys
        if panel == "update_cos":
            ax.set_ylim(-1, 1)
            ax.axhline(0, color="k", lw=0.6)
        elif values:
            ax.set_ylim(min(0.0, min(values)), max(values) * 1.05 if max(values) > 0 else 1.0)
        ax.set_title(titles[panel], fontsize=9)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        _legend(ax, T)
    for ax in flat[len(panels) :]:
        ax.axis("off")
    fig.tight_layout()
    level = rows[-1].get("level", "parameter")
    source = {
        "gramian": "the Gramian the engine formed (no extra backward)",
        "jacobian": "the per-task gradients the engine held (no extra backward)",
        "extra_backward": "T extra backward passes per logged step (train.monitor_gradients)",
    }
    how = source.get(str(grad_rows[-1].get("grads")), "") if grad_rows else ""
    what = f"{len(rows)} logged steps (every {_every(rows)} steps). " + (
        f"Gradients w.r.t. the shared {'representation' if level == 'representation' else 'parameters'}, from {how}."
        if grad_rows
        else "No per-task gradients: this method back-propagates one summed loss; "
        "set train.monitor_gradients=true to compute them (T extra backward passes per logged step)."
    )
    return head + _figure(fig, _caption([d], what), f"monitoring of {d.label}")


def _every(rows: list[dict[str, Any]]) -> str:
    steps = [r["step"] for r in rows]
    gaps = sorted({b - a for a, b in itertools.pairwise(steps)})
    return str(gaps[0]) if len(gaps) == 1 else "?" if not gaps else f"{gaps[0]}-{gaps[-1]}"


def _pareto_section(data: list[RunData]) -> str:
    import matplotlib.pyplot as plt

    done = [d for d in data if d.results]
    tasks: list[str] = []
    for d in done:
        tasks += [t for t in _primary_metrics(d) if t not in tasks]
    tasks = [t for t in tasks if all(t in _primary_metrics(d) for d in done)][:PARETO_TASKS]
    if len(tasks) < 2:
        return "<h2>Pareto scatter</h2><p class='note'>Fewer than two tasks with test metrics in every run.</p>"
    pairs = [(a, b) for i, a in enumerate(tasks) for b in tasks[i + 1 :]]
    fig, axes = plt.subplots(len(pairs), 2, figsize=(11, 4.6 * len(pairs)), squeeze=False)
    methods = sorted({d.method for d in done})
    colour = {m: f"C{k % 10}" for k, m in enumerate(methods)}
    for (a, b), (full, zoom) in zip(pairs, axes, strict=True):
        ma, mb = _primary_metrics(done[0])[a][0], _primary_metrics(done[0])[b][0]
        pts = [(_primary_metrics(d)[a][1], _primary_metrics(d)[b][1]) for d in done]
        front = pareto_front(pts, [_higher_is_better(ma), _higher_is_better(mb)])
        at: dict[tuple[float, float], list[str]] = {}  # runs at the same point share one label
        for d, p in zip(done, pts, strict=True):
            at.setdefault(p, []).append(d.label)
        for ax, zoomed in ((full, False), (zoom, True)):
            for d, (x, y), f in zip(done, pts, front, strict=True):
                ax.scatter(
                    x, y, color=colour[d.method], marker="*" if f else "o", s=90 if f else 36, edgecolor="k", lw=0.4
                )
            if zoomed:
                for (x, y), labels in at.items():
                    ax.annotate(", ".join(labels), (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
            fp = sorted(p for p, f in zip(pts, front, strict=True) if f)
            if len(fp) > 1:
                ax.plot(*zip(*fp, strict=True), color="k", lw=0.8, ls="--")
            ax.set_xlabel(f"{a} test {ma}")
            ax.set_ylabel(f"{b} test {mb}")
            ax.grid(alpha=0.3)
            if ma in UNIT_INTERVAL:
                ax.xaxis.set_major_formatter(_percent_formatter())
            if mb in UNIT_INTERVAL:
                _percent_axis(ax)
            if not zoomed:
                ax.set_xlim(*axis_range(ma, [p[0] for p in pts]))
                ax.set_ylim(*axis_range(mb, [p[1] for p in pts]))
                ax.set_title("full range", fontsize=9)
            else:
                ax.margins(0.15)
                ax.set_title("zoomed onto the runs: these axes do NOT start at 0", fontsize=9, color="#7a4b00")
        for m in methods:
            full.scatter([], [], color=colour[m], label=m)
        full.legend(fontsize=7, title="method (★ Pareto front)", title_fontsize=7)
    fig.tight_layout()
    cap = _caption(
        done,
        "Per-task test metrics of each run (the epoch selected on validation); ★ and the dashed line: the Pareto front of each pair.",
    )
    return "<h2>Pareto scatter of per-task test metrics</h2>" + _figure(fig, cap, "Pareto scatter")


def _percent_formatter() -> Any:
    from matplotlib.ticker import PercentFormatter

    return PercentFormatter(1.0)


__all__ = ["RunData", "axis_range", "build_html", "load_run", "pareto_front", "write_report"]
