"""Adversarial robustness of multi-task models: FGSM (MTVIB Eq. 25) and PGD, on the summed or one task's loss.

FGSM: ``x_adv = clip(x + η · sign(∇_x L(x)), 0, 1)`` (Goodfellow, Shlens & Szegedy, "Explaining and Harnessing
Adversarial Examples", ICLR 2015, arXiv:1412.6572; Eq. 25 of Qian, Chen, Zhang, Wen & Gechter, "Multi-task
variational information bottleneck", arXiv:2007.00339, 2020, doi:10.48550/arXiv.2007.00339) with L the *sum of the
task losses* or one task's loss (``target_task``).

**The units of η** (:data:`ETA_READINGS`, :func:`eta_scale`). The MTVIB paper states neither η's units nor its input
normalisation, and its Table III (undefended STL keeps 77.1 / 70.0 % at η = 0.3) is out of reach of FGSM with
η = 0.3 on [0, 1] pixels. :func:`fgsm_sweep` therefore takes a pixel-space ``scale`` per reading: ``"pixel"`` (η on
[0, 1] pixels, scale 1), ``"std"`` (η on inputs normalised by the dataset's mean/std, i.e. a pixel step η·std; the
usual constants :data:`PIXEL_STD`), ``"pixel255"`` (η on [0, 255] pixels, scale 1/255). Clipping to the valid
pixel range [0, 1] is applied in every reading (``clip=None`` drops it: Eq. 25 as printed has no clip).

**The attack loss** (``loss`` of :func:`fgsm_sweep`): ``"sum"`` ascends the summed task loss and measures every task
on the same adversarial input; ``"per-task"`` attacks task t's own loss when measuring task t (the joint accuracy
then asks each task to be right on its own adversarial input). For independent single-task models (STL, STVIB)
``"per-task"`` is the attack of each model on its own: the gradient of a sum over independent models is the sum of
their input gradients, so the summed attack perturbs each model partly along the *other* model's gradient. PGD (Madry et al. 2018): ``steps``
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

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor

from mtlkit.errors import ConfigError
from mtlkit.metrics import evaluate_outputs
from mtlkit.tasks import Task, stack_losses

if TYPE_CHECKING:
    from mtlkit.data import Split

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


#: How the η of a paper may be read (see the module docstring): the pixel-space step is η · :func:`eta_scale`.
ETA_READINGS: tuple[str, ...] = ("pixel", "std", "pixel255")
EtaReading = Literal["pixel", "std", "pixel255"]
AttackLoss = Literal["sum", "per-task"]
ATTACK_LOSSES: tuple[str, ...] = ("sum", "per-task")

#: Standard deviation of the source images' pixels on [0, 1] (the normalisation constants in common use: MNIST
#: 0.3081, Fashion-MNIST 0.3530), keyed by source (:data:`mtlkit.data.multimnist.VARIANTS`).
PIXEL_STD: dict[str, float] = {"mnist": 0.3081, "fashion": 0.3530}


def eta_scale(reading: str, std: float | None = None) -> float:
    """Pixel-space size of one unit of η under ``reading``: 1 (``"pixel"``), ``std`` (``"std"``), 1/255.

    Example:
        >>> eta_scale("pixel"), eta_scale("std", 0.3081), round(eta_scale("pixel255") * 255, 12)
        (1.0, 0.3081, 1.0)

    Raises:
        ConfigError: unknown reading, or ``"std"`` without a positive ``std``.
    """
    if reading == "pixel":
        return 1.0
    if reading == "pixel255":
        return 1.0 / 255.0
    if reading == "std":
        if std is None or not std > 0:
            raise ConfigError(f"the 'std' reading of η needs the dataset's pixel std (> 0), got {std!r}")
        return float(std)
    raise ConfigError(f"unknown η reading {reading!r}; valid readings are: {', '.join(ETA_READINGS)}")


def fgsm_directions(
    model: Model, tasks: list[Task], x: Tensor, y: dict[str, Tensor], loss: str = "sum"
) -> dict[str, Tensor]:
    """``sign(∇_x L)`` for the attack loss: ``{"*": sign of the summed loss' gradient}`` for ``"sum"``, or one entry
    per task (``{task: sign(∇_x L_task)}``) for ``"per-task"``. Call inside :func:`eval_mode`.

    Raises:
        ConfigError: unknown ``loss``.
    """
    if loss == "sum":
        return {"*": input_gradient(model, tasks, x, y).sign()}
    if loss == "per-task":
        return {t.name: input_gradient(model, tasks, x, y, t.name).sign() for t in tasks}
    raise ConfigError(f"unknown attack loss {loss!r}; valid: {', '.join(ATTACK_LOSSES)}")


def perturb(
    x: Tensor, direction: Tensor, eta: float, scale: float = 1.0, clip: tuple[float, float] | None = (0.0, 1.0)
) -> Tensor:
    """Eq. 25 with η in the units of a reading: ``clip(x + η·scale·direction)`` (no clip for ``clip=None``).

    Example:
        >>> import torch
        >>> perturb(torch.tensor([0.5, 0.99]), torch.tensor([1.0, 1.0]), 0.3, scale=0.1)
        tensor([0.5300, 1.0000])
    """
    eta = _check_eps(eta)
    if eta == 0:
        return x.detach().clone()
    adv = x.detach() + (eta * scale) * direction
    return adv.clamp(*clip) if clip is not None else adv


def fgsm_sweep(
    model: Model,
    tasks: list[Task],
    split: Split,
    etas: Sequence[float],
    scale: float = 1.0,
    loss: str = "sum",
    clip: tuple[float, float] | None = (0.0, 1.0),
    batch_size: int = 500,
    device: torch.device | str = "cpu",
) -> dict[str, dict[str, float]]:
    """``{str(η): metrics}`` of FGSM at every η (pixel step η·``scale``), attacking ``loss`` (``"sum"``/``"per-task"``).

    The direction is taken once per batch at the clean input (it does not depend on η, Eq. 25); with ``"per-task"``
    task t's outputs are read on the input attacked along ``sign(∇_x L_t)``. ``scale=1``, ``loss="sum"`` gives the
    numbers of :func:`mtlkit.evaluation.robustness_curve` (a test checks it).

    Raises:
        ConfigError: no η, unknown ``loss``, ``scale`` <= 0, ``batch_size`` < 1.
    """
    if len(etas) == 0:
        raise ConfigError("fgsm_sweep needs at least one attack strength")
    if not scale > 0 or batch_size < 1:
        raise ConfigError(f"fgsm_sweep needs scale > 0 and batch_size >= 1, got {scale}, {batch_size}")
    if loss not in ATTACK_LOSSES:
        raise ConfigError(f"unknown attack loss {loss!r}; valid: {', '.join(ATTACK_LOSSES)}")
    es = [_check_eps(e) for e in etas]
    dev = torch.device(device)
    outs: dict[float, dict[str, list[Tensor]]] = {e: {t.name: [] for t in tasks} for e in es}
    with eval_mode(model):
        for s in range(0, len(split), batch_size):
            x = split.x[s : s + batch_size].to(dev)
            y = {k: v[s : s + batch_size].to(dev) for k, v in split.y.items()}
            dirs = fgsm_directions(model, tasks, x, y, loss) if any(e > 0 for e in es) else {}
            for e in es:
                with torch.no_grad():
                    if e == 0 or loss == "sum":  # one adversarial input read by every task
                        out = model(perturb(x, dirs["*"], e, scale, clip) if e > 0 else x)
                        for t in tasks:
                            outs[e][t.name].append(out[t.name].float().cpu())
                    else:  # each task on the input attacked along its own loss
                        for t in tasks:
                            out = model(perturb(x, dirs[t.name], e, scale, clip))
                            outs[e][t.name].append(out[t.name].float().cpu())
    return {str(e): evaluate_outputs(tasks, {k: torch.cat(v) for k, v in outs[e].items()}, split.y) for e in es}
