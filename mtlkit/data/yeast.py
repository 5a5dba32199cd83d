"""Yeast multi-label benchmark (2,417 genes x 103 features, 14 functional classes) as 14 binary tasks.

Source: the ``yeast.csv.gz`` shipped inside the PyPI wheel of ``river==0.26.1``; the wheel is
downloaded with ``pip download --no-deps`` (with the platform/ABI flags needed to fetch a cp311 manylinux wheel on
any machine), its pinned sha256 is verified before anything is read, and the member is read straight out of the
zip (river is never installed). The parsed arrays are cached as ``.npz`` with a hash record.

Protocol (MTMLAN: Tianyi Wang and Shu-Ching Chen, "Multi-Label Multi-Task Learning with Dynamic Task Weight
Balancing", IEEE IRI 2020, pp. 245-252, doi 10.1109/IRI49571.2020.00042; Sec. IV-B, applied to yeast): a seeded
random 60/20/20 train/validation/test split; features standardised with the training split's mean and standard deviation. The tasks are those of
:func:`mtlkit.data.clips.label_tasks` (``loss="bce"`` or ``"sample_level"``, decision ``threshold``).

Example:
    >>> YEAST_WHEEL.filename
    'river-0.26.1-cp311-cp311-manylinux_2_28_x86_64.whl'
"""

from __future__ import annotations

import gzip
import zipfile

import numpy as np
import torch

from mtlkit.data import MTLData, Split, register_dataset
from mtlkit.data.sources import PipFile, cache_dir, fetch_pip, load_npz, save_npz
from mtlkit.errors import ConfigError, DataError

YEAST_WHEEL = PipFile(
    "river==0.26.1",
    "river-0.26.1-cp311-cp311-manylinux_2_28_x86_64.whl",
    "6a11e1a9749beec3ea138efeb0205b2c5cea8d424e9deee306c8980faec01bef",
    extra_args=(
        "--only-binary=:all:",
        "--platform",
        "manylinux_2_28_x86_64",
        "--python-version",
        "3.11",
        "--implementation",
        "cp",
        "--abi",
        "cp311",
    ),
)
MEMBER = "river/datasets/yeast.csv.gz"
N_LABELS = 14


def parse_yeast_csv(text: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Parse the CSV (header ``Att1..Att103,Class1..Class14``) into float32 X, uint8 Y and the label names.

    Example:
        >>> X, Y, names = parse_yeast_csv("Att1,Att2,Class1,Class2\\n0.5,-1,1,0\\n0.25,2,0,1\\n")
        >>> X.shape, Y.tolist(), names
        ((2, 2), [[1, 0], [0, 1]], ['Class1', 'Class2'])
    """
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    if not lines:
        raise DataError("yeast.csv is empty")
    header = lines[0].split(",")
    lab = [i for i, h in enumerate(header) if h.startswith("Class")]
    att = [i for i, h in enumerate(header) if h.startswith("Att")]
    if not lab or not att or len(lab) + len(att) != len(header):
        raise DataError(f"yeast.csv has an unexpected header: {header[:3]} ... {header[-3:]}")
    rows = np.array([[float(v) for v in ln.split(",")] for ln in lines[1:]], dtype=np.float64)
    if rows.ndim != 2 or rows.shape[1] != len(header):
        raise DataError("yeast.csv has rows of the wrong width")
    Y = rows[:, lab]
    if not np.isin(Y, (0, 1)).all():
        raise DataError("yeast.csv has labels other than 0/1")
    return rows[:, att].astype(np.float32), Y.astype(np.uint8), [header[i] for i in lab]


def load_yeast() -> dict[str, np.ndarray]:
    """``X`` (2417, 103) float32 and ``Y`` (2417, 14) uint8, from the verified cache or the pinned wheel."""
    path = cache_dir() / "yeast.npz"
    if path.is_file():
        return load_npz(path, "delete it to re-read it from the river wheel")
    wheel = fetch_pip(YEAST_WHEEL, "yeast ships inside the river==0.26.1 wheel (see DATA.md).")
    with zipfile.ZipFile(wheel) as zf:
        if MEMBER not in zf.namelist():
            raise DataError(f"{wheel} has no member {MEMBER}")
        text = gzip.decompress(zf.read(MEMBER)).decode()
    X, Y, _names = parse_yeast_csv(text)
    if X.shape != (2417, 103) or Y.shape != (2417, N_LABELS):
        raise DataError(f"yeast: expected 2417 x 103 features and 14 labels, got {X.shape} and {Y.shape}")
    save_npz(path, X=X, Y=Y)
    return {"X": X, "Y": Y}


@register_dataset("yeast")
def build_yeast(
    seed: int = 0,
    loss: str = "bce",
    beta: float = 2.0,
    threshold: float = 0.5,
    fractions: tuple[float, float, float] = (0.6, 0.2, 0.2),
) -> MTLData:
    """Yeast as 14 binary tasks ``Class1..Class14`` (see the module docstring)."""
    from mtlkit.data.clips import label_tasks

    fr = tuple(float(f) for f in fractions)
    if len(fr) != 3 or abs(sum(fr) - 1) > 1e-9 or min(fr) <= 0:
        raise ConfigError(f"yeast: fractions must be three positive numbers summing to 1, got {fractions}")
    arrays = load_yeast()
    X, Y = arrays["X"], arrays["Y"].astype(np.int64)
    n = len(X)
    perm = np.random.default_rng(seed).permutation(n)
    n_tr, n_va = round(fr[0] * n), round(fr[1] * n)
    parts = {"train": perm[:n_tr], "val": perm[n_tr : n_tr + n_va], "test": perm[n_tr + n_va :]}
    mu, sd = X[parts["train"]].mean(0), X[parts["train"]].std(0) + 1e-6
    names = [f"Class{j + 1}" for j in range(N_LABELS)]
    tasks = label_tasks(names, loss, beta, threshold)

    def split(idx: np.ndarray) -> Split:
        y = torch.from_numpy(Y[idx])
        return Split(torch.from_numpy((X[idx] - mu) / sd).float(), {c: y[:, j].clone() for j, c in enumerate(names)})

    train = split(parts["train"])
    info = {
        "source": "river==0.26.1 wheel, river/datasets/yeast.csv.gz",
        "labels": names,
        "train_counts": [int(train.y[c].sum()) for c in names],
        "n_train": len(train),
    }
    return MTLData("yeast", tasks, train, split(parts["val"]), split(parts["test"]), info=info)


__all__ = ["YEAST_WHEEL", "build_yeast", "load_yeast", "parse_yeast_csv"]
