"""MTMLAN: multi-label multi-task attention network, and the CMLC multi-label baseline.

Tianyi Wang and Shu-Ching Chen, "Multi-Label Multi-Task Learning with Dynamic Task Weight Balancing", IEEE 21st
International Conference on Information Reuse and Integration for Data Science (IRI 2020), pp. 245-252, 2020,
doi 10.1109/IRI49571.2020.00042: Sec. III-A and Fig. 1 (architecture), Eq. 1-6; CMLC is baseline 1) of Sec. IV-C.

* Shared network: the paper uses an ImageNet-pretrained Inception V3 truncated after its last average pooling,
  applied to every frame. Here: :class:`FrameEncoder`, a small conv net on 28x28 frames (Conv16-BN-ReLU-Pool,
  Conv32-BN-ReLU-Pool, FC to ``width``), applied frame by frame. It can be pre-trained on single-frame
  classification of *another* dataset's images (:func:`pretrain_frame_encoder`; ``clips`` pre-trains on MNIST
  digits when its frames are Fashion-MNIST items, the analogue of ImageNet pre-training, which never saw the
  disaster concepts). When the dataset holds cached frozen per-frame features of such an encoder (``clips`` with
  ``features="pretrained"``), the shared network is a trained per-frame MLP on them (``frame_hidden`` layers of
  FC + BatchNorm + ReLU, then FC + ReLU to ``width``: the paper's shared network also ends in a batch-normalised
  FC layer), applied to every frame below the task networks. It is trained by every row, and its last FC is the
  "last layer of the shared network" (W of Eq. 10/11 in GradNorm's reading). The task weights act on the shared
  parameters only: under Adam a slowly varying weight on task j barely changes task j's own head updates (Adam
  divides by the running gradient scale), so the shared network must be substantial for the weightings to matter.
* Task-specific network (one per label): two bidirectional GRU layers over the frame features (Eq. 2-4, H = the
  concatenated forward/backward states), self-attention (Eq. 5-6) ``M = softmax(W_s2 tanh(W_s1 H))``,
  ``A = M H``, then a final FC layer to one logit.
* CMLC: the same shared network, *one* 2-layer BiGRU shared by all labels, and one FC layer with a logit per label
  (sigmoid + BCE through the tasks' loss).
* Tabular data (yeast, 1-D inputs): an MLP shared encoder; per task an MLP head replaces BiGRU + attention; CMLC's
  single head is an MLP with one output per label.

Choices (the paper does not say): GRU hidden size 32 per direction (``hidden``), attention size d_a = 32
(``attention_dim``) and one attention hop r = 1 (``hops``; with r > 1 the r rows of A are concatenated, as in
Lin et al.'s structured self-attention that Eq. 5 follows); W_s1, W_s2 have no bias (Eq. 5 has none). Softmax is
taken over the frame axis, so every row of M sums to 1 over frames. CMLC reads the last layer's final forward and
backward hidden states (the paper does not say how its BiGRU output is pooled).

Example:
    >>> import torch
    >>> from mtlkit.tasks import Task
    >>> m = MTMLAN(SharedFrameNet((6, 1, 28, 28), width=16), ["a", "b"], hidden=8, attention_dim=8)
    >>> out = m(torch.rand(3, 6, 1, 28, 28))
    >>> {k: tuple(v.shape) for k, v in out.items()}
    {'a': (3, 1), 'b': (3, 1)}
    >>> M = m.attention(torch.rand(3, 6, 1, 28, 28))["a"]   # (B, r, F)
    >>> bool(torch.allclose(M.sum(dim=-1), torch.ones(3, 1)))  # rows of M sum to 1 over frames
    True
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import cast

import numpy as np
import torch
from torch import Tensor, nn

from mtlkit.errors import ConfigError
from mtlkit.models.base import MTLModel, register_model
from mtlkit.models.hps import MLPEncoder


class FrameEncoder(nn.Sequential):
    """Small conv encoder of one 28x28 grey frame -> ``width`` features (the stand-in for Inception V3)."""

    def __init__(self, width: int = 64, channels: tuple[int, int] = (16, 32)) -> None:
        c1, c2 = channels
        super().__init__(
            nn.Conv2d(1, c1, 3, padding=1),
            nn.BatchNorm2d(c1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1),
            nn.BatchNorm2d(c2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(c2 * 7 * 7, width),
            nn.ReLU(),
        )
        self.out_features = width


def pretrain_frame_encoder(
    images: np.ndarray,
    labels: np.ndarray,
    epochs: int = 2,
    width: int = 64,
    seed: int = 0,
    batch_size: int = 128,
    lr: float = 1e-3,
) -> FrameEncoder:
    """Train a :class:`FrameEncoder` + linear classifier on single-frame 10-class classification; return the encoder.

    Example:
        >>> import numpy as np
        >>> enc = pretrain_frame_encoder(np.zeros((8, 28, 28), np.uint8), np.arange(8) % 10, epochs=1, width=4)
        >>> enc.out_features
        4
    """
    if images.ndim != 3 or images.shape[1:] != (28, 28) or len(images) != len(labels):
        raise ValueError(
            f"pretrain_frame_encoder needs (n, 28, 28) images and n labels, got {images.shape} and {np.shape(labels)}"
        )
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    enc = FrameEncoder(width)
    clf = nn.Linear(width, 10)
    opt = torch.optim.Adam(list(enc.parameters()) + list(clf.parameters()), lr=lr)
    x = torch.from_numpy(images).float().div_(255.0).unsqueeze(1)
    y = torch.as_tensor(labels, dtype=torch.long)
    enc.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for s in range(0, len(x), batch_size):
            idx = perm[s : s + batch_size]
            loss = nn.functional.cross_entropy(clf(enc(x[idx])), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return enc.eval()


def frame_features(encoder: FrameEncoder, x: Tensor, pool: int = 3) -> Tensor:
    """The frozen per-frame feature of a pre-trained :class:`FrameEncoder`: its last conv block (before the FC),
    average-pooled to ``pool`` x ``pool`` and flattened (``channels[1]·pool²`` values per frame).

    Example:
        >>> import torch
        >>> tuple(frame_features(FrameEncoder(8), torch.zeros(2, 1, 28, 28), pool=3).shape)
        (2, 288)
    """
    encoder.eval()
    with torch.no_grad():
        for layer in list(encoder)[:8]:  # conv, BN, ReLU, pool, conv, BN, ReLU, pool: (n, c2, 7, 7)
            x = layer(x)
        return nn.functional.adaptive_avg_pool2d(x, pool).flatten(1)


class SharedFrameNet(nn.Module):
    """Shared network applied to every frame: (B, F, 1, 28, 28) -> (B, F, width), or (B, F, d) features -> width.

    Args:
        input_shape: one clip's shape, ``(F, 1, 28, 28)`` (pixels) or ``(F, d)`` (cached frame features).
        width: output features per frame.
        pretrained_state: path of a pre-trained :class:`FrameEncoder` state dict (pixels only).
        freeze: keep the pre-trained conv layers fixed (pixels only; the frame encoder then runs without grad).
        frame_hidden: widths of the FC + BatchNorm + ReLU layers before the last FC (cached features only).
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        width: int = 64,
        pretrained_state: str | None = None,
        freeze: bool = False,
        frame_hidden: Sequence[int] = (256,),
    ) -> None:
        super().__init__()
        shape = tuple(int(s) for s in input_shape)
        self.pixels = len(shape) == 4
        if self.pixels:
            if shape[1:] != (1, 28, 28):
                raise ConfigError(f"SharedFrameNet: frames must be 1x28x28, got clip shape {shape}")
            self.frame: nn.Module = FrameEncoder(width)
            if pretrained_state is not None:
                state = torch.load(pretrained_state, map_location="cpu", weights_only=True)
                self.frame.load_state_dict(state)
            if freeze:
                if pretrained_state is None:
                    raise ConfigError("SharedFrameNet: freeze=True needs a pre-trained frame encoder")
                for p in self.frame.parameters():
                    p.requires_grad_(False)
        elif len(shape) == 2:
            if pretrained_state is not None or freeze:
                raise ConfigError(
                    "SharedFrameNet: the input is already (frozen) frame features; pretrained/freeze "
                    "apply to pixel inputs only"
                )
            hidden = [int(h) for h in frame_hidden]
            if any(h < 1 for h in hidden) or width < 1:
                raise ConfigError(f"SharedFrameNet: widths must be >= 1, got frame_hidden={hidden}, width={width}")
            layers: list[nn.Module] = []
            d = shape[1]
            for h in hidden:
                layers += [nn.Linear(d, h), nn.BatchNorm1d(h), nn.ReLU()]
                d = h
            self.frame = nn.Sequential(*layers, nn.Linear(d, width), nn.ReLU())
        else:
            raise ConfigError(f"SharedFrameNet: a clip must be (F, 1, 28, 28) or (F, d), got {shape}")
        self.frozen = freeze
        self.out_features = width

    def forward(self, x: Tensor) -> Tensor:
        B, F = x.shape[:2]
        flat = x.reshape(B * F, *x.shape[2:])
        if self.frozen:
            self.frame.eval()
            with torch.no_grad():
                z = self.frame(flat)
        else:
            z = self.frame(flat)
        return z.reshape(B, F, -1)


