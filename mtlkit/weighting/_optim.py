"""Optimiser steps on buffers, for weightings that update their own state (GradNorm, TDB, FAMO).

The state lives in the weighting's buffers (not in a ``torch.optim`` object) so that ``state_dict`` /
``load_state_dict`` resume a run exactly. :func:`adam_step` reproduces ``torch.optim.Adam`` (L2 ``weight_decay``
added to the gradient, bias-corrected moments, ``eps`` added after the square root), step for step.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mtlkit.errors import ConfigError

OPTIMIZERS = ("adam", "sgd")


def check_optimizer(name: str, lr: float) -> str:
    """Validate an optimiser name and learning rate; return the lower-case name."""
    key = str(name).lower()
    if key not in OPTIMIZERS:
        raise ConfigError(f"unknown optimizer {name!r}; valid optimizers are: {', '.join(OPTIMIZERS)}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ConfigError(f"lr must be a positive finite number, got {lr!r}")
    return key


@torch.no_grad()
def adam_step(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: Tensor,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
) -> None:
    """One in-place Adam step of ``param`` along ``grad`` (``step`` is a 0-d counter buffer, incremented here).

    Example:
        >>> import torch
        >>> p = torch.zeros(2); m = torch.zeros(2); v = torch.zeros(2); k = torch.zeros(())
        >>> adam_step(p, torch.tensor([1.0, -2.0]), m, v, k, lr=0.1)
        >>> p, int(k)
        (tensor([-0.1000,  0.1000]), 1)
    """
    beta1, beta2 = betas
    step.add_(1)
    n = float(step)
    g = grad.to(param.dtype)
    if weight_decay:
        g = g.add(param, alpha=weight_decay)
    exp_avg.lerp_(g, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    bias1 = 1 - beta1**n
    bias2 = 1 - beta2**n
    denom = (exp_avg_sq.sqrt() / math.sqrt(bias2)).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-lr / bias1)


@torch.no_grad()
def sgd_step(param: Tensor, grad: Tensor, lr: float, weight_decay: float = 0.0) -> None:
    """One in-place plain gradient-descent step."""
    g = grad.to(param.dtype)
    if weight_decay:
        g = g.add(param, alpha=weight_decay)
    param.add_(g, alpha=-lr)
