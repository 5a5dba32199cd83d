"""FairGrad: α-fair task weights, the positive solution of G w = w^(-1/α)."""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import Tensor

from mtlkit._registry import METHODS
from mtlkit.aggregation._base import Aggregator
from mtlkit.aggregation._solvers import check_int, check_nonneg, to_numpy, to_weights

_EPS64 = float(np.finfo(np.float64).eps)


def solve_fair(G: np.ndarray, alpha: float, ridge: float = 0.0, max_iter: int = 500, tol: float = 1e-9) -> np.ndarray:
    """The positive solution of ``(G + ridge·I) w = w^(-1/α)`` (elementwise power), by damped Newton.

    With ``p = 1/α`` and ``h(w) = w^(1-p)/(1-p)`` (``log w`` for ``p = 1``), so that ``h'(w) = w^(-p)``, the equation
    is the stationarity condition of ``f(w) = ½ wᵀAw - Σ_i h(w_i)`` on ``w > 0``, ``A = G + ridge·I``. Its Hessian
    ``A + p·diag(w^(-p-1))`` is positive definite for every ``α > 0``, so a solution is unique, and Newton's method
    with an Armijo backtracking line search that keeps ``w > 0`` converges to it from any positive start
    (quadratically near the end) whenever it exists. It exists iff 0 is not in the convex hull of the gradients
    (``A v = 0`` for some ``v ≥ 0, v ≠ 0`` would give ``0 = vᵀAw = vᵀw^(-p) > 0``); a ``ridge > 0`` makes it exist
    always. Start: ``w_i = A_ii^(-α/(α+1))``, the exact solution for orthogonal gradients. Stops (:func:`_converged`)
    when ``||A w - w^(-p)|| <= tol·||w^(-p)||``, a relative residual that is the same for ``w`` on ``A`` and for
    ``c^(-α/(α+1))·w`` on ``c·A`` (so a solution computed on a rescaled Gramian and mapped back meets it too), or
    when the residual is down to its own rounding error (where no exact solution exists, the weights grow along a
    null direction until the ridge holds them, and the relative residual cannot reach a small ``tol`` first).

    Example:
        >>> import numpy as np
        >>> np.round(solve_fair(np.array([[4.0, 0.0], [0.0, 0.25]]), alpha=1.0), 6).tolist()
        [0.5, 2.0]
    """
    return _solve_fair(G, alpha, ridge, max_iter, tol)[0]


def _solve_fair(G: np.ndarray, alpha: float, ridge: float, max_iter: int, tol: float) -> tuple[np.ndarray, bool]:
    """:func:`solve_fair`, and whether its stopping rule was met within ``max_iter`` iterations."""
    T = G.shape[0]
    p = 1.0 / alpha
    A = G + ridge * np.eye(T)
    abs_a = np.abs(A)
    w = np.diag(A) ** (-alpha / (alpha + 1.0))

    def f(x: np.ndarray) -> tuple[float, float]:
        """f(x), and a bound on its rounding error."""
        quad = 0.5 * float(x @ A @ x)
        h = float(np.log(x).sum() if p == 1.0 else (x ** (1.0 - p)).sum() / (1.0 - p))
        # xᵀAx cancels along near-null directions: its rounding follows the size of its terms, |x|ᵀ|A||x|
        return quad - h, 4 * T * _EPS64 * (0.5 * float(np.abs(x) @ abs_a @ np.abs(x)) + abs(h))

    # Small α (large p) makes w^(-p) overflow on trial points far below the solution: those are rejected (f = inf).
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        fw, _ = f(w)
        for _ in range(max_iter + 1):
            wp = w**-p
            grad = A @ w - wp
            if _converged(A, w, wp, grad, tol):
                return w, True
            step = -np.linalg.solve(A + np.diag(p * wp / w), grad)
            t = 1.0
            neg = step < 0
            if neg.any():  # stay strictly inside w > 0
                t = min(1.0, 0.99 * float(np.min(-w[neg] / step[neg])))
            slope = float(grad @ step)
            while True:
                cand = w + t * step
                fc, noise = f(cand)
                # Armijo, up to f's rounding: near the root f changes by less than its rounding error, and an exact
                # test would reject every Newton step there (the residual then stalled at ~1e-8).
                if fc <= fw + 1e-4 * t * slope + noise or t < 1e-12:
                    break
                t *= 0.5
            if not np.isfinite(fc):  # only if even t < 1e-12 overflows: keep the last finite iterate
                break
            w, fw = cand, fc
    return w, False


