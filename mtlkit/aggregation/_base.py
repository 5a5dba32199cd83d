"""Base class of gradient-space methods (aggregators)."""
from __future__ import annotations

from abc import ABC
from typing import Any, ClassVar

import torch
from torch import Tensor


def _check_matrix(J: Tensor) -> None:
    if not isinstance(J, Tensor) or J.dim() != 2:
        shape = tuple(J.shape) if isinstance(J, Tensor) else type(J).__name__
        raise ValueError(f"an aggregator takes a T x P matrix of per-task gradients, got shape {shape}")
    if J.shape[0] == 0:
        raise ValueError("an aggregator needs at least one task gradient (got T = 0)")


def _check_finite(per_row: Tensor) -> None:
    """Raise if a row of J holds NaN or inf, given one number per row that is non-finite exactly then.

    The diagonal of G = J Jᵀ (or the row sums) is such a number: a NaN or inf entry makes it NaN or inf. Checking
    it instead of ``isfinite(J)`` avoids a T x P temporary (40 x 262k entries at representation level on T = 40).
    """
    finite = torch.isfinite(per_row)
    if not bool(finite.all()):
        bad = (~finite).nonzero().flatten().tolist()
        raise FloatingPointError(f"per-task gradients of tasks {bad} contain NaN or inf (or overflow)")


class Aggregator(ABC):
    """Turns the T x P matrix ``J`` of per-task gradients (row t = gradient of task t's loss) into one update.

    Subclasses implement either

    * ``weights_from_gramian(G)`` and set ``gramian_based = True``: the method only needs the T x T Gramian
      ``G = J Jᵀ``; the update is ``wᵀ J``, which the engine obtains without materialising anything beyond what it
      already holds (or by one backward of ``Σ w_t L_t`` at representation level), or
    * ``aggregate(J)`` for methods that need the gradients themselves (PCGrad, MAMG, GradDrop, ...).

    Conventions: the returned update is a *descent direction to be applied like a gradient* (the optimizer steps along
    its negative) and is on the scale of the *sum* of the task gradients (EW = sum), so that swapping an aggregator
    into a loop written for ``sum(losses).backward()`` keeps the learning rate meaningful. Stateful aggregators keep
    their state in ``state_dict``/``load_state_dict`` so that checkpoints resume exactly.

    Example:
        >>> import torch
        >>> from mtlkit.aggregation import Sum
        >>> Sum()(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
        tensor([1., 2.])
    """

    #: True when the method only needs the Gramian G = J Jᵀ (then implement ``weights_from_gramian``).
    gramian_based: ClassVar[bool] = False
    #: False only for methods whose update is the plain sum of task gradients (then no per-task backward is run).
    needs_per_task_grads: ClassVar[bool] = True
    #: False for methods whose output depends on task order (e.g. random projection order); documented per method.
    permutation_equivariant: ClassVar[bool] = True

    def __call__(self, J: Tensor) -> Tensor:
        _check_matrix(J)
        if self.gramian_based:
            return self.weights(J @ J.T).to(J.dtype) @ J
        _check_finite(J.sum(dim=1))
        return self.aggregate(J)

    def weights(self, G: Tensor) -> Tensor:
        """Task weights ``w`` from the Gramian ``G = J Jᵀ`` (checked: square, finite diagonal); update = ``wᵀ J``.

        The engine calls this directly when it forms G without J (:mod:`mtlkit.gramian`).

        Raises:
            ValueError: the method is not Gramian-based, or G is not a square matrix.
            FloatingPointError: a task's gradient holds NaN or inf (its diagonal entry is not finite).
        """
        if not self.gramian_based:
            raise ValueError(f"{type(self).__name__} needs the gradients themselves, not only their Gramian")
        if not isinstance(G, Tensor) or G.dim() != 2 or G.shape[0] != G.shape[1] or G.shape[0] == 0:
            shape = tuple(G.shape) if isinstance(G, Tensor) else type(G).__name__
            raise ValueError(f"a Gramian is a non-empty T x T matrix, got shape {shape}")
        _check_finite(G.diagonal())
        return self.weights_from_gramian(G)

    def weights_from_gramian(self, G: Tensor) -> Tensor:  # pragma: no cover - abstract in practice
        """Return the T task weights ``w`` such that the update is ``wᵀ J`` (Gramian-based methods only)."""
        raise NotImplementedError(f"{type(self).__name__} is not Gramian-based")

    def aggregate(self, J: Tensor) -> Tensor:  # pragma: no cover - abstract in practice
        """Return the P-dimensional update from the T x P matrix of per-task gradients."""
        raise NotImplementedError(f"{type(self).__name__} must implement aggregate()")

    # State for checkpoints (stateless by default).
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} is stateless but got state keys {sorted(state)}")

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({params})"


class Sum(Aggregator):
    """Equal weighting in gradient space: the update is ``Σ_t g_t`` (one backward of the summed loss; the floor).

    Example:
        >>> import torch
        >>> Sum()(torch.ones(3, 2))
        tensor([3., 3.])
    """

    needs_per_task_grads = False

    def aggregate(self, J: Tensor) -> Tensor:
        return J.sum(dim=0)


class Mean(Aggregator):
    """The update is the mean of the task gradients, ``(1/T) Σ_t g_t``.

    Example:
        >>> import torch
        >>> Mean()(torch.tensor([[2.0, 0.0], [0.0, 2.0]]))
        tensor([1., 1.])
    """

    gramian_based = True

    def weights_from_gramian(self, G: Tensor) -> Tensor:
        T = G.shape[0]
        return torch.full((T,), 1.0 / T, dtype=G.dtype, device=G.device)
