"""MAMO's search space: an all-shared encoder, gradient-mediative-kernel (GMK) modules and adaptive fusion.

Tan, Hu & Zhang, "MAMO: Multi-Task Architecture Learning via Multi-Objective and Gradients Mediative Kernel",
27th European Conference on Artificial Intelligence (ECAI 2024, IOS Press, Frontiers in Artificial Intelligence and
Applications; its DOI could not be checked from here, so none is given), Sec. 3.1-3.2. What is implemented:

* the all-shared encoder ``{f_S^ℓ}``, ℓ = 1..L (Eq. 6), given as a list of layer blocks (any ``nn.Module`` s: FC,
  conv, residual blocks; nothing here depends on the dataset, so dense-prediction encoders/decoders plug in as well);
* GMK modules ``h_{i,j}^ℓ`` (Def. 3.2) for *unordered* task pairs ``{i, j}``, i < j (the upper triangle of the GMK
  matrix: the cosine matrix of Eq. 9 is symmetric, so ``h_{i,j}`` and ``h_{j,i}`` would be the same module). A GMK
  mirrors the layer it is generated at (a deep copy of ``f_S^ℓ``: FC where the layer is FC, conv where it is conv);
* Eq. 7, the GMK's two inputs: the shared output of the previous layer ``o_f^{ℓ-1}`` and, where the pair already has a
  stream, its previous output ``o_{i,j}^{ℓ-1}``;
* Eq. 8, a task-specific adaptive fusion: task m reads ``o_f^L`` and the layer-L streams of the GMKs in the m-th row and
  the m-th column of the GMK matrix, weighted by its own learned ``β``; then its decoder ``g_m``.

Choices where the paper is silent (each keeps the network's function unchanged when modules are born, so that a
newly grown MAMO continues from the model it grew from, and MAMO without GMKs *is* HPS):

1. **Initialisation**: a new GMK is a deep copy of the current shared layer ``f_S^ℓ`` (weights *and* BatchNorm
   statistics): "GMKs keep the shared knowledge" (Sec. 3.1).
2. **Combining Eq. 7's two inputs**: the mean ``½(o_f^{ℓ-1} + o_{i,j}^{ℓ-1})`` is fed to a module shaped like
   ``f_S^ℓ``. It is parameter-free, so a GMK has exactly as many parameters as the layer it mirrors, and at birth
   (when ``o_{i,j}^{ℓ-1} = o_f^{ℓ-1}``) it computes exactly ``f_S^ℓ(o_f^{ℓ-1})``.
3. **Layers without a GMK above a pair's first GMK**: Eq. 8 only fuses layer-L GMK outputs, so read literally a GMK at
   ℓ < L whose successor is inactive would feed nothing. We keep the pair's stream alive to layer L: where the pair
   has no GMK at layer ℓ, the shared layer ``f_S^ℓ`` plays the role of ``h`` in Eq. 7 (same parameters, the pair's
   mixed input). A pair is fused in Eq. 8 as soon as it has a GMK at any layer. (Side effect: the shared layer's
   BatchNorm running statistics also see the pair's stream.)
4. **Fusion weights** (Eq. 8): task m owns a vector ``β_m`` of m logits; ``β_m[j]`` weighs the stream of the group
   {m, j}. The fused input of ``g_m`` is ``softmax([0, β_m[j] for the active groups of m]) · [o_f^L, o_{m,j}^L, ...]``,
   i.e. a convex combination of the shared output (logit fixed at 0) and the task's row/column GMK streams; with no
   active GMK the decoder reads ``o_f^L`` itself. Eq. 8 writes ``g_m(o_f, row, col)`` without saying how the three
   inputs are joined; a convex combination keeps the decoder's input width (so the HPS decoders are reused) and the
   function at birth (a group's first module sets the fusion logits of its tasks so that no task's output changes,
   :meth:`MAMO._make_room_in_fusion`, also when a task already fuses trained streams). Keeping ``β`` per task (not
   one ``β_{i,j}`` shared by i and j) makes the fusion task-specific, as in Fig. 2b. ``β_m[m]`` (the diagonal,
   "dummy" in the paper) is used only by ``module="exclusive"``, where task m's exclusive module is the group {m}.

Three module kinds (``module=``):

* ``"gmk"`` — MAMO: one GMK per conflicting pair, fused as above.
* ``"conal"`` — **the w/o-GMK ablation and the CoNAL baseline, CoNAL-faithful** (Sec. 4.4.2 replaces GMKs "with
  task-exclusive modules as in CoNAL"). CoNAL: Yue, Zhang & Liang, "Learning Conflict-Noticed Architecture for
  Multi-Task Learning", Proceedings of the AAAI Conference on Artificial Intelligence 37(9), 11078-11086 (AAAI
  2023), doi 10.1609/aaai.v37i9.26312. In CoNAL's tree-structured search space (its released ``CoNALArch``) a task
  that branches at layer ℓ runs its *own copies* of layers ℓ..L on the shared output ``o_f^{ℓ-1}`` of the layer below
  the branch point, and its decoder reads only that branch: nothing of the shared path above the branch point, no
  fusion. What is chosen here:

  - a conflict of (i, j) at layer ℓ branches *both* i and j at ℓ (one task-exclusive module per task, as the
    ``"exclusive"`` kind and Fig. 1c: ``θ^i`` and ``θ^j``); task groups (CoNAL-Pro) are not modelled;
  - **one branch point per task**, as in CoNAL: the branch of task t starting at s holds modules at every layer
    s..L-1 (0-based); a later conflict of t at ℓ < s moves the branch point down to ℓ: the branch gains copies of
    the shared layers ℓ..s-1 and *keeps* its trained layers s..L-1; a conflict of t at ℓ ≥ s adds nothing (t already
    owns that layer; it cannot even be detected, as t's gradient on the shared layers ≥ s is zero);
  - **initialisation**: copies of the *current* shared layers (weights and BatchNorm statistics), so every output is
    unchanged at birth and Alg. 1 continues from the model it grew from. (CoNAL's released code initialises every
    branch from the same ImageNet-pretrained ResNet as the shared trunk; there is no pretrained trunk here, and the
    copy is the analogue that keeps the function.)
  - no fusion logits: ``β_m`` is empty (size 0), so the model's size is HPS's plus the branches'. (A shared layer that
    no task reads any more, once every task has branched below it, stays in the model and in its size.)

* ``"exclusive"`` — the earlier mtlkit reading, kept for comparison: task-exclusive modules (groups {i} and {j})
  that, like GMKs, read the mean of the shared and their own previous output (choice 2), keep their stream alive
  through the shared layers (choice 3) and are fused with ``o_f^L`` (choice 4). It changes only who owns the module,
  and keeps the shared knowledge that CoNAL's branches discard.

Parameter roles (so the engine/aggregators treat them right, KKT conditions of Eq. 14):

* :meth:`MAMO.all_shared_parameters` — the ``f_S`` layers, used by every task (Def. 3.1);
* :meth:`MAMO.group_parameters` — per group (pair for GMKs, one task for exclusive/CoNAL modules), used only by the
  tasks of the group (Def. 3.2);
* :meth:`MAMO.task_exclusive_parameters` — per task, everything only that task uses: its decoder, its fusion logits
  ``β_m`` and its own (exclusive/CoNAL) modules: the ``θ^t`` of condition 2 of Eq. 14 (``∇_{θ^t} L^t = 0``), which
  take their own task's full gradient, never an MGDA weight ``a^t`` of it;
* :meth:`MAMO.shared_parameters` — what a gradient-space method combines: all-shared *and* GMK parameters, the
  ``θ^{sh}, θ^{h_{i,j}}`` of condition 1 of Eq. 14 (MGDA over both jointly). A task's row of the per-task gradient
  matrix is zero on the GMKs of pairs it is not in, so any aggregator's update of ``h_{i,j}`` is a combination of
  tasks i's and j's gradients only. Task-exclusive modules are *not* in it: once one exists,
  :meth:`MAMO.representation_is_shared_path` says False and the training loop calls the engine without a
  ``representation`` (their parameters lie below :meth:`encode`'s output, where the engine's representation path would
  give them no gradient), so the engine finds them as task-specific parameters and gives each its own task's gradient
  (:meth:`has_task_modules` tells when).

:meth:`MAMO.encode` returns the layer-L streams stacked on dim 1, ``[B, 1 + #groups, ...]`` (index 0 = ``o_f^L``), so
MAMO is an ordinary :class:`~mtlkit.models.base.MTLModel`: the engine's ``representation=`` path works with it.

**The search** (Alg. 1) runs in the one training loop, :class:`mtlkit.train.Trainer`: a MAMO built by the registered
factory :func:`build_mamo` carries its :class:`SearchOptions` and brings, through the hook :meth:`MAMO.callbacks`, the
callback :class:`mtlkit.models.mamo_search.ArchitectureSearch`, which detects conflicts and grows the model at the phase ends
(``mtlkit train --model mamo --method mgda`` is MAMO; see :mod:`mtlkit.models.mamo_search` for the options and the choices). A MAMO
built without search options (``MAMO(layers, heads)``) brings no callback: a fixed architecture. A grown model's
state loads into a freshly built one (:meth:`MAMO.load_state_dict` first generates the modules the state holds), so
a finished run's ``best.pt`` loads where the model is rebuilt from the run's config (``mtlkit eval``, reuse).

Example:
    >>> import torch
    >>> from torch import nn
    >>> m = MAMO([nn.Linear(4, 8), nn.Sequential(nn.ReLU(), nn.Linear(8, 8))],
    ...          {"a": nn.Linear(8, 2), "b": nn.Linear(8, 3), "c": nn.Linear(8, 1)})
    >>> before = m.num_parameters()
    >>> m.grow(1, ("a", "b"))
    ['l1__a__b']
    >>> m.num_parameters() - before == sum(p.numel() for p in m.layers[1].parameters())
    True
    >>> {k: tuple(v.shape) for k, v in m(torch.randn(5, 4)).items()}
    {'a': (5, 2), 'b': (5, 3), 'c': (5, 1)}
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor, nn

from mtlkit.errors import ConfigError
from mtlkit.models.base import MTLModel, register_model

if TYPE_CHECKING:
    from mtlkit.callbacks import Callback

ModuleKind = Literal["gmk", "exclusive", "conal"]
MODULE_KINDS = ("conal", "exclusive", "gmk")
Group = tuple[int, ...]
THRESHOLDS = ("average", "topk")
SCOPES = ("all_layers", "per_layer")
CONFLICT_WINDOWS = ("last_batches", "phase")
SELECTIONS = ("best_val", "last")


@dataclass(frozen=True)
class SearchOptions:
    """The options of MAMO's search (Alg. 1), as :func:`build_mamo` takes them; :mod:`mtlkit.models.mamo_search` documents each
    and the choices behind them. Pre-training lasts ``train.epochs - rounds * epochs_per_round`` epochs
    (:meth:`pretrain_epochs`).

    Example:
        >>> SearchOptions(rounds=2).pretrain_epochs(5)
        3
        >>> SearchOptions(threshold="median")
        Traceback (most recent call last):
        ...
        mtlkit.errors.ConfigError: model mamo: unknown threshold 'median'; valid thresholds are: average, topk
    """

    rounds: int = 2
    epochs_per_round: int = 1
    threshold: str = "average"
    k: int = 1
    scope: str = "all_layers"
    conflict_window: str = "last_batches"
    detect_batches: int = 20
    pretrain_method: str | None = None
    selection: str = "best_val"
    restore_optimizer: bool = False

    def __post_init__(self) -> None:
        def whole(name: str, low: int) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ConfigError(f"model mamo: option {name} must be an integer >= {low}, got {v!r}")

        whole("rounds", 0)
        whole("k", 0)
        whole("detect_batches", 1)
        whole("epochs_per_round", 1)  # a round of 0 epochs would detect without training (not supported)
        for name, valid in (
            ("threshold", THRESHOLDS),
            ("scope", SCOPES),
            ("conflict_window", CONFLICT_WINDOWS),
            ("selection", SELECTIONS),
        ):
            if getattr(self, name) not in valid:
                raise ConfigError(
                    f"model mamo: unknown {name.replace('_', ' ')} {getattr(self, name)!r}; valid "
                    f"{name.replace('_', ' ')}s are: {', '.join(valid)}"
                )
        if not isinstance(self.restore_optimizer, bool):
            raise ConfigError(
                f"model mamo: option restore_optimizer must be true or false, got {self.restore_optimizer!r}"
            )
        if self.pretrain_method is not None:
            from mtlkit.methods import build_method

            if not isinstance(self.pretrain_method, str):
                raise ConfigError(
                    f"model mamo: option pretrain_method must be a method name or null, got {self.pretrain_method!r}"
                )
            if build_method(self.pretrain_method).single_task:
                raise ConfigError(
                    f"model mamo: pretrain_method {self.pretrain_method!r} trains one model per task; "
                    f"MAMO pre-trains one shared model"
                )

    def pretrain_epochs(self, epochs: int) -> int:
        """Alg. 1 line 1's epochs in a run of ``epochs`` epochs (may be < 1: the search refuses it)."""
        return epochs - self.rounds * self.epochs_per_round

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def split_layers(encoder: nn.Sequential) -> list[nn.Module]:
    """Cut a sequential encoder into layers ``f_S^ℓ``: a new layer starts at every Conv/Linear module.

    Parameter-free modules before the first Conv/Linear join the first layer; those after a Conv/Linear (BN, ReLU,
    pooling, Flatten) join it. For :class:`~mtlkit.models.hps.ConvEncoder` this gives the L = 3 layers
    [Conv-BN-ReLU-Pool], [Conv-BN-ReLU-Pool-Flatten], [FC-BN-ReLU].

    Example:
        >>> len(split_layers(nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))))
        2
    """
    if not isinstance(encoder, nn.Sequential):
        raise ConfigError(f"split_layers needs an nn.Sequential encoder, got {type(encoder).__name__}")
    blocks: list[list[nn.Module]] = []
    pending: list[nn.Module] = []
    for mod in encoder:
        if isinstance(mod, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            blocks.append(pending + [mod])
            pending = []
        elif blocks:
            blocks[-1].append(mod)
        else:
            pending.append(mod)
    if not blocks:
        raise ConfigError("split_layers: the encoder has no Conv/Linear layer to mirror with GMK modules")
    blocks[-1].extend(pending)
    return [nn.Sequential(*b) for b in blocks]


class MAMO(MTLModel):
    """MAMO's architecture (see the module docstring for the equations and the choices).

    Args:
        layers: the all-shared layers ``f_S^1..f_S^L`` (applied in order; each output feeds the next).
        heads: the task decoders ``g_m`` by task name (task order = dict order), reading ``o_f^L``-shaped inputs.
        module: ``"gmk"`` (pair modules, MAMO), ``"conal"`` (CoNAL-faithful task branches: the w/o-GMK ablation and
            the CoNAL baseline) or ``"exclusive"`` (task-exclusive modules fused like GMKs); see the module docstring.
        search: the options of Alg. 1; the model then brings the search callback (:meth:`callbacks`). None: a fixed
            architecture (no callback).
    """

    def __init__(
        self,
        layers: Sequence[nn.Module],
        heads: dict[str, nn.Module],
        module: ModuleKind = "gmk",
        search: SearchOptions | None = None,
    ):
        super().__init__()
        if len(layers) == 0:
            raise ConfigError("MAMO needs at least one shared layer")
        if len(heads) < 2:
            raise ConfigError(f"MAMO needs at least two tasks, got {list(heads)}")
        if module not in MODULE_KINDS:
            raise ConfigError(f"unknown MAMO module kind {module!r}; valid kinds are: {', '.join(MODULE_KINDS)}")
        self.layers = nn.ModuleList(layers)
        self.encoder = self.layers
        self.heads = nn.ModuleDict(heads)
        self.task_names: list[str] = list(heads)
        self.module_kind: ModuleKind = module
        m = len(self.task_names)
        # CoNAL's branches are not fused: no fusion logits (size 0, so the model's size is HPS's plus the branches').
        width = 0 if module == "conal" else m
        self.beta = nn.ParameterList([nn.Parameter(torch.zeros(width)) for _ in range(m)])
        self.gmks = nn.ModuleDict()
        #: (layer, group) -> key in ``self.gmks``, in order of creation.
        self.active: dict[tuple[int, Group], str] = {}
        if search is not None and not isinstance(search, SearchOptions):
            raise ConfigError(f"MAMO's search options must be SearchOptions, got {type(search).__name__}")
        self.search = search

    # -- hooks of the training loop ----------------------------------------------------------------------------
    def representation_is_shared_path(self) -> bool:
        """False once a module belongs to a single task: it lies below :meth:`encode`'s output, so the engine must
        walk the whole graph (no ``representation``) to give it its task's gradient (KKT condition 2 of Eq. 14)."""
        return not self.has_task_modules()

    def callbacks(self) -> list[Callback]:
        """The search of Alg. 1 (:class:`mtlkit.models.mamo_search.ArchitectureSearch`) when the model has search options."""
        if self.search is None:
            return []
        from mtlkit.models.mamo_search import ArchitectureSearch

        return [ArchitectureSearch(self.search)]

    # -- structure -------------------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def _index(self, task: int | str) -> int:
        if isinstance(task, str):
            if task not in self.task_names:
                raise ConfigError(f"unknown task {task!r}; tasks are: {', '.join(self.task_names)}")
            return self.task_names.index(task)
        if not 0 <= int(task) < len(self.task_names):
            raise ConfigError(f"task index {task} out of range for {len(self.task_names)} tasks")
        return int(task)

    def groups_for_pair(self, i: int | str, j: int | str) -> list[Group]:
        """The module groups generated for a conflict between tasks i and j: ``[(i, j)]`` for GMKs, ``[(i,), (j,)]``
        for task-exclusive modules and CoNAL branches."""
        a, b = sorted((self._index(i), self._index(j)))
        if a == b:
            raise ConfigError(f"a task does not conflict with itself (got the pair ({i}, {j}))")
        return [(a, b)] if self.module_kind == "gmk" else [(a,), (b,)]

    def _key(self, layer: int, group: Group) -> str:
        return f"l{layer}__" + "__".join(self.task_names[t] for t in group)

    def grow(self, layer: int, pair: tuple[int | str, int | str]) -> list[str]:
        """Generate the module(s) for a conflict of ``pair`` at ``layer`` (0-based); returns the new modules' keys
        (empty when they already exist). New modules are deep copies of the current shared layers (choice 1).

        With ``module="conal"`` each task of the pair branches at ``layer`` (or moves its branch point down to it):
        one key per layer the branch gains, see the module docstring."""
        new = []
        for g in self.groups_for_pair(*pair):
            new += self.grow_group(layer, g)
        return new

    def grow_group(self, layer: int, group: Sequence[int | str]) -> list[str]:
        """Generate the module of one group (two tasks for GMKs, one task otherwise) at ``layer``; returns the new
        keys. Replaying :meth:`architecture` through this rebuilds a grown model's structure."""
        if not 0 <= layer < self.num_layers:
            raise ConfigError(f"layer {layer} out of range: the encoder has {self.num_layers} layers (0-based)")
        g: Group = tuple(sorted(self._index(t) for t in group))
        want = 2 if self.module_kind == "gmk" else 1
        if len(g) != want or len(set(g)) != len(g):
            raise ConfigError(f"a {self.module_kind!r} module belongs to {want} different task(s), got {list(group)}")
        if self.module_kind == "conal":
            start = self._start(g) if g in self.groups() else self.num_layers
            return [self._copy_layer(i, g) for i in range(layer, start)]  # empty when g already owns ``layer``
        if (layer, g) in self.active:
            return []
        if g not in self.groups():
            self._make_room_in_fusion(g)
        return [self._copy_layer(layer, g)]

    def _copy_layer(self, layer: int, g: Group) -> str:
        key = self._key(layer, g)
        mod = copy.deepcopy(self.layers[layer])
        ref = next(self.layers[layer].parameters(), None)
        if ref is not None:
            mod.to(ref.device)
        self.gmks[key] = mod
        self.active[(layer, g)] = key
        return key

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """``nn.Module.load_state_dict``, after generating the modules ``state_dict`` holds that this model lacks
        (in the state's order, which is their order of creation), so that the state of a grown MAMO loads into a
        freshly built one: ``mtlkit eval`` and reuse of a finished run rebuild the model from its config, then load
        ``best.pt``. Modules are created as copies of the shared layers (the state then overwrites them), without
        touching the fusion logits (the state holds them)."""
        known = {self._key(layer, g): (layer, g) for layer in range(self.num_layers) for g in self._all_groups()}
        for name in state_dict:
            parts = name.split(".")
            if len(parts) > 2 and parts[0] == "gmks" and parts[1] not in self.gmks and parts[1] in known:
                self._copy_layer(*known[parts[1]])
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def _all_groups(self) -> list[Group]:
        """Every group a module of this kind can belong to: the task pairs for GMKs, the single tasks otherwise."""
        m = len(self.task_names)
        if self.module_kind == "gmk":
            return [(i, j) for i in range(m) for j in range(i + 1, m)]
        return [(i,) for i in range(m)]

    def has_task_modules(self) -> bool:
        """Whether some module belongs to a single task (exclusive or CoNAL kinds, once grown): its parameters are
        task-exclusive, not in :meth:`shared_parameters`, and below :meth:`encode`'s output, so the engine must be
        called without a ``representation`` to give them their task's gradient
        (:meth:`representation_is_shared_path`)."""
        return any(len(g) == 1 for (_, g) in self.active)

    def branch_points(self) -> dict[str, int]:
        """``module="conal"``: per branched task, the (0-based) layer its branch starts at."""
        return {self.task_names[g[0]]: self._start(g) for g in self.groups() if len(g) == 1}

    def _fusion_index(self, t: int, g: Group) -> int:
        """The entry of ``β_t`` that weighs group ``g``'s stream in task t's fusion (choice 4)."""
        return g[0] if len(g) == 1 else (g[1] if g[0] == t else g[0])

    @torch.no_grad()
    def _make_room_in_fusion(self, g: Group) -> None:
        """Set the fusion logits of the tasks of a group about to get its first module so that no output changes.

        At birth the group's layer-L stream equals ``o_f^L`` (choices 1-3), so the fusion is unchanged if the new
        stream takes part of the weight ``w_0`` of ``o_f^L`` and every other stream keeps its weight. With the logit
        of ``o_f^L`` fixed at 0, a new logit 0 and every active logit of the task raised by ``log 2`` do exactly that:
        the normaliser doubles, so ``o_f^L`` and the new stream get ``w_0 / 2`` each and the others keep theirs.
        (A fresh logit of 0 alone would take weight from every stream, and change the output of a task that already
        fuses a trained stream: with three or more tasks.)
        """
        for t in g:
            active = [self._fusion_index(t, h) for h in self.groups() if t in h]
            self.beta[t][self._fusion_index(t, g)] = 0.0
            if active:
                self.beta[t][active] += float(torch.log(torch.tensor(2.0)))

    def groups(self) -> list[Group]:
        """Groups with at least one active module, sorted (the order of the streams in :meth:`encode`)."""
        return sorted({g for (_, g) in self.active})

    def _start(self, group: Group) -> int:
        return min(layer for (layer, g) in self.active if g == group)

    def architecture(self) -> list[tuple[int, tuple[str, ...]]]:
        """Active modules as ``(layer, task names)``, in order of creation (enough to rebuild with
        :meth:`grow_group`)."""
        return [(layer, tuple(self.task_names[t] for t in g)) for (layer, g) in self.active]

    # -- parameter roles ---------------------------------------------------------------------------------------
    def all_shared_parameters(self) -> list[nn.Parameter]:
        """Parameters of the all-shared layers ``f_S`` (Def. 3.1)."""
        return [p for p in self.layers.parameters() if p.requires_grad]

    def layer_parameters(self, layer: int) -> list[nn.Parameter]:
        """Parameters of the all-shared layer ``f_S^layer`` (where conflicts are detected, Eq. 9)."""
        return [p for p in self.layers[layer].parameters() if p.requires_grad]

    def group_parameters(self) -> dict[tuple[str, ...], list[nn.Parameter]]:
        """Per group (task names), the parameters of its modules (Def. 3.2: used only by those tasks)."""
        out: dict[tuple[str, ...], list[nn.Parameter]] = {}
        for (_layer, g), key in self.active.items():
            out.setdefault(tuple(self.task_names[t] for t in g), []).extend(
                p for p in self.gmks[key].parameters() if p.requires_grad
            )
        return out

    def task_module_parameters(self) -> dict[str, list[nn.Parameter]]:
        """Per task, the parameters of the modules it alone owns (exclusive / CoNAL kinds; empty for GMKs)."""
        out: dict[str, list[nn.Parameter]] = {name: [] for name in self.task_names}
        for (_layer, g), key in self.active.items():
            if len(g) == 1:
                out[self.task_names[g[0]]].extend(p for p in self.gmks[key].parameters() if p.requires_grad)
        return out

    def task_exclusive_parameters(self) -> dict[str, list[nn.Parameter]]:
        """Per task, everything only that task uses: its decoder, its fusion logits ``β_m`` and its own modules
        (the ``θ^t`` of Eq. 14's condition 2, which take their task's full gradient)."""
        mods = self.task_module_parameters()
        return {
            name: list(self.heads[name].parameters()) + [self.beta[t]] + mods[name]
            for t, name in enumerate(self.task_names)
        }

    def shared_parameters(self) -> list[nn.Parameter]:
        """All-shared then GMK parameters: the vector ``θ^{sh}, θ^{h_{i,j}}`` of Eq. 14 that the aggregator combines.
        Modules owned by one task are not in it (module docstring, "Parameter roles")."""
        return self.all_shared_parameters() + [
            p
            for (_, g), key in self.active.items()
            if len(g) > 1
            for p in self.gmks[key].parameters()
            if p.requires_grad
        ]

    def last_shared_layer(self) -> list[nn.Parameter]:
        weights = [p for p in self.all_shared_parameters() if p.dim() >= 2]
        return weights[-1:]

    def num_parameters(self) -> int:
        """Model size: every parameter (shared layers, modules, fusion logits, decoders)."""
        return sum(p.numel() for p in self.parameters())

    def module_parameters(self, layer: int) -> int:
        """Parameters of one module generated at ``layer`` (= those of ``f_S^layer``, choice 1)."""
        return sum(p.numel() for p in self.layers[layer].parameters())

    # -- forward -----------------------------------------------------------------------------------------------
    def encode(self, x: Tensor) -> Tensor:
        """Eq. 6 and Eq. 7: returns ``[o_f^L, o_g^L for g in groups()]`` stacked on dim 1.

        ``module="conal"``: a branch reads ``o_f^{s-1}`` at its branch point s and then only its own previous output
        (no mean with the shared output, no shared layer)."""
        groups = self.groups()
        start = {g: self._start(g) for g in groups}
        conal = self.module_kind == "conal"
        o_f = x
        streams: dict[Group, Tensor] = {}
        for layer, f in enumerate(self.layers):
            prev = o_f
            o_f = f(prev)
            nxt: dict[Group, Tensor] = {}
            for g in groups:
                if start[g] > layer:
                    continue
                key = self.active.get((layer, g))
                if conal:  # a CoNAL branch owns every layer from its branch point up (grow_group keeps it so)
                    nxt[g] = self.gmks[self.active[(layer, g)]](prev if start[g] == layer else streams[g])
                    continue
                inp = prev if g not in streams else 0.5 * (prev + streams[g])
                nxt[g] = (self.gmks[key] if key is not None else f)(inp)
            streams = nxt
        return torch.stack([o_f] + [streams[g] for g in groups], dim=1)

    def fuse(self, z: Tensor, task: int | str) -> Tensor:
        """Eq. 8's fusion for one task: the decoder input built from the task's row and column only."""
        t = self._index(task)
        groups = self.groups()
        if z.dim() < 2 or z.shape[1] != 1 + len(groups):
            raise ValueError(
                f"MAMO.decode expects z of shape [B, {1 + len(groups)}, ...] (o_f and one stream per "
                f"group), got {tuple(z.shape)}"
            )
        mine = [(k, g) for k, g in enumerate(groups) if t in g]
        if not mine:
            return z[:, 0]
        if self.module_kind == "conal":  # the decoder reads its branch only (CoNAL: no fusion)
            return z[:, 1 + mine[0][0]]
        other = [self._fusion_index(t, g) for _, g in mine]
        logits = torch.cat([torch.zeros(1, dtype=z.dtype, device=z.device), self.beta[t][other]])
        w = torch.softmax(logits, dim=0)
        parts = torch.stack([z[:, 0]] + [z[:, 1 + k] for k, _ in mine], dim=0)
        return torch.einsum("k,kb...->b...", w, parts)

    def decode(self, z: Tensor) -> dict[str, Tensor]:
        return {name: self.heads[name](self.fuse(z, t)) for t, name in enumerate(self.task_names)}


def mamo_from(
    layers: Iterable[nn.Module] | nn.Sequential,
    heads: dict[str, nn.Module],
    module: ModuleKind = "gmk",
    search: SearchOptions | None = None,
) -> MAMO:
    """Build MAMO from an encoder (split with :func:`split_layers` when it is one ``nn.Sequential``) and heads."""
    blocks = split_layers(layers) if isinstance(layers, nn.Sequential) else list(layers)
    return MAMO(blocks, heads, module, search)


@register_model("mamo")
def build_mamo(
    data,
    encoder: str = "conv",
    width: int = 384,
    hidden: Sequence[int] = (1024, 1024, 1024),
    head_hidden: int = 192,
    module: str = "gmk",
    rounds: int = 2,
    epochs_per_round: int = 1,
    threshold: str = "average",
    k: int = 1,
    scope: str = "all_layers",
    conflict_window: str = "last_batches",
    detect_batches: int = 20,
    pretrain_method: str | None = None,
    selection: str = "best_val",
    restore_optimizer: bool = False,
) -> MAMO:
    """MAMO with no module yet (= HPS) on the HPS backbone of ``data``, and its search (Alg. 1), which the training
    loop runs (``mtlkit train --model mamo --method mgda``; :mod:`mtlkit.models.mamo_search`).

    The network is built from :func:`~mtlkit.models.hps.build_hps` so that, with the same seed, its initial
    parameters are HPS's.

    Architecture options:
        encoder, width, hidden, head_hidden: the HPS backbone (:func:`~mtlkit.models.hps.build_hps`).
        module: ``gmk`` (MAMO), ``conal`` (CoNAL-faithful task branches: the w/o-GMK ablation) or ``exclusive``
            (task-exclusive modules fused like GMKs); see :class:`MAMO`.

    Search options (Alg. 1; the rounds train with the run's method: ``mgda`` = MAMO, ``ew`` = w/o MO,
    ``pcgrad``/``cagrad`` = MAMO+PCGrad/CAGrad; the choices are numbered as in :mod:`mtlkit.models.mamo_search`):
        rounds: Z, the number of conflict detections (0: train HPS, never grow). Pre-training (Alg. 1 line 1) lasts
            ``train.epochs - rounds * epochs_per_round`` epochs, which must be >= 1.
        epochs_per_round: epochs trained after each detection (>= 1).
        threshold: the indicator: ``average`` (Eqs. 12-13) or ``topk`` (Sec. 4.4.4, the ``k`` most conflicting
            layer-pairs).
        k: K of ``topk``.
        scope: where ``Q_average`` (or TopK) is taken: ``all_layers`` (default, choice 1) or ``per_layer``.
        conflict_window: where Eq. 11's Q is accumulated (choice 2): ``last_batches`` (the last ``detect_batches``
            mini-batches of the phase before each detection) or ``phase`` (every mini-batch of that phase).
        detect_batches: see ``conflict_window`` (Alg. 1 line 3's single mini-batch is 1).
        pretrain_method: the method of pre-training (choice 4): null (default) = the run's method; a method name
            (e.g. ``ew``: plain HPS) pre-trains with it (default options) and the run's method takes over at the
            first detection.
        selection: ``best_val`` (default, choice 5): each phase ends by rolling the model back to its best epoch on
            validation, the next phase grows from it, and the run's final model is the best epoch of the last
            phase; ``last``: the last epoch of each phase.
        restore_optimizer: with ``best_val``, also roll the optimizer's state back to that epoch's (choice 5).

    Example:
        >>> from types import SimpleNamespace
        >>> from mtlkit.tasks import Task
        >>> data = SimpleNamespace(input_shape=(4,), tasks=[Task("a", "multiclass", 2), Task("b", "multiclass", 2)])
        >>> m = build_mamo(data, encoder="mlp", hidden=(8,), head_hidden=4, rounds=1)
        >>> m.search.rounds, [cb.key() for cb in m.callbacks()], m.representation_is_shared_path()
        (1, ['mamo'], True)
    """
    from mtlkit.models.hps import build_hps

    hps = build_hps(data, encoder=encoder, width=width, hidden=hidden, head_hidden=head_hidden)
    # after the network (its initialisation draws from the seeded global RNG first, as HPS's does)
    search = SearchOptions(
        rounds=rounds,
        epochs_per_round=epochs_per_round,
        threshold=threshold,
        k=k,
        scope=scope,
        conflict_window=conflict_window,
        detect_batches=detect_batches,
        pretrain_method=pretrain_method,
        selection=selection,
        restore_optimizer=restore_optimizer,
    )
    return mamo_from(hps.encoder, dict(hps.heads), module, search)  # type: ignore[arg-type]


__all__ = [
    "CONFLICT_WINDOWS",
    "MAMO",
    "MODULE_KINDS",
    "SCOPES",
    "SELECTIONS",
    "THRESHOLDS",
    "SearchOptions",
    "build_mamo",
    "mamo_from",
    "split_layers",
]
