"""Area under the ROC curve (AUC) of a binary head, registered as the per-task metric ``auc``.

The MMoE paper (Ma, Zhao, Yi, Chen, Hong, Chi, "Modeling Task Relationships in Multi-task Learning with Multi-gate
Mixture-of-Experts", KDD 2018, doi:10.1145/3219819.3220007) reports AUC per task on census-income
(:mod:`mtlkit.data.census`). The AUC is computed from ranks, as the Mann-Whitney statistic:

``AUC = (Σ_{i: y_i = 1} r_i − n₊(n₊ + 1)/2) / (n₊ n₋)``,

with ``r_i`` the rank of score i among all scores (1 = lowest), tied scores sharing their average rank: this equals
``P(s₊ > s₋) + ½ P(s₊ = s₋)`` over all positive/negative pairs, the usual convention (scikit-learn's
``roc_auc_score``). It needs the whole evaluated split at once, which is how :func:`mtlkit.evaluation.evaluate`
calls every metric. The scores are the head's logits: AUC only depends on their order, so no sigmoid is needed.

Example:
    >>> import torch
    >>> roc_auc(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1]))
    0.75
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.stats import rankdata
from torch import Tensor

from mtlkit.metrics import register_metric

__all__ = ["roc_auc"]


def roc_auc(scores: Tensor, target: Tensor) -> float:
    """AUC of ``scores`` (any real numbers, larger = more positive) for 0/1 ``target`` (see the module docstring).

    Raises:
        ValueError: shapes differ, the targets are not 0/1, or the set lacks positives or negatives (AUC is then
            undefined: the message says which and how many samples there are).

    Example:
        >>> import torch
        >>> roc_auc(torch.tensor([1.0, 1.0, 0.0]), torch.tensor([1, 0, 0]))  # a tie counts one half
        0.75
    """
    s = scores.detach().reshape(-1).double().cpu().numpy()
    y = target.detach().reshape(-1).cpu().numpy()
    if s.shape != y.shape:
        raise ValueError(f"roc_auc: {s.size} scores for {y.size} targets")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("roc_auc: targets must be 0 or 1")
    if not np.isfinite(s).all():
        raise ValueError("roc_auc: scores must be finite")
    n_pos = int(y.sum())
    n_neg = int(y.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        raise ValueError(
            f"roc_auc is undefined without both classes: {n_pos} positive and {n_neg} negative sample(s) "
            f"(use a larger evaluation split)"
        )
    ranks = rankdata(s)  # average ranks for ties
    return float((ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _task_auc(output: Tensor, target: Tensor, task: Any) -> float:
    """AUC of a binary head's logits (the ``auc`` metric)."""
    if getattr(task, "kind", "binary") != "binary":
        raise ValueError(f"task {getattr(task, 'name', '?')!r}: the auc metric needs a binary task")
    return roc_auc(output, target)


register_metric("auc", _task_auc, higher_is_better=True)
