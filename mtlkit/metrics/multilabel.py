"""Multi-label metrics: micro-F1, Hamming loss, mAP (mean over labels of average precision), per-label accuracy.

Used by MTMLAN (Wang & Chen, Sec. IV-B: "MicroF1, Hamming Loss (HL) and Mean Average Precision (MAP)", and the
per-concept accuracy of Table II). A multi-label problem is stored in mtlkit as one binary task per label; these
functions take the stacked (N, L) scores/targets, and :func:`multilabel_report` stacks the per-task head outputs.

Conventions (choices, stated because papers differ):
  * ``scores`` are *logits*; a label is predicted present when ``σ(logit) >= threshold`` (default 0.5, i.e.
    logit >= 0).
  * mAP is the mean over labels of the average precision (the step-wise area under the precision-recall curve,
    scikit-learn's ``average_precision_score``). A label with no positive example in the evaluated set has no
    defined AP and is left out of the mean (its AP is reported as NaN by :func:`average_precision_per_label`).
  * micro-F1 pools true/false positives/negatives over all labels; it is 0 when there are no positives at all
    (neither predicted nor true) — the usual ``zero_division=0``.

This module also registers per-task metrics in :data:`mtlkit._registry.METRICS` (loaded with it):
``average_precision`` (threshold-free, used for model selection on imbalanced labels) and ``label_accuracy``
(accuracy at the task's ``extra["threshold"]``, default 0.5).

Example:
    >>> import torch
    >>> y = torch.tensor([[1, 0], [0, 1], [1, 1]])
    >>> s = torch.tensor([[2.0, -1.0], [-3.0, 0.5], [1.0, -0.2]])
    >>> r = multilabel_metrics(s, y)
    >>> round(r["micro_f1"], 4), round(r["hamming_loss"], 4), [round(a, 4) for a in r["per_label_accuracy"]]
    (0.8571, 0.1667, [1.0, 0.6667])
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from mtlkit.metrics import register_metric


def _check(scores: Tensor, target: Tensor, threshold: float) -> tuple[Tensor, Tensor]:
    if scores.dim() != 2 or scores.shape != target.shape:
        raise ValueError(
            f"multi-label metrics need scores and targets of the same shape (N, L), got "
            f"{tuple(scores.shape)} and {tuple(target.shape)}"
        )
    if scores.shape[0] == 0:
        raise ValueError("multi-label metrics of an empty set are undefined")
    if not 0.0 < float(threshold) < 1.0:
        raise ValueError(f"threshold must be a probability in (0, 1), got {threshold!r}")
    t = target.long()
    if not bool(((t == 0) | (t == 1)).all()):
        raise ValueError("multi-label targets must be 0 or 1")
    return scores.float(), t


def predict_labels(scores: Tensor, threshold: float = 0.5) -> Tensor:
    """0/1 predictions: ``σ(score) >= threshold``."""
    return (torch.sigmoid(scores.float()) >= threshold).long()


def micro_f1(scores: Tensor, target: Tensor, threshold: float = 0.5) -> float:
    """Micro-averaged F1 over all (sample, label) entries."""
    s, t = _check(scores, target, threshold)
    p = predict_labels(s, threshold)
    tp = int(((p == 1) & (t == 1)).sum())
    fp = int(((p == 1) & (t == 0)).sum())
    fn = int(((p == 0) & (t == 1)).sum())
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


def hamming_loss(scores: Tensor, target: Tensor, threshold: float = 0.5) -> float:
    """Fraction of wrongly predicted (sample, label) entries (lower is better)."""
    s, t = _check(scores, target, threshold)
    return float((predict_labels(s, threshold) != t).float().mean())


def per_label_accuracy(scores: Tensor, target: Tensor, threshold: float = 0.5) -> list[float]:
    """Accuracy of each label (column) — MTMLAN's Table II."""
    s, t = _check(scores, target, threshold)
    return (predict_labels(s, threshold) == t).float().mean(dim=0).tolist()


def average_precision_per_label(scores: Tensor, target: Tensor) -> list[float]:
    """Average precision of each label (NaN for a label without positives), via torchmetrics."""
    from torchmetrics.functional.classification import binary_average_precision

    s, t = _check(scores, target, 0.5)
    out = []
    for j in range(s.shape[1]):
        if int(t[:, j].sum()) == 0:
            out.append(float("nan"))
        else:
            out.append(float(binary_average_precision(s[:, j], t[:, j], thresholds=None)))
    return out


def mean_average_precision(scores: Tensor, target: Tensor) -> float:
    """mAP: mean over labels with at least one positive of their average precision."""
    aps = [a for a in average_precision_per_label(scores, target) if not math.isnan(a)]
    if not aps:
        raise ValueError("mAP is undefined: no label has a positive example")
    return float(sum(aps) / len(aps))


def multilabel_metrics(scores: Tensor, target: Tensor, threshold: float = 0.5) -> dict:
    """``micro_f1``, ``hamming_loss``, ``map``, ``per_label_accuracy`` and ``per_label_ap`` of (N, L) logits."""
    return {
        "micro_f1": micro_f1(scores, target, threshold),
        "hamming_loss": hamming_loss(scores, target, threshold),
        "map": mean_average_precision(scores, target),
        "per_label_accuracy": per_label_accuracy(scores, target, threshold),
        "per_label_ap": average_precision_per_label(scores, target),
    }


def stack_tasks(names: Sequence[str], outputs: dict[str, Tensor], targets: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """Stack per-label task outputs (each (N,) or (N, 1)) and targets into (N, L) matrices, in ``names`` order."""
    missing = [n for n in names if n not in outputs or n not in targets]
    if missing:
        raise ValueError(f"no output/target for label task(s) {missing}")
    s = torch.stack([outputs[n].reshape(-1) for n in names], dim=1)
    t = torch.stack([targets[n].reshape(-1) for n in names], dim=1)
    return s, t


def multilabel_report(tasks, outputs: dict[str, Tensor], targets: dict[str, Tensor], threshold: float = 0.5) -> dict:
    """:func:`multilabel_metrics` of a problem stored as one binary task per label."""
    bad = [t.name for t in tasks if t.kind != "binary"]
    if bad:
        raise ValueError(f"multilabel_report expects one binary task per label; not binary: {bad}")
    s, t = stack_tasks([t.name for t in tasks], outputs, targets)
    return multilabel_metrics(s, t, threshold)


# --- per-task metrics for the trainer ---------------------------------------------------------------------------


def _task_ap(output: Tensor, target: Tensor, task) -> float:
    """Average precision of one binary task (0 when the evaluated set has no positive)."""
    ap = average_precision_per_label(output.reshape(-1, 1), target.reshape(-1, 1))[0]
    return 0.0 if math.isnan(ap) else ap


def _task_label_accuracy(output: Tensor, target: Tensor, task) -> float:
    """Accuracy of one binary task at its ``extra["threshold"]`` (default 0.5)."""
    thr = float(getattr(task, "extra", {}).get("threshold", 0.5))
    return per_label_accuracy(output.reshape(-1, 1), target.reshape(-1, 1), thr)[0]


register_metric("average_precision", _task_ap, higher_is_better=True)
register_metric("label_accuracy", _task_label_accuracy, higher_is_better=True)

__all__ = [
    "average_precision_per_label",
    "hamming_loss",
    "mean_average_precision",
    "micro_f1",
    "multilabel_metrics",
    "multilabel_report",
    "per_label_accuracy",
    "predict_labels",
    "stack_tasks",
]
