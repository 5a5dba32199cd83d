"""On which benchmark do the methods separate beyond seed noise? One table over every committed zoo (issue:
benchmarks on which methods differ).

For each zoo result (a ``mtlkit bench zoo`` JSON, or one of the tuned tables), the per-seed Δm of every method is
paired with STL's and with EW's of the same seed (:func:`mtlkit.bench.paired_differences`: mean difference ± the
half-width of its 95 % Student-t interval). A method *separates* from a baseline when that interval excludes 0; with
3 seeds (t₂ = 4.30) that asks for a consistent difference, not a lucky seed.

Pairing: a zoo JSON written before ``delta_m_by_seed`` existed lists each method's Δm in the zoo's seed order; where
every method has the same number of seeds (true of every committed zoo), position i is the same seed for all, and
that is what is paired. The tuned tables list the 3 test seeds in order (``tuned``).

Run (reads only committed files; trains nothing)::

    python benchmarks/separation.py --results benchmarks/results/separation
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"

#: benchmark label -> (JSON file under benchmarks/results, key path inside it or None, Δm field, budget)
SOURCES: list[tuple[str, str, str | None, str, str]] = [
    ("MultiMNIST (2 tasks, LeNet HPS)", "zoo_multimnist_full_1epoch.json", None, "delta_m", "120k images, 1 epoch"),
    ("MultiFashion (2 tasks, LeNet HPS)", "zoo_multifashion_full_1epoch.json", None, "delta_m", "120k images, 1 epoch"),
    ("Multi-attributes (8 tasks, conv HPS)", "zoo_multi_attributes.json", None, "delta_m", "6k images, 3 epochs"),
    ("census (2 tasks, HPS)", "census_architectures.json", "hps", "delta_m", "40k rows, 3 epochs"),
    ("census (2 tasks, MMoE)", "census_architectures.json", "mmoe", "delta_m", "40k rows, 3 epochs"),
    ("census (2 tasks, PLE)", "census_architectures.json", "ple", "delta_m", "40k rows, 3 epochs"),
    ("census tuned (2 tasks, MMoE)", "tuned_census.json", None, "tuned", "10 trials/method, 3 test seeds"),
    ("census untuned (2 tasks, MMoE)", "tuned_census.json", None, "untuned", "the MMoE zoo's runs, 3 epochs"),
    ("yeast tuned (14 tasks, MLP)", "tuned_yeast.json", None, "tuned", "10 trials/method, 3 test seeds"),
    ("yeast untuned (14 tasks, MLP)", "tuned_yeast.json", None, "untuned", "6 epochs, batch 64, lr 1e-3"),
    ("QM9 (11 targets, MPNN hidden 32)", "zoo_qm9.json", None, "delta_m", "2,000 molecules, 2 epochs"),
]


def by_seed(numbers: dict[str, Any], field: str) -> dict[str, dict[int, float]]:
    """``{method: {seed position or seed: Δm}}`` from one zoo's numbers."""
    out: dict[str, dict[int, float]] = {}
    for m, row in numbers.items():
        if not isinstance(row, dict):
            continue
        if field == "delta_m" and row.get("delta_m_by_seed"):
            out[m] = {int(s): float(v) for s, v in row["delta_m_by_seed"].items()}
        elif row.get(field):
            out[m] = dict(enumerate(float(v) for v in row[field]))
    return out


def holm(p_values: dict[str, float], alpha: float = 0.05) -> set[str]:
    """The names whose hypothesis Holm's step-down procedure rejects at family-wise error ``alpha`` (Holm, "A simple
    sequentially rejective multiple test procedure", Scand. J. Statist. 1979): the k-th smallest p-value is compared
    with alpha / (m - k + 1), stopping at the first that fails.

    Example:
        >>> sorted(holm({"a": 0.001, "b": 0.03, "c": 0.04}))
        ['a']
    """
    rejected: set[str] = set()
    ordered = sorted(p_values.items(), key=lambda kv: kv[1])
    for k, (name, p) in enumerate(ordered):
        if p > alpha / (len(ordered) - k):
            break
        rejected.add(name)
    return rejected


