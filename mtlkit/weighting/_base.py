"""Base class of loss-space methods (weightings)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

if TYPE_CHECKING:  # annotations only
    from mtlkit.callbacks import Callback


def _identity(t: Tensor) -> Tensor:
    return t


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
        task_layers: for each task (in loss order), the weight tensor(s) of the *first layer of its task-specific
            network*; MTMLAN's task-level dynamic balancing measures gradient norms there by default.
        reduce: applied to any gradient a weighting computes from the losses it is given (e.g. GradNorm's per-task
            gradients at the last shared layer) before using it: the identity in one process, the all-reduce mean
            over ranks under data parallelism (:mod:`mtlkit.distributed`), which makes it the global batch's.
        present: partial labels: bool (T,), the tasks with a labelled sample in this batch (None: all). An absent
            task's loss entry is its last seen loss (a constant) and its weighted loss is multiplied by 0 by the loop.
    """

    step: int = 0
    epoch: int = 0
    shared_params: Sequence[Tensor] = field(default_factory=tuple)
    last_shared_layer: Sequence[Tensor] = field(default_factory=tuple)
    task_names: Sequence[str] = field(default_factory=tuple)
    task_layers: Sequence[Sequence[Tensor]] = field(default_factory=tuple)
    reduce: Callable[[Tensor], Tensor] = field(default=_identity)
    present: Tensor | None = None


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

    Life cycle: the trainer calls ``setup(T)`` once, before it builds the optimiser (``setup`` creates the per-task
    parameters and buffers), then ``forward`` once per step. Weightings without learnable parameters also set
    themselves up on their first ``forward``; those with parameters (``requires_setup = True``) refuse to, because
    parameters created after the optimiser was built would silently never be trained. ``load_state_dict`` on a
    weighting that was not set up yet sets it up with the checkpoint's T first.

    State that changes during training (weights, step counters, generator states, histories) only changes in
    training mode (``self.training``) and where grad is enabled: evaluation passes leave it alone.

    Hooks the training loop calls (defaults do nothing); a method declares what it needs, the loop never checks names:
      * ``needs_loss_after_step``: if True, the loop recomputes the losses of the same batch after the optimiser
        step (no grad) and calls ``after_step(new_losses)`` (FAMO).
      * ``on_epoch_end(mean_losses)``: mean training loss per task of the epoch just finished (DWA).
      * ``needs_task_counts``: if True, the loop calls ``set_counts(n, num_samples=N)`` with the number of training
        instances of each task (e.g. positives per label) and the training-set size, before training (MTMLAN TDB).
      * ``callbacks()``: :class:`mtlkit.callbacks.Callback` s the method needs in the run (Auto-Lambda's
        look-ahead on meta batches); the trainer adds them like a model's.
      * ``equal_weight_epochs``: the number of first epochs in which every weight is 1 by the method's definition
        (DWA: 2). The loop warns when the whole run is that short: the method would train exactly as EW.

    Example:
        >>> import torch
        >>> from mtlkit.weighting import EW
        >>> EW()(torch.tensor([1.0, 2.0]))
        tensor([1., 2.])
    """

    needs_loss_after_step: bool = False
    #: True while the weighting still needs per-task instance counts (see ``set_counts``).
    needs_task_counts: bool = False
    #: True for weightings with learnable ``nn.Parameter``s: ``setup(T)`` must be called explicitly, before the
    #: optimiser is built (forward refuses to create parameters lazily).
    requires_setup: ClassVar[bool] = False
    #: Epochs at the start during which the method's weights are all 1 by definition (it is EW then).
    equal_weight_epochs: ClassVar[int] = 0
    #: True for weightings that compute gradients of the losses (GradNorm, ExcessMTL, ...): under data parallelism
    #: they pass them through ``StepContext.reduce`` (mtlkit.distributed), and `mtlkit methods NAME` says so.
    reads_gradients: ClassVar[bool] = False

    def __init__(self) -> None:
        super().__init__()
        self.num_tasks: int | None = None

    # ------------------------------------------------------------------ set-up
    def setup(self, num_tasks: int) -> None:
        """Create the per-task parameters and buffers for ``num_tasks`` tasks (idempotent for the same T).

        Raises:
            ValueError: ``num_tasks`` is not a positive int, or the weighting was already set up for another T.
        """
        if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 1:
            raise ValueError(f"num_tasks must be a positive int, got {num_tasks!r}")
        if self.num_tasks is not None:
            if self.num_tasks != num_tasks:
                raise ValueError(
                    f"{type(self).__name__} is already set up for T={self.num_tasks} tasks; "
                    f"cannot set it up again for T={num_tasks} (build a new weighting)"
                )
            return
        self._build(num_tasks)
        self.num_tasks = num_tasks

    def callbacks(self) -> list[Callback]:
        """Callbacks this weighting needs in the run (default: none)."""
        return []

    def _build(self, num_tasks: int) -> None:
        """Subclass hook: register the parameters/buffers for ``num_tasks`` tasks (called once by ``setup``)."""

    def _prepare(self, losses: Tensor) -> int:
        """Check ``losses`` (1-D, length T) and that the weighting is set up for that T; return T."""
        _check_losses(losses)
        T = losses.shape[0]
        if self.num_tasks is None:
            if self.requires_setup:
                raise RuntimeError(
                    f"{type(self).__name__} has learnable per-task parameters: call .setup(num_tasks={T}) before "
                    f"building the optimiser (and add its .parameters() to it), then call it on the losses"
                )
            self.setup(T)
        elif T != self.num_tasks:
            raise ValueError(f"{type(self).__name__} was set up for T={self.num_tasks} tasks but got {T} losses")
        return T

    def _updating(self, losses: Tensor | None = None) -> bool:
        """Whether this call may change the method's state (training mode, grad enabled)."""
        ok = self.training and torch.is_grad_enabled()
        return ok and (losses is None or losses.requires_grad)

    # ------------------------------------------------------------------ checkpoints
    def get_extra_state(self) -> Any:
        return {"num_tasks": self.num_tasks}

    def set_extra_state(self, state: Any) -> None:
        T = state.get("num_tasks") if isinstance(state, Mapping) else None
        if T is not None and self.num_tasks is not None and T != self.num_tasks:
            raise ValueError(
                f"checkpoint is for T={T} tasks but {type(self).__name__} is set up for T={self.num_tasks}"
            )

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        extra = state_dict.get("_extra_state") if isinstance(state_dict, Mapping) else None
        if self.num_tasks is None and isinstance(extra, Mapping) and extra.get("num_tasks") is not None:
            self.setup(int(extra["num_tasks"]))
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    # ------------------------------------------------------------------ interface
    def forward(self, losses: Tensor, ctx: StepContext | None = None) -> Tensor:
        raise NotImplementedError

    def weights(self) -> Tensor | None:
        """Current task weights, for logging (None where the method has no explicit weights)."""
        return None

    def after_step(self, new_losses: Tensor) -> None:
        """Called with the same batch's losses after the optimiser step (when ``needs_loss_after_step``)."""

    def on_epoch_end(self, mean_losses: Tensor) -> None:
        """Called once per epoch with the epoch's mean loss per task."""

    def set_counts(self, counts: Sequence[int] | Tensor, num_samples: int | None = None) -> None:
        """Per-task training-instance counts (only for weightings with ``needs_task_counts``)."""
        raise TypeError(f"{type(self).__name__} does not use per-task instance counts")


class EW(Weighting):
    """Equal weighting: the losses pass through unchanged (their sum is back-propagated).

    Example:
        >>> import torch
        >>> EW()(torch.tensor([0.5, 1.5])).sum()
        tensor(2.)
    """

    def forward(self, losses: Tensor, ctx: StepContext | None = None) -> Tensor:
        # Stateless: works for any T unless setup(T) fixed one (then a mismatch is an error, as elsewhere).
        if self.num_tasks is not None:
            self._prepare(losses)
        else:
            _check_losses(losses)
        return losses

    def weights(self) -> Tensor | None:
        return None
