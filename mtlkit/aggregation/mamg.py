"""MAMG: clip the larger of two interfering gradients along their interfering direction."""
from __future__ import annotations

import numpy as np

from mtlkit.aggregation._random import PairwiseSurgery, row_products
from mtlkit.methods import Method, register
from mtlkit.weighting._base import EW


class MAMG(PairwiseSurgery):
    """Model-Agnostic Mitigation of Gradient interference.

    Chai et al., "A Model-Agnostic Approach to Mitigate Gradient Interference for Multi-Task Learning", IEEE
    Transactions on Cybernetics 2022 (doi 10.1109/TCYB.2022.3223377). Only the abstract is public; the rule follows
    ``shared/papers/mamg-mitigate-gradient-interference.md`` (reconstructed from the abstract and the authors' code,
    whose released version has a sign slip that makes it a no-op). For each task i (copy ``g_i'``) and every other
    task j in random order, against the *original* ``g_j``:

        if ⟨g_i', g_j⟩ < 0:   u = (g_i' - g_j) / ||g_i' - g_j||           (the interfering direction)
                              δ = ⟨g_i' + g_j, u⟩ = (||g_i'||² - ||g_j||²) / ||g_i' - g_j||
                              g_i' ← g_i' - max(δ, 0) u                 (clip; only the larger gradient is cut)

    After a step with ``δ > 0``: ``(g_i' + g_j) ⟂ u``, ``||g_i'|| = ||g_j||``, and ``g_i'`` and ``g_j`` have equal
    projections on ``g_i' + g_j``; the norm of ``g_i'`` never grows; nothing changes when the norms are equal or
    when there is no conflict. ``max(δ, 0)`` is the spec's inferred choice (applying ``δ < 0`` would grow the smaller
    gradient and over-correct). The update is ``Σ_i g_i'`` (sum scale, as PCGrad).

    Random order from a seeded generator (state in ``state_dict``); output depends on the task order for T > 2.
    Computed on the Gramian (see ``PairwiseSurgery``): ``g_i' = Σ_k C_ik g_k``, ``δ`` and ``||g_i' - g_j||`` are
    read off ``C G Cᵀ``; ``modified_gradients(J)`` returns the ``g_i'``.

    Args:
        seed: seed of the generator of the order.

    Example:
        >>> import torch
        >>> MAMG()(torch.tensor([[3.0, 0.0], [-1.0, 1.0]]))  # g_1 is cut back to norm √2 = ||g_2||; g_2 is kept
        tensor([0.3529, 1.4118])
    """

    def _edit(self, C: np.ndarray, j: np.ndarray, G: np.ndarray) -> None:
        dot, ni2, nj2 = row_products(C, j, G)
        n2 = ni2 - 2.0 * dot + nj2                             # ||g_i' - g_j||²
        ok = (dot < 0) & (n2 > 0)                              # ⟨g_i', g_j⟩ < 0
        delta = np.where(ok, ni2 - nj2, 0.0) / np.sqrt(np.where(ok, n2, 1.0))  # (||g_i'||² - ||g_j||²)/||g_i' - g_j||
        i = np.flatnonzero(ok & (delta > 0))
        # g_i' ← g_i' - δ u,  u = (g_i' - g_j) / ||g_i' - g_j||
        step = delta[i] / np.sqrt(n2[i])
        C[i] *= (1.0 - step)[:, None]
        C[i, j[i]] += step


@register("mamg")
def _mamg(seed: int = 0) -> Method:
    """MAMG (Chai et al. 2022): interfering components clipped along g_i - g_j (spec in shared/papers)."""
    return Method(EW(), MAMG(seed=seed))
