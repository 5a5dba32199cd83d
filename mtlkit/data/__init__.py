"""Datasets as multi-task problems: a registry of builders returning :class:`MTLData`.

Example:
    >>> from mtlkit.data import available_datasets
    >>> "multimnist" in available_datasets()
    True
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor

from mtlkit._registry import check_options, import_submodules
from mtlkit.data.multimnist import VARIANTS, MultiSpec, build
from mtlkit.errors import unknown_name
from mtlkit.tasks import Task


@dataclass
class Split:
    """Inputs and one target tensor per task."""

    x: Tensor
    y: dict[str, Tensor]

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def subset(self, idx: Tensor) -> "Split":
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


_DATASETS: dict[str, Callable[..., MTLData]] = {}


def register_dataset(name: str) -> Callable[[Callable[..., MTLData]], Callable[..., MTLData]]:
    """Decorator: register a builder ``(**options) -> MTLData``."""

    def deco(fn: Callable[..., MTLData]) -> Callable[..., MTLData]:
        _DATASETS[name] = fn
        return fn

    return deco


def _load_all() -> None:
    """Import every dataset module of this package (each registers its builders)."""
    import_submodules(__name__, __path__, skip=("sources", "multimnist"))


def available_datasets() -> list[str]:
    _load_all()
    return sorted(_DATASETS)


def build_dataset(name: str, **options: Any) -> MTLData:
    """Build dataset ``name``; unknown names/options raise :class:`ConfigError` listing the valid ones."""
    _load_all()
    if name not in _DATASETS:
        raise unknown_name("dataset", name, list(_DATASETS))
    fn = _DATASETS[name]
    check_options("dataset", name, fn, options)
    return fn(**options)


def images_to_tensor(x: np.ndarray) -> Tensor:
    """uint8 (N, H, W) -> float32 (N, 1, H, W) in [0, 1]."""
    return torch.from_numpy(x).float().div_(255.0).unsqueeze(1)


def _multi_builder(variant: str) -> Callable[..., MTLData]:
    def builder(n_train: int = 120_000, n_test: int = 10_000, val_fraction: float = 0.1, seed: int = 0) -> MTLData:
        arrays = build(MultiSpec(variant, n_train, n_test, val_fraction, seed))
        tasks = [Task("left", "multiclass", 10), Task("right", "multiclass", 10)]

        def split(s: str) -> Split:
            y = torch.from_numpy(arrays[f"y_{s}"])
            return Split(images_to_tensor(arrays[f"x_{s}"]), {"left": y[:, 0].clone(), "right": y[:, 1].clone()})

        return MTLData(variant, tasks, split("train"), split("val"), split("test"),
                       info={"sources": VARIANTS[variant], "protocol": "36x36, top-left + bottom-right, max overlap"})

    builder.__doc__ = f"{variant}: 36x36 two-item images (see mtlkit.data.multimnist)."
    return builder


for _v in VARIANTS:
    register_dataset(_v)(_multi_builder(_v))

__all__ = ["MTLData", "Split", "available_datasets", "build_dataset", "images_to_tensor", "register_dataset"]
