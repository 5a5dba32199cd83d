"""Uncertainty weighting (UW): homoscedastic task uncertainty as learnable loss weights.

Kendall, Gal & Cipolla, "Multi-task learning using uncertainty to weigh losses for scene geometry and semantics",
CVPR 2018, doi:10.1109/CVPR.2018.00781 (Eq. 5 regression, Eq. 10 classification), and the classification form used
by MTVIB (Qian, Chen, Zhang, Wen & Gechter, "Multi-task variational information bottleneck", arXiv:2007.00339, 2020,
doi:10.48550/arXiv.2007.00339, Eq. 22-23).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from mtlkit._registry import METHODS
from mtlkit.errors import ConfigError
from mtlkit.weighting._base import StepContext, Weighting

FORMS = ("regression", "classification")


@METHODS.register("uw")
class UW(Weighting):
    r"""Uncertainty weighting (Kendall et al. 2018); ``form`` regression/classification (MTVIB Eq. 22).

    Uncertainty weighting with one learnable log-variance per task.

    Weighted loss of task t, with the learned ``s_t = log σ_t²``:

    * ``"regression"`` (Kendall et al. 2018, Eq. 5; Gaussian likelihood):
      ``L_t / (2σ_t²) + log σ_t = ½·exp(-s_t)·L_t + ½·s_t``;
    * ``"classification"`` (Kendall et al. Eq. 10 and MTVIB Eq. 23, the tempered-softmax approximation):
      ``(1/σ_t²)·CE_t + log σ_t = exp(-s_t)·CE_t + ½·s_t``. MTVIB's Eq. 22 as printed has a sign error: its
      ``log p(y|z; σ) ≈ (1/σ²)·log softmax + log σ`` would make the negative log-likelihood ``CE/σ² − log σ``,
      unbounded below as σ → ∞ (the loss could always be lowered by letting σ grow). We follow MTVIB's own Eq. 23
      and Kendall et al. (``+ log σ``: ``−log p ≈ CE/σ² + log σ``, from the approximation of their Eq. 10).

    Choices:
      * We learn ``s = log σ²`` rather than σ (as Kendall et al. suggest in Sec. 3.2): it is unconstrained, the
        ``1/σ²`` factor ``exp(-s)`` cannot divide by zero and the regulariser ``log σ = s/2`` stays finite.
      * At the optimum of s for a fixed loss the gradient in s vanishes: ``σ² = L`` (regression form) and
        ``σ² = 2·CE`` (classification form). The regulariser is kept as ``s/2`` (not clamped), so a weighted loss
        can be negative — that is expected.
      * ``form`` may be one string for all tasks or one per task (mixed regression/classification problems, as in
        Kendall et al.'s depth + segmentation experiments).
      * Initial ``s`` is 0 (σ = 1, the weight of an unweighted sum in the classification form); LibMTL starts at
        -0.5 and uses the regression form for every task.

    The trainer must call ``setup(T)`` and add ``parameters()`` to its optimiser (the log-variances are trained
    by the model's optimiser, as in the paper).

    Example:
        >>> import torch
        >>> uw = UW(form="classification"); uw.setup(2)
        >>> uw(torch.tensor([3.0, 1.0]))  # s = 0: exp(0)·CE + 0
        tensor([3., 1.], grad_fn=<AddBackward0>)
    """

    requires_setup = True

    _scale: Tensor

    def __init__(self, form: str | Sequence[str] = "regression", init_log_var: float = 0.0) -> None:
        super().__init__()
        forms = [form] if isinstance(form, str) else list(form)
        if not forms:
            raise ConfigError("form must be a string or a non-empty sequence of strings")
        bad = [f for f in forms if f not in FORMS]
        if bad:
            raise ConfigError(f"unknown UW form(s) {bad}; valid forms are: {', '.join(FORMS)}")
        self.form = form if isinstance(form, str) else tuple(forms)
        self.init_log_var = float(init_log_var)

    def _build(self, num_tasks: int) -> None:
        forms = [self.form] * num_tasks if isinstance(self.form, str) else list(self.form)
        if len(forms) != num_tasks:
            raise ConfigError(f"UW got {len(forms)} forms but T={num_tasks} tasks")
        # 1/σ² multiplier: ½ for the regression form, 1 for the classification form.
        self.register_buffer("_scale", torch.tensor([0.5 if f == "regression" else 1.0 for f in forms]))
        self.log_var = nn.Parameter(torch.full((num_tasks,), self.init_log_var))

    def forward(self, losses: Tensor, ctx: StepContext | None = None) -> Tensor:
        self._prepare(losses)
        s = self.log_var.to(losses.dtype)
        return self._scale.to(losses.dtype) * torch.exp(-s) * losses + 0.5 * s

    def weights(self) -> Tensor | None:
        if self.num_tasks is None:
            return None
        return (self._scale * torch.exp(-self.log_var)).detach()
