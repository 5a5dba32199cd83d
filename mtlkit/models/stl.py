"""Single-task learning (STL): one independent model per task, the reference of Δm.

:class:`SingleTaskModels` holds one member model per task and implements the loop's hooks for it (each member is
selected on validation on its own task, auxiliary losses are summed over the members), so the training loop
trains STL like any other model. :func:`build_for` builds the model a method asks for: one model per task for a
method that declares ``single_task`` (``--method stl``), else the configured model itself.

Example:
    >>> import torch
    >>> from mtlkit.models.hps import HPS, MLPEncoder, head
    >>> members = {t: HPS(MLPEncoder((3,), (4,)), {t: head(4, 2, 3)}) for t in ("a", "b")}
    >>> m = SingleTaskModels(members)
    >>> sorted(m(torch.zeros(2, 3))), sorted(m.selection_groups()), m.last_shared_layer()
    (['a', 'b'], ['a', 'b'], [])
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any, cast

from torch import Tensor, nn

from mtlkit.models.base import MTLModel, build_model, check_auxiliary_loss, register_model
from mtlkit.models.hps import HPS, _encoder, _out, head


class SingleTaskModels(MTLModel):
    """STL: one independent model per task (no shared parameters). ``members[task]`` is that task's model.

    ``encode`` is not defined for this model: with no shared representation, the training loop back-propagates the
    summed loss, which gives each member exactly its own task's gradient.
    """

    def __init__(self, members: dict[str, MTLModel]):
        super().__init__()
        self.members = nn.ModuleDict(members)
        self.encoder = nn.ModuleList([m.encoder for m in members.values()])

    def encode(self, x: Tensor) -> Tensor:
        raise TypeError("SingleTaskModels has no shared representation; call the model directly")

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {name: m(x)[name] for name, m in self.members.items()}

    def last_shared_layer(self) -> list[nn.Parameter]:
        return []  # nothing is shared

    def selection_groups(self) -> dict[str, nn.Module]:
        return dict(self.members.items())

    def auxiliary_loss(self) -> Tensor | None:
        # the members are MTLModels (see __init__); ModuleDict hands them back as Modules
        parts = [a for a in (check_auxiliary_loss(cast(MTLModel, m)) for m in self.members.values()) if a is not None]
        return sum(parts[1:], parts[0]) if parts else None


def _restrict(data: Any, task_name: str) -> Any:
    view = copy.copy(data)
    view.tasks = [t for t in data.tasks if t.name == task_name]
    return view


def build_for(model: str, data: Any, options: dict[str, Any], single_task: bool = False) -> MTLModel:
    """Model ``model`` (with ``options``) for ``data``; with ``single_task``, one such model per task."""
    if single_task:
        return SingleTaskModels({t.name: build_model(model, _restrict(data, t.name), **options) for t in data.tasks})
    return build_model(model, data, **options)


@register_model("stl")
def build_stl(
    data, encoder: str = "conv", width: int = 384, hidden: Sequence[int] = (1024, 1024, 1024), head_hidden: int = 192
) -> SingleTaskModels:
    """One HPS model with a single head per task, each with its own encoder of the same architecture."""
    members: dict[str, MTLModel] = {}
    for t in data.tasks:
        enc = _encoder(encoder, data.input_shape, width, hidden)
        members[t.name] = HPS(enc, {t.name: head(_out(enc), t.num_outputs, head_hidden)})
    return SingleTaskModels(members)
