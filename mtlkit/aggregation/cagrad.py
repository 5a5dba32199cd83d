"""CAGrad: the best worst-case improvement in a ball around the mean gradient."""

from __future__ import annotations

import warnings

import numpy as np
import torch
from scipy.optimize import minimize
from torch import Tensor

from mtlkit._registry import METHODS
from mtlkit.aggregation._base import Aggregator
from mtlkit.aggregation._solvers import (
    check_nonneg,
    factor,
    kkt_tol,
    min_norm_simplex_factor,
    project_dual_cone,
    project_simplex,
    to_numpy,
    to_weights,
    trace_normalize,
)
from mtlkit.errors import ConfigError


@METHODS.register("cagrad")
class CAGrad(Aggregator):
    """CAGrad (Liu et al. 2021); update on the mean-gradient scale (c = 0 gives the mean).

    Conflict-Averse Gradient descent.

    Liu et al., "Conflict-Averse Gradient Descent for Multi-task Learning", NeurIPS 2021. With ``g_0`` the *mean*
    task gradient and ``φ = c² ||g_0||²``, the primal problem ``max_d min_i ⟨g_i, d⟩`` s.t.
    ``||d - g_0|| ≤ √φ`` is solved through its dual (the paper's Algorithm 1):

        w* = argmin_{w ∈ Δ}  g_wᵀ g_0 + √φ ||g_w||,     g_w = Σ_i w_i g_i,
        d* = g_0 + (√φ / ||g_w*||) g_w*.

    The update is an optimal ``d*`` (:func:`cagrad_primal`), also at Pareto-stationary points where 0 lies in the
    convex hull of the task gradients (then ``min_i ⟨g_i, d*⟩ = 0``: no task is hurt; the reference codes return
    ``g_0`` there, which can conflict with a task).

    Everything is a function of ``G = J Jᵀ``, so this is Gramian-based. The dual is solved on the trace-normalised
    Gramian ``A`` (the solution is invariant to the scale of G) by :func:`cagrad_dual`, an exact solver that needs a
    few non-negative least-squares solves of size T (about 1-2 ms at T = 40). The official code and LibMTL run SLSQP
    on the same objective; at T = 40 SLSQP needs 35-40 iterations and 0.1-1.4 s, so it is kept only as a fallback for
    Gramians where the exact solver does not certify its answer.

    Radius: ``√φ = c ||g_0||`` exactly. The official code and LibMTL take ``√(mean(G) + 1e-8)`` on the raw Gramian
    (the 1e-8 guards a zero mean); on our trace-normalised Gramian that constant inflated the radius by up to 1e-4
    relative at T = 50, so it is dropped, and ``g_0 = 0`` (the ball is the single point 0) returns the mean.

    Scale (documented choice): the update is on the scale of the **mean** gradient, as in the paper and LibMTL:
    ``d = d* / (1 + c²)`` with ``rescale=1`` (default of the official code and LibMTL), ``d*`` with ``rescale=0``
    (torchjd's choice), ``d* / (1 + c)`` with ``rescale=2``. Hence **c = 0 gives exactly the mean** of the task
    gradients (not the sum): multiply the learning rate by T to compare with EW.

    Args:
        c: radius of the ball, relative to ``||g_0||`` (``c >= 0``; the paper uses 0.4-0.5).
        rescale: 0, 1 or 2, see above.

    Example:
        >>> import torch
        >>> CAGrad(c=0.0)(torch.tensor([[2.0, 0.0], [0.0, 4.0]]))
        tensor([1., 2.])
    """

    gramian_based = True
    scale = "mean"

    def __init__(self, c: float = 0.4, rescale: int = 1) -> None:
        self.c = check_nonneg("c", c)
        if rescale not in (0, 1, 2) or isinstance(rescale, bool):
            raise ConfigError(f"rescale must be 0, 1 or 2, got {rescale!r}")
        self.rescale = int(rescale)

    def weights_from_gramian(self, G: Tensor) -> Tensor:
        T = G.shape[0]
        u = np.full(T, 1.0 / T)
        w = u
        A = trace_normalize(to_numpy(G))
        g0_sq = float(u @ A @ u)  # ||g_0||² / tr(G)
        if self.c > 0 and g0_sq > 0:  # g_0 = 0: the ball is the point d = g_0 = 0, the mean's weights
            w = cagrad_primal(A, self.c * np.sqrt(g0_sq), G.dtype)
        if self.rescale == 1:
            w = w / (1.0 + self.c**2)
        elif self.rescale == 2:
            w = w / (1.0 + self.c)
        return to_weights(w, G)


