"""A seeded random source for aggregators with random choices (PCGrad, GradVac, MAMG, GradDrop) (private).

The generator lives on the CPU whatever the gradients' device, so that a seed gives the same choices on every
device; its state is part of the aggregator's ``state_dict`` so that a resumed run draws the same numbers.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mtlkit.aggregation._base import Aggregator
from mtlkit.aggregation._solvers import check_int
from mtlkit.errors import ConfigError


class SeededAggregator(Aggregator):
    """Base of aggregators that draw random numbers from their own seeded ``torch.Generator``."""

    def __init__(self, seed: int = 0) -> None:
        self.seed = check_int("seed", seed, minimum=0)
        self._gen = torch.Generator(device="cpu")
        self._gen.manual_seed(self.seed)

    def _other_tasks_in_random_order(self, i: int, T: int) -> list[int]:
        """The tasks other than ``i``, in an order drawn from the generator."""
        return [j for j in torch.randperm(T, generator=self._gen).tolist() if j != i]

    def _uniform(self, shape: tuple[int, ...], like: Tensor) -> Tensor:
        return torch.rand(shape, generator=self._gen, dtype=torch.float64).to(dtype=like.dtype, device=like.device)

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self._gen.get_state().clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        extra = set(state) - self._state_keys()
        if extra or "generator" not in state:
            raise ConfigError(f"{type(self).__name__}.load_state_dict expects keys {sorted(self._state_keys())}, "
                              f"got {sorted(state)}")
        self._gen.set_state(state["generator"].clone())

    def _state_keys(self) -> set[str]:
        return {"generator"}
