"""How often do task gradients conflict? One EW run per benchmark, every step monitored (issue: benchmarks on which
methods differ).

For each benchmark, one run of equal weighting (EW) at the dataset's own ``mtlkit train`` defaults (configs/
datasets.yaml) with the budget below, logging every step (``train.log_every=1``) with the per-task gradients of the
shared parameters (``train.monitor_gradients=true``: EW itself needs none, so the monitor takes T extra backward
passes per step; training is unchanged). From ``monitor.jsonl``:

* per task pair (i, j): the share of steps with ``cos(g_i, g_j) < 0`` (a *conflict*, the definition of PCGrad's
  paper), and the mean cosine;
* per benchmark: the mean and the largest share over pairs, and the share of steps with at least one conflicting
  pair.

A pair that never conflicts gives a method that removes conflicts nothing to do; a benchmark whose pairs conflict
on a large share of steps is one where gradient-surgery methods can differ from EW.

Run (alone on the machine; each benchmark is one resumable run under ``--out``, reused with ``--reuse``)::

    python benchmarks/conflict_stats.py --out runs/conflicts --reuse \
        --results benchmarks/results/conflict_stats

Example:
    >>> rows = [{"tasks": ["a", "b"], "cos": [[1, -0.5], [-0.5, 1]]}, {"tasks": ["a", "b"], "cos": [[1, 0.2], [0.2, 1]]}]
    >>> s = conflict_summary(rows)
    >>> s["pairs"]["a~b"]["share"], round(s["pairs"]["a~b"]["mean_cos"], 2), s["any_conflict"]
    (0.5, -0.15, 0.5)
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("mtlkit")

#: benchmark name -> (dataset, extra --set assignments: the budget of this script)
BENCHMARKS: dict[str, tuple[str, list[str]]] = {
    "multimnist": ("multimnist", ["dataset.options.n_train=6000", "dataset.options.n_test=1000", "train.epochs=2"]),
    "multimnist_shift4": (
        "multimnist",
        ["dataset.options.n_train=6000", "dataset.options.n_test=1000", "dataset.options.shift=4", "train.epochs=2"],
    ),
    "multifashion": ("multifashion", ["dataset.options.n_train=6000", "dataset.options.n_test=1000", "train.epochs=2"]),
    "multi_attributes": (
        "multi_attributes",
        ["dataset.options.n_train=6000", "dataset.options.n_test=1000", "train.epochs=2"],
    ),
    "yeast": ("yeast", ["train.epochs=6"]),
    "census": ("census", ["dataset.options.n_train=20000", "train.epochs=2"]),
    # the QM9 zoo's CPU budget (benchmarks/results/zoo_qm9.md): 2,000 molecules, hidden 32, 2 epochs
    "qm9": ("qm9", ["model.options.dim=32", "train.epochs=2"]),
}


def conflict_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-pair conflict shares and mean cosines over the monitored steps that have a cosine matrix."""
    rows = [r for r in rows if r.get("cos") is not None]
    if not rows:
        raise ValueError("no monitored step with a cosine matrix (was train.monitor_gradients on?)")
    names = rows[0]["tasks"]
    cos = np.array([[[np.nan if v is None else v for v in line] for line in r["cos"]] for r in rows], dtype=float)
    pairs: dict[str, dict[str, float]] = {}
    for i, j in combinations(range(len(names)), 2):
        c = cos[:, i, j]
        c = c[~np.isnan(c)]
        pairs[f"{names[i]}~{names[j]}"] = {
            "share": float(np.mean(c < 0)) if c.size else float("nan"),
            "mean_cos": float(np.mean(c)) if c.size else float("nan"),
        }
    upper = np.triu(np.ones((len(names), len(names)), dtype=bool), k=1)
    any_conflict = float(np.mean([(np.nan_to_num(m, nan=1.0)[upper] < 0).any() for m in cos]))
    shares = [p["share"] for p in pairs.values()]
    return {
        "tasks": names,
        "steps": len(rows),
        "pairs": pairs,
        "mean_share": float(np.nanmean(shares)),
        "max_share": float(np.nanmax(shares)),
        "any_conflict": any_conflict,
    }


def run(name: str, out: Path, reuse: bool, threads: int | None) -> dict[str, Any]:
    from mtlkit.config import RunConfig
    from mtlkit.monitor import read_monitor
    from mtlkit.train import train_or_reuse

    dataset, extra = BENCHMARKS[name]
    run_dir = out / name
    sets = [
        f"dataset.name={dataset}",
        "method.name=ew",
        "train.seed=0",
        "train.log_every=1",
        "train.monitor_gradients=true",
        "train.progress=false",
        f"output.dir={run_dir}",
        "output.overwrite=true",
        "output.tensorboard=false",
        *extra,
    ] + ([f"train.num_threads={threads}"] if threads else [])
    cfg = RunConfig.resolve(None, sets)
    t0 = time.time()
    results, _, trained = train_or_reuse(cfg, run_dir=run_dir, reuse=reuse)
    summary = conflict_summary(read_monitor(run_dir))
    summary.update(
        dataset=dataset,
        model=cfg.model.name,
        budget=dict(s.split("=", 1) for s in extra),
        test=results.get("test", {}),
        seconds=round(time.time() - t0, 1) if trained else None,
    )
    return summary


def table(summaries: dict[str, dict[str, Any]]) -> str:
    lines = [
        "| benchmark | model | tasks | pairs | steps | mean share of steps in conflict | largest pair share | "
        "steps with any conflict | most conflicting pair (share, mean cos) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, s in summaries.items():
        worst = max(s["pairs"].items(), key=lambda kv: kv[1]["share"])
        lines.append(
            f"| {name} | {s['model']} | {len(s['tasks'])} | {len(s['pairs'])} | {s['steps']} | "
            f"{100 * s['mean_share']:.1f} % | {100 * s['max_share']:.1f} % | {100 * s['any_conflict']:.1f} % | "
            f"{worst[0]} ({100 * worst[1]['share']:.1f} %, {worst[1]['mean_cos']:+.3f}) |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--benchmarks", nargs="+", default=list(BENCHMARKS), choices=list(BENCHMARKS))
    p.add_argument("--out", default="runs/conflicts", help="one run directory per benchmark")
    p.add_argument("--reuse", action="store_true", help="reuse finished runs, resume stopped ones")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--results", default=None, help="write PREFIX.md and PREFIX.json")
    args = p.parse_args(argv)
    from mtlkit.logs import log_to_stderr

    log_to_stderr()
    summaries = {}
    for name in args.benchmarks:
        summaries[name] = run(name, Path(args.out), args.reuse, args.threads)
        log.info(f"[conflicts] {name}: mean share {summaries[name]['mean_share']:.3f}")
    text = (
        "# How often task gradients conflict (one EW run per benchmark, every step monitored)\n\n"
        "Real data (MNIST / Fashion-MNIST images, yeast, census-income, QM9 molecules); seed 0; each dataset's `mtlkit train` "
        "defaults (configs/datasets.yaml) with the budget in the JSON (`budget`); cosines of the per-task "
        "gradients of the shared parameters at every step (`train.monitor_gradients`). A conflict: cos < 0.\n\n"
        + table(summaries)
        + "\n\nCommand: `python benchmarks/conflict_stats.py "
        + " ".join(["--benchmarks", *args.benchmarks, "--out", args.out, "--reuse"])
        + (f" --results {args.results}" if args.results else "")
        + "`\n"
    )
    print(text)
    if args.results:
        Path(args.results + ".md").write_text(text)
        Path(args.results + ".json").write_text(json.dumps(summaries, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
