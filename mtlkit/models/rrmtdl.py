"""RRMTDL: adversarial-learning-guided task-relatedness refinement (private branches + gradient-reversal heads).

Fang, Cai, Cao, Li, Zhang, "Adversarial Learning Guided Task Relatedness Refinement for Multi-Task Deep Learning",
IEEE Transactions on Multimedia 25 (2023) 6946–6957, doi:10.1109/TMM.2022.3216460. Only the abstract is public and it
has no numbered equations; the architecture below follows the authors' released code (there named SCMTL):

- a shared trunk ``T`` (any encoder: conv for images, MLP for tabular data);
- per group ``g`` (a set of *target* tasks and a set of *misleading* tasks) a private branch ``h_g = B_g(T(x))``;
- target path: ``z_g = Linear(h_g)`` (no activation), one head per target task on ``z_g``;
- adversarial path: ``r_g = Linear(R_λ(h_g))`` with ``R_λ`` the gradient-reversal layer (identity forward, ``−λ``
  backward, :mod:`mtlkit.nn.gradient_reversal`), one head per misleading task on ``r_g``, trained on that task's labels.
  The heads learn to predict the misleading task from ``h_g``; the reversed gradient drives the branch (and the
  trunk) to remove that information from ``h_g``;
- ``λ`` follows the DANN schedule ``λ(p) = 2/(1+exp(−10 p)) − 1`` in the training progress ``p`` (the trainer calls
  :meth:`RRMTDL.on_train_progress` before every step; Ganin & Lempitsky, "Unsupervised Domain Adaptation by
  Backpropagation", ICML 2015, PMLR 37, 1180–1189; no DOI, preprint doi:10.48550/arXiv.1409.7495):
  ``lambda_schedule="dann"``, the default;
- loss = unit-weight sum of every target and adversarial loss: the adversarial heads are declared as
  :attr:`~mtlkit.tasks.Task.auxiliary` tasks (:meth:`RRMTDL.auxiliary_tasks`), trained but never selected on nor
  reported;
- inference uses the target heads only: in eval mode the adversarial path is not computed.

Controls that isolate the adversary (``lambda_schedule``, an ordinary model option, so
``--set model.options.lambda_schedule=zero`` works from the CLI):

- ``"zero"``: ``λ = 0`` at every step. The adversarial heads and projections are still built and trained on their
  misleading-task loss, but the reversal layer passes an exactly zero gradient into the branch and the trunk: the
  same network, parameters, data order and losses as RRMTDL, minus the reversed gradient. ``RRMTDL − RRMTDL(λ=0)``
  is what the adversary itself contributes.
- ``"constant"``: ``λ = grl_scale`` (1 by default) at every step, from the first. Reported to be what the released
  code effectively ran: an operator-precedence slip in its schedule makes the expression evaluate to ≈ 1 throughout
  (we could not inspect that code here; the control is worth running either way).

Choices where the released code leaves it open (ours):

- the private branch is ``Linear(d, branch_width) + BatchNorm1d + ReLU`` on the trunk's feature (the paper copies
  ResNet-50's ``layer4``; our trunks are small, so the branch is one block whatever the encoder). The projection
  width is ``proj_width`` (1024 in the paper's code; 128 by default here, to match our small trunks).
- default groups (when ``groups`` is not given): one group per task, targeting it, with every other task misleading.
  For an entangled pair (A, B) this is exactly the paper's ``{target: [A], misleading: [B]}``,
  ``{target: [B], misleading: [A]}``.
- ``grl_scale`` multiplies the schedule (DANN uses 1), or is the constant λ; ``shared_parameters()`` are the trunk's,
  so gradient-space aggregators combine the task gradients on the trunk only.

Example:
    >>> import torch
    >>> from mtlkit.models.hps import MLPEncoder
    >>> from mtlkit.tasks import Task
    >>> tasks = [Task("a", "binary"), Task("b", "binary")]
    >>> m = RRMTDL(MLPEncoder((5,), (8,)), tasks, groups=None, branch_width=6, proj_width=4)
    >>> sorted(m(torch.zeros(3, 5)))  # training mode: target and adversarial outputs
    ['a', 'adv[a]b', 'adv[b]a', 'b']
    >>> [t.target for t in m.auxiliary_tasks()]
    ['b', 'a']
    >>> m.on_train_progress(1.0); round(m.grl_lambda, 4)
    0.9999
    >>> sorted(m.eval()(torch.zeros(3, 5)))  # inference: target heads only
    ['a', 'b']
    >>> z = RRMTDL(MLPEncoder((5,), (8,)), tasks, lambda_schedule="zero", branch_width=6, proj_width=4)
    >>> z.on_train_progress(1.0); z.grl_lambda
    0.0
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from torch import Tensor, nn

from mtlkit.errors import ConfigError
from mtlkit.models.base import MTLModel, register_model
from mtlkit.nn.gradient_reversal import GradientReversal, dann_lambda
from mtlkit.tasks import Task

__all__ = ["RRMTDL", "SCHEDULES", "Group", "adversarial_name", "build_rrmtdl"]

Schedule = Literal["dann", "constant", "zero"]

#: the values of the ``lambda_schedule`` option
SCHEDULES: tuple[str, ...] = ("dann", "constant", "zero")


def adversarial_name(target_group: str, misleading: str) -> str:
    """Name of the adversarial head of group ``target_group`` for misleading task ``misleading``."""
    return f"adv[{target_group}]{misleading}"


@dataclasses.dataclass(frozen=True)
class Group:
    """One group: its target tasks (predicted from the private feature) and misleading tasks (adversarial)."""

    target: tuple[str, ...]
    misleading: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return "+".join(self.target)


def _parse_groups(groups: Sequence[Mapping[str, Any]] | None, tasks: Sequence[Task]) -> list[Group]:
    names = [t.name for t in tasks]
    if groups is None:
        return [Group((n,), tuple(m for m in names if m != n)) for n in names]
    if isinstance(groups, (str, bytes)) or not isinstance(groups, Sequence) or not groups:
        raise ConfigError("RRMTDL groups must be a non-empty list of {target: [...], misleading: [...]} mappings")
    out: list[Group] = []
    for i, g in enumerate(groups):
        if not isinstance(g, Mapping):
            raise ConfigError(f"RRMTDL group {i} must be a mapping with keys target and misleading, got {g!r}")
        bad = sorted(set(g) - {"target", "misleading"})
        if bad:
            raise ConfigError(f"RRMTDL group {i}: unknown key(s) {bad}; valid keys are: target, misleading")
        tgt, mis = g.get("target"), g.get("misleading", [])
        if isinstance(tgt, str):
            tgt = [tgt]
        if isinstance(mis, str):
            mis = [mis]
        if not tgt:
            raise ConfigError(f"RRMTDL group {i} has no target task")
        for n in list(tgt) + list(mis):
            if n not in names:
                raise ConfigError(f"RRMTDL group {i}: unknown task {n!r}; the dataset's tasks are: {', '.join(names)}")
        clash = set(tgt) & set(mis)
        if clash:
            raise ConfigError(f"RRMTDL group {i}: task(s) {sorted(clash)} are both target and misleading")
        out.append(Group(tuple(tgt), tuple(mis)))
    targets = [n for g in out for n in g.target]
    dup = sorted({n for n in targets if targets.count(n) > 1})
    if dup:
        raise ConfigError(f"RRMTDL: task(s) {dup} are the target of more than one group")
    missing = [n for n in names if n not in targets]
    if missing:
        raise ConfigError(f"RRMTDL: task(s) {missing} are the target of no group; every task needs one group")
    return out


class RRMTDL(MTLModel):
    """Shared trunk, one private branch per group, target heads and gradient-reversed adversarial heads.

    Args:
        encoder: the shared trunk; must expose ``out_features``.
        tasks: the dataset's (target) tasks.
        groups: ``[{"target": [...], "misleading": [...]}, ...]``; ``None``: one group per task, every other task
            misleading (see the module docstring).
        branch_width: width of each private branch.
        proj_width: width of the target and adversarial projections (``z_g``, ``r_g``).
        lambda_schedule: ``"dann"`` (λ follows the DANN schedule in the training progress; the paper's), ``"constant"``
            (λ = ``grl_scale`` throughout) or ``"zero"`` (λ = 0 throughout: adversarial heads trained, no reversed
            gradient into the branch; see the module docstring).
        grl_scale: the constant λ, or the factor multiplying the DANN schedule (no effect with ``"zero"``: must
            stay 1).
        grl_gamma: the DANN schedule's steepness (10 in DANN; only with ``"dann"``: must stay 10 otherwise).
    """

    def __init__(
        self,
        encoder: nn.Module,
        tasks: Sequence[Task],
        groups: Sequence[Mapping[str, Any]] | None = None,
        branch_width: int = 256,
        proj_width: int = 128,
        lambda_schedule: Schedule = "dann",
        grl_scale: float = 1.0,
        grl_gamma: float = 10.0,
    ):
        super().__init__()
        if lambda_schedule not in SCHEDULES:
            raise ConfigError(
                f"RRMTDL lambda_schedule must be one of {', '.join(map(repr, SCHEDULES))}, got {lambda_schedule!r}"
            )
        if not (math.isfinite(grl_scale) and grl_scale >= 0) or not (math.isfinite(grl_gamma) and grl_gamma > 0):
            raise ConfigError(f"RRMTDL needs grl_scale >= 0 and grl_gamma > 0, got {grl_scale}, {grl_gamma}")
        if lambda_schedule == "zero" and grl_scale != 1.0:
            raise ConfigError(
                f"RRMTDL grl_scale={grl_scale} has no effect with lambda_schedule='zero' (λ = 0 "
                f"throughout); leave it at 1, or use lambda_schedule='constant' for another constant λ"
            )
        if lambda_schedule != "dann" and grl_gamma != 10.0:
            raise ConfigError(
                f"RRMTDL grl_gamma={grl_gamma} only shapes the 'dann' schedule; it has no effect with "
                f"lambda_schedule={lambda_schedule!r}"
            )
        if branch_width < 1 or proj_width < 1:
            raise ConfigError(f"RRMTDL widths must be >= 1, got branch_width={branch_width}, proj_width={proj_width}")
        d = getattr(encoder, "out_features", None)
        if not isinstance(d, int):
            raise ConfigError("RRMTDL's encoder must expose an integer out_features (its output width)")
        self.encoder = encoder
        self.tasks = list(tasks)
        by_name = {t.name: t for t in self.tasks}
        self.groups = _parse_groups(groups, self.tasks)
        self.schedule, self.grl_scale, self.grl_gamma = lambda_schedule, float(grl_scale), float(grl_gamma)
        self.progress = 0.0
        self.grl = GradientReversal(self._lambda(0.0))
        self.branches = nn.ModuleList()
        self.target_proj = nn.ModuleList()
        self.adv_proj = nn.ModuleList()
        self.heads = nn.ModuleDict()
        self.adv_heads = nn.ModuleDict()
        self._aux: list[Task] = []
        for g in self.groups:
            self.branches.append(nn.Sequential(nn.Linear(d, branch_width), nn.BatchNorm1d(branch_width), nn.ReLU()))
            self.target_proj.append(nn.Linear(branch_width, proj_width))
            for n in g.target:
                self.heads[n] = nn.Linear(proj_width, by_name[n].num_outputs)
            self.adv_proj.append(nn.Linear(branch_width, proj_width) if g.misleading else nn.Identity())
            for m in g.misleading:
                name = adversarial_name(g.name, m)
                if name in by_name:
                    raise ConfigError(f"RRMTDL: adversarial head name {name!r} clashes with a dataset task")
                self.adv_heads[name] = nn.Linear(proj_width, by_name[m].num_outputs)
                self._aux.append(
                    dataclasses.replace(
                        by_name[m],
                        name=name,
                        target=by_name[m].target_key,
                        auxiliary=True,
                        extra=dict(by_name[m].extra),
                    )
                )

    # -- the schedule -----------------------------------------------------------------------------------------
    def _lambda(self, p: float) -> float:
        if self.schedule == "zero":
            return 0.0
        if self.schedule == "constant":
            return self.grl_scale
        return dann_lambda(p, self.grl_gamma, self.grl_scale)

    @property
    def grl_lambda(self) -> float:
        """The current gradient-reversal coefficient λ."""
        return self.grl.lam

    def on_train_progress(self, progress: float) -> None:
        """Trainer hook (called before each step): set the training progress ``p`` in [0, 1] and λ(p)."""
        p = float(progress)
        if not 0.0 <= p <= 1.0:
            raise ConfigError(f"training progress must be in [0, 1], got {progress}")
        self.progress = p
        self.grl.lam = self._lambda(p)

    def auxiliary_tasks(self) -> list[Task]:
        """The adversarial heads as auxiliary tasks (trained on the misleading task's labels, never reported)."""
        return list(self._aux)

    # -- forward ----------------------------------------------------------------------------------------------
    def decode(self, z: Tensor) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for g, branch, tproj, aproj in zip(self.groups, self.branches, self.target_proj, self.adv_proj, strict=True):
            h = branch(z)
            zg = tproj(h)
            for n in g.target:
                out[n] = self.heads[n](zg)
            if self.training and g.misleading:
                r = aproj(self.grl(h))
                for m in g.misleading:
                    name = adversarial_name(g.name, m)
                    out[name] = self.adv_heads[name](r)
        return out


@register_model("rrmtdl")
def build_rrmtdl(
    data,
    encoder: str = "conv",
    width: int = 384,
    hidden: Sequence[int] = (1024, 1024, 1024),
    groups: Sequence[Mapping[str, Any]] | None = None,
    branch_width: int = 256,
    proj_width: int = 128,
    lambda_schedule: str = "dann",
    grl_scale: float = 1.0,
    grl_gamma: float = 10.0,
    channels: int = 64,
) -> RRMTDL:
    """RRMTDL for ``data``'s tasks with a ``conv`` (MTVIB Table I(b): the trunk of ``hps``; its flattened width is
    computed from ``data.input_shape``, 3136 for 36x36 Multi-(Fashion+MNIST) images) or ``mlp`` trunk.

    ``lambda_schedule``: ``"dann"`` (default, the paper's), ``"constant"`` or ``"zero"`` (see :class:`RRMTDL`).

    Example:
        >>> import torch
        >>> from mtlkit.data import MTLData, Split
        >>> from mtlkit.tasks import Task
        >>> s = Split(torch.zeros(4, 6), {"a": torch.zeros(4), "b": torch.ones(4)})
        >>> d = MTLData("toy", [Task("a", "binary"), Task("b", "binary")], s, s, s)
        >>> m = build_rrmtdl(d, encoder="mlp", hidden=(8,), groups=[{"target": ["a"], "misleading": ["b"]},
        ...                                                       {"target": ["b"]}])
        >>> [t.name for t in m.auxiliary_tasks()]
        ['adv[a]b']
    """
    from mtlkit.models.hps import ConvEncoder, MLPEncoder

    if encoder == "conv":
        enc: nn.Module = ConvEncoder(data.input_shape, channels=channels, width=width)
    elif encoder == "mlp":
        enc = MLPEncoder(data.input_shape, hidden)
    else:
        from mtlkit.errors import unknown_name

        raise unknown_name("encoder", encoder, ["conv", "mlp"])
    return RRMTDL(
        enc,
        data.tasks,
        groups,
        branch_width,
        proj_width,
        lambda_schedule,  # type: ignore[arg-type]
        grl_scale,
        grl_gamma,
    )
