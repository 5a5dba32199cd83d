"""``mtlkit bench zoo``: train a list of methods (and STL) with the same budget and seeds, tabulate each task's test
metric (mean ± std over seeds) and Δm against STL, and write the table as markdown, JSON and a PNG.

Δm is printed in the lower-is-better convention (Nash-MTL): negative means better than STL.

Scaling: metrics that are fractions in [0, 1] (accuracy, AUC, ...: :func:`metric_scale`) are shown x 100, in %;
every other metric (errors such as MAE) as it is, in its own units, which the table's column headers name when the
dataset declares them (``MTLData.info["metric_units"]``). A dataset may also declare published single-task values
(``MTLData.info["reference_stl"]``, see :func:`reference_stl`; QM9 does): the table then shows that metric, a row of
the published values and a second Δm column against them, beside Δm against the zoo's own STL runs.

Example:
    >>> runs = {"ew": [{"left/accuracy": 0.9}, {"left/accuracy": 0.8}]}
    >>> m, s = summarize(runs, ["left/accuracy"])["ew"]["left/accuracy"]
    >>> round(m, 6), round(s, 6)
    (0.85, 0.05)
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mtlkit.config import RunConfig
from mtlkit.errors import ConfigError
from mtlkit.metrics import delta_m

#: Metrics that are fractions in [0, 1], shown x 100 (in %) by the zoo's table and PNG. A metric registered with
#: ``register_metric(name, fn, higher_is_better=..., fraction=True)`` is one too (``fraction=False`` opts out);
#: every other metric (MAE, MSE, ...) is shown as it is, in its own units.
FRACTION_METRICS = frozenset(
    {"accuracy", "auc", "average_precision", "label_accuracy", "joint_accuracy", "micro_f1", "map"}
)


def metric_scale(metric: str) -> float:
    """The factor the zoo's table and PNG apply to ``metric`` (a metric name or a ``task/metric`` key): 100 for a
    fraction in [0, 1] (:data:`FRACTION_METRICS`, or registered with ``fraction=True``), 1 for anything else
    (error metrics keep their units).

    Example:
        >>> metric_scale("left/accuracy"), metric_scale("auc"), metric_scale("U0/mae_units")
        (100.0, 100.0, 1.0)
    """
    from mtlkit._registry import METRICS

    name = metric.rsplit("/", 1)[-1]
    flag = METRICS.get(name).meta.get("fraction") if name in METRICS else None
    return 100.0 if (name in FRACTION_METRICS if flag is None else bool(flag)) else 1.0


@dataclass(frozen=True)
class ReferenceSTL:
    """Published single-task values of one metric per task, the baseline of a second Δm (:func:`reference_stl`)."""

    metric: str
    values: dict[str, float]
    source: str = ""


def reference_stl(info: Mapping[str, Any] | None, tasks: list[Any]) -> ReferenceSTL | None:
    """The dataset's published STL values (``info["reference_stl"]``: ``{"metric": name, "values": {task: value},
    "source": text}``, the values in that metric's units), checked against ``tasks``; None when it declares none.

    Raises:
        ConfigError: the declaration names a metric some task does not compute, misses a task, or has a value that
            is not a finite non-zero number (Δm divides by it).

    Example:
        >>> from mtlkit.tasks import Task
        >>> ref = reference_stl({"reference_stl": {"metric": "mae", "values": {"a": 0.5}}}, [Task("a", "regression")])
        >>> ref.metric, ref.values
        ('mae', {'a': 0.5})
    """
    decl = (info or {}).get("reference_stl")
    if decl is None:
        return None
    if (
        not isinstance(decl, Mapping)
        or not isinstance(decl.get("metric"), str)
        or not isinstance(decl.get("values"), Mapping)
    ):
        raise ConfigError(
            "dataset info['reference_stl'] must be {'metric': name, 'values': {task: value}, 'source': text}, "
            f"got {decl!r}"
        )
    metric, values = decl["metric"], decl["values"]
    names = [t.name for t in tasks if not getattr(t, "auxiliary", False)]
    lacking = [t.name for t in tasks if not getattr(t, "auxiliary", False) and metric not in t.metrics]
    if lacking:
        raise ConfigError(
            f"dataset info['reference_stl'] is in metric {metric!r}, which task(s) {', '.join(lacking)} do not "
            f"compute (their metrics: {', '.join(dict.fromkeys(m for t in tasks for m in t.metrics))})"
        )
    missing = [n for n in names if n not in values]
    if missing:
        raise ConfigError(f"dataset info['reference_stl'] has no value for task(s) {', '.join(missing)}")
    out: dict[str, float] = {}
    for n in names:
        v = values[n]
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v == 0:
            raise ConfigError(f"dataset info['reference_stl'] value of task {n!r} must be a finite non-zero number")
        out[n] = float(v)
    return ReferenceSTL(metric, out, str(decl.get("source", "")))


def reference_delta_m(info: Mapping[str, Any] | None, tasks: list[Any], metrics: Mapping[str, float]) -> float | None:
    """Δm (%, lower is better) of ``metrics`` (``task/metric`` values, e.g. a validation row of
    :func:`mtlkit.evaluation.evaluate`) against the dataset's published STL values (:func:`reference_stl`); None when
    the dataset declares none. The papers' QM9 protocol selects the epoch and steps ReduceLROnPlateau on this number
    (computed on the validation split).

    Example:
        >>> from mtlkit.tasks import Task
        >>> info = {"reference_stl": {"metric": "mae", "values": {"a": 0.5, "b": 2.0}}}
        >>> ts = [Task("a", "regression"), Task("b", "regression")]
        >>> round(reference_delta_m(info, ts, {"a/mae": 0.6, "b/mae": 1.0}), 6)  # (+20 % - 50 %) / 2
        -15.0
    """
    ref = reference_stl(info, tasks)
    if ref is None:
        return None
    keys = table_metrics(tasks, ref)
    return delta_m(
        [metrics[k] for k, _ in keys], [ref.values[k.rsplit("/", 1)[0]] for k, _ in keys], [h for _, h in keys]
    )


def table_metrics(tasks: list[Any], reference: ReferenceSTL | None = None) -> list[tuple[str, bool]]:
    """``(task/metric key, higher is better)`` of the zoo's columns: each task's first metric, or the reference's
    metric when the dataset declares published STL values (the table and both Δm are then on that metric).

    Example:
        >>> from mtlkit.tasks import Task
        >>> table_metrics([Task("a", "multiclass", 3), Task("b", "regression")])
        [('a/accuracy', True), ('b/mae', False)]
    """
    if reference is None:
        return [(f"{t.name}/{t.metrics[0]}", t.higher_is_better[0]) for t in tasks]
    return [
        (f"{t.name}/{reference.metric}", t.higher_is_better[t.metrics.index(reference.metric)])
        for t in tasks
        if not getattr(t, "auxiliary", False)
    ]


def _digits(value: float) -> int:
    """Decimals that show ``value`` to 4 significant digits (at least 2, at most 6)."""
    if value == 0 or not math.isfinite(value):
        return 2
    return min(6, max(2, 3 - math.floor(math.log10(abs(value)))))


def format_value(mean: float, std: float | None, metric: str) -> str:
    """A table cell: a fraction metric x 100 with 2 decimals, any other metric in its units to 4 significant digits
    of the mean (at least 2 decimals; the std with as many); no ``±`` when ``std`` is None.

    Example:
        >>> format_value(0.85, 0.05, "accuracy"), format_value(60.5763, 1.234, "mae_units")
        ('85.00 ± 5.00', '60.58 ± 1.23')
        >>> format_value(0.06712, None, "mae")
        '0.06712'
    """
    k = metric_scale(metric)
    d = 2 if k != 1.0 else _digits(mean)
    return f"{k * mean:.{d}f}" + ("" if std is None else f" ± {k * std:.{d}f}")


def metric_caption(task_metrics: list[tuple[str, bool]], units: Mapping[str, Mapping[str, str]] | None = None) -> str:
    """What the table's numbers are, for its header: ``accuracy (x 100)`` for fraction metrics, ``mae_units (in
    each task's units, not scaled)`` for others (units named in the column headers when known).

    Example:
        >>> metric_caption([("a/accuracy", True), ("b/accuracy", True)])
        'accuracy (x 100, in %)'
        >>> print(metric_caption([("a/mae_units", False)], {"mae_units": {"a": "meV"}}))
        mae_units (in each task's own units, given in the column headers; not scaled)
    """
    parts = []
    for metric in dict.fromkeys(k.rsplit("/", 1)[-1] for k, _ in task_metrics):
        if metric_scale(metric) != 1.0:
            parts.append(f"{metric} (x 100, in %)")
        elif units and metric in units:
            parts.append(f"{metric} (in each task's own units, given in the column headers; not scaled)")
        else:
            parts.append(f"{metric} (as computed, not scaled)")
    return " / ".join(parts)


def _column(key: str, units: Mapping[str, Mapping[str, str]] | None) -> str:
    task, metric = key.rsplit("/", 1)
    unit = (units or {}).get(metric, {}).get(task)
    return f"{key} [{unit}]" if unit else key


def default_zoo(scale: str = "native") -> list[str]:
    """The methods ``mtlkit bench zoo`` trains without ``--methods``: every registered method but those registered
    with ``zoo=False`` (:func:`mtlkit.methods.zoo_methods`); with ``scale="sum"`` also without those whose update
    cannot be put on the sum scale (a footnote of the table names them).

    Example:
        >>> zoo = default_zoo()
        >>> zoo[:2], {"mgda", "nash_mtl", "uw"} <= set(zoo), "nash_mtl" in default_zoo("sum")
        (['stl', 'ew'], True, False)
    """
    from mtlkit.aggregation._base import SUM_SCALE_FACTOR
    from mtlkit.methods import method_scale, zoo_methods

    names = zoo_methods()
    if scale == "sum":
        names = [n for n in names if SUM_SCALE_FACTOR.get(method_scale(n) or "") is not None]
    return names


def __getattr__(name: str) -> Any:
    # DEFAULT_ZOO is read from the method registry when first asked for (importing this module imports no method).
    if name == "DEFAULT_ZOO":
        return default_zoo()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def add_zoo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dataset",
        default="multimnist",
        help="dataset name (`mtlkit methods` lists them); the table shows each task's first metric",
    )
    p.add_argument(
        "--model",
        default=None,
        help="architecture (`mtlkit methods` lists the models; default: the dataset's own default model); every "
        "method of the zoo trains on it, STL as one such model per task",
    )
    p.add_argument("--device", default=None, help="auto, cpu, cuda, cuda:N (default: the config's, auto)")
    p.add_argument(
        "--methods",
        nargs="+",
        default=None,
        help="method names (`mtlkit methods`; default: every registered method but those marked "
        "zoo=False, e.g. ones that need options or a model of their own); STL is always added as "
        "the Δm baseline",
    )
    p.add_argument(
        "--scale",
        choices=["native", "sum"],
        default="native",
        help="native: each method's own output scale (`mtlkit methods` shows it); sum: mean-, convex- and "
        "affine-scale updates multiplied by T, so that every method steps on EW's scale with the same "
        "learning rate (methods whose scale cannot be put there are left out of the default list, and "
        "refused when named)",
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one run per method and seed")
    p.add_argument("--epochs", type=int, default=10, help="training epochs, the same for every method")
    p.add_argument(
        "--n-train",
        type=int,
        default=None,
        help="training+validation samples, for datasets with an n_train option (default: the dataset's own, "
        "120000 images for multimnist/multifashion)",
    )
    p.add_argument(
        "--n-test",
        type=int,
        default=None,
        help="test samples, for datasets with an n_test option (default: the dataset's)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads per run (default: torch's choice)")
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="runs trained at once, each in its own process (use with --threads: jobs x threads <= cores; "
        "on 2 cores, 2 jobs of 1 thread ran 1.07x the training steps per second of 1 job of 2 threads "
        "on the conv model)",
    )
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    p.add_argument("--batch-size", type=int, default=256, help="training batch size")
    p.add_argument("--out", default="runs/zoo", help="output directory (tables, PNG, one run dir per method/seed)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra config overrides")
    p.add_argument(
        "--no-train",
        action="store_true",
        help="train nothing: tabulate the finished runs found in --out (implies --reuse) and list the "
        "missing ones, e.g. to look at a zoo that is still running elsewhere",
    )
    p.add_argument(
        "--reuse",
        action="store_true",
        help="reuse finished runs found in --out instead of retraining, and resume stopped ones from their "
        "checkpoint (only runs of the same config: another budget is an error, not a silent mix)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="retrain every run of this zoo found in --out and replace its table (without --reuse or "
        "--overwrite, an --out that already holds any of them is refused before anything is trained)",
    )


def summarize(results: dict[str, list[dict[str, float]]], keys: list[str]) -> dict[str, dict[str, tuple[float, float]]]:
    """``{method: {key: (mean, std)}}`` over seeds (population std)."""
    return {
        m: {k: (float(np.mean([r[k] for r in rs])), float(np.std([r[k] for r in rs]))) for k in keys}
        for m, rs in results.items()
    }


def zoo_table(
    results: dict[str, list[dict[str, float]]],
    task_metrics: list[tuple[str, bool]],
    baseline: str = "stl",
    reference: ReferenceSTL | None = None,
    units: Mapping[str, Mapping[str, str]] | None = None,
) -> tuple[str, dict[str, Any]]:
    """Markdown table and the numbers behind it; Δm per seed against the mean STL row.

    Fraction metrics are shown x 100, others in their units (:func:`format_value`; ``units``: ``{metric: {task:
    unit}}`` for the column headers). With ``reference`` (published STL values in the table's metric), a row of
    those values and a column of Δm against them (``numbers[method]["delta_m_reference"]``, per seed) are added.
    """
    keys = [k for k, _ in task_metrics]
    hib = [h for _, h in task_metrics]
    summary = summarize(results, keys)
    ref_vals = None if reference is None else [reference.values[k.rsplit("/", 1)[0]] for k in keys]
    ref_col = [] if reference is None else ["Δm % vs ref. STL (↓)"]
    lines = [
        "| method | seeds | "
        + " | ".join(_column(k, units) for k in keys)
        + " | "
        + " | ".join(["Δm % (↓)", *ref_col])
        + " |",
        "|---|---|" + "---|" * (len(keys) + 1 + len(ref_col)),
    ]
    base = [summary[baseline][k][0] for k in keys] if baseline in summary else None

    def dm_cell(dms: list[float], spread: bool) -> str:
        if not dms:
            return "n/a"
        mean = round(float(np.mean(dms)), 2) + 0.0  # + 0.0 makes -0.0 plain 0.0: STL's row reads +0.00, not -0.00
        return f"{mean:+.2f}" + (f" ± {np.std(dms):.2f}" if spread else "")

    numbers: dict[str, Any] = {}
    for m, rs in results.items():
        # A standard deviation needs two seeds: one seed shows the value alone (a partial table can mix both).
        spread = len(rs) > 1
        cells = [format_value(*summary[m][k], k) if spread else format_value(summary[m][k][0], None, k) for k in keys]
        dms = [delta_m([r[k] for k in keys], base, hib) for r in rs] if base is not None else []
        numbers[m] = {"summary": summary[m], "delta_m": dms, "seeds": len(rs)}
        extra = []
        if ref_vals is not None:
            ref_dms = [delta_m([r[k] for k in keys], ref_vals, hib) for r in rs]
            numbers[m]["delta_m_reference"] = ref_dms
            extra = [dm_cell(ref_dms, spread)]
        lines.append(
            f"| {m} | {len(rs)} | " + " | ".join(cells) + " | " + " | ".join([dm_cell(dms, spread), *extra]) + " |"
        )
    if reference is not None and ref_vals is not None:
        own = dm_cell([delta_m(ref_vals, base, hib)], False) if base is not None else "n/a"
        lines.append(
            "| STL (published) | – | "
            + " | ".join(format_value(v, None, k) for v, k in zip(ref_vals, keys, strict=True))
            + f" | {own} | +0.00 |"
        )
    return "\n".join(lines), numbers


@dataclass(frozen=True)
class PairedDifference:
    """Δm of a method minus Δm of a baseline, paired by seed (the same seed's runs), in percentage points."""

    method: str
    baseline: str
    seeds: tuple[int, ...]
    differences: tuple[float, ...]
    mean: float
    half_width: float  # of the two-sided confidence interval of the mean (Student t, n - 1 degrees of freedom)
    p_value: float  # of the two-sided paired t-test (``scipy.stats.ttest_rel``) of "no difference"

    @property
    def separated(self) -> bool:
        """True when the confidence interval excludes 0: the method differs from the baseline beyond seed noise."""
        return abs(self.mean) > self.half_width


def paired_differences(
    delta_m_by_seed: Mapping[str, Mapping[int, float]], baseline: str, confidence: float = 0.95
) -> list[PairedDifference]:
    """Per-seed Δm differences of every other method against ``baseline``, with a t confidence interval.

    Pairing removes what the seeds share (data order, initial weights of the shared layers), which an unpaired
    comparison of two mean ± std would count as noise. Only the seeds both runs have are paired; a method with fewer
    than two common seeds gets no row (an interval needs a spread). The interval is ``mean ± t_{n-1} · s / √n``
    (``s``: the sample std of the differences); with 3 seeds ``t₂ = 4.30`` at 95 %, so "separated" is a strict test.

    Example:
        >>> d = {"stl": {0: 0.0, 1: 0.2, 2: -0.2}, "ew": {0: 2.0, 1: 2.3, 2: 1.8}}
        >>> [(r.method, round(r.mean, 3), r.separated) for r in paired_differences(d, "stl")]
        [('ew', 2.033, True)]
    """
    from scipy import stats

    if not 0.0 < confidence < 1.0:
        raise ConfigError(f"confidence must be in (0, 1), got {confidence}")
    if baseline not in delta_m_by_seed:
        raise ConfigError(f"baseline {baseline!r} has no runs; methods: {', '.join(delta_m_by_seed)}")
    base = delta_m_by_seed[baseline]
    rows = []
    for m, dms in delta_m_by_seed.items():
        seeds = tuple(sorted(set(dms) & set(base)))
        if m == baseline or len(seeds) < 2:
            continue
        diffs = np.array([dms[s] - base[s] for s in seeds], dtype=float)
        sem = float(diffs.std(ddof=1)) / math.sqrt(len(diffs))
        t = float(stats.t.ppf(0.5 + confidence / 2, len(diffs) - 1))
        mean = float(diffs.mean())
        # identical differences on every seed (sem 0): a certain difference, or none at all
        p = float(2 * stats.t.sf(abs(mean) / sem, len(diffs) - 1)) if sem > 0 else float(mean == 0.0)
        rows.append(PairedDifference(m, baseline, seeds, tuple(diffs.tolist()), mean, t * sem, p))
    return rows


def separation_table(delta_m_by_seed: Mapping[str, Mapping[int, float]], baselines: tuple[str, ...]) -> str:
    """Markdown: for each method, its paired Δm difference against each baseline (mean ± 95 % CI half-width, in
    percentage points; ``*`` where the interval excludes 0), or ``""`` when no baseline has runs to pair with."""
    present = [b for b in baselines if b in delta_m_by_seed]
    by = {b: {r.method: r for r in paired_differences(delta_m_by_seed, b)} for b in present}
    if not any(by.values()):
        return ""
    lines = [
        "| method | " + " | ".join(f"Δm − Δm({b}), points" for b in present) + " |",
        "|---|" + "---|" * len(present),
    ]
    for m in delta_m_by_seed:
        cells = []
        for b in present:
            r = by[b].get(m)
            cells.append("–" if r is None else f"{r.mean:+.2f} ± {r.half_width:.2f}{' *' if r.separated else ''}")
        if any(c != "–" for c in cells):
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
    n = sorted({len(r.seeds) for rows in by.values() for r in rows.values()})
    return (
        "Paired per-seed differences of Δm (same seed, method minus baseline; mean ± half-width of the 95 % "
        f"Student-t interval over {'/'.join(map(str, n))} seeds; * = the interval excludes 0, i.e. separated beyond "
        "seed noise):\n\n" + "\n".join(lines)
    )


def budget_notes(methods: list[str], epochs: int) -> str:
    """Footnotes for methods that the budget reduces to EW (weights fixed at 1 for their first epochs), or ``""``.

    Example:
        >>> budget_notes(["ew", "dwa"], epochs=1).strip()
        '* dwa: every weight is 1 in its first 2 epochs, so with 1 epoch it trained exactly as EW.'
    """
    from mtlkit.methods import build_method

    notes = []
    for m in methods:
        n = build_method(m).weighting.equal_weight_epochs
        if epochs <= n:
            notes.append(
                f"* {m}: every weight is 1 in its first {n} epochs, so with {epochs} epoch"
                f"{'s' if epochs != 1 else ''} it trained exactly as EW."
            )
    return "\n\n" + "\n".join(notes) if notes else ""


def _delta_m_panel(axd: Any, series: list[tuple[str, list[float]]], xlabel: str) -> None:
    """Horizontal Δm bars (mean ± std over seeds), green where better than the baseline, red where worse."""
    y = np.arange(len(series))
    axd.barh(
        y,
        [np.mean(d) for _, d in series],
        xerr=[np.std(d) for _, d in series],
        capsize=2,
        color=["tab:green" if np.mean(d) < 0 else "tab:red" for _, d in series],
    )
    axd.set_yticks(y, [m for m, _ in series])
    axd.invert_yaxis()
    axd.axvline(0, color="black", linewidth=0.8)
    axd.set_xlabel(xlabel)


def plot_zoo(
    numbers: dict[str, Any], keys: list[str], path: Path, title: str, ylabel: str = "test accuracy (%)"
) -> Any:
    """The zoo as a PNG: per-task test metric (mean ± std over seeds) per method and, beside it, Δm against STL
    (mean ± std over seeds; lower is better), the number the table ranks by. Returns the (closed) matplotlib Figure,
    whose axes hold the drawn bars.

    Fraction metrics (accuracy, AUC) are drawn x 100 on one axis. Metrics in their own units (MAE of targets in D,
    meV, ...) cannot share an axis: each task's bar is then its mean relative to the zoo's STL mean for that task
    (in % of STL; the raw values when the zoo has no STL row). Where the table has Δm against published STL values
    (``delta_m_reference``), a third panel draws them: on their own axis, since under a reduced budget they can be
    orders of magnitude larger than Δm against the zoo's own STL."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(numbers)
    dm = [(m, numbers[m]["delta_m"]) for m in methods if numbers[m]["delta_m"]]
    ref = [(m, numbers[m]["delta_m_reference"]) for m in methods if numbers[m].get("delta_m_reference")]
    fig, axes = plt.subplots(
        1,
        3 if ref else 2,
        figsize=(max(8, 0.7 * len(methods) * len(keys) + 0.35 * len(methods) + 2 + (2 if ref else 0)), 4),
        gridspec_kw={"width_ratios": [len(keys), 1, 1] if ref else [len(keys), 1]},
    )
    ax, axd = axes[0], axes[1]
    width = 0.8 / len(keys)
    fractions = all(metric_scale(k) != 1.0 for k in keys)
    heights: dict[tuple[str, str], tuple[float, float]] = {}
    base = numbers["stl"]["summary"] if "stl" in numbers and not fractions else None
    for m in methods:
        for k in keys:
            mean, std = numbers[m]["summary"][k]
            if fractions:
                heights[(m, k)] = (100 * mean, 100 * std)
            else:  # every task on its own scale: relative to the zoo's STL mean of that task, when it ran
                b = base[k][0] if base is not None else 0.0
                heights[(m, k)] = (100 * mean / b, 100 * std / abs(b)) if b else (mean, std)
    if base is not None:
        ylabel = f"{ylabel}, % of STL's"
        ax.axhline(100, color="black", linewidth=0.8)
    colors = plt.get_cmap("tab20" if len(keys) > 10 else "tab10").colors  # type: ignore[attr-defined]
    for i, k in enumerate(keys):
        means = [heights[(m, k)][0] for m in methods]
        stds = [heights[(m, k)][1] for m in methods]
        ax.bar(
            np.arange(len(methods)) + i * width,
            means,
            width,
            yerr=stds,
            label=k,
            capsize=2,
            color=colors[i % len(colors)],
        )
    lo = min(h for h, _ in heights.values())
    if fractions:
        ax.set_ylim(max(0, lo - 3), 100)
    elif base is not None:  # zoom on the spread around STL's 100 %
        hi = max(h + e for h, e in heights.values())
        ax.set_ylim(max(0, lo - 5), hi + 5)
    ax.set_xticks(np.arange(len(methods)) + width * (len(keys) - 1) / 2, methods, rotation=45, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize="small" if len(keys) > 4 else None, ncol=1 + len(keys) // 6)
    # Δm per method: only methods with Δm values (none when STL is missing from the zoo)
    if dm:
        _delta_m_panel(axd, dm, "Δm vs STL (%, ↓)")
    else:
        axd.set_axis_off()
    if ref:
        _delta_m_panel(axes[2], ref, "Δm vs published (%, ↓)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return fig


def _dataset(name: str, options: dict[str, Any]) -> Any:
    """``build_dataset(name, **options)``, built once per process (the zoo's runs share it)."""
    from mtlkit.data import build_dataset

    # json, not a tuple of items: a list-valued option (qm9's targets) is unhashable
    key = (name, json.dumps(options, sort_keys=True, default=repr))
    if key not in _DATA_CACHE:
        _DATA_CACHE[key] = build_dataset(name, **options)
    return _DATA_CACHE[key]


_DATA_CACHE: dict[Any, Any] = {}


def dataset_options(name: str, n_train: int | None, n_test: int | None) -> dict[str, Any]:
    """The dataset options of the zoo's ``--n-train`` / ``--n-test``: only those given, and an error (not a silently
    ignored flag) for a dataset without such an option.

    Example:
        >>> dataset_options("multimnist", 600, None)
        {'n_train': 600}
    """
    from mtlkit._registry import DATASETS
    from mtlkit.errors import ConfigError

    given = {k: v for k, v in (("n_train", n_train), ("n_test", n_test)) if v is not None}
    entry = DATASETS.get(name)  # an unknown name: the registry's own error, listing the valid names
    for k in given:
        if k not in entry.options and not entry.open_ended:
            raise ConfigError(
                f"dataset {name!r} has no {k} option (--{k.replace('_', '-')}); its options are: "
                f"{', '.join(entry.options) or 'none'}"
            )
    return given


def zoo_model(dataset: str, model: str | None) -> dict[str, Any]:
    """The zoo's model section: ``model`` (else the dataset's default model) with the options the dataset brings
    for it in ``configs/datasets.yaml``, as ``mtlkit train --dataset`` would use them (the zoo's own flags set the
    budget and sizes, not that file). ``{}``: the code's defaults (a dataset without an entry, no ``--model``).

    Example:
        >>> zoo_model("census", "hps")
        {'name': 'hps', 'options': {'encoder': 'mlp', 'hidden': [512, 64], 'head_hidden': 32}}
        >>> zoo_model("_no_entry", None)
        {}
    """
    from mtlkit.config import dataset_defaults_for

    defaults = dataset_defaults_for(dataset)
    name = model or (defaults.get("model") or {}).get("name")
    if name is None:
        return {}
    options = (defaults.get("models") or {}).get(name) or {}
    return {"name": name, "options": dict(options)} if options else {"name": name}


def _builtin_dataset(name: str) -> bool:
    """Whether ``name`` is one of mtlkit's own datasets (all built from real data), not one registered by a user."""
    from mtlkit._registry import DATASETS

    return name in DATASETS and DATASETS.get(name).module.startswith("mtlkit.")


def _train(cfg_dict: dict[str, Any], resume: bool = False) -> dict[str, float]:
    """Train (or resume) one run from its config dict and return its test metrics (a top-level function: it runs in
    workers)."""
    from mtlkit.train import Trainer

    cfg = RunConfig.from_dict(cfg_dict)
    return Trainer(cfg, data=_dataset(cfg.dataset.name, cfg.dataset.options)).fit(resume=resume).test


def _registering_modules() -> list[str]:
    """Modules that registered a dataset, model, method or metric in this process (a user's own ones included), so
    that a spawned worker can import them and find the same names. ``__main__`` is skipped (spawn re-runs it itself).

    Example:
        >>> {"mtlkit.data", "mtlkit.aggregation.cagrad", "mtlkit.methods"} <= set(_registering_modules())
        True
    """
    from mtlkit._registry import DATASETS, METHODS, METRICS, MODELS

    modules = {e.module for registry in (DATASETS, MODELS, METHODS, METRICS) for e in registry}
    return sorted(modules - {"__main__", "__mp_main__"})


def _import_all(modules: list[str]) -> None:
    import importlib

    for name in modules:
        importlib.import_module(name)


def zoo_stem(dataset: str, model: str | None) -> str:
    """The name shared by a zoo's table files and run directories: ``dataset`` or ``dataset_model`` (``--model``).

    Example:
        >>> zoo_stem("census", "mmoe"), zoo_stem("multimnist", None)
        ('census_mmoe', 'multimnist')
    """
    return dataset if model is None else f"{dataset}_{model}"


def _zoo_files(out: Path, stem: str) -> list[Path]:
    """The table files a zoo named ``stem`` (:func:`zoo_stem`) writes into ``out``."""
    return [out / f"zoo_{stem}{suffix}" for suffix in (".md", ".json", ".png", "_partial.md")]


def _other_config(run_dir: Path, cfg: RunConfig) -> str | None:
    """``"key: a there, b requested, ..."`` when the run in ``run_dir`` was started with another config than ``cfg``
    (keys that change what it learns, as ``--reuse`` compares them); None when it has no config or the same."""
    import yaml

    from mtlkit.runs import REUSE_IGNORED, config_differences

    path = run_dir / "config.yaml"
    if not path.is_file():
        return None
    try:
        saved = yaml.safe_load(path.read_text()) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return "an unreadable config.yaml"
    if not isinstance(saved, dict):
        return "an unreadable config.yaml"
    requested = cfg.to_dict()
    diff = config_differences(saved, requested, allowed=REUSE_IGNORED)

    def look(d: dict[str, Any], key: str) -> Any:
        section, k = key.split(".", 1)
        return (d.get(section) or {}).get(k)

    return ", ".join(f"{k}: {look(saved, k)!r} there, {look(requested, k)!r} requested" for k in diff) or None


def _check_out_dir(
    out: Path, plan: list[tuple[int, str, Path, RunConfig]], stem: str, reuse: bool, overwrite: bool
) -> None:
    """Refuse, before anything is trained, an ``--out`` whose contents this zoo would replace without being asked:
    its runs or table (unless ``--reuse``, which keeps runs of the same config, or ``--overwrite``) and any directory
    at a run's path that is not an mtlkit run (always)."""
    from mtlkit.errors import ConfigError
    from mtlkit.runs import LOCK, MARKER

    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a directory")
    present = [(run_dir, cfg) for _, _, run_dir, cfg in plan if run_dir.is_dir() and any(run_dir.iterdir())]
    foreign = [str(d) for d, _ in present if not ((d / MARKER).is_file() or (d / LOCK).is_file())]
    if foreign:
        raise ConfigError(
            f"refusing to write into {', '.join(foreign)}: not an mtlkit run directory (no {MARKER} "
            f"file); move it away or use another --out"
        )
    if reuse or overwrite:
        return
    tables = [f.name for f in _zoo_files(out, stem) if f.exists()]
    if not present and not tables:
        return
    other = [(d, why) for d, cfg in present for why in [_other_config(d, cfg)] if why]
    names = [d.name for d, _ in present]
    parts = (
        [
            f"{len(names)} run{'s' if len(names) != 1 else ''} of this zoo ({', '.join(names[:3])}"
            f"{', ...' if len(names) > 3 else ''})"
        ]
        if names
        else []
    )
    held = " and ".join(parts + ([f"a zoo table ({tables[0]})"] if tables else []))
    if other:
        d, why = other[0]
        which = "the runs were" if len(other) == len(present) else f"{len(other)} of the runs were"
        raise ConfigError(
            f"{out} already holds {held}; {which} trained with another config ({d.name}: {why}); "
            f"nothing was trained. Pass --overwrite to retrain them and replace the table, or use "
            f"another --out"
        )
    raise ConfigError(
        f"{out} already holds {held}; nothing was trained. Pass --reuse to keep the finished runs of "
        f"this config and continue the stopped ones, --overwrite to retrain them and replace the "
        f"table, or use another --out"
    )


def run_zoo(args: argparse.Namespace) -> int:
    from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
    from multiprocessing import get_context

    from mtlkit.config import check_run_config
    from mtlkit.errors import ConfigError
    from mtlkit.runs import finished_run, resumable_run

    if args.jobs < 1:
        raise ConfigError(f"--jobs must be >= 1, got {args.jobs}")
    if args.threads is not None and args.threads < 1:
        raise ConfigError(f"--threads must be >= 1, got {args.threads}")
    overwrite = bool(getattr(args, "overwrite", False))
    if overwrite and (args.reuse or args.no_train):
        raise ConfigError(
            f"--overwrite retrains every run, {'--reuse' if args.reuse else '--no-train'} keeps them: "
            f"pass one of the two"
        )
    out = Path(args.out)
    scale = getattr(args, "scale", "native")
    if scale not in ("native", "sum"):
        raise ConfigError(f"--scale must be native or sum, got {scale!r}")
    chosen = list(args.methods) if args.methods else default_zoo(scale)
    left_out = [] if args.methods else [m for m in default_zoo() if m not in chosen]
    methods = list(dict.fromkeys(["stl"] + chosen))
    model = getattr(args, "model", None)
    device = getattr(args, "device", None)
    stem = zoo_stem(args.dataset, model)
    data_options = dataset_options(args.dataset, getattr(args, "n_train", None), getattr(args, "n_test", None))
    model_section = zoo_model(args.dataset, model)
    # Every run's config is built and checked (names, options, model/method/level) before any data is loaded or
    # anything trained: a typo in the last method must not surface after hours of training the first ones.
    plan: list[tuple[int, str, Path, RunConfig]] = []
    for seed in args.seeds:  # seed-major order: an interrupted zoo leaves complete seeds (and a partial table)
        for m in methods:
            run_dir = out / (f"{args.dataset}-{m}-s{seed}" if model is None else f"{args.dataset}-{model}-{m}-s{seed}")
            cfg = RunConfig.from_dict(
                {
                    "dataset": {"name": args.dataset, "options": dict(data_options)},
                    **({"model": model_section} if model_section else {}),
                    "method": {"name": m, "scale": scale},
                    "train": {
                        "epochs": args.epochs,
                        "lr": args.lr,
                        "batch_size": args.batch_size,
                        "optimizer": "adam",
                        "seed": seed,
                        "num_threads": args.threads,
                        "progress": False,
                        **({"device": device} if device is not None else {}),
                    },
                    "output": {"dir": str(run_dir), "overwrite": True, "tensorboard": False},
                }
            )
            cfg = cfg.override(list(args.set))
            check_run_config(cfg)
            plan.append((seed, m, run_dir, cfg))
    _check_out_dir(out, plan, stem, args.reuse or args.no_train, overwrite)
    done: dict[tuple[int, str], dict[str, float]] = {}
    todo: list[tuple[int, str, dict[str, Any], bool]] = []  # (seed, method, config, resume)
    for seed, m, run_dir, cfg in plan:
        found = finished_run(run_dir, cfg) if args.reuse or args.no_train else None
        if found is not None:
            done[(seed, m)] = found["test"]
        else:
            resume = (args.reuse or args.no_train) and resumable_run(run_dir, cfg)
            todo.append((seed, m, cfg.to_dict(), bool(resume)))
    # the runs' own dataset options (the flags' and any --set dataset.options.*): the table describes what they train on
    data = _dataset(args.dataset, plan[0][3].dataset.options)
    reference = reference_stl(data.info, data.tasks)
    task_metrics = table_metrics(data.tasks, reference)
    units = data.info.get("metric_units") if isinstance(data.info.get("metric_units"), Mapping) else None
    metric_text = metric_caption(task_metrics, units)
    ref_text = (
        f" Δm vs ref. STL: against the published single-task values of the same metric and units"
        f"{' (' + reference.source + ')' if reference.source else ''}; row STL (published)."
        if reference is not None
        else ""
    )
    # the model every multi-task run of the zoo trains (STL's runs: one such model per task)
    model_name = next((c.model.name for _, m, _, c in plan if m != "stl"), plan[0][3].model.name)
    origin = "real data; " if _builtin_dataset(args.dataset) else ""  # a user's own dataset: no claim made for it
    if overwrite:  # no table of the replaced zoo may survive beside the new runs
        for f in _zoo_files(out, stem):
            f.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)

    scale_text = (
        "scale native (each method's own output scale, `mtlkit methods`)"
        if scale == "native"
        else "scale sum (mean-, convex- and affine-scale updates x T: every method on EW's scale)"
    )

    def header(partial: bool) -> str:
        return (
            f"Method zoo on {args.dataset} ({origin}{len(data.train)} train / {len(data.val)} val / "
            f"{len(data.test)} test samples), model {model_name}, {args.epochs} epoch{'s' if args.epochs != 1 else ''}, "
            f"Adam lr {args.lr}, batch {args.batch_size}, {'partial; ' if partial else ''}seeds {args.seeds}, "
            f"{scale_text}; test {metric_text} of the validation-selected epoch, mean ± std; Δm vs STL (the zoo's own "
            f"STL runs), lower is better.{ref_text}\n\n"
        )

    def results() -> dict[str, list[dict[str, float]]]:
        """Finished runs by method, in the zoo's method order and seed order."""
        by_method: dict[str, list[dict[str, float]]] = {}
        for m in methods:
            for seed in args.seeds:
                if (seed, m) in done:
                    by_method.setdefault(m, []).append(done[(seed, m)])
        return by_method

    def page(partial: bool, missing: list[str]) -> tuple[str, dict[str, Any]]:
        """The table's markdown page (header, table, footnotes, missing runs) and the numbers behind it."""
        table, numbers = zoo_table(results(), task_metrics, reference=reference, units=units)
        by_seed = {
            m: {seed: numbers[m]["delta_m"][i] for i, seed in enumerate(s for s in args.seeds if (s, m) in done)}
            for m in numbers
            if numbers[m]["delta_m"]
        }
        for m, dms in by_seed.items():
            numbers[m]["delta_m_by_seed"] = {str(s): v for s, v in dms.items()}
        separation = separation_table(by_seed, ("stl", "ew"))
        if separation:
            table += "\n\n" + separation
        table += budget_notes(methods, args.epochs)
        if left_out:
            table += (
                "\n\nLeft out of the default list at scale sum (their update cannot be put on the sum scale): "
                + ", ".join(left_out)
                + "."
            )
        if missing:
            table += "\n\nNot trained yet: " + ", ".join(missing) + "."
        return header(partial) + table + "\n", numbers

    def finish(seed: int, m: str, test: dict[str, float]) -> None:
        done[(seed, m)] = test
        print(
            f"{m} seed {seed}: " + ", ".join(f"{k} {test[k]:.4f}" for k, _ in task_metrics if k in test),
            flush=True,
        )
        (out / f"zoo_{stem}_partial.md").write_text(page(partial=True, missing=[])[0])

    missing: list[str] = []
    if args.no_train:
        missing = [f"{m} seed {seed}" + (" (stopped, resumable)" if resume else "") for seed, m, _, resume in todo]
        todo = []
    for seed, m, _, resume in todo:
        if resume:
            print(f"{m} seed {seed}: resuming from its checkpoint", flush=True)
    if args.jobs == 1:
        for seed, m, cfg_dict, resume in todo:
            finish(seed, m, _train(cfg_dict, resume))
    elif todo:
        with ProcessPoolExecutor(
            max_workers=args.jobs,
            mp_context=get_context("spawn"),
            initializer=_import_all,
            initargs=(_registering_modules(),),
        ) as pool:
            # Submitted as workers free up (not all at once), so that a failed run stops the rest of the queue.
            pending: dict[Future, tuple[int, str]] = {}
            queue = list(todo)
            while queue or pending:
                while queue and len(pending) < args.jobs:
                    seed, m, cfg_dict, resume = queue.pop(0)
                    pending[pool.submit(_train, cfg_dict, resume)] = (seed, m)
                ready, _ = wait(list(pending), return_when=FIRST_COMPLETED)
                for fut in ready:
                    seed, m = pending.pop(fut)
                    finish(seed, m, fut.result())  # a failed run raises here, naming its error
    if not done:
        raise ConfigError(f"no finished run of this zoo in {out}: nothing to tabulate")
    text, numbers = page(partial=bool(missing), missing=missing)
    (out / f"zoo_{stem}.md").write_text(text)
    (out / f"zoo_{stem}.json").write_text(json.dumps(numbers, indent=2))
    plot_zoo(
        numbers,
        [k for k, _ in task_metrics],
        out / f"zoo_{stem}.png",
        f"{args.dataset}, model {model_name} (scale {scale})",
        ylabel=f"test {' / '.join(dict.fromkeys(k.rsplit('/', 1)[-1] for k, _ in task_metrics))}"
        + (" (%)" if all(metric_scale(k) != 1.0 for k, _ in task_metrics) else ""),
    )
    if not missing:
        (out / f"zoo_{stem}_partial.md").unlink(missing_ok=True)
    print(text)
    return 0
