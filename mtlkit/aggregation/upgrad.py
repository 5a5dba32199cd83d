"""UPGrad: project every task gradient onto the dual cone of all of them, then average."""

from __future__ import annotations

import numpy as np
from torch import Tensor

from mtlkit._registry import METHODS
from mtlkit.aggregation._base import Aggregator
from mtlkit.aggregation._solvers import check_nonneg, dual_cone_on_gramian, to_weights


@METHODS.register("upgrad")
class UPGrad(Aggregator):
    """UPGrad (Quinton & Rey 2024): mean of the task gradients projected onto the dual cone.

    Unconflicting Projection of Gradients.

    Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization", 2024, Sec. 5 (Eq. (5)) and Proposition 1:
    ``update = (1/T) Σ_i π_J(g_i)`` where ``π_J`` is the projection onto the dual cone ``{x : J x ≥ 0}``; by
    Proposition 1, ``π_J(Jᵀ u) = Jᵀ v`` with ``v = argmin vᵀGv s.t. v ≥ u``, so the method is Gramian-based.
    Each projection has a non-negative inner product with every row, hence so does their mean: the update never
    conflicts with any task (up to round-off). Without conflict (``G ≥ 0`` entrywise) it equals the mean.

    Scale: the **mean** of the projections, as in the paper and torchjd (reference scale kept).

    Solver (difference from torchjd): torchjd solves the QPs with quadprog on ``G / tr(G) + reg_eps·I`` (default
    ``reg_eps = 1e-4``, which can leave small conflicts); we solve each as a non-negative least-squares problem on
    the trace-normalised Gramian, certified by its KKT conditions (:func:`~mtlkit.aggregation._solvers.nnls_certified`;
    relative residual ≤ 1e-9), which needs no regularisation, so ``reg_eps`` defaults to 0 (kept as an option for
    parity). The answer is therefore permutation-equivariant and never conflicts with a task, also on rank-deficient
    Gramians. The update does not depend on the scale of J (``update(s·J) = s·update(J)`` for ``s > 0``): tiny
    gradients get the same direction as large ones. ``norm_eps`` (default 0): if ``tr(G) <= norm_eps`` the Gramian is
    treated as zero and the weights are the mean's (``1/T``), as torchjd's normalise-then-regularise gives; with the
    default this happens only for ``J = 0``. (Before mtlkit 0.2 the default was an absolute ``1e-4`` that returned a
    zero update, which stalled training whenever ``||J||_F² <= 1e-4``.)

    Example:
        >>> import torch
        >>> UPGrad()(torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]]))
        tensor([0.2924, 1.9006, 1.9006])
        >>> UPGrad(reg_eps=1e-4)(torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]]))  # torchjd's default and output
        tensor([0.2929, 1.9004, 1.9004])
    """

    gramian_based = True
    scale = "mean"

    def __init__(self, norm_eps: float = 0.0, reg_eps: float = 0.0) -> None:
        self.norm_eps = check_nonneg("norm_eps", norm_eps)
        self.reg_eps = check_nonneg("reg_eps", reg_eps)

    def weights_from_gramian(self, G: Tensor) -> Tensor:
        T = G.shape[0]
        V = dual_cone_on_gramian(G, np.eye(T) / T, self.norm_eps, self.reg_eps)
        return to_weights(V.sum(axis=0), G)
