"""RLW: Random Loss Weighting.

Lin, Ye, Xu, Shi & Zhang, "Reasonable effectiveness of random weighting: a litmus test for multi-task learning",
TMLR 2022 (arXiv:2111.10603), Sec. 3, Eq. 3: ``λ = softmax(λ̃)``, ``λ̃ ~ N(0, I)`` drawn anew at every step.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mtlkit._registry import METHODS
from mtlkit.errors import ConfigError
from mtlkit.weighting._base import StepContext, Weighting

TOTALS = ("one", "tasks")


@METHODS.register("rlw")
class RLW(Weighting):
    r"""Random loss weighting (Lin et al. 2022): softmax of standard normal samples, new every step.

    Random loss weights: at each training step ``w = c·softmax(z)`` with ``z ~ N(0, I_T)``.

    ``total="one"`` (default, the paper's Eq. 3 and LibMTL): weights sum to 1, ``c = 1``; ``total="tasks"``:
    weights sum to T, ``c = T``, so the update is on EW's (sum-of-losses) scale and learning rates tuned for EW
    carry over. All weights are positive.

    Randomness comes from a private ``torch.Generator`` seeded with ``seed`` (or, if None, with a number drawn
    from torch's global generator at ``setup``, so ``torch.manual_seed`` makes runs repeatable). The generator's
    state is a buffer: after ``load_state_dict`` the next weights are exactly those the original run would draw.
    In evaluation mode (or without grad) no sample is drawn and the weights are the mean ``c/T`` each.

    Example:
        >>> import torch
        >>> rlw = RLW(seed=0)
        >>> w = rlw(torch.ones(3))
        >>> bool((w > 0).all()), round(float(w.sum()), 6)
        (True, 1.0)
    """

    rng_state: Tensor
    last_weights: Tensor

    def __init__(self, seed: int | None = None, total: str = "one") -> None:
        super().__init__()
        if total not in TOTALS:
            raise ConfigError(f"unknown RLW total {total!r}; valid totals are: {', '.join(TOTALS)}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ConfigError(f"seed must be an int or None, got {seed!r}")
        self.seed = seed
        self.total = total

    def _build(self, num_tasks: int) -> None:
        seed = self.seed if self.seed is not None else int(torch.randint(0, 2**62, ()))
        gen = torch.Generator()
        gen.manual_seed(seed)
        self.register_buffer("rng_state", gen.get_state())
        self.register_buffer("last_weights", torch.full((num_tasks,), self._scale(num_tasks) / num_tasks))

    def _scale(self, T: int) -> float:
        return 1.0 if self.total == "one" else float(T)

    def forward(self, losses: Tensor, ctx: StepContext | None = None) -> Tensor:
        T = self._prepare(losses)
        if self._updating():
            gen = torch.Generator()
            gen.set_state(self.rng_state.cpu())
            z = torch.randn(T, generator=gen)
            self.rng_state.copy_(gen.get_state().to(self.rng_state.device))
            self.last_weights.copy_(self._scale(T) * torch.softmax(z, dim=0))
            w = self.last_weights
        else:
            w = torch.full((T,), self._scale(T) / T)
        return w.to(device=losses.device, dtype=losses.dtype) * losses

    def weights(self) -> Tensor | None:
        return None if self.num_tasks is None else self.last_weights.clone()
