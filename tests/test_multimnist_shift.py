"""The shifted MultiMNIST / MultiFashion construction (``shift``): offsets uniform on {0, ..., shift}, both items
inside the 36x36 canvas at the stored offsets, labels and pairs those of the unshifted build, determinism in the
seed, overlap; on real MNIST / Fashion-MNIST."""

import numpy as np
import pytest

from mtlkit.data import multimnist
from mtlkit.data.multimnist import CANVAS, ITEM, OFFSET, MultiSpec, build, compose, draw_offsets
from mtlkit.data.sources import load_images
from mtlkit.errors import ConfigError


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    """Built arrays go to tmp_path (the real source images stay where the cache keeps them)."""
    monkeypatch.setattr(
        MultiSpec,
        "cache_path",
        property(lambda s: tmp_path / f"{s.name}_{s.n_train}_{s.n_test}_{s.seed}_{s.shift}.npz"),
    )
    return tmp_path


def _place(item: np.ndarray, r: int, c: int) -> np.ndarray:
    canvas = np.zeros((CANVAS, CANVAS), np.uint8)
    canvas[r : r + ITEM, c : c + ITEM] = item
    return canvas


@pytest.mark.data("mnist")
def test_offsets_uniform_items_inside_at_their_offsets_and_labels_unchanged(private_cache):
    spec = MultiSpec("multimnist", n_train=3000, n_test=500, seed=0, shift=4)
    d = build(spec)
    flat = build(MultiSpec("multimnist", n_train=3000, n_test=500, seed=0))
    src = load_images("mnist")
    for split, key in (("train", "train"), ("val", "train"), ("test", "test")):
        off = d[f"off_{split}"]
        assert off.shape == (len(d[f"y_{split}"]), 4) and off.min() == 0 and off.max() == 4
        # the pairs and labels of the unshifted build with the same seed
        np.testing.assert_array_equal(d[f"y_{split}"], flat[f"y_{split}"])
        np.testing.assert_array_equal(d[f"src_{split}"], flat[f"src_{split}"])
        ia, ib = d[f"src_{split}"].T
        np.testing.assert_array_equal(d[f"y_{split}"][:, 0], src[f"y_{key}"][ia])
        # each canvas is exactly the max of the two whole 28x28 items at their offsets (nothing cut off)
        for i in range(0, len(off), 97):
            a, b, c, e = off[i]
            assert 0 <= a and a + ITEM <= CANVAS and 0 <= OFFSET - c and OFFSET - c + ITEM <= CANVAS
            expect = np.maximum(
                _place(src[f"x_{key}"][ia[i]], a, b), _place(src[f"x_{key}"][ib[i]], OFFSET - c, OFFSET - e)
            )
            np.testing.assert_array_equal(d[f"x_{split}"][i], expect)
            assert int(d[f"x_{split}"][i].astype(int).sum()) >= int(src[f"x_{key}"][ia[i]].max())  # not empty
    # uniform on {0..4} per coordinate: chi-square with 4 degrees of freedom, 0.1 % critical value 18.47
    off = d["off_train"]
    for col in range(4):
        counts = np.bincount(off[:, col], minlength=5)
        expected = len(off) / 5
        assert float(((counts - expected) ** 2 / expected).sum()) < 18.47, (col, counts)
    # independence of the four coordinates: correlations within ±4/√n
    corr = np.corrcoef(off.T.astype(float))
    assert np.abs(corr[np.triu_indices(4, 1)]).max() < 4 / np.sqrt(len(off))
    # shifted images differ from the fixed-corner ones (the shift is really applied)
    assert (d["x_train"] != flat["x_train"]).any(axis=(1, 2)).mean() > 0.9


@pytest.mark.data("mnist")
def test_shifted_build_is_deterministic_in_the_seed_and_items_overlap(private_cache, tmp_path):
    spec = MultiSpec("multimnist", n_train=400, n_test=100, seed=5, shift=4)
    d1 = build(spec)
    spec.cache_path.unlink()
    d2 = build(spec)
    for k in d1:
        np.testing.assert_array_equal(d1[k], d2[k])
    other = build(MultiSpec("multimnist", n_train=400, n_test=100, seed=6, shift=4))
    assert not np.array_equal(other["off_train"], d1["off_train"])
    # the item boxes always overlap by >= 20x20 px (corners at most 8 px apart per axis) ...
    off = d1["off_train"]
    rows = ITEM - np.abs((OFFSET - off[:, 2]) - off[:, 0])
    cols = ITEM - np.abs((OFFSET - off[:, 3]) - off[:, 1])
    assert rows.min() >= ITEM - OFFSET and cols.min() >= ITEM - OFFSET
    # ... and the real digits' strokes do overlap: pixels inked by both items, in most images
    src = load_images("mnist")
    ia, ib = d1["src_train"].T
    both = []
    for i in range(len(off)):
        a, b, c, e = off[i]
        ink_a = _place(src["x_train"][ia[i]], a, b) > 0
        ink_b = _place(src["x_train"][ib[i]], OFFSET - c, OFFSET - e) > 0
        both.append(int((ink_a & ink_b).sum()))
    assert np.mean(np.array(both) > 0) > 0.5


@pytest.mark.data("fashion")
def test_multifashion_takes_the_same_shift(private_cache):
    d = build(MultiSpec("multifashion", n_train=200, n_test=50, seed=0, shift=4))
    src = load_images("fashion")
    ia, ib = d["src_test"].T
    a, b, c, e = d["off_test"][0]
    np.testing.assert_array_equal(
        d["x_test"][0], np.maximum(_place(src["x_test"][ia[0]], a, b), _place(src["x_test"][ib[0]], 8 - c, 8 - e))
    )


def test_compose_with_offsets_and_bad_shifts_are_named():
    a = np.zeros((2, 28, 28), np.uint8)
    b = np.zeros((2, 28, 28), np.uint8)
    a[:, 0, 0], b[:, 27, 27] = 10, 70
    c = compose(a, b, np.array([[0, 0, 0, 0], [4, 3, 2, 1]]))
    assert c[0, 0, 0] == 10 and c[0, 35, 35] == 70  # zero offsets: the fixed corners
    assert c[1, 4, 3] == 10 and c[1, 35 - 2, 35 - 1] == 70
    np.testing.assert_array_equal(compose(a, b, np.zeros((2, 4), int)), compose(a, b))
    with pytest.raises(ValueError, match="offsets"):
        compose(a, b, np.array([[9, 0, 0, 0], [0, 0, 0, 0]]))
    for bad in (-1, 9, 2.5, True):
        with pytest.raises(ConfigError, match="shift"):
            MultiSpec("multimnist", shift=bad).validate()  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="shift"):
        draw_offsets(np.random.default_rng(0), 3, 9)
    assert MultiSpec("multimnist").cache_path.name == "multimnist_tr120000_te10000_v0p1_s0.npz"  # old name kept
    assert MultiSpec("multimnist", shift=4).cache_path.name.endswith("_sh4.npz")
    assert multimnist.MAX_SHIFT == OFFSET
