"""The engine: per-task gradients and Gramians of a multi-task loss, and the backward that applies a method.

:func:`backward` is the one call a training step needs (:mod:`mtlkit.engine.autodiff`); Gramian-based aggregators
get ``G = J Jᵀ`` without the T x P Jacobian (:mod:`mtlkit.engine.gramian`).

Example:
    >>> import torch
    >>> w = torch.tensor([1.0, 2.0], requires_grad=True)
    >>> per_task_grads(stack([w[0] ** 2, 3 * w[1]]), [w])
    tensor([[2., 0.],
            [0., 3.]])
"""

from mtlkit.engine.autodiff import BackwardInfo, backward, per_task_grads, split_flat, stack

__all__ = ["BackwardInfo", "backward", "per_task_grads", "split_flat", "stack"]
