"""PCGrad: project each task gradient off the normal planes of the conflicting ones."""
from __future__ import annotations

from torch import Tensor

from mtlkit.aggregation._base import _check_matrix
from mtlkit.aggregation._random import SeededAggregator
from mtlkit.methods import Method, register
from mtlkit.weighting._base import EW


class PCGrad(SeededAggregator):
    """Projecting Conflicting Gradients.

    Yu et al., "Gradient Surgery for Multi-Task Learning", NeurIPS 2020, Algorithm 1 / Eq. (1): for each task i, work on
    a copy ``g_i'``; for every other task j in random order, if ``⟨g_i', g_j⟩ < 0`` set
    ``g_i' ← g_i' - ⟨g_i', g_j⟩ / ||g_j||² · g_j`` (projection against the *original* ``g_j``, as in the paper and
    LibMTL). The update is ``Σ_i g_i'`` (the paper's sum; sum scale). Non-conflicting gradients are left unchanged.

    Random order: one ``randperm`` per task from a ``torch.Generator`` seeded with ``seed`` (state in
    ``state_dict``). Because of it the output depends on the task order for T > 2 (``permutation_equivariant`` is
    False); for T = 2 it does not.

    Args:
        seed: seed of the generator of the projection order.

    Example:
        >>> import torch
        >>> PCGrad()(torch.tensor([[1.0, 0.0], [-1.0, 1.0]]))
        tensor([0.5000, 1.5000])
    """

    permutation_equivariant = False

    def aggregate(self, J: Tensor) -> Tensor:
        return self.modified_gradients(J).sum(dim=0)

    def modified_gradients(self, J: Tensor) -> Tensor:
        """The T x P matrix of modified gradients ``g_i'`` (the update is their sum). Advances the generator."""
        _check_matrix(J)
        T = J.shape[0]
        out = J.clone()
        sq = (J * J).sum(dim=1)
        for i in range(T):
            gi = out[i]
            for j in self._other_tasks_in_random_order(i, T):
                dot = gi @ J[j]
                if dot < 0 and sq[j] > 0:
                    gi -= (dot / sq[j]) * J[j]
        return out


@register("pcgrad")
def _pcgrad(seed: int = 0) -> Method:
    """PCGrad (Yu et al. 2020): gradient surgery, random projection order from a seeded generator."""
    return Method(EW(), PCGrad(seed=seed))
