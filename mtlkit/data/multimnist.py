"""MultiMNIST, MultiFashion and Multi-(Fashion+MNIST): two overlapping items on a 36x36 canvas.

Protocol (Sener & Koltun 2018, Sec. 5; the 36x36 variant of the MTVIB paper, Sec. V-A): one 28x28 item is placed in
the top-left corner (rows/cols 0-27) and a second in the bottom-right corner (rows/cols 8-35); where they overlap the
pixel-wise maximum is kept. Task ``left`` is the class of the top-left item, task ``right`` the class of the
bottom-right one. Multi-(Fashion+MNIST) puts an MNIST digit top-left and a Fashion-MNIST item bottom-right (Lin et al.
2019, Pareto MTL).

Splits: ``n_train`` images (default 120,000, as in the MTVIB paper) are built from the official *training* split and
``n_test`` (default 10,000) from the official *test* split only. A fraction ``val_fraction`` of the ``n_train`` images
is held out for validation, built from a disjoint 10 % of the source training items, so no source item is seen in
both training and validation. Everything is a deterministic function of ``seed``; built arrays are cached as verified
``.npz`` files.

Example:
    >>> import numpy as np
    >>> a = np.zeros((1, 28, 28), np.uint8); a[0, 27, 27] = 9
    >>> b = np.zeros((1, 28, 28), np.uint8); b[0, 19, 19] = 4
    >>> int(compose(a, b)[0, 27, 27])   # both items cover canvas pixel (27, 27): the max is kept
    9
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mtlkit.data.sources import cache_dir, load_images, load_npz, save_npz
from mtlkit.errors import ConfigError, unknown_name

CANVAS, ITEM, OFFSET = 36, 28, 8

#: name -> (source of the top-left item, source of the bottom-right item)
VARIANTS: dict[str, tuple[str, str]] = {
    "multimnist": ("mnist", "mnist"),
    "multifashion": ("fashion", "fashion"),
    "multifashionmnist": ("mnist", "fashion"),
}


def compose(top_left: np.ndarray, bottom_right: np.ndarray) -> np.ndarray:
    """Place (N, 28, 28) items on (N, 36, 36) canvases, top-left and bottom-right, overlap = pixel-wise max."""
    if top_left.shape != bottom_right.shape or top_left.shape[1:] != (ITEM, ITEM):
        raise ValueError(f"compose needs two (N, 28, 28) arrays, got {top_left.shape} and {bottom_right.shape}")
    n = top_left.shape[0]
    canvas = np.zeros((n, CANVAS, CANVAS), dtype=np.uint8)
    canvas[:, :ITEM, :ITEM] = top_left
    region = canvas[:, OFFSET:, OFFSET:]
    np.maximum(region, bottom_right, out=region)
    return canvas


@dataclass(frozen=True)
class MultiSpec:
    """Which variant and how many images."""

    name: str = "multimnist"
    n_train: int = 120_000
    n_test: int = 10_000
    val_fraction: float = 0.1
    seed: int = 0

    def validate(self) -> None:
        if self.name not in VARIANTS:
            raise unknown_name("dataset", self.name, list(VARIANTS))
        if self.n_train < 10 or self.n_test < 1:
            raise ConfigError(f"{self.name}: n_train must be >= 10 and n_test >= 1 (got {self.n_train}, {self.n_test})")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"{self.name}: val_fraction must be in (0, 1), got {self.val_fraction}")

    @property
    def cache_path(self):
        vf = f"{self.val_fraction:g}".replace(".", "p")
        return cache_dir() / "multi" / f"{self.name}_tr{self.n_train}_te{self.n_test}_v{vf}_s{self.seed}.npz"


def _pairs(rng: np.random.Generator, pool_a: np.ndarray, pool_b: np.ndarray, n: int, same: bool):
    ia = pool_a[rng.integers(0, pool_a.size, n)]
    ib = pool_b[rng.integers(0, pool_b.size, n)]
    if same:  # never pair an item with itself
        clash = ia == ib
        while clash.any():
            ib[clash] = pool_b[rng.integers(0, pool_b.size, int(clash.sum()))]
            clash = ia == ib
    return ia, ib


def build(spec: MultiSpec) -> dict[str, np.ndarray]:
    """Build (or load from the cache) the arrays: ``x_{train,val,test}`` uint8 (N, 36, 36), ``y_*`` int64 (N, 2)."""
    spec.validate()
    path = spec.cache_path
    hint = f"delete it to rebuild (it is derived data: `rm {path}`)"
    if path.is_file():
        return load_npz(path, hint)
    src_a, src_b = VARIANTS[spec.name]
    A, B = load_images(src_a), load_images(src_b)
    same = src_a == src_b
    rng = np.random.default_rng(spec.seed)
    n_src = A["x_train"].shape[0]
    order = rng.permutation(n_src)
    n_val_src = round(0.1 * n_src)
    val_pool, train_pool = order[:n_val_src], order[n_val_src:]
    n_val = round(spec.val_fraction * spec.n_train)
    n_tr = spec.n_train - n_val
    out: dict[str, np.ndarray] = {}
    test_pool = np.arange(A["x_test"].shape[0])
    for split, pool, n, key in (
        ("train", train_pool, n_tr, "train"),
        ("val", val_pool, n_val, "train"),
        ("test", test_pool, spec.n_test, "test"),
    ):
        ia, ib = _pairs(rng, pool, pool, n, same)
        out[f"x_{split}"] = compose(A[f"x_{key}"][ia], B[f"x_{key}"][ib])
        out[f"y_{split}"] = np.stack([A[f"y_{key}"][ia], B[f"y_{key}"][ib]], axis=1).astype(np.int64)
        out[f"src_{split}"] = np.stack([ia, ib], axis=1).astype(np.int64)
    save_npz(path, **out)
    return out
