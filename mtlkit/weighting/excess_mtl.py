"""ExcessMTL: multi-task learning with excess risks.

He, Zhou, Zhang, Yun, Xu, Zeng, Chilimbi & Zhao, "Robust Multi-Task Learning with Excess Risks", ICML 2024
(PMLR 235, he24n; arXiv:2402.02009, OpenReview JzWFmMySpn): the excess risk of each task estimated by a Taylor
expansion with a diagonal (AdaGrad-like) Hessian (Eq. 6-7), task weights updated by exponentiated gradient ascent on
the normalised excess risks (Eq. 9), following the official implementation (github.com/yifei-he/ExcessMTL,
``LibMTL/LibMTL/weighting/ExcessMTL.py``, the same as LibMTL's ``weighting/ExcessMTL.py``). The equation numbers are
those TorchJD's port cites (its formulas match the code's); the paper's text was not available here to check them.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from mtlkit._registry import METHODS
from mtlkit.engine.autodiff import per_task_grads
from mtlkit.errors import ConfigError
from mtlkit.weighting._base import StepContext, Weighting

GRAD_AT = ("shared_params", "last_shared_layer")


def _gradient_params(ctx: StepContext | None, grad_at: str) -> list[Tensor]:
    """The parameters whose per-task gradients ExcessMTL accumulates (those of ``ctx`` that require grad)."""
    if ctx is not None:
        chosen = ctx.shared_params if grad_at == "shared_params" else ctx.last_shared_layer
        if grad_at == "last_shared_layer" and not len(chosen):
            mats = [p for p in ctx.shared_params if p.dim() >= 2 and p.requires_grad]
            chosen = mats[-1:]
        params = [p for p in chosen if p.requires_grad]
        if params:
            return params
    raise ValueError(
        f"ExcessMTL (grad_at={grad_at!r}) needs the per-task gradients of the shared parameters: pass "
        f"StepContext(shared_params=...) (or last_shared_layer=[W]) to every training forward"
    )


@METHODS.register("excess_mtl")
class ExcessMTL(Weighting):
    r"""ExcessMTL (He et al. 2024): weights follow each task's estimated excess risk, by exponentiated gradient.

    ExcessMTL: task weights raised multiplicatively for tasks far from convergence (large estimated excess risk).

    At every training step t, with ``g_i = ∇_θ L_i`` the gradient of task i's loss w.r.t. the shared parameters θ:

    * ``S_i ← S_i + g_i ⊙ g_i`` (accumulated squared gradients; AdaGrad's diagonal, Eq. 7), then
      ``e_i = Σ_k g_ik² / sqrt(S_ik + ε)``: the excess-risk estimate ``gᵀ H⁻¹ g`` of the Taylor expansion (Eq. 6)
      with the diagonal approximation ``H ≈ diag(sqrt(S + ε))`` (the constant ½ cancels in the normalisation);
    * step 0: the baseline ``e⁰ = e`` is stored and the weights stay 1;
    * later: ``r_i = e_i / e⁰_i`` and ``w_i ← w_i·exp(η r_i)``, ``w ← T·w/Σw`` (Eq. 9), applied to *this* step's
      losses (the official code updates the weights before the backward pass).

    Dividing by the task's own baseline makes ``r`` free of each loss's scale: ``L_i → c·L_i`` multiplies ``g_i``
    by c, ``sqrt(S_i)`` by c, hence ``e_i`` and ``e⁰_i`` by c (up to ε), so the weights do not change.

    What exactly is accumulated, as in the official code (checked line by line): ``S`` sums the squares of the
    *full* per-task gradients of all shared parameters (``_get_grads(mode='autograd')``, one row per task), the
    current step's included before the division; ``ε = 1e-7`` inside the square root; the baseline is the first
    step's ``e`` (its flag ``first_epoch`` is in fact the first call); the weights start at 1 and are renormalised to sum to T (the paper states them on the simplex:
    the same direction, on EW's scale). With ``rep_grad`` the official code would use the batch-summed gradients
    w.r.t. the representation instead; here ``grad_at`` chooses ``"shared_params"`` (official default) or
    ``"last_shared_layer"`` (cheaper: ``S`` is T x #weights of that layer only).

    Choices:
      * ``step_size`` η defaults to the official ``robust_step_size = 1e-2``; ``eps = 1e-7`` is the official ε.
      * ``baseline_steps = k``: the baseline is the mean ``e`` of the first k steps, with the weights kept at 1
        meanwhile; ``k = 1`` (default) is the official code. (TorchJD's port reports that the paper's Appendix
        C.1 gathers these statistics over several epochs; the official code uses one step.)
      * The multiplicative update is carried out in log space (``log w += η r``, ``w = T·softmax``), which is the
        same update without overflow of ``exp(η r)``.
      * A task whose baseline ``e⁰`` is 0 (no gradient at all on the shared parameters) makes ``r`` infinite: a
        ValueError names it rather than letting NaN weights through.
      * In evaluation mode or without grad no state changes.

    Contract with the loop: every training forward needs ``StepContext(shared_params=...)`` (or
    ``last_shared_layer``) for parameters the losses' graph reaches; ExcessMTL then runs T ``autograd.grad`` calls
    on them with ``retain_graph=True`` (one backward per task through the shared network, as the official code), so
    the loop's own backward of the returned losses still works. mtlkit's Trainer does this (as for GradNorm). The
    state (``S``: T x #parameters floats, in the checkpoint too; log-weights, baseline, step count) is in buffers;
    ``S`` takes its size from the first step (the shared parameters must not change size afterwards).

    Scale: ``sum`` (weights sum to T; the returned entries are ``w_i L_i``).

    Example:
        >>> import torch
        >>> theta = torch.nn.Parameter(torch.tensor([1.0, 1.0]))
        >>> ex = ExcessMTL(step_size=0.5)
        >>> def step(a):  # L_0 = θ_0², L_1 = a·θ_1²: the gradients are 2θ_0 and 2aθ_1
        ...     return ex(torch.stack([theta[0] ** 2, a * theta[1] ** 2]), StepContext(shared_params=[theta]))
        >>> _ = step(1.0); ex.weights()  # step 0: the baseline, weights 1
        tensor([1., 1.])
        >>> _ = step(3.0); ex.weights()  # task 1's gradient tripled: its excess risk rose, so did its weight
        tensor([0.5110, 1.4890])
    """

    reads_gradients = True  # data parallel: its gradients go through StepContext.reduce

    log_weights: Tensor
    baseline: Tensor
    steps: Tensor
    grad_sq_sum: Tensor
    excess_risks: Tensor

    def __init__(
        self,
        step_size: float = 1e-2,
        eps: float = 1e-7,
        baseline_steps: int = 1,
        grad_at: str = "shared_params",
    ) -> None:
        super().__init__()
        for name, v in (("step_size", step_size), ("eps", eps)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ConfigError(f"ExcessMTL {name} must be a positive finite number, got {v!r}")
        if isinstance(baseline_steps, bool) or not isinstance(baseline_steps, int) or baseline_steps < 1:
            raise ConfigError(f"ExcessMTL baseline_steps must be an int >= 1, got {baseline_steps!r}")
        if grad_at not in GRAD_AT:
            raise ConfigError(f"unknown ExcessMTL grad_at {grad_at!r}; valid values are: {', '.join(GRAD_AT)}")
        self.step_size, self.eps = float(step_size), float(eps)
        self.baseline_steps, self.grad_at = baseline_steps, grad_at

    def _build(self, num_tasks: int) -> None:
        self.register_buffer("log_weights", torch.zeros(num_tasks))
        self.register_buffer("baseline", torch.zeros(num_tasks))  # the running sum until baseline_steps are seen
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("grad_sq_sum", torch.zeros(num_tasks, 0))  # T x P once the first step has run
        self.register_buffer("excess_risks", torch.zeros(num_tasks), persistent=False)  # last e, for inspection

    def _load_from_state_dict(self, state_dict: Any, prefix: str, *args: Any, **kwargs: Any) -> None:
        # S's size is that of the checkpoint's parameters: make room for it before the copy
        saved = state_dict.get(prefix + "grad_sq_sum")
        if isinstance(saved, Tensor) and self.num_tasks is not None and saved.shape != self.grad_sq_sum.shape:
            self.grad_sq_sum = torch.zeros(saved.shape, dtype=self.grad_sq_sum.dtype, device=self.grad_sq_sum.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def weights(self) -> Tensor | None:
        return None if self.num_tasks is None else self.num_tasks * torch.softmax(self.log_weights, dim=0)

    def forward(self, losses: Tensor, ctx: StepContext | None = None) -> Tensor:
        T = self._prepare(losses)
        if self._updating(losses):
            self._update(losses, ctx)
        w = T * torch.softmax(self.log_weights, dim=0)
        return w.to(device=losses.device, dtype=losses.dtype) * losses

    def _update(self, losses: Tensor, ctx: StepContext | None) -> None:
        params = _gradient_params(ctx, self.grad_at)
        with torch.enable_grad():
            J = per_task_grads(losses, params, retain_graph=True).detach()
            if ctx is not None:
                J = ctx.reduce(J)  # data parallel: the global batch's gradients
        with torch.no_grad():
            if self.grad_sq_sum.numel() == 0:
                self.grad_sq_sum = J.new_zeros(J.shape, dtype=self.log_weights.dtype)
            elif self.grad_sq_sum.shape != J.shape:
                raise ValueError(
                    f"ExcessMTL accumulated squared gradients of {self.grad_sq_sum.shape[1]} shared parameter "
                    f"values, but this step's shared parameters have {J.shape[1]}: they must not change size"
                )
            sq = J.to(self.grad_sq_sum).square()
            self.grad_sq_sum.add_(sq)  # an absent task's row is 0 (partial labels): its sum stays
            risk = (sq / torch.sqrt(self.grad_sq_sum + self.eps)).sum(dim=1)  # e_i ≈ g_iᵀ H_i⁻¹ g_i
            present = None if ctx is None else ctx.present
            if present is not None and int(self.steps) >= self.baseline_steps:
                # a task without labels in this batch keeps its last estimate (and so its weight's drift)
                risk = torch.where(present.to(risk.device), risk, self.excess_risks.to(risk))
            self.excess_risks.copy_(risk)
            n = int(self.steps)
            self.steps.add_(1)
            if n < self.baseline_steps:
                self.baseline.add_(risk.to(self.baseline))
                if n == self.baseline_steps - 1:
                    self.baseline.div_(self.baseline_steps)
                    self._check_baseline(ctx)
                return
            r = risk.to(self.baseline) / self.baseline
            lw = self.log_weights.add_(self.step_size * r)
            lw.sub_(lw.max())  # softmax-invariant; keeps the log-weights bounded over long runs

    def _check_baseline(self, ctx: StepContext | None) -> None:
        bad = [i for i, v in enumerate(self.baseline.tolist()) if not (math.isfinite(v) and v > 0)]
        if bad:
            names = list(ctx.task_names) if ctx is not None and len(ctx.task_names) else []
            who = ", ".join(names[i] if i < len(names) else f"#{i}" for i in bad)
            raise ValueError(
                f"ExcessMTL normalises each task's excess risk by its first estimate, which is 0 or not finite "
                f"for task(s) {who} ({self.baseline.tolist()}): their losses give no gradient to the shared "
                f"parameters (grad_at={self.grad_at!r}), or (partial labels) they had no labelled sample in the "
                f"first {self.baseline_steps} batch(es)"
            )

    def extra_repr(self) -> str:
        return f"step_size={self.step_size}, baseline_steps={self.baseline_steps}, grad_at={self.grad_at!r}"
