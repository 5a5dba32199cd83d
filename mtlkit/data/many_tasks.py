"""``multi_attributes``: a many-task image benchmark on Multi-(Fashion+MNIST), up to 8 tasks on one image.

Why: two tasks of the same kind on a shared trunk (MultiMNIST's left and right digits) hardly conflict, and every
method ties with single-task learning there. Here one 36x36 image (an MNIST digit top-left, a Fashion-MNIST item
bottom-right, :mod:`mtlkit.data.multimnist`) carries tasks of different kinds that compete for the same features:
fine-grained classes and coarse attributes of each object, and one relation between the two objects.

Tasks (``tasks`` option selects a subset, in this order by default):

================  ==========  =====================================================================
task              kind        target
================  ==========  =====================================================================
``digit``         multiclass  the digit (10 classes)
``digit_odd``     binary      the digit is odd
``digit_ge5``     binary      the digit is >= 5
``digit_prime``   binary      the digit is 2, 3, 5 or 7
``item``          multiclass  the Fashion-MNIST class (10 classes)
``item_footwear`` binary      the item is a sandal, sneaker or ankle boot (classes 5, 7, 9)
``item_upper``    binary      the item is worn on the upper body: T-shirt, pullover, coat, shirt (0, 2, 4, 6)
``digit_gt_item`` binary      the digit is larger than the item's class index (reads both objects)
================  ==========  =====================================================================

Every task's primary metric is accuracy (each binary task's base rate is in ``info["base_rates"]``, so that a
reader can tell a learned attribute from the majority class). Splits, sizes and caching are those of
``multifashionmnist`` (same images for the same options): this module only derives the targets.

Example:
    >>> sorted(attribute_targets(np.array([[3, 5], [8, 0]]))["digit_gt_item"].tolist())
    [0, 1]
    >>> attribute_targets(np.array([[7, 9]]))["item_footwear"].tolist(), TASKS[:2]
    ([1], ('digit', 'digit_odd'))
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from mtlkit.data import MTLData, Split, images_to_tensor, register_dataset
from mtlkit.data.multimnist import MultiSpec, build
from mtlkit.errors import ConfigError
from mtlkit.tasks import Task

TASKS: tuple[str, ...] = (
    "digit",
    "digit_odd",
    "digit_ge5",
    "digit_prime",
    "item",
    "item_footwear",
    "item_upper",
    "digit_gt_item",
)
MULTICLASS = {"digit", "item"}


def attribute_targets(y: np.ndarray) -> dict[str, np.ndarray]:
    """All eight targets from ``y`` = (N, 2) int (digit, Fashion-MNIST class): int64 arrays of shape (N,)."""
    if y.ndim != 2 or y.shape[1] != 2:
        raise ValueError(f"attribute_targets needs an (N, 2) array of (digit, item) classes, got shape {y.shape}")
    d, i = y[:, 0].astype(np.int64), y[:, 1].astype(np.int64)
    as_int = lambda b: b.astype(np.int64)  # noqa: E731 - a one-line cast
    return {
        "digit": d,
        "digit_odd": as_int(d % 2 == 1),
        "digit_ge5": as_int(d >= 5),
        "digit_prime": as_int(np.isin(d, (2, 3, 5, 7))),
        "item": i,
        "item_footwear": as_int(np.isin(i, (5, 7, 9))),
        "item_upper": as_int(np.isin(i, (0, 2, 4, 6))),
        "digit_gt_item": as_int(d > i),
    }


@register_dataset("multi_attributes")
def build_multi_attributes(
    n_train: int = 120_000,
    n_test: int = 10_000,
    val_fraction: float = 0.1,
    seed: int = 0,
    tasks: Sequence[str] = TASKS,
) -> MTLData:
    """Multi-(Fashion+MNIST) with up to 8 tasks per image (see :mod:`mtlkit.data.many_tasks`)."""
    chosen = list(tasks)
    unknown = [t for t in chosen if t not in TASKS]
    if unknown or not chosen or len(set(chosen)) != len(chosen):
        raise ConfigError(
            f"multi_attributes: tasks must be distinct names from {', '.join(TASKS)}; got {chosen}"
            + (f" (unknown: {', '.join(unknown)})" if unknown else "")
        )
    arrays = build(MultiSpec("multifashionmnist", n_train, n_test, val_fraction, seed))
    task_list = [Task(t, "multiclass", 10) if t in MULTICLASS else Task(t, "binary", 1) for t in chosen]

    def split(s: str) -> Split:
        targets = attribute_targets(arrays[f"y_{s}"])
        return Split(images_to_tensor(arrays[f"x_{s}"]), {t: torch.from_numpy(targets[t].copy()) for t in chosen})

    train = split("train")
    base_rates = {t: float(train.y[t].float().mean()) for t in chosen if t not in MULTICLASS}
    return MTLData(
        "multi_attributes",
        task_list,
        train,
        split("val"),
        split("test"),
        info={
            "sources": ("mnist", "fashion"),
            "protocol": "multifashionmnist images; targets derived per object and across the two objects",
            "base_rates": base_rates,
        },
    )
