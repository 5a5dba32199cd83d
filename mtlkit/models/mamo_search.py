"""MAMO's search strategy (conflict detection) and learning procedure (Algorithm 1), as a training-loop callback.

Tan, Hu & Zhang, "MAMO: Multi-Task Architecture Learning via Multi-Objective and Gradients Mediative Kernel",
27th European Conference on Artificial Intelligence (ECAI 2024, IOS Press; DOI not checked here). The architecture is
:class:`mtlkit.models.mamo.MAMO`; this module implements

* **Sec. 3.3, Eqs. 9-13** — :class:`ConflictDetector`: per shared layer ℓ, the cosine matrix ``C`` of the per-task
  gradients on that layer's all-shared parameters (Eq. 9), the proxy indicator ``Ĩ = [C < 0]`` (Eq. 10), its
  accumulation ``Q`` over mini-batches (Eq. 11), and the zero-one indicator ``I = [Q ≥ Q_average]`` with
  ``Q_average`` = the mean of the non-zero entries of Q (Eqs. 12-13) — :func:`average_indicator`; or the TopK
  alternative of Sec. 4.4.4 — :func:`topk_indicator`. The per-task gradients come from the engine
  (:class:`mtlkit.engine.autodiff.BackwardInfo` ``.jacobian`` cut per layer with :func:`layer_gradients`, when the method's
  aggregator computes them at parameter level) or from :func:`mtlkit.engine.autodiff.per_task_grads` on the step's losses
  (every other method).
* **Alg. 1** — :class:`ArchitectureSearch`, a :class:`mtlkit.callbacks.Callback` of the one training loop
  (:class:`mtlkit.train.Trainer`), which a MAMO built by the registered factory brings itself
  (:meth:`MAMO.callbacks`): ``mtlkit train --model mamo --method mgda`` runs the search, with the engine options,
  checkpoints and ``--resume`` of every run. It pre-trains the all-shared model (line 1), then at the end of each
  phase detects conflicts and generates modules from the indicator (lines 3-5), and the run continues training
  (lines 6-7) with the run's method — ``mgda`` for MAMO (KKT Eq. 14 over the all-shared *and* GMK parameters, which is
  what :meth:`MAMO.shared_parameters` hands the engine), ``ew`` for the w/o-MO ablation (linear scalarisation, Eq.
  3), ``pcgrad``/``cagrad`` for MAMO+PCGrad / MAMO+CAGrad (Sec. 4.4.3). The w/o-GMK ablation is the same procedure on
  ``--set model.options.module=conal`` (CoNAL-faithful task branches; with ``ew`` it is the CoNAL baseline's
  architecture under linear scalarisation).

The search's options are keyword options of the model (:func:`mtlkit.models.mamo.build_mamo`, e.g. ``--set
model.options.rounds=3``; :class:`~mtlkit.models.mamo.SearchOptions`): ``rounds`` (Z), ``epochs_per_round``,
``threshold``, ``k``, ``scope``, ``conflict_window``, ``detect_batches``, ``pretrain_method``, ``selection``,
``restore_optimizer``. The schedule is laid out on ``train.epochs``: pre-training takes the first
``train.epochs - rounds * epochs_per_round`` epochs (at least 1, else a ConfigError), each round the next
``epochs_per_round`` (at least 1: phases of zero epochs, which would detect without training, are refused). The
epochs keep one numbering over the whole search, so every epoch's mini-batch order is the Trainer's (a function of
the seed and the epoch). results.json holds, under ``"mamo"``, one record per phase (round 0 = pre-training, the HPS
model): the modules activated, the model size, the val and test metrics after the phase's selection (test: reported,
never selected on), the Q the round's modules were generated from and the mini-batches it counted, the method.

**Who gets which gradient** (the KKT conditions of Eq. 14): the aggregator combines the per-task gradients of
:meth:`MAMO.shared_parameters` only (all-shared and GMK parameters, condition 1); every parameter that one task alone
uses (its decoder, its fusion logits, its exclusive/CoNAL modules: condition 2, ``∇_{θ^t} L^t = 0``) receives that
task's full gradient, never an MGDA weight ``a^t`` of it nor a PCGrad projection. For a model whose modules belong to
single tasks :meth:`MAMO.representation_is_shared_path` is False, so the loop calls the engine without a
``representation``: those modules lie below :meth:`MAMO.encode`'s output, where the representation path would give
them no gradient; without it the engine walks the whole graph and gives every non-shared parameter its own task's
gradient. (Representation-level methods cannot do that and are refused for those module kinds.) The callback calls
``trainer.add_parameters`` after each growth, which makes the loop read the shared parameters and this hook again.

Choices where the paper is silent (written down here and in the reproduction's output):

1. **Scope of Q_average** (Eq. 12). Read per layer, with m = 2 tasks Q has one off-diagonal value q (twice), so
   ``Q_average = q`` and *every* layer with a single conflicting mini-batch would be activated: no sparsity. The
   default ``scope="all_layers"`` averages the non-zero entries of all layers' Q together (a layer-pair is activated
   when its conflict count is at least the average over all layers and pairs), which keeps the paper's stated intent
   ("activated iff their conflicts are above the degree of average conflicts"); ``scope="per_layer"`` is the
   literal reading. The diagonal is always 0 (cos(g, g) = 1).
2. **Where Q is accumulated** (Eq. 11, "on the fly"), option ``conflict_window``: ``"last_batches"`` (default) over
   the last ``detect_batches`` (default 20) training mini-batches before each detection (the end of pre-training,
   then the end of each round); ``"phase"`` over every training mini-batch of the phase before the detection. Both
   use the same per-task gradients the optimiser uses. Alg. 1 line 3's single "mini-batch" is ``detect_batches=1``.
3. **Already-active entries**: the indicator is computed on all entries; the modules generated in a round are the
   indicated (layer, pair) entries that have no module yet (Table 3 counts these).
4. **Pre-training** (Alg. 1 line 1 names no method), option ``pretrain_method``: by default (None) the run's
   method (MGDA for MAMO, so the model after 0 detections is HPS+MGDA); ``"ew"`` pre-trains plain HPS (equal
   weights), which makes the "0 detections = HPS" point of Fig. 4 plain HPS (the run's method, built afresh from
   the run's ``method`` section, takes over at the first detection: ``Trainer.replace_method``). Pre-training lasts
   ``train.epochs - rounds * epochs_per_round`` epochs; each round trains ``epochs_per_round`` epochs. New
   modules' parameters are added to the run's optimizer as a new parameter group at the current learning rate
   (``Trainer.add_parameters``; the other parameters keep their moments).
5. **Model selection**: within each phase, the epoch with the best validation score (the Trainer's selection: mean
   primary metric) is kept and the next round grows from it (``selection="best_val"``): at a phase's end the model
   is rolled back to ``Trainer.selected_state()``, and after growing the selection starts afresh
   (``Trainer.restart_selection``: a grown model's weights do not fit an earlier state), so the run's final model is
   the best epoch of the last phase. ``"last"`` keeps the last epoch of every phase (and the run's last epoch).
   Rolling back restores the model's parameters and BatchNorm statistics; option ``restore_optimizer`` (default
   False: Adam keeps the moments and step counts of the last epoch) also restores the optimizer's state of the
   selected epoch (its learning rates stay the schedule's). The weighting's own state (e.g. a loss history) is
   never rolled back.

Resuming (``--resume``, mid-epoch checkpoints included) continues the search bit for bit: the callback's state (the
conflicts grown per round, Q and its batch count, the round records, the optimizer state kept for a rollback) is in
every checkpoint, and on resume it re-grows the saved architecture and re-adds the parameter groups (and switches the
method) in the order of the original run, before the loop loads the model's and the optimizer's states.
``train.epochs`` fixes the schedule, so a search cannot be resumed with another one.

Example:
    >>> import torch
    >>> Q = torch.tensor([[0., 4., 1.], [4., 0., 0.], [1., 0., 0.]])
    >>> average_indicator(Q)   # non-zero mean = (4+4+1+1)/4 = 2.5
    tensor([[0, 1, 0],
            [1, 0, 0],
            [0, 0, 0]], dtype=torch.int32)
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor

from mtlkit.callbacks import Callback, StepInfo
from mtlkit.engine.autodiff import per_task_grads, split_flat
from mtlkit.errors import ConfigError
from mtlkit.evaluation import evaluate
from mtlkit.methods import Method, build_method
from mtlkit.models.mamo import MAMO, SearchOptions

if TYPE_CHECKING:
    from mtlkit.train import Trainer

Threshold = Literal["average", "topk"]
Scope = Literal["all_layers", "per_layer"]


# ---------------------------------------------------------------------------------------------------------------
# Eqs. 9-13
# ---------------------------------------------------------------------------------------------------------------
def cosine_matrix(grads: Tensor) -> Tensor:
    """Eq. 9: ``C[i, j] = cos(g_i, g_j)`` for the rows of the T x P matrix ``grads`` (0 where a gradient is zero).

    Example:
        >>> cosine_matrix(torch.tensor([[1., 0.], [-1., 1.]])).round(decimals=4)
        tensor([[ 1.0000, -0.7071],
                [-0.7071,  1.0000]])
    """
    if grads.dim() != 2:
        raise ValueError(f"cosine_matrix takes a T x P matrix of per-task gradients, got shape {tuple(grads.shape)}")
    norms = grads.norm(dim=1, keepdim=True)
    unit = torch.where(norms > 0, grads / norms.clamp_min(torch.finfo(grads.dtype).tiny), torch.zeros_like(grads))
    C = unit @ unit.T
    idx = torch.arange(C.shape[0])
    C[idx, idx] = torch.where(norms.flatten() > 0, torch.ones_like(C[idx, idx]), torch.zeros_like(C[idx, idx]))
    return C


def proxy_indicator(C: Tensor) -> Tensor:
    """Eq. 10: 1 where tasks conflict (``C < 0``), else 0.

    Example:
        >>> proxy_indicator(torch.tensor([[1., -0.2], [-0.2, 1.]]))
        tensor([[0, 1],
                [1, 0]], dtype=torch.int32)
    """
    return (C < 0).to(torch.int32)


def _check_q(Q: Tensor) -> None:
    if Q.dim() < 2 or Q.shape[-1] != Q.shape[-2]:
        raise ValueError(f"an accumulated conflict matrix must be [..., T, T], got shape {tuple(Q.shape)}")
    if bool((Q < 0).any()):
        raise ValueError("an accumulated conflict matrix counts conflicts: it cannot have negative entries")


def average_indicator(Q: Tensor) -> Tensor:
    """Eqs. 12-13: ``I = [Q ≥ Q_average]`` with ``Q_average`` the mean of Q's non-zero entries; all zeros if Q = 0.

    ``Q`` may be one T x T matrix or a stack ``[L, T, T]``: the average is then over all the stack's non-zero entries
    (the ``all_layers`` scope). Zero entries are never indicated.
    """
    _check_q(Q)
    nz = Q[Q > 0]
    if nz.numel() == 0:
        return torch.zeros_like(Q, dtype=torch.int32)
    q_avg = nz.float().mean()
    return ((Q.float() >= q_avg) & (Q > 0)).to(torch.int32)


def topk_indicator(Q: Tensor, k: int) -> Tensor:
    """Sec. 4.4.4's alternative: indicate the k most conflicting pairs (largest non-zero Q, upper triangle, ties by
    position), symmetrically. ``Q`` is T x T or ``[L, T, T]`` (then the k largest over all layers).

    Example:
        >>> topk_indicator(torch.tensor([[0., 3., 1.], [3., 0., 2.], [1., 2., 0.]]), 1)
        tensor([[0, 1, 0],
                [1, 0, 0],
                [0, 0, 0]], dtype=torch.int32)
    """
    _check_q(Q)
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ConfigError(f"TopK needs an integer k >= 0, got {k!r}")
    stack = Q.unsqueeze(0) if Q.dim() == 2 else Q
    T = stack.shape[-1]
    iu = torch.triu_indices(T, T, offset=1)
    vals = stack[:, iu[0], iu[1]].reshape(-1)
    out = torch.zeros_like(stack, dtype=torch.int32)
    order = torch.argsort(-vals.float(), stable=True)[:k]
    for flat in order.tolist():
        if vals[flat] <= 0:
            break
        layer, p = divmod(flat, iu.shape[1])
        i, j = int(iu[0, p]), int(iu[1, p])
        out[layer, i, j] = out[layer, j, i] = 1
    return out[0] if Q.dim() == 2 else out


class ConflictDetector:
    """Accumulates Eq. 11's ``Q`` per shared layer and turns it into the indicator of Eq. 13 (or TopK).

    Args:
        num_layers: L, the number of all-shared layers.
        num_tasks: m.
        threshold: ``"average"`` (Eqs. 12-13) or ``"topk"`` (Sec. 4.4.4).
        k: K for TopK.
        scope: ``"all_layers"`` (default, see choice 1 of the module docstring) or ``"per_layer"``.

    Example:
        >>> det = ConflictDetector(num_layers=2, num_tasks=2)
        >>> det.update([torch.tensor([[1., 0.], [-1., 0.]]), torch.tensor([[1., 1.], [1., 0.]])])
        >>> det.Q[:, 0, 1].tolist(), det.indicator()[:, 0, 1].tolist()
        ([1, 0], [1, 0])
    """

    def __init__(
        self, num_layers: int, num_tasks: int, threshold: Threshold = "average", k: int = 1, scope: Scope = "all_layers"
    ):
        if num_layers < 1 or num_tasks < 2:
            raise ConfigError(f"conflict detection needs >= 1 layer and >= 2 tasks, got {num_layers}, {num_tasks}")
        if threshold not in ("average", "topk"):
            raise ConfigError(f"unknown threshold {threshold!r}; valid thresholds are: average, topk")
        if scope not in ("all_layers", "per_layer"):
            raise ConfigError(f"unknown scope {scope!r}; valid scopes are: all_layers, per_layer")
        self.threshold, self.k, self.scope = threshold, k, scope
        self.Q = torch.zeros(num_layers, num_tasks, num_tasks, dtype=torch.long)
        self.batches = 0

    def reset(self) -> None:
        self.Q.zero_()
        self.batches = 0

    def update(self, layer_grads: Sequence[Tensor]) -> None:
        """Add one mini-batch: ``layer_grads[ℓ]`` is the T x P_ℓ matrix of per-task gradients on layer ℓ."""
        if len(layer_grads) != self.Q.shape[0]:
            raise ValueError(f"expected per-task gradients for {self.Q.shape[0]} layers, got {len(layer_grads)}")
        for layer, g in enumerate(layer_grads):
            if g.dim() != 2 or g.shape[0] != self.Q.shape[1]:
                raise ValueError(f"layer {layer}: expected a {self.Q.shape[1]} x P matrix, got {tuple(g.shape)}")
            self.Q[layer] += proxy_indicator(cosine_matrix(g.detach().float().cpu())).long()
        self.batches += 1

    def indicator(self) -> Tensor:
        """The ``[L, T, T]`` zero-one indicator of the accumulated conflicts."""
        if self.scope == "all_layers":
            return average_indicator(self.Q) if self.threshold == "average" else topk_indicator(self.Q, self.k)
        f = average_indicator if self.threshold == "average" else (lambda q: topk_indicator(q, self.k))
        return torch.stack([f(q) for q in self.Q])


def conflicts(indicator: Tensor) -> list[tuple[int, int, int]]:
    """``(layer, i, j)`` with i < j for every indicated entry of an ``[L, T, T]`` indicator."""
    out = []
    for layer in range(indicator.shape[0]):
        for i, j in zip(*torch.triu_indices(indicator.shape[1], indicator.shape[2], offset=1).tolist(), strict=True):
            if int(indicator[layer, i, j]):
                out.append((layer, i, j))
    return out


def layer_gradients(model: MAMO, jacobian: Tensor) -> list[Tensor]:
    """Cut the engine's T x K Jacobian over ``model.shared_parameters()`` into one T x P_ℓ block per shared layer."""
    params = model.shared_parameters()
    pieces = split_flat(jacobian, params)
    where = {id(p): k for k, p in enumerate(params)}
    return [
        torch.cat([pieces[where[id(p)]].reshape(jacobian.shape[0], -1) for p in model.layer_parameters(layer)], dim=1)
        for layer in range(model.num_layers)
    ]


