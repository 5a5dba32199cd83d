"""IMTL-G: the update whose projections on all unit task gradients are equal."""

from __future__ import annotations

import numpy as np
from torch import Tensor

from mtlkit._registry import METHODS
from mtlkit.aggregation._base import Aggregator
from mtlkit.aggregation._solvers import pinvh, to_numpy, to_weights


@METHODS.register("imtl_g")
class IMTLG(Aggregator):
    """IMTL-G (Liu et al. 2021): equal projections of the update on every unit task gradient.

    Impartial MTL, gradient balance (IMTL-G).

    Liu et al., "Towards Impartial Multi-task Learning", ICLR 2021 (OpenReview IMPnRXEWpvr; no DOI), the
    gradient-balance part (IMTL-G): find ``g = Σ_t α_t g_t`` with ``Σ_t α_t = 1`` whose projections on the unit
    gradients ``u_t = g_t / ||g_t||`` are all equal. In Gramian form, ``⟨g, u_t⟩ = (G α)_t / √G_tt = const``
    gives ``α ∝ G⁻¹ d`` with ``d = √diag(G)``, normalised to sum 1. This is the paper's closed form (their
    ``α_{2:T} = g_1 Uᵀ (D Uᵀ)⁻¹``) written without the arbitrary choice of task 1 as reference, hence visibly
    permutation-equivariant. As in torchjd, the pseudo-inverse is used so that linearly dependent gradients do not
    fail, and all-zero weights are returned when ``Σ G⁺ d`` vanishes. Its cut-off
    (:func:`~mtlkit.aggregation._solvers.rank_cutoff`) follows the dtype G was computed in: an exactly duplicated or
    dependent task leaves a round-off eigenvalue (~``eps · tr(G)``) that must not be inverted, and the right answer
    is ``G⁺ d`` on the exact rank-r spectrum; with duplicated tasks that is the deduplicated Jacobian's update (the
    duplicates share its weight). A cut at float64's eps inverted the round-off of float32 Gramians (garbage
    weights); torchjd's ``pinv`` cuts at ``T · eps · max λ`` of the input dtype.

    Scale: ``Σ α = 1`` as in the paper (a mean-like scale, not the sum). Weights may be negative. Only the gradient
    part (IMTL-G) is implemented; the loss part (IMTL-L) is a weighting.

    Example:
        >>> import torch
        >>> IMTLG()(torch.tensor([[1.0, 0.0], [0.0, 3.0]]))
        tensor([0.7500, 0.7500])
    """

    gramian_based = True
    scale = "affine"

    def weights_from_gramian(self, G: Tensor) -> Tensor:
        A = to_numpy(G)
        d = np.sqrt(np.clip(np.diag(A), 0.0, None))
        v = pinvh(A, G.dtype) @ d
        s = v.sum()
        w = np.zeros_like(v) if abs(s) < 1e-12 * max(1.0, np.abs(v).max()) else v / s
        return to_weights(w, G)
