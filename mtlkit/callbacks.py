"""Callbacks: code that runs at the training loop's events and may change the model and the optimizer.

The loop (:class:`mtlkit.train.Trainer`) calls every callback of the run at each event, in order. A callback may
read anything the trainer holds (``trainer.model``, ``trainer.optimizer``, ``trainer.method``, ``trainer.data``,
``trainer.cfg``) and may change the model and the optimizer's parameter groups through the trainer's services, which
rebuild what depends on them:

* :meth:`~mtlkit.train.Trainer.add_parameters` — new parameters (e.g. grown modules) join the optimizer as a new
  parameter group; the shared-parameter list the engine combines is read again;
* :meth:`~mtlkit.train.Trainer.model_changed` — the model's structure changed without new parameters;
* :meth:`~mtlkit.train.Trainer.selected_state` / :meth:`~mtlkit.train.Trainer.restart_selection` — the model the
  run has selected on validation so far, and starting the selection afresh (e.g. after the architecture changed:
  a smaller model's weights no longer fit);
* :meth:`~mtlkit.train.Trainer.replace_method` — train with another method from the next step on.

Resuming: a callback's :meth:`Callback.state_dict` is saved in every checkpoint, and on ``--resume``
:meth:`Callback.load_state_dict` is called *before* the model's and the optimizer's states are loaded, so a
callback that grew the model re-grows it (and re-adds its parameter groups, in the same order) first; the run then
continues bit for bit.

Events, in the order of one epoch (``epoch`` and ``batch`` count from 0 here, as in the checkpoint; users read
epochs from 1):

``check`` (when the trainer is built) → ``on_train_start`` → per epoch: ``on_epoch_start`` → per batch: ``wants_jacobian`` → ``on_losses`` (the losses
still carry their graph) → the engine's backward → ``on_backward`` (with the engine's :class:`BackwardInfo`) → the
optimizer step → ``on_batch_end`` → after validation and model selection: ``on_epoch_end`` (before the epoch's
checkpoint is written, so what it changed is in that checkpoint) → ``on_train_end``. After every checkpoint
(at epoch ends and inside long epochs) and the files derived from it were written: ``on_checkpoint``. When
``fit`` returns or raises, whatever happened: ``on_exit`` (release files and writers).

*Observers* (:attr:`Callback.observer`, e.g. the built-in :class:`mtlkit.monitor.Monitor`) only read: they never
change the model, the optimizer, the method or the random state. A run may be resumed with an observer added or
removed (the check that a resumed run has the same callbacks as its checkpoint ignores them).

Example:
    >>> class CountSteps(Callback):
    ...     def __init__(self): self.steps = 0
    ...     def on_batch_end(self, trainer, step): self.steps += 1
    ...     def state_dict(self): return {"steps": self.steps}
    ...     def load_state_dict(self, state, trainer): self.steps = state["steps"]
    >>> CountSteps().state_dict()
    {'steps': 0}
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from torch import Tensor

if TYPE_CHECKING:  # only for annotations: the loop imports this module, not the other way round
    from mtlkit.engine.autodiff import BackwardInfo
    from mtlkit.train import Trainer


@dataclass
class StepInfo:
    """One training step as the callbacks see it.

    Attributes:
        epoch: the epoch (from 0).
        batch: the batch within the epoch (from 0).
        step: the global step (from 0).
        steps_per_epoch: batches per epoch.
        losses: the T unweighted training-task losses; in ``on_losses`` they still carry their graph (a callback
            may differentiate them with ``retain_graph=True``), afterwards they are detached.
        info: what the engine returned (``on_backward`` and later; None before).
    """

    epoch: int
    batch: int
    step: int
    steps_per_epoch: int
    losses: Tensor
    info: BackwardInfo | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def last_of_epoch(self) -> bool:
        return self.batch == self.steps_per_epoch - 1


class Callback:
    """Base class: every event does nothing. Override the ones you need (see the module docstring)."""

    #: Name under which the callback's state is saved in checkpoints and its results in results.json.
    name: str = ""
    #: True for a callback that only reads (see the module docstring): a resume may add or drop it.
    observer: ClassVar[bool] = False

    def key(self) -> str:
        return self.name or type(self).__name__

    def check(self, trainer: Trainer) -> None:
        """Called when the trainer is built, before anything is written or trained: raise
        :class:`~mtlkit.errors.ConfigError` for a configuration this callback cannot run."""

    def on_train_start(self, trainer: Trainer) -> None:
        """Before the first step of this process (after a resume has restored everything)."""

    def on_epoch_start(self, trainer: Trainer, epoch: int) -> None:
        """Before the first batch of ``epoch`` (from 0), also when a resume starts inside it."""

    def wants_jacobian(self, trainer: Trainer, step: StepInfo) -> bool:
        """True to have the engine keep the T x P matrix of per-task gradients of the shared parameters for
        ``on_backward`` (``step.info.jacobian``; only where the method's aggregator computes it at parameter
        level, else ``info.jacobian`` is None and the callback differentiates ``step.losses`` in ``on_losses``)."""
        return False

    def on_losses(self, trainer: Trainer, step: StepInfo) -> None:
        """The per-task losses of the step, before the backward (their graph is still there)."""

    def on_backward(self, trainer: Trainer, step: StepInfo) -> None:
        """After the engine wrote ``.grad``, before the optimizer step."""

    def on_batch_end(self, trainer: Trainer, step: StepInfo) -> None:
        """After the optimizer step."""

    def on_epoch_end(self, trainer: Trainer, epoch: int, row: dict[str, float]) -> None:
        """After validation and selection of ``epoch`` (from 0; ``row`` is its metrics row), before its
        checkpoint. A change to the model or the optimizer made here is in that checkpoint."""

    def on_train_end(self, trainer: Trainer) -> None:
        """After the last epoch, before the selected model is evaluated on test."""

    def on_checkpoint(self, trainer: Trainer) -> None:
        """After ``checkpoint.pt`` and the files derived from it were written (e.g. flush a log up to it)."""

    def on_exit(self, trainer: Trainer) -> None:
        """When :meth:`~mtlkit.train.Trainer.fit` returns or raises (also on Ctrl-C): release files, writers."""

    def results(self) -> dict[str, Any]:
        """Extra entries for results.json (under the callback's :meth:`key`); JSON-serialisable."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """What a resume needs (saved in every checkpoint)."""
        return {}

    def load_state_dict(self, state: dict[str, Any], trainer: Trainer) -> None:
        """Restore :meth:`state_dict`'s state on resume, before the model's and the optimizer's states are loaded
        (re-grow the model and re-add parameter groups here, in the order they were added)."""


__all__ = ["Callback", "StepInfo"]
