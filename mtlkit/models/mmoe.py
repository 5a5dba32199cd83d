"""MMoE: Multi-gate Mixture-of-Experts (Ma, Zhao, Yi, Chen, Hong, Chi, "Modeling Task Relationships in Multi-task
Learning with Multi-gate Mixture-of-Experts", KDD 2018, doi:10.1145/3219819.3220007).

``n`` expert networks ``f_i`` are shared by all tasks; task k has its own gate and tower (Sec. 4.2):

* ``y_k = h^k(f^k(x))`` with ``f^k(x) = Σ_{i=1}^n g^k(x)_i f_i(x)`` (Eq. 6),
* ``g^k(x) = softmax(W_{gk} x)``, ``W_{gk} ∈ R^{n x d}`` (Eq. 7): a linear map of the *input* without bias,
  followed by a softmax, so each task's gate weights are positive and sum to one.

**The shared representation** (our choice, needed because the gated mixtures differ per task): ``encode(x)`` is the
stack of the expert outputs ``z = [f_1(x), ..., f_n(x)]`` (shape ``(B, n, d)``), the only part every task reads;
the gates and towers are the task part (:meth:`MMoE.decode`). The experts are the shared parameters, the gates
and towers task-owned (each reaches its own task's loss only), and every path from an expert to a loss goes
through ``z``: parameter-level methods (e.g. PCGrad) aggregate the per-task gradients of the experts, and
representation-level ones (MGDA-UB) the per-task gradients w.r.t. ``z``. A gate reads ``x`` itself, not ``z``, so
``encode`` keeps its input for the ``decode`` that follows (call them in this order, as ``forward`` and the training
loop do; a batch-size mismatch is an error).

Experts (*choices*, the paper tunes them per dataset): on tabular inputs an MLP (``expert_hidden`` ReLU layers;
one layer of 64 units by default), on images the conv trunk of MTVIB Table I(b) (:class:`mtlkit.models.hps.
ConvEncoder`, ``channels``/``width``). Towers: one hidden ReLU layer of ``tower_hidden`` units and a linear output.

Example:
    >>> import torch
    >>> from types import SimpleNamespace
    >>> from mtlkit.tasks import Task
    >>> data = SimpleNamespace(input_shape=(10,), tasks=[Task("a", "binary"), Task("b", "multiclass", 3)])
    >>> m = build_mmoe(data, num_experts=4, expert_hidden=(8,), tower_hidden=4)
    >>> {k: tuple(v.shape) for k, v in m(torch.randn(5, 10)).items()}
    {'a': (5, 1), 'b': (5, 3)}
    >>> [round(float(w.detach().sum(1).max()), 5) for w in m.gate_weights(torch.randn(5, 10)).values()]
    [1.0, 1.0]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn

from mtlkit.errors import ConfigError
from mtlkit.models.base import MTLModel, register_model
from mtlkit.models.hps import ConvEncoder

__all__ = ["MMoE", "build_mmoe", "expert_network", "experts", "input_kind", "tower"]


def input_kind(input_shape: Sequence[int], expert: str = "auto") -> str:
    """``"mlp"`` for 1-D inputs, ``"conv"`` for (C, H, W) images; ``expert`` forces one (checked against the shape).

    Example:
        >>> input_kind((503,)), input_kind((1, 36, 36))
        ('mlp', 'conv')
    """
    shape = tuple(int(s) for s in input_shape)
    if expert not in ("auto", "mlp", "conv"):
        raise ConfigError(f"unknown expert kind {expert!r}; valid kinds are: auto, conv, mlp")
    if expert == "conv" and len(shape) != 3:
        raise ConfigError(f"conv experts need (C, H, W) image inputs, got inputs of shape {shape}")
    if expert != "auto":
        return expert
    return "conv" if len(shape) == 3 else "mlp"


def _mlp(d_in: int, hidden: Sequence[int]) -> tuple[nn.Sequential, int]:
    widths = [int(h) for h in hidden]
    if not widths or min(widths) < 1:
        raise ConfigError(f"hidden layer widths must be a non-empty list of positive integers, got {list(hidden)}")
    layers: list[nn.Module] = [nn.Flatten()]
    d = d_in
    for w in widths:
        layers += [nn.Linear(d, w), nn.ReLU()]
        d = w
    return nn.Sequential(*layers), d


def expert_network(
    input_shape: Sequence[int], kind: str, hidden: Sequence[int] = (64,), channels: int = 64, width: int = 384
) -> tuple[nn.Module, int]:
    """One expert (or column) for inputs of ``input_shape``: an MLP (``kind="mlp"``: Flatten, then Linear + ReLU per
    width of ``hidden``) or the MTVIB Table I(b) conv trunk (``kind="conv"``). Returns it and its output width.

    Example:
        >>> net, d = expert_network((6,), "mlp", hidden=(5, 3)); d, tuple(net(torch.zeros(2, 6)).shape)
        (3, (2, 3))
    """
    if kind == "conv":
        enc = ConvEncoder(input_shape, channels=channels, width=width)
        return enc, width
    return _mlp(int(torch.tensor(tuple(input_shape)).prod()), hidden)


def experts(
    n: int, input_shape: Sequence[int], kind: str, hidden: Sequence[int] = (64,), channels: int = 64, width: int = 384
) -> tuple[list[nn.Module], int]:
    """``n`` independent experts (:func:`expert_network`, each with its own weights) and their output width.

    Example:
        >>> nets, d = experts(3, (6,), "mlp", hidden=(4,)); len(nets), d, nets[0] is nets[1]
        (3, 4, False)
    """
    nets, d = [], 0
    for _ in range(n):
        net, d = expert_network(input_shape, kind, hidden, channels, width)
        nets.append(net)
    return nets, d


def tower(d_in: int, hidden: int, out: int) -> nn.Sequential:
    """A task tower: Linear(d_in, hidden) + ReLU + Linear(hidden, out)."""
    if hidden < 1:
        raise ConfigError(f"tower_hidden must be >= 1, got {hidden}")
    return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, out))


def _gate(d_in: int, n: int) -> nn.Sequential:
    """``softmax(W x)``'s logits: Flatten + a bias-free linear map (Eq. 7 has no bias)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(d_in, n, bias=False))


