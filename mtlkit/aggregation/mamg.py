"""MAMG: move one of two interfering gradients along their interfering direction onto their bisector."""

from __future__ import annotations

import numpy as np

from mtlkit._registry import METHODS
from mtlkit.aggregation._random import PairwiseSurgery, row_products
from mtlkit.errors import ConfigError


@METHODS.register("mamg")
class MAMG(PairwiseSurgery):
    """MAMG (Chai et al. 2022): interfering gradients moved along g_i - g_j onto their bisector (shrink or grow).

    Model-Agnostic Mitigation of Gradient interference.

    Chai et al., "A Model-Agnostic Approach to Mitigate Gradient Interference for Multi-Task Learning", IEEE
    Transactions on Cybernetics 53(12), 2023 (early access 2022), doi 10.1109/TCYB.2022.3223377. Only the abstract is
    public; the rule is reconstructed from the abstract and the authors' released code, whose clipping line has a
    sign slip that makes it a no-op. For each task i (copy ``g_i'``) and every other task j in random order, against
    the *original* ``g_j``:

        if ⟨g_i', g_j⟩ < 0:   u = (g_i' - g_j) / ||g_i' - g_j||           (the interfering direction)
                              δ = ⟨g_i' + g_j, u⟩ = (||g_i'||² - ||g_j||²) / ||g_i' - g_j||
                              g_i' ← g_i' - max(δ, 0) u      rule="shrink" (default): the larger gradient is cut
                              g_i' ← g_i' - min(δ, 0) u      rule="grow": the smaller gradient is grown

    Either step puts ``g_i'`` on the bisecting hyperplane of the pair: afterwards ``(g_i' + g_j) ⟂ u`` and
    ``||g_i'|| = ||g_j||``. Nothing changes when the norms are equal or when there is no conflict. The update is
    ``Σ_i g_i'`` (sum scale, as PCGrad).

    **Two readings** (a documented choice): "shrink" is the reconstruction of the method notes (a *clipping*: a norm
    never grows); "grow" is what the smallest edit of the released line gives (a norm never shrinks). **For two
    tasks they give the same update**, and that update is **exactly twice MGDA's min-norm point** when the two
    gradients conflict (the sum otherwise): the edited sum ``g_1 + g_2 - δ u`` has coefficients summing to 2 and is
    orthogonal to ``g_1 - g_2``, so half of it is the min-norm point of the segment, which lies inside the segment
    when ``⟨g_1, g_2⟩ < 0`` (Sener & Koltun, "Multi-Task Learning as Multi-Objective Optimization", NeurIPS 2018,
    Algorithm 1). So a two-task comparison of MAMG tests conflict-gated MGDA, nothing specific to MAMG; the readings
    differ, and MAMG differs from MGDA, only for T ≥ 3.

    Random order from a seeded generator (state in ``state_dict``); output depends on the task order for T > 2.
    Computed on the Gramian (see ``PairwiseSurgery``): ``g_i' = Σ_k C_ik g_k``, ``δ`` and ``||g_i' - g_j||`` are
    read off ``C G Cᵀ``; ``modified_gradients(J)`` returns the ``g_i'``.

    Args:
        seed: seed of the generator of the order.
        rule: ``"shrink"`` (default) or ``"grow"``, see above.

    Example:
        >>> import torch
        >>> MAMG()(torch.tensor([[3.0, 0.0], [-1.0, 1.0]]))  # g_1 is cut back to norm √2 = ||g_2||; g_2 is kept
        tensor([0.3529, 1.4118])
        >>> MAMG(rule="grow")(torch.tensor([[3.0, 0.0], [-1.0, 1.0]]))  # g_2 grown to norm 3 instead: same sum
        tensor([0.3529, 1.4118])
    """

    scale = "sum"

    def __init__(self, seed: int = 0, rule: str = "shrink") -> None:
        super().__init__(seed)
        if rule not in ("shrink", "grow"):
            raise ConfigError(f"unknown MAMG rule {rule!r}; valid rules are: grow, shrink")
        self.rule = rule

    def _edit(self, C: np.ndarray, j: np.ndarray, G: np.ndarray) -> None:
        dot, ni2, nj2 = row_products(C, j, G)
        n2 = ni2 - 2.0 * dot + nj2  # ||g_i' - g_j||²
        ok = (dot < 0) & (n2 > 0)  # ⟨g_i', g_j⟩ < 0
        delta = np.where(ok, ni2 - nj2, 0.0) / np.sqrt(np.where(ok, n2, 1.0))  # (||g_i'||² - ||g_j||²)/||g_i' - g_j||
        i = np.flatnonzero(ok & ((delta > 0) if self.rule == "shrink" else (delta < 0)))
        # g_i' ← g_i' - δ u,  u = (g_i' - g_j) / ||g_i' - g_j||  (δ > 0 shrinks g_i', δ < 0 grows it)
        step = delta[i] / np.sqrt(n2[i])
        C[i] *= (1.0 - step)[:, None]
        C[i, j[i]] += step