class SelfAttention(nn.Module):
    """Eq. 5-6: ``M = softmax(W_s2 tanh(W_s1 H))`` over the frames, ``A = M H``; returns (A flattened, M).

    Example:
        >>> import torch
        >>> A, M = SelfAttention(6, 4, hops=2)(torch.randn(3, 5, 6))
        >>> tuple(A.shape), tuple(M.shape), bool(torch.allclose(M.sum(-1), torch.ones(3, 2)))
        ((3, 12), (3, 2, 5), True)
    """

    def __init__(self, in_features: int, attention_dim: int = 32, hops: int = 1) -> None:
        super().__init__()
        if hops < 1 or attention_dim < 1:
            raise ConfigError(f"SelfAttention: hops and attention_dim must be >= 1, got {hops}, {attention_dim}")
        self.w_s1 = nn.Linear(in_features, attention_dim, bias=False)
        self.w_s2 = nn.Linear(attention_dim, hops, bias=False)
        self.out_features = hops * in_features

    def forward(self, H: Tensor) -> tuple[Tensor, Tensor]:
        # H: (B, n, 2h). Scores (B, n, r) -> M (B, r, n) with softmax over the n frames (Eq. 5).
        M = torch.softmax(self.w_s2(torch.tanh(self.w_s1(H))).transpose(1, 2), dim=-1)
        A = torch.bmm(M, H)  # Eq. 6: (B, r, 2h)
        return A.flatten(1), M


