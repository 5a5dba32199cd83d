"""Shared fixtures: a tiny synthetic multi-task dataset for loop tests (never reported as results)."""
from __future__ import annotations

import pytest
import torch

from mtlkit.data import MTLData, Split, register_dataset
from mtlkit.data.sources import cache_dir
from mtlkit.tasks import Task


@register_dataset("_toy")
def toy_dataset(n_train: int = 96, n_val: int = 32, n_test: int = 32, seed: int = 0) -> MTLData:
    """Two 3-class tasks on 1x12x12 random images whose labels depend on two image regions (unit tests only)."""
    g = torch.Generator().manual_seed(seed)

    def split(n: int) -> Split:
        x = torch.rand(n, 1, 12, 12, generator=g)
        a = (x[:, 0, :6, :6].mean((1, 2)) * 30).long() % 3
        b = (x[:, 0, 6:, 6:].mean((1, 2)) * 30).long() % 3
        return Split(x, {"a": a, "b": b})

    tasks = [Task("a", "multiclass", 3), Task("b", "multiclass", 3)]
    return MTLData("_toy", tasks, split(n_train), split(n_val), split(n_test))


def real_data_available(*names: str) -> bool:
    return all((cache_dir() / f"{n}.npz").is_file() for n in names)


requires_mnist = pytest.mark.skipif(not real_data_available("mnist", "fashion"),
                                    reason="real MNIST/Fashion-MNIST not cached: run `mtlkit data fetch`")
