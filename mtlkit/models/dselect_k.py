"""DSelect-k: MMoE's shared experts under a sparse, differentiable gate (Hazimeh, Zhao, Chowdhery, Sathiamoorthy,
Chen, Mazumder, Hong, Chi, "DSelect-k: Differentiable Selection in the Mixture of Experts with Applications to
Multi-Task Learning", NeurIPS 2021, arXiv:2106.03760, doi:10.48550/arXiv.2106.03760; authors' code:
google-research/google-research, ``dselect_k_moe``).

``n`` experts ``f_1..f_n`` are shared by all tasks, and task t mixes them as in MMoE, ``y_t = h_t(Σ_e q_t(x)_e
f_e(x))``, but with a gate ``q_t`` that selects at most ``k`` experts once trained:

* smooth-step ``S(t) = 0`` for ``t <= -γ/2``, ``1`` for ``t >= γ/2``, ``(-2/γ³) t³ + (3/(2γ)) t + 1/2`` between
  (:func:`smooth_step`; continuously differentiable, with exact zeros and ones outside ``[-γ/2, γ/2]``);
* a single-expert selector with a code ``z ∈ R^m``, ``m = ceil(log2 n)``, puts on position ``i = 0..2^m-1`` the mass
  ``r(z)_i = Π_j [S(z_j) if bit j of i is 1 else 1 - S(z_j)]`` (bit 1 the most significant, as in the authors'
  code): a distribution, one-hot once every ``|z_j| >= γ/2`` (:func:`selector`);
* ``k`` selectors with codes ``z^(1..k)`` and logits ``α ∈ R^k``: ``q = Σ_i softmax(α)_i r(z^(i))``, which sums to
  one and has at most ``k`` non-zeros once the codes are saturated (:class:`DSelectKGate`);
* ``gate="static"``: ``Z`` and ``α`` are parameters of the task (the paper's task-only gate, the same for every
  input); ``gate="per_example"`` (**default**, as MMoE's gate reads the input): ``Z = W_z x + b_z`` and
  ``α = W_α x + b_α``, affine in the flattened input (the authors' code: dense layers with biases);
* entropy regularisation, ``λ Σ_t Σ_i H(r(z_t^(i)))`` (option ``entropy_weight`` = λ), pushes every selector
  towards a binary code; it is added to the training loss through the generic auxiliary-loss hook
  (:meth:`DSelectK.auxiliary_loss`, as MTVIB's β·KL): back-propagated with the task losses, outside any task
  weighting or gradient aggregation. It reaches the gates only, which are task-owned.

**Choices** (where the paper leaves room, and why):

* ``n`` **not a power of two**: ``2^m - n`` positions have no expert. The authors' code drops them (the gate weights
  then sum to less than one) and adds a barrier loss ``1/Σ(reachable mass)``; renormalising over the reachable
  positions instead divides by a mass that is exactly 0 at some saturated codes. We **fold** them: position
  ``i >= n`` is expert ``i - n``. Every code then selects an expert, ``r`` sums to one exactly with no division and
  no extra loss, and a saturated code is still one-hot; the price is that experts ``0..2^m-n-1`` own two positions,
  so they start with twice the mass of the others (at ``z = 0`` every position has mass ``2^-m``).
* Initialisation as the authors' code: codes (or their weights and biases) uniform in ``[-γ/100, γ/100]``, inside
  the smooth region so that every expert gets a gradient at first; logits (or their weights and biases) uniform in
  ``[-0.05, 0.05]``.
* Entropy: of each selector's distribution over the experts (after folding), averaged over the batch (the authors
  sum over it) and summed over the ``k`` selectors and the tasks, so λ does not depend on the batch size; default
  ``λ = 1e-6``, the default of the authors' ``EntropyRegularizer`` (the paper tunes it per dataset).
  ``entropy_weight=0`` turns it off.
* ``k = 2`` by default (the authors' example selects 2 of 4 experts); ``k > n`` is allowed (it bounds the
  non-zeros, ``min(k, n)`` in effect).

Shared representation, experts and towers: as :mod:`mtlkit.models.mmoe` (``encode(x)`` stacks the expert outputs,
``(B, n, d)``; gates and towers are the task part and read the ``x`` kept by ``encode``), so parameter- and
representation-level methods apply.

Example:
    >>> import torch
    >>> from types import SimpleNamespace
    >>> from mtlkit.tasks import Task
    >>> data = SimpleNamespace(input_shape=(10,), tasks=[Task("a", "binary"), Task("b", "multiclass", 3)])
    >>> m = build_dselect_k(data, num_experts=5, k=2, expert_hidden=(8,), tower_hidden=4)
    >>> {name: tuple(v.shape) for name, v in m(torch.randn(6, 10)).items()}
    {'a': (6, 1), 'b': (6, 3)}
    >>> [round(float(w.detach().sum(1).max()), 5) for w in m.gate_weights(torch.randn(6, 10)).values()]
    [1.0, 1.0]
    >>> bool(m.auxiliary_loss() > 0)  # λ·entropy of that (training) forward pass
    True
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any, Literal, cast

import torch
from torch import Tensor, nn

from mtlkit.errors import ConfigError
from mtlkit.models.base import register_model
from mtlkit.models.mmoe import MMoE, experts, input_kind, tower

__all__ = ["GATES", "DSelectK", "DSelectKGate", "build_dselect_k", "selector", "selector_entropy", "smooth_step"]

Gate = Literal["static", "per_example"]
GATES: tuple[str, ...] = ("per_example", "static")


def smooth_step(t: Tensor, gamma: float = 1.0) -> Tensor:
    """``S(t)``: 0 for ``t <= -γ/2``, 1 for ``t >= γ/2``, ``(-2/γ³) t³ + (3/(2γ)) t + 1/2`` between (C¹ at ±γ/2).

    Example:
        >>> smooth_step(torch.tensor([-1.0, -0.25, 0.0, 0.25, 1.0]))
        tensor([0.0000, 0.1562, 0.5000, 0.8438, 1.0000])
    """
    if gamma <= 0:
        raise ConfigError(f"gamma must be > 0, got {gamma}")
    cubic = (-2.0 / gamma**3) * t**3 + (1.5 / gamma) * t + 0.5
    # torch.where, not the cubic of a clamped t: exact zeros and ones outside the band (the cubic at ±γ/2 rounds)
    return torch.where(t <= -gamma / 2, torch.zeros_like(t), torch.where(t >= gamma / 2, torch.ones_like(t), cubic))


def _bits(num_experts: int) -> int:
    return max(1, math.ceil(math.log2(num_experts)))


def selector(s: Tensor, num_experts: int) -> Tensor:
    """Single-expert selectors: ``S(z)`` of shape ``(..., m)`` to ``r(z)`` over the ``n`` experts, ``(..., n)``.

    ``r_i = Π_j [s_j if bit j of i is 1 else 1 - s_j]`` for ``i < 2^m`` (bit 1 the most significant); when ``n`` is
    not a power of two, position ``i >= n`` is folded onto expert ``i - n`` (see the module docstring).

    Example:
        >>> selector(torch.tensor([0.0, 1.0]), 4)  # code 01: expert 1
        tensor([0., 1., 0., 0.])
        >>> selector(torch.tensor([1.0, 1.0]), 3)  # code 11 = position 3, folded onto expert 0
        tensor([1., 0., 0.])
        >>> selector(torch.tensor([0.5, 0.5]), 3)  # experts 0 (positions 0 and 3), 1, 2
        tensor([0.5000, 0.2500, 0.2500])
    """
    m = _bits(num_experts)
    if s.shape[-1] != m:
        raise ValueError(f"{num_experts} experts need codes of {m} bits, got codes of {s.shape[-1]}")
    shifts = torch.arange(m - 1, -1, -1, device=s.device)
    bits = (torch.arange(2**m, device=s.device)[:, None] >> shifts) & 1  # (2^m, m), row i = binary code of i
    s = s.unsqueeze(-2)  # (..., 1, m) against (2^m, m)
    r = torch.where(bits.bool(), s, 1 - s).prod(-1)  # (..., 2^m)
    extra = 2**m - num_experts
    if extra == 0:
        return r
    return torch.cat([r[..., :extra] + r[..., num_experts:], r[..., extra:num_experts]], dim=-1)


def selector_entropy(r: Tensor) -> Tensor:
    """``H(r) = -Σ_e r_e log r_e`` over the last dim (``0 log 0 = 0``), with a gradient that stays finite at 0.

    Example:
        >>> selector_entropy(torch.tensor([[1.0, 0.0], [0.5, 0.5]]))
        tensor([0.0000, 0.6931])
    """
    # the clamp keeps log finite at r = 0 (a saturated selector), where d(r log r)/dr would be -inf
    return (r * -torch.log(r.clamp_min(torch.finfo(r.dtype).tiny))).sum(-1)


def _total_entropy(selectors: Iterable[Tensor]) -> Tensor:
    """``Σ_t Σ_i H(r_t^(i))`` averaged over the batch, from each task's ``(B, k, n)`` selectors."""
    return torch.stack([selector_entropy(r).sum(-1).mean() for r in selectors]).sum()


