"""Adversarial robustness of multi-task models: FGSM (MTVIB Eq. 25) and PGD, on the summed or one task's loss.

FGSM: ``x_adv = clip(x + η · sign(∇_x L(x)), 0, 1)`` (Goodfellow et al. 2015; MTVIB Eq. 25) with L the *sum of the
task losses* (the MTVIB paper's setting) or one task's loss (``target_task``). PGD (Madry et al. 2018): ``steps``
signed-gradient steps of size ``alpha`` (default 2.5·η/steps), each followed by projection onto the L∞ ball of radius
η around x and onto [0, 1]; random start in the ball (``random_start``).

The model is evaluated in eval mode (BatchNorm uses running statistics; MTVIB decodes its mean) and its train/eval
mode is restored afterwards; its parameters receive no gradients (only ∂L/∂x is computed). Pixels are assumed to lie
in ``clip`` = [0, 1]; the perturbation is applied before clipping, so ``|x_adv − x| = η`` exactly wherever
``x ± η`` stays inside [0, 1] and the input gradient is non-zero.

Example:
    >>> import torch
    >>> from mtlkit.tasks import Task
    >>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    >>> model = lambda x: {"t": net(x)}
    >>> x = torch.full((2, 1, 2, 2), 0.5); y = {"t": torch.tensor([0, 1])}
    >>> adv = fgsm(model, [Task("t", "multiclass", 3)], x, y, eps=0.1)
    >>> bool(((adv - x).abs() - 0.1).abs().max() < 1e-6)
    True
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

from mtlkit.tasks import Task, stack_losses

Model = Callable[[Tensor], dict[str, Tensor]]

#: The attack strengths ``mtlkit eval --attack fgsm|pgd`` uses when none are given: η in {0, 0.05, ..., 0.30} on
#: [0, 1] pixels, the grid of MTVIB's Tables III/IV (η = 0 is the clean input, the curve's reference point; at 0.3
#: the perturbation is 30 % of the pixel range, where the README's FGSM comparisons are made).
DEFAULT_EPS: tuple[float, ...] = (0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3)


def attack_loss(model: Model, tasks: list[Task], x: Tensor, y: dict[str, Tensor], target_task: str | None) -> Tensor:
    """The loss an attack ascends: the sum over tasks, or the named task's loss.

    Raises:
        ValueError: unknown ``target_task``, or a task without targets in ``y``.
    """
    if target_task is not None and target_task not in {t.name for t in tasks}:
        raise ValueError(f"unknown target task {target_task!r}; tasks are: {', '.join(t.name for t in tasks)}")
    used = [t for t in tasks if target_task is None or t.name == target_task]
    missing = [t.name for t in used if t.name not in y]
    if missing:
        raise ValueError(f"no targets for task(s) {missing} in y (keys: {sorted(y)})")
    out = model(x)
    if target_task is None:
        return stack_losses(tasks, out, y).sum()
    return used[0].compute_loss(out[target_task], y[target_task])


def input_gradient(
    model: Model, tasks: list[Task], x: Tensor, y: dict[str, Tensor], target_task: str | None = None
) -> Tensor:
    """∇_x of the attack loss (no parameter gradients are accumulated)."""
    x = x.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(attack_loss(model, tasks, x, y, target_task), x)
    return g


@contextmanager
def eval_mode(model: Model) -> Iterator[None]:
    """Put an ``nn.Module`` in eval mode for the block and restore its previous mode (and grad mode) afterwards."""
    was = model.training if isinstance(model, torch.nn.Module) else None
    if isinstance(model, torch.nn.Module):
        model.eval()
    try:
        with torch.enable_grad():
            yield
    finally:
        if isinstance(model, torch.nn.Module) and was is not None:
            model.train(was)


def _check_eps(eps: float) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0 or eps == float("inf"):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    return float(eps)


def fgsm(
    model: Model,
    tasks: list[Task],
    x: Tensor,
    y: dict[str, Tensor],
    eps: float,
    target_task: str | None = None,
    clip: tuple[float, float] = (0.0, 1.0),
) -> Tensor:
    """FGSM adversarial examples (MTVIB Eq. 25): ``clip(x + η·sign(∇_x L), 0, 1)``; ``eps=0`` returns ``x``.

    Raises:
        ValueError: ``eps`` negative or not a number, unknown ``target_task``, missing targets.
    """
    eps = _check_eps(eps)
    if eps == 0:
        return x.detach().clone()
    with eval_mode(model):
        g = input_gradient(model, tasks, x, y, target_task)
    return fgsm_step(x, g.sign(), eps, clip)


def fgsm_step(x: Tensor, direction: Tensor | None, eps: float, clip: tuple[float, float] = (0.0, 1.0)) -> Tensor:
    """Eq. 25 given the sign of the input gradient: ``clip(x + η·direction)``; ``x`` itself (a copy) for η = 0,
    where ``direction`` is not read (None allowed)."""
    if eps == 0:
        return x.detach().clone()
    if direction is None:
        raise ValueError(f"fgsm_step needs the direction (the input gradient's sign) for eps={eps} > 0")
    return (x.detach() + eps * direction).clamp(*clip)


def pgd(
    model: Model,
    tasks: list[Task],
    x: Tensor,
    y: dict[str, Tensor],
    eps: float,
    steps: int = 10,
    alpha: float | None = None,
    target_task: str | None = None,
    random_start: bool = True,
    clip: tuple[float, float] = (0.0, 1.0),
    generator: torch.Generator | None = None,
) -> Tensor:
    """L∞ PGD adversarial examples (Madry et al. 2018); the result stays in the η-ball around ``x`` and in ``clip``.

    Raises:
        ValueError: ``eps`` < 0, ``steps`` < 1, ``alpha`` <= 0, unknown ``target_task``.
    """
    eps = _check_eps(eps)
    if steps < 1 or (alpha is not None and not alpha > 0):
        raise ValueError(f"pgd needs steps >= 1 and alpha > 0, got steps={steps}, alpha={alpha}")
    if eps == 0:
        return x.detach().clone()
    alpha = 2.5 * eps / steps if alpha is None else alpha
    x0 = x.detach()
    adv = x0.clone()
    if random_start:
        noise = torch.rand(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device) * 2 - 1
        adv = (x0 + eps * noise).clamp(*clip)
    with eval_mode(model):
        for _ in range(steps):
            g = input_gradient(model, tasks, adv, y, target_task)
            adv = adv + alpha * g.sign()
            adv = torch.min(torch.max(adv, x0 - eps), x0 + eps).clamp(*clip)
    return adv.detach()


ATTACKS = {"fgsm": fgsm, "pgd": pgd}
