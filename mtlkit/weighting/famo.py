"""FAMO: Fast Adaptive Multitask Optimization.

Liu, Liang, Chen, Stone & Liu, "FAMO: Fast adaptive multitask optimization", NeurIPS 2023, Algorithm 1 (Eq. 4-7),
following the official implementation (github.com/Cranial-XIX/FAMO, ``famo.py`` and ``methods/weight_methods.py``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from mtlkit._registry import METHODS
from mtlkit.errors import ConfigError
from mtlkit.weighting._base import StepContext, Weighting, _check_losses
from mtlkit.weighting._optim import adam_step


@METHODS.register("famo")
class FAMO(Weighting):
    r"""FAMO (Liu et al. 2023): softmax task logits updated after each step from the losses' log-decrease.

    FAMO: task logits ξ, weights ``z = softmax(ξ)``, updated so that all losses decrease at the same log-rate.

    Per step (Algorithm 1; ``m`` = ``min_losses``, ``ε = 1e-8``):

    * forward: ``D_t = L_t − m_t + ε``, ``c = Σ_t z_t/D_t`` (detached), weighted loss of task t
      ``(z_t/c)·log D_t``: its gradient is ``Σ_t z_t/(c·D_t)·∇L_t``, the paper's update direction (Eq. 5);
    * after the optimiser step, with the same batch's new losses (``after_step``):
      ``δ_t = log D_t(before) − log D_t(after)``, ``∂/∂ξ = J_softmax(ξ)ᵀ δ``, one Adam step on ξ with learning
      rate ``lr`` and (L2) weight decay ``weight_decay`` (the paper's γ regulariser, Eq. 7).

    So a task whose loss decreased *less* than the others gets a larger weight at the next step.

    Choices: exactly the official code's update (``torch.optim.Adam`` on ξ; our :func:`adam_step` reproduces it on
    buffers so checkpoints resume exactly). Defaults ``lr = 0.025`` and ``weight_decay = 1e-5`` are those of the
    official ``methods/weight_methods.py`` (the standalone ``famo.py`` uses 0.01, LibMTL 1e-3: the paper tunes γ
    per benchmark). ``min_losses`` defaults to 0, as there. The official code also clips the shared gradient norm
    to ``max_norm = 1``; that is the trainer's business (gradient clipping), not the weighting's.

    The trainer must call ``after_step(new_losses)`` after every optimiser step (``needs_loss_after_step`` is True),
    with the losses of the same batch recomputed under ``torch.no_grad()``. Nothing goes to the optimiser.

    Example:
        >>> import torch
        >>> famo = FAMO(lr=0.025)
        >>> _ = famo(torch.tensor([1.0, 1.0], requires_grad=True))
        >>> famo.after_step(torch.tensor([0.5, 0.9]))  # task 1 improved less
        >>> famo.weights()
        tensor([0.4875, 0.5125])
    """

    needs_loss_after_step = True

    logits: Tensor
    min_losses: Tensor
    prev_losses: Tensor
    has_prev: Tensor
    exp_avg: Tensor
    exp_avg_sq: Tensor
    step: Tensor

    def __init__(
        self,
        lr: float = 0.025,
        weight_decay: float = 1e-5,
        min_losses: Sequence[float] | Tensor | None = None,
        eps: float = 1e-8,
        betas: tuple[float, float] = (0.9, 0.999),
    ) -> None:
        super().__init__()
        if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
            raise ConfigError(f"FAMO lr must be a positive finite number, got {lr!r}")
        if not (isinstance(weight_decay, (int, float)) and math.isfinite(weight_decay) and weight_decay >= 0):
            raise ConfigError(f"FAMO weight_decay must be a finite number >= 0, got {weight_decay!r}")
        self.lr, self.weight_decay, self.eps = float(lr), float(weight_decay), float(eps)
        self.betas = (float(betas[0]), float(betas[1]))
        self._min = None if min_losses is None else torch.as_tensor(min_losses, dtype=torch.float32).flatten()

    def _build(self, num_tasks: int) -> None:
        if self._min is not None and self._min.numel() != num_tasks:
            raise ConfigError(f"FAMO got {self._min.numel()} min_losses but T={num_tasks} tasks")
        self.register_buffer("logits", torch.zeros(num_tasks))
        self.register_buffer("min_losses", self._min.clone() if self._min is not None else torch.zeros(num_tasks))
        self.register_buffer("prev_losses", torch.zeros(num_tasks))
        self.register_buffer("has_prev", torch.zeros((), dtype=torch.bool))
        self.register_buffer("exp_avg", torch.zeros(num_tasks))
        self.register_buffer("exp_avg_sq", torch.zeros(num_tasks))
        self.register_buffer("step", torch.zeros(()))

    def weights(self) -> Tensor | None:
        return None if self.num_tasks is None else torch.softmax(self.logits, dim=0)

    def forward(self, losses: Tensor, ctx: StepContext | None = None) -> Tensor:
        self._prepare(losses)
        z = torch.softmax(self.logits, dim=0).to(device=losses.device, dtype=losses.dtype)
        D = losses - self.min_losses.to(losses) + self.eps
        if bool((D.detach() <= 0).any()):
            raise ValueError(
                f"FAMO needs losses above min_losses, got {losses.detach().tolist()} vs {self.min_losses.tolist()}"
            )
        c = (z / D).sum().detach()
        if self._updating():
            self.prev_losses.copy_(losses.detach())
            self.has_prev.fill_(True)
        return z / c * torch.log(D)

    @torch.no_grad()
    def after_step(self, new_losses: Tensor) -> None:
        new_losses = torch.as_tensor(new_losses)
        _check_losses(new_losses)
        self._prepare(new_losses)
        if not bool(self.has_prev):
            raise RuntimeError("FAMO.after_step was called before any training forward (no previous losses)")
        m = self.min_losses
        delta = torch.log(self.prev_losses - m + self.eps) - torch.log(new_losses.detach().to(m) - m + self.eps)
        z = torch.softmax(self.logits, dim=0)
        grad = z * (delta - (z * delta).sum())  # J_softmax(ξ)ᵀ δ (softmax's Jacobian is symmetric)
        adam_step(
            self.logits, grad, self.exp_avg, self.exp_avg_sq, self.step, self.lr, self.betas, 1e-8, self.weight_decay
        )
        self.has_prev.fill_(False)
