"""Datasets as multi-task problems: a registry of builders returning :class:`MTLData`.

Example:
    >>> from mtlkit.data import available_datasets
    >>> "multimnist" in available_datasets()
    True
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mtlkit._registry import DATASETS
from mtlkit.data.multimnist import VARIANTS, MultiSpec, build
from mtlkit.tasks import Task


@dataclass
class Split:
    """Inputs and one target tensor per task."""

    x: Tensor
    y: dict[str, Tensor]

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def subset(self, idx: Tensor) -> Split:
        return Split(self.x[idx], {k: v[idx] for k, v in self.y.items()})


@dataclass
class MTLData:
    """A multi-task dataset: tasks and train/val/test splits (tensors in memory), plus free-form ``info``."""

    name: str
    tasks: list[Task]
    train: Split
    val: Split
    test: Split
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train.x.shape[1:])


def register_dataset(name: str, **meta: Any) -> Callable[[Callable[..., MTLData]], Callable[..., MTLData]]:
    """Decorator: register a builder ``(**options) -> MTLData`` in :data:`mtlkit._registry.DATASETS` (``meta``: free-form
    metadata of the entry).

    Its options are its keyword arguments (``mtlkit train --set dataset.options.KEY=VALUE``).

    Example:
        >>> from mtlkit._registry import DATASETS
        >>> DATASETS.get("multimnist").module, list(DATASETS.get("multimnist").options)
        ('mtlkit.data', ['n_train', 'n_test', 'val_fraction', 'seed', 'shift'])
    """
    return DATASETS.register(name, **meta)


def available_datasets() -> list[str]:
    """Names accepted by :func:`build_dataset`."""
    return DATASETS.names()


def build_dataset(name: str, **options: Any) -> MTLData:
    """Build dataset ``name``; unknown names/options raise :class:`ConfigError` listing the valid ones."""
    return DATASETS.build(name, **options)


def images_to_tensor(x: np.ndarray) -> Tensor:
    """uint8 (N, H, W) -> float32 (N, 1, H, W) in [0, 1]."""
    return torch.from_numpy(x).float().div_(255.0).unsqueeze(1)


def _multi_builder(variant: str) -> Callable[..., MTLData]:
    def builder(
        n_train: int = 120_000, n_test: int = 10_000, val_fraction: float = 0.1, seed: int = 0, shift: int = 0
    ) -> MTLData:
        arrays = build(MultiSpec(variant, n_train, n_test, val_fraction, seed, shift))
        tasks = [Task("left", "multiclass", 10), Task("right", "multiclass", 10)]

        def split(s: str) -> Split:
            y = torch.from_numpy(arrays[f"y_{s}"])
            return Split(images_to_tensor(arrays[f"x_{s}"]), {"left": y[:, 0].clone(), "right": y[:, 1].clone()})

        return MTLData(
            variant,
            tasks,
            split("train"),
            split("val"),
            split("test"),
            info={"sources": VARIANTS[variant], "protocol": "36x36, top-left + bottom-right, max overlap"},
        )

    builder.__doc__ = f"{variant}: 36x36 two-item images (see mtlkit.data.multimnist)."
    return builder


for _v in VARIANTS:
    register_dataset(_v)(_multi_builder(_v))

__all__ = ["MTLData", "Split", "available_datasets", "build_dataset", "images_to_tensor", "register_dataset"]
