"""DB-MTL: dual-balancing multi-task learning.

Lin, Ye, Xu, Shi & Zhang, "Dual-balancing for multi-task learning", arXiv:2308.12029 (2023): loss-scale balancing
by the log transform (Sec. 3.1, Eq. 2) and gradient-magnitude balancing (Sec. 3.2, Eq. 3-4; Algorithm 1).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from mtlkit.aggregation._base import Aggregator, Restricted, restricted_view
from mtlkit.errors import ConfigError
from mtlkit.weighting._base import StepContext, Weighting


class LogLoss(Weighting):
    r"""Loss-scale balancing: each task's loss becomes ``log(L_t + ε)`` (DB-MTL Eq. 2).

    ``∇ log L_t = ∇L_t / L_t``: every task's gradient is divided by its own loss, which removes the loss scale.
    ``ε = 1e-8`` as in LibMTL guards against a zero loss. Losses must be >= 0.

    Example:
        >>> import torch
        >>> out = LogLoss()(torch.tensor([1.0, math.e]))  # log 1 = 0, log e = 1 up to float32 rounding (per CPU)
        >>> torch.allclose(out, torch.tensor([0.0, 1.0]))
        True
    """

    def __init__(self, eps: float = 1e-8) -> None:
        super().__init__()
        if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0):
            raise ConfigError(f"eps must be a finite number >= 0, got {eps!r}")
        self.eps = float(eps)

    def forward(self, losses: Tensor, ctx: StepContext | None = None) -> Tensor:
        self._prepare(losses)
        if bool((losses.detach() < 0).any()):
            raise ValueError(f"LogLoss needs non-negative losses, got {losses.detach().tolist()}")
        return torch.log(losses + self.eps)


class DBMTLAggregator(Aggregator):
    r"""DB-MTL gradient-magnitude balancing: EMA of each task's gradient, every one rescaled to the largest norm.

    With ``g_t`` the gradient of task t's (log-transformed) loss at step k (Algorithm 1):

    * ``ĝ_t ← β_k·ĝ_t + (1 − β_k)·g_t`` with ``β_k = β / k^{σ}`` (``beta``, ``beta_sigma``), ``ĝ_t = 0`` before
      the first step (no bias correction, as in the paper and LibMTL);
    * ``α_t = max_s ||ĝ_s|| / ||ĝ_t||`` (Eq. 4) and the update is ``Σ_t α_t ĝ_t``: every task contributes a vector
      of the same norm, the largest one (so the update stays on EW's scale).

    Defaults ``beta = 0.9``, ``beta_sigma = 0`` are LibMTL's. The EMA state (``grad_buffer``, ``step``) is in
    ``state_dict``. Use at parameter level only: at representation level the gradient rows refer to different
    samples at every step and an EMA over them is meaningless (LibMTL refuses it too); a change of the number of
    columns between steps raises.

    Example:
        >>> import torch
        >>> agg = DBMTLAggregator(beta=0.0)
        >>> agg(torch.tensor([[3.0, 0.0], [0.0, 1.0]]))  # both scaled to norm 3
        tensor([3., 3.])
    """

    scale = "sum"

    def __init__(self, beta: float = 0.9, beta_sigma: float = 0.0, eps: float = 1e-8) -> None:
        if not (isinstance(beta, (int, float)) and 0 <= beta < 1):
            raise ConfigError(f"beta must be in [0, 1), got {beta!r}")
        if not (isinstance(beta_sigma, (int, float)) and math.isfinite(beta_sigma) and beta_sigma >= 0):
            raise ConfigError(f"beta_sigma must be a finite number >= 0, got {beta_sigma!r}")
        self.beta, self.beta_sigma, self.eps = float(beta), float(beta_sigma), float(eps)
        self._buffer: Tensor | None = None
        self._step = 0
        self.last_scales: Tensor | None = None

    def aggregate(self, J: Tensor) -> Tensor:
        if self._buffer is not None and self._buffer.shape != J.shape:
            raise ValueError(
                f"DB-MTL keeps an EMA of per-task gradients of shape {tuple(self._buffer.shape)} but "
                f"got {tuple(J.shape)}: the tasks or shared parameters changed (or level is "
                f"'representation', which DB-MTL does not support)"
            )
        self._step += 1
        buf = self._buffer.to(J) if self._buffer is not None else torch.zeros_like(J)
        b = self.beta / self._step**self.beta_sigma
        buf = J.detach() + b * (buf - J.detach())
        self._buffer = buf
        norms = buf.norm(dim=1)
        scales = norms.max() / (norms + self.eps)
        self.last_scales = scales
        return (scales.unsqueeze(1) * buf).sum(dim=0)

    def _restricted(self, present: Tensor) -> Restricted:
        """A batch with absent tasks (partial labels): only the present tasks' EMA gradients are updated and
        rescaled; an absent task's ĝ stays as it was (0 before its first labelled batch)."""
        T = int(present.numel())
        if self._buffer is not None and self._buffer.shape[0] != T:
            raise ValueError(f"DB-MTL keeps {self._buffer.shape[0]} tasks' gradients but present has {T} entries")
        idx = present.nonzero().flatten()

        def load(sub: DBMTLAggregator) -> None:
            sub._buffer = None if self._buffer is None else self._buffer[idx.to(self._buffer.device)].clone()

        def store(sub: DBMTLAggregator) -> None:
            assert sub._buffer is not None
            if self._buffer is None:  # ĝ = 0 before a task's first step, as at the start
                self._buffer = torch.zeros(T, sub._buffer.shape[1], dtype=sub._buffer.dtype, device=sub._buffer.device)
            self._buffer[idx.to(self._buffer.device)] = sub._buffer
            self._step, self.last_scales = sub._step, sub.last_scales

        return restricted_view(self, present, load, store)

    def state_dict(self) -> dict[str, Any]:
        return {"grad_buffer": None if self._buffer is None else self._buffer.clone(), "step": self._step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state) != {"grad_buffer", "step"}:
            raise ValueError(f"DBMTLAggregator state needs keys grad_buffer, step; got {sorted(state)}")
        buf = state["grad_buffer"]
        self._buffer = None if buf is None else buf.clone()
        self._step = int(state["step"])
