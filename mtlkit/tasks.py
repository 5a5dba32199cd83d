"""Tasks: what each head predicts, its loss and its metrics.

Example:
    >>> import torch
    >>> t = Task("digit", "multiclass", num_outputs=10)
    >>> float(t.loss(torch.zeros(2, 10), torch.tensor([1, 2]))) > 0
    True
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from mtlkit.errors import ConfigError

Kind = Literal["multiclass", "binary", "multilabel", "regression"]
KINDS = ("multiclass", "binary", "multilabel", "regression")
LossFn = Callable[[Tensor, Tensor], Tensor]


def _default_loss(kind: str) -> LossFn:
    if kind == "multiclass":
        return F.cross_entropy
    if kind in ("binary", "multilabel"):
        return lambda out, y: F.binary_cross_entropy_with_logits(out.reshape(y.shape), y.to(out.dtype))
    return lambda out, y: F.mse_loss(out.reshape(y.shape), y.to(out.dtype))


def _default_metrics(kind: str) -> tuple[str, ...]:
    return {"multiclass": ("accuracy",), "binary": ("accuracy",), "multilabel": ("accuracy",), "regression": ("mae",)}[
        kind
    ]


@dataclass
class Task:
    """One task of a multi-task problem.

    Attributes:
        name: unique task name (used in logs, configs and tables).
        kind: ``multiclass`` (logits over ``num_outputs`` classes, integer targets), ``binary`` (one logit, 0/1
            target), ``multilabel`` (``num_outputs`` logits, 0/1 targets) or ``regression``.
        num_outputs: width of the head's output.
        loss: ``loss(output, target) -> scalar``; defaults by kind (CE, BCE-with-logits, MSE).
        metrics: metric names from :mod:`mtlkit.metrics`; the first is the task's primary metric (model selection).
        higher_is_better: per metric, whether larger is better (defaults: True except for error metrics).
        auxiliary: an extra training task (e.g. an adversarial head) whose loss is trained but which is never used
            for model selection nor reported as a target metric (:func:`mtlkit.metrics.selection_score` and
            :func:`mtlkit.metrics.evaluate_outputs` skip it).
        target: key of this task's target tensor in ``Split.y`` (default: the task's own name); lets an auxiliary
            head be trained on another task's labels.
    """

    name: str
    kind: Kind
    num_outputs: int = 1
    loss: LossFn | None = None
    metrics: tuple[str, ...] = ()
    higher_is_better: tuple[bool, ...] = ()
    extra: dict = field(default_factory=dict)
    auxiliary: bool = False
    target: str | None = None

    @property
    def target_key(self) -> str:
        """Key of the task's targets in ``Split.y``."""
        return self.target or self.name

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"task {self.name!r}: unknown kind {self.kind!r}; valid kinds are: {', '.join(KINDS)}")
        if self.num_outputs < 1:
            raise ConfigError(f"task {self.name!r}: num_outputs must be >= 1, got {self.num_outputs}")
        if self.loss is None:
            self.loss = _default_loss(self.kind)
        if not self.metrics:
            self.metrics = _default_metrics(self.kind)
        if not self.higher_is_better:
            from mtlkit.metrics import HIGHER_IS_BETTER

            self.higher_is_better = tuple(HIGHER_IS_BETTER.get(m, True) for m in self.metrics)
        if len(self.higher_is_better) != len(self.metrics):
            raise ConfigError(
                f"task {self.name!r}: {len(self.metrics)} metrics but "
                f"{len(self.higher_is_better)} higher_is_better flags"
            )

    def compute_loss(self, output: Tensor, target: Tensor) -> Tensor:
        """The task's loss, with a clear error on mismatched shapes."""
        if self.kind == "multiclass":
            if output.dim() != 2 or output.shape[1] != self.num_outputs or target.shape != output.shape[:1]:
                raise ValueError(
                    f"task {self.name!r}: expected logits (B, {self.num_outputs}) and targets (B,), got "
                    f"{tuple(output.shape)} and {tuple(target.shape)}"
                )
        elif output.shape[0] != target.shape[0]:
            raise ValueError(
                f"task {self.name!r}: batch sizes differ: output {tuple(output.shape)}, target {tuple(target.shape)}"
            )
        assert self.loss is not None
        return self.loss(output, target)

    def predict(self, output: Tensor) -> Tensor:
        """Hard predictions from the head's output (argmax / threshold at logit 0 / the value)."""
        if self.kind == "multiclass":
            return output.argmax(dim=1)
        if self.kind in ("binary", "multilabel"):
            return (
                (output > 0).long().reshape(output.shape[0], -1).squeeze(-1)
                if self.kind == "binary"
                else (output > 0).long()
            )
        return output