def cagrad_primal(A: np.ndarray, sqrt_phi: float, dtype: torch.dtype | None = None) -> np.ndarray:
    """Weights ``v`` of an optimal ``d* = Jᵀ v`` of ``max_d min_i ⟨g_i, d⟩ s.t. ||d - g_0|| ≤ √φ`` (``G = J Jᵀ = A``).

    From the dual solution ``w*`` of :func:`cagrad_dual`: ``d* = g_0 + √φ g_w*/||g_w*||`` (the paper's Algorithm 1),
    i.e. ``v = 1/T + (√φ/||g_w*||) w*``. When ``g_w* = 0`` (0 is in the convex hull of the task gradients, a
    Pareto-stationary point) that formula is undefined, and the reference codes' ``g_w / (||g_w|| + 1e-8)`` returns
    ``g_0`` itself, which can conflict with a task (cosine down to -1). The optimal value is then 0, attained by
    every ``d`` in the ball with ``J d ≥ 0``; we return the one closest to ``g_0``, the projection of ``g_0`` onto the
    dual cone ``{d : J d ≥ 0}`` (:func:`~mtlkit.aggregation._solvers.project_dual_cone`), which :func:`cagrad_dual`
    has checked to lie in the ball. Hence ``min_i ⟨g_i, d*⟩ ≥ 0`` whenever 0 is optimal. ``dtype``: the dtype the
    Gramian was computed in (sets the round-off level, see :func:`~mtlkit.aggregation._solvers.factor`).

    Example:
        >>> import numpy as np
        >>> A = np.array([[1.0, -1.0], [-1.0, 1.0]]) / 2            # g_2 = -g_1: 0 is in the hull
        >>> v = cagrad_primal(A, 0.4 * np.sqrt(1e-8))
        >>> bool((A @ v >= -1e-12).all())                            # no task is hurt
        True
    """
    T = A.shape[0]
    u = np.full(T, 1.0 / T)
    x, v0 = _cagrad_dual(A, sqrt_phi, dtype=dtype)
    if v0 is not None:
        return v0
    gw_norm = np.sqrt(max(float(x @ A @ x), 0.0))
    if not gw_norm > 0:  # only after an SLSQP fallback that landed on g_w = 0: the closest non-conflicting point
        return project_dual_cone(A, u, dtype)[0]
    return u + (sqrt_phi / gw_norm) * x


