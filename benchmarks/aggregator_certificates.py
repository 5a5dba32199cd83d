"""Certificates of every aggregator over the same input families (float64): one markdown table per aggregator.

For each aggregator (``tests/aggregation_asserts.AGGREGATORS``) and each input family (random, conflicting, duplicated
rows, a zero row, rank-deficient, tiny = 1e-6·random, huge = 1e6·random, non-conflicting, Pareto-stationary), over
T in ``--tasks`` and ``--seeds``, the largest

* **KKT (mtlkit)**: relative KKT residual by ``mtlkit.aggregation._solvers`` (QP-based methods): DualProj's weights
  (``dual_cone_kkt_residual``), MGDA's weights (``simplex_kkt_residual``), UPGrad's T projections (recomputed as
  UPGrad computes them, ``dual_cone_on_gramian``, because UPGrad returns only their sum; rows checked to sum to its
  weights). Certified means ≤ ``KKT_TOL``.
* **KKT (indep.)**: the same conditions by the tests' independent residual (normalised by ``u``, not by ``v``); for
  CAGrad the relative duality gap plus the relative excess of ``||d* - g_0||`` over the radius ``c||g_0||``.
* **ref. dev.**: relative deviation of the update from a certified reference (projections by NNLS/BVLS on ``Jᵀ``;
  the min-norm point; Aligned-MTL from the SVD of J).
* **perm. diff**: relative difference of the update under two row permutations (``Deviation.relative``: over the term
  scale ``Σ|w_t|·||g_t||``, or over ``max_t ||g_t||`` for near-zero updates). Not claimed for PCGrad / GradVac / MAMG
  with T > 2 (random projection order).
* **min cos**: the smallest ``cos(g_i, update)`` (updates at round-off level are not counted). Claimed ≥ 0 only for
  UPGrad, DualProj and exact MGDA (and CAGrad when its ball reaches the dual cone).

plus where the worst value occurred. The checks are the ones of ``tests/test_aggregator_properties.py``.

Usage:
    python benchmarks/aggregator_certificates.py
    python benchmarks/aggregator_certificates.py --tasks 2 5 50 --seeds 0 --methods upgrad dualproj
    python benchmarks/aggregator_certificates.py --out benchmarks/results/aggregator_certificates.md
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import scipy
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import aggregation_asserts as aa  # (the tests' shared module)
from mtlkit.aggregation import _solvers

QP_METHODS = ("upgrad", "dualproj", "mgda", "mgda_exact", "cagrad")
NOT_EQUIVARIANT_ABOVE_2 = ("pcgrad", "gradvac", "mamg")


def _kkt(name: str, agg: object, J: torch.Tensor, w: np.ndarray) -> tuple[float, float, float]:
    """(mtlkit residual, independent residual, deviation from the certified reference) for a QP-based method."""
    T = J.shape[0]
    G = aa.gramian64(J)
    Jt = J.to(torch.float64)
    nan = float("nan")
    if name == "dualproj":
        U = np.full((1, T), 1.0 / T)
        V_ref = aa.dual_cone_reference(J, U)
        dev = aa.deviation(
            J,
            torch.from_numpy(w) @ Jt,
            aa.term_scale(J, torch.from_numpy(w)),
            torch.from_numpy(V_ref[0]) @ Jt,
            aa.term_scale(J, torch.from_numpy(V_ref[0])),
        )
        return (_solvers.dual_cone_kkt_residual(G, U, w[None]), aa.dual_cone_residual(G, U, w[None]), dev.relative)
    if name == "upgrad":
        U = np.eye(T) / T
        V_ref = aa.dual_cone_reference(J, U).sum(0)
        dev = aa.deviation(
            J,
            torch.from_numpy(w) @ Jt,
            aa.term_scale(J, torch.from_numpy(w)),
            torch.from_numpy(V_ref) @ Jt,
            aa.term_scale(J, torch.from_numpy(V_ref)),
        )
        try:  # UPGrad's own T projections, as UPGrad computes them (it returns only their sum)
            V = _solvers.dual_cone_on_gramian(J @ J.T, U, agg.norm_eps, agg.reg_eps)
            if not np.allclose(V.sum(0), w, rtol=1e-12, atol=0.0):
                return nan, nan, dev.relative
            return _solvers.dual_cone_kkt_residual(G, U, V), aa.dual_cone_residual(G, U, V), dev.relative
        except (AttributeError, TypeError):
            return nan, nan, dev.relative
    if name in ("mgda", "mgda_exact"):
        w_ref = aa.simplex_reference(J)
        dev = aa.deviation(
            J,
            torch.from_numpy(w) @ Jt,
            aa.term_scale(J, torch.from_numpy(w)),
            torch.from_numpy(w_ref) @ Jt,
            aa.term_scale(J, torch.from_numpy(w_ref)),
        )
        return _solvers.simplex_kkt_residual(G, w), aa.simplex_residual(G, w), dev.relative
    if name == "cagrad":
        c = agg.c
        d_w = w * {0: 1.0, 1: 1.0 + c * c, 2: 1.0 + c}[agg.rescale]  # weights of d*
        d = torch.from_numpy(d_w) @ Jt
        r = aa.cagrad_radius(J, c)
        excess = max(0.0, float((d - Jt.mean(0)).norm()) - r) / max(r, 1e-300)
        ub = aa.cagrad_upper_bound(J, c, [aa.cagrad_simplex_point(d_w)])
        gap = max(0.0, ub - aa.cagrad_primal_value(J, d)) / aa.cagrad_scale(J, c)
        return nan, max(gap, excess), nan
    return nan, nan, nan


def _aligned_reference(J: torch.Tensor) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(J.to(torch.float64), full_matrices=False)
    r = int((S > 1e-8 * S[0]).sum())
    return S[r - 1] * (Vh[:r].T @ (U[:, :r].T @ torch.ones(J.shape[0], dtype=torch.float64)))


def measure(name: str, tasks: list[int], seeds: list[int]) -> dict[str, dict[str, tuple[float, str]]]:
    """Per family: column -> (worst value, where)."""
    factory = aa.AGGREGATORS[name]
    rows: dict[str, dict[str, tuple[float, str]]] = {}
    for fam in aa.ALL_FAMILIES:
        row = {k: (float("nan"), "") for k in ("kkt_lib", "kkt_ind", "ref", "perm", "cos")}

        def keep(key: str, value: float, where: str, larger_is_worse: bool = True) -> None:
            old = row[key][0]  # noqa: B023 - keep is called only within this iteration of the loop (this family's row)
            if math.isnan(value):
                return
            if math.isnan(old) or (value > old if larger_is_worse else value < old):
                row[key] = (value, where)  # noqa: B023 - as above

        for T in tasks:
            for seed in seeds:
                J = aa.make_family(fam, T, seed, torch.float64)
                where = f"T={T}, seed={seed}"
                d, w, D = aa.evaluate(factory, J)
                keep("perm", aa.permutation_difference(factory, J, aa.permutations(T, 2, seed)).relative, where)
                keep("cos", aa.min_cosine(J, d, D), where, larger_is_worse=False)
                if name in QP_METHODS:
                    k_lib, k_ind, ref = _kkt(name, factory(), J, w.numpy())
                    keep("kkt_lib", k_lib, where)
                    keep("kkt_ind", k_ind, where)
                    keep("ref", ref, where)
                elif name == "aligned_mtl":
                    keep("ref", aa.deviation(J, d, D, _aligned_reference(J)).relative, where)
        rows[fam] = row
    return rows


def _fmt(v: tuple[float, str]) -> str:
    value, where = v
    if math.isnan(value):
        return "—"
    return f"{value:.2e} ({where})"


def table(name: str, rows: dict[str, dict[str, tuple[float, str]]]) -> str:
    notes = []
    if name in NOT_EQUIVARIANT_ABOVE_2:
        notes.append("permutation equivariance is claimed only for T = 2 (random projection order)")
    if name in aa.NON_CONFLICTING:
        notes.append("claimed non-conflicting: min cos ≥ 0")
    if name == "mgda":
        notes.append("Frank-Wolfe: documented as approximate for T > 2 (not certified there)")
    if name == "cagrad":
        notes.append("KKT (indep.) = max(relative duality gap, relative excess over the radius c·||g_0||)")
    if name == "upgrad":
        notes.append("KKT columns: UPGrad's T projections as computed by `_solvers.dual_cone_on_gramian`")
    head = f"### {name}\n\n" + "".join(f"*{n}.*\n" for n in notes) + ("\n" if notes else "")
    lines = ["| family | KKT (mtlkit) | KKT (indep.) | ref. dev. | perm. diff | min cos |", "|---|---|---|---|---|---|"]
    for fam, row in rows.items():
        lines.append(
            f"| {fam} | " + " | ".join(_fmt(row[k]) for k in ("kkt_lib", "kkt_ind", "ref", "perm", "cos")) + " |"
        )
    overall = {}
    for k in ("kkt_lib", "kkt_ind", "ref", "perm"):
        vals = [(r[k][0], f"{fam}, {r[k][1]}") for fam, r in rows.items() if not math.isnan(r[k][0])]
        overall[k] = max(vals) if vals else (float("nan"), "")
    cos_vals = [(r["cos"][0], f"{fam}, {r['cos'][1]}") for fam, r in rows.items() if not math.isnan(r["cos"][0])]
    overall["cos"] = min(cos_vals) if cos_vals else (float("nan"), "")
    lines.append(
        "| **all** | " + " | ".join(_fmt(overall[k]) for k in ("kkt_lib", "kkt_ind", "ref", "perm", "cos")) + " |"
    )
    return head + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", type=int, nargs="+", default=list(aa.TASK_COUNTS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--methods", nargs="+", default=list(aa.AGGREGATORS), choices=list(aa.AGGREGATORS))
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (tiny matrices: 1 is fastest)")
    ap.add_argument("--out", type=Path, help="also write the markdown to this file")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    parts = [
        "# Aggregator certificates (float64)\n",
        f"`python benchmarks/aggregator_certificates.py --tasks {' '.join(map(str, args.tasks))} "
        f"--seeds {' '.join(map(str, args.seeds))}`; torch {torch.__version__}, numpy {np.__version__}, "
        f"scipy {scipy.__version__}; KKT_TOL = {aa.KKT_TOL:g}; P = 2T + 3. Each cell: the worst value over T "
        f"and seeds, and where. Relative numbers are over the term scale Σ|w_t|·||g_t|| (see "
        f"`tests/aggregation_asserts.py`).\n",
    ]
    print(parts[0] + "\n" + parts[1], flush=True)
    for name in args.methods:
        parts.append(table(name, measure(name, args.tasks, args.seeds)))
        print(parts[-1], flush=True)
    parts.append(f"\n_{time.perf_counter() - start:.0f} s._\n")
    text = "\n".join(parts)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
