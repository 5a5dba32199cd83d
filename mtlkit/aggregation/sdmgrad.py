"""SDMGrad: MGDA's problem regularised towards the mean gradient, ``min_{w∈Δ} ½||Jᵀw + λ g_0||²``."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from mtlkit._registry import METHODS
from mtlkit.aggregation._base import Aggregator, restricted_view
from mtlkit.aggregation._solvers import (
    check_int,
    check_nonneg,
    factor,
    kkt_tol,
    min_norm_simplex_factor,
    project_simplex,
    to_numpy,
    to_weights,
)
from mtlkit.errors import ConfigError

_SOLVERS = ("exact", "pgd")


def sdmgrad_exact(A: np.ndarray, lamda: float, dtype: torch.dtype | None = None) -> np.ndarray:
    """``w* = argmin_{w∈Δ} ||Jᵀw + λ g_0||²`` from ``A = J Jᵀ`` (``g_0 = Jᵀ1/T``), certified (KKT residual 1e-9).

    With ``1ᵀw = 1``, ``Jᵀw + λ g_0 = Σ_i w_i (g_i + λ g_0)``: the minimum-norm point of the convex hull of the
    shifted gradients ``g_i + λ g_0``. Given a factor ``L`` of ``A`` (``LᵀL = A``, rank cut for ``dtype``, the
    dtype A was computed in: :func:`~mtlkit.aggregation._solvers.factor`) the shifted gradients are the columns of
    ``L + λ (L 1/T) 1ᵀ``, and one certified NNLS solves the problem
    (:func:`~mtlkit.aggregation._solvers.min_norm_simplex_factor`). The point ``Jᵀw* + λ g_0`` is unique; ``w*``
    is when the shifted gradients are affinely independent.

    Example:
        >>> import numpy as np
        >>> np.round(sdmgrad_exact(np.array([[4.0, 0.0], [0.0, 1.0]]), 0.0), 6).tolist()   # λ = 0: MGDA
        [0.2, 0.8]
    """
    T = A.shape[0]
    u = np.full(T, 1.0 / T)
    tr = float(np.trace(A))
    if not tr > 0:  # J = 0: every w gives the zero update
        return u
    L, rcond = factor(A / tr, dtype)  # the weights do not depend on the scale of A
    shifted = L + lamda * np.outer(L @ u, np.ones(T))
    return min_norm_simplex_factor(shifted, rcond, kkt_tol(dtype))


@METHODS.register("sdmgrad")
class SDMGrad(Aggregator):
    r"""SDMGrad (Xiao et al. 2023): MGDA regularised towards the mean, update (Jᵀw + λ g_0)/(1 + λ).

    Stochastic direction-oriented multi-objective gradient descent, deterministic (single-batch) version.

    Xiao, Ban & Ji, "Direction-oriented Multi-objective Learning: Simple and Provable Stochastic Algorithms",
    NeurIPS 2023 (OpenReview 4Ks8RPcXd9; arXiv:2305.18409). The direction-oriented problem keeps the common
    direction near the mean gradient ``g_0 = (1/T) Σ_t g_t`` by a regularisation of weight ``λ``:

        max_d  min_{w∈Δ} ⟨Jᵀw, d⟩ − ½||d||² + λ⟨g_0, d⟩,

    whose dual is ``w* = argmin_{w∈Δ} ½||Jᵀw + λ g_0||²`` with the primal solution ``d* = Jᵀw* + λ g_0`` (the
    w-subproblem of the paper's Algorithm 1). The update is ``d*/(1 + λ)``, as the authors' code and LibMTL return
    it (a positive multiple of d* whose weights ``(w* + λ/T)/(1 + λ)`` sum to 1).
    ``λ = 0`` is MGDA; ``λ → ∞`` the mean (the weights are within ``1/(1 + λ)`` of ``1/T``). Properties of the
    solution (tested): ``⟨g_i + λ g_0, d*⟩ ≥ ||d*||²`` for every task, with equality where ``w*_i > 0`` (the
    min-norm point's optimality conditions), hence (averaging over i) ``⟨g_0, d⟩ ≥ ||d||²`` for the update
    ``d = d*/(1 + λ)``: it never conflicts with the mean gradient.

    Single batch. SDMGrad's convergence analysis estimates ``J Jᵀ`` in the w-update from two independent mini-batches
    (``∇L_S1ᵀ ∇L_S2``, unbiased for the true Gramian) and the update from a third one; a training loop that gives an
    aggregator one Jacobian per step cannot provide that, so the same J serves all three: the deterministic version
    of the method. The authors' NYU-v2/Cityscapes code in ml-opt-lab/sdmgrad (the repository the paper links) does
    the same; the one in OptMN-Lab/sdmgrad draws two extra batches.

    Solver (``solver``):

    * ``"exact"`` (default): ``w*`` itself, as the min-norm point of the shifted gradients, by one certified NNLS
      (:func:`sdmgrad_exact`). Stateless and independent of the scale of J.
    * ``"pgd"``: the authors' inner loop (OptMN-Lab/sdmgrad, ``SDMGrad.sdmgrad``): ``niter`` steps of
      ``w ← Π_Δ(w − lr·m)``, ``m`` heavy-ball momentum (``m ← momentum·m + ∇``, restarted at every call) of
      ``∇ = Ĝ w + λ Ĝ 1/T``, the gradient of ``½||Jᵀw + λ g_0||²`` on ``Ĝ = G / s²`` with ``s`` the mean of the
      gradient norms; ``w`` starts from the previous call's (state). The authors' ``s`` adds 1e-4 under each square
      root, which makes the step depend on the gradients' scale (for gradient norms ≲ 1e-2 it stalls); it is left
      out, so that ``Ĝ`` and the weights are scale-free. LibMTL's copy is the same with ``lr = 5``; the
      ml-opt-lab code steps along the gradient of ``||·||²`` (twice ours: its ``lr = 10`` is our ``lr = 20``).
      With the defaults (``lr = 10`` on ``Ĝ``, whose largest eigenvalue is about 1 to T) the step is far beyond
      ``2/λ_max``: the iterate bounces between faces of the simplex, ends far from ``w*`` (after one call, a median
      1.7x (T = 2) to 8x (T = 10) the optimal ``||d||²`` on random Gramians, 30-120x on conflicting ones) and
      amplifies round-off (a 1e-15 relative change of G moved the weights by 2e-4 at T = 10 and by 0.6 at T = 50
      after five warm-started calls: reproducible bit for bit, but neither a stable function of G nor
      permutation-equivariant in floating point for large T). With a step below ``2/λ_max(Ĝ)`` and enough
      iterations it converges to ``w*`` (tested).

    Scale: the weights are non-negative and sum to 1: a **convex** combination, as the authors' ``sdmgrad``
    function and LibMTL return it (their NYU-v2 trainers multiply it by T "to match the sum loss", which
    ``build_method(..., scale="sum")`` reproduces). Gramian-based, so ``level="representation"`` works too (the
    authors use the shared parameters).

    Batches where some tasks have no labelled sample (:meth:`~mtlkit.aggregation.Aggregator.restricted`): the
    problem is solved among the present tasks (``g_0`` their mean). ``"exact"`` keeps no state (the restriction is
    the method itself); ``"pgd"`` starts from the present tasks' entries of the previous ``w``, renormalised to sum
    to 1 (uniform if they are all 0), and writes its result back scaled by the mass they had: ``w`` stays on the
    full simplex with the absent tasks' entries unchanged.

    Args:
        lamda: ``λ ≥ 0`` (spelled as in the authors' code and LibMTL; ``lambda`` is a Python keyword). The authors'
            NYU-v2 runs and LibMTL's default: 0.3.
        solver: ``"exact"`` or ``"pgd"``.
        niter, lr, momentum: the ``"pgd"`` loop (authors' defaults 20, 10, 0.5); unused by ``"exact"``.

    Example:
        >>> import torch
        >>> J = torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
        >>> SDMGrad(lamda=0.0)(J)                  # MGDA: the min-norm point of the segment [g_1, g_2]
        tensor([0.4000, 0.8000], dtype=torch.float64)
        >>> SDMGrad(lamda=1e9)(J)                  # the mean, to ~1/λ
        tensor([1.0000, 0.5000], dtype=torch.float64)
    """

    gramian_based = True
    scale = "convex"

    def __init__(
        self, lamda: float = 0.3, solver: str = "exact", niter: int = 20, lr: float = 10.0, momentum: float = 0.5
    ) -> None:
        self.lamda = check_nonneg("lamda", lamda)
        if solver not in _SOLVERS:
            raise ConfigError(f"unknown SDMGrad solver {solver!r}; valid solvers are: {', '.join(_SOLVERS)}")
        self.solver = solver
        self.niter = check_int("niter", niter)
        self.lr = check_nonneg("lr", lr, strict=True)
        self.momentum = check_nonneg("momentum", momentum)
        if self.momentum >= 1.0:
            raise ConfigError(f"momentum must be in [0, 1), got {momentum!r}")
        self._w: np.ndarray | None = None  # the "pgd" iterate (warm start of the next call)

    def weights_from_gramian(self, G: Tensor) -> Tensor:
        A = to_numpy(G)
        T = A.shape[0]
        u = np.full(T, 1.0 / T)
        w = sdmgrad_exact(A, self.lamda, G.dtype) if self.solver == "exact" else self._pgd(A)
        return to_weights((w + self.lamda * u) / (1.0 + self.lamda), G)

    def _pgd(self, A: np.ndarray) -> np.ndarray:
        """The authors' projected heavy-ball loop on ``½||Jᵀw + λ g_0||²``, warm-started (see the class docstring)."""
        T = A.shape[0]
        if self._w is not None and self._w.shape[0] != T:
            raise ValueError(f"SDMGrad was used with {self._w.shape[0]} tasks and now gets {T}; build a new one")
        w = np.full(T, 1.0 / T) if self._w is None else self._w
        s = float(np.sqrt(np.clip(np.diag(A), 0.0, None)).mean())
        if s > 0:  # J = 0: nothing to minimise, w stays
            Gn = A / (s * s)
            shift = self.lamda * Gn.mean(axis=1)  # λ Ĝ 1/T
            m = np.zeros(T)
            for i in range(self.niter):
                grad = Gn @ w + shift
                m = grad if i == 0 else self.momentum * m + grad
                w = project_simplex(w - self.lr * m)
        self._w = w
        return w

    def _restricted(self, present: Tensor) -> Aggregator:
        if self.solver == "exact":
            return self
        T = int(present.numel())
        if self._w is not None and self._w.shape[0] != T:
            raise ValueError(f"SDMGrad was used with {self._w.shape[0]} tasks but present has {T} entries")
        idx = present.nonzero().flatten().numpy()
        w = np.full(T, 1.0 / T) if self._w is None else self._w
        mass = float(w[idx].sum())

        def load(sub: SDMGrad) -> None:
            sub._w = w[idx] / mass if mass > 0 else np.full(len(idx), 1.0 / len(idx))

        def store(sub: SDMGrad) -> None:
            assert sub._w is not None
            full = w.copy()
            full[idx] = sub._w * mass
            self._w = full

        return restricted_view(self, present, load, store)

    def state_dict(self) -> dict[str, Any]:
        if self.solver == "exact":
            return {}
        return {"w": None if self._w is None else torch.from_numpy(self._w.copy())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        want = set() if self.solver == "exact" else {"w"}
        if set(state) != want:
            raise ValueError(f"SDMGrad(solver={self.solver!r}) state needs keys {sorted(want)}, got {sorted(state)}")
        if want:
            w = state["w"]
            self._w = None if w is None else w.detach().to(torch.float64).numpy().copy()
