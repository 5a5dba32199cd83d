"""Multi-label frame-sequence benchmark ("clips") built from Fashion-MNIST (or MNIST) frames.

Stand-in for the disaster-video dataset of MTMLAN (Tianyi Wang and Shu-Ching Chen, "Multi-Label Multi-Task Learning
with Dynamic Task Weight Balancing", IEEE 21st International Conference on Information Reuse and Integration for Data
Science (IRI 2020), pp. 245-252, 2020, doi 10.1109/IRI49571.2020.00042; Sec. IV-A, Table I), which cannot be
obtained here (it is not published). Protocol:

* ``n_clips`` clips (paper: 1,540) of ``frames`` frames (paper: 40 sampled frames per video; default 40).
* 7 concepts = 7 source classes (Fashion-MNIST classes 0-6 by default, named after the paper's concepts); the
  other 3 classes (7, 8, 9) are the "background" items of frames that show no concept.
* Each concept present in a clip occupies one *contiguous run* of frames (length 2 .. ``max_run``) at a random
  place; runs of different concepts do not overlap; every other frame shows a background item. A clip's labels are
  therefore fully determined by its frames.
* Concept counts follow the paper's Table I: 150, 338, 971, 273, 371, 311, 811 positives over 1,540 clips (scaled
  by ``n_clips / 1540`` and rounded for other sizes): the exact counts, not only in expectation.
* Co-occurrence above chance: concepts are assigned to clips one after another (most frequent first), sampling
  without replacement; a clip that already holds a *partner* concept is ``cooccur`` times as likely to be picked
  (partners, by analogy with disaster scenes: flood/storm-damage, damage-victim, emergency response-human relief,
  demonstration-briefing).
* train/validation/test = 60/20/20 of the clips (the paper's split), by a seeded permutation. Frames of a clip come
  only from the source split of that clip: training clips from source-train images 0..49,999, validation clips
  from source-train images 50,000..59,999, test clips from the source test set.
* Frozen frame features (``features="pretrained"``): a small conv net pre-trained on single-image classification
  of *another dataset* (``pretrain_source``, default MNIST digits for Fashion-MNIST frames), never on the concepts
  — the analogue of the paper's ImageNet-pre-trained Inception V3, which never saw the disaster concepts. (Before,
  the encoder was pre-trained on the ten Fashion-MNIST classes, seven of which *are* the concepts: the features
  then already separated the concepts, and a label's difficulty followed which clothes look alike instead of its
  rarity.) The cached feature of a frame is the encoder's last conv block, average-pooled to
  ``feature_pool`` x ``feature_pool`` (32 channels: 288 values for the default 3): a generic spatial map that the
  trained shared network of the model (:class:`mtlkit.models.mtmlan.SharedFrameNet`) must still turn into
  concept evidence. ``pretrain_source == source`` is refused (ConfigError).
* Deterministic in ``seed``; the clip layout (image indices, labels, splits) is cached as ``.npz`` under
  ``cache_dir()/clips`` with a hash record, and so are the pre-trained frame features.

Tasks: one ``binary`` task per concept (multi-label as multi-task). ``loss`` chooses each task's loss: ``"bce"`` or
``"sample_level"`` (MTMLAN's Eq. 9 with focusing parameter ``beta``) — the sample-level balancing is a task/loss
option, not a method. ``threshold`` is the decision threshold of the metrics (default 0.5).

Example:
    >>> spec = ClipSpec(n_clips=40, frames=14)
    >>> layout = make_layout(spec, {"train": [0] * 10 + [1] * 10 + [7] * 30, "val": [2] * 10 + [8] * 30,
    ...                             "test": [3] * 10 + [9] * 30}, check_classes=False)
    >>> layout["labels"].shape, layout["index"].shape
    ((40, 7), (40, 14))
    >>> always_absent_accuracy([150, 971], 1540)   # Table I: a constant "absent" scores this per concept
    [0.9026, 0.3695]
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mtlkit.data import MTLData, Split, register_dataset
from mtlkit.data.sources import cache_dir, load_images, load_npz, save_npz
from mtlkit.errors import ConfigError
from mtlkit.tasks import Task

log = logging.getLogger("mtlkit")

#: MTMLAN Table I: number of instances per concept over 1,540 clips (Wang & Chen, IRI 2020, Sec. IV-A).
PAPER_COUNTS: tuple[int, ...] = (150, 338, 971, 273, 371, 311, 811)
PAPER_CLIPS = 1540
CONCEPTS: tuple[str, ...] = (
    "demonstration",
    "emergency_response",
    "flood_storm",
    "human_relief",
    "damage",
    "victim",
    "briefing",
)
#: Pairs of concepts (indices) that co-occur more often than chance.
PARTNERS: tuple[tuple[int, int], ...] = ((2, 4), (4, 5), (1, 3), (0, 6))
CONCEPT_CLASSES: tuple[int, ...] = (0, 1, 2, 3, 4, 5, 6)
BACKGROUND_CLASSES: tuple[int, ...] = (7, 8, 9)
SPLITS = ("train", "val", "test")
TRAIN_POOL = 50_000  # source-train images 0..49,999 feed the training clips; the rest the validation clips
IMAGE_SOURCES = ("fashion", "mnist")


def always_absent_accuracy(counts: Sequence[int], n_clips: int, digits: int = 4) -> list[float]:
    """Per concept, the accuracy of always predicting "absent": ``1 - n_j / n_clips`` (rounded to ``digits``)."""
    if n_clips <= 0 or any(c < 0 or c > n_clips for c in counts):
        raise ConfigError(f"counts must lie in [0, n_clips={n_clips}], got {list(counts)}")
    return [round(1 - c / n_clips, digits) for c in counts]


def check_pretrain_source(source: str, pretrain_source: str) -> None:
    """ConfigError unless ``pretrain_source`` is a known image dataset other than the frames' ``source``."""
    if pretrain_source not in IMAGE_SOURCES:
        raise ConfigError(f"clips: unknown pretrain_source {pretrain_source!r}; valid: {', '.join(IMAGE_SOURCES)}")
    if pretrain_source == source:
        other = [s for s in IMAGE_SOURCES if s != source]
        raise ConfigError(
            f"clips: pretrain_source={pretrain_source!r} is the dataset of the frames: the frame encoder would be "
            f"trained on the concept classes themselves; pre-train on another dataset ({', '.join(other)})"
        )