def summarise(label: str, dms: dict[str, dict[int, float]], budget: str) -> dict[str, Any]:
    import numpy as np

    from mtlkit.bench import paired_differences

    # STL is a baseline, not a method under test: it is left out of every family (and of Holm's count)
    vs = {b: [r for r in paired_differences(dms, b) if r.method != "stl"] if b in dms else [] for b in ("stl", "ew")}
    holm_rejects = {b: holm({r.method: r.p_value for r in rows}) for b, rows in vs.items()}
    stl_spread = float(np.std(list(dms["stl"].values()), ddof=1)) if "stl" in dms else float("nan")
    return {
        "benchmark": label,
        "budget": budget,
        "methods": [m for m in dms if m != "stl"],
        "seeds": sorted({len(v) for v in dms.values()}),
        "stl_seed_std": stl_spread,
        # per method: [mean paired difference, CI half-width, separated (CI excludes 0), p, separated after Holm]
        **{
            f"vs_{b}": {
                r.method: [r.mean, r.half_width, r.separated, r.p_value, r.method in holm_rejects[b]] for r in rows
            }
            for b, rows in vs.items()
        },
    }


def cell(rows: dict[str, list[Any]], index: int) -> str:
    """``k of n: method diff, ...`` for the methods whose entry ``index`` (2: CI, 4: Holm) says separated."""
    sep = [(m, v[0]) for m, v in rows.items() if v[index]]
    if not rows:
        return "–"
    if not sep:
        return f"none of {len(rows)}"
    return f"{len(sep)} of {len(rows)}: " + ", ".join(f"{m} {d:+.2f}" for m, d in sep)


def markdown(summaries: list[dict[str, Any]]) -> str:
    lines = [
        "| benchmark | budget | seeds | STL's seed std of Δm (points) | separated from STL: 95 % CI | after Holm | "
        "separated from EW: 95 % CI | after Holm | largest mean |paired diff vs EW| |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        big = max((abs(v[0]) for v in s["vs_ew"].values()), default=float("nan"))
        lines.append(
            f"| {s['benchmark']} | {s['budget']} | {'/'.join(map(str, s['seeds']))} | {s['stl_seed_std']:.2f} | "
            f"{cell(s['vs_stl'], 2)} | {cell(s['vs_stl'], 4)} | {cell(s['vs_ew'], 2)} | {cell(s['vs_ew'], 4)} | "
            f"{big:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", default=None, help="write PREFIX.md and PREFIX.json")
    args = p.parse_args(argv)
    summaries = []
    missing = []
    for label, file, key, field, budget in SOURCES:
        path = RESULTS / file
        if not path.is_file():
            missing.append(file)
            continue
        numbers = json.loads(path.read_text())
        if key is not None:
            numbers = numbers[key]
        summaries.append(summarise(label, by_seed(numbers, field), budget))
    text = (
        "# Where do the methods separate beyond seed noise?\n\n"
        "Each committed zoo, per-seed Δm (%, lower is better, vs the zoo's own STL) paired by seed with STL's and "
        "EW's: a method is counted as separated when the 95 % Student-t interval of its mean paired difference "
        "excludes 0 (differences in Δm points, positive = worse than the baseline). Each row makes one comparison "
        "per method, so at 5 % about one in twenty is expected to pass by chance; the Holm columns control the "
        "family-wise error over the methods of the row (p-values of the paired t-test). Real data throughout; the "
        "budget of each zoo is in its own file.\n\n"
        + markdown(summaries)
        + ("\n\nNot found (not run yet): " + ", ".join(missing) if missing else "")
        + "\n\nCommand: `python benchmarks/separation.py --results benchmarks/results/separation`\n"
    )
    print(text)
    if args.results:
        Path(args.results + ".md").write_text(text)
        Path(args.results + ".json").write_text(json.dumps(summaries, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
