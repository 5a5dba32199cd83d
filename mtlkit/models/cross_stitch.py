"""Cross-stitch networks (Misra, Shrivastava, Gupta, Hebert, "Cross-stitch Networks for Multi-task Learning",
CVPR 2016, doi:10.1109/CVPR.2016.433).

Each task has a network column of its own; after every layer, a *cross-stitch unit* replaces each task's
activation by a learned linear combination of all tasks' activations at that layer (Sec. 3.2, Eq. 1, for two tasks
A and B and every location (i, j) of the activation maps):

``[x̃_A; x̃_B] = [[α_AA, α_AB], [α_BA, α_BB]] [x_A; x_B]``

so ``x̃_t = Σ_s α_ts x_s``, and the gradients of Eq. 2 follow by autograd. *Choices*:

* one T x T matrix α per stitched layer, shared by all channels and locations (Eq. 1 has no channel index); T tasks
  generalise the 2 x 2 matrix;
* initialisation: the paper initialises the units as convex combinations, ``α_S`` (same task) on the diagonal and
  ``α_D`` (other task) off it with ``α_S + α_D = 1`` (Sec. 4, "Initializing parameters of cross-stitch units"), and
  uses ``(α_S, α_D) = (0.9, 0.1)``, our defaults ``alpha_same=0.9``; for T > 2 tasks each off-diagonal entry is
  ``(1 − α_S)/(T − 1)``, so every row still sums to one;
* the paper trains α with a larger learning rate than the columns; the training loop has one learning rate, so
  ``alpha_lr_scale = s`` parametrises ``α = s·β`` and trains β: with Adam (scale-invariant steps) that multiplies
  α's effective learning rate by ``s`` (with SGD, by ``s²``). Default 1 (no scaling).

Columns (*choices*): on tabular inputs an MLP with ``hidden`` ReLU layers, on images the MTVIB Table I(b) trunk
split into its three layers (conv block, conv block, FC); a unit follows every layer. Heads: Linear + ReLU +
Linear (tabular, ``head_hidden``) or the MTVIB head (images).

**What is shared.** After the first unit every column feeds every task, so all column layers and all units are
shared parameters (a task's gradient reaches the other tasks' columns through α's off-diagonal entries); only the
heads are task-owned. The shared representation is the output of the last unit, stacked per task,
``z = [x̃_1, ..., x̃_T]`` of shape ``(B, T, d)``; head t reads ``z[:, t]``. Every shared path goes through ``z``, so
representation-level methods apply — but each task's gradient w.r.t. ``z`` lives in its own slice, so the Gramian
of those gradients is diagonal and a representation-level aggregator can only rescale the tasks.

Example:
    >>> import torch
    >>> from types import SimpleNamespace
    >>> from mtlkit.tasks import Task
    >>> data = SimpleNamespace(input_shape=(6,), tasks=[Task("a", "binary"), Task("b", "binary")])
    >>> m = build_cross_stitch(data, hidden=(5, 4), head_hidden=3)
    >>> m.alphas()[0]
    tensor([[0.9000, 0.1000],
            [0.1000, 0.9000]])
    >>> tuple(m.encode(torch.randn(2, 6)).shape)
    (2, 2, 4)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn

from mtlkit.errors import ConfigError
from mtlkit.models.base import MTLModel, register_model
from mtlkit.models.hps import ChannelsLast, head
from mtlkit.models.mmoe import input_kind, tower

__all__ = ["CrossStitch", "CrossStitchUnit", "build_cross_stitch", "stitch_init"]


def stitch_init(num_tasks: int, alpha_same: float = 0.9) -> Tensor:
    """The initial T x T unit: ``alpha_same`` on the diagonal, ``(1 − alpha_same)/(T − 1)`` elsewhere (rows sum to 1).

    Example:
        >>> stitch_init(3, 0.8)
        tensor([[0.8000, 0.1000, 0.1000],
                [0.1000, 0.8000, 0.1000],
                [0.1000, 0.1000, 0.8000]])
    """
    if num_tasks < 1:
        raise ConfigError(f"a cross-stitch unit needs at least one task, got {num_tasks}")
    if not 0.0 <= alpha_same <= 1.0:
        raise ConfigError(f"alpha_same must be in [0, 1] (a convex initialisation), got {alpha_same}")
    if num_tasks == 1:
        return torch.ones(1, 1)
    a = torch.full((num_tasks, num_tasks), (1.0 - alpha_same) / (num_tasks - 1))
    a.fill_diagonal_(alpha_same)
    return a


class CrossStitchUnit(nn.Module):
    """``x̃_t = Σ_s α_ts x_s`` over the task dimension (dim 0 of a ``(T, B, ...)`` stack), ``α = scale·β`` (Eq. 1)."""

    def __init__(self, num_tasks: int, alpha_same: float = 0.9, lr_scale: float = 1.0):
        super().__init__()
        if not lr_scale > 0:
            raise ConfigError(f"alpha_lr_scale must be > 0, got {lr_scale}")
        self.scale = float(lr_scale)
        self.beta = nn.Parameter(stitch_init(num_tasks, alpha_same) / self.scale)

    @property
    def alpha(self) -> Tensor:
        return self.beta * self.scale

    def forward(self, xs: Tensor) -> Tensor:
        return torch.einsum("ts,s...->t...", self.alpha.to(xs.dtype), xs)


class CrossStitch(MTLModel):
    """Task columns ``columns[t][layer]`` with a :class:`CrossStitchUnit` after every layer, and a head per task."""

    def __init__(
        self, columns: Mapping[str, Sequence[nn.Module]], heads: Mapping[str, nn.Module], units: Sequence[nn.Module]
    ):
        super().__init__()
        depths = {len(c) for c in columns.values()}
        if set(columns) != set(heads) or len(depths) != 1 or depths != {len(units)}:
            raise ConfigError("CrossStitch needs one column per head, all of the same depth, and one unit per layer")
        self.names = list(heads)
        self.columns = nn.ModuleDict({t: nn.ModuleList(columns[t]) for t in self.names})
        self.units = nn.ModuleList(units)
        self.heads = nn.ModuleDict(heads)
        self.encoder = nn.ModuleList([self.columns, self.units])  # the shared part (module docstring)

    def alphas(self) -> list[Tensor]:
        """The units' α matrices (detached), in layer order."""
        return [cast(CrossStitchUnit, u).alpha.detach().clone() for u in self.units]

    def encode(self, x: Tensor) -> Tensor:
        """``(B, T, d)``: the last unit's output per task."""
        acts = [x for _ in self.names]
        for j, unit in enumerate(self.units):
            stacked = torch.stack(
                [cast(nn.ModuleList, self.columns[t])[j](a) for t, a in zip(self.names, acts, strict=True)]
            )
            acts = list(unit(stacked).unbind(0))
        return torch.stack(acts, dim=1)

    def decode(self, z: Tensor) -> dict[str, Tensor]:
        return {t: self.heads[t](z[:, i]) for i, t in enumerate(self.names)}


