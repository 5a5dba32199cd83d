"""Small solvers shared by the Gramian-based aggregators (private).

Everything here works on the T x T Gramian ``G = J Jᵀ`` in float64 NumPy (T is small, so the cost is negligible
next to the backward passes) and returns task weights ``w`` such that the update is ``wᵀ J``.

* :func:`min_norm_2` / :func:`min_norm_simplex`: the minimum-norm point of the convex hull of the rows (MGDA).
* :func:`project_dual_cone`: weights of the projection of ``Jᵀ u`` onto the dual cone ``{x : J x ≥ 0}``
  (UPGrad, DualProj), solved exactly as a non-negative least-squares problem.
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


def pinvh(G: np.ndarray) -> np.ndarray:
    """Pseudo-inverse of a symmetric matrix, with NumPy's default cut-off (``T·eps·max|λ|``), via :func:`eigh`."""
    lam, V = eigh(G)
    cut = G.shape[0] * np.finfo(np.float64).eps * (np.abs(lam).max() if lam.size else 0.0)
    inv = np.divide(1.0, lam, out=np.zeros_like(lam), where=np.abs(lam) > cut)
    return (V * inv) @ V.T


def sqrt_factor(G: np.ndarray) -> np.ndarray:
    """A matrix ``A`` with ``Aᵀ A = G`` (negative eigenvalues from round-off are clipped to 0)."""
    lam, V = eigh(G)
    return np.sqrt(np.clip(lam, 0.0, None))[:, None] * V.T


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


def min_norm_simplex_exact(G: np.ndarray) -> np.ndarray:
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
    return min_norm_simplex_factor(sqrt_factor(G))


def min_norm_simplex_factor(A: np.ndarray) -> np.ndarray:
    """:func:`min_norm_simplex_exact` given a factor ``A`` (any k x T matrix with ``Aᵀ A = G``) instead of ``G``.

    Example:
        >>> import numpy as np
        >>> np.round(min_norm_simplex_factor(np.array([[1.0, 0.0], [0.0, 1.0], [3.0, 3.0]])), 6).tolist()
        [0.5, 0.5]
    """
    T = A.shape[1]
    M = np.vstack([A, np.ones((1, T))])
    b = np.zeros(M.shape[0])
    b[-1] = 1.0
    x, _ = nnls(M, b, maxiter=50 * max(1, T))
    s = x.sum()
    if not s > 0:  # cannot happen in exact arithmetic (x = 0 violates the KKT conditions)
        return np.full(T, 1.0 / T)
    return x / s


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


def project_dual_cone(G: np.ndarray, U: np.ndarray) -> np.ndarray:
    """Weights of the projections of ``Jᵀ u`` (one per row ``u`` of ``U``) onto the dual cone of the rows of J.

    The projection of ``Jᵀ u`` onto ``{x : J x ≥ 0}`` is ``Jᵀ v`` with ``v = argmin vᵀ G v s.t. v ≥ u``
    (Quinton & Rey 2024, "Jacobian Descent for Multi-Objective Optimization", Proposition 1). With ``v = u + x``
    and ``Aᵀ A = G`` this is the non-negative least-squares problem ``min_{x ≥ 0} ||A x + A u||²``, solved exactly
    by Lawson-Hanson (``scipy.optimize.nnls``); no positive-definiteness (hence no regularisation) is needed.
    KKT: ``G v ≥ 0``, i.e. the projection has a non-negative inner product with every row.

    Example:
        >>> import numpy as np
        >>> G = np.array([[1.0, -0.5], [-0.5, 1.0]])
        >>> v = project_dual_cone(G, np.array([[1.0, 0.0]]))
        >>> bool((G @ v[0] >= -1e-12).all())
        True
    """
    A = sqrt_factor(G)
    U = np.atleast_2d(U)
    out = np.empty_like(U, dtype=np.float64)
    for k, u in enumerate(U):
        x, _ = nnls(A, -A @ u, maxiter=50 * max(1, G.shape[0]))
        out[k] = u + x
    return out


def dual_cone_on_gramian(G: Tensor, U: np.ndarray, norm_eps: float, reg_eps: float) -> np.ndarray:
    """``project_dual_cone`` of the rows ``U`` on the trace-normalised Gramian plus ``reg_eps·I`` (UPGrad, DualProj).

    Returns zeros when ``trace(G) <= norm_eps`` (all gradients ~ 0: nothing to project).
    """
    A = to_numpy(G)
    if np.trace(A) <= norm_eps:
        return np.zeros_like(U, dtype=np.float64)
    return project_dual_cone(trace_normalize(A) + reg_eps * np.eye(A.shape[0]), U)


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
