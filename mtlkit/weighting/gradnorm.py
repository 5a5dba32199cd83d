"""GradNorm: gradient normalisation for adaptive loss balancing.

Chen, Badrinarayanan, Lee & Rabinovich, "GradNorm: Gradient normalization for adaptive loss balancing in deep
multitask networks", ICML 2018, Sec. 3.2, Eq. 1-2 and Algorithm 1.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mtlkit._registry import METHODS
from mtlkit.engine.autodiff import per_task_grads
from mtlkit.errors import ConfigError
from mtlkit.weighting._base import StepContext, Weighting
from mtlkit.weighting._optim import adam_step, check_optimizer, sgd_step


def _last_shared_layer(ctx: StepContext | None) -> list[Tensor]:
    """``ctx.last_shared_layer``, or else the last shared parameter with ``dim() >= 2``."""
    if ctx is not None and len(ctx.last_shared_layer):
        return list(ctx.last_shared_layer)
    if ctx is not None:
        mats = [p for p in ctx.shared_params if p.dim() >= 2 and p.requires_grad]
        if mats:
            return [mats[-1]]
    raise ValueError(
        "GradNorm needs the shared layer to take gradient norms at: pass "
        "StepContext(last_shared_layer=[W]) or StepContext(shared_params=...) to forward"
    )


@METHODS.register("gradnorm")
class GradNorm(Weighting):
    r"""GradNorm (Chen et al. 2018) at the last shared layer; weights updated by their own Adam/SGD.

    GradNorm: learn task weights that equalise the tasks' gradient norms, scaled by their training rates.

    At each training step t (Algorithm 1), with ``W`` the chosen shared layer and ``w`` the current weights:

    * ``G_t = ||∇_W w_t L_t||₂ = w_t·||∇_W L_t||₂`` and ``Ḡ = mean_t G_t`` (Eq. 1 definitions);
    * ``L̃_t = L_t / L_t(0)`` (the first training step's loss) and ``r_t = L̃_t / mean L̃`` (inverse training rate);
    * ``L_grad = Σ_t |G_t − Ḡ·r_t^α|₁`` (Eq. 2), whose target ``Ḡ·r_t^α`` is a constant (paper, Sec. 3.2);
    * ``w ← w − lr·∂L_grad/∂w`` (SGD) or an Adam step on ``∂L_grad/∂w``, then ``w ← T·w/Σw``.

    ``∂L_grad/∂w_t = sign(G_t − Ḡ r_t^α)·||∇_W L_t||`` is computed analytically (one ``per_task_grads`` call on
    ``W``, i.e. a backward per task through the part of the graph above ``W``, retaining the graph). The weighted
    losses returned use the weights *before* this step's update, as in Algorithm 1, where the network and the
    weights are updated from the same forward pass.

    Choices (differences from LibMTL noted):
      * ``W`` is ``ctx.last_shared_layer`` (fallback: the last shared parameter with ``dim >= 2``), as the paper.
      * The weights are updated by this class with its own optimiser (``optimizer="adam"`` by default, scale-free
        since ``||∇L_t||`` has arbitrary units; or ``"sgd"``) and learning rate ``lr``; LibMTL instead trains
        ``T·softmax(logits)`` with the model's optimiser and starts only after one epoch, with the first epoch's
        mean loss as ``L(0)``. We follow the paper: ``L(0)`` is the first training step's loss.
      * Weights are clamped to ``>= min_weight`` before renormalising (the paper does not say what happens if an
        SGD step would make a weight negative).
      * In evaluation mode or without grad no update happens.

    The trainer must pass ``StepContext(last_shared_layer=...)`` (or ``shared_params``) to every training forward.
    Nothing is added to the optimiser: the weights are buffers.

    Example:
        >>> import torch
        >>> W = torch.nn.Parameter(torch.eye(2))
        >>> x = W @ torch.tensor([1.0, 1.0])
        >>> losses = torch.stack([x[0] ** 2, 3 * x[1] ** 2])
        >>> gn = GradNorm(alpha=1.5, lr=0.01, optimizer="sgd")
        >>> gn(losses, StepContext(last_shared_layer=[W]))  # first step: w = 1
        tensor([1., 3.], grad_fn=<MulBackward0>)
        >>> gn.weights(), round(float(gn.weights().sum()), 6)  # task 1's gradient is larger: its weight drops
        (tensor([1.0582, 0.9418]), 2.0)
    """

    reads_gradients = True  # data parallel: its gradients go through StepContext.reduce

    task_weights: Tensor
    initial_losses: Tensor
    has_initial: Tensor
    exp_avg: Tensor
    exp_avg_sq: Tensor
    step: Tensor
    grad_norms: Tensor

    def __init__(
        self,
        alpha: float = 1.5,
        lr: float = 0.025,
        optimizer: str = "adam",
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        min_weight: float = 1e-3,
    ) -> None:
        super().__init__()
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha < 0:
            raise ConfigError(f"alpha (restoring-force exponent) must be a finite number >= 0, got {alpha!r}")
        if not (isinstance(min_weight, (int, float)) and 0 < min_weight < 1):
            raise ConfigError(f"min_weight must be in (0, 1), got {min_weight!r}")
        self.alpha = float(alpha)
        self.lr = float(lr)
        self.optimizer = check_optimizer(optimizer, lr)
        self.betas = (float(betas[0]), float(betas[1]))
        self.eps = float(eps)
        self.min_weight = float(min_weight)

    def _build(self, num_tasks: int) -> None:
        self.register_buffer("task_weights", torch.ones(num_tasks))
        self.register_buffer("initial_losses", torch.zeros(num_tasks))
        self.register_buffer("has_initial", torch.zeros((), dtype=torch.bool))
        self.register_buffer("exp_avg", torch.zeros(num_tasks))
        self.register_buffer("exp_avg_sq", torch.zeros(num_tasks))
        self.register_buffer("step", torch.zeros(()))
        # For logging only: ||∇_W L_t|| of the last update.
        self.register_buffer("grad_norms", torch.zeros(num_tasks), persistent=False)

    # Hooks that the MTMLAN TDB variant overrides.
    def _penalty(self) -> Tensor:
        """Per-task factor in front of each |G_t − target_t| term (1 for GradNorm)."""
        return torch.ones_like(self.task_weights)

    def _unweighted_grad_norms(self, losses: Tensor, ctx: StepContext | None) -> Tensor:
        """``||∇_W L_t||`` for every task t, at the shared layer W."""
        J = per_task_grads(losses, _last_shared_layer(ctx), retain_graph=True)
        return (J if ctx is None else ctx.reduce(J.detach())).norm(dim=1)  # the global batch's (data parallel)

    def weights(self) -> Tensor | None:
        return None if self.num_tasks is None else self.task_weights.clone()

    def forward(self, losses: Tensor, ctx: StepContext | None = None) -> Tensor:
        self._prepare(losses)
        out = self.task_weights.to(device=losses.device, dtype=losses.dtype).clone() * losses
        if self._updating(losses):
            self._update(losses, ctx)
        return out

    @torch.no_grad()
    def _first_losses(self, detached: Tensor) -> None:
        if not bool(self.has_initial):
            if bool((detached <= 0).any()):
                raise ValueError(
                    f"{type(self).__name__} divides by the first step's losses L(0), which must be "
                    f"positive; got {detached.tolist()}"
                )
            self.initial_losses.copy_(detached)
            self.has_initial.fill_(True)

    def _update(self, losses: Tensor, ctx: StepContext | None) -> None:
        with torch.enable_grad():
            norms = self._unweighted_grad_norms(losses, ctx).detach().to(self.task_weights)
        with torch.no_grad():
            detached = losses.detach().to(self.task_weights)
            self._first_losses(detached)
            self.grad_norms.copy_(norms)
            w = self.task_weights
            G = w * norms  # G_t = ||∇ w_t L_t|| = w_t ||∇ L_t||
            ratio = detached / self.initial_losses  # L̃_t
            r = ratio / ratio.mean()  # r_t
            target = G.mean() * r.pow(self.alpha)  # constant target Ḡ·r_t^α
            grad = self._penalty().to(w) * torch.sign(G - target) * norms  # ∂L_grad/∂w_t
            if self.optimizer == "adam":
                adam_step(w, grad, self.exp_avg, self.exp_avg_sq, self.step, self.lr, self.betas, self.eps)
            else:
                self.step.add_(1)
                sgd_step(w, grad, self.lr)
            w.clamp_(min=self.min_weight)
            w.mul_(w.numel() / w.sum())  # renormalise: Σ w = T
