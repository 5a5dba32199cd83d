"""Metrics: Δm worked example (Nash-MTL's NYUv2 row), win rate, accuracy, joint accuracy."""

import pytest
import torch

from mtlkit.metrics import accuracy, delta_m, evaluate_outputs, joint_accuracy, selection_score, win_rate
from mtlkit.tasks import Task

B = [38.30, 63.76, 0.6754, 0.2780, 25.01, 19.21, 30.14, 57.20, 69.15]  # single-task NYUv2
M = [40.13, 65.93, 0.5261, 0.2171, 25.26, 20.08, 28.40, 55.47, 68.15]  # Nash-MTL
H = [1, 1, 0, 0, 0, 0, 1, 1, 1]


def test_delta_m_worked_example_both_conventions():
    assert delta_m(M, B, H) == pytest.approx(-4.05, abs=0.005)
    assert delta_m(M, B, H, convention="higher_is_better") == pytest.approx(4.05, abs=0.005)
    assert delta_m(B, B, H) == 0.0


def test_delta_m_sign_follows_direction():
    assert delta_m([0.9], [0.8], [1]) < 0  # better accuracy: negative (lower is better)
    assert delta_m([0.9], [0.8], [0]) > 0  # larger error: positive
    with pytest.raises(ValueError, match="equal-length"):
        delta_m([1, 2], [1], [1, 1])
    with pytest.raises(ValueError, match="baseline metric is 0"):
        delta_m([1], [0], [1])
    with pytest.raises(ValueError, match="convention"):
        delta_m([1], [1], [1], convention="up")


def test_win_rate_counts_strict_improvements():
    assert win_rate(M, B, H) == pytest.approx(100 * 4 / 9)  # seg x2, depth x2 better; normals worse
    assert win_rate(B, B, H) == 0.0


def test_accuracy_and_joint_accuracy():
    p = {"a": torch.tensor([1, 2, 3, 4]), "b": torch.tensor([0, 0, 1, 1])}
    y = {"a": torch.tensor([1, 2, 0, 4]), "b": torch.tensor([0, 1, 1, 1])}
    assert accuracy(p["a"], y["a"]) == 0.75
    assert joint_accuracy(p, y) == 0.5  # samples 0 and 3 right on both tasks
    with pytest.raises(ValueError, match="shape"):
        accuracy(p["a"], y["a"][:2])


def test_evaluate_outputs_and_selection():
    tasks = [Task("a", "multiclass", 3), Task("r", "regression", 1)]
    out = {"a": torch.tensor([[3.0, 0, 0], [0, 3.0, 0]]), "r": torch.tensor([[1.0], [2.0]])}
    tgt = {"a": torch.tensor([0, 2]), "r": torch.tensor([1.5, 2.0])}
    res = evaluate_outputs(tasks, out, tgt)
    assert res["a/accuracy"] == 0.5 and res["r/mae"] == pytest.approx(0.25)
    assert "joint_accuracy" not in res  # regression task present
    assert selection_score(tasks, res) == pytest.approx((0.5 - 0.25) / 2)
    with pytest.raises(ValueError, match="unknown metric"):
        evaluate_outputs([Task("a", "multiclass", 3, metrics=("iou",))], out, tgt)


def test_a_task_reading_another_key_is_scored_on_that_key():
    """Task.target: a task may predict another key's labels (two heads on one label): its metric and the joint
    accuracy read those labels, not a key named after the task."""
    import torch

    from mtlkit.metrics import evaluate_outputs
    from mtlkit.tasks import Task

    y = torch.tensor([0, 1, 1, 0])
    logits = torch.nn.functional.one_hot(torch.tensor([0, 1, 0, 0]), 2).float()  # 3 of 4 right
    tasks = [Task("t0", "multiclass", 2, target="y"), Task("t1", "multiclass", 2, target="y")]
    res = evaluate_outputs(tasks, {"t0": logits, "t1": logits}, {"y": y})
    assert res["t0/accuracy"] == res["t1/accuracy"] == 0.75
    assert res["joint_accuracy"] == 0.75