def _converged(A: np.ndarray, w: np.ndarray, wp: np.ndarray, residual: np.ndarray, tol: float) -> bool:
    """``||A w - w^(-p)|| <= tol·||w^(-p)||``, or below the rounding error of computing it (``T·eps·(|A||w| + |wp|)``,
    Higham's bound on a length-T dot product, with a factor 2)."""
    floor = 2 * A.shape[0] * _EPS64 * (float(np.linalg.norm(A)) * float(np.linalg.norm(w)) + float(np.linalg.norm(wp)))
    return bool(np.linalg.norm(residual) <= tol * np.linalg.norm(wp) + floor)


@METHODS.register("fairgrad")
class FairGrad(Aggregator):
    """FairGrad (Ban & Ji 2024): α-fair weights, the positive solution of G w = w^(-1/α) (α = 1: Nash-MTL).

    Fair resource allocation in gradient space: the update ``d = Σ_t w_t g_t`` maximises the α-fair utility
    ``Σ_i (g_iᵀd)^(1-α)/(1-α)`` (``Σ_i log(g_iᵀd)`` for α = 1) of the tasks' loss decreases ``g_iᵀd``.

    Ban & Ji, "Fair Resource Allocation in Multi-Task Learning", ICML 2024 (PMLR 235), OpenReview KLmWRMg6nL,
    arXiv:2402.15638 (no DOI). Section 3: the problem ``max_{d ∈ B_ε} Σ_i u_α(g_iᵀd)`` with ``g_iᵀd ≥ 0``; its
    stationarity condition gives ``d = Σ_i w_i g_i`` with ``g_iᵀd = w_i^(-1/α)``, i.e. ``(G w)_i = w_i^(-1/α)``,
    ``w > 0`` (their ``GᵀG w = w^(-1/α)``, their G holding the gradients as columns: our ``G = J Jᵀ``); that is the
    weights' equation (Eq. 4 of the arXiv version, as torchjd cites it) and the step of Algorithm 1. Gramian-based.
    Hence, whenever the equation has a solution, **no task conflicts with the update**: ``⟨g_i, d⟩ = w_i^(-1/α) > 0``.
    Limits: α = 1 is Nash-MTL's bargaining equation ``G w = 1/w`` (:class:`~mtlkit.aggregation.NashMTL`, whose
    solver adds a larger ridge); α → ∞ gives max-min fairness, the direction of MGDA's min-norm point
    (:class:`~mtlkit.aggregation.MGDA`); α → 0 gives ``w → 1`` (the sum of the gradients) when that sum conflicts
    with no task. α = 0 itself is refused (``w^(-1/α)`` is undefined; torchjd returns uniform weights there).

    Solver (documented difference): the official code (OptMN-Lab/fairgrad, ``methods/weight_methods.py``), LibMTL and
    torchjd run ``scipy.optimize.least_squares`` on the residual ``G x - x^(-1/α)`` from ``x = 1/T`` with SciPy's
    default tolerances, on the raw Gramian. We solve the same equation as the stationary point of a strictly convex
    potential by damped Newton (:func:`solve_fair`), to a relative residual of ``tol``, on ``G / ||G||_F`` (well
    scaled whatever the gradients' magnitude), and map the root back exactly: if ``(G/n) β = β^(-1/α)`` then
    ``w = n^(-α/(α+1)) β`` solves ``G w = w^(-1/α)``. The equation has a positive solution iff 0 is not in the convex
    hull of the gradients; where it has none the paper's method is undefined and the reference's answer is wherever
    ``least_squares`` stops. Two cases are handled:

    * a task whose gradient is exactly zero (``G_tt = 0``; its equation would read ``0 = w_t^(-1/α)``) is left out
      of the solve and gets weight 0: any weight gives the same update;
    * otherwise, a ridge of ``eps·tr(G/||G||_F)`` (``eps`` of the dtype G was computed in) is added: at most the
      round-off that G already carries (its eigenvalues are only known to ~``eps·tr(G)``, see
      :func:`~mtlkit.aggregation._solvers.rank_cutoff`), so it changes the weights by no more than rounding G does,
      and keeps them finite at Pareto-stationary points, where they grow along the null direction, which the update
      does not see. (Nash-MTL's ``1e-8·||G||_F`` moved float64 weights by up to 1.3e-5 from the reference's on
      conflicting T = 10 Gramians; with ``eps`` they agree to the solvers' tolerances, ~1e-9.)

    No warm start: the official code starts every step afresh and the solution is unique, so the result does not
    depend on the previous step (the method is stateless).

    Scale (documented choice): the paper's and LibMTL's ``w``, whose update is homogeneous of degree
    ``(1-α)/(1+α)`` in J (``w(s²G) = s^(-2α/(α+1)) w(G)``) and has ``||d||² = Σ_i w_i^(1-1/α)``. For α = 1 (the
    default, as in the official code) that is Nash-MTL's ``||d||² = T`` whatever the gradients: declared
    ``"fixed_norm"``, which is exact at α = 1 and, for any α ≠ 1, still says what matters downstream: no constant
    factor puts the update on the scale of the sum (``build_method(..., scale="sum")`` refuses). The official trainer
    also multiplies the update by T ("to match the sum loss", a line shared with its CAGrad) and then clips the shared
    gradient to norm ``max_norm=1.0``; LibMTL does neither. Here neither the factor T nor clipping is applied by
    default (``max_norm=0``); pass ``max_norm=1.0`` to clip as the authors' trainer does. The authors' experiments
    use α = 2 (CelebA and QM9 scripts).

    Args:
        alpha: the fairness parameter α (``> 0``): 1 proportional fairness (Nash-MTL), larger values move towards
            max-min fairness (MGDA's direction), smaller ones towards the sum of the gradients.
        max_norm: if ``> 0``, scale the update down to this norm when it is larger.
        max_iter, tol: Newton iterations and relative tolerance on the residual (see :func:`solve_fair`).

    Example:
        >>> import torch
        >>> J = torch.tensor([[2.0, 0.0], [0.0, 0.5]])   # G = diag(4, 1/4): w_i = G_ii^(-α/(α+1))
        >>> torch.allclose(FairGrad()(J), torch.ones(2), atol=1e-6)              # α = 1: w = (1/2, 2), as Nash-MTL
        True
        >>> FairGrad(alpha=2.0)(J)                                               # w = (4^(-2/3), 4^(2/3))
        tensor([0.7937, 1.2599])
    """

    gramian_based = True
    scale = "fixed_norm"

    def __init__(self, alpha: float = 1.0, max_norm: float = 0.0, max_iter: int = 500, tol: float = 1e-9) -> None:
        self.alpha = check_nonneg("alpha", alpha, strict=True)
        self.max_norm = check_nonneg("max_norm", max_norm)
        self.max_iter = check_int("max_iter", max_iter)
        self.tol = check_nonneg("tol", tol, strict=True)

    def weights_from_gramian(self, G: Tensor) -> Tensor:
        A = to_numpy(G)
        w = np.zeros(A.shape[0])
        live = np.diag(A) > 0  # exactly zero gradients: weight 0 (no positive solution, any weight is the same)
        if not live.any():
            return to_weights(w, G)
        S = A[np.ix_(live, live)]
        norm = float(np.linalg.norm(S))
        S = S / norm
        eps = max(float(torch.finfo(G.dtype).eps), _EPS64) if G.dtype.is_floating_point else _EPS64
        # Ridge eps·tr(S): at most the round-off S already carries (see the class docstring).
        beta, ok = _solve_fair(S, self.alpha, eps * float(np.trace(S)), self.max_iter, self.tol)
        if not ok:
            warnings.warn(
                f"FairGrad(alpha={self.alpha:g}): Newton did not reach tol={self.tol:g} in max_iter={self.max_iter} "
                "iterations (large alpha drives the weights of tasks MGDA would drop towards 0); raise max_iter",
                RuntimeWarning,
                stacklevel=2,
            )
        # Map back: β solves (G/n) β = β^(-1/α)  <=>  w = n^(-α/(α+1)) β solves G w = w^(-1/α).
        w[live] = beta * norm ** (-self.alpha / (self.alpha + 1.0))
        if self.max_norm > 0:
            upd_norm = float(np.sqrt(max(w @ A @ w, 0.0)))
            if upd_norm > self.max_norm:
                w = w * (self.max_norm / upd_norm)
        return to_weights(w, G)
