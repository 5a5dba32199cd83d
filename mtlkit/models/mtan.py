"""MTAN: Multi-Task Attention Network (Liu, Johns, Davison, "End-to-End Multi-Task Learning with Attention",
CVPR 2019, doi:10.1109/CVPR.2019.00197), on the conv trunk of MTVIB Table I(b) (image datasets: multimnist,
multifashion, multifashionmnist).

A shared network computes features block by block; each task has a soft-attention module per block that selects
task features from the shared ones (Sec. 3.1):

* ``â_i^{(j)} = a_i^{(j)} ⊙ p^{(j)}`` (Eq. 1): task i's attended features at block j, the element-wise product of
  its attention mask and the shared features ``p^{(j)}`` of the block's last layer;
* ``a_i^{(1)} = h_i^{(1)}(g_i^{(1)}(u^{(1)}))`` and, for j >= 2, ``a_i^{(j)} = h_i^{(j)}(g_i^{(j)}([u^{(j)};
  f^{(j)}(â_i^{(j-1)})]))`` (Eq. 2): ``u^{(j)}`` the features of the block's first layer, ``g`` a 1x1 convolution +
  BN + ReLU, ``h`` a 1x1 convolution + BN + sigmoid, so every mask value lies in (0, 1); ``f^{(j)}`` brings task i's
  previous attended features to block j's resolution.

*Choices*, stated because the trunk is not the paper's SegNet:

* the trunk has one layer per block (conv 3x3 + BN + ReLU, twice, then FC 3136 x 384 + BN + ReLU), so
  ``u^{(j)} = p^{(j)}``; on the FC block, ``g`` and ``h`` are linear layers (the 1x1 convolution of a vector);
* ``f^{(j)}`` repeats the trunk's own step between the blocks (max-pool 2 and conv 3x3 + BN + ReLU; max-pool 2,
  flatten and FC + BN + ReLU before the FC block), which gives exactly the next block's shape; it is **shared by the
  tasks**, as in the authors' released implementation (one ``f`` per block, used by every task's branch);
* task i's head (the MTVIB head) reads ``â_i`` of the last block.

**What is shared, and why there is no shared representation.** The trunk and the ``f^{(j)}`` are shared (every
task's loss depends on them); the attention modules and heads are task-owned. The ``f^{(j)}`` act on task features,
after the masks, so some shared parameters sit above task-owned ones and no single tensor carries every shared
path: parameter-level methods work (per-task gradients through the whole graph), a representation-level method is
refused by the training loop with a ConfigError (:meth:`MTAN.representation_is_shared_path` is False).
MTAN needs image inputs; on tabular data use ``mmoe``, ``cgc``, ``ple``, ``cross_stitch`` or ``hps``.

Example:
    >>> import torch
    >>> from types import SimpleNamespace
    >>> from mtlkit.tasks import Task
    >>> data = SimpleNamespace(input_shape=(1, 36, 36), tasks=[Task("l", "multiclass", 10), Task("r", "multiclass", 10)])
    >>> m = build_mtan(data, channels=4, width=8, head_hidden=6).eval()
    >>> {k: tuple(v.shape) for k, v in m(torch.rand(2, 1, 36, 36)).items()}
    {'l': (2, 10), 'r': (2, 10)}
    >>> masks = m.attention_masks(torch.rand(2, 1, 36, 36))
    >>> [tuple(a.shape) for a in masks["l"]]
    [(2, 4, 34, 34), (2, 4, 15, 15), (2, 8)]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn

from mtlkit.errors import ConfigError
from mtlkit.models.base import MTLModel, register_model
from mtlkit.models.hps import ChannelsLast, head

__all__ = ["MTAN", "build_mtan"]


def _attention(c_in: int, c_out: int, conv: bool) -> nn.Sequential:
    """``h(g(·))``: g = 1x1 conv (or linear) + BN + ReLU, h = 1x1 conv (or linear) + BN + sigmoid (Eq. 2)."""
    if conv:
        return nn.Sequential(
            nn.Conv2d(c_in, c_out, 1),
            nn.BatchNorm2d(c_out),
            nn.ReLU(),
            nn.Conv2d(c_out, c_out, 1),
            nn.BatchNorm2d(c_out),
            nn.Sigmoid(),
        )
    return nn.Sequential(
        nn.Linear(c_in, c_out),
        nn.BatchNorm1d(c_out),
        nn.ReLU(),
        nn.Linear(c_out, c_out),
        nn.BatchNorm1d(c_out),
        nn.Sigmoid(),
    )


class MTAN(MTLModel):
    """Shared blocks ``encoder[j]`` and steps ``between[j]`` (``f^{(j+1)}`` and the trunk's own step from block j to
    j+1 are the same module for the trunk and, as ``f``, for the tasks), per-task attention modules
    ``attention[task][j]`` and heads (module docstring).

    Args:
        blocks: the shared blocks, each computing ``p^{(j)}`` (= ``u^{(j)}``) from the previous block's output.
        between: ``len(blocks) - 1`` modules mapping block j's features to the input resolution of block j+1's
            layer (the trunk's pool step); the shared ``f^{(j+1)}`` is ``between[j]`` followed by ``f_layers[j]``.
        f_layers: the layers of ``f`` (shared by the tasks), one per block but the first.
        attention: ``{task: [module per block]}``.
        heads: ``{task: head}``.
    """

    def __init__(
        self,
        blocks: Sequence[nn.Module],
        between: Sequence[nn.Module],
        f_layers: Sequence[nn.Module],
        attention: Mapping[str, Sequence[nn.Module]],
        heads: Mapping[str, nn.Module],
    ):
        super().__init__()
        n = len(blocks)
        if len(between) != n - 1 or len(f_layers) != n - 1 or any(len(a) != n for a in attention.values()):
            raise ConfigError("MTAN needs one step and one f per block but the first, and one attention per block")
        if set(attention) != set(heads):
            raise ConfigError("MTAN: attention modules and heads must name the same tasks")
        self.names = list(heads)
        self.encoder = nn.ModuleList(blocks)
        self.between = nn.ModuleList(between)
        self.f_layers = nn.ModuleList(f_layers)
        self.attention = nn.ModuleDict({t: nn.ModuleList(attention[t]) for t in self.names})
        self.heads = nn.ModuleDict(heads)

    def shared_parameters(self) -> list[nn.Parameter]:
        """The trunk's and the shared ``f``'s parameters (every task's loss depends on them)."""
        mods = [self.encoder, self.between, self.f_layers]
        return [p for m in mods for p in m.parameters() if p.requires_grad]

    def last_shared_layer(self) -> list[nn.Parameter]:
        weights = [p for p in self.encoder.parameters() if p.requires_grad and p.dim() >= 2]
        return weights[-1:]

    def representation_is_shared_path(self) -> bool:
        return False

    def encode(self, x: Tensor) -> Tensor:
        raise TypeError("MTAN has no shared representation (see mtlkit.models.mtan); call the model directly")

    def _run(self, x: Tensor) -> tuple[dict[str, Tensor], dict[str, list[Tensor]]]:
        shared: list[Tensor] = []
        h = x
        for j, block in enumerate(cast(nn.ModuleList, self.encoder)):
            h = block(h if j == 0 else self.between[j - 1](h))
            shared.append(h)  # p^{(j)} = u^{(j)}
        feats: dict[str, Tensor] = {}
        masks: dict[str, list[Tensor]] = {t: [] for t in self.names}
        for t in self.names:
            prev: Tensor | None = None
            for j, p in enumerate(shared):
                if prev is None:
                    a = cast(nn.ModuleList, self.attention[t])[j](p)
                else:
                    f = self.f_layers[j - 1](self.between[j - 1](prev))
                    a = cast(nn.ModuleList, self.attention[t])[j](torch.cat([p, f], dim=1))
                masks[t].append(a)
                prev = a * p  # Eq. 1
            assert prev is not None
            feats[t] = prev
        return feats, masks

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        feats, _ = self._run(x)
        return {t: self.heads[t](feats[t]) for t in self.names}

    def attention_masks(self, x: Tensor) -> dict[str, list[Tensor]]:
        """Per task, the masks ``a_i^{(j)}`` of every block for input ``x`` (Eq. 2)."""
        return self._run(x)[1]


@register_model("mtan")
def build_mtan(data: Any, channels: int = 64, width: int = 384, head_hidden: int = 192) -> MTAN:
    """MTAN on the MTVIB Table I(b) trunk for ``data``'s image tasks (module docstring)."""
    shape = tuple(int(s) for s in data.input_shape)
    if len(shape) != 3:
        raise ConfigError(
            f"mtan needs image inputs (C, H, W); dataset {getattr(data, 'name', '?')!r} has inputs of shape {shape} "
            f"(for tabular data use mmoe, cgc, ple, cross_stitch or hps)"
        )
    c, hh, ww = shape
    b1 = nn.Sequential(ChannelsLast(), nn.Conv2d(c, channels, 3), nn.BatchNorm2d(channels), nn.ReLU())
    step1 = nn.MaxPool2d(2)
    b2 = nn.Sequential(nn.Conv2d(channels, channels, 3), nn.BatchNorm2d(channels), nn.ReLU())
    with torch.no_grad():
        flat = int(step1(b2(step1(b1(torch.zeros(2, c, hh, ww))))).flatten(1).shape[1])
    step2 = nn.Sequential(nn.MaxPool2d(2), nn.Flatten())
    b3 = nn.Sequential(nn.Linear(flat, width), nn.BatchNorm1d(width), nn.ReLU())
    # f: the same layer types as the trunk's next layer (shared by the tasks)
    f2 = nn.Sequential(nn.Conv2d(channels, channels, 3), nn.BatchNorm2d(channels), nn.ReLU())
    f3 = nn.Sequential(nn.Linear(flat, width), nn.BatchNorm1d(width), nn.ReLU())
    attention: dict[str, list[nn.Module]] = {
        t.name: [
            _attention(channels, channels, True),
            _attention(2 * channels, channels, True),
            _attention(2 * width, width, False),
        ]
        for t in data.tasks
    }
    heads: dict[str, nn.Module] = {t.name: head(width, t.num_outputs, head_hidden) for t in data.tasks}
    return MTAN([b1, b2, b3], [step1, step2], [f2, f3], attention, heads)
