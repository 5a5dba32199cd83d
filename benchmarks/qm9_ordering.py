"""Does a reduced QM9 budget keep the published ordering of the methods? Read a finished ``mtlkit bench zoo
--dataset qm9`` and compare its ordering with the papers' (issue: benchmarks on which methods differ, part 1).

The papers' Δm (:data:`mtlkit.data.qm9.PUBLISHED_DELTA_M`: Navon et al., "Multi-Task Learning as a Bargaining
Game", ICML 2022, and Liu et al., "FAMO: Fast Adaptive Multitask Optimization", NeurIPS 2023, as the issue quotes
them; not verified against the papers' tables, see that constant) are at the full budget: 110k molecules, 300
epochs, hidden 64. We cannot run that on a CPU, so we cannot compare a reduced budget's ordering with the full
budget's ordering of *our* code. What this script measures instead, from the zoo's own files:

* **agreement with the published ordering**: Kendall's τ (``scipy.stats.kendalltau``, τ-b) between our mean test Δm
  and the published Δm over the methods both have (EW is the papers' "LS"), for Δm against our own STL runs and
  against the papers' STL MAEs, and per seed (its spread over seeds says how much of τ is seed noise);
* **whether the ordering has settled at this budget**: each epoch's validation Δm (against the papers' STL MAEs,
  from every run's ``metrics.jsonl``; validation only, never test) averaged over seeds, and τ between each epoch's
  ordering and the last epoch's. An ordering that still changes from one epoch to the next is not one a longer run
  can be expected to keep.

Run after the zoo (the zoo directory holds ``zoo_qm9.json`` and one run directory per method and seed)::

    python benchmarks/qm9_ordering.py --zoo runs/zoo_qm9 --results benchmarks/results/qm9_ordering

Example:
    >>> round(kendall({"a": 1.0, "b": 2.0, "c": 3.0}, {"a": 10.0, "b": 30.0, "c": 20.0})[0], 3)
    0.333
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

#: our method name -> the papers' row name (the papers call equal weighting "LS", linear scalarisation)
PAPER_NAME = {"ew": "ls"}


def kendall(ours: dict[str, float], published: dict[str, float]) -> tuple[float, float, int]:
    """Kendall's τ-b and its two-sided p-value between two {method: Δm} maps, over the methods both have."""
    from scipy import stats

    common = [m for m in ours if PAPER_NAME.get(m, m) in published]
    if len(common) < 3:
        return float("nan"), float("nan"), len(common)
    res = stats.kendalltau([ours[m] for m in common], [published[PAPER_NAME.get(m, m)] for m in common])
    return float(res.statistic), float(res.pvalue), len(common)


def validation_delta_m_by_epoch(run_dir: Path, reference: dict[str, float]) -> list[float]:
    """Validation Δm (%) against ``reference`` (MAE in report units per task) at every epoch of one run."""
    from mtlkit.metrics import delta_m

    out = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "epoch" not in row or f"val/{next(iter(reference))}/mae_units" not in row:
            continue
        out.append(
            delta_m(
                [row[f"val/{t}/mae_units"] for t in reference],
                list(reference.values()),
                [False] * len(reference),
            )
        )
    return out


