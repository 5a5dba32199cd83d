"""Nash-MTL: the Nash bargaining solution, G α = 1/α."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from mtlkit._registry import METHODS
from mtlkit.aggregation._base import Aggregator, Restricted, restricted_view
from mtlkit.aggregation._solvers import check_int, check_nonneg, to_numpy, to_weights
from mtlkit.errors import ConfigError

#: Ridge added to the (normalised) Gramian so that G α = 1/α always has a solution (see :func:`solve_nash`).
_RIDGE = 1e-8


def solve_nash(G: np.ndarray, alpha0: np.ndarray | None = None, max_iter: int = 100, tol: float = 1e-9) -> np.ndarray:
    """The positive solution of ``G α = 1/α`` by damped Newton on a strictly convex potential.

    ``G α = 1/α`` is the stationarity condition of ``f(α) = ½ αᵀ G α - Σ_i log α_i`` on ``α > 0``; ``f`` is strictly
    convex (Hessian ``G + diag(1/α²)`` is positive definite), so the solution is unique and Newton's method with a
    backtracking (Armijo) line search that keeps ``α > 0`` converges from any positive start, quadratically near the
    end. A ridge ``1e-8 · max(||G||_F, tiny)`` keeps ``f`` bounded below when ``0`` lies in the convex hull of the
    gradients (then no exact solution exists; the weights grow along the null direction but ``Σ α_t g_t`` stays small).
    Stops when ``||G α - 1/α|| <= tol · ||1/α||``: a relative residual, the same for ``α`` on ``G`` and for
    ``α/√c`` on ``c·G``, so a solution computed on a rescaled Gramian and mapped back meets it too.

    Example:
        >>> import numpy as np
        >>> a = solve_nash(np.array([[2.0, 0.0], [0.0, 0.5]]))
        >>> np.round(a, 6).tolist()
        [0.707107, 1.414214]
    """
    T = G.shape[0]
    scale = max(float(np.linalg.norm(G)), np.finfo(np.float64).tiny)
    A = G + _RIDGE * scale * np.eye(T)
    if alpha0 is None or alpha0.shape != (T,) or not np.all(np.isfinite(alpha0)) or np.any(alpha0 <= 0):
        alpha = 1.0 / np.sqrt(np.diag(A))
    else:
        alpha = alpha0.astype(np.float64).copy()

    def f(a: np.ndarray) -> float:
        return 0.5 * float(a @ A @ a) - float(np.log(a).sum())

    fa = f(alpha)
    for _ in range(max_iter):
        grad = A @ alpha - 1.0 / alpha
        if np.linalg.norm(grad) <= tol * np.linalg.norm(1.0 / alpha):
            break
        H = A + np.diag(1.0 / alpha**2)
        step = -np.linalg.solve(H, grad)
        t = 1.0
        neg = step < 0
        if neg.any():  # stay strictly inside α > 0
            t = min(1.0, 0.99 * float(np.min(-alpha[neg] / step[neg])))
        slope = float(grad @ step)
        while True:
            cand = alpha + t * step
            fc = f(cand)
            if fc <= fa + 1e-4 * t * slope or t < 1e-12:
                break
            t *= 0.5
        alpha, fa = cand, fc
    return alpha


@METHODS.register("nash_mtl")
class NashMTL(Aggregator):
    """Nash-MTL (Navon et al. 2022): bargaining weights G α = 1/α (Newton solver, no cvxpy).

    Nash-MTL: the update ``Σ_t α_t g_t`` with ``α`` the Nash bargaining solution ``G α = 1/α``, ``α > 0``.

    Navon et al., "Multi-Task Learning as a Bargaining Game", ICML 2022 (PMLR 162), doi:10.48550/arXiv.2202.01017,
    Section 3: the Nash bargaining solution ``argmax_{Δθ ∈ B_ε} Σ_i log(Δθᵀ g_i)`` is ``Δθ ∝ Σ_i α_i g_i`` with
    ``α > 0`` solving ``Gᵀ G α = 1/α`` in their notation (their G holds the gradients as columns, so their ``Gᵀ G``
    is our ``G = J Jᵀ``), i.e. ``⟨g_i, Σ_j α_j g_j⟩ = 1/α_i``; plus the practical tricks of the paper and its code
    (weights refreshed every ``update_weights_every`` steps; update clipped to ``max_norm``). Gramian-based.

    Solver (documented difference): the authors reach ``Gα = 1/α`` by a sequence of convex approximations solved with
    cvxpy/ECOS (at most 20 per step, warm-started). We solve the same equation directly, and to a tight tolerance,
    as the stationary point of the strictly convex ``½ αᵀGα - Σ log α`` by damped Newton (:func:`solve_nash`),
    warm-started from the previous step's ``α`` as in the official code. No cvxpy. The solve always runs on
    ``G / ||G||_F`` (well scaled whatever the gradients' magnitude) and the root is mapped back exactly: if
    ``(G/n) β = 1/β`` then ``α = β / √n`` solves ``G α = 1/α``.

    Scale. Default (``normalize=False``): the paper's equation ``G α = 1/α``. It is also what the official code
    (AvivNavon/nash-mtl), LibMTL and torchjd solve: they divide ``G`` by ``n = ||G||_F`` but write the constraint as
    ``log(α_i · n) + log(((G/n) α)_i) ≥ 0``, i.e. ``α_i (G α)_i ≥ 1``, so their normalisation cancels. Then
    ``||update||² = αᵀ G α = T``: the update has norm ``√T`` whatever the gradients' scale (the learning rate sets
    the step; with the authors' ``max_norm=1.0`` it is always clipped to norm 1 for T ≥ 2). This departs from the
    library's sum-scale convention (see :class:`~mtlkit.aggregation.Aggregator`). ``normalize=True``: the weights
    ``β = √||G||_F · α`` of ``(G/||G||_F) β = 1/β`` (i.e. ``G β = ||G||_F / β``), with ``||update||² = T · ||G||_F``,
    an update homogeneous of degree 1 in the gradients like the sum; this was mtlkit's default before, mistakenly
    described as the official code's. ``max_norm``: the official trainer clips the shared gradient to norm 1.0;
    here clipping is off by default (``max_norm=0``) so that the aggregator does not silently change the scale;
    pass ``max_norm=1.0`` to reproduce the authors' setting. At ``level="representation"`` the clipping applies to
    the representation gradient.

    State (``state_dict``): the step counter and the last ``α`` (as returned, before clipping).

    Batches where some tasks have no labelled sample (:meth:`~mtlkit.aggregation.Aggregator.restricted`): the
    bargaining runs among the present tasks, warm-started from their entries of the last ``α`` (which also serve
    as the weights on the steps between refreshes); their new ``α`` is written back, the absent tasks' entries are
    kept, and the step counter advances. An entry never solved for yet (a task absent from every step so far) is
    NaN in the state, and a step that would reuse it solves afresh instead.

    Args:
        update_weights_every: recompute ``α`` every k calls, reuse the last one in between (``>= 1``).
        max_norm: if ``> 0``, scale the update down to this norm when it is larger.
        normalize: return ``β = √||G||_F · α`` (solves ``(G/||G||_F) β = 1/β``) instead of the paper's ``α``.
        max_iter: Newton iterations at most (see :func:`solve_nash`).
        tol: relative tolerance on the residual (see :func:`solve_nash`).

    Example:
        >>> import torch
        >>> J = torch.tensor([[2.0, 0.0], [0.0, 0.5]])       # G = diag(4, 1/4): α = (1/2, 2), update = (1, 1)
        >>> torch.allclose(NashMTL()(J), torch.ones(2), atol=1e-6)    # float32, solver tolerance 1e-9
        True
        >>> torch.allclose(NashMTL(normalize=True)(J), torch.full((2,), 16.0625 ** 0.25), atol=1e-5)  # √||G||_F x
        True
    """

    gramian_based = True
    scale = "fixed_norm"

    def __init__(
        self,
        update_weights_every: int = 1,
        max_norm: float = 0.0,
        normalize: bool = False,
        max_iter: int = 100,
        tol: float = 1e-9,
    ) -> None:
        self.update_weights_every = check_int("update_weights_every", update_weights_every)
        self.max_norm = check_nonneg("max_norm", max_norm)
        if not isinstance(normalize, bool):
            raise ConfigError(f"normalize must be True or False, got {normalize!r}")
        self.normalize = normalize
        self.max_iter = check_int("max_iter", max_iter)
        self.tol = check_nonneg("tol", tol, strict=True)
        self._step = 0
        self._alpha: np.ndarray | None = None

    def weights_from_gramian(self, G: Tensor) -> Tensor:
        A = to_numpy(G)
        T = A.shape[0]
        if self._alpha is not None and self._alpha.shape[0] != T:
            raise ValueError(f"NashMTL was used with {self._alpha.shape[0]} tasks and now gets {T}; build a new one")
        known = self._alpha is not None and bool(np.isfinite(self._alpha).all())  # NaN: never solved (see above)
        if not known or self._step % self.update_weights_every == 0:
            norm = float(np.linalg.norm(A))
            if norm == 0.0:  # all gradients are zero: any weights give a zero update
                alpha = self._alpha if known and self._alpha is not None else np.ones(T)
            else:  # solve on G/||G||_F, map back: β solves (G/n) β = 1/β  <=>  α = β/√n solves G α = 1/α
                back = 1.0 if self.normalize else float(np.sqrt(norm))
                start = None if self._alpha is None else self._alpha * back  # NaN entries: solve_nash starts cold
                alpha = solve_nash(A / norm, start, self.max_iter, self.tol) / back
            self._alpha = alpha
        self._step += 1
        assert self._alpha is not None
        w = self._alpha.copy()
        if self.max_norm > 0:
            upd_norm = float(np.sqrt(max(w @ A @ w, 0.0)))
            if upd_norm > self.max_norm:
                w = w * (self.max_norm / upd_norm)
        return to_weights(w, G)

    def _restricted(self, present: Tensor) -> Restricted:
        T = int(present.numel())
        if self._alpha is not None and self._alpha.shape[0] != T:
            raise ValueError(f"NashMTL was used with {self._alpha.shape[0]} tasks but present has {T} entries")
        idx = present.nonzero().flatten().numpy()

        def load(sub: NashMTL) -> None:
            sub._alpha = None if self._alpha is None else self._alpha[idx].copy()

        def store(sub: NashMTL) -> None:
            assert sub._alpha is not None
            full = np.full(T, np.nan) if self._alpha is None else self._alpha.copy()
            full[idx] = sub._alpha
            self._alpha, self._step = full, sub._step

        return restricted_view(self, present, load, store)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self._step, "alpha": None if self._alpha is None else torch.from_numpy(self._alpha.copy())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state) != {"step", "alpha"}:
            raise ConfigError(f"NashMTL.load_state_dict expects keys ['alpha', 'step'], got {sorted(state)}")
        self._step = int(state["step"])
        a = state["alpha"]
        self._alpha = None if a is None else a.detach().to(torch.float64).numpy().copy()