def cagrad_dual(A: np.ndarray, sqrt_phi: float, tol: float = 1e-10, max_iter: int = 100) -> np.ndarray:
    """``argmin_{w ∈ Δ} f(w) = bᵀw + √φ ||w||_A`` with ``b = A 1/T`` and ``||w||_A = √(wᵀAw)``: CAGrad's dual.

    **Method** (exact; derived here, not from the paper). With ``√q = min_{ρ>0} q/(2ρ) + ρ/2`` the problem is
    ``min_{ρ>0, w∈Δ} bᵀw + √φ (wᵀAw/(2ρ) + ρ/2)``, jointly convex in ``(w, ρ)``. Alternate:

    1. for fixed ρ, the problem in w is a simplex QP. Writing ``A = LᵀL`` and ``g_0 = L 1/T`` (so ``b = Lᵀ g_0``),
       it is ``min_{w∈Δ} ||(L + (ρ/√φ) g_0 1ᵀ) w||²`` (use ``1ᵀw = 1``), a min-norm point of a convex hull, solved
       exactly by one NNLS (:func:`~mtlkit.aggregation._solvers.min_norm_simplex_factor`);
    2. ``ρ ← ||w||_A``, the minimiser for fixed w.

    After each QP, with S its support, the KKT system of ``f`` on S is solved in closed form: ``b_S + √φ (A w)_S/n =
    λ 1``, ``1ᵀw = 1``, ``n = ||w||_A``. With ``p = A_SS⁻¹ 1``, ``q = A_SS⁻¹ b_S``, ``a = 1ᵀp``, ``c = 1ᵀq``,
    ``e = b_Sᵀq``, it gives ``r = √(c² - a(e - φ))``, ``λ = (c + r)/a``, ``w_S = (λp - q)/r``. If that point is
    feasible and satisfies the KKT conditions of the whole problem (``∇f_i ≥ λ`` off S) to ``tol`` (relative), it is
    the exact optimum (f is convex). In practice the first or second QP already has the optimal support. Before
    alternating, the min-norm point is checked: the optimum may be a point with ``g_w = 0`` (0 in the convex hull),
    where f is not differentiable; that point (the min-norm point) is returned when a primal point certifies it, the projection of ``g_0`` onto
    ``{d : J d ≥ 0}`` lying in the ball (primal value ≥ 0 = f); :func:`cagrad_primal` then returns that projection as
    the update (the reference formula ``g_0 + √φ g_w / (||g_w|| + 1e-8)`` would return ``g_0``). After
    ``max_iter`` uncertified rounds (not seen in tests), SLSQP (the reference implementations' solver) finishes
    from the last iterate, with a RuntimeWarning.

    Example:
        >>> import numpy as np
        >>> A = np.array([[1.0, -0.5], [-0.5, 1.0]]) / 2
        >>> np.round(cagrad_dual(A, 0.4 * np.sqrt(0.125)), 6).tolist()
        [0.5, 0.5]
    """
    return _cagrad_dual(A, sqrt_phi, tol, max_iter)[0]


