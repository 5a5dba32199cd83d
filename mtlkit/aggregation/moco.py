"""MoCo: a tracked estimate of the task gradients and a projected-gradient step on MGDA's weights."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from mtlkit._registry import METHODS
from mtlkit.aggregation._base import Aggregator, Restricted, restricted_view
from mtlkit.aggregation._solvers import check_nonneg, project_simplex
from mtlkit.errors import ConfigError

_INITS = ("grad", "zero")


@METHODS.register("moco")
class MoCo(Aggregator):
    r"""MoCo (Fernando et al. 2023): tracked gradients Y and one projected step on λ per update (stateful).

    Stochastic multi-objective gradient correction.

    Fernando, Shen, Liu, Chaudhury, Murugesan & Chen, "Mitigating Gradient Bias in Multi-objective Learning: A
    Provably Convergent Approach", ICLR 2023 (OpenReview dLAYGdKTi2; arXiv:2210.12624). MGDA's weights are a
    non-linear function of the task gradients, so plugging stochastic gradients in gives a biased direction. MoCo
    keeps a running estimate ``Y`` (T x P) of the task-gradient matrix and moves the weights ``λ`` by one projected
    gradient step on the (regularised) MGDA problem ``min_{λ∈Δ} ½ λᵀ(YYᵀ + ρI)λ`` per call. At call k = 1, 2, ...
    with ``J`` the current per-task gradients, the three lines of the paper's Algorithm 1 are:

        Y ← Y − β_k (Y − J),                            β_k = beta / k^beta_sigma
        λ ← Π_Δ(λ − γ_k (Y Yᵀ + ρ I) λ),                γ_k = gamma / k^gamma_sigma
        update = Yᵀ λ

    (the paper writes Y with the gradients as columns, so its ``YᵀY`` is our ``YYᵀ``), with ``λ = 1/T`` before the
    first call and ``Π_Δ`` the Euclidean projection onto the simplex
    (:func:`~mtlkit.aggregation._solvers.project_simplex`).

    Choices where the paper leaves room, and why:

    * Projection of Y: the paper projects each ``y_i`` onto a ball of radius ``L_i`` (a bound on the gradients that
      its analysis assumes); the ``L_i`` are unknown in practice and no reference code projects, so neither do we.
    * λ step: the paper's ``(YYᵀ + ρI)λ``, the gradient of ``½λᵀ(YYᵀ + ρI)λ``, with the projection onto the
      simplex. The authors' Office-31 code (``Tracking.py`` in heshandevaka/MoCo) steps along ``2·YYᵀλ`` (the
      gradient without the ½: its ``delta`` is our ``gamma / 2``) and has no ρ; LibMTL's ``MoCo`` and the authors'
      NYU-v2 code replace the projection by a softmax of ``λ − γ_k(...)λ`` (not a projection: the weights never
      reach 0 and do not solve the MGDA problem at the fixed point). LibMTL also rescales each gradient to the norm
      of its loss (``g_t/||g_t|| · L_t``), which an aggregator cannot see; the paper has no such step. The NYU-v2
      code decays the step sizes per epoch; here, as in ``Tracking.py`` and LibMTL, per call (k counts calls).
    * Start of Y (``init``): the reference codes start from ``Y = 0``, so that the first update is ``β_1`` times too
      short and the estimate stays biased towards 0 for a while (by ``Π_j (1 − β_j)``, like an EMA without bias
      correction). ``init="grad"`` (default) starts from the first gradients (``Y = J`` at k = 1; the paper leaves
      ``y_0`` free): then T identical rows ``g`` give ``g`` from the first call on. ``init="zero"`` is the reference
      codes' start.
    * Defaults: LibMTL's (``beta = 0.5``, ``beta_sigma = 0.5``, ``gamma = 0.1``, ``gamma_sigma = 0.5``, ``rho = 0``).

    Scale: ``λ ∈ Δ``, so the update is a **convex** combination of the tracked gradients (identical rows ``g`` give
    ``g``; ``build_method(..., scale="sum")`` multiplies by T, as the authors' CAGrad-based trainer does "to match
    the sum loss"). The λ step is not scale-free: ``γ_k YYᵀ`` grows with ``||J||²``, so the weights move faster for
    larger gradients (as in the paper), and ``update(sJ) ≠ s·update(J)`` in general.

    Level and state: parameter level only. Y must refer to the same coordinates at every call, which the gradients
    of the shared parameters do and the representation's (whose columns belong to the batch's samples, different
    ones at every step) do not; a change of the number of tasks or of columns raises. The state (``y``, ``lam``,
    ``step``) is in ``state_dict``; Y has the size of J (T x P), kept in J's dtype and on its device.

    Batches where some tasks have no labelled sample (:meth:`~mtlkit.aggregation.Aggregator.restricted`): the step
    runs on the present tasks alone. Their rows of Y are tracked towards their gradients; the absent tasks' rows
    stay as they were (no decay towards a gradient that was not observed). λ: the present tasks' entries,
    renormalised to sum to 1 (uniform if they are all 0), take the projected step on the present tasks' simplex
    and are written back scaled by the mass they had, so λ stays on the full simplex with the absent tasks'
    weights unchanged. ``step`` counts calls (full or not), so ``β_k`` and ``γ_k`` follow the step, not the task.
    With ``init="grad"``, the row of a task that has not been present yet is NaN in Y (not yet initialised) and
    starts at that task's gradient when it first is; with ``init="zero"`` it starts at 0 like every row.

    Args:
        beta, beta_sigma: tracking step ``β_k = beta / k^beta_sigma`` (``0 < beta ≤ 1``; ``beta = 1`` with
            ``beta_sigma = 0``: Y = J, no tracking).
        gamma, gamma_sigma: λ step ``γ_k = gamma / k^gamma_sigma`` (``gamma ≥ 0``; 0 keeps ``λ = 1/T``).
        rho: ``ρ ≥ 0``, the ℓ2 regularisation of the λ problem.
        init: ``"grad"`` (Y starts at the first gradients) or ``"zero"`` (the reference codes).

    Example:
        >>> import torch
        >>> agg = MoCo()
        >>> agg(torch.tensor([[1.0, 2.0], [1.0, 2.0]]))           # identical rows: the row itself
        tensor([1., 2.])
        >>> agg = MoCo(beta=1.0, gamma=0.5, gamma_sigma=0.0)      # Y = J: one projected step from λ = (1/2, 1/2)
        >>> J = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
        >>> agg(J), agg.task_weights                              # λ - 0.5·G λ = (1/4, -1/2) → Π_Δ: (7/8, 1/8)
        (tensor([0.8750, 0.2500], dtype=torch.float64), tensor([0.8750, 0.1250], dtype=torch.float64))
    """

    scale = "convex"

    def __init__(
        self,
        beta: float = 0.5,
        beta_sigma: float = 0.5,
        gamma: float = 0.1,
        gamma_sigma: float = 0.5,
        rho: float = 0.0,
        init: str = "grad",
    ) -> None:
        self.beta = check_nonneg("beta", beta, strict=True)
        if self.beta > 1.0:
            raise ConfigError(f"beta must be in (0, 1] (Y moves towards J by the fraction β_k), got {beta!r}")
        self.beta_sigma = check_nonneg("beta_sigma", beta_sigma)
        self.gamma = check_nonneg("gamma", gamma)
        self.gamma_sigma = check_nonneg("gamma_sigma", gamma_sigma)
        self.rho = check_nonneg("rho", rho)
        if init not in _INITS:
            raise ConfigError(f"init must be one of {', '.join(_INITS)}, got {init!r}")
        self.init = init
        self._y: Tensor | None = None
        self._lam: np.ndarray | None = None
        self._step = 0

    @property
    def task_weights(self) -> Tensor | None:
        """The current λ (float64), None before the first call."""
        return None if self._lam is None else torch.from_numpy(self._lam.copy())

    def aggregate(self, J: Tensor) -> Tensor:
        T = J.shape[0]
        if self._y is not None and self._y.shape != J.shape:
            raise ValueError(
                f"MoCo tracks per-task gradients of shape {tuple(self._y.shape)} but got {tuple(J.shape)}: the tasks "
                "or the shared parameters changed, or the level is 'representation' (its columns are the batch's "
                "samples, a different set at every step); MoCo works at level 'parameter' only"
            )
        J = J.detach()
        k = self._step + 1
        if self._y is None:
            y = J.clone() if self.init == "grad" else torch.zeros_like(J)
        else:
            y = self._y.to(device=J.device, dtype=J.dtype)
        fresh = torch.isnan(y[:, 0])  # rows of tasks never present yet (see "Batches where ..." above)
        if bool(fresh.any()):
            y = y.clone()
            y[fresh] = J[fresh] if self.init == "grad" else 0.0
        y = y - (self.beta / k**self.beta_sigma) * (y - J)
        lam = np.full(T, 1.0 / T) if self._lam is None else self._lam
        M = (y @ y.T).to("cpu", torch.float64).numpy()
        M = 0.5 * (M + M.T) + self.rho * np.eye(T)
        gamma_k = self.gamma / k**self.gamma_sigma
        lam = project_simplex(lam - gamma_k * (M @ lam)) if gamma_k > 0 else lam
        self._y, self._lam, self._step = y, lam, k
        return torch.as_tensor(lam, dtype=J.dtype, device=J.device) @ y

    def _restricted(self, present: Tensor) -> Restricted:
        T = int(present.numel())
        if self._y is not None and self._y.shape[0] != T:
            raise ValueError(f"MoCo tracks {self._y.shape[0]} tasks but present has {T} entries")
        idx = present.nonzero().flatten()
        lam = np.full(T, 1.0 / T) if self._lam is None else self._lam
        mass = float(lam[idx.numpy()].sum())

        def load(sub: MoCo) -> None:
            sub._y = None if self._y is None else self._y[idx.to(self._y.device)].clone()
            part = lam[idx.numpy()]
            sub._lam = part / mass if mass > 0 else np.full(len(idx), 1.0 / len(idx))

        def store(sub: MoCo) -> None:
            assert sub._y is not None and sub._lam is not None
            if self._y is None:  # first call: the absent rows are not initialised yet (NaN) or 0 (init="zero")
                fill = float("nan") if self.init == "grad" else 0.0
                self._y = torch.full((T, sub._y.shape[1]), fill, dtype=sub._y.dtype, device=sub._y.device)
            self._y = self._y.to(device=sub._y.device, dtype=sub._y.dtype)
            self._y[idx.to(self._y.device)] = sub._y
            full = lam.copy()
            full[idx.numpy()] = sub._lam * mass
            self._lam, self._step = full, sub._step

        return restricted_view(self, present, load, store)

    def state_dict(self) -> dict[str, Any]:
        return {
            "y": None if self._y is None else self._y.clone(),
            "lam": None if self._lam is None else torch.from_numpy(self._lam.copy()),
            "step": self._step,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state) != {"y", "lam", "step"}:
            raise ValueError(f"MoCo state needs keys lam, step, y; got {sorted(state)}")
        y, lam = state["y"], state["lam"]
        if (y is None) != (lam is None) or (y is not None and y.shape[0] != lam.shape[0]):
            raise ValueError("MoCo state: y and lam must both be None or have one row / entry per task")
        self._y = None if y is None else y.detach().clone()
        self._lam = None if lam is None else lam.detach().to(torch.float64).numpy().copy()
        self._step = int(state["step"])
