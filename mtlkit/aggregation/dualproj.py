"""DualProj: project the mean gradient onto the dual cone of the task gradients."""

from __future__ import annotations

import numpy as np
from torch import Tensor

from mtlkit._registry import METHODS
from mtlkit.aggregation._base import Aggregator
from mtlkit.aggregation._solvers import check_nonneg, dual_cone_on_gramian, to_weights


@METHODS.register("dualproj")
class DualProj(Aggregator):
    """DualProj (torchjd): the mean gradient projected onto the dual cone of the task gradients.

    Projection of the mean gradient onto the dual cone ``{x : J x ≥ 0}`` of the task gradients.

    The rule of GEM (Lopez-Paz & Ranzato, "Gradient Episodic Memory for Continual Learning", NeurIPS 2017, Eq.
    (10)-(11)) applied to the mean of the task gradients, as torchjd's ``DualProj`` (Quinton & Rey 2024). By their
    Proposition 1 the projection of ``Jᵀ u`` is ``Jᵀ v`` with ``v = argmin vᵀGv s.t. v ≥ u`` (Gramian-based), solved
    here as a KKT-certified non-negative least-squares problem (torchjd: quadprog with ``reg_eps = 1e-4``; ours
    defaults to 0; ``norm_eps`` and the scale invariance as in :class:`~mtlkit.aggregation.UPGrad`). The update has a non-negative inner product with every task gradient and
    equals the mean when the mean already has one.

    Scale: the **mean**, as torchjd (so that DualProj and UPGrad agree with the mean when there is no conflict).

    Example:
        >>> import torch
        >>> J = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
        >>> DualProj()(J)
        tensor([0.5556, 1.1111, 1.1111])
        >>> DualProj(reg_eps=1e-4)(J)  # torchjd's default and output: a small conflict with row 0 remains
        tensor([0.5563, 1.1109, 1.1109])
        >>> (J @ DualProj(reg_eps=1e-4)(J))[0] < 0
        tensor(True)
    """

    gramian_based = True
    scale = "mean"

    def __init__(self, norm_eps: float = 0.0, reg_eps: float = 0.0) -> None:
        self.norm_eps = check_nonneg("norm_eps", norm_eps)
        self.reg_eps = check_nonneg("reg_eps", reg_eps)

    def weights_from_gramian(self, G: Tensor) -> Tensor:
        T = G.shape[0]
        return to_weights(dual_cone_on_gramian(G, np.full((1, T), 1.0 / T), self.norm_eps, self.reg_eps)[0], G)
