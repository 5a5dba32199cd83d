"""Shared inputs, reference solvers and property checks for the aggregator tests.

Used by ``tests/test_aggregator_properties.py`` and ``benchmarks/aggregator_certificates.py`` (which puts ``tests/``
on ``sys.path``; pytest does the same for test modules, as ``from conftest import ...`` in ``test_data.py`` relies on).
The layout follows the idea of torchjd's ``tests/unit/aggregation/_asserts.py``: one function per property, taking an
aggregator and a matrix; here each returns the measured number so that the tests and the benchmark share it.

Conventions
-----------
* Aggregators are passed as **factories** (zero-argument callables returning a fresh aggregator): several are stateful
  (Nash-MTL's warm start, GradVac's targets, the seeded generators of PCGrad/GradVac/MAMG/GradDrop), so every
  evaluation starts from a fresh one and the compared runs see the same state and the same random draws.
* Input families are built in float64 and then cast, so a family's float32 and float64 versions are the same matrix up
  to rounding. ``tiny`` and ``huge`` are exactly ``1e-6`` and ``1e6`` times ``random`` (same seed).
* **Term scale** ``D = Σ_t |w_t|·||g_t||`` of an update ``d = Σ_t w_t g_t``: the size of the terms summed into ``d``.
  The rounding error of ``d`` is bounded by a multiple of ``eps·D``, not of ``eps·||d||`` (``d`` can cancel down to
  round-off, e.g. when the dual cone of J is a subspace and every projection is 0), so differences and violations are
  measured relative to ``D``. For methods that are not Gramian-based (GradDrop: coefficients in [0, 1])
  ``D = Σ||g_t||``.

Tolerances (each derived, none read off one machine's last bits)
----------------------------------------------------------------
* :func:`rounding_tol`: ``C·(P + T)·eps·κ``. ``(P + T)·eps`` is the standard bound (Higham, "Accuracy and Stability
  of Numerical Algorithms", Sec. 3.1, ``γ_n ≈ n·eps``) on the relative rounding of a length-``P`` dot product (an
  entry of ``G = J Jᵀ``) plus the length-``T`` sum ``wᵀJ``; ``κ`` (:func:`numerical_cond`) is the condition number of J
  on its numerical range, the first-order factor from a relative perturbation of J to one of a least-squares-type
  solution on a fixed active set; ``C = 4`` is a safety factor over the first-order bound.
* :data:`SOLVER_RTOL` = 1e-8: the relative agreement expected of two exact (active-set, certified to
  ``KKT_TOL = 1e-9``) solutions in float64; 10x above ``KKT_TOL`` (a certified answer may sit anywhere within it).
* :func:`update_tol` = ``max(SOLVER_RTOL, rounding_tol)``: the relative tolerance for comparing two updates.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch
from scipy.optimize import lsq_linear, minimize, nnls
from torch import Tensor

from mtlkit.aggregation import (
    IMTLG,
    MAMG,
    MGDA,
    AlignedMTL,
    CAGrad,
    DualProj,
    GradDrop,
    GradVac,
    Mean,
    NashMTL,
    PCGrad,
    Sum,
    UPGrad,
)
from mtlkit.aggregation._solvers import KKT_TOL, dual_cone_kkt_residual, simplex_kkt_residual  # noqa: F401 (re-export)
from mtlkit.aggregation.conflict_free import ConFIG
from mtlkit.aggregation.sdmgrad import SDMGrad

Factory = Callable[[], object]

#: Every aggregator, by the name the tests and the benchmark use, as a factory of fresh instances. Configurations
#: are explicit where a default is a documented choice (MGDA's solver, Nash-MTL's normalisation); the randomised
#: methods get a fixed seed.
AGGREGATORS: dict[str, Factory] = {
    "sum": Sum,
    "mean": Mean,
    "mgda": MGDA,  # Frank-Wolfe (default; approximate for T > 2)
    "mgda_exact": lambda: MGDA(solver="exact"),
    "upgrad": UPGrad,
    "dualproj": DualProj,
    "cagrad": CAGrad,
    "pcgrad": lambda: PCGrad(seed=3),
    "gradvac": lambda: GradVac(seed=3),
    "mamg": lambda: MAMG(seed=3),
    "graddrop": lambda: GradDrop(seed=3),
    "imtl_g": IMTLG,
    "aligned_mtl": AlignedMTL,
    "nash_mtl": lambda: NashMTL(normalize=False),  # the paper's G α = 1/α
    "nash_mtl_normalized": lambda: NashMTL(normalize=True),
    "sdmgrad": SDMGrad,
    "conflict_free": ConFIG,
}
#: Methods whose update never conflicts with a task (for all T), as their papers claim.
NON_CONFLICTING = ("upgrad", "dualproj", "mgda_exact")

#: The input families every aggregator runs over (the issue's list).
FAMILIES = ("random", "conflicting", "duplicated", "zero_row", "rank_deficient", "tiny", "huge")
#: Extra families used by specific properties: all pairwise inner products > 0; 0 in the convex hull (g_1 = -g_0).
EXTRA_FAMILIES = ("non_conflicting", "pareto_stationary")
ALL_FAMILIES = FAMILIES + EXTRA_FAMILIES
#: Families whose Gramian is exactly singular by construction.
SINGULAR_FAMILIES = ("duplicated", "zero_row", "rank_deficient", "pareto_stationary")
#: Numbers of tasks of the fixed grid (the hypothesis sweep draws others in [2, 50]).
TASK_COUNTS = (2, 3, 5, 10, 50)
#: ``tiny`` / ``huge`` are these multiples of ``random``.
TINY, HUGE = 1e-6, 1e6

SOLVER_RTOL = 1e-8
ROUNDING_C = 4.0
EPS64 = float(np.finfo(np.float64).eps)


def n_params(T: int) -> int:
    """Columns of the families' matrices: small (fast) but above T, so that random J has full row rank, well
    conditioned (cond(J) ≈ (√P + √T)/(√P − √T) ≤ 6 for P = 2T + 3)."""
    return 2 * T + 3


# ----------------------------------------------------------------------------------------------------------- inputs
def make_family(name: str, T: int, seed: int = 0, dtype: torch.dtype = torch.float64, P: int | None = None) -> Tensor:
    """The T x P matrix of family ``name`` (built in float64 from ``seed``, then cast to ``dtype``)."""
    P = n_params(T) if P is None else P
    gen = torch.Generator().manual_seed(1000 * seed + T)

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    J = randn(T, P)
    if name in ("random", "tiny", "huge"):
        J = J * {"random": 1.0, "tiny": TINY, "huge": HUGE}[name]
    elif name == "conflicting":
        # A shared direction b with alternating signs and norms in [0.5, 3]·√P, plus a little noise: strongly
        # conflicting pairs (cosines near -1) with unequal norms.
        b = randn(P)
        b = b / b.norm()
        sign = torch.tensor([(-1.0) ** t for t in range(T)], dtype=torch.float64)
        size = 0.5 + 2.5 * torch.rand(T, generator=gen, dtype=torch.float64)
        J = (sign * size)[:, None] * b[None, :] * P**0.5 + 0.3 * J
    elif name == "duplicated":
        J[1] = J[0]
        if T >= 4:
            J[3] = J[2]
    elif name == "zero_row":
        J[T // 2] = 0.0  # inside the matrix (the last row for T = 2)
    elif name == "rank_deficient":
        r = max(1, T // 2)
        J = randn(T, r) @ randn(r, P) / r**0.5
    elif name == "non_conflicting":
        J = J.abs() + 0.1
    elif name == "pareto_stationary":
        # g_1 = -g_0 (so 0 = (g_0 + g_1)/2 is in the convex hull); the other rows are nearly orthogonal to g_0, so
        # that the ball of CAGrad can reach the dual cone {d : J d ≥ 0} (which lies in g_0's orthogonal complement).
        g0 = J[0] / J[0].norm()
        rest = J[2:] - (J[2:] @ g0)[:, None] * g0[None, :]
        J = torch.cat([J[:1], -J[:1], rest + 0.05 * randn(T - 2, 1) * g0[None, :]])
    else:
        raise ValueError(f"unknown family {name!r}")
    return J.to(dtype)


def eps(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).eps)


def numerical_cond(J: Tensor) -> float:
    """Condition number of J on its numerical range: σ_max / smallest σ above ``(P + T)·eps·σ_max`` (eps of J's
    dtype; singular values below that are round-off of an exactly singular matrix, not information)."""
    s = np.linalg.svd(J.detach().to(torch.float64).numpy(), compute_uv=False)
    if s.size == 0 or s[0] == 0.0:
        return 1.0
    kept = s[s > sum(J.shape) * eps(J.dtype) * s[0]]
    return float(s[0] / kept[-1])


def rounding_tol(J: Tensor, power: int = 1) -> float:
    """``C·(P + T)·eps·κ^power`` (see the module docstring); ``power=2`` for methods that invert G (cond(G) = κ²)."""
    return ROUNDING_C * sum(J.shape) * eps(J.dtype) * numerical_cond(J) ** power


def update_tol(J: Tensor, power: int = 1) -> float:
    """Relative tolerance for two updates of the same method that must agree: solver-level or rounding-level."""
    return max(SOLVER_RTOL, rounding_tol(J, power))


def permutations(T: int, n: int = 2, seed: int = 0) -> list[Tensor]:
    """``n`` fixed permutations of ``range(T)``: the reversal and ``n - 1`` random ones (not the identity, T ≥ 2)."""
    gen = torch.Generator().manual_seed(seed)
    out = [torch.arange(T - 1, -1, -1)]
    while len(out) < n:
        p = torch.randperm(T, generator=gen)
        if not torch.equal(p, torch.arange(T)):
            out.append(p)
    return out


# ------------------------------------------------------------------------------------------------------- evaluation
def evaluate(factory: Factory, J: Tensor) -> tuple[Tensor, Tensor | None, float]:
    """``(d, w, D)``: update, weights (None if the method is not Gramian-based) and term scale, from a fresh aggregator.

    For Gramian-based methods ``d = wᵀJ`` with ``w = agg.weights(J Jᵀ)`` cast to J's dtype, which is exactly what
    ``Aggregator.__call__`` computes (one evaluation gives both; :func:`assert_expected_structure` checks the identity).
    """
    agg = factory()
    if getattr(agg, "gramian_based", False):
        w = agg.weights(J @ J.T)
        d = w.to(J.dtype) @ J
        return d, w, term_scale(J, w)
    return agg(J), None, term_scale(J, None)


def term_scale(J: Tensor, w: Tensor | None) -> float:
    """``D = Σ_t |w_t|·||g_t||`` (``Σ_t ||g_t||`` when ``w`` is None), in float64."""
    norms = J.detach().to(torch.float64).norm(dim=1)
    if w is None:
        return float(norms.sum())
    return float((w.detach().to(torch.float64).abs() * norms).sum())


def _rel(diff: float, scale: float) -> float:
    if scale > 0:
        return diff / scale
    return 0.0 if diff == 0 else float("inf")


def scale_floor(J: Tensor) -> float:
    """Round-off level of one gradient, ``(P + T)·eps·max_t ||g_t||``: the floor of the term scale D (an update made
    only of a zero row's weight has D = 0, and a rounding-level difference from it is not an error)."""
    return sum(J.shape) * eps(J.dtype) * float(J.detach().to(torch.float64).norm(dim=1).max())


def assert_expected_structure(factory: Factory, J: Tensor) -> Tensor:
    """The update has shape (P,), J's dtype, finite entries; Gramian-based: it is ``weights(J Jᵀ)ᵀ J``."""
    d = factory()(J)
    assert isinstance(d, Tensor), type(d)
    assert d.shape == J.shape[1:], (tuple(d.shape), tuple(J.shape))
    assert d.dtype == J.dtype, (d.dtype, J.dtype)
    assert bool(torch.isfinite(d).all()), "non-finite update"
    agg = factory()
    if getattr(agg, "gramian_based", False):
        w = agg.weights(J @ J.T)
        assert w.shape == (J.shape[0],) and bool(torch.isfinite(w).all()), w
        assert torch.equal(w.to(J.dtype) @ J, d), "update is not weights(J Jᵀ)ᵀ J"
    return d


class Deviation:
    """How far an update is from the one it must equal: absolute ``diff`` (float64), the term scale ``scale`` of the
    compared runs (the smaller one, so that a run with huge weights on a null direction cannot hide its own error),
    the rounding level ``floor`` of one gradient (:func:`scale_floor`) and the largest gradient norm ``gscale``.

    ``within(tol)``: ``diff ≤ tol·scale + C·floor``; the floor term matters only when the update is itself at
    round-off level (a stationary point: the exact update is 0, the computed one is noise of the input's size·eps).
    ``relative`` (the number reported): ``diff / scale``; for near-zero updates (``scale < √eps·gscale``, whose own
    relative error is not meaningful) ``diff / gscale``, the error relative to the gradients' size.
    """

    def __init__(self, diff: float, scale: float, floor: float, gscale: float, dtype_eps: float) -> None:
        self.diff, self.scale, self.floor = float(diff), float(scale), float(floor)
        self.gscale, self.dtype_eps = float(gscale), float(dtype_eps)

    @property
    def relative(self) -> float:
        near_zero = self.scale < np.sqrt(self.dtype_eps) * self.gscale
        return _rel(self.diff, self.gscale if near_zero else self.scale)

    def within(self, tol: float) -> bool:
        return self.diff <= tol * self.scale + ROUNDING_C * self.floor

    def __repr__(self) -> str:
        return f"{self.relative:.3g}"


def deviation(J: Tensor, d: Tensor, D: float, d_ref: Tensor, D_ref: float | None = None) -> Deviation:
    """:class:`Deviation` of ``d`` (term scale D) from ``d_ref`` (term scale ``D_ref``, default D)."""
    diff = float((d.detach().to(torch.float64) - d_ref.detach().to(torch.float64)).norm())
    gscale = float(J.detach().to(torch.float64).norm(dim=1).max())
    return Deviation(diff, min(D, D if D_ref is None else D_ref), scale_floor(J), gscale, eps(J.dtype))


def worst(devs: Iterable[Deviation]) -> Deviation:
    """The deviation with the largest ``diff`` relative to what it is allowed (at tolerance 1e-8)."""
    return max(devs, key=lambda v: v.diff / (SOLVER_RTOL * v.scale + ROUNDING_C * v.floor + 1e-300))


def permutation_difference(factory: Factory, J: Tensor, perms: Iterable[Tensor]) -> Deviation:
    """Deviation of ``d(J[π])`` from ``d(J)``, the worst over ``perms``."""
    d0, _, D0 = evaluate(factory, J)
    devs = []
    for p in perms:
        d1, _, D1 = evaluate(factory, J[p])
        devs.append(deviation(J, d1, D1, d0, D0))
    return worst(devs)


def scaling_difference(factory: Factory, J: Tensor, s: float, kind: str) -> Deviation:
    """Deviation of ``d(sJ)`` from ``s·d(J)`` (``kind="linear"``) or from ``d(J)`` (``"invariant"``), in units of
    J's scale (i.e. divided by s for "linear")."""
    d, _, D = evaluate(factory, J)
    ds, _, Ds = evaluate(factory, J * s)
    if kind == "linear":
        return deviation(J, ds.to(torch.float64) / s, Ds / abs(s), d, D)
    if kind == "invariant":
        return deviation(J, ds, Ds, d, D)
    raise ValueError(kind)


def non_conflict_slack(J: Tensor, w: Tensor | None, D: float) -> np.ndarray:
    """Allowed violation of ``⟨g_i, d⟩ ≥ 0`` per row (absolute, float64), from rounding and the solver's certificate:

    * ``C·(P + T)·eps·||g_i||·D``: the weights are exact for the Gramian as computed in J's dtype, whose entries carry
      relative error ``γ_P`` of ``||g_i||·||g_j||``; ``d = wᵀJ`` adds ``γ_T·D``; so ``⟨g_i, d⟩`` moves by ≤ γ·||g_i||·D;
    * ``C·KKT_TOL·||G||₂·||w||₁`` (rows with ``g ≠ 0``): a certified solution's natural residual is ≤ KKT_TOL, which
      lets ``(G v)_i`` be ``-KKT_TOL·||G||₂·||v||_∞`` per projected vector ``v`` (UPGrad sums T of them; ``Σ||v||_∞ ≤
      ||w||₁`` as every ``v ≥ 0``);
    * ``C·||g_i||·floor`` (:func:`scale_floor`): an update at round-off level of the input (a stationary point) may
      point anywhere.
    """
    J64 = J.detach().to(torch.float64)
    norms = J64.norm(dim=1).numpy()
    G = (J64 @ J64.T).numpy()
    lam = float(np.linalg.norm(G, 2)) if G.size else 0.0
    w1 = 0.0 if w is None else float(np.abs(w.detach().to(torch.float64).numpy())[norms > 0].sum())
    return ROUNDING_C * (sum(J.shape) * eps(J.dtype) * norms * D + KKT_TOL * lam * w1 + norms * scale_floor(J))


def non_conflict_violation(J: Tensor, d: Tensor, w: Tensor | None, D: float, margin: float = 0.0) -> float:
    """``max_i (margin - ⟨g_i, d⟩) / slack_i`` over rows ``g_i ≠ 0``: ≤ 1 means no conflict beyond the allowed slack
    (:func:`non_conflict_slack`). ``margin > 0`` asks for more (MGDA: ``⟨g_i, d⟩ ≥ ||d||²``)."""
    J64, d64 = J.detach().to(torch.float64), d.detach().to(torch.float64)
    norms = J64.norm(dim=1).numpy()
    ip = (J64 @ d64).numpy()
    slack = non_conflict_slack(J, w, D)
    rows = norms > 0
    if not rows.any():
        return 0.0
    need = margin - ip[rows]
    s = slack[rows]
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(need <= 0, 0.0, np.where(s > 0, need / s, np.inf))
    return float(ratio.max())


def min_cosine(J: Tensor, d: Tensor, D: float) -> float:
    """``min_i ⟨g_i, d⟩ / (||g_i||·||d||)`` over rows ``g_i ≠ 0``; NaN when ``||d|| <= √eps·D`` (a rounding-level
    update, e.g. all projections are 0: its direction is noise, not a conflict)."""
    J64, d64 = J.detach().to(torch.float64), d.detach().to(torch.float64)
    nd = float(d64.norm())
    if not nd > np.sqrt(eps(J.dtype)) * D:
        return float("nan")
    norms = J64.norm(dim=1)
    rows = norms > 0
    return float(((J64 @ d64)[rows] / (norms[rows] * nd)).min())


# ------------------------------------------------------------------------------------------- independent KKT residuals
def dual_cone_residual(G: np.ndarray, U: np.ndarray, V: np.ndarray) -> float:
    """Independent KKT residual of ``min vᵀGv s.t. v ≥ u`` (one problem per row of U): ``v ≥ u``, ``G v ≥ 0``,
    ``(v - u) ⊙ G v = 0``, i.e. the natural residual ``min(v - u, G v / ||G||₂)``, over ``||u||_∞``.

    Normalised by the problem data ``u`` (not by ``v``): a point with a huge entry on a (numerically) null direction
    must not dilute the violation of its other entries. Scale-free in G and in u.
    """
    U, V = np.atleast_2d(U), np.atleast_2d(V)
    if not np.isfinite(V).all():
        return float("inf")
    lam = float(np.linalg.norm(G, 2))
    worst = 0.0
    for u, v in zip(U, V, strict=True):
        su = float(np.abs(u).max())
        x = v - u
        grad = G @ v / lam if lam > 0 else np.zeros_like(v)
        r = np.abs(np.minimum(x, grad)).max()
        worst = max(worst, _rel(float(r), su))
    return worst


def simplex_residual(G: np.ndarray, w: np.ndarray) -> float:
    """Independent KKT residual of ``min wᵀGw s.t. w ∈ Δ``: ``|1ᵀw - 1|``, ``w ≥ 0``, and ``(G w)_j ≥ wᵀGw`` with
    equality on the support, measured as ``max_j |min(w_j, ((Gw)_j - wᵀGw)/||G||₂)|`` (w is on the scale 1)."""
    if not np.isfinite(w).all():
        return float("inf")
    lam = float(np.linalg.norm(G, 2))
    Gw = G @ w
    mult = (Gw - float(w @ Gw)) / lam if lam > 0 else np.zeros_like(w)
    return float(max(abs(w.sum() - 1.0), np.abs(np.minimum(w, mult)).max()))


# ------------------------------------------------------------------------------------------------ reference solvers
def _factor(J: Tensor) -> np.ndarray:
    """``M = Jᵀ`` in float64 (P x T, ``MᵀM = G``), scaled to unit Frobenius norm (the problems are scale-free).

    J itself, not a square root of G: an exactly zero row of J gives an exactly zero column here, whereas an
    eigendecomposition of G leaves a ~1e-16 column that an active-set solver can exploit with a huge weight.
    """
    M = J.detach().to(torch.float64).numpy().T.copy()
    nrm = float(np.linalg.norm(M))
    return M / nrm if nrm > 0 else M


def gramian64(J: Tensor) -> np.ndarray:
    J64 = J.detach().to(torch.float64)
    return (J64 @ J64.T).numpy()


def dual_cone_reference(J: Tensor, U: np.ndarray) -> np.ndarray:
    """Rows ``v = argmin vᵀGv s.t. v ≥ u`` from ``min_{x ≥ 0} ||M(u + x)||`` with ``M = Jᵀ`` (not a square root of G,
    as the library uses): SciPy's NNLS, and where its answer fails the independent residual
    (:func:`dual_cone_residual` ≤ KKT_TOL), bounded-variable least squares (``lsq_linear``, BVLS) instead."""
    M = _factor(J)
    G = M.T @ M
    U = np.atleast_2d(np.asarray(U, dtype=np.float64))
    V = np.empty_like(U)
    for k, u in enumerate(U):
        try:
            x = nnls(M, -M @ u, maxiter=50 * len(u) + 100)[0]
        except RuntimeError:
            x = np.zeros_like(u)
        if dual_cone_residual(G, u, u + x) > KKT_TOL:
            x = lsq_linear(M, -M @ u, bounds=(0.0, np.inf), method="bvls", tol=1e-14, max_iter=50 * len(u) + 100).x
        V[k] = u + np.maximum(x, 0.0)
    return V


def simplex_reference(J: Tensor) -> np.ndarray:
    """Min-norm point of the convex hull of the rows: ``w = x/Σx`` with ``x = argmin_{x ≥ 0} ||Mx||² + (1ᵀx - 1)²``
    (Lawson & Hanson's least-distance reduction), by BVLS on the unit-Frobenius ``M = Jᵀ``."""
    M = _factor(J)
    T = M.shape[1]
    A = np.vstack([M, np.ones((1, T))])
    b = np.zeros(A.shape[0])
    b[-1] = 1.0
    x = np.maximum(lsq_linear(A, b, bounds=(0.0, np.inf), method="bvls", tol=1e-14, max_iter=50 * T + 100).x, 0.0)
    return x / x.sum()


def _face_solutions(G: np.ndarray, T: int) -> Iterable[tuple[list[int], np.ndarray]]:
    for k in range(1, T + 1):
        for S in itertools.combinations(range(T), k):
            yield list(S), G[np.ix_(S, S)]


def dual_cone_brute_force(G: np.ndarray, u: np.ndarray) -> np.ndarray:
    """``argmin vᵀGv s.t. v ≥ u`` by enumerating the faces (T ≤ 6): on a face ``{v_j > u_j for j ∈ S}`` the minimiser
    solves ``G_SS x_S = -(G u)_S`` (least squares when singular); the best feasible face minimiser is optimal."""
    T = len(u)
    Gn = G / max(float(np.abs(G).max()), 1e-300)
    best_v, best = u.copy(), float(u @ Gn @ u)
    for S, GSS in _face_solutions(Gn, T):
        x = np.zeros(T)
        x[S] = np.linalg.lstsq(GSS, -(Gn @ u)[S], rcond=None)[0]
        if (x[S] >= -1e-12).all():
            v = u + np.maximum(x, 0.0)
            val = float(v @ Gn @ v)
            if val < best - 1e-15 * max(1.0, abs(best)):
                best_v, best = v, val
    return best_v


def simplex_brute_force(G: np.ndarray) -> np.ndarray:
    """``argmin_{w ∈ Δ} wᵀGw`` by enumerating the faces (T ≤ 6): on face S the minimiser solves the KKT system
    ``[G_SS 1; 1ᵀ 0][w; -μ] = [0; 1]`` (least squares when singular); the best non-negative one is optimal."""
    T = G.shape[0]
    Gn = G / max(float(np.abs(G).max()), 1e-300)
    best_w, best = None, np.inf
    for S, GSS in _face_solutions(Gn, T):
        k = len(S)
        K = np.zeros((k + 1, k + 1))
        K[:k, :k], K[:k, k], K[k, :k] = GSS, 1.0, 1.0
        rhs = np.zeros(k + 1)
        rhs[k] = 1.0
        sol = np.linalg.lstsq(K, rhs, rcond=None)[0][:k]
        if (sol >= -1e-12).all() and abs(sol.sum() - 1.0) < 1e-9:
            w = np.zeros(T)
            w[S] = np.maximum(sol, 0.0)
            w /= w.sum()
            val = float(w @ Gn @ w)
            if val < best - 1e-15:
                best_w, best = w, val
    assert best_w is not None
    return best_w


def slsqp_dual_cone(G: np.ndarray, u: np.ndarray) -> np.ndarray:
    """``argmin vᵀGv s.t. v ≥ u`` by SciPy's SLSQP (a generic NLP solver; accurate to about √ftol in v)."""
    Gn = G / max(float(np.abs(G).max()), 1e-300)
    res = minimize(
        lambda v: float(v @ Gn @ v),
        u.copy(),
        jac=lambda v: 2 * Gn @ v,
        method="SLSQP",
        bounds=[(float(a), None) for a in u],
        options={"ftol": 1e-16, "maxiter": 1000},
    )
    return np.maximum(res.x, u)


# ---------------------------------------------------------------------------------------------------------- CAGrad
def cagrad_radius(J: Tensor, c: float) -> float:
    """The radius ``c·||g_0||`` of CAGrad's ball (``g_0`` the mean gradient), float64."""
    return c * float(J.detach().to(torch.float64).mean(0).norm())


def cagrad_primal_value(J: Tensor, d: Tensor) -> float:
    """``min_i ⟨g_i, d⟩`` (float64)."""
    return float((J.detach().to(torch.float64) @ d.detach().to(torch.float64)).min())


def cagrad_dual_value(J: Tensor, c: float, x: np.ndarray) -> float:
    """``f(x) = ⟨g_x, g_0⟩ + r·||g_x||`` for ``x ∈ Δ`` (``g_x = Σ x_i g_i``): by weak duality an upper bound on
    ``max_{||d - g_0|| ≤ r} min_i ⟨g_i, d⟩`` (``min_i ⟨g_i, d⟩ ≤ ⟨g_x, d⟩ ≤ ⟨g_x, g_0⟩ + r||g_x||``)."""
    J64 = J.detach().to(torch.float64).numpy()
    gx = x @ J64
    return float(gx @ J64.mean(0) + cagrad_radius(J, c) * np.linalg.norm(gx))


def cagrad_scale(J: Tensor, c: float) -> float:
    """Scale of CAGrad's primal and dual values: ``max_i ||g_i||·(||g_0|| + r)`` (floored for ``g_0 = 0``)."""
    J64 = J.detach().to(torch.float64)
    gmax = float(J64.norm(dim=1).max())
    g0 = float(J64.mean(0).norm())
    return max(gmax * (1.0 + c) * g0, sum(J.shape) * EPS64 * gmax**2)


def cagrad_upper_bound(J: Tensor, c: float, candidates: Sequence[np.ndarray]) -> float:
    """The smallest dual value over ``candidates`` (points of the simplex) and the min-norm point of the hull."""
    pts = [x for x in candidates if x is not None and np.isfinite(x).all() and (x >= -1e-15).all() and x.sum() > 0]
    pts = [np.maximum(x, 0.0) / np.maximum(x, 0.0).sum() for x in pts] + [simplex_reference(J)]
    return min(cagrad_dual_value(J, c, x) for x in pts)


def cagrad_slsqp_primal(J: Tensor, c: float) -> float:
    """``max_{d, t} t s.t. J d ≥ t, ||d - g_0||² ≤ r²`` by SLSQP (generic; small T and P): the optimal value."""
    J64 = J.detach().to(torch.float64).numpy()
    s = max(float(np.abs(J64).max()), 1e-300)
    Jn = J64 / s  # values scale by s², radius by s: solve at unit scale
    g0 = Jn.mean(0)
    r = c * float(np.linalg.norm(g0))
    P = Jn.shape[1]
    z0 = np.concatenate([g0, [float((Jn @ g0).min())]])
    cons = [
        {
            "type": "ineq",
            "fun": lambda z: Jn @ z[:P] - z[P],
            "jac": lambda z: np.hstack([Jn, -np.ones((Jn.shape[0], 1))]),
        },
        {
            "type": "ineq",
            "fun": lambda z: np.array([r * r - float((z[:P] - g0) @ (z[:P] - g0))]),
            "jac": lambda z: np.concatenate([-2 * (z[:P] - g0), [0.0]])[None, :],
        },
    ]
    best = float((Jn @ g0).min())
    res = minimize(
        lambda z: -z[P],
        z0,
        jac=lambda z: np.concatenate([np.zeros(P), [-1.0]]),
        method="SLSQP",
        constraints=cons,
        options={"ftol": 1e-15, "maxiter": 1000},
    )
    d = res.x[:P]
    excess = float(np.linalg.norm(d - g0)) - r
    if excess > 0:  # pull a slightly infeasible answer back into the ball
        d = g0 + (d - g0) * (r / (r + excess))
    best = max(best, float((Jn @ d).min()))
    return best * s * s


def cagrad_simplex_point(w: np.ndarray) -> np.ndarray | None:
    """The dual point ``x ∈ Δ`` behind CAGrad's weights ``v = 1/T + (r/||g_x||)·x`` (rescale=0): ``x ∝ v - 1/T``."""
    x = w - 1.0 / len(w)
    s = float(x.sum())
    return x / s if s > 0 else None


# ---------------------------------------------------------------------------------------------------------- misc
def fresh_copy(agg: object) -> Factory:
    """A factory returning deep copies of ``agg`` (same configuration and state)."""
    return lambda: copy.deepcopy(agg)


def family_grid(
    families: Sequence[str] = FAMILIES,
    task_counts: Sequence[int] = TASK_COUNTS,
    dtypes: Sequence[torch.dtype] = (torch.float64,),
    seeds: Sequence[int] = (0,),
):
    """Yield ``(label, J)`` over the product of families, task counts, dtypes and seeds."""
    for name, T, dtype, seed in itertools.product(families, task_counts, dtypes, seeds):
        if name == "pareto_stationary" and T < 2:
            continue
        yield f"{name}/T={T}/{str(dtype)[6:]}/seed={seed}", make_family(name, T, seed, dtype)
