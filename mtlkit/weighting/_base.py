"""Base class of loss-space methods (weightings)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor, nn


@dataclass
class StepContext:
    """What the training loop tells a weighting at each step.

    Attributes:
        step: global optimisation step (0-based).
        epoch: current epoch (0-based).
        shared_params: parameters of the shared network (for methods that look at gradient norms, e.g. GradNorm,
            which by default uses the *last* shared layer ``shared_params[-1]`` and its bias-free weight).
        last_shared_layer: the weight tensor(s) GradNorm-like methods take gradient norms at; defaults to the last
            shared parameter tensor with ``dim() >= 2``.
        task_names: names of the tasks, in loss order.
    """

    step: int = 0
    epoch: int = 0
    shared_params: Sequence[Tensor] = field(default_factory=tuple)
    last_shared_layer: Sequence[Tensor] = field(default_factory=tuple)
    task_names: Sequence[str] = field(default_factory=tuple)


def _check_losses(losses: Tensor) -> None:
    if not isinstance(losses, Tensor) or losses.dim() != 1 or losses.numel() == 0:
        shape = tuple(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__
        raise ValueError(f"a weighting takes a 1-D tensor of T >= 1 per-task losses, got {shape}")


class Weighting(nn.Module):
    """Turns the vector of T per-task losses into the vector of T *weighted* losses that is back-propagated.

    ``forward(losses, ctx)`` returns a tensor of shape (T,) whose entry t depends only on task t's loss and on
    the weighting's own parameters for task t (so that an aggregator downstream still sees per-task gradients).
    Learnable weightings (UW, IMTL-L) register ``nn.Parameter``s; the trainer adds ``parameters()`` to the optimizer.
    Weightings with their own update rule (GradNorm, FAMO) keep their state as buffers and update it in ``forward``
    or in the hooks below, so that ``state_dict`` captures everything a checkpoint needs.

    Hooks the training loop calls (defaults do nothing); a method declares what it needs, the loop never checks names:
      * ``needs_loss_after_step``: if True, the loop recomputes the losses of the same batch after the optimiser
        step (no grad) and calls ``after_step(new_losses)`` (FAMO).
      * ``on_epoch_end(mean_losses)``: mean training loss per task of the epoch just finished (DWA).

    Example:
        >>> import torch
        >>> from mtlkit.weighting import EW
        >>> EW()(torch.tensor([1.0, 2.0]))
        tensor([1., 2.])
    """

    needs_loss_after_step: bool = False

    def forward(self, losses: Tensor, ctx: StepContext | None = None) -> Tensor:  # noqa: D401
        raise NotImplementedError

    def weights(self) -> Tensor | None:
        """Current task weights, for logging (None where the method has no explicit weights)."""
        return None

    def after_step(self, new_losses: Tensor) -> None:
        """Called with the same batch's losses after the optimiser step (when ``needs_loss_after_step``)."""

    def on_epoch_end(self, mean_losses: Tensor) -> None:
        """Called once per epoch with the epoch's mean loss per task."""


class EW(Weighting):
    """Equal weighting: the losses pass through unchanged (their sum is back-propagated).

    Example:
        >>> import torch
        >>> EW()(torch.tensor([0.5, 1.5])).sum()
        tensor(2.)
    """

    def forward(self, losses: Tensor, ctx: StepContext | None = None) -> Tensor:
        _check_losses(losses)
        return losses

    def weights(self) -> Tensor | None:
        return None