def task_names(tasks: list[Task]) -> list[str]:
    """Names in order; raises on duplicates."""
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise ConfigError(f"task names must be unique, got {names}")
    return names


def stack_losses(tasks: list[Task], outputs: dict[str, Tensor], targets: dict[str, Tensor]) -> Tensor:
    """The (T,) vector of per-task losses in task order (:func:`mtlkit.engine.autodiff.stack`: per-task backward passes
    never run through other tasks' heads)."""
    from mtlkit.engine.autodiff import stack

    return stack([t.compute_loss(outputs[t.name], targets[t.target_key]) for t in tasks])


def masked_losses(
    tasks: list[Task],
    outputs: dict[str, Tensor],
    targets: dict[str, Tensor],
    masks: dict[str, Tensor] | None,
) -> tuple[Tensor, Tensor]:
    """Per-task losses over each task's labelled samples only, and how many there are in this batch.

    ``masks`` maps a target key (:attr:`Task.target_key`, so that an auxiliary head trained on another task's labels
    uses that task's mask) to a bool (B,) tensor, True where the sample is labelled; a key left out, or
    ``masks=None``, means every sample is labelled. Task t's loss is ``task.compute_loss(out[m], y[m])``: the
    task's own loss (its reduction, e.g. the mean, over the labelled rows only; a custom ``Task.loss`` sees only
    those rows). With every row labelled it is exactly :func:`stack_losses`' value (the same call on the whole
    batch). A task with no labelled row gets a loss of exactly 0 that is still part of the graph (the sum of an
    empty slice of its output: no NaN even if the output holds inf), so that stacking and per-task backward
    passes work and give it an all-zero gradient row; the engine leaves such tasks out of the aggregation.

    Returns:
        ``(losses, counts)``: the (T,) loss vector in task order (built with :func:`mtlkit.engine.autodiff.stack`,
        like :func:`stack_losses`) and the (T,) int64 number of labelled samples per task in this batch (on the
        CPU: it decides which tasks take part in the step).

    Raises:
        ValueError: a mask that is not a bool tensor with one entry per sample of its targets.

    Example:
        >>> a, b = Task("a", "regression"), Task("b", "regression")
        >>> out = {"a": torch.tensor([1.0, 3.0]), "b": torch.tensor([2.0, 2.0])}
        >>> y = {"a": torch.zeros(2), "b": torch.zeros(2)}
        >>> masked_losses([a, b], out, y, {"a": torch.tensor([False, True]), "b": torch.tensor([False, False])})
        (tensor([9., 0.]), tensor([1, 0]))
    """
    from mtlkit.engine.autodiff import stack

    if masks is None:
        counts = torch.tensor([int(targets[t.target_key].shape[0]) for t in tasks], dtype=torch.int64)
        return stack_losses(tasks, outputs, targets), counts
    given: list[Tensor | None] = []
    for t in tasks:
        y, m = targets[t.target_key], masks.get(t.target_key)
        if m is not None and (
            not isinstance(m, Tensor) or m.dtype != torch.bool or tuple(m.shape) != (int(y.shape[0]),)
        ):
            shape = tuple(m.shape) if isinstance(m, Tensor) else type(m).__name__
            raise ValueError(
                f"task {t.name!r}: the label mask of {t.target_key!r} must be a bool tensor of shape "
                f"({int(y.shape[0])},), got {shape}"
            )
        given.append(m)
    sums = [m.sum() for m in given if m is not None]
    labelled = iter(torch.stack(sums).tolist() if sums else [])  # one device sync for every task
    n = [
        int(targets[t.target_key].shape[0]) if m is None else int(next(labelled))
        for t, m in zip(tasks, given, strict=True)
    ]
    counts = torch.tensor(n, dtype=torch.int64)
    losses = []
    for t, k, m in zip(tasks, n, given, strict=True):
        out, y = outputs[t.name], targets[t.target_key]
        if m is None or k == int(y.shape[0]):
            losses.append(t.compute_loss(out, y))  # every row labelled: stack_losses' value exactly
        elif k == 0:
            losses.append(out.reshape(-1)[:0].sum())  # exactly 0, in the graph, zero gradient
        else:
            losses.append(t.compute_loss(out[m], y[m]))
    return stack(losses), counts