class TaskNet(nn.Module):
    """One label's network: 2-layer BiGRU (Eq. 2-4) -> self-attention (Eq. 5-6) -> FC to one logit."""

    def __init__(self, in_features: int, hidden: int = 32, attention_dim: int = 32, hops: int = 1) -> None:
        super().__init__()
        self.gru = nn.GRU(in_features, hidden, num_layers=2, bidirectional=True, batch_first=True)
        self.attn = SelfAttention(2 * hidden, attention_dim, hops)
        self.fc = nn.Linear(self.attn.out_features, 1)

    def forward(self, z: Tensor, return_attention: bool = False):
        H, _ = self.gru(z)
        A, M = self.attn(H)
        out = self.fc(A)
        return (out, M) if return_attention else out

    def first_layer(self) -> list[nn.Parameter]:
        """The first layer's input weights (both directions): where MTMLAN's TDB takes gradient norms."""
        # GRU's weights are registered parameters, which the stubs of Module type as Tensor | Module
        return [cast(nn.Parameter, self.gru.weight_ih_l0), cast(nn.Parameter, self.gru.weight_ih_l0_reverse)]


class MLPHead(nn.Sequential):
    """Tabular task head: FC + ReLU + FC (replaces BiGRU + attention for yeast)."""

    def __init__(self, in_features: int, hidden: int = 64, out: int = 1) -> None:
        super().__init__(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, out))

    def first_layer(self) -> list[nn.Parameter]:
        return [cast(nn.Parameter, self[0].weight)]  # the first Linear's weight


class MTMLAN(MTLModel):
    """Shared per-frame network + one :class:`TaskNet` (or :class:`MLPHead` for tabular inputs) per label."""

    def __init__(
        self,
        encoder: nn.Module,
        labels: Sequence[str],
        hidden: int = 32,
        attention_dim: int = 32,
        hops: int = 1,
        head_hidden: int = 64,
    ) -> None:
        super().__init__()
        if not labels:
            raise ConfigError("MTMLAN needs at least one label task")
        self.encoder = encoder
        d = int(cast(int, encoder.out_features))  # a plain int attribute of the encoder (Tensor | Module to the stubs)
        self.sequential = isinstance(encoder, SharedFrameNet)
        self.heads = nn.ModuleDict(
            {n: TaskNet(d, hidden, attention_dim, hops) if self.sequential else MLPHead(d, head_hidden) for n in labels}
        )

    def decode(self, z: Tensor) -> dict[str, Tensor]:
        return {n: h(z) for n, h in self.heads.items()}

    def task_first_layers(self) -> list[list[nn.Parameter]]:
        """Per task (in head order) the weights of the first layer of its task-specific network (TDB, step 2)."""
        return [cast("TaskNet | MLPHead", h).first_layer() for h in self.heads.values()]

    @torch.no_grad()
    def attention(self, x: Tensor) -> dict[str, Tensor]:
        """Each task's attention matrix M (B, r, F) on the clips ``x``."""
        if not self.sequential:
            raise TypeError("attention weights exist only for frame-sequence inputs")
        z = self.encode(x)
        return {n: h(z, return_attention=True)[1] for n, h in self.heads.items()}


