"""Datasets as multi-task problems: a registry of builders returning :class:`MTLData`.

Example:
    >>> from mtlkit.data import available_datasets
    >>> "multimnist" in available_datasets()
    True
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mtlkit._registry import DATASETS
from mtlkit.data.multimnist import VARIANTS, MultiSpec, build
from mtlkit.errors import ConfigError
from mtlkit.tasks import Task

#: A fraction of labels removed: one number for every task, or one per target key (missing keys: 0).
LabelFraction = float | Mapping[str, float]


@dataclass
class Split:
    """Inputs, one target tensor per task and, optionally, which samples carry each task's label.

    Attributes:
        x: the inputs (first dimension: samples).
        y: target key -> targets (first dimension: samples).
        mask: target key -> bool (N,), True where the sample is labelled for that key; None (or a key left out):
            every sample is labelled. The targets of unlabelled rows stay in ``y`` (so that every target tensor
            keeps its dtype and shape) but no loss reads them (:func:`mtlkit.tasks.masked_losses`).

    Example:
        >>> s = Split(torch.zeros(4, 2), {"a": torch.arange(4)}, {"a": torch.tensor([True, False, True, True])})
        >>> s.subset(torch.tensor([1, 2])).mask, s.labelled_counts()
        ({'a': tensor([False,  True])}, {'a': 3})
    """

    x: Tensor
    y: dict[str, Tensor]
    mask: dict[str, Tensor] | None = None

    def __post_init__(self) -> None:
        if self.mask is None:
            return
        for k, m in self.mask.items():
            if k not in self.y:
                raise ConfigError(f"Split mask has key {k!r} without targets; the target keys are: {', '.join(self.y)}")
            n = int(self.y[k].shape[0])
            if not isinstance(m, Tensor) or m.dtype != torch.bool or tuple(m.shape) != (n,):
                shape = tuple(m.shape) if isinstance(m, Tensor) else type(m).__name__
                dtype = m.dtype if isinstance(m, Tensor) else None
                raise ConfigError(f"Split mask of {k!r} must be a bool tensor of shape ({n},), got {shape} ({dtype})")

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def subset(self, idx: Tensor) -> Split:
        mask = None if self.mask is None else {k: m[idx] for k, m in self.mask.items()}
        return Split(self.x[idx], {k: v[idx] for k, v in self.y.items()}, mask)

    def labelled_counts(self) -> dict[str, int]:
        """Labelled samples per target key (every sample for a key without a mask)."""
        masks = self.mask or {}
        return {k: int(masks[k].sum()) if k in masks else int(v.shape[0]) for k, v in self.y.items()}


def _check_fraction(key: str, f: Any) -> float:
    if isinstance(f, bool) or not isinstance(f, (int, float)) or not math.isfinite(f) or not 0.0 <= f < 1.0:
        raise ConfigError(
            f"label_fraction_removed of {key!r} must be a number in [0, 1) (1 would leave the task no label), got {f!r}"
        )
    return float(f)


def label_fractions(keys: list[str], fraction: LabelFraction) -> dict[str, float]:
    """``fraction`` as one checked number per key: a number applies to every key, a mapping to the keys it names
    (the others: 0). Unknown keys and numbers outside [0, 1) raise :class:`ConfigError`.

    Example:
        >>> label_fractions(["left", "right"], 0.5), label_fractions(["left", "right"], {"right": 0.9})
        ({'left': 0.5, 'right': 0.5}, {'left': 0.0, 'right': 0.9})
    """
    if isinstance(fraction, Mapping):
        bad = [k for k in fraction if k not in keys]
        if bad:
            raise ConfigError(f"label_fraction_removed names unknown task(s) {bad}; the tasks are: {', '.join(keys)}")
        return {k: _check_fraction(k, fraction.get(k, 0.0)) for k in keys}
    return {k: _check_fraction(k, fraction) for k in keys}


def drop_labels(split: Split, fraction: LabelFraction, seed: int) -> Split:
    """``split`` with a stated fraction of each task's labels removed (a new mask; x and y are shared, not copied).

    For each target key, exactly ``round(fraction * n)`` of its ``n`` labelled samples lose their label, drawn
    uniformly without replacement by a ``torch.Generator`` of its own, seeded by ``seed`` and the key's name: the
    draws of different tasks are independent (a sample may lose the labels of several tasks, or of none), and a
    task's draw does not depend on which other tasks the split has. Existing masks are kept (labels already
    removed stay removed); a key that loses no label gets no mask (``mask`` stays None if no key has one).

    Args:
        split: the split (usually a training split).
        fraction: in [0, 1), for every task, or a mapping target key -> fraction (missing keys: 0).
        seed: seed of the draws.

    Raises:
        ConfigError: a fraction outside [0, 1), not a number, or a key the split has no targets for.

    Example:
        >>> s = drop_labels(Split(torch.zeros(10, 1), {"a": torch.arange(10), "b": torch.arange(10)}), 0.3, seed=0)
        >>> s.labelled_counts()
        {'a': 7, 'b': 7}
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ConfigError(f"drop_labels: seed must be an integer, got {seed!r}")
    fractions = label_fractions(list(split.y), fraction)
    mask = dict(split.mask or {})
    for key, f in fractions.items():
        m = mask[key].clone() if key in mask else torch.ones(int(split.y[key].shape[0]), dtype=torch.bool)
        labelled = m.nonzero().flatten()
        k = round(f * len(labelled))
        if k:
            # crc32 of the name, not the key's position: a task's draw does not move when tasks are added
            gen = torch.Generator().manual_seed((int(seed) * 0x9E3779B1 + zlib.crc32(key.encode())) % 2**63)
            m[labelled[torch.randperm(len(labelled), generator=gen)[:k]]] = False
            mask[key] = m
    # Nothing removed: no mask at all, so that the training loop keeps its complete-label path.
    return Split(split.x, split.y, mask or None)


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
        ('mtlkit.data', ['n_train', 'n_test', 'val_fraction', 'seed', 'shift', 'label_fraction_removed'])
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


