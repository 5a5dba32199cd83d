"""Small solvers shared by the Gramian-based aggregators (private).

Everything here works on the T x T Gramian ``G = J Jᵀ`` in float64 NumPy (T is small, so the cost is negligible
next to the backward passes) and returns task weights ``w`` such that the update is ``wᵀ J``.

* :func:`min_norm_2` / :func:`min_norm_simplex`: the minimum-norm point of the convex hull of the rows (MGDA).
* :func:`project_dual_cone`: weights of the projection of ``Jᵀ u`` onto the dual cone ``{x : J x ≥ 0}``
  (UPGrad, DualProj), solved as a certified non-negative least-squares problem.
* :func:`nnls_certified`: non-negative least squares whose answer is checked against its KKT conditions
  (:data:`KKT_TOL`), with :func:`dual_cone_kkt_residual` and :func:`simplex_kkt_residual` for the two QPs above.
* :func:`sqrt_factor`: a T x T matrix ``A`` with ``Aᵀ A = G`` (a "reduced Jacobian").
* :func:`project_simplex`: Euclidean projection onto the probability simplex.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg
import torch
from scipy.optimize import nnls
from torch import Tensor

from mtlkit.errors import ConfigError

#: Bound on the relative KKT residuals (:func:`nnls_kkt_residual`, :func:`dual_cone_kkt_residual`,
#: :func:`simplex_kkt_residual`) that the QP-based aggregators certify, in float64. Round-off in forming the
#: residual is about ``T · eps64 ≈ 1e-14`` for the T ≤ 100 these solvers see; 1e-9 leaves five orders of margin
#: while still rejecting the 1e-4-scale violations that a wrong active set gives.
KKT_TOL = 1e-9


def kkt_tol(dtype: torch.dtype | np.dtype | type | None = None) -> float:
    """The certificate's bound for a Gramian computed in ``dtype``: :data:`KKT_TOL` · √(eps(dtype) / eps64).

    A float32 Gramian is only known to ~eps32·tr(G); the least-squares solves then cut singular values below
    √(that) (:func:`factor`), which leaves residuals of that order: 2.3e-5 for float32, 1e-9 for float64.
    """
    return KKT_TOL * float(np.sqrt(max(_eps(dtype), _EPS64) / _EPS64))


_EPS64 = float(np.finfo(np.float64).eps)


def _eps(dtype: torch.dtype | np.dtype | type | None) -> float:
    """Machine epsilon of the dtype a Gramian was computed in (``None``: float64; integer dtypes: 0, G is exact)."""
    if dtype is None:
        return _EPS64
    if isinstance(dtype, torch.dtype):
        return float(torch.finfo(dtype).eps) if dtype.is_floating_point or dtype.is_complex else 0.0
    dt = np.dtype(dtype)
    return float(np.finfo(dt).eps) if np.issubdtype(dt, np.inexact) else 0.0


def to_numpy(G: Tensor) -> np.ndarray:
    """The Gramian as a symmetric float64 array."""
    A = G.detach().to("cpu", torch.float64).numpy()
    return 0.5 * (A + A.T)


def to_weights(w: np.ndarray, like: Tensor) -> Tensor:
    """NumPy weights back to a tensor with ``like``'s dtype and device."""
    return torch.as_tensor(np.asarray(w, dtype=np.float64)).to(dtype=like.dtype, device=like.device)


def trace_normalize(G: np.ndarray, eps: float = 0.0) -> np.ndarray:
    """``G / trace(G)`` (the Gramian of ``J / ||J||_F``); zeros when the trace is ``<= eps`` (all-zero gradients)."""
    tr = float(np.trace(G))
    if tr <= max(eps, 0.0) or tr <= 0.0:
        return np.zeros_like(G)
    return G / tr