def _cagrad_dual(
    A: np.ndarray, sqrt_phi: float, tol: float = 1e-10, max_iter: int = 100, dtype: torch.dtype | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """:func:`cagrad_dual`, and, when its answer is a certified ``g_w = 0`` optimum, the weights of the primal point
    that certifies it (the projection of ``g_0`` onto the dual cone, see :func:`cagrad_primal`); else None."""
    T = A.shape[0]
    u = np.full(T, 1.0 / T)
    b = A @ u
    L, rcond = factor(A, dtype)
    qp_tol = kkt_tol(dtype)
    tol = max(tol, qp_tol / 10)  # the dual's own KKT check cannot be tighter than the QPs it is built from
    g0 = L @ u
    norm_scale = float(np.sqrt(np.diag(A).max()))
    scale = float(np.abs(b).max() + sqrt_phi * norm_scale)
    rho = float(np.linalg.norm(g0))
    w = u
    # Is g_w = 0 (0 in the convex hull) the optimum? Checked first: near the boundary of that case (the projection of
    # g_0 onto the dual cone on the sphere ||d - g_0|| = √φ) the alternation below converges only sublinearly.
    w0 = min_norm_simplex_factor(L, rcond, qp_tol)
    v0 = _zero_optimum(A, w0, sqrt_phi, 1e-7 * norm_scale, dtype)
    if v0 is not None:
        return w0, v0
    for _ in range(max_iter):
        if not rho > 0:
            break
        w = min_norm_simplex_factor(L + (rho / sqrt_phi) * np.outer(g0, np.ones(T)), rcond, qp_tol)
        exact = _kkt_on_support(A, b, sqrt_phi, np.flatnonzero(w > 0))
        for cand in (exact, w):
            if cand is not None and _kkt_residual(A, b, sqrt_phi, cand) <= tol * scale:
                return cand, None
        rho = float(np.sqrt(max(w @ A @ w, 0.0)))
    warnings.warn(
        f"CAGrad: the exact dual solver did not certify an answer in {max_iter} rounds (T = {T}); "
        "finishing with SLSQP, whose answer is only as exact as its tolerance",
        RuntimeWarning,
        stacklevel=2,
    )
    return _slsqp(A, b, sqrt_phi, w), None


def _zero_optimum(
    A: np.ndarray, w0: np.ndarray, sqrt_phi: float, atol: float, dtype: torch.dtype | None = None
) -> np.ndarray | None:
    """If ``g_w0 = 0`` (to atol) and some ``d`` in the ball has ``J d ≥ 0`` (then the primal value is ≥ 0 = f(w0)),
    the weights ``v`` of that ``d = Jᵀv``; else None.

    The ``d`` tried is the projection of ``g_0`` onto the dual cone ``{d : J d ≥ 0}`` (the closest one).
    """
    if float(w0 @ A @ w0) > atol**2:
        return None
    u = np.full(len(w0), 1.0 / len(w0))
    v = project_dual_cone(A, u, dtype)[0]
    r = v - u
    return v if float(r @ A @ r) <= sqrt_phi**2 * (1 + 1e-9) else None


def _kkt_on_support(A: np.ndarray, b: np.ndarray, sqrt_phi: float, S: np.ndarray) -> np.ndarray | None:
    """The closed-form stationary point of f restricted to the face S (see :func:`cagrad_dual`), or None."""
    try:
        PQ = np.linalg.solve(A[np.ix_(S, S)], np.stack([np.ones(len(S)), b[S]], axis=1))
    except np.linalg.LinAlgError:  # A_SS singular: more tasks on the face than the rank; keep alternating
        return None
    p, q = PQ[:, 0], PQ[:, 1]
    a, c, e = p.sum(), q.sum(), float(b[S] @ q)
    disc = c * c - a * (e - sqrt_phi**2)
    if not (a > 0 and disc > 0):
        return None
    r = np.sqrt(disc)
    w = np.zeros(len(b))
    w[S] = ((c + r) / a * p - q) / r
    return w


def _kkt_residual(A: np.ndarray, b: np.ndarray, sqrt_phi: float, w: np.ndarray) -> float:
    """Largest violation of f's KKT conditions on the simplex at w (inf if w is infeasible or ``g_w = 0``)."""
    Aw = A @ w
    n = np.sqrt(max(float(w @ Aw), 0.0))
    if not n > 0 or not np.all(w >= 0) or abs(w.sum() - 1.0) > 1e-12:
        return np.inf
    grad = b + sqrt_phi * Aw / n
    lam = float(grad @ w)
    on = w > 0
    return float(max(np.abs(grad[on] - lam).max(), (lam - grad[~on]).max(initial=0.0)))


def _slsqp(A: np.ndarray, b: np.ndarray, sqrt_phi: float, start: np.ndarray) -> np.ndarray:
    """CAGrad's dual by SLSQP, as in the official code and LibMTL (the fallback of :func:`cagrad_dual`)."""

    def obj(x: np.ndarray) -> tuple[float, np.ndarray]:
        Ax = A @ x
        nrm = np.sqrt(max(float(x @ Ax), 0.0) + 1e-8)
        return float(x @ b + sqrt_phi * nrm), b + sqrt_phi * Ax / nrm

    # Named functions, not lambdas: mypy cannot infer lambdas inside the constraint dict against scipy's overloads.
    def sums_to_one(x: np.ndarray) -> float:
        return 1.0 - x.sum()

    def sums_to_one_jac(x: np.ndarray) -> np.ndarray:
        return -np.ones_like(x)

    T = len(b)
    res = minimize(
        obj,
        start.copy(),
        jac=True,
        method="SLSQP",
        bounds=[(0.0, 1.0)] * T,
        constraints=({"type": "eq", "fun": sums_to_one, "jac": sums_to_one_jac},),
        options={"maxiter": 200, "ftol": 1e-12},
    )
    return project_simplex(res.x)