def pretraining_images(
    source: str, pretrain_source: str, samples: int, seed: int, images: dict[str, np.ndarray] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The images (and their classes) the frame encoder is pre-trained on: ``samples`` training images of
    ``pretrain_source``, which must be another dataset than the clips' frames (``source``), so that the features
    are never trained on the concepts.

    Example:
        >>> fake = {"x_train": np.zeros((5, 28, 28), np.uint8), "y_train": np.arange(5)}
        >>> x, y = pretraining_images("fashion", "mnist", 3, 0, images=fake)
        >>> x.shape, sorted(y.tolist())[:1]
        ((3, 28, 28), [0])
    """
    check_pretrain_source(source, pretrain_source)
    if samples < 1:
        raise ConfigError(f"clips: pretrain_samples must be >= 1, got {samples}")
    imgs = images if images is not None else load_images(pretrain_source)
    gen = torch.Generator().manual_seed(seed)
    take = torch.randperm(len(imgs["y_train"]), generator=gen)[:samples].numpy()
    return imgs["x_train"][take], np.asarray(imgs["y_train"])[take]


@dataclass(frozen=True)
class ClipSpec:
    """Everything that determines a clip layout (the cache key)."""

    n_clips: int = PAPER_CLIPS
    frames: int = 16
    counts: tuple[int, ...] = PAPER_COUNTS
    cooccur: float = 4.0
    max_run: int = 4
    source: str = "fashion"
    seed: int = 0
    fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)

    def scaled_counts(self) -> list[int]:
        """Per-concept positives for ``n_clips`` (Table I scaled by n_clips / 1540, at least 1)."""
        return [max(1, round(c * self.n_clips / PAPER_CLIPS)) for c in self.counts]

    def check(self) -> None:
        if self.n_clips < 10:
            raise ConfigError(f"clips: n_clips must be >= 10, got {self.n_clips}")
        if len(self.counts) != len(CONCEPTS):
            raise ConfigError(f"clips: counts needs {len(CONCEPTS)} entries (one per concept), got {len(self.counts)}")
        if any(c > self.n_clips for c in self.scaled_counts()):
            raise ConfigError(f"clips: a concept count exceeds n_clips ({self.scaled_counts()} > {self.n_clips})")
        if self.max_run < 2:
            raise ConfigError(f"clips: max_run must be >= 2, got {self.max_run}")
        if self.frames < 2 * len(CONCEPTS):
            raise ConfigError(
                f"clips: frames must be >= {2 * len(CONCEPTS)} so that all 7 concepts fit in runs of "
                f"2 frames, got {self.frames}"
            )
        if self.cooccur < 1:
            raise ConfigError(f"clips: cooccur (partner boost) must be >= 1, got {self.cooccur}")
        if len(self.fractions) != 3 or abs(sum(self.fractions) - 1) > 1e-9 or min(self.fractions) <= 0:
            raise ConfigError(f"clips: fractions must be three positive numbers summing to 1, got {self.fractions}")
        if self.source not in ("fashion", "mnist"):
            raise ConfigError(f"clips: unknown source {self.source!r}; valid sources are: fashion, mnist")

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


def assign_labels(spec: ClipSpec, rng: np.random.Generator) -> np.ndarray:
    """(n_clips, 7) 0/1 labels with the exact scaled counts and partner co-occurrence boosted by ``cooccur``."""
    counts = spec.scaled_counts()
    labels = np.zeros((spec.n_clips, len(CONCEPTS)), dtype=np.uint8)
    partners: dict[int, list[int]] = {j: [] for j in range(len(CONCEPTS))}
    for a, b in PARTNERS:
        partners[a].append(b)
        partners[b].append(a)
    for j in sorted(range(len(CONCEPTS)), key=lambda k: -counts[k]):
        has_partner = labels[:, partners[j]].any(axis=1) if partners[j] else np.zeros(spec.n_clips, bool)
        w = np.where(has_partner, spec.cooccur, 1.0)
        chosen = rng.choice(spec.n_clips, size=counts[j], replace=False, p=w / w.sum())
        labels[chosen, j] = 1
    return labels


def _frame_classes(present: np.ndarray, spec: ClipSpec, rng: np.random.Generator) -> np.ndarray:
    """Class of every frame of one clip: one contiguous run per present concept, background elsewhere."""
    concepts = rng.permutation(np.flatnonzero(present))
    F, k = spec.frames, len(concepts)
    lengths = rng.integers(2, spec.max_run + 1, size=k) if k else np.zeros(0, int)
    while lengths.sum() > F:  # shrink the longest runs until they fit (never below 2)
        lengths[np.argmax(lengths)] -= 1
    gaps = rng.multinomial(F - int(lengths.sum()), np.ones(k + 1) / (k + 1))
    out = np.full(F, -1, dtype=np.int64)
    pos = int(gaps[0])
    for c, L, g in zip(concepts, lengths, gaps[1:], strict=True):  # k runs, k + 1 gaps
        out[pos : pos + L] = CONCEPT_CLASSES[c]
        pos += int(L) + int(g)
    bg = out < 0
    out[bg] = rng.choice(BACKGROUND_CLASSES, size=int(bg.sum()))
    return out


def make_layout(
    spec: ClipSpec, pool_labels: Mapping[str, Sequence[int] | np.ndarray], check_classes: bool = True
) -> dict:
    """The clip layout: ``labels`` (N, 7), ``split`` (N,) in 0/1/2, ``index`` (N, F) into each split's image pool.

    ``pool_labels[split]`` holds the class of every image of the pool the clips of that split draw from.
    """
    spec.check()
    rng = np.random.default_rng(spec.seed)
    labels = assign_labels(spec, rng)
    n = spec.n_clips
    n_train, n_val = round(spec.fractions[0] * n), round(spec.fractions[1] * n)
    split = np.zeros(n, dtype=np.int8)
    perm = rng.permutation(n)
    split[perm[n_train : n_train + n_val]] = 1
    split[perm[n_train + n_val :]] = 2
    by_class = {}
    for s, name in enumerate(SPLITS):
        y = np.asarray(pool_labels[name])
        by_class[s] = {c: np.flatnonzero(y == c) for c in range(10)}
        if check_classes:
            empty = [c for c in CONCEPT_CLASSES + BACKGROUND_CLASSES if by_class[s][c].size == 0]
            if empty:
                raise ConfigError(f"clips: the {name} image pool has no image of class(es) {empty}")
    index = np.zeros((n, spec.frames), dtype=np.int64)
    for i in range(n):
        classes = _frame_classes(labels[i], spec, rng)
        pools = by_class[int(split[i])]
        index[i] = [pools[c][rng.integers(len(pools[c]))] if len(pools[c]) else 0 for c in classes]
    return {"labels": labels, "split": split, "index": index}


def _pools(images: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    x = {"train": images["x_train"][:TRAIN_POOL], "val": images["x_train"][TRAIN_POOL:], "test": images["x_test"]}
    y = {"train": images["y_train"][:TRAIN_POOL], "val": images["y_train"][TRAIN_POOL:], "test": images["y_test"]}
    return x, y


def load_layout(spec: ClipSpec, images: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """The cached layout of ``spec`` (built and cached on first use)."""
    path = cache_dir() / "clips" / f"layout-{spec.key()}.npz"
    if path.is_file():
        return load_npz(path, f"delete it to rebuild the clips layout (`rm {path}`)")
    images = images if images is not None else load_images(spec.source)
    _, y = _pools(images)
    layout = make_layout(spec, y)
    save_npz(path, **layout)
    path.with_suffix(".json").write_text(json.dumps(asdict(spec), indent=1))
    return layout


def _pretrained_features(
    spec: ClipSpec,
    frames: dict[str, np.ndarray],
    pretrain_source: str,
    epochs: int,
    samples: int,
    width: int,
    pool: int,
) -> tuple[dict[str, np.ndarray], Path]:
    """Per-frame features of a frame encoder pre-trained on ``pretrain_source`` (another dataset; cached)."""
    from mtlkit.models.mtmlan import frame_features, pretrain_frame_encoder

    key = hashlib.sha256(f"{spec.key()}-{pretrain_source}-{epochs}-{samples}-{width}-{pool}-v2".encode()).hexdigest()[
        :16
    ]
    root = cache_dir() / "clips"
    feat_path, enc_path = root / f"features-{key}.npz", root / f"encoder-{key}.pt"
    if feat_path.is_file() and enc_path.is_file():
        return load_npz(feat_path, "delete it to recompute the pre-trained frame features"), enc_path
    x, y = pretraining_images(spec.source, pretrain_source, samples, spec.seed)
    log.info(
        f"mtlkit: pre-training the frame encoder on {len(x)} {pretrain_source} training images ({epochs} epochs; "
        f"classes {sorted(set(y.tolist()))} of {pretrain_source}, not the {spec.source} concepts) ..."
    )
    enc = pretrain_frame_encoder(x, y, epochs=epochs, width=width, seed=spec.seed)
    out = {}
    with torch.no_grad():
        for name, fr in frames.items():
            N, F = fr.shape[:2]
            flat = torch.from_numpy(fr.reshape(N * F, 1, 28, 28)).float().div_(255.0)
            feats = torch.cat([frame_features(enc, flat[s : s + 4096], pool) for s in range(0, len(flat), 4096)])
            out[name] = feats.reshape(N, F, -1).numpy().astype(np.float32)
    enc_path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(enc.state_dict(), enc_path)
    save_npz(feat_path, **out)
    return out, enc_path


LOSSES = ("bce", "sample_level")


def label_tasks(names: Sequence[str], loss: str = "bce", beta: float = 2.0, threshold: float = 0.5) -> list[Task]:
    """One binary task per label; ``loss`` = ``"bce"`` or ``"sample_level"`` (MTMLAN Eq. 9 with ``beta``).

    Example:
        >>> [t.name for t in label_tasks(["a", "b"], loss="sample_level")]
        ['a', 'b']
    """
    import mtlkit.metrics.multilabel  # noqa: F401  (registers average_precision / label_accuracy)
    from mtlkit.nn.losses import sample_level_loss

    if loss not in LOSSES:
        raise ConfigError(f"unknown label loss {loss!r}; valid losses are: {', '.join(LOSSES)}")
    if not 0 < float(threshold) < 1:
        raise ConfigError(f"threshold must be in (0, 1), got {threshold!r}")
    fn = sample_level_loss(beta) if loss == "sample_level" else None
    return [
        Task(
            n,
            "binary",
            1,
            loss=fn,
            metrics=("average_precision", "label_accuracy"),
            extra={"threshold": float(threshold), "loss": loss, "beta": float(beta)},
        )
        for n in names
    ]


@register_dataset("clips")
def build_clips(
    n_clips: int = PAPER_CLIPS,
    frames: int = 40,
    source: str = "fashion",
    seed: int = 0,
    cooccur: float = 4.0,
    max_run: int = 4,
    features: str = "pixels",
    pretrain_epochs: int = 2,
    pretrain_samples: int = 20_000,
    feature_width: int = 64,
    pretrain_source: str = "mnist",
    feature_pool: int = 3,
    loss: str = "bce",
    beta: float = 2.0,
    threshold: float = 0.5,
) -> MTLData:
    """The clips benchmark (see the module docstring).

    ``features``: ``"pixels"`` (x is (N, frames, 1, 28, 28) in [0, 1]) or ``"pretrained"`` (x is (N, frames,
    32·feature_pool²): the pooled last conv block of a frame encoder pre-trained for ``pretrain_epochs`` on
    ``pretrain_samples`` training images of ``pretrain_source`` (another dataset than ``source``), frozen, its
    features cached — the analogue of the paper's frozen ImageNet Inception V3).
    ``info["base_rates"]`` holds each concept's fraction of positive clips per split.
    """
    if features not in ("pixels", "pretrained"):
        raise ConfigError(f"clips: unknown features {features!r}; valid: pixels, pretrained")
    if not 1 <= int(feature_pool) <= 7:
        raise ConfigError(f"clips: feature_pool must be in 1..7 (the conv map is 7x7), got {feature_pool}")
    spec = ClipSpec(n_clips=n_clips, frames=frames, cooccur=float(cooccur), max_run=max_run, source=source, seed=seed)
    spec.check()
    tasks = label_tasks(CONCEPTS, loss, beta, threshold)
    if features == "pretrained":  # checked before any image is loaded
        check_pretrain_source(source, pretrain_source)
    images = load_images(source)
    layout = load_layout(spec, images)
    x_pool, _ = _pools(images)
    frames_by_split = {name: x_pool[name][layout["index"][layout["split"] == s]] for s, name in enumerate(SPLITS)}
    info: dict[str, Any] = {
        "source": source,
        "spec": asdict(spec),
        "concepts": list(CONCEPTS),
        "concept_classes": list(CONCEPT_CLASSES),
        "background_classes": list(BACKGROUND_CLASSES),
        "features": features,
    }
    if features == "pretrained":
        feats, enc_path = _pretrained_features(
            spec, frames_by_split, pretrain_source, pretrain_epochs, pretrain_samples, feature_width, feature_pool
        )
        xs = {k: torch.from_numpy(v) for k, v in feats.items()}
        info["frame_encoder_state"] = str(enc_path)
        info["pretrain_source"] = pretrain_source
    else:
        xs = {k: torch.from_numpy(v).float().div_(255.0).unsqueeze(2) for k, v in frames_by_split.items()}

    def split(s: int, name: str) -> Split:
        lab = torch.from_numpy(layout["labels"][layout["split"] == s].astype(np.int64))
        return Split(xs[name], {c: lab[:, j].clone() for j, c in enumerate(CONCEPTS)})

    train, val, test = split(0, "train"), split(1, "val"), split(2, "test")
    info["train_counts"] = [int(train.y[c].sum()) for c in CONCEPTS]
    info["n_train"] = len(train)
    info["base_rates"] = {
        name: [float(sp.y[c].float().mean()) for c in CONCEPTS]
        for name, sp in (("train", train), ("val", val), ("test", test))
    }
    return MTLData("clips", tasks, train, val, test, info=info)


__all__ = [
    "CONCEPTS",
    "PAPER_COUNTS",
    "ClipSpec",
    "always_absent_accuracy",
    "assign_labels",
    "build_clips",
    "check_pretrain_source",
    "label_tasks",
    "load_layout",
    "make_layout",
    "pretraining_images",
]
