"""Hard parameter sharing (HPS): one shared encoder, one head per task (STL: :mod:`mtlkit.models.stl`).

The MultiMNIST encoder and heads are those of the MTVIB paper, Table I(b) (the "Small-AlexNet"-like MTL model):
Conv64 3x3 + BN + ReLU, MaxPool 2, Conv64 3x3 + BN + ReLU, MaxPool 2, FC 3136x384 + BN + ReLU; heads
FC 384x192 + BN + ReLU, FC 192x10. On 36x36 inputs, unpadded 3x3 convolutions give 34 -> 17 -> 15 -> 7, and
64·7·7 = 3136 as in the table.

Example:
    >>> import torch
    >>> from mtlkit.tasks import Task
    >>> m = HPS(ConvEncoder((1, 36, 36)), {"a": head(384, 10), "b": head(384, 10)})
    >>> {k: v.shape for k, v in m(torch.zeros(2, 1, 36, 36)).items()}
    {'a': torch.Size([2, 10]), 'b': torch.Size([2, 10])}
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
from torch import Tensor, nn

from mtlkit.models.base import MTLModel, register_model


class ChannelsLast(nn.Module):
    """Identity that lays a 4-D input out channels-last (NHWC strides; the values and shape are unchanged).

    PyTorch's CPU convolution, batch norm, ReLU and pooling kernels run about 1.4x faster on NHWC than on NCHW for
    the MultiMNIST trunk (0.53 -> 0.37 s per batch-200 training step on 2 threads); ``Flatten`` still reads the
    logical (C, H, W) order, so the model computes the same function either way.
    """

    def forward(self, x: Tensor) -> Tensor:
        return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


def conv_trunk(input_shape: Sequence[int], channels: int = 64) -> tuple[nn.Sequential, int]:
    """The convolutional part shared by MTVIB Table I(b)-(d): (Conv 3x3 + BN + ReLU + MaxPool 2) x 2, flattened.

    Returns the module and its flattened output width (3136 for 36x36 inputs and 64 channels). Activations and
    convolution weights are channels-last (:class:`ChannelsLast`), which only changes the speed.
    """
    if len(input_shape) != 3:
        from mtlkit.errors import ConfigError

        raise ConfigError(
            f"the conv encoder needs image inputs of shape (channels, height, width); this dataset's inputs have "
            f"shape {tuple(input_shape)}: use model.options.encoder=mlp"
        )
    c, h, w = input_shape
    conv = nn.Sequential(
        ChannelsLast(),
        nn.Conv2d(c, channels, 3),
        nn.BatchNorm2d(channels),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(channels, channels, 3),
        nn.BatchNorm2d(channels),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
    )
    conv.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # documented, not in the stubs
    with torch.no_grad():
        flat = int(conv(torch.zeros(2, c, h, w)).shape[1])
    return conv, flat


class ConvEncoder(nn.Sequential):
    """MTVIB Table I(b) shared encoder (output width ``width``, 384 in the paper)."""

    def __init__(self, input_shape: Sequence[int], channels: int = 64, width: int = 384):
        conv, flat = conv_trunk(input_shape, channels)
        super().__init__(*conv, nn.Linear(flat, width), nn.BatchNorm1d(width), nn.ReLU())
        self.out_features = width


class MLPEncoder(nn.Sequential):
    """Fully connected encoder: Linear + ReLU layers of the given widths, on flattened inputs."""

    def __init__(
        self, input_shape: Sequence[int], hidden: Sequence[int] = (1024, 1024, 1024), batch_norm: bool = False
    ):
        d = int(torch.tensor(input_shape).prod())
        layers: list[nn.Module] = [nn.Flatten()]
        for width in hidden:
            layers += [nn.Linear(d, width)] + ([nn.BatchNorm1d(width)] if batch_norm else []) + [nn.ReLU()]
            d = width
        super().__init__(*layers)
        self.out_features = d


def head(in_features: int, out_features: int, hidden: int = 192, batch_norm: bool = True) -> nn.Sequential:
    """MTVIB Table I(b) task head: FC in x 192 + BN + ReLU, FC 192 x out (``batch_norm=False``: without the BN,
    e.g. for data-parallel runs that must equal one process exactly)."""
    norm: list[nn.Module] = [nn.BatchNorm1d(hidden)] if batch_norm else []
    return nn.Sequential(nn.Linear(in_features, hidden), *norm, nn.ReLU(), nn.Linear(hidden, out_features))


class HPS(MTLModel):
    """Shared encoder + a ``ModuleDict`` of heads (one per task)."""

    def __init__(self, encoder: nn.Module, heads: dict[str, nn.Module]):
        super().__init__()
        self.encoder = encoder
        self.heads = nn.ModuleDict(heads)

    def decode(self, z: Tensor) -> dict[str, Tensor]:
        return {name: h(z) for name, h in self.heads.items()}


def _encoder(kind: str, input_shape: Sequence[int], width: int, hidden: Sequence[int]) -> nn.Module:
    if kind == "conv":
        return ConvEncoder(input_shape, width=width)
    if kind == "mlp":
        return MLPEncoder(input_shape, hidden)
    from mtlkit.errors import unknown_name

    raise unknown_name("encoder", kind, ["conv", "mlp"])


def _out(enc: nn.Module) -> int:
    # an encoder's out_features is a plain int attribute, which the stubs of Module type as Tensor | Module
    return int(cast(int, enc.out_features))


@register_model("hps")
def build_hps(
    data,
    encoder: str = "conv",
    width: int = 384,
    hidden: Sequence[int] = (1024, 1024, 1024),
    head_hidden: int = 192,
    extra_tasks: int = 0,
    head_batch_norm: bool = True,
) -> HPS:
    """HPS for ``data``'s tasks. ``extra_tasks`` adds copies of the tasks' heads (for T-scaling benchmarks only);
    ``head_batch_norm=False`` drops the heads' BatchNorm (with ``encoder=mlp``: a model without BatchNorm)."""
    enc = _encoder(encoder, data.input_shape, width, hidden)
    heads: dict[str, nn.Module] = {
        t.name: head(_out(enc), t.num_outputs, head_hidden, head_batch_norm) for t in data.tasks
    }
    return HPS(enc, heads)
