"""PCGrad: project each task gradient off the normal planes of the conflicting ones."""

from __future__ import annotations

import numpy as np

from mtlkit._registry import METHODS
from mtlkit.aggregation._random import PairwiseSurgery, row_products


@METHODS.register("pcgrad")
class PCGrad(PairwiseSurgery):
    """PCGrad (Yu et al. 2020): gradient surgery, random projection order from a seeded generator.

    Projecting Conflicting Gradients.

    Yu et al., "Gradient Surgery for Multi-Task Learning", NeurIPS 2020, Algorithm 1: for each task i, work on
    a copy ``g_i'``; for every other task j in random order, if ``⟨g_i', g_j⟩ < 0`` set
    ``g_i' ← g_i' - ⟨g_i', g_j⟩ / ||g_j||² · g_j`` (projection against the *original* ``g_j``, as in the paper and
    LibMTL). The update is ``Σ_i g_i'`` (the paper's sum; sum scale). Non-conflicting gradients are left unchanged.

    Random order: one ``randperm`` per task from a ``torch.Generator`` seeded with ``seed`` (state in
    ``state_dict``). Because of it the output depends on the task order for T > 2 (``permutation_equivariant`` is
    False); for T = 2 it does not. Computed on the Gramian (see ``PairwiseSurgery``): ``modified_gradients(J)``
    returns the ``g_i'``.

    Args:
        seed: seed of the generator of the projection order.

    Example:
        >>> import torch
        >>> PCGrad()(torch.tensor([[1.0, 0.0], [-1.0, 1.0]]))
        tensor([0.5000, 1.5000])
    """

    scale = "sum"

    def _edit(self, C: np.ndarray, j: np.ndarray, G: np.ndarray) -> None:
        dot, _, nj2 = row_products(C, j, G)  # ⟨g_i', g_j⟩, ||g_j||²
        i = np.flatnonzero((dot < 0) & (nj2 > 0))
        C[i, j[i]] -= dot[i] / nj2[i]
