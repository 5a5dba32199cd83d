"""The many-task Multi-(Fashion+MNIST) benchmark: targets derived from the two objects' classes."""

from __future__ import annotations

import numpy as np
import pytest

from mtlkit.data import build_dataset
from mtlkit.data.many_tasks import TASKS, attribute_targets
from mtlkit.errors import ConfigError


def test_targets_follow_their_definitions_for_every_class_pair():
    d, i = np.meshgrid(np.arange(10), np.arange(10), indexing="ij")
    y = np.stack([d.ravel(), i.ravel()], axis=1)
    t = attribute_targets(y)
    assert set(t) == set(TASKS) and all(v.dtype == np.int64 and v.shape == (100,) for v in t.values())
    for k, (digit, item) in enumerate(y):
        assert t["digit"][k] == digit and t["item"][k] == item
        assert t["digit_odd"][k] == digit % 2
        assert t["digit_ge5"][k] == (digit >= 5)
        assert t["digit_prime"][k] == (digit in (2, 3, 5, 7))
        assert t["item_footwear"][k] == (item in (5, 7, 9))
        assert t["item_upper"][k] == (item in (0, 2, 4, 6))
        assert t["digit_gt_item"][k] == (digit > item)
    assert t["digit_gt_item"].sum() == 45  # the pairs above the diagonal
    with pytest.raises(ValueError, match=r"\(N, 2\)"):
        attribute_targets(np.zeros(3))


def test_bad_task_lists_are_refused():
    with pytest.raises(ConfigError, match="unknown: colour"):
        build_dataset("multi_attributes", tasks=["digit", "colour"])
    with pytest.raises(ConfigError, match="distinct"):
        build_dataset("multi_attributes", tasks=["digit", "digit"])


@pytest.mark.data("mnist", "fashion")
def test_dataset_is_multifashionmnist_with_derived_targets():
    d = build_dataset("multi_attributes", n_train=200, n_test=50, tasks=["digit", "item_footwear", "digit_gt_item"])
    base = build_dataset("multifashionmnist", n_train=200, n_test=50)
    assert [t.name for t in d.tasks] == ["digit", "item_footwear", "digit_gt_item"]
    assert [t.kind for t in d.tasks] == ["multiclass", "binary", "binary"]
    for s in ("train", "val", "test"):
        a, b = getattr(d, s), getattr(base, s)
        assert bool((a.x == b.x).all()) and bool((a.y["digit"] == b.y["left"]).all())
        assert bool((a.y["item_footwear"] == np.isin(b.y["right"].numpy(), (5, 7, 9))).all())
    rate = d.info["base_rates"]["item_footwear"]
    assert rate == pytest.approx(float(np.isin(base.train.y["right"].numpy(), (5, 7, 9)).mean()))
