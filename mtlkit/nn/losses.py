"""Loss functions shared by several methods.

Each function here is self-contained (one section per loss, its own imports of nothing but torch), so that
different papers' losses can live side by side in this file.

Example:
    >>> import torch
    >>> round(float(focal_bce(torch.zeros(4), torch.ones(4), beta=0.0)), 5)  # BCE at logit 0: log 2 = 0.6931472
    0.69315
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# ---------------------------------------------------------------------------------------------------------------
# MTMLAN sample-level dynamic balancing (focal-style binary loss)
# ---------------------------------------------------------------------------------------------------------------

_REDUCTIONS = ("mean", "sum", "none")


def focal_bce(logits: Tensor, target: Tensor, beta: float = 2.0, reduction: str = "mean") -> Tensor:
    r"""Sample-level loss of MTMLAN, Eq. 9: ``SL(p_k) = −(1 − p_k)^β · log p_k`` for every label entry.

    Wang & Chen, "Multi-label multi-task learning with dynamic task weight balancing" (MTMLAN), Sec. III-B-1,
    Eq. 7-9, after the focal loss of Lin et al. (2017) without its class-balancing factor α_t. ``p = σ(logit)`` is
    the predicted probability of label 1 and ``p_k = p`` if the target is 1, ``1 − p`` otherwise (Eq. 8). At β = 0
    this is binary cross-entropy (Eq. 7); larger β down-weights well-classified entries.

    Choices: the paper writes the target as ``y ∈ {−1, 1}``; we take the usual ``{0, 1}`` targets (0 ≙ −1). The
    loss is computed from logits with ``logsigmoid`` (``log p_k = logσ(±logit)``) for numerical stability, and
    ``(1 − p_k)^β`` is kept in the graph (as in Lin et al.; the modulating factor is differentiated too).

    Args:
        logits: raw scores, any shape; reshaped to ``target``'s shape (so a (B, 1) head and (B,) targets work).
        target: 0/1 targets (any dtype) with as many elements as ``logits``.
        beta: the focusing parameter β >= 0.
        reduction: ``"mean"`` (over all entries), ``"sum"`` or ``"none"`` (per entry, ``target``'s shape).

    Raises:
        ValueError: sizes differ, β < 0, targets outside {0, 1}, or an unknown reduction.

    Example:
        >>> import torch
        >>> p = torch.tensor([0.9]); logit = torch.log(p / (1 - p))
        >>> round(float(focal_bce(logit, torch.tensor([1.0]), beta=2.0)), 6)   # -(0.1)^2 * log 0.9
        0.001054
    """
    if logits.numel() != target.numel():
        raise ValueError(
            f"focal_bce: logits have {logits.numel()} elements {tuple(logits.shape)} but targets have "
            f"{target.numel()} {tuple(target.shape)}"
        )
    if not (isinstance(beta, (int, float)) and not isinstance(beta, bool)) or beta < 0:
        raise ValueError(f"focal_bce: beta (the focusing parameter) must be a number >= 0, got {beta!r}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"focal_bce: unknown reduction {reduction!r}; valid: {', '.join(_REDUCTIONS)}")
    y = target.to(logits.dtype) if target.is_floating_point() else target.to(torch.float32)
    if y.numel() and not bool(((y == 0) | (y == 1)).all()):
        raise ValueError("focal_bce: targets must be 0 or 1")
    z = logits.reshape(target.shape).to(y.dtype)
    log_pk = torch.where(y > 0.5, F.logsigmoid(z), F.logsigmoid(-z))  # Eq. 8 inside the log
    loss = -log_pk if beta == 0 else -(1.0 - log_pk.exp()).pow(beta) * log_pk  # Eq. 9
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


def sample_level_loss(beta: float = 2.0):
    """The Eq. 9 loss as a ``Task.loss`` callable ``(output, target) -> scalar`` (mean over the batch).

    Example:
        >>> import torch
        >>> from mtlkit.tasks import Task
        >>> t = Task("flood", "binary", loss=sample_level_loss(beta=2.0))
        >>> float(t.compute_loss(torch.zeros(3, 1), torch.tensor([0, 1, 1]))) > 0
        True
    """
    if not (isinstance(beta, (int, float)) and not isinstance(beta, bool)) or beta < 0:
        raise ValueError(f"sample_level_loss: beta must be a number >= 0, got {beta!r}")

    def loss(output: Tensor, target: Tensor) -> Tensor:
        return focal_bce(output, target, beta=float(beta))

    loss.beta = float(beta)  # type: ignore[attr-defined]
    return loss


# ---------------------------------------------------------------------------------------------------------------
# VIB KL term (MTVIB: Qian, Chen, Zhang, Wen & Gechter, "Multi-task variational information bottleneck",
# arXiv:2007.00339, 2020, doi:10.48550/arXiv.2007.00339; Eq. 8 and Eq. 10)
# ---------------------------------------------------------------------------------------------------------------

_KL_REDUCTIONS = ("mean", "sum", "none")


def gaussian_kl(mu: Tensor, std: Tensor, reduction: str = "mean") -> Tensor:
    r"""Closed-form ``KL(N(μ, diag σ²) || N(0, I))`` per example, summed over the latent dimensions.

    MTVIB Eq. 10 (``tr`` and ``det`` there are of the *covariance* ``diag σ²``; the paper writes ``σ_z(x)`` for it):
    ``KL = ½ Σ_j (σ_j² + μ_j² − 1 − log σ_j²)``.

    The last dimension is the latent one; leading dimensions are batch dimensions. ``reduction``: ``"mean"`` over
    the batch (the Monte-Carlo estimate of ``E_x[KL]`` in Eq. 8 / Eq. 23), ``"sum"``, or ``"none"`` (per example).

    Raises:
        ValueError: shapes differ, no latent dimension, an unknown reduction, or σ <= 0 somewhere.

    Example:
        >>> import torch
        >>> gaussian_kl(torch.zeros(3, 4), torch.ones(3, 4))  # the prior itself: KL = 0
        tensor(0.)
        >>> gaussian_kl(torch.tensor([[1.0, 0.0]]), torch.ones(1, 2))  # ½·μ² = 0.5
        tensor(0.5000)
    """
    if not isinstance(mu, Tensor) or not isinstance(std, Tensor):
        raise ValueError("gaussian_kl takes two tensors (mu, std)")
    if mu.shape != std.shape:
        raise ValueError(
            f"gaussian_kl: mu and std must have the same shape, got {tuple(mu.shape)} and {tuple(std.shape)}"
        )
    if mu.dim() < 1:
        raise ValueError("gaussian_kl: mu and std need a latent (last) dimension")
    if reduction not in _KL_REDUCTIONS:
        raise ValueError(f"gaussian_kl: unknown reduction {reduction!r}; valid: {', '.join(_KL_REDUCTIONS)}")
    if bool((std.detach() <= 0).any()):
        raise ValueError("gaussian_kl: std must be > 0 everywhere (the KL is infinite at σ = 0)")
    var = std.pow(2)
    kl = 0.5 * (var + mu.pow(2) - 1.0 - torch.log(var)).sum(dim=-1)
    if reduction == "none":
        return kl
    return kl.mean() if reduction == "mean" else kl.sum()