def eigh(G: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (ascending) and eigenvectors of a symmetric matrix.

    SciPy's LAPACK driver, not ``np.linalg.eigh``: beside torch's own threads, NumPy's threaded ``eigh`` took 15-16 ms
    on a 40 x 40 Gramian on our 2-core machine (0.25 ms single-threaded), against 0.8 ms here; at T = 40 that was most
    of UPGrad's and Aligned-MTL's overhead over EW.
    """
    return scipy.linalg.eigh(G)


def rank_cutoff(lam: np.ndarray, dtype: torch.dtype | np.dtype | type | None = None) -> float:
    """Eigenvalues of a Gramian ``G = J Jᵀ`` not above this are round-off (the rank cut of :func:`pinvh`, Aligned-MTL).

    ``cut = 2 · (eps(dtype) · Σ|λ_i| + T · eps64 · max|λ_i|)`` where ``dtype`` is the dtype G was **computed** in
    (G reaches the solvers as float64 whatever it was; ``None``: float64) and ``Σ|λ_i| = tr(G)`` for a Gramian.

    * First term, the round-off of G itself. Each ``G_ij = ⟨g_i, g_j⟩`` computed with unit round-off ``u`` has
      ``|δG_ij| ≤ γ |g_i| |g_j|`` (γ = P·u at worst; N. J. Higham, "Accuracy and Stability of Numerical Algorithms",
      2nd ed., SIAM 2002, doi:10.1137/1.9780898718027, §3.1), so ``|vᵀ δG v| ≤ γ (Σ_i |v_i||g_i|)² ≤ γ tr(G)`` for
      every unit ``v``, and by Weyl's inequality every eigenvalue moves by at most ``γ tr(G)``. An exactly duplicated
      or dependent task thus shows up as an eigenvalue of size up to ``γ tr(G)`` (either sign), not 0. γ depends on
      P and on the BLAS's summation order (~√P·u for independent errors, Higham & Mary, "A New Approach to
      Probabilistic Rounding Error Analysis", SIAM J. Sci. Comput. 2019, doi:10.1137/18M1226312), and P is not known
      here, so the constant was measured: with float32 ``J @ J.T`` (MKL, FMA, blocked sums) on duplicated,
      1-ulp-duplicated and dependent rows (T = 3..20, ~1300 cases), the largest positive round-off eigenvalue was
      0.61·eps·tr(G) for P ≤ 1e3, 1.5 at P = 1e4, 3.4 at P = 1e5 and 1.7 at P = 1e6. So ``2·eps·tr(G)`` covers
      P ≤ 1e3 with a factor 3 and missed 2 of ~700 cases at P = 1e4-1e6 (both at P = 1e5); for long float32
      gradients with exactly dependent tasks, forming G in float64 removes the doubt.
    * Second term, the float64 eigensolver's own backward error (a small multiple of ``T · eps64 · ||G||₂``, the
      rule NumPy uses for its default cut). Negligible next to the first term for float32 G; for float64 G, SciPy's
      eigensolver left spurious eigenvalues up to 1.0·T·eps64·λ_max, and the previous cut of exactly that size let
      22 of 2700 rank-deficient float64 cases through.

    What is kept: every eigenvalue above the cut. ``tr(G) ≤ T·λ_max``, so the cut is at most twice NumPy's rule in
    the input's dtype (the one LibMTL and torchjd use) and often below it. On float32 inputs, genuine eigenvalues
    below 2·eps32·tr(G) (a condition number above ~4e6·λ_max/tr(G)) are dropped; G's round-off is up to 30 % of the
    smallest one kept. Aligned-MTL compares eigenvalues with their sign (a negative one is never kept); :func:`pinvh`
    compares ``|λ|``, as it also serves indefinite matrices.

    Example:
        >>> import numpy as np, torch
        >>> lam = np.array([1e-9, 0.5, 1.0])
        >>> bool(lam[0] > rank_cutoff(lam, torch.float64)), bool(lam[0] > rank_cutoff(lam, torch.float32))
        (True, False)
    """
    if lam.size == 0:
        return 0.0
    a = np.abs(lam)
    return 2.0 * (max(_eps(dtype), _EPS64) * float(a.sum()) + lam.size * _EPS64 * float(a.max()))


def pinvh(G: np.ndarray, dtype: torch.dtype | np.dtype | type | None = None) -> np.ndarray:
    """Pseudo-inverse of a symmetric matrix via :func:`eigh`, dropping ``|λ| <=`` :func:`rank_cutoff`.

    ``dtype``: the dtype ``G`` was computed in (``None``: float64), which sets the cut-off's round-off level. The
    largest ``|λ|`` is kept whenever it is not 0 (the cut can exceed it only in half precision with T ≳ 1/(2·eps)).
    """
    lam, V = eigh(G)
    keep = np.abs(lam) > rank_cutoff(lam, dtype)
    if lam.size:
        top = int(np.argmax(np.abs(lam)))
        keep[top] = lam[top] != 0.0
    inv = np.divide(1.0, lam, out=np.zeros_like(lam), where=keep)
    return (V * inv) @ V.T


def sqrt_factor(G: np.ndarray, dtype: torch.dtype | np.dtype | type | None = None) -> np.ndarray:
    """A matrix ``A`` with ``Aᵀ A = G`` up to round-off (see :func:`factor`, which also returns the ``rcond``)."""
    return factor(G, dtype)[0]


def factor(G: np.ndarray, dtype: torch.dtype | np.dtype | type | None = None) -> tuple[np.ndarray, float]:
    """``A`` with ``Aᵀ A = G`` up to round-off, and the relative singular-value cut for least squares on its columns.

    Eigenvalues not above :func:`rank_cutoff` (for ``dtype``, the dtype G was computed in; None: float64) are set
    to 0: a float32 Gramian of dependent tasks (``[g, -g, h]``) has a round-off eigenvalue of up to ~eps32·tr(G)
    instead of 0. The column of a task whose gradient is exactly zero (``G_kk = 0``) is set to exactly zero: the
    eigenvectors leave ~1e-16 there, on which the NNLS solvers would put weights of ~1e14.

    ``rcond = √(cut / λ_max)``: a sub-Gramian's eigenvalues below the cut are round-off too, and the singular values
    of the factor's columns are their square roots (about 1e-7 for float64 Gramians, 5e-4 for float32 ones). Without
    it, dependent float32 tasks, whose columns differ from exact negatives by ~1e-8, got weights of ~4e7 along the
    near-null direction, which float32 weights then rounded into a 0.5 % error of the update.
    """
    lam, V = eigh(G)
    cut = rank_cutoff(lam, dtype)
    top = float(np.abs(lam).max(initial=0.0))
    lam = np.where(lam > cut, lam, 0.0)
    A = np.sqrt(lam)[:, None] * V.T
    A[:, np.diag(G) == 0.0] = 0.0
    return A, (float(np.sqrt(cut / top)) if top > 0 else 0.0)


def min_norm_2(g11: float, g12: float, g22: float) -> float:
    """``γ ∈ [0, 1]`` minimising ``||γ a + (1-γ) b||²`` given ``aᵀa = g11, aᵀb = g12, bᵀb = g22``.

    Sener & Koltun (2018), Algorithm 1 (closed form).

    Example:
        >>> min_norm_2(1.0, 0.0, 1.0)
        0.5
    """
    if g12 >= g11:
        return 1.0
    if g12 >= g22:
        return 0.0
    return float((g22 - g12) / (g11 + g22 - 2.0 * g12))


def min_norm_simplex(G: np.ndarray, max_iter: int = 250, tol: float = 1e-7) -> np.ndarray:
    """Weights ``w`` on the simplex minimising ``wᵀ G w`` (min-norm point of the convex hull of the rows).

    T = 1: ``[1]``; T = 2: the exact closed form (:func:`min_norm_2`); T > 2: Frank-Wolfe with exact line search
    (Sener & Koltun 2018, Algorithm 2), started, as in their ``MinNormSolver``, from the best pair's solution. Stops
    when an iteration moves ``w`` by less than ``tol`` (L1) or after ``max_iter`` iterations.

    Example:
        >>> import numpy as np
        >>> np.round(min_norm_simplex(np.eye(3)), 4).tolist()
        [0.3333, 0.3333, 0.3333]
    """
    T = G.shape[0]
    if T == 1:
        return np.ones(1)
    if T == 2:
        g = min_norm_2(G[0, 0], G[0, 1], G[1, 1])
        return np.array([g, 1.0 - g])
    # Initialisation: the best pair (Sener & Koltun's _min_norm_2d), all pairs at once.
    i, j = np.triu_indices(T, k=1)
    g11, g12, g22 = G[i, i], G[i, j], G[j, j]
    with np.errstate(divide="ignore", invalid="ignore"):
        inner = (g22 - g12) / (g11 + g22 - 2.0 * g12)
    gam = np.where(g12 >= g11, 1.0, np.where(g12 >= g22, 0.0, inner))  # min_norm_2, vectorised
    val = gam * gam * g11 + 2 * gam * (1 - gam) * g12 + (1 - gam) ** 2 * g22
    k = int(np.argmin(val))
    w = np.zeros(T)
    w[i[k]], w[j[k]] = gam[k], 1.0 - gam[k]
    # Frank-Wolfe. Gw and wᵀGw are updated in place (w ← g w + (1-g) e_t), and the L1 move is (1-g)·2(1 - w_t).
    Gw = G @ w
    wGw = float(w @ Gw)
    for _ in range(max_iter):
        t = int(np.argmin(Gw))
        # Line search between the current point (norm² wᵀGw) and vertex t (norm² G_tt), inner product (Gw)_t.
        Gwt, Gtt = float(Gw[t]), float(G[t, t])
        g = min_norm_2(wGw, Gwt, Gtt)
        change = (1.0 - g) * 2.0 * (1.0 - w[t])
        w *= g
        w[t] += 1.0 - g
        Gw *= g
        Gw += (1.0 - g) * G[:, t]
        wGw = g * g * wGw + 2.0 * g * (1.0 - g) * Gwt + (1.0 - g) ** 2 * Gtt
        if change < tol:
            break
    return w


def min_norm_simplex_exact(G: np.ndarray, dtype: torch.dtype | np.dtype | type | None = None) -> np.ndarray:
    """Exact weights on the simplex minimising ``wᵀ G w``, by one non-negative least-squares solve.

    With ``Aᵀ A = G``, let ``x = argmin_{x ≥ 0} ||A x||² + (1ᵀx - 1)²`` (Lawson-Hanson, finite active set). Its KKT
    conditions ``G x + (1ᵀx - 1) 1 ≥ 0`` (equality on the support), with ``s = 1ᵀx > 0`` and ``w = x / s``, read
    ``(G w)_i ≥ (1 - s)/s = wᵀGw`` with equality on the support: exactly the optimality conditions of the min-norm
    point of the convex hull. (This is the least-distance-programming reduction of Lawson & Hanson, Ch. 23.)

    Example:
        >>> import numpy as np
        >>> np.round(min_norm_simplex_exact(np.array([[1.0, -1.0], [-1.0, 1.0]])), 6).tolist()
        [0.5, 0.5]
    """
    tr = float(np.trace(G))
    if not tr > 0:  # all gradients zero: every point of the simplex is optimal
        return np.full(G.shape[0], 1.0 / G.shape[0])
    return min_norm_simplex_factor(
        *factor(G / tr, dtype), kkt_tol(dtype)
    )  # the weights do not depend on the scale of G


def min_norm_simplex_factor(A: np.ndarray, rcond: float | None = None, tol: float = KKT_TOL) -> np.ndarray:
    """:func:`min_norm_simplex_exact` given a factor ``A`` (any k x T matrix with ``Aᵀ A = G``) instead of ``G``.

    The NNLS is solved by :func:`nnls_certified`, so the answer satisfies the simplex problem's KKT conditions to
    :data:`KKT_TOL` (see :func:`simplex_kkt_residual`).

    Example:
        >>> import numpy as np
        >>> np.round(min_norm_simplex_factor(np.array([[1.0, 0.0], [0.0, 1.0], [3.0, 3.0]])), 6).tolist()
        [0.5, 0.5]
    """
    T = A.shape[1]
    M = np.vstack([A, np.ones((1, T))])
    b = np.zeros(M.shape[0])
    b[-1] = 1.0
    x = nnls_certified(M, b, rcond=rcond, tol=tol)
    s = x.sum()
    if not s > 0:  # cannot happen in exact arithmetic (x = 0 violates the KKT conditions)
        return np.full(T, 1.0 / T)
    return x / s


# --- certified non-negative least squares ---------------------------------------------------------------------------


def nnls_kkt_residual(M: np.ndarray, b: np.ndarray, x: np.ndarray) -> float:
    """Relative KKT residual of ``x`` for ``min_{x ≥ 0} ||M x - b||²`` (0 exactly at the optimum).

    With the gradient ``g = Mᵀ(M x - b)``, ``x`` is optimal iff ``x ≥ 0``, ``g ≥ 0`` and ``x ⊙ g = 0``, i.e. iff the
    *natural residual* ``min(x, g / ||M||²)`` is 0 (elementwise minimum; ``||M||`` the Frobenius norm, which puts
    ``g`` on the scale of ``x`` and, unlike the spectral norm, costs no SVD). Returned: its largest entry in absolute
    value over ``max(||x||_∞, ||b|| / ||M||)``, which does not change when ``M``, ``b`` or both are rescaled.
    Infinite for non-finite input.

    Example:
        >>> import numpy as np
        >>> M, b = np.eye(2), np.array([1.0, 0.0])
        >>> nnls_kkt_residual(M, b, np.array([1.0, 0.0]))          # the optimum
        0.0
        >>> nnls_kkt_residual(M, b, np.array([1.0, 0.5])) > 0.1    # x_2 > 0 although its gradient is > 0
        True
        >>> nnls_kkt_residual(M, b, np.array([0.5, 0.0])) > 0.1    # x_1 could still decrease the objective
        True
    """
    return float(_nnls_residuals(M, np.atleast_2d(b), np.atleast_2d(x))[0])


def _nnls_residuals(M: np.ndarray, B: np.ndarray, X: np.ndarray) -> np.ndarray:
    """:func:`nnls_kkt_residual` for the problems with right-hand sides ``B[k]`` at ``X[k]``, in one pass."""
    if not (np.isfinite(X).all() and np.isfinite(M).all()):
        return np.full(X.shape[0], np.inf)
    nrm2 = float(np.sum(M * M))
    if nrm2 == 0.0:  # M = 0: every x ≥ 0 is optimal
        return np.where((X >= 0).all(axis=1), 0.0, np.inf)
    Gr = (X @ M.T - B) @ M  # rows: gradients Mᵀ(M x_k - b_k)
    scale = np.maximum(np.abs(X).max(axis=1, initial=0.0), np.linalg.norm(B, axis=1) / np.sqrt(nrm2))
    return np.abs(np.minimum(X, Gr / nrm2)).max(axis=1, initial=0.0) / np.maximum(scale, 1e-300)


def _lawson_hanson(
    M: np.ndarray, b: np.ndarray, x: np.ndarray, tol: float, max_iter: int, rcond: float | None = None
) -> np.ndarray:
    """Lawson & Hanson's active-set NNLS ("Solving Least Squares Problems", 1974, Ch. 23, Algorithm NNLS) from the
    feasible point ``x`` (``x = 0`` is the textbook start; any ``x ≥ 0`` works).

    The passive-set subproblems are solved by ``np.linalg.lstsq`` (SVD, minimum-norm solution), so linearly dependent
    columns in the passive set, which rank-deficient Gramians produce, do not break the solve. A column enters only
    if its gradient entry is below ``-tol`` (relative to ``||M||·||b||``), so every outer step strictly decreases the
    objective and the method terminates; ``max_iter`` bounds the steps anyway. ``rcond``: singular values of a
    passive set below ``rcond · σ_max`` are treated as 0 (default ``max(M.shape) · eps64``; see :func:`factor`).
    """
    T = M.shape[1]
    x = np.maximum(x, 0.0)
    P = x > 0
    gscale = max(float(np.linalg.norm(M)) * float(np.linalg.norm(b)), 1e-300)
    rcond = max(M.shape) * _EPS64 if rcond is None else max(rcond, max(M.shape) * _EPS64)
    for _ in range(max_iter):
        # Inner loop: make x the least-squares solution on P while staying feasible.
        for _ in range(T + 1):
            if not P.any():
                break
            z = np.zeros(T)
            z[P] = np.linalg.lstsq(M[:, P], b, rcond=rcond)[0]
            if (z[P] > 0).all():
                x = z
                break
            neg = P & (z <= 0)
            alpha = float(np.min(x[neg] / (x[neg] - z[neg])))
            x = x + alpha * (z - x)
            P &= x > 1e-15 * max(1.0, float(np.abs(x).max()))
            x[~P] = 0.0
        w = M.T @ (b - M @ x)  # minus half the gradient
        w[P] = -np.inf
        j = int(np.argmax(w))
        if w[j] <= tol * gscale:
            break
        P[j] = True
    return x


def _scipy_nnls(M: np.ndarray, b: np.ndarray, rcond: float | None = None) -> np.ndarray:
    """SciPy's NNLS, polished by one Lawson-Hanson pass from its point (the first answer of :func:`nnls_certified`).

    The pass re-solves the least-squares problem on SciPy's support with ``lstsq`` (minimum-norm, SVD-truncated), so
    on singular Gramians, whose optimal weights are not unique, the weights carry no component along the null
    space (SciPy's answer carried up to ~1e6 there on ``[g, -g, h]``, which float32 weights then rounded into a 0.5 %
    error of the update), and a negligible column gets no huge weight. One ``lstsq`` of size T when SciPy's support
    is right, as it nearly always is.
    """
    T = M.shape[1]
    try:
        x = nnls(M, b, maxiter=50 * max(1, T))[0]
    except RuntimeError:  # iteration limit: the polish starts from 0
        x = np.zeros(T)
    return _lawson_hanson(M, b, x, tol=1e-13, max_iter=3 * T + 10, rcond=rcond)


def nnls_certified(
    M: np.ndarray, b: np.ndarray, x0: np.ndarray | None = None, rcond: float | None = None, tol: float = KKT_TOL
) -> np.ndarray:
    """``argmin_{x ≥ 0} ||M x - b||²``, certified by its KKT conditions to :data:`KKT_TOL`.

    SciPy's ``nnls`` gives the first answer (fast, compiled; polished by one least-squares solve on its support, see
    :func:`_scipy_nnls`). Its reimplementations since SciPy 1.12 have returned
    sub-optimal points on some inputs (scipy/scipy issues #21140, #21630, #22884, #25389), and on rank-deficient
    Gramians a wrong active set leaves KKT violations around 1e-4, which made UPGrad's update depend on the task order
    and conflict with a task. So the answer is checked (:func:`nnls_kkt_residual`); if it fails, Lawson-Hanson
    (:func:`_lawson_hanson`) runs again from ``x = 0``. The more accurate of the two is returned; both failing
    would raise :class:`RuntimeError` (never seen: it would be a bug, not an input problem). ``x0``: a first answer
    already computed and polished by :func:`_scipy_nnls` (SciPy is then not called). ``rcond``: passed to the least-squares solves (:func:`_lawson_hanson`); ``tol``: the bound (see
    :func:`kkt_tol`).

    Example:
        >>> import numpy as np
        >>> nnls_certified(np.eye(2), np.array([1.0, -1.0])).tolist()
        [1.0, 0.0]
    """
    T = M.shape[1]
    x = _scipy_nnls(M, b, rcond) if x0 is None else x0
    best, best_r = x, nnls_kkt_residual(M, b, x)
    if best_r <= tol:
        return best
    # The first answer was already polished from SciPy's point (_scipy_nnls): the fallback starts afresh from 0.
    y = _lawson_hanson(M, b, np.zeros(T), tol=1e-13, max_iter=3 * T + 10, rcond=rcond)
    r = nnls_kkt_residual(M, b, y)
    if r < best_r:
        best, best_r = y, r
    if best_r <= tol:
        return best
    raise RuntimeError(
        f"non-negative least squares not certified: KKT residual {best_r:.3g} > {tol:g} "
        f"(T = {T}); please report this input"
    )


def project_simplex(v: np.ndarray) -> np.ndarray:
    """Euclidean projection of ``v`` onto ``{w ≥ 0, Σ w = 1}`` (sort-based algorithm).

    Example:
        >>> project_simplex(np.array([2.0, 0.0])).tolist()
        [1.0, 0.0]
    """
    u = np.sort(v)[::-1]
    css = np.cumsum(u) - 1.0
    ind = np.arange(1, len(v) + 1)
    rho = ind[u - css / ind > 0][-1]
    return np.maximum(v - css[rho - 1] / rho, 0.0)


def project_dual_cone(G: np.ndarray, U: np.ndarray, dtype: torch.dtype | np.dtype | type | None = None) -> np.ndarray:
    """Weights of the projections of ``Jᵀ u`` (one per row ``u`` of ``U``) onto the dual cone of the rows of J.

    The projection of ``Jᵀ u`` onto ``{x : J x ≥ 0}`` is ``Jᵀ v`` with ``v = argmin vᵀ G v s.t. v ≥ u``
    (Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization", arXiv:2406.16232, 2024, Proposition 1). With
    ``v = u + x`` and ``Aᵀ A = G`` this is the non-negative least-squares problem ``min_{x ≥ 0} ||A x + A u||²``,
    solved by :func:`nnls_certified`; no positive-definiteness (hence no regularisation) is needed. KKT:
    ``G v ≥ 0`` (the projection has a non-negative inner product with every row) and ``(v - u) ⊙ G v = 0``.

    ``G`` is made positive semi-definite first (:func:`sqrt_factor` sets the eigenvalues that are round-off of
    ``J Jᵀ`` in ``dtype``, negative ones included, to 0); the certificate holds for that matrix.

    Example:
        >>> import numpy as np
        >>> G = np.array([[1.0, -0.5], [-0.5, 1.0]])
        >>> v = project_dual_cone(G, np.array([[1.0, 0.0]]))
        >>> bool((G @ v[0] >= -1e-12).all())
        True
    """
    A, rcond = factor(G, dtype)
    U = np.atleast_2d(np.asarray(U, dtype=np.float64))
    B = -(U @ A.T)  # rows: -A u_k
    X = np.stack([_scipy_nnls(A, b, rcond) for b in B])
    tol = kkt_tol(dtype)
    for k in np.flatnonzero(_nnls_residuals(A, B, X) > tol):  # certify all at once; polish only the failures
        X[k] = nnls_certified(A, B[k], x0=X[k], rcond=rcond, tol=tol)
    return U + X


def dual_cone_kkt_residual(G: np.ndarray, U: np.ndarray, V: np.ndarray) -> float:
    """Largest relative KKT residual of the rows of ``V`` for ``min vᵀGv s.t. v ≥ u`` (rows ``u`` of ``U``).

    Natural residual ``min(v - u, G v / ||G||)`` (0 iff ``v ≥ u``, ``G v ≥ 0`` and complementarity hold), entry
    ``i`` over ``max(||u||_∞, |v_i|)``: invariant to the scale of ``G`` and of ``u``. ``||G||`` is the Frobenius norm (as in
    :func:`nnls_kkt_residual`).

    Example:
        >>> import numpy as np
        >>> G = np.array([[1.0, -1.0], [-1.0, 1.0]])
        >>> dual_cone_kkt_residual(G, np.array([[1.0, 0.0]]), np.array([[1.0, 1.0]]))
        0.0
    """
    U, V = np.atleast_2d(U), np.atleast_2d(V)
    nrm = float(np.linalg.norm(G))
    if nrm == 0.0:
        return 0.0 if (V >= U).all() else float("inf")
    r = np.minimum(V - U, (V @ G) / nrm)  # G symmetric: row k of V G is (G v_k)ᵀ
    # entry by entry over max(||u||_∞, |v_i|): a huge weight (on a zero task, say) cannot hide another entry's error
    scale = np.maximum(np.abs(U).max(axis=1, keepdims=True), np.abs(V))
    return float((np.abs(r) / np.maximum(scale, 1e-300)).max())


def simplex_kkt_residual(G: np.ndarray, w: np.ndarray) -> float:
    """Relative KKT residual of ``w`` for ``min wᵀGw s.t. w ≥ 0, 1ᵀw = 1`` (the min-norm point, MGDA's problem).

    KKT: ``λ = G w - (wᵀGw) 1 ≥ 0`` and ``w ⊙ λ = 0``, i.e. the natural residual ``min(w, λ / ||G||)`` is 0; also
    ``|1ᵀw - 1|``. Invariant to the scale of ``G`` (``||G||``: Frobenius norm).

    Example:
        >>> import numpy as np
        >>> simplex_kkt_residual(np.eye(2), np.array([0.5, 0.5]))
        0.0
        >>> simplex_kkt_residual(np.eye(2), np.array([1.0, 0.0])) > 0.1
        True
    """
    nrm = float(np.linalg.norm(G))
    feas = abs(float(w.sum()) - 1.0)
    if nrm == 0.0:
        return max(feas, float(-w.min(initial=0.0)))
    Gw = G @ w
    lam = (Gw - float(w @ Gw)) / nrm
    return max(feas, float(np.abs(np.minimum(w, lam)).max(initial=0.0)))


def dual_cone_on_gramian(G: Tensor, U: np.ndarray, norm_eps: float, reg_eps: float) -> np.ndarray:
    """``project_dual_cone`` of the rows ``U`` on the trace-normalised Gramian plus ``reg_eps·I`` (UPGrad, DualProj).

    The projection does not depend on the scale of ``G`` (``v`` solves a problem invariant to it), so normalising by
    the trace only conditions the numbers. When ``trace(G) <= norm_eps`` (default 0: only for ``J = 0``) the Gramian
    is treated as zero: every ``v ≥ u`` is then optimal and ``v = u`` is returned (the mean direction, which is what
    torchjd's normalise-then-regularise gives there), never zero weights.
    """
    A = to_numpy(G)
    tr = float(np.trace(A))
    if not np.isfinite(tr):
        raise FloatingPointError("the Gramian has non-finite entries (a task gradient is NaN or infinite)")
    if tr <= norm_eps:
        return np.array(np.atleast_2d(U), dtype=np.float64)
    return project_dual_cone(A / tr + reg_eps * np.eye(A.shape[0]), U, G.dtype)


def check_nonneg(name: str, value: float, strict: bool = False) -> float:
    """Raise :class:`ConfigError` unless ``value`` is a finite number ``>= 0`` (``> 0`` when ``strict``)."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a number, got {value!r}") from None
    if not np.isfinite(v) or v < 0 or (strict and v == 0):
        raise ConfigError(f"{name} must be {'> 0' if strict else '>= 0'}, got {value!r}")
    return v


def check_int(name: str, value: int, minimum: int = 1) -> int:
    """Raise :class:`ConfigError` unless ``value`` is an integer ``>= minimum``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)