def _conv_column(input_shape: Sequence[int], channels: int, width: int) -> list[nn.Module]:
    """MTVIB Table I(b) trunk as three stitchable layers (the same layers as :class:`~mtlkit.models.hps.ConvEncoder`)."""
    c, h, w = (int(s) for s in input_shape)
    b1 = nn.Sequential(ChannelsLast(), nn.Conv2d(c, channels, 3), nn.BatchNorm2d(channels), nn.ReLU(), nn.MaxPool2d(2))
    b2 = nn.Sequential(nn.Conv2d(channels, channels, 3), nn.BatchNorm2d(channels), nn.ReLU(), nn.MaxPool2d(2))
    with torch.no_grad():
        flat = int(b2(b1(torch.zeros(2, c, h, w))).flatten(1).shape[1])
    b3 = nn.Sequential(nn.Flatten(), nn.Linear(flat, width), nn.BatchNorm1d(width), nn.ReLU())
    return [b1, b2, b3]


@register_model("cross_stitch")
def build_cross_stitch(
    data: Any,
    hidden: Sequence[int] = (64, 32),
    channels: int = 64,
    width: int = 384,
    head_hidden: int | None = None,
    alpha_same: float = 0.9,
    alpha_lr_scale: float = 1.0,
    column: str = "auto",
) -> CrossStitch:
    """Cross-stitch network for ``data``'s tasks (module docstring). ``head_hidden``: 32 on tabular inputs, 192
    (the MTVIB head) on images when not given."""
    kind = input_kind(data.input_shape, column)
    names = [t.name for t in data.tasks]
    columns: dict[str, list[nn.Module]] = {}
    if kind == "conv":
        for t in names:
            columns[t] = _conv_column(data.input_shape, channels, width)
        d = width
        heads: dict[str, nn.Module] = {
            t.name: head(d, t.num_outputs, 192 if head_hidden is None else head_hidden) for t in data.tasks
        }
    else:
        widths = [int(h) for h in hidden]
        if not widths or min(widths) < 1:
            raise ConfigError(f"cross_stitch: hidden must be positive layer widths, got {list(hidden)}")
        d_in = int(torch.tensor(tuple(data.input_shape)).prod())
        for t in names:
            layers: list[nn.Module] = []
            d = d_in
            for i, w in enumerate(widths):
                pre: list[nn.Module] = [nn.Flatten()] if i == 0 else []
                layers.append(nn.Sequential(*pre, nn.Linear(d, w), nn.ReLU()))
                d = w
            columns[t] = layers
        heads = {t.name: tower(d, 32 if head_hidden is None else head_hidden, t.num_outputs) for t in data.tasks}
    depth = len(next(iter(columns.values())))
    units = [CrossStitchUnit(len(names), alpha_same, alpha_lr_scale) for _ in range(depth)]
    return CrossStitch(columns, heads, units)
