"""Constant task weights (the "GS" baseline of MTVIB, Sec. VI: weights fixed during training, chosen by grid search).

``L = Σ_t w_t·L_t`` with user-given ``w``. The grid search itself (train one model per candidate weight vector,
keep the one with the best validation score) is done by the caller, e.g. :mod:`mtlkit.reproduce.mtvib`.

Example:
    >>> import torch
    >>> c = Constant([0.25, 0.75]); c(torch.tensor([2.0, 4.0]))
    tensor([0.5000, 3.0000])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from mtlkit._registry import METHODS
from mtlkit.errors import ConfigError
from mtlkit.weighting._base import StepContext, Weighting


@METHODS.register(
    "constant",
    zoo=False,
    zoo_reason="without weights it is EW; its weights are chosen per problem (a grid search, as MTVIB's GS baseline)",
)
class Constant(Weighting):
    """Constant task weights (one per task); MTVIB's GS baseline once they are grid-searched.

    Fixed weights ``w`` (one per task, finite and >= 0, not all zero); ``None`` = all ones."""

    def __init__(self, weights: Sequence[float] | None = None) -> None:
        super().__init__()
        self.register_buffer("task_weights", torch.zeros(0))
        if weights is None:
            return
        w = torch.as_tensor(list(weights), dtype=torch.float32)
        if (
            w.dim() != 1
            or w.numel() == 0
            or not bool(torch.isfinite(w).all())
            or bool((w < 0).any())
            or float(w.sum()) <= 0
        ):
            raise ConfigError(
                f"constant weights must be a non-empty list of finite numbers >= 0, not all 0; got {list(weights)}"
            )
        self.task_weights = w

    def _build(self, num_tasks: int) -> None:
        if self.task_weights.numel() == 0:
            self.task_weights = torch.ones(num_tasks)
        elif self.task_weights.numel() != num_tasks:
            raise ConfigError(f"Constant has {self.task_weights.numel()} weights but there are {num_tasks} tasks")

    def forward(self, losses: Tensor, ctx: StepContext | None = None) -> Tensor:
        self._prepare(losses)
        return self.task_weights.to(losses.dtype) * losses

    def weights(self) -> Tensor | None:
        return self.task_weights.detach().clone()