class MMoE(MTLModel):
    """Shared experts (``encoder``, a ``ModuleList``), one softmax gate and one tower per task (see the module
    docstring for the split into shared and task parts)."""

    def __init__(self, experts: Sequence[nn.Module], gates: dict[str, nn.Module], towers: dict[str, nn.Module]):
        super().__init__()
        if not experts:
            raise ConfigError("MMoE needs at least one expert")
        if set(gates) != set(towers):
            raise ConfigError(f"MMoE: gates {sorted(gates)} and towers {sorted(towers)} name different tasks")
        self.encoder = nn.ModuleList(experts)
        self.gates = nn.ModuleDict(gates)
        self.towers = nn.ModuleDict(towers)
        self._gate_input: Tensor | None = None

    def encode(self, x: Tensor) -> Tensor:
        """``z = [f_1(x), ..., f_n(x)]`` stacked on dim 1: ``(B, n, d)``; keeps ``x`` for the gates of :meth:`decode`."""
        self._gate_input = x
        return torch.stack([e(x) for e in cast(nn.ModuleList, self.encoder)], dim=1)

    def gate_weights(self, x: Tensor) -> dict[str, Tensor]:
        """``g^k(x) = softmax(W_{gk} x)`` per task (Eq. 7): ``(B, n)``, each row positive and summing to one."""
        return {name: torch.softmax(g(x), dim=-1) for name, g in self.gates.items()}

    def decode(self, z: Tensor) -> dict[str, Tensor]:
        """``h^k(Σ_i g^k(x)_i z_i)`` per task (Eq. 6), with ``x`` the input of the latest :meth:`encode`."""
        x = self._gate_input
        if x is None or x.shape[0] != z.shape[0]:
            raise RuntimeError("MMoE.decode(z) needs the gate input of the encode(x) that made z: call encode first")
        weights = self.gate_weights(x)
        return {name: t(torch.einsum("bn,bnd->bd", weights[name], z)) for name, t in self.towers.items()}

    def last_shared_layer(self) -> list[nn.Parameter]:
        # every expert's last weight: the experts are parallel, none of them alone is "the last shared layer"
        out = []
        for e in cast(nn.ModuleList, self.encoder):
            weights = [p for p in e.parameters() if p.requires_grad and p.dim() >= 2]
            out += weights[-1:]
        return out


@register_model("mmoe")
def build_mmoe(
    data: Any,
    num_experts: int = 8,
    expert: str = "auto",
    expert_hidden: Sequence[int] = (64,),
    channels: int = 64,
    width: int = 384,
    tower_hidden: int = 32,
) -> MMoE:
    """MMoE for ``data``'s tasks: ``num_experts`` experts (MLP on tabular inputs, conv trunk on images, or as
    ``expert`` says), a softmax gate on the flattened input and a tower per task."""
    if num_experts < 1:
        raise ConfigError(f"mmoe: num_experts must be >= 1, got {num_experts}")
    kind = input_kind(data.input_shape, expert)
    nets, d = experts(num_experts, data.input_shape, kind, expert_hidden, channels, width)
    d_in = int(torch.tensor(tuple(data.input_shape)).prod())
    gates: dict[str, nn.Module] = {t.name: _gate(d_in, num_experts) for t in data.tasks}
    towers: dict[str, nn.Module] = {t.name: tower(d, tower_hidden, t.num_outputs) for t in data.tasks}
    return MMoE(nets, gates, towers)
