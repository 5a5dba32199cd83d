"""CGC and PLE (Tang, Liu, Zhao, Gong, "Progressive Layered Extraction (PLE): A Novel Multi-Task Learning (MTL) Model
for Personalized Recommendations", RecSys 2020, doi:10.1145/3383313.3412236).

**CGC** (Customized Gate Control, Sec. 4.2): task k has ``m_k`` experts of its own, all tasks share ``m_s``
experts; task k's gate mixes its own and the shared experts only:

* ``g^k(x) = w^k(x) S^k(x)`` (Eq. 1), with ``S^k(x) = [E_{(k,1)}, ..., E_{(k,m_k)}, E_{(s,1)}, ..., E_{(s,m_s)}]``,
* ``w^k(x) = Softmax(W_g^k x)``, ``W_g^k ∈ R^{(m_k + m_s) x d}`` (Eq. 2),
* ``y^k(x) = t^k(g^k(x))`` (Eq. 3), ``t^k`` task k's tower.

**PLE** (Sec. 4.3) stacks ``num_levels`` extraction networks. At level j, task k's gate reads task k's output of
level j-1 and mixes task k's and the shared experts of level j (``g^{k,j}(x) = w^{k,j}(g^{k,j-1}(x)) S^{k,j}(x)``,
Eq. 4); below the last level a *shared* gate, reading the shared branch, mixes **all** experts of the level (every
task's and the shared ones) into the shared branch of level j+1; ``y^k = t^k(g^{k,N}(x))`` (Eq. 5). Level 1 reads
``x`` in every branch. ``num_levels=1`` is CGC.

**What is shared** (read off the equations, not the names): a parameter is shared when more than one task's loss
depends on it. In CGC those are the shared experts only; task k's experts reach task k's loss alone (its gate is the
only one that mixes them). In PLE with N >= 2 levels the shared gate of a level below N feeds every task's experts
into the shared branch, so the shared parameters are the shared experts and shared gates of every level, the task
experts of levels 1..N-1 and the task gates of levels 1..N-2; task-owned are the last level's task experts, the
task gates of the last two levels and the towers (:meth:`PLE.shared_parameters`; the tests check that each of these
reaches exactly one task).

**The shared representation.** CGC: ``encode(x)`` stacks the shared experts' outputs ``(B, m_s, d)``; the task
experts, gates and towers are the task part and read ``x`` kept by ``encode`` (as in :mod:`mtlkit.models.mmoe`), so
representation-level methods apply. PLE with N >= 2: the task gate of level N-1 is task-owned and sits below every
tensor that all shared paths go through, so PLE has no shared representation: parameter-level methods work (the
per-task gradients are taken through the whole graph), a representation-level one is refused by the training loop
with a ConfigError (:meth:`PLE.representation_is_shared_path` is False).

Experts and towers as in :mod:`mtlkit.models.mmoe` (MLP or conv trunk at level 1, MLPs of ``expert_hidden`` on the
previous level's outputs above it; gates: bias-free linear maps as Eq. 2).

Example:
    >>> import torch
    >>> from types import SimpleNamespace
    >>> from mtlkit.tasks import Task
    >>> data = SimpleNamespace(input_shape=(6,), tasks=[Task("a", "binary"), Task("b", "binary")])
    >>> cgc = build_cgc(data, task_experts=1, shared_experts=2, expert_hidden=(4,), tower_hidden=3)
    >>> tuple(cgc.encode(torch.randn(5, 6)).shape), cgc.representation_is_shared_path()
    ((5, 2, 4), True)
    >>> ple = build_ple(data, num_levels=2, expert_hidden=(4,), tower_hidden=3)
    >>> sorted(ple(torch.randn(5, 6))), ple.representation_is_shared_path()
    (['a', 'b'], False)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn

from mtlkit.errors import ConfigError
from mtlkit.models.base import MTLModel, register_model
from mtlkit.models.mmoe import _gate, expert_network, input_kind, tower

__all__ = ["PLE", "build_cgc", "build_ple"]


def _mix(weights: Tensor, experts: Sequence[Tensor]) -> Tensor:
    """``Σ_i w_i E_i``: ``(B, n)`` weights times ``n`` expert outputs ``(B, d)``."""
    return torch.einsum("bn,bnd->bd", weights, torch.stack(list(experts), dim=1))


class PLE(MTLModel):
    """PLE with ``len(task_experts)`` levels (CGC when there is one level); see the module docstring.

    Args:
        task_experts: per level, ``{task: [experts]}``.
        shared_experts: per level, the shared experts.
        task_gates: per level, ``{task: gate}`` (logits over the task's and the shared experts of the level).
        shared_gates: per level below the last, the shared gate (logits over all experts of the level).
        towers: ``{task: tower}``.
    """

    def __init__(
        self,
        task_experts: Sequence[Mapping[str, Sequence[nn.Module]]],
        shared_experts: Sequence[Sequence[nn.Module]],
        task_gates: Sequence[Mapping[str, nn.Module]],
        shared_gates: Sequence[nn.Module],
        towers: Mapping[str, nn.Module],
    ):
        super().__init__()
        n = len(task_experts)
        if n < 1 or len(shared_experts) != n or len(task_gates) != n or len(shared_gates) != n - 1:
            raise ConfigError(
                f"PLE needs, per level, task experts, shared experts and task gates, and a shared gate per level "
                f"but the last; got {len(task_experts)}, {len(shared_experts)}, {len(task_gates)} and "
                f"{len(shared_gates)}"
            )
        self.names = list(towers)
        self.task_experts = nn.ModuleList(
            nn.ModuleDict({t: nn.ModuleList(level[t]) for t in self.names}) for level in task_experts
        )
        self.shared_experts = nn.ModuleList(nn.ModuleList(level) for level in shared_experts)
        self.task_gates = nn.ModuleList(nn.ModuleDict({t: level[t] for t in self.names}) for level in task_gates)
        self.shared_gates = nn.ModuleList(shared_gates)
        self.towers = nn.ModuleDict(towers)
        # CGC's shared part (its encode); for PLE, a container of the shared parameters' modules (see below)
        self.encoder = self.shared_experts[0] if n == 1 else nn.ModuleList()
        self._input: Tensor | None = None

    @property
    def num_levels(self) -> int:
        return len(self.task_experts)

    def _shared_modules(self) -> list[nn.Module]:
        n = self.num_levels
        mods: list[nn.Module] = [*self.shared_experts, *self.shared_gates]
        mods += [self.task_experts[j] for j in range(n - 1)]
        mods += [self.task_gates[j] for j in range(n - 2)]
        return mods

    def shared_parameters(self) -> list[nn.Parameter]:
        """The parameters more than one task's loss depends on (module docstring); CGC: the shared experts."""
        seen: set[int] = set()
        out = []
        for m in self._shared_modules():
            for p in m.parameters():
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
        return out

    def last_shared_layer(self) -> list[nn.Parameter]:
        # the last level's shared experts, each one's last weight (they are parallel)
        out = []
        for e in self._shared_experts(self.num_levels - 1):
            weights = [p for p in e.parameters() if p.requires_grad and p.dim() >= 2]
            out += weights[-1:]
        return out

    def representation_is_shared_path(self) -> bool:
        return self.num_levels == 1

    # typed views of the nested module containers
    def _task_experts(self, j: int, t: str) -> list[nn.Module]:
        return list(cast(nn.ModuleList, cast(nn.ModuleDict, self.task_experts[j])[t]))

    def _shared_experts(self, j: int) -> list[nn.Module]:
        return list(cast(nn.ModuleList, self.shared_experts[j]))

    def _task_gate(self, j: int, t: str) -> nn.Module:
        return cast(nn.ModuleDict, self.task_gates[j])[t]

    def _levels(self, x: Tensor) -> tuple[dict[str, Tensor], list[dict[str, Tensor]]]:
        """``g^{k,N}(x)`` per task (Eqs. 1, 4) and, per level, each task gate's softmax weights."""
        branch = dict.fromkeys(self.names, x)
        shared_in = x
        weights: list[dict[str, Tensor]] = []
        for j in range(self.num_levels):
            own = {t: [e(branch[t]) for e in self._task_experts(j, t)] for t in self.names}
            shared = [e(shared_in) for e in self._shared_experts(j)]
            if j + 1 < self.num_levels:  # the shared gate mixes all experts of the level (Sec. 4.3)
                every = [o for t in self.names for o in own[t]] + shared
                shared_in = _mix(torch.softmax(self.shared_gates[j](shared_in), -1), every)
            w = {t: torch.softmax(self._task_gate(j, t)(branch[t]), -1) for t in self.names}
            weights.append(w)
            branch = {t: _mix(w[t], own[t] + shared) for t in self.names}
        return branch, weights

    def task_outputs(self, x: Tensor) -> dict[str, Tensor]:
        """``g^{k,N}(x)`` per task: the last level's gated mixture each tower reads (Eqs. 1, 4)."""
        return self._levels(x)[0]

    def gate_weights(self, x: Tensor) -> list[dict[str, Tensor]]:
        """Per level, each task gate's softmax weights over (its own experts, then the shared ones)."""
        return self._levels(x)[1]

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {t: self.towers[t](g) for t, g in self.task_outputs(x).items()}

    def encode(self, x: Tensor) -> Tensor:
        """CGC only: the shared experts' outputs ``(B, m_s, d)``; keeps ``x`` for the task part (:meth:`decode`)."""
        if self.num_levels != 1:
            raise TypeError(
                "PLE with more than one level has no shared representation (module docstring); call the model"
            )
        self._input = x
        return torch.stack([e(x) for e in self._shared_experts(0)], dim=1)

    def decode(self, z: Tensor) -> dict[str, Tensor]:
        """CGC only: task experts and gates on the ``x`` of the latest :meth:`encode`, mixed with ``z`` (Eq. 1)."""
        x = self._input
        if self.num_levels != 1 or x is None or x.shape[0] != z.shape[0]:
            raise RuntimeError("CGC.decode(z) needs the input of the encode(x) that made z: call encode first")
        out = {}
        for t in self.names:
            own = torch.stack([e(x) for e in self._task_experts(0, t)], dim=1)
            w = torch.softmax(self._task_gate(0, t)(x), -1)
            out[t] = self.towers[t](torch.einsum("bn,bnd->bd", w, torch.cat([own, z], dim=1)))
        return out


def _build(
    data: Any,
    num_levels: int,
    task_experts: int,
    shared_experts: int,
    expert: str,
    expert_hidden: Sequence[int],
    channels: int,
    width: int,
    tower_hidden: int,
) -> PLE:
    if num_levels < 1 or task_experts < 1 or shared_experts < 1:
        raise ConfigError(
            f"ple/cgc: num_levels, task_experts and shared_experts must be >= 1, got {num_levels}, "
            f"{task_experts}, {shared_experts}"
        )
    kind = input_kind(data.input_shape, expert)
    names = [t.name for t in data.tasks]
    shape: tuple[int, ...] = tuple(data.input_shape)
    d_in = int(torch.tensor(shape).prod())
    te: list[dict[str, list[nn.Module]]] = []
    se: list[list[nn.Module]] = []
    tg: list[dict[str, nn.Module]] = []
    sg: list[nn.Module] = []
    d = 0
    for j in range(num_levels):
        k = kind if j == 0 else "mlp"  # above level 1, experts read the previous level's d-vectors
        level_te: dict[str, list[nn.Module]] = {t: [] for t in names}
        level_se: list[nn.Module] = []
        for bucket in [*level_te.values(), level_se]:
            for _ in range(shared_experts if bucket is level_se else task_experts):
                net, d = expert_network(shape, k, expert_hidden, channels, width)
                bucket.append(net)
        te.append(level_te)
        se.append(level_se)
        tg.append({t: _gate(d_in, task_experts + shared_experts) for t in names})
        if j + 1 < num_levels:
            sg.append(_gate(d_in, len(names) * task_experts + shared_experts))
        shape, d_in = (d,), d
    towers: dict[str, nn.Module] = {t.name: tower(d, tower_hidden, t.num_outputs) for t in data.tasks}
    return PLE(te, se, tg, sg, towers)


@register_model("ple")
def build_ple(
    data: Any,
    num_levels: int = 2,
    task_experts: int = 2,
    shared_experts: int = 2,
    expert: str = "auto",
    expert_hidden: Sequence[int] = (64,),
    channels: int = 64,
    width: int = 384,
    tower_hidden: int = 32,
) -> PLE:
    """PLE for ``data``'s tasks: ``num_levels`` extraction networks of ``task_experts`` experts per task and
    ``shared_experts`` shared ones (Sec. 4.3); ``num_levels=1`` is CGC."""
    return _build(data, num_levels, task_experts, shared_experts, expert, expert_hidden, channels, width, tower_hidden)


@register_model("cgc")
def build_cgc(
    data: Any,
    task_experts: int = 2,
    shared_experts: int = 2,
    expert: str = "auto",
    expert_hidden: Sequence[int] = (64,),
    channels: int = 64,
    width: int = 384,
    tower_hidden: int = 32,
) -> PLE:
    """CGC for ``data``'s tasks: one extraction network (Sec. 4.2), a shared representation (the shared experts)."""
    return _build(data, 1, task_experts, shared_experts, expert, expert_hidden, channels, width, tower_hidden)