class DSelectKGate(nn.Module):
    """One task's DSelect-k gate over ``num_experts`` experts with ``k`` selectors: static (``in_features=None``)
    or per example (codes and logits affine in the flattened input of ``in_features`` values).

    ``forward(x)`` returns ``(q, r)``: the gate weights ``q`` ``(B, n)`` and the selectors ``r`` ``(B, k, n)``.

    Example:
        >>> g = DSelectKGate(6, k=3)  # static: the same weights for every input
        >>> q, r = g(torch.randn(4, 2)); tuple(q.shape), tuple(r.shape), bool(torch.equal(q[0], q[3]))
        ((4, 6), (4, 3, 6), True)
    """

    def __init__(self, num_experts: int, k: int = 2, gamma: float = 1.0, in_features: int | None = None):
        super().__init__()
        if num_experts < 2:
            raise ConfigError(f"dselect_k: num_experts must be >= 2 (a gate selects among experts), got {num_experts}")
        if k < 1:
            raise ConfigError(f"dselect_k: k (the number of selectors) must be >= 1, got {k}")
        if gamma <= 0:
            raise ConfigError(f"dselect_k: gamma must be > 0, got {gamma}")
        self.num_experts, self.k, self.gamma = int(num_experts), int(k), float(gamma)
        self.num_bits = _bits(self.num_experts)
        z_bound, alpha_bound = self.gamma / 100, 0.05
        self.codes: nn.Module | None = None
        self.logits: nn.Module | None = None
        if in_features is None:
            self.z = nn.Parameter(torch.empty(self.k, self.num_bits).uniform_(-z_bound, z_bound))
            self.alpha = nn.Parameter(torch.empty(self.k).uniform_(-alpha_bound, alpha_bound))
        else:
            codes, logits = nn.Linear(in_features, self.k * self.num_bits), nn.Linear(in_features, self.k)
            for layer, bound in ((codes, z_bound), (logits, alpha_bound)):
                nn.init.uniform_(layer.weight, -bound, bound)
                nn.init.uniform_(layer.bias, -bound, bound)
            self.codes, self.logits = nn.Sequential(nn.Flatten(), codes), nn.Sequential(nn.Flatten(), logits)

    @property
    def static(self) -> bool:
        """Whether the gate ignores its input (the paper's task-only gate)."""
        return self.codes is None

    def codes_and_logits(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(Z, α)`` for the batch ``x``: ``(B, k, m)`` and ``(B, k)``."""
        if self.codes is None or self.logits is None:
            b = x.shape[0]
            return self.z.expand(b, -1, -1), self.alpha.expand(b, -1)
        return self.codes(x).reshape(-1, self.k, self.num_bits), self.logits(x)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        z, alpha = self.codes_and_logits(x)
        r = selector(smooth_step(z, self.gamma), self.num_experts)  # (B, k, n)
        q = torch.einsum("bk,bkn->bn", torch.softmax(alpha, dim=-1), r)
        return q, r


class DSelectK(MMoE):
    """MMoE's shared experts and towers with a :class:`DSelectKGate` per task (see the module docstring).

    ``entropy_weight`` λ: a training-mode forward pass with grad leaves ``λ Σ_t Σ_i H(r_t^(i))`` (batch mean) for
    :meth:`auxiliary_loss`.
    """

    def __init__(
        self,
        experts: Sequence[nn.Module],
        gates: dict[str, DSelectKGate],
        towers: dict[str, nn.Module],
        entropy_weight: float = 1e-6,
    ):
        if entropy_weight < 0:
            raise ConfigError(f"dselect_k: entropy_weight must be >= 0, got {entropy_weight}")
        super().__init__(experts, cast(dict[str, nn.Module], gates), towers)
        self.entropy_weight = float(entropy_weight)
        self._aux: Tensor | None = None

    def _gates(self, x: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
        return {name: cast(DSelectKGate, g)(x) for name, g in self.gates.items()}

    def gate_weights(self, x: Tensor) -> dict[str, Tensor]:
        """``q_t(x)`` per task: ``(B, n)``, each row non-negative and summing to one."""
        return {name: q for name, (q, _) in self._gates(x).items()}

    def selectors(self, x: Tensor) -> dict[str, Tensor]:
        """``r(z_t^(i))`` per task: ``(B, k, n)``, each selector a distribution over the experts."""
        return {name: r for name, (_, r) in self._gates(x).items()}

    def entropy(self, x: Tensor) -> Tensor:
        """``Σ_t Σ_i H(r(z_t^(i)))`` averaged over the batch ``x`` (what :meth:`auxiliary_loss` multiplies by λ)."""
        return _total_entropy(self.selectors(x).values())

    def decode(self, z: Tensor) -> dict[str, Tensor]:
        """``h_t(Σ_e q_t(x)_e z_e)`` per task, with ``x`` the input of the latest :meth:`encode`."""
        x = self._gate_input
        if x is None or x.shape[0] != z.shape[0]:
            raise RuntimeError(
                "DSelectK.decode(z) needs the gate input of the encode(x) that made z: call encode first"
            )
        gates = self._gates(x)
        # Only a training pass with grad leaves a loss for the hook (an evaluation's pass does not).
        if self.entropy_weight > 0 and self.training and torch.is_grad_enabled():
            self._aux = self.entropy_weight * _total_entropy(r for _, r in gates.values())
        else:
            self._aux = None
        return {name: t(torch.einsum("bn,bnd->bd", gates[name][0], z)) for name, t in self.towers.items()}

    def auxiliary_loss(self) -> Tensor | None:
        """``λ Σ_t Σ_i H(r(z_t^(i)))`` (batch mean) of the latest training-mode forward pass, or None; consumed."""
        aux, self._aux = self._aux, None
        return aux


@register_model("dselect_k")
def build_dselect_k(
    data: Any,
    num_experts: int = 8,
    k: int = 2,
    gamma: float = 1.0,
    gate: Gate = "per_example",
    entropy_weight: float = 1e-6,
    expert: str = "auto",
    expert_hidden: Sequence[int] = (64,),
    channels: int = 64,
    width: int = 384,
    tower_hidden: int = 32,
) -> DSelectK:
    """DSelect-k for ``data``'s tasks: ``num_experts`` shared experts (as MMoE's), per task a DSelect-k gate with
    ``k`` selectors (``gate``: ``per_example`` or ``static``; smooth-step width ``gamma``) and a tower;
    ``entropy_weight`` λ of the selectors' entropy regulariser."""
    if gate not in GATES:
        raise ConfigError(f"dselect_k: unknown gate {gate!r}; valid gates are: {', '.join(GATES)}")
    if num_experts < 2:
        raise ConfigError(f"dselect_k: num_experts must be >= 2 (a gate selects among experts), got {num_experts}")
    kind = input_kind(data.input_shape, expert)
    d_in = int(torch.tensor(tuple(data.input_shape)).prod())
    gates = {
        t.name: DSelectKGate(num_experts, k, gamma, None if gate == "static" else d_in) for t in data.tasks
    }  # checks k and gamma before any expert is built
    nets, d = experts(num_experts, data.input_shape, kind, expert_hidden, channels, width)
    towers: dict[str, nn.Module] = {t.name: tower(d, tower_hidden, t.num_outputs) for t in data.tasks}
    return DSelectK(nets, gates, towers, entropy_weight=entropy_weight)
