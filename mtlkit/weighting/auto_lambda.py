"""Auto-Lambda: task weights learned by the meta-gradient of a look-ahead step (bilevel optimisation).

Liu, Liang, Johns & Davison, "Auto-Lambda: Disentangling Dynamic Task Relationships", Transactions on Machine
Learning Research (TMLR), 2022 (arXiv:2202.03091, DOI 10.48550/arXiv.2202.03091). The weighting is
:class:`AutoLambda`; the :class:`AutoLambdaMeta` callback gives it what a weighting alone cannot see (the model,
the optimizer, the data), see the class docstring.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from mtlkit._registry import METHODS
from mtlkit.callbacks import Callback
from mtlkit.errors import ConfigError
from mtlkit.tasks import Task, stack_losses
from mtlkit.weighting._base import StepContext, Weighting

if TYPE_CHECKING:
    from mtlkit.data import Split
    from mtlkit.train import Trainer

log = logging.getLogger("mtlkit")

_SPLITS = ("train", "val")


@dataclass
class _Binding:
    """What the meta step needs from the run (held outside nn.Module's registries: never in the state_dict)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    tasks: list[Task]
    split: Split
    batch_size: int
    seed: int
    primary: Tensor  # (T,) 1.0 for the tasks of the meta (validation) objective, 0.0 otherwise


def _group_of(optimizer: torch.optim.Optimizer, p: Tensor) -> dict[str, Any]:
    """The optimizer's parameter group that holds ``p``.

    Raises:
        ConfigError: no group holds it (the model's parameters must all be trained by the run's optimizer).
    """
    for group in optimizer.param_groups:
        if any(q is p for q in group["params"]):
            return group
    raise ConfigError(f"a model parameter of shape {tuple(p.shape)} is in none of the optimizer's groups")


def _primary_names(primary: Sequence[str] | str | None) -> tuple[str, ...] | None:
    if primary is None:
        return None
    names = [s.strip() for s in primary.split(",")] if isinstance(primary, str) else [str(s) for s in primary]
    names = [n for n in names if n]
    if not names:
        raise ConfigError(f"Auto-Lambda's primary tasks must name at least one task, got {primary!r}")
    return tuple(names)


@METHODS.register("auto_lambda")
class AutoLambda(Weighting):
    r"""Auto-Lambda (Liu et al. 2022): weights λ stepped (Adam) along −α ⟨∇_θ L_i(θ), ∇_{θ'} L_val(θ')⟩.

    Task weights learned from a one-step look-ahead of the model (bilevel optimisation).

    Liu, Liang, Johns & Davison, "Auto-Lambda: Disentangling Dynamic Task Relationships", TMLR 2022
    (arXiv:2202.03091, DOI 10.48550/arXiv.2202.03091). The training loss is ``Σ_i λ_i L_i(θ)``; the weights solve
    the upper problem of the bilevel programme ``min_λ L_val(θ*(λ))`` (the sum of the *primary* tasks' losses on
    held-out data), with ``θ*(λ)`` approximated by one look-ahead step of the model (the paper's Sec. 3, as in
    DARTS):

        θ' = θ − α ∇_θ Σ_i λ_i L_i(θ)                                  (look-ahead; the same batch as the step)
        ∇_λ L_val(θ') = −α ∇²_{λ,θ} Σ_i λ_i L_i(θ) · ∇_{θ'} L_val(θ')  (chain rule; L_val does not read λ)
                      = −α (⟨∇_θ L_i(θ), v⟩)_i,   v = ∇_{θ'} L_val(θ')

    and λ takes one Adam step along that gradient before the model's step (the authors' trainer). The equation
    numbers of the paper could not be checked against its text here, so none is quoted; the form is the one of
    the authors' code (lorenmt/auto-lambda, ``auto_lambda.py``), including the look-ahead
    ``θ' = θ − α(μ·m + ∇ + wd·θ)`` with the optimizer's learning rate α, its weight decay wd and, for SGD, its
    momentum buffer m (then θ' is exactly the parameters SGD's next step would give; for Adam the look-ahead is a
    plain gradient step, as in their code).

    The second-order term, and why it is computed exactly: the authors approximate the mixed derivative by a
    central finite difference, ``[∇_λ L(θ + εv) − ∇_λ L(θ − εv)]/(2ε)`` with ``ε = 0.01/||v||``, i.e.
    ``(L_i(θ+εv) − L_i(θ−εv))/(2ε)``, which needs two more forward passes of the *training batch*. Here the
    quantity it approximates, ``⟨∇_θ L_i(θ), v⟩``, is computed exactly from the losses' graph (one backward with
    ``create_graph`` for ``∇_θ Σ_i u_i L_i`` at ``u = λ``, which is also the look-ahead's gradient, and one
    backward of its inner product with v w.r.t. u): it is the finite difference's limit (error O(ε²), tested
    against the authors' formula), and the weighting never sees the training batch itself, only the losses.
    Cost per step: that double backward, one forward and backward of the look-ahead model on a meta batch.

    Choices where the paper leaves room, and why:

    * Meta data (``meta_split``): ``"train"`` (default) draws the meta batch from the *training* split, as the
      authors' trainers do ("a copy of train_loader with different data order, used for Auto-Lambda
      meta-update"); it also keeps the validation split for model selection only. ``"val"`` uses the validation
      split (the paper's formulation), at the price of selecting on data the weights were fitted to.
    * Primary tasks (``primary``): the tasks of the meta objective; default every (non-auxiliary) task, the
      paper's multi-task setting; name some tasks for the auxiliary-learning setting.
    * The weights are not constrained (no positivity or sum), as in the paper and the code; init 0.1 and Adam with
      ``lr = 1e-4`` are the authors' defaults (``--autol_init``, ``--autol_lr``).
    * Order within a step: the meta step comes first and the step's weighted losses use the new λ (as the
      authors' trainer, which updates λ before the model's step on the same training batch).

    Contract with the loop: a weighting sees only the losses and a :class:`StepContext`; the look-ahead needs the
    model, the optimizer and a meta batch. The :class:`AutoLambdaMeta` callback binds them (:meth:`bind`) when the
    trainer is built. Unbound (no callback in the run), the weights stay at their initial value and this is said
    once in the log. The meta batch is drawn by a generator seeded with ``(seed, step)`` (no state to save; a
    resumed run draws the same batches); λ and the Adam moments are buffers (in ``state_dict``).

    Args:
        init: the initial weight of every task (authors: 0.1).
        lr: Adam's learning rate for λ (authors: 1e-4).
        betas, eps: Adam's other hyper-parameters (PyTorch's defaults, which the authors use).
        primary: task names of the meta objective (a list or a comma-separated string); None: all tasks.
        meta_split: ``"train"`` or ``"val"``: where the meta batch comes from.
        meta_batch_size: its size (0: the run's ``train.batch_size``).

    Example:
        >>> import torch
        >>> w = AutoLambda(init=0.5)
        >>> w.setup(2)
        >>> w(torch.tensor([1.0, 3.0])), w.weights()      # unbound: λ stays at init
        (tensor([0.5000, 1.5000]), tensor([0.5000, 0.5000]))
    """

    reads_gradients = True  # data parallel: its gradients go through StepContext.reduce

    requires_setup = False
    lam: Tensor  # buffers (created by setup): the weights, Adam's moments and its step count
    exp_avg: Tensor
    exp_avg_sq: Tensor
    meta_steps: Tensor

    def __init__(
        self,
        init: float = 0.1,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        primary: Sequence[str] | str | None = None,
        meta_split: str = "train",
        meta_batch_size: int = 0,
    ) -> None:
        super().__init__()
        if not isinstance(init, (int, float)) or init != init:
            raise ConfigError(f"Auto-Lambda's init must be a number, got {init!r}")
        if not isinstance(lr, (int, float)) or not lr >= 0:
            raise ConfigError(f"Auto-Lambda's lr must be a number >= 0, got {lr!r}")
        try:
            b1, b2 = (float(b) for b in betas)
        except (TypeError, ValueError):
            raise ConfigError(f"Auto-Lambda's betas must be two numbers in [0, 1), got {betas!r}") from None
        if not (0 <= b1 < 1 and 0 <= b2 < 1):
            raise ConfigError(f"Auto-Lambda's betas must be two numbers in [0, 1), got {betas!r}")
        if not isinstance(eps, (int, float)) or not eps > 0:
            raise ConfigError(f"Auto-Lambda's eps must be > 0, got {eps!r}")
        if meta_split not in _SPLITS:
            raise ConfigError(f"Auto-Lambda's meta_split must be one of {', '.join(_SPLITS)}, got {meta_split!r}")
        if isinstance(meta_batch_size, bool) or not isinstance(meta_batch_size, int) or meta_batch_size < 0:
            raise ConfigError(f"Auto-Lambda's meta_batch_size must be an int >= 0, got {meta_batch_size!r}")
        self.init, self.lr, self.betas, self.eps = float(init), float(lr), (b1, b2), float(eps)
        self.primary = _primary_names(primary)
        self.meta_split, self.meta_batch_size = meta_split, meta_batch_size
        self._bound: _Binding | None = None
        self._warned = False

    def _build(self, num_tasks: int) -> None:
        self.register_buffer("lam", torch.full((num_tasks,), self.init))
        self.register_buffer("exp_avg", torch.zeros(num_tasks))
        self.register_buffer("exp_avg_sq", torch.zeros(num_tasks))
        self.register_buffer("meta_steps", torch.zeros((), dtype=torch.long))

    # ------------------------------------------------------------------ binding
    def bind(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        tasks: list[Task],
        split: Split,
        batch_size: int,
        seed: int = 0,
    ) -> None:
        """Give the weighting what the look-ahead needs: the model (the losses' parameters), its optimizer (α,
        momentum, weight decay), the tasks in loss order (``Task.auxiliary`` ones are never primary by default),
        the split to draw meta batches of ``batch_size`` from, and the seed of those draws.

        Raises:
            ConfigError: a primary task is not one of ``tasks``, or no task is primary.
        """
        names = [t.name for t in tasks]
        if self.primary is not None:
            unknown = [n for n in self.primary if n not in names]
            if unknown:
                raise ConfigError(
                    f"Auto-Lambda's primary task(s) {unknown} are not tasks of this run; its tasks are: "
                    f"{', '.join(names)}"
                )
            mask = [1.0 if n in self.primary else 0.0 for n in names]
        else:
            mask = [0.0 if t.auxiliary else 1.0 for t in tasks]
        if not any(mask):
            raise ConfigError("Auto-Lambda needs at least one primary task for its meta objective")
        if len(split) == 0:
            raise ConfigError(f"Auto-Lambda's meta split {self.meta_split!r} is empty")
        self.setup(len(tasks))
        self._bound = _Binding(
            model, optimizer, list(tasks), split, min(batch_size, len(split)), int(seed), torch.tensor(mask)
        )

    # ------------------------------------------------------------------ the weighting
    def forward(self, losses: Tensor, ctx: StepContext | None = None) -> Tensor:
        self._prepare(losses)
        if self._updating(losses):
            if self._bound is not None:
                self._meta_step(losses, 0 if ctx is None else ctx.step, None if ctx is None else ctx.reduce)
            elif not self._warned:
                log.warning(
                    "mtlkit: Auto-Lambda is not bound to a run (no AutoLambdaMeta callback): its weights stay at "
                    f"their initial value {self.init:g}"
                )
                self._warned = True
        return self.lam.clone() * losses  # a copy: the next meta step must not touch this step's graph

    def weights(self) -> Tensor | None:
        return None if self.num_tasks is None else self.lam.detach().clone()

    def meta_gradient(self, losses: Tensor, step: int = 0, reduce: Callable[[Tensor], Tensor] | None = None) -> Tensor:
        """``∇_λ L_val(θ')`` for the training ``losses`` (with their graph) at the bound model's current θ: the
        look-ahead θ' (see the class docstring), a meta batch drawn for ``step``, and the exact mixed term.

        Raises:
            RuntimeError: the weighting is not bound (:meth:`bind`).
        """
        b = self._bound
        if b is None:
            raise RuntimeError("Auto-Lambda is not bound: call bind(model, optimizer, tasks, split, batch_size)")
        named = [(n, p) for n, p in b.model.named_parameters() if p.requires_grad]
        params = [p for _, p in named]
        u = self.lam.detach().clone().requires_grad_(True)
        # ∇_θ Σ_i u_i L_i with its graph in u: the look-ahead's gradient (at u = λ) and, below, the mixed term.
        grads = torch.autograd.grad(
            losses, params, grad_outputs=u.to(losses.dtype), create_graph=True, retain_graph=True, allow_unused=True
        )
        lookahead: dict[str, Tensor] = {}
        rates: list[float] = []
        with torch.no_grad():
            for (name, p), g in zip(named, grads, strict=True):
                group = _group_of(b.optimizer, p)
                # data parallel (reduce): the look-ahead steps along the global batch's gradient
                d = torch.zeros_like(p) if g is None else (g.detach().clone() if reduce is None else reduce(g.detach()))
                d.add_(p, alpha=float(group.get("weight_decay", 0.0)))
                if "momentum" in group:  # SGD: θ' is the parameters its next step gives
                    buf = b.optimizer.state.get(p, {}).get("momentum_buffer")
                    if buf is not None:
                        d.add_(buf, alpha=float(group["momentum"]))
                rates.append(float(group["lr"]))
                lookahead[name] = (p - rates[-1] * d).requires_grad_(True)
        # The meta batch, through the look-ahead parameters (copies of the buffers: the model's stay as they are).
        gen = torch.Generator().manual_seed((b.seed * 1_000_003 + int(step)) * 2 + 1)
        idx = torch.randperm(len(b.split), generator=gen)[: b.batch_size]
        device = params[0].device
        x = b.split.x[idx].to(device)
        ys = {k: v[idx].to(device) for k, v in b.split.y.items()}
        buffers = {n: t.clone() for n, t in b.model.named_buffers()}
        out = torch.func.functional_call(b.model, {**lookahead, **buffers}, (x,))
        val = stack_losses(b.tasks, out, ys)
        val_loss = (b.primary.to(val.device, val.dtype) * val).sum()
        v = torch.autograd.grad(val_loss, list(lookahead.values()), allow_unused=True)
        # ∂θ'/∂λ_i = −α ∇_θ L_i (α per parameter group), so ∇_λ L_val(θ') = −∂/∂u Σ_k α_k ⟨∇_{θ_k} Σ u_i L_i, v_k⟩.
        terms = [
            a * (g * vi).sum() for a, g, vi in zip(rates, grads, v, strict=True) if g is not None and vi is not None
        ]
        inner = sum(terms[1:], terms[0]) if terms else None
        if inner is None or not inner.requires_grad:  # the meta objective reaches no task's parameters
            return torch.zeros_like(self.lam)
        (mixed,) = torch.autograd.grad(inner, u)
        if reduce is not None:  # linear in this rank's training gradients: their mean is the global batch's term
            mixed = reduce(mixed)
        return (-mixed).to(self.lam.dtype)

    def _meta_step(self, losses: Tensor, step: int, reduce: Callable[[Tensor], Tensor] | None = None) -> None:
        """One Adam step of λ along :meth:`meta_gradient` (PyTorch's Adam, bias-corrected, no weight decay)."""
        grad = self.meta_gradient(losses, step, reduce).detach()
        if not bool(torch.isfinite(grad).all()):
            raise FloatingPointError(f"Auto-Lambda's meta-gradient is not finite: {grad.tolist()}")
        b1, b2 = self.betas
        with torch.no_grad():
            self.meta_steps.add_(1)
            t = int(self.meta_steps)
            self.exp_avg.mul_(b1).add_(grad, alpha=1 - b1)
            self.exp_avg_sq.mul_(b2).addcmul_(grad, grad, value=1 - b2)
            bc1, bc2 = 1 - b1**t, 1 - b2**t
            denom = (self.exp_avg_sq.sqrt() / bc2**0.5).add_(self.eps)
            self.lam.addcdiv_(self.exp_avg, denom, value=-self.lr / bc1)

    def callbacks(self) -> list[Callback]:
        """The callback that binds this weighting to the run (the trainer adds it to every run of this method)."""
        return [AutoLambdaMeta()]


class AutoLambdaMeta(Callback):
    """Binds the run's :class:`AutoLambda` weighting to the trainer's model, optimizer, tasks and meta split.

    In ``check`` (when the trainer is built, before anything is written): the meta batches come from the split
    ``meta_split`` names (``trainer.data.train`` or ``.val``), of ``meta_batch_size`` (default
    ``train.batch_size``), seeded with ``train.seed``. Stateless (the weighting's buffers hold λ and Adam's moments).

    Raises (in ``check``): :class:`~mtlkit.errors.ConfigError` when the run's weighting is not Auto-Lambda, or for
    an unknown primary task.

    Example:
        >>> AutoLambdaMeta().key()
        'auto_lambda_meta'
    """

    name = "auto_lambda_meta"

    def check(self, trainer: Trainer) -> None:
        w = trainer.method.weighting
        if not isinstance(w, AutoLambda):
            raise ConfigError(
                f"the AutoLambdaMeta callback drives the Auto-Lambda weighting, but this run's method is "
                f"{trainer.method.name!r} ({type(w).__name__}): use method 'auto_lambda'"
            )
        tc = trainer.cfg.train
        split = trainer.data.train if w.meta_split == "train" else trainer.data.val
        w.bind(
            trainer.model, trainer.optimizer, trainer.train_tasks, split, w.meta_batch_size or tc.batch_size, tc.seed
        )

    def on_train_start(self, trainer: Trainer) -> None:
        # A callback may have replaced the optimizer or the method since check(): bind what the loop uses now.
        self.check(trainer)


__all__ = ["AutoLambda", "AutoLambdaMeta"]
