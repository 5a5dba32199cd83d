"""GradVac: pull each pair's gradient cosine up to an EMA target."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from mtlkit._registry import METHODS
from mtlkit.aggregation._base import Restricted, restricted_view
from mtlkit.aggregation._random import PairwiseSurgery, row_products
from mtlkit.errors import ConfigError


@METHODS.register("gradvac")
class GradVac(PairwiseSurgery):
    """GradVac (Wang et al. 2021): EMA cosine targets per task pair.

    Gradient Vaccine.

    Wang et al., "Gradient Vaccine: Investigating and Improving Multi-task Optimization in Massively Multilingual
    Models", ICLR 2021, doi:10.48550/arXiv.2010.05874, Algorithm 1. For each task i (copy ``g_i'``) and every other
    task j in random order, with ``φ = cos(g_i', g_j)`` and the pair's target ``φ̂_ij``:

    * if ``φ < φ̂_ij``: ``g_i' ← g_i' + ||g_i'|| (φ̂ √(1-φ²) - φ √(1-φ̂²)) / (||g_j|| √(1-φ̂²)) · g_j``
      (Eq. (2) in torchjd's numbering),
      which sets ``cos(g_i', g_j)`` to exactly ``φ̂_ij``;
    * ``φ̂_ij ← (1-β) φ̂_ij + β φ`` (Eq. (3)), with ``φ̂`` initialised to 0 (so the first step is PCGrad).

    The update is ``Σ_i g_i'`` (sum scale, as LibMTL). Pairs whose cosine is already ``≥`` the target are left alone.

    Choices, and differences from LibMTL: (1) the EMA update is applied at every step for every pair (with two
    non-zero gradients), as we read the paper's Algorithm 1, as torchjd does and as current LibMTL does (its
    ``GradVac.py`` updated ``rho_T`` only inside the ``if φ < φ̂`` branch, where a target starting at 0 can only
    fall, until it was fixed in 2024). Like LibMTL (and unlike torchjd, which updates first), the target used for
    the edit is the one before this step's EMA update. (2) Default ``beta = 0.01`` (paper); LibMTL's default is 0.5.
    (3) Only the whole-vector granularity is offered (LibMTL's ``GradVac_group_type=0``): the aggregator sees
    flattened rows, not layers.

    State (``state_dict``): the T x T targets (created at the first call; a later call with another T raises) and the
    generator of the random order. Output depends on the task order (``permutation_equivariant`` False).
    Computed on the Gramian (see ``PairwiseSurgery``); ``modified_gradients(J)`` returns the ``g_i'``.

    Batches where some tasks have no labelled sample (:meth:`~mtlkit.aggregation.Aggregator.restricted`): the
    surgery runs among the present tasks (random order over them, from the same generator) with their pairs'
    targets, and only the targets of pairs of present tasks are updated (EMA of the cosines observed); a pair with
    an absent task keeps its target.

    Args:
        beta: EMA rate in (0, 1].
        seed: seed of the generator of the order.

    Example:
        >>> import torch
        >>> GradVac()(torch.tensor([[1.0, 0.0], [-1.0, 1.0]]))  # first step: targets are 0, so this is PCGrad
        tensor([0.5000, 1.5000])
    """

    scale = "sum"

    def __init__(self, beta: float = 0.01, seed: int = 0) -> None:
        super().__init__(seed)
        try:
            b = float(beta)
        except (TypeError, ValueError):
            raise ConfigError(f"beta must be a number in (0, 1], got {beta!r}") from None
        if not 0.0 < b <= 1.0:
            raise ConfigError(f"beta must be in (0, 1], got {beta!r}")
        self.beta = b
        self._targets: Tensor | None = None

    def _begin(self, G: np.ndarray) -> None:
        T = G.shape[0]
        if self._targets is None:
            self._targets = torch.zeros(T, T, dtype=torch.float64)
        elif self._targets.shape[0] != T:
            raise ValueError(
                f"GradVac was used with {self._targets.shape[0]} tasks and now gets {T}; "
                "build a new GradVac (its targets are per task pair)"
            )

    def _edit(self, C: np.ndarray, j: np.ndarray, G: np.ndarray) -> None:
        assert self._targets is not None
        rows = np.arange(len(j))
        dot, ni2, nj2 = row_products(C, j, G)
        ni, nj = np.sqrt(np.maximum(ni2, 0.0)), np.sqrt(np.maximum(nj2, 0.0))
        live = (ni > 0) & (nj > 0)  # pairs with a zero gradient: no-op
        phi = np.clip(dot / np.where(live, ni * nj, 1.0), -1.0, 1.0)  # cos(g_i', g_j)
        targets = self._targets.numpy()
        target = targets[rows, j]
        i = np.flatnonzero(live & (phi < target))  # Eq. (2)
        coef = ni[i] * (target[i] * np.sqrt(1 - phi[i] ** 2) - phi[i] * np.sqrt(1 - target[i] ** 2))
        C[i, j[i]] += coef / (nj[i] * np.sqrt(np.maximum(1 - target[i] ** 2, 1e-12)))
        live_rows = np.flatnonzero(live)
        targets[live_rows, j[live_rows]] = (1 - self.beta) * target[live_rows] + self.beta * phi[live_rows]  # Eq. (3)

    def _restricted(self, present: Tensor) -> Restricted:
        T = int(present.numel())
        if self._targets is None:
            self._targets = torch.zeros(T, T, dtype=torch.float64)
        elif self._targets.shape[0] != T:
            raise ValueError(f"GradVac was used with {self._targets.shape[0]} tasks but present has {T} entries")
        idx = present.nonzero().flatten()
        pairs = (idx[:, None], idx[None, :])
        targets = self._targets

        def load(sub: GradVac) -> None:
            sub._targets = targets[pairs].clone()  # the generator is shared: the draws advance this one's

        def store(sub: GradVac) -> None:
            assert sub._targets is not None
            targets[pairs] = sub._targets

        return restricted_view(self, present, load, store)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["targets"] = None if self._targets is None else self._targets.clone()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        t = state.get("targets")
        self._targets = None if t is None else t.clone().to(torch.float64)

    def _state_keys(self) -> set[str]:
        return {"generator", "targets"}