def analyse(zoo: Path) -> dict[str, Any]:
    from mtlkit.data.qm9 import PUBLISHED_DELTA_M, PUBLISHED_DELTA_M_VERIFIED, STL_MAE

    numbers = json.loads((zoo / "zoo_qm9.json").read_text())
    methods = [m for m in numbers if m != "stl"]
    own = {m: float(np.mean(numbers[m]["delta_m"])) for m in methods}
    ref = {m: float(np.mean(numbers[m]["delta_m_reference"])) for m in methods}
    seeds = sorted({int(s) for m in methods for s in numbers[m].get("delta_m_by_seed", {})})
    per_seed = {}
    for s in seeds:
        dms = {m: numbers[m]["delta_m_by_seed"][str(s)] for m in methods if str(s) in numbers[m]["delta_m_by_seed"]}
        per_seed[s] = kendall(dms, PUBLISHED_DELTA_M)[0]
    # validation Δm per epoch, mean over seeds
    curves: dict[str, list[float]] = {}
    for m in methods:
        runs = sorted(zoo.glob(f"*-{m}-s*"))
        series = [validation_delta_m_by_epoch(r, STL_MAE) for r in runs if (r / "metrics.jsonl").is_file()]
        n = min(len(c) for c in series) if series else 0
        if n:
            curves[m] = [float(np.mean([c[e] for c in series])) for e in range(n)]
    epochs = min(len(c) for c in curves.values()) if curves else 0
    last = {m: c[epochs - 1] for m, c in curves.items()}
    by_epoch = [
        {
            "epoch": e + 1,
            "tau_vs_last_epoch": kendall({m: c[e] for m, c in curves.items()}, last)[0],
            "tau_vs_published": kendall({m: c[e] for m, c in curves.items()}, PUBLISHED_DELTA_M)[0],
        }
        for e in range(epochs)
    ]
    return {
        "published": PUBLISHED_DELTA_M,
        "published_verified": PUBLISHED_DELTA_M_VERIFIED,
        "test_delta_m_own_stl": own,
        "test_delta_m_published_stl": ref,
        "tau_own_stl": kendall(own, PUBLISHED_DELTA_M),
        "tau_published_stl": kendall(ref, PUBLISHED_DELTA_M),
        "tau_per_seed_own_stl": per_seed,
        "validation_delta_m_by_epoch": curves,
        "by_epoch": by_epoch,
    }


def markdown(a: dict[str, Any], zoo: Path) -> str:
    pub = a["published"]
    own, ref = a["test_delta_m_own_stl"], a["test_delta_m_published_stl"]
    rank = {m: i + 1 for i, m in enumerate(sorted(own, key=own.get))}
    prank = {
        m: i + 1
        for i, m in enumerate(
            sorted((m for m in own if PAPER_NAME.get(m, m) in pub), key=lambda m: pub[PAPER_NAME.get(m, m)])
        )
    }
    lines = [
        "| method | published Δm % | rank | our Δm % vs own STL | rank | our Δm % vs published STL |",
        "|---|---|---|---|---|---|",
    ]
    for m in sorted(own, key=own.get):
        p = pub.get(PAPER_NAME.get(m, m))
        lines.append(
            f"| {m} | {'–' if p is None else f'{p:+.1f}'} | {prank.get(m, '–')} | {own[m]:+.2f} | {rank[m]} | "
            f"{ref[m]:+.1f} |"
        )
    t1, p1, n1 = a["tau_own_stl"]
    t2, p2, n2 = a["tau_published_stl"]
    seeds = ", ".join(f"seed {s}: {t:+.2f}" for s, t in a["tau_per_seed_own_stl"].items())
    ep = "\n".join(
        f"| {r['epoch']} | {r['tau_vs_last_epoch']:+.2f} | {r['tau_vs_published']:+.2f} |" for r in a["by_epoch"]
    )
    return (
        f"Kendall's τ-b between our ordering and the published one ({n1} methods): **{t1:+.2f}** (p = {p1:.2f}) with "
        f"Δm against our own STL, {t2:+.2f} (p = {p2:.2f}, {n2} methods) against the papers' STL MAEs; per seed "
        f"(own STL): {seeds}. The published Δm are "
        f"{'verified' if a['published_verified'] else 'as the issue quotes them, NOT verified against the papers'}.\n\n"
        + "\n".join(lines)
        + "\n\nDoes the ordering settle within the budget? Validation Δm against the papers' STL MAEs, mean over "
        "seeds, per epoch; τ of each epoch's ordering against the last epoch's and against the published one:\n\n"
        "| epoch | τ vs last epoch | τ vs published |\n|---|---|---|\n"
        + ep
        + f"\n\nCommand: `python benchmarks/qm9_ordering.py --zoo {zoo} --results <prefix>`\n"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--zoo", required=True, help="the output directory of `mtlkit bench zoo --dataset qm9`")
    p.add_argument("--results", default=None, help="write PREFIX.md and PREFIX.json")
    args = p.parse_args(argv)
    zoo = Path(args.zoo)
    if not (zoo / "zoo_qm9.json").is_file():
        p.error(f"{zoo / 'zoo_qm9.json'} not found: run `mtlkit bench zoo --dataset qm9 --out {zoo}` first")
    a = analyse(zoo)
    text = markdown(a, zoo)
    print(text)
    if args.results:
        Path(args.results + ".md").write_text(text)
        Path(args.results + ".json").write_text(json.dumps(a, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
