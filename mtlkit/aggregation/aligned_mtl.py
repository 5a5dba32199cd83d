"""Aligned-MTL: align the principal components of the task gradients and rescale by the smallest one."""

from __future__ import annotations

import numpy as np
from torch import Tensor

from mtlkit._registry import METHODS
from mtlkit.aggregation._base import Aggregator
from mtlkit.aggregation._solvers import eigh, rank_cutoff, to_numpy, to_weights


@METHODS.register("aligned_mtl")
class AlignedMTL(Aggregator):
    """Aligned-MTL (Senushkin et al. 2023): gradients aligned to a common smallest singular value.

    Aligned-MTL (independent component alignment).

    Senushkin et al., "Independent Component Alignment for Multi-Task Learning", CVPR 2023,
    doi:10.48550/arXiv.2305.19000, Algorithm 1: eigendecompose ``G = V Λ Vᵀ``; keep the ``r`` eigenvalues above a
    round-off cut (the rank ``r``; see "Rank cut-off" below); the balance
    transformation ``B = √λ_min · V_r Λ_r^{-1/2} V_rᵀ`` makes the stable rank of the aligned gradients ``Ĝ = Bᵀ J``
    equal to 1 (all singular values set to the smallest, ``σ_min = √λ_min``); the update is ``Ĝᵀ w = Jᵀ B w``.
    Gramian-based; ``G = 0`` gives zero weights (rank 0, torchjd returns the identity; both give a zero update).

    Scale: ``w = 1`` (task weights all one), i.e. **sum scale**, as LibMTL's ``alpha = B.sum(0)`` and the official
    code with unit task weights. torchjd uses ``w = 1/T`` (mean). With orthogonal gradients of equal norm this is
    exactly the sum. Only the paper's default scaling (smallest singular value) is implemented.

    Rank cut-off (:func:`~mtlkit.aggregation._solvers.rank_cutoff`): eigenvalues up to ``2 · (eps · tr(G) + T ·
    eps64 · max(Λ))`` are dropped, ``eps`` being that of the dtype G was computed in; the eigenproblem itself is
    solved in float64. An exactly duplicated or dependent task leaves an eigenvalue of round-off size (up to about
    ``eps · tr(G)``, either sign) whose exact value is 0, so the right answer for such a Jacobian is the formula on
    its exact rank-r spectrum. (The former cut, ``T · eps64 · max(Λ)`` whatever the dtype, kept those of float32
    Gramians: the update shrank by ``√(round-off / max(Λ))``, 1e-4 to 1e-6, or was garbage.) Genuine eigenvalues
    above the cut are kept and resolved in float64, so ill-conditioned full-rank float32 inputs come out more
    accurately than in LibMTL and torchjd, which solve the eigenproblem in float32 and cut at ``T · eps32 · max(Λ)``
    (torchjd also for float64 inputs, dropping genuine eigenvalues there). By design of the method the update jumps
    at the cut: a near-duplicate whose small eigenvalue is close to ``2 · eps · tr(G)`` may land on either side.

    Example:
        >>> import torch
        >>> torch.allclose(AlignedMTL()(torch.tensor([[1.0, 0.0], [0.0, 2.0]])), torch.ones(2))  # σ_min · V Uᵀ 1
        True
    """

    gramian_based = True
    scale = "sum"

    def weights_from_gramian(self, G: Tensor) -> Tensor:
        A = to_numpy(G)
        T = A.shape[0]
        lam, V = eigh(A)
        if lam.max() <= 0:
            return to_weights(np.zeros(T), G)
        keep = lam > rank_cutoff(lam, G.dtype)
        keep[-1] = True  # max(Λ) > 0 is never round-off (the cut can exceed it only in half precision at large T)
        lam, V = lam[keep], V[:, keep]
        B = np.sqrt(lam.min()) * (V / np.sqrt(lam)) @ V.T
        return to_weights(B @ np.ones(T), G)