def partial_label_info(train: Split, fraction: LabelFraction) -> dict[str, Any]:
    """What :func:`drop_labels` did to a training split, for ``MTLData.info``: the fraction removed and the labels
    kept per task, and which splits it applies to.

    Example:
        >>> s = drop_labels(Split(torch.zeros(4, 1), {"a": torch.arange(4)}), 0.5, seed=0)
        >>> partial_label_info(s, 0.5)["labels_kept"]
        {'a': 2}
    """
    return {
        "label_fraction_removed": label_fractions(list(train.y), fraction),
        "labels_kept": train.labelled_counts(),
        "partial_labels": "train split only; val and test keep every label",
    }


def _multi_builder(variant: str) -> Callable[..., MTLData]:
    def builder(
        n_train: int = 120_000,
        n_test: int = 10_000,
        val_fraction: float = 0.1,
        seed: int = 0,
        shift: int = 0,
        label_fraction_removed: LabelFraction = 0.0,
    ) -> MTLData:
        tasks = [Task("left", "multiclass", 10), Task("right", "multiclass", 10)]
        label_fractions([t.name for t in tasks], label_fraction_removed)  # checked before the (long) build
        arrays = build(MultiSpec(variant, n_train, n_test, val_fraction, seed, shift))

        def split(s: str) -> Split:
            y = torch.from_numpy(arrays[f"y_{s}"])
            return Split(images_to_tensor(arrays[f"x_{s}"]), {"left": y[:, 0].clone(), "right": y[:, 1].clone()})

        train = drop_labels(split("train"), label_fraction_removed, seed)
        return MTLData(
            variant,
            tasks,
            train,
            split("val"),
            split("test"),
            info={
                "sources": VARIANTS[variant],
                "protocol": "36x36, top-left + bottom-right, max overlap",
                **partial_label_info(train, label_fraction_removed),
            },
        )

    builder.__doc__ = (
        f"{variant}: 36x36 two-item images (see mtlkit.data.multimnist).\n\n"
        "``label_fraction_removed`` (a number in [0, 1), or a mapping task -> number) removes that fraction of each "
        "task's labels from the *training* split only (:func:`drop_labels`, seeded by ``seed``): validation and "
        "test keep every label, so that model selection and the reported metric are those of the complete-label "
        "protocol. ``MTLData.info`` records the fractions and the labels kept per task."
    )
    return builder


for _v in VARIANTS:
    register_dataset(_v)(_multi_builder(_v))

__all__ = [
    "LabelFraction",
    "MTLData",
    "Split",
    "available_datasets",
    "build_dataset",
    "drop_labels",
    "images_to_tensor",
    "label_fractions",
    "partial_label_info",
    "register_dataset",
]