class CMLC(MTLModel):
    """Common multi-label classifier: shared network, one 2-layer BiGRU (or MLP) and a logit per label."""

    def __init__(self, encoder: nn.Module, labels: Sequence[str], hidden: int = 32, head_hidden: int = 64) -> None:
        super().__init__()
        if not labels:
            raise ConfigError("CMLC needs at least one label task")
        self.encoder = encoder
        self.labels = list(labels)
        d = int(cast(int, encoder.out_features))  # a plain int attribute of the encoder (Tensor | Module to the stubs)
        self.sequential = isinstance(encoder, SharedFrameNet)
        if self.sequential:
            self.gru = nn.GRU(d, hidden, num_layers=2, bidirectional=True, batch_first=True)
            self.fc: nn.Module = nn.Linear(2 * hidden, len(self.labels))
        else:
            self.fc = MLPHead(d, head_hidden, len(self.labels))

    def decode(self, z: Tensor) -> dict[str, Tensor]:
        if self.sequential:
            _, h = self.gru(z)  # h: (num_layers * 2, B, hidden)
            logits = self.fc(torch.cat([h[-2], h[-1]], dim=1))
        else:
            logits = self.fc(z)
        return {n: logits[:, j : j + 1] for j, n in enumerate(self.labels)}


def _check_binary(data) -> list[str]:
    bad = [t.name for t in data.tasks if t.kind != "binary"]
    if bad:
        raise ConfigError(f"MTMLAN/CMLC treat every label as a binary task; these tasks are not binary: {bad}")
    return [t.name for t in data.tasks]


def _shared(
    data, width: int, pretrained: bool, freeze: bool, mlp_hidden: Sequence[int], frame_hidden: Sequence[int]
) -> nn.Module:
    shape = tuple(data.input_shape)
    if len(shape) == 1:
        if pretrained or freeze:
            raise ConfigError("pretrained/freeze apply to frame inputs only (this dataset is tabular)")
        return MLPEncoder(shape, tuple(mlp_hidden))
    state = None
    if pretrained:
        state = data.info.get("frame_encoder_state")
        if state is None or not Path(state).is_file():
            raise ConfigError(
                "model option pretrained=True needs a pre-trained frame encoder: build the clips "
                "dataset with features='pretrained' once (it caches one) or train one with "
                "pretrain_frame_encoder"
            )
    return SharedFrameNet(shape, width, state, freeze, frame_hidden)


@register_model("mtmlan")
def build_mtmlan(
    data,
    width: int = 64,
    hidden: int = 32,
    attention_dim: int = 32,
    hops: int = 1,
    pretrained: bool = False,
    freeze: bool = False,
    mlp_hidden: Sequence[int] = (256,),
    head_hidden: int = 64,
    frame_hidden: Sequence[int] = (256,),
) -> MTMLAN:
    """MTMLAN for a multi-label dataset stored as one binary task per label (frames or tabular)."""
    return MTMLAN(
        _shared(data, width, pretrained, freeze, mlp_hidden, frame_hidden),
        _check_binary(data),
        hidden,
        attention_dim,
        hops,
        head_hidden,
    )


@register_model("cmlc")
def build_cmlc(
    data,
    width: int = 64,
    hidden: int = 32,
    pretrained: bool = False,
    freeze: bool = False,
    mlp_hidden: Sequence[int] = (256,),
    head_hidden: int = 64,
    frame_hidden: Sequence[int] = (256,),
) -> CMLC:
    """CMLC baseline (MTMLAN Sec. IV-C, 1)) for the same data."""
    return CMLC(
        _shared(data, width, pretrained, freeze, mlp_hidden, frame_hidden), _check_binary(data), hidden, head_hidden
    )


__all__ = [
    "CMLC",
    "MTMLAN",
    "FrameEncoder",
    "MLPHead",
    "SelfAttention",
    "SharedFrameNet",
    "TaskNet",
    "build_cmlc",
    "build_mtmlan",
    "frame_features",
    "pretrain_frame_encoder",
]
