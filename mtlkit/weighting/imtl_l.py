"""IMTL-L: the loss-balance half of Impartial Multi-Task Learning.

Liu, Li, Kuang, Xue, Chen, Yang, Liao & Zhang, "Towards impartial multi-task learning", ICLR 2021, Sec. 3.2 (Eq. 2
and the scale-invariant loss ``e^{s_t} L_t - s_t``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mtlkit._registry import METHODS
from mtlkit.weighting._base import StepContext, Weighting


@METHODS.register("imtl_l")
class IMTLL(Weighting):
    r"""IMTL-L (Liu et al. 2021): learnable scale-invariant loss e^s·L − s.

    IMTL-L: each task's loss becomes ``e^{s_t}·L_t − s_t`` with a learnable scale ``s_t`` (initially 0).

    Minimising over ``s_t`` gives ``e^{s_t} L_t = 1``: every task's *scaled* loss is driven to the same value 1,
    whatever its raw scale (the paper's "impartial" loss balance). ``s`` is trained by the model's optimiser (the
    paper updates it by gradient descent with the network), so the trainer must call ``setup(T)`` and add
    ``parameters()`` to the optimiser. Only the loss part of IMTL is here; IMTL-G (gradient balance) is an
    aggregator.

    Example:
        >>> import torch
        >>> m = IMTLL(); m.setup(2)
        >>> with torch.no_grad():
        ...     _ = m.log_scale.copy_(torch.tensor([0.0, 1.0]))
        >>> m(torch.tensor([2.0, 1.0]))  # [e^0·2 − 0, e^1·1 − 1]
        tensor([2.0000, 1.7183], grad_fn=<SubBackward0>)
    """

    requires_setup = True

    def __init__(self, init_log_scale: float = 0.0) -> None:
        super().__init__()
        self.init_log_scale = float(init_log_scale)

    def _build(self, num_tasks: int) -> None:
        self.log_scale = nn.Parameter(torch.full((num_tasks,), self.init_log_scale))

    def forward(self, losses: Tensor, ctx: StepContext | None = None) -> Tensor:
        self._prepare(losses)
        s = self.log_scale.to(losses.dtype)
        return torch.exp(s) * losses - s

    def weights(self) -> Tensor | None:
        return None if self.num_tasks is None else torch.exp(self.log_scale).detach()
