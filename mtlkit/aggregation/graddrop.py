"""GradDrop: keep, coordinate by coordinate, only the gradients of one randomly chosen sign."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import Tensor

from mtlkit._registry import METHODS
from mtlkit.aggregation._base import Aggregator
from mtlkit.aggregation._random import SeededAggregator
from mtlkit.errors import ConfigError


@METHODS.register("graddrop")
class GradDrop(SeededAggregator):
    """GradDrop (Chen et al. 2020) at the shared representation (override with level=...).

    Gradient Sign Dropout.

    Chen et al., "Just Pick a Sign: Optimizing Deep Multitask Models with Gradient Sign Dropout", NeurIPS 2020,
    Algorithm 1 (lines 10-15, as cited by torchjd): per coordinate, the positive sign purity
    ``P = ½ (1 + Σ_t g_t / Σ_t |g_t|)``; draw ``U ~ Uniform(0, 1)``; keep ``g_t`` where ``P > U`` and ``g_t > 0``, or
    ``P < U`` and ``g_t < 0``; with leak ``ℓ_t`` the update is ``Σ_t (ℓ_t + (1 - ℓ_t) M_t) ⊙ g_t`` (sum scale;
    ``leak=1`` gives the plain sum).

    The input-sign factor: the paper (and LibMTL) compute the purity from ``Σ_batch sign(A) ⊙ ∇_A L`` at an activation
    layer ``A``. This aggregator has no access to activations: it acts on the rows it is given. Registered as
    ``graddrop`` it therefore defaults to ``level="representation"`` (rows = gradients w.r.t. the shared
    representation, each coordinate one (sample, feature) pair), which is the paper's placement minus the
    input-sign/batch-sum factor; at parameter level it drops per parameter coordinate (torchjd's choice).
    ``Σ|g| = 0`` coordinates get ``P = ½`` (LibMTL adds 1e-7 to the denominator, which gives the same).

    ``U`` comes from a seeded CPU generator (state in ``state_dict``), so a seed reproduces the output on any device.
    Since ``P`` and the masks are symmetric in the tasks, permuting the rows with the same generator state permutes
    nothing in the output: the method is permutation-equivariant given the seed.

    Batches where some tasks have no labelled sample (:meth:`~mtlkit.aggregation.Aggregator.restricted`): the
    purity and masks are those of the present tasks' rows; per-task leaks are the present tasks' ones; ``U`` is
    drawn from the same generator (the only state).

    Args:
        leak: one number in [0, 1] for all tasks, or one per task.
        seed: seed of the generator of ``U``.

    Example:
        >>> import torch
        >>> GradDrop()(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))  # no sign conflict: nothing is dropped
        tensor([4., 6.])
    """

    scale = "sum"
    default_level = "representation"

    def __init__(self, leak: float | Sequence[float] = 0.0, seed: int = 0) -> None:
        super().__init__(seed)
        try:
            lk = torch.as_tensor(leak, dtype=torch.float64)
        except (TypeError, ValueError):
            raise ConfigError(f"leak must be a number or a list of numbers in [0, 1], got {leak!r}") from None
        if lk.dim() > 1 or not bool(((lk >= 0) & (lk <= 1)).all()):
            raise ConfigError(f"leak must be a number or a list of numbers in [0, 1], got {leak!r}")
        self.leak = leak
        self._leak = lk

    def _restricted(self, present: Tensor) -> Aggregator:
        if self._leak.dim() == 0:
            return self
        if self._leak.numel() != present.numel():
            raise ValueError(f"GradDrop has {self._leak.numel()} leak values but present has {present.numel()}")
        sub = copy.copy(self)  # shares the generator: its draws advance this one's
        sub._leak = self._leak[present]
        sub.leak = sub._leak.tolist()
        return sub

    def aggregate(self, J: Tensor) -> Tensor:
        T = J.shape[0]
        if self._leak.dim() == 1 and self._leak.numel() != T:
            raise ValueError(f"GradDrop has {self._leak.numel()} leak values but got {T} task gradients")
        leak = self._leak.to(dtype=J.dtype, device=J.device).expand(T).unsqueeze(1)
        denom = J.abs().sum(dim=0)
        P = 0.5 * (
            1.0
            + torch.where(denom > 0, J.sum(dim=0) / denom.clamp_min(torch.finfo(J.dtype).tiny), torch.zeros_like(denom))
        )
        U = self._uniform((J.shape[1],), J)
        M = (P > U) & (J > 0) | (P < U) & (J < 0)
        return ((leak + (1.0 - leak) * M.to(J.dtype)) * J).sum(dim=0)
