"""Metrics: per-task accuracy, joint accuracy, Δm against single-task learning, win rate.

Δm convention. Following Maninis et al. (2019) as printed by Nash-MTL and most MTL papers,
``Δm = (1/K) Σ_k (−1)^{h_k} (M_k − B_k) / B_k`` (in %), with h_k = 1 when higher is better: *lower is better*.
MAMO's Eq. 15 uses the opposite sign (higher is better). :func:`delta_m` takes ``convention`` and every table says
which one it prints.

Example:
    >>> B = [38.30, 63.76, 0.6754, 0.2780, 25.01, 19.21, 30.14, 57.20, 69.15]
    >>> M = [40.13, 65.93, 0.5261, 0.2171, 25.26, 20.08, 28.40, 55.47, 68.15]
    >>> hib = [1, 1, 0, 0, 0, 0, 1, 1, 1]
    >>> round(delta_m(M, B, hib), 2)
    -4.05
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
from torch import Tensor

from mtlkit._registry import METRICS

#: Direction of each metric known to mtlkit: the summary metrics below, and every per-task metric registered with
#: :func:`register_metric` (which adds its direction here).
HIGHER_IS_BETTER: dict[str, bool] = {
    "joint_accuracy": True,
    "micro_f1": True,
    "map": True,
    "hamming_loss": False,
    "rmse": False,
    "loss": False,
}

Convention = Literal["lower_is_better", "higher_is_better"]


def accuracy(pred: Tensor, target: Tensor) -> float:
    """Fraction of exactly matching predictions (rows must match entirely for 2-D targets)."""
    if pred.shape != target.shape:
        raise ValueError(f"accuracy: prediction shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
    if pred.numel() == 0:
        raise ValueError("accuracy of an empty set is undefined")
    return float((pred == target).float().mean())


def joint_accuracy(preds: dict[str, Tensor], targets: dict[str, Tensor]) -> float:
    """Fraction of samples on which *every* task is right (MTVIB Fig. 5)."""
    ok = None
    for name, p in preds.items():
        right = (p == targets[name]).reshape(p.shape[0], -1).all(dim=1)
        ok = right if ok is None else ok & right
    if ok is None:
        raise ValueError("joint accuracy needs at least one task")
    return float(ok.float().mean())


def delta_m(
    metrics: Sequence[float],
    baseline: Sequence[float],
    higher_is_better: Sequence[bool | int],
    convention: Convention = "lower_is_better",
) -> float:
    """Δm in percent (see the module docstring for the sign convention).

    Raises:
        ValueError: lengths differ or a baseline value is zero.
    """
    M, B, h = np.asarray(metrics, float), np.asarray(baseline, float), np.asarray(higher_is_better, bool)
    if not (M.shape == B.shape == h.shape) or M.ndim != 1 or M.size == 0:
        raise ValueError(f"delta_m needs equal-length 1-D sequences, got {M.shape}, {B.shape}, {h.shape}")
    if np.any(B == 0):
        raise ValueError("delta_m: a baseline metric is 0, the relative change is undefined")
    rel = (M - B) / B
    signed = np.where(h, -rel, rel)  # lower is better: improvements are negative
    value = float(100.0 * signed.mean())
    if convention == "higher_is_better":
        return -value
    if convention != "lower_is_better":
        raise ValueError(f"unknown convention {convention!r}; valid: lower_is_better, higher_is_better")
    return value


def win_rate(metrics: Sequence[float], baseline: Sequence[float], higher_is_better: Sequence[bool | int]) -> float:
    """Fraction (in %) of metrics on which ``metrics`` is strictly better than ``baseline`` (MAMO's Win).

    Example:
        >>> win_rate([0.9, 0.5], [0.8, 0.6], [1, 1])
        50.0
    """
    M, B, h = np.asarray(metrics, float), np.asarray(baseline, float), np.asarray(higher_is_better, bool)
    if not (M.shape == B.shape == h.shape) or M.size == 0:
        raise ValueError(f"win_rate needs equal-length sequences, got {M.shape}, {B.shape}, {h.shape}")
    better = np.where(h, M > B, M < B)
    return float(100.0 * better.mean())


def _acc(output: Tensor, target: Tensor, task) -> float:
    """Fraction of correct predictions (``task.predict`` of the head output)."""
    pred = task.predict(output)
    return float((pred.reshape(target.shape) == target).float().mean())


def _mae(output: Tensor, target: Tensor, task) -> float:
    """Mean absolute error of a regression head."""
    return float((output.reshape(target.shape) - target).abs().mean())


def _mse(output: Tensor, target: Tensor, task) -> float:
    """Mean squared error of a regression head."""
    return float((output.reshape(target.shape) - target).pow(2).mean())


def register_metric(
    name: str, fn: Callable[[Tensor, Tensor, Any], float], /, *, higher_is_better: bool, **meta: Any
) -> Callable[[Tensor, Tensor, Any], float]:
    """Register the per-task metric ``fn(raw head output, target, task) -> float`` under ``name`` in
    :data:`mtlkit._registry.METRICS` (a task lists it in ``Task.metrics``; :func:`evaluate_outputs` computes it) and
    its direction in :data:`HIGHER_IS_BETTER`. Returns ``fn``.

    Example:
        >>> from mtlkit._registry import METRICS
        >>> METRICS.get("mae").meta["higher_is_better"], HIGHER_IS_BETTER["accuracy"]
        (False, True)
    """
    METRICS.register(name, fn, higher_is_better=bool(higher_is_better), **meta)
    HIGHER_IS_BETTER[name] = bool(higher_is_better)
    return fn


register_metric("accuracy", _acc, higher_is_better=True)
register_metric("mae", _mae, higher_is_better=False)
register_metric("mse", _mse, higher_is_better=False)


def evaluate_outputs(tasks, outputs: dict[str, Tensor], targets: dict[str, Tensor]) -> dict[str, float]:
    """All metrics of all tasks as ``{"<task>/<metric>": value}`` plus ``joint_accuracy`` for classification tasks.

    Raises:
        ValueError: a task names a metric mtlkit does not know (lists the known ones).
    """
    res: dict[str, float] = {}
    preds = {}
    tasks = [t for t in tasks if not getattr(t, "auxiliary", False)]  # auxiliary tasks are never reported
    for t in tasks:
        for m in t.metrics:
            if m not in METRICS:
                raise ValueError(f"task {t.name!r}: unknown metric {m!r}; known metrics: {', '.join(METRICS.names())}")
            res[f"{t.name}/{m}"] = METRICS[m](outputs[t.name], targets[t.target_key], t)
        if t.kind != "regression":
            preds[t.name] = t.predict(outputs[t.name]).reshape(targets[t.target_key].shape)
    if len(preds) == len(tasks) and len(tasks) > 1:
        keys = {t.name: t.target_key for t in tasks}  # a task may read another key's targets (Task.target)
        res["joint_accuracy"] = joint_accuracy(preds, {k: targets[keys[k]] for k in preds})
    return res


def selection_score(tasks, metrics: dict[str, float]) -> float:
    """Model-selection score: mean over tasks of the primary metric, sign-flipped where lower is better.

    Auxiliary tasks (``Task.auxiliary``) are ignored."""
    vals = [
        metrics[f"{t.name}/{t.metrics[0]}"] * (1 if t.higher_is_better[0] else -1)
        for t in tasks
        if not getattr(t, "auxiliary", False)
    ]
    if not vals:
        raise ValueError("selection_score needs at least one non-auxiliary task")
    return float(np.mean(vals))