# ---------------------------------------------------------------------------------------------------------------
# Algorithm 1, in the training loop
# ---------------------------------------------------------------------------------------------------------------
class ArchitectureSearch(Callback):
    """Alg. 1 as a callback of :class:`mtlkit.train.Trainer` (see the module docstring); :meth:`MAMO.callbacks`
    builds it from the model's :class:`~mtlkit.models.mamo.SearchOptions`.

    Per step, on the mini-batches of the conflict window, the per-task gradients of the all-shared layers are added
    to Q (the engine's Jacobian in :meth:`on_backward` when the aggregator computes it at parameter level, else
    :func:`~mtlkit.engine.autodiff.per_task_grads` of the step's losses in :meth:`on_losses`). At the end of each phase
    (:meth:`on_epoch_end`, before that epoch's checkpoint): roll back to the phase's selected epoch, record the
    phase, and — unless it was the last — grow the indicated modules, add their parameters to the optimizer, reset Q
    and restart the selection.

    Example:
        >>> from mtlkit.models.mamo import SearchOptions
        >>> cb = ArchitectureSearch(SearchOptions(rounds=1))
        >>> cb.key(), cb.results()
        ('mamo', {})
    """

    name = "mamo"

    def __init__(self, options: SearchOptions):
        self.options = options
        self.detector: ConflictDetector | None = None
        self.records: list[dict[str, Any]] = []
        #: per round so far, the conflicts ``[layer, i, j]`` grown at its start (replayed on resume, in order)
        self.grown: list[list[list[int]]] = []
        self._pending: dict[str, Any] = {"activated": [], "Q": None, "q_batches": 0}  # the round being trained
        self._model: MAMO | None = None
        self._epochs = 0  # train.epochs the schedule was laid out on
        self._pretrain = 0  # pre-training epochs
        self._best_optimizer: dict[str, Any] | None = None  # restore_optimizer: the selected epoch's optimizer state
        self._seen: Any = None  # the selected state last seen (a new one: the trainer selected that epoch)
        self._restored = False

    # -- schedule -----------------------------------------------------------------------------------------------
    def _phase(self, epoch: int) -> int:
        """The phase ``epoch`` (from 0) belongs to: 0 = pre-training, r = round r."""
        return 0 if epoch < self._pretrain else 1 + (epoch - self._pretrain) // self.options.epochs_per_round

    def _phase_end(self, epoch: int) -> bool:
        after = epoch + 1 - self._pretrain
        return after >= 0 and after % self.options.epochs_per_round == 0

    def _detecting(self, step: StepInfo) -> bool:
        """Whether this mini-batch counts in Q (choice 2): only in phases followed by a detection."""
        o = self.options
        if self._phase(step.epoch) >= o.rounds:
            return False
        if o.conflict_window == "phase":
            return True
        return self._phase_end(step.epoch) and step.batch >= step.steps_per_epoch - o.detect_batches

    @staticmethod
    def _engine_jacobian(method: Method) -> bool:
        return method.aggregator.needs_per_task_grads and method.level == "parameter"

    def _switches(self, trainer: Trainer) -> bool:
        pre = self.options.pretrain_method
        return pre is not None and pre.lower() != trainer.cfg.method.name.lower()

    def _run_method(self, trainer: Trainer) -> Method:
        m = trainer.cfg.method
        return build_method(m.name, level=m.level, **m.options)

    # -- set-up and growth --------------------------------------------------------------------------------------
    def check(self, trainer: Trainer) -> None:
        """The schedule and the levels, when the trainer is built (before its run directory is touched)."""
        model, o, tc = trainer.model, self.options, trainer.cfg.train
        if not isinstance(model, MAMO):
            raise ConfigError(f"MAMO's search runs on a MAMO model, not {type(model).__name__}")
        pre = o.pretrain_epochs(tc.epochs)
        if pre < 1:
            raise ConfigError(
                f"model mamo: train.epochs={tc.epochs} leaves {pre} pre-training epochs (train.epochs - rounds * "
                f"epochs_per_round, with rounds={o.rounds} and epochs_per_round={o.epochs_per_round}); Alg. 1 "
                f"pre-trains for at least 1 epoch: set train.epochs >= {o.rounds * o.epochs_per_round + 1} (--epochs) "
                f"or lower model.options.rounds / model.options.epochs_per_round"
            )
        methods = [trainer.method]
        if o.pretrain_method is not None and self._switches(trainer):
            methods.append(build_method(o.pretrain_method))
        if model.module_kind != "gmk" and any(m.level == "representation" for m in methods):
            raise ConfigError(
                f"a representation-level method cannot give {model.module_kind!r} modules their task's "
                f"gradient (they lie below the representation): use parameter level (--level "
                f"parameter)"
            )

    def _set_up(self, trainer: Trainer) -> None:
        """The detector and the pre-training method (what a fresh run and a resumed one both do first)."""
        model, o, tc = trainer.model, self.options, trainer.cfg.train
        assert isinstance(model, MAMO)  # check() refused anything else
        pre = o.pretrain_epochs(tc.epochs)
        methods = [trainer.method]
        if o.pretrain_method is not None and self._switches(trainer):
            methods.append(build_method(o.pretrain_method))
        self._model, self._epochs, self._pretrain = model, tc.epochs, pre
        self.detector = ConflictDetector(model.num_layers, len(model.task_names), o.threshold, o.k, o.scope)  # type: ignore[arg-type]
        if len(methods) > 1:
            trainer.replace_method(methods[1])

    def _grow(self, trainer: Trainer, found: Sequence[Sequence[int]]) -> None:
        """Generate the modules of ``found`` (``[layer, i, j]`` each, in order) and add their parameters to the
        optimizer as one new group (this re-reads the model's shared parameters in the loop)."""
        model = self._model
        assert model is not None
        keys: list[str] = []
        for layer, i, j in found:
            keys += model.grow(int(layer), (int(i), int(j)))
        trainer.add_parameters([p for k in keys for p in model.gmks[k].parameters()])

    @staticmethod
    def _load_optimizer(trainer: Trainer, state: dict[str, Any]) -> None:
        """Load an earlier optimizer state, keeping the learning rates the schedule set since."""
        opt = trainer.optimizer
        lrs = [(g["lr"], g.get("initial_lr")) for g in opt.param_groups]
        opt.load_state_dict(copy.deepcopy(state))  # a copy: the optimizer's in-place updates must not reach ours
        for g, (lr, initial) in zip(opt.param_groups, lrs, strict=True):
            g["lr"] = lr
            if initial is not None:
                g["initial_lr"] = initial

    def _record(self, trainer: Trainer, r: int) -> dict[str, Any]:
        model, tc = trainer.model, trainer.cfg.train
        assert isinstance(model, MAMO)
        val = evaluate(model, trainer.data.val, trainer.tasks, tc.eval_batch_size, trainer.device)
        test = evaluate(model, trainer.data.test, trainer.tasks, tc.eval_batch_size, trainer.device)
        p = self._pending if r > 0 else {"activated": [], "Q": None, "q_batches": 0}
        return {
            "round": r,
            "method": trainer.method.name,
            "activated": copy.deepcopy(p["activated"]),
            "parameters": model.num_parameters(),
            "val": val,
            "test": test,
            "Q": copy.deepcopy(p["Q"]),
            "q_batches": int(p["q_batches"]),
        }

    # -- events -------------------------------------------------------------------------------------------------
    def on_train_start(self, trainer: Trainer) -> None:
        if not self._restored:
            self._set_up(trainer)
        self._seen = trainer.selected_state()

    def on_epoch_start(self, trainer: Trainer, epoch: int) -> None:
        if self.options.selection == "last":  # each epoch alone competes: the selection is the last epoch
            trainer.restart_selection()

    def wants_jacobian(self, trainer: Trainer, step: StepInfo) -> bool:
        return self._detecting(step) and self._engine_jacobian(trainer.method)

    def on_losses(self, trainer: Trainer, step: StepInfo) -> None:
        if not self._detecting(step) or self._engine_jacobian(trainer.method):
            return
        model = self._model
        assert model is not None and self.detector is not None
        params = [p for layer in range(model.num_layers) for p in model.layer_parameters(layer)]
        J = trainer.reduce(per_task_grads(step.losses, params, retain_graph=True))  # global batch's (data parallel)
        sizes = [sum(p.numel() for p in model.layer_parameters(layer)) for layer in range(model.num_layers)]
        self.detector.update(list(torch.split(J, sizes, dim=1)))

    def on_backward(self, trainer: Trainer, step: StepInfo) -> None:
        if not (self._detecting(step) and self._engine_jacobian(trainer.method)):
            return
        assert self._model is not None and self.detector is not None
        if step.info is None or step.info.jacobian is None:
            raise RuntimeError("MAMO's conflict detector asked the engine for the per-task gradients and got none")
        self.detector.update(layer_gradients(self._model, step.info.jacobian))

    def on_epoch_end(self, trainer: Trainer, epoch: int, row: dict[str, float]) -> None:
        o = self.options
        model = self._model
        assert model is not None and self.detector is not None
        if o.selection == "best_val" and o.restore_optimizer:
            selected = trainer.selected_state()
            if selected is not self._seen:  # the trainer selected this epoch: keep its optimizer state
                self._seen = selected
                self._best_optimizer = copy.deepcopy(trainer.optimizer.state_dict())
        if not self._phase_end(epoch):
            return
        r = (epoch + 1 - self._pretrain) // o.epochs_per_round
        if o.selection == "best_val":  # choice 5: the phase ends at its best epoch on validation
            selected = trainer.selected_state()
            if selected is not None:
                model.load_state_dict(selected)
            if o.restore_optimizer and self._best_optimizer is not None:
                self._load_optimizer(trainer, self._best_optimizer)
        self.records.append(self._record(trainer, r))
        if r >= o.rounds:
            return
        q, q_batches = self.detector.Q.tolist(), self.detector.batches
        found = [list(c) for c in conflicts(self.detector.indicator())]
        before = len(model.active)
        self._grow(trainer, found)
        self.grown.append(found)
        if r == 0 and self._switches(trainer):
            trainer.replace_method(self._run_method(trainer))
        self.detector.reset()
        self._pending = {
            "activated": [[layer, list(g)] for layer, g in model.architecture()[before:]],
            "Q": q,
            "q_batches": q_batches,
        }
        trainer.restart_selection()  # the grown model's weights do not fit an earlier selection
        self._best_optimizer, self._seen = None, None

    # -- results and resume -------------------------------------------------------------------------------------
    def results(self) -> dict[str, Any]:
        if self._model is None:
            return {}
        return {
            "rounds": copy.deepcopy(self.records),
            "architecture": [[layer, list(g)] for layer, g in self._model.architecture()],
            "pretrain_epochs": self._pretrain,
            "options": self.options.to_dict(),
        }

    def state_dict(self) -> dict[str, Any]:
        det = self.detector
        return {
            "epochs": self._epochs,
            "grown": copy.deepcopy(self.grown),
            "records": copy.deepcopy(self.records),
            "pending": copy.deepcopy(self._pending),
            "Q": None if det is None else det.Q.clone(),
            "batches": 0 if det is None else det.batches,
            "best_optimizer": self._best_optimizer,
        }

    def load_state_dict(self, state: dict[str, Any], trainer: Trainer) -> None:
        if int(state["epochs"]) != trainer.cfg.train.epochs:
            raise ConfigError(
                f"cannot resume this MAMO search with train.epochs={trainer.cfg.train.epochs}: its "
                f"schedule (pre-training = train.epochs - rounds * epochs_per_round) was laid out on "
                f"train.epochs={state['epochs']}; resume with --epochs {state['epochs']}"
            )
        self._set_up(trainer)  # the pre-training method first, as the run did
        for r, found in enumerate(state["grown"]):  # the growths in their order: same modules, same param groups
            self._grow(trainer, found)
            if r == 0 and self._switches(trainer):
                trainer.replace_method(self._run_method(trainer))
        assert self.detector is not None
        self.grown = copy.deepcopy(state["grown"])
        self.detector.Q.copy_(state["Q"])
        self.detector.batches = int(state["batches"])
        self.records = copy.deepcopy(state["records"])
        self._pending = copy.deepcopy(state["pending"])
        self._best_optimizer = state.get("best_optimizer")
        self._restored = True


def summarize_rounds(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows for Table 3 from the search's records (results.json's ``mamo.rounds``): per round, modules activated,
    total modules, size.

    Example:
        >>> summarize_rounds([{"round": 0, "activated": [], "parameters": 10},
        ...                   {"round": 1, "activated": [[0, ["a", "b"]]], "parameters": 14}])
        [{'round': 1, 'activated': 1, 'total': 1, 'parameters': 14, 'where': [[0, ['a', 'b']]]}]
    """
    rows, total = [], 0
    for rec in records[1:]:
        total += len(rec["activated"])
        rows.append(
            {
                "round": rec["round"],
                "activated": len(rec["activated"]),
                "total": total,
                "parameters": rec["parameters"],
                "where": rec["activated"],
            }
        )
    return rows


__all__ = [
    "ArchitectureSearch",
    "ConflictDetector",
    "average_indicator",
    "conflicts",
    "cosine_matrix",
    "layer_gradients",
    "proxy_indicator",
    "summarize_rounds",
    "topk_indicator",
]
