"""GLS: the geometric loss strategy.

Chennupati, Sistu, Yogamani & Rawashdeh, "MultiNet++: Multi-stream feature aggregation and geometric loss strategy
for multi-task learning", CVPR Workshops 2019, Eq. 1: ``L_GLS = (Π_t L_t)^{1/T}``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mtlkit._registry import METHODS
from mtlkit.weighting._base import StepContext, Weighting


@METHODS.register("gls")
class GLS(Weighting):
    r"""Geometric loss strategy (Chennupati et al. 2019): the geometric mean of the task losses.

    Geometric-mean loss, written as per-task weighted losses with the same value and gradient.

    The GLS objective ``G = (Π_t L_t)^{1/T}`` couples all tasks, but a Weighting's entry t may depend on task t's
    loss only (so that gradient-space aggregators still see per-task gradients). Because
    ``∇G = Σ_t G/(T·L_t) · ∇L_t``, we return ``w_t·L_t`` with the *detached* weight ``w_t = G/(T·L_t)``:

    * ``Σ_t w_t L_t = G`` (same value), and
    * ``∇ Σ_t w_t L_t = ∇G`` (same gradient; checked by autograd in the tests).

    ``G`` is computed in log space (``exp(mean log L)``) so that products of many small or large losses do not
    under/overflow. Every loss must be strictly positive (the geometric mean of a zero loss has a zero, and of a
    negative loss no real, gradient): a non-positive loss raises ``ValueError``.

    Example:
        >>> import torch
        >>> out = GLS()(torch.tensor([1.0, 4.0]))  # weights G/(T·L) = [1, 0.25], G = exp(mean log L) = 2
        >>> torch.allclose(out, torch.ones(2)), round(float(out.sum()), 6)  # exp and log round: not exactly 1
        (True, 2.0)
    """

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("_last_weights", torch.zeros(0), persistent=False)

    def forward(self, losses: Tensor, ctx: StepContext | None = None) -> Tensor:
        self._prepare(losses)
        detached = losses.detach()
        if bool((detached <= 0).any()):
            raise ValueError(f"GLS needs strictly positive losses (geometric mean), got {detached.tolist()}")
        geo = torch.exp(torch.log(detached).mean())
        w = geo / (losses.shape[0] * detached)
        self._last_weights = w.clone()
        return w * losses

    def weights(self) -> Tensor | None:
        return self._last_weights.clone() if self._last_weights.numel() else None
