"""Aligned-MTL: align the principal components of the task gradients and rescale by the smallest one."""
from __future__ import annotations

import numpy as np
from torch import Tensor

from mtlkit.aggregation._base import Aggregator
from mtlkit.aggregation._solvers import eigh, to_numpy, to_weights
from mtlkit.methods import Method, register
from mtlkit.weighting._base import EW


class AlignedMTL(Aggregator):
    """Aligned-MTL (independent component alignment).

    Senushkin et al., "Independent Component Alignment for Multi-Task Learning", CVPR 2023, Algorithm 1:
    eigendecompose ``G = V Λ Vᵀ``; keep the ``r`` eigenvalues above ``max(Λ) · T · eps`` (rank); the balance
    transformation ``B = √λ_min · V_r Λ_r^{-1/2} V_rᵀ`` makes the stable rank of the aligned gradients ``Ĝ = Bᵀ J``
    equal to 1 (all singular values set to the smallest, ``σ_min = √λ_min``); the update is ``Ĝᵀ w = Jᵀ B w``.
    Gramian-based; ``G = 0`` gives zero weights (rank 0, torchjd returns the identity; both give a zero update).

    Scale: ``w = 1`` (task weights all one), i.e. **sum scale**, as LibMTL's ``alpha = B.sum(0)`` and the official
    code with unit task weights. torchjd uses ``w = 1/T`` (mean). With orthogonal gradients of equal norm this is
    exactly the sum. Only the paper's default scaling (smallest singular value) is implemented.

    Eigen-tolerance: computed in float64 (``eps`` of float64), whereas LibMTL/torchjd use the float32 ``eps``;
    rows that are numerically dependent in float32 may therefore count as independent here.

    Example:
        >>> import torch
        >>> AlignedMTL()(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
        tensor([1., 1.])
    """

    gramian_based = True

    def weights_from_gramian(self, G: Tensor) -> Tensor:
        A = to_numpy(G)
        T = A.shape[0]
        lam, V = eigh(A)
        if lam.max() <= 0:
            return to_weights(np.zeros(T), G)
        tol = lam.max() * T * np.finfo(np.float64).eps
        keep = lam > tol
        lam, V = lam[keep], V[:, keep]
        B = np.sqrt(lam.min()) * (V / np.sqrt(lam)) @ V.T
        return to_weights(B @ np.ones(T), G)


@register("aligned_mtl")
def _aligned_mtl() -> Method:
    """Aligned-MTL (Senushkin et al. 2023): gradients aligned to a common smallest singular value."""
    return Method(EW(), AlignedMTL())
