"""Gradient reversal layer (GRL) and the DANN coefficient schedule.

Ganin & Lempitsky, "Unsupervised Domain Adaptation by Backpropagation", Proceedings of the 32nd International
Conference on Machine Learning (ICML 2015), PMLR 37, 1180–1189 (no DOI; preprint arXiv:1409.7495,
doi:10.48550/arXiv.1409.7495) (DANN): the GRL ``R_λ`` is the identity in the forward pass and multiplies the
incoming gradient by ``−λ`` in the backward pass (``R(x) = x``, ``dR/dx = −λ I``). The adaptation coefficient follows
their experiments' schedule ``λ(p) = 2 / (1 + exp(−γ p)) − 1`` with ``γ = 10`` and ``p`` the training progress in
[0, 1] (``λ(0) = 0``, ``λ(1) = 2/(1+e^{−10}) − 1 ≈ 0.99991``). RRMTDL (Fang et al., "Adversarial Learning Guided Task
Relatedness Refinement for Multi-Task Deep Learning", IEEE Transactions on Multimedia 25 (2023) 6946–6957,
doi:10.1109/TMM.2022.3216460) uses both for its adversarial heads.

``λ = 0`` is exact: the backward pass returns zeros (not ``−0 · grad``, which would be NaN where ``grad`` is infinite),
so a ``λ = 0`` control sends no gradient at all through the layer while the graph (and every gradient that does not
cross it) stays as it is.

Example:
    >>> import torch
    >>> x = torch.ones(3, requires_grad=True)
    >>> grad_reverse(x, 0.5).sum().backward()
    >>> x.grad.tolist()
    [-0.5, -0.5, -0.5]
    >>> dann_lambda(0.0), round(dann_lambda(1.0), 4)
    (0.0, 0.9999)
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from mtlkit.errors import ConfigError

__all__ = ["GradientReversal", "dann_lambda", "grad_reverse"]


class _GradReverse(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by ``−λ`` (no gradient w.r.t. ``λ``)."""

    @staticmethod
    def forward(ctx, x: Tensor, lam: float) -> Tensor:
        ctx.lam = lam
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        if ctx.lam == 0.0:  # exactly zero, whatever the incoming gradient holds
            return torch.zeros_like(grad), None
        return grad.neg() * ctx.lam, None


def grad_reverse(x: Tensor, lam: float = 1.0) -> Tensor:
    """``R_λ(x)``: returns ``x`` unchanged; gradients flowing back through it are multiplied by ``−lam``.

    Example:
        >>> import torch
        >>> x = torch.tensor([2.0], requires_grad=True)
        >>> (3 * grad_reverse(x, 2.0)).sum().backward(); x.grad.item()
        -6.0
    """
    lam = float(lam)
    if not math.isfinite(lam) or lam < 0:
        raise ConfigError(f"gradient reversal coefficient must be a finite number >= 0, got {lam}")
    return _GradReverse.apply(x, lam)


def dann_lambda(progress: float, gamma: float = 10.0, scale: float = 1.0) -> float:
    """DANN schedule ``scale · (2 / (1 + exp(−gamma · p)) − 1)`` for training progress ``p`` in [0, 1].

    Example:
        >>> round(dann_lambda(0.5), 4)
        0.9866
    """
    p = float(progress)
    if not 0.0 <= p <= 1.0:
        raise ConfigError(f"training progress must be in [0, 1], got {progress}")
    if gamma <= 0 or scale < 0:
        raise ConfigError(f"DANN schedule needs gamma > 0 and scale >= 0, got gamma={gamma}, scale={scale}")
    return float(scale * (2.0 / (1.0 + math.exp(-gamma * p)) - 1.0))


class GradientReversal(nn.Module):
    """Module form of :func:`grad_reverse`; ``lam`` is a plain attribute a schedule may update between steps.

    Example:
        >>> import torch
        >>> g = GradientReversal(1.0); x = torch.ones(2, requires_grad=True)
        >>> g(x).sum().backward(); x.grad.tolist()
        [-1.0, -1.0]
    """

    def __init__(self, lam: float = 1.0):
        super().__init__()
        self.lam = float(lam)

    def forward(self, x: Tensor) -> Tensor:
        return grad_reverse(x, self.lam)

    def extra_repr(self) -> str:
        return f"lam={self.lam:.4g}"
