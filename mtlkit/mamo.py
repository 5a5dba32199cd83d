"""MAMO's search strategy (conflict detection) and learning procedure (Algorithm 1).

Tan, Hu & Zhang, "MAMO: Multi-Task Architecture Learning via Multi-Objective and Gradients Mediative Kernel",
27th European Conference on Artificial Intelligence (ECAI 2024, IOS Press; DOI not checked here). The architecture is
:class:`mtlkit.models.mamo.MAMO`; this module implements

* **Sec. 3.3, Eqs. 9-13** — :class:`ConflictDetector`: per shared layer ℓ, the cosine matrix ``C`` of the per-task
  gradients on that layer's all-shared parameters (Eq. 9), the proxy indicator ``Ĩ = [C < 0]`` (Eq. 10), its
  accumulation ``Q`` over mini-batches (Eq. 11), and the zero-one indicator ``I = [Q ≥ Q_average]`` with
  ``Q_average`` = the mean of the non-zero entries of Q (Eqs. 12-13) — :func:`average_indicator`; or the TopK
  alternative of Sec. 4.4.4 — :func:`topk_indicator`. The per-task gradients come from the engine
  (:class:`mtlkit.autodiff.BackwardInfo` ``.jacobian`` cut per layer with :func:`mtlkit.autodiff.split_flat`, or
  :func:`mtlkit.autodiff.per_task_grads` when the method's aggregator does not compute them).
* **Alg. 1** — :func:`learn_mamo`: pre-train the all-shared model (line 1), then Z detection rounds, each generating
  modules from the indicator (lines 3-5) and continuing training (lines 6-7) with the method given by name through
  :func:`mtlkit.methods.build_method` — ``"mgda"`` for MAMO (KKT Eq. 14 over the all-shared *and* GMK parameters,
  which is what :meth:`MAMO.shared_parameters` hands the engine), ``"ew"`` for the w/o-MO ablation (linear
  scalarisation, Eq. 3), ``"pcgrad"``/``"cagrad"`` for MAMO+PCGrad / MAMO+CAGrad (Sec. 4.4.3). The w/o-GMK
  ablation is the same procedure on ``MAMO(..., module="conal")`` (CoNAL-faithful task branches; with ``"ew"`` it is
  the CoNAL baseline's architecture under linear scalarisation).

**Who gets which gradient** (the KKT conditions of Eq. 14): the aggregator combines the per-task gradients of
:meth:`MAMO.shared_parameters` only (all-shared and GMK parameters, condition 1); every parameter that one task alone
uses (its decoder, its fusion logits, its exclusive/CoNAL modules: condition 2, ``∇_{θ^t} L^t = 0``) receives that
task's full gradient, never an MGDA weight ``a^t`` of it nor a PCGrad projection. For a model whose modules belong to
single tasks the engine is called without a ``representation`` (:func:`engine_backward`): those modules lie below
:meth:`MAMO.encode`'s output, where the representation path would give them no gradient; without it the engine walks
the whole graph and gives every non-shared parameter its own task's gradient. (Representation-level methods cannot
do that and are refused for those module kinds.)

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
4. **Pre-training** (Alg. 1 line 1 names no method), option ``pretrain_method``: by default (None) the rounds'
   method (MGDA for MAMO, so the model after 0 detections is HPS+MGDA); ``"ew"`` pre-trains plain HPS (equal
   weights), which makes the "0 detections = HPS" point of Fig. 4 plain HPS. ``pretrain_epochs`` epochs; each round
   trains ``epochs_per_round`` epochs. New modules' parameters are added to the running Adam as a new parameter group
   (the other parameters keep their moments).
5. **Model selection**: within each phase, the epoch with the best validation score (mean primary metric, as the
   Trainer) is kept and the next round grows from it (``selection="best_val"``); ``"last"`` keeps the last epoch.
   Rolling back restores the model's parameters and BatchNorm statistics; option ``restore_optimizer`` (default
   False: Adam keeps the moments and step counts of the last epoch) also restores Adam's state of the selected
   epoch. The weighting's own state (e.g. a loss history) is never rolled back.

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
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

import torch
from torch import Tensor

from mtlkit.autodiff import backward, per_task_grads, split_flat
from mtlkit.data import MTLData
from mtlkit.errors import ConfigError, NonFiniteLossError
from mtlkit.methods import build_method
from mtlkit.metrics import selection_score
from mtlkit.models.mamo import MAMO
from mtlkit.tasks import stack_losses, task_names
from mtlkit.runs import seed_everything
from mtlkit.train import evaluate
from mtlkit.weighting import StepContext

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

    def __init__(self, num_layers: int, num_tasks: int, threshold: Threshold = "average", k: int = 1,
                 scope: Scope = "all_layers"):
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
        for i, j in zip(*torch.triu_indices(indicator.shape[1], indicator.shape[2], offset=1).tolist()):
            if int(indicator[layer, i, j]):
                out.append((layer, i, j))
    return out


def layer_gradients(model: MAMO, jacobian: Tensor) -> list[Tensor]:
    """Cut the engine's T x K Jacobian over ``model.shared_parameters()`` into one T x P_ℓ block per shared layer."""
    params = model.shared_parameters()
    pieces = split_flat(jacobian, params)
    where = {id(p): k for k, p in enumerate(params)}
    return [torch.cat([pieces[where[id(p)]].reshape(jacobian.shape[0], -1) for p in model.layer_parameters(layer)],
                      dim=1) for layer in range(model.num_layers)]


# ---------------------------------------------------------------------------------------------------------------
# Algorithm 1
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class MAMOConfig:
    """Budget and options of :func:`learn_mamo` (see the module docstring for the choices).

    Attributes:
        method: method name for :func:`mtlkit.methods.build_method` (``mgda`` = MAMO, ``ew`` = w/o MO, ...).
        method_options: options of that method.
        rounds: Z, the number of conflict detections.
        pretrain_epochs / epochs_per_round: epochs before the first detection / after each detection.
        threshold, k, scope: the indicator (Eq. 13 or TopK) and its scope.
        conflict_window: ``"last_batches"`` (Q over the last ``detect_batches`` mini-batches before each detection)
            or ``"phase"`` (over every mini-batch of the phase); choice 2.
        detect_batches: mini-batches accumulated in Q before each detection (``"last_batches"``, and phases of 0
            epochs).
        pretrain_method / pretrain_method_options: the method of Alg. 1 line 1 (None: ``method`` and its options;
            ``"ew"``: plain HPS); choice 4.
        selection / restore_optimizer: which epoch of each phase is kept, and whether Adam's state is rolled back
            with it; choice 5.
    """

    method: str = "mgda"
    method_options: dict[str, Any] = field(default_factory=dict)
    rounds: int = 3
    pretrain_epochs: int = 2
    epochs_per_round: int = 1
    threshold: Threshold = "average"
    k: int = 1
    scope: Scope = "all_layers"
    conflict_window: Literal["last_batches", "phase"] = "last_batches"
    detect_batches: int = 20
    pretrain_method: str | None = None
    pretrain_method_options: dict[str, Any] | None = None
    restore_optimizer: bool = False
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.0
    seed: int = 0
    selection: Literal["best_val", "last"] = "best_val"
    device: str = "cpu"
    eval_batch_size: int = 1024
    verbose: bool = False

    def validate(self) -> None:
        if self.rounds < 0 or self.pretrain_epochs < 0 or self.epochs_per_round < 0:
            raise ConfigError("rounds, pretrain_epochs and epochs_per_round must be >= 0")
        if self.detect_batches < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ConfigError("detect_batches and batch_size must be >= 1 and lr > 0")
        if self.selection not in ("best_val", "last"):
            raise ConfigError(f"unknown selection {self.selection!r}; valid: best_val, last")
        if self.conflict_window not in ("last_batches", "phase"):
            raise ConfigError(f"unknown conflict_window {self.conflict_window!r}; valid: last_batches, phase")


@dataclass
class RoundRecord:
    """One phase of Alg. 1: round 0 is pre-training (the HPS model)."""

    round: int
    activated: list[tuple[int, tuple[str, ...]]]
    parameters: int
    val: dict[str, float]
    test: dict[str, float]
    seconds: float
    Q: list | None = None  # the accumulated conflicts (Eq. 11) this round's modules were generated from
    method: str = ""  # the method this phase trained with (round 0: the pre-training method)
    q_batches: int = 0  # the mini-batches Q was accumulated over


@dataclass
class MAMOResult:
    model: MAMO
    rounds: list[RoundRecord]
    seconds: float

    @property
    def test(self) -> dict[str, float]:
        return self.rounds[-1].test

    @property
    def val(self) -> dict[str, float]:
        return self.rounds[-1].val


def learn_mamo(model: MAMO, data: MTLData, cfg: MAMOConfig | None = None) -> MAMOResult:
    """Algorithm 1: pre-train, then ``cfg.rounds`` times detect conflicts, grow modules and keep training.

    The per-step update is :func:`engine_backward`: the method's weighting and aggregator over
    ``model.shared_parameters()`` (all-shared + GMK parameters, Eq. 14); decoders, fusion logits and modules owned
    by one task get their own task's gradient. Returns the grown model (selected as ``cfg.selection`` says) and one
    :class:`RoundRecord` per phase (val/test metrics, activated modules, size).

    Example:
        >>> MAMOConfig(rounds=2).rounds
        2
    """
    cfg = cfg or MAMOConfig()
    cfg.validate()
    if [t.name for t in data.tasks] != model.task_names:
        raise ConfigError(f"the model's tasks {model.task_names} differ from the data's {task_names(data.tasks)}")
    seed_everything(cfg.seed)
    device = torch.device(cfg.device)
    model.to(device)
    method = build_method(cfg.method, **cfg.method_options)
    same = cfg.pretrain_method is None or (cfg.pretrain_method == cfg.method and (
        cfg.pretrain_method_options is None or cfg.pretrain_method_options == cfg.method_options))
    pre_method = method if same else build_method(
        cfg.pretrain_method, **(cfg.pretrain_method_options or {}))  # type: ignore[arg-type]
    pre_name = cfg.method if same else str(cfg.pretrain_method)
    for m in {id(method): method, id(pre_method): pre_method}.values():
        if m.level == "representation" and model.module_kind != "gmk":
            raise ConfigError(f"a representation-level method cannot give {model.module_kind!r} modules their task's "
                              "gradient (they lie below the representation): use parameter level")
        m.weighting.setup(len(data.tasks))
        m.weighting.to(device)
    groups = [{"params": list(model.parameters())}]
    extra = [p for m in {id(method): method, id(pre_method): pre_method}.values()
             for p in m.weighting.parameters() if p.requires_grad]
    if extra:
        groups.append({"params": extra, "weight_decay": 0.0})
    opt = torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    detector = ConflictDetector(model.num_layers, len(data.tasks), cfg.threshold, cfg.k, cfg.scope)
    names = model.task_names
    n = len(data.train)
    steps = (n + cfg.batch_size - 1) // cfg.batch_size
    t_all = time.time()
    epoch = 0
    records: list[RoundRecord] = []

    def phase(meth, n_epochs: int, detect: bool) -> float:
        nonlocal epoch
        best_score, best_state, best_opt = -float("inf"), None, None
        t0 = time.time()
        for e in range(n_epochs):
            model.train()
            gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
            perm = torch.randperm(n, generator=gen)
            last_epoch = e == n_epochs - 1
            loss_sum = torch.zeros(len(names))
            for b in range(steps):
                idx = perm[b * cfg.batch_size:(b + 1) * cfg.batch_size]
                x = data.train.x[idx].to(device)
                ys = {k: v[idx].to(device) for k, v in data.train.y.items()}
                want = detect and (cfg.conflict_window == "phase" or (last_epoch and b >= steps - cfg.detect_batches))
                loss_sum += _step(model, meth, opt, x, ys, data, StepContext(
                    step=epoch * steps + b, epoch=epoch, shared_params=model.shared_parameters(),
                    last_shared_layer=model.last_shared_layer(), task_names=names), detector if want else None)
            meth.weighting.on_epoch_end((loss_sum / steps).to(device))
            val = evaluate(model, data.val, data.tasks, cfg.eval_batch_size, device)
            score = selection_score(data.tasks, val)
            if cfg.verbose:
                print(f"[mamo] epoch {epoch + 1} val {score:.4f} modules {len(model.active)}", file=sys.stderr)
            if cfg.selection == "best_val" and score > best_score:
                best_score, best_state = score, copy.deepcopy(model.state_dict())
                if cfg.restore_optimizer:
                    best_opt = copy.deepcopy(opt.state_dict())
            epoch += 1
        if best_state is not None:
            model.load_state_dict(best_state)
        if best_opt is not None:
            opt.load_state_dict(best_opt)
        return time.time() - t0

    def record(r: int, activated: list, seconds: float, Q: list | None, name: str) -> None:
        val = evaluate(model, data.val, data.tasks, cfg.eval_batch_size, device)
        test = evaluate(model, data.test, data.tasks, cfg.eval_batch_size, device)
        records.append(RoundRecord(r, activated, model.num_parameters(), val, test, seconds, Q, name))

    detector.reset()
    secs = phase(pre_method, cfg.pretrain_epochs, detect=cfg.rounds > 0)
    if cfg.pretrain_epochs == 0 and cfg.rounds > 0:
        _detect_only(model, data, detector, cfg, device)
    record(0, [], secs, None, pre_name)
    for r in range(1, cfg.rounds + 1):
        ind = detector.indicator()
        used_q, q_batches = detector.Q.tolist(), detector.batches
        before = len(model.active)
        new_keys: list[str] = []
        for layer, i, j in conflicts(ind):
            new_keys += model.grow(layer, (i, j))
        activated = model.architecture()[before:]
        new_params = [p for k in new_keys for p in model.gmks[k].parameters()]
        if new_params:
            opt.add_param_group({"params": new_params})
        detector.reset()
        secs = phase(method, cfg.epochs_per_round, detect=r < cfg.rounds)
        if cfg.epochs_per_round == 0 and r < cfg.rounds:
            _detect_only(model, data, detector, cfg, device)
        record(r, activated, secs, used_q, cfg.method)
        records[-1].q_batches = q_batches
    return MAMOResult(model, records, time.time() - t_all)


def _step(model: MAMO, method, opt: torch.optim.Optimizer, x: Tensor, ys: dict[str, Tensor], data: MTLData,
          ctx: StepContext, detector: ConflictDetector | None) -> Tensor:
    """One update (the Trainer's step, for a model whose architecture changes) plus Eq. 11's accumulation."""
    agg = method.aggregator
    z = model.encode(x)
    out = model.decode(z)
    losses = stack_losses(data.tasks, out, ys)
    if not bool(torch.isfinite(losses.detach()).all()):
        raise NonFiniteLossError(f"non-finite MAMO loss at step {ctx.step}: {losses.detach().tolist()}; lower the lr")
    weighted = method.weighting(losses, ctx)
    opt.zero_grad(set_to_none=True)
    use_engine_jacobian = agg.needs_per_task_grads and method.level == "parameter"
    if detector is not None and not use_engine_jacobian:
        params = [p for layer in range(model.num_layers) for p in model.layer_parameters(layer)]
        J = per_task_grads(losses, params, retain_graph=True)
        sizes = [sum(p.numel() for p in model.layer_parameters(layer)) for layer in range(model.num_layers)]
        detector.update(list(torch.split(J, sizes, dim=1)))
    info = engine_backward(model, method, weighted, z, keep_jacobian=detector is not None and use_engine_jacobian)
    if detector is not None and use_engine_jacobian:
        detector.update(layer_gradients(model, info.jacobian))
    opt.step()
    if method.weighting.needs_loss_after_step:
        with torch.no_grad():
            method.weighting.after_step(stack_losses(data.tasks, model(x), ys))
    return losses.detach().cpu()


def engine_backward(model: MAMO, method, weighted: Tensor, z: Tensor, keep_jacobian: bool = False):
    """The engine call of one MAMO step: writes ``.grad`` of every parameter (see "Who gets which gradient").

    ``weighted`` are the weighted per-task losses computed from ``z = model.encode(x)``. The aggregator combines
    the per-task gradients of ``model.shared_parameters()``; every other parameter gets the gradient of its own task.
    The representation ``z`` is handed to the engine only when no module belongs to a single task.

    Example:
        >>> from torch import nn
        >>> from mtlkit.models.mamo import MAMO
        >>> from mtlkit.methods import build_method
        >>> m = MAMO([nn.Linear(3, 4), nn.Linear(4, 4)], {"a": nn.Linear(4, 1), "b": nn.Linear(4, 1)}, "conal")
        >>> m.grow(1, ("a", "b"))
        ['l1__a', 'l1__b']
        >>> z = m.encode(torch.randn(5, 3)); out = m.decode(z)
        >>> losses = torch.stack([out["a"].pow(2).mean(), out["b"].pow(2).mean()])
        >>> _ = engine_backward(m, build_method("mgda"), losses, z)
        >>> m.gmks["l1__a"].weight.grad.shape, float(m.layers[1].weight.grad.abs().sum())  # layer 1: no one's now
        (torch.Size([4, 4]), 0.0)
    """
    agg = method.aggregator
    rep = z if agg.needs_per_task_grads and not model.has_task_modules() else None
    return backward(weighted, model.shared_parameters(), agg, representation=rep, level=method.level,
                    keep_jacobian=keep_jacobian)


def _detect_only(model: MAMO, data: MTLData, detector: ConflictDetector, cfg: MAMOConfig,
                 device: torch.device) -> None:
    """Accumulate Q on ``detect_batches`` mini-batches without updating anything (phases of zero epochs)."""
    gen = torch.Generator().manual_seed(cfg.seed * 7_919 + len(model.active))
    perm = torch.randperm(len(data.train), generator=gen)
    state = copy.deepcopy(model.state_dict())  # BatchNorm statistics must not move
    model.train()
    for b in range(cfg.detect_batches):
        idx = perm[b * cfg.batch_size:(b + 1) * cfg.batch_size]
        if idx.numel() == 0:
            break
        losses = stack_losses(data.tasks, model(data.train.x[idx].to(device)),
                              {k: v[idx].to(device) for k, v in data.train.y.items()})
        params = [p for layer in range(model.num_layers) for p in model.layer_parameters(layer)]
        J = per_task_grads(losses, params, retain_graph=False)
        sizes = [sum(p.numel() for p in model.layer_parameters(layer)) for layer in range(model.num_layers)]
        detector.update(list(torch.split(J, sizes, dim=1)))
    model.load_state_dict(state)


def summarize_rounds(result: MAMOResult) -> list[dict[str, Any]]:
    """Rows for Table 3: per round, modules activated, total modules, size."""
    rows, total = [], 0
    for rec in result.rounds[1:]:
        total += len(rec.activated)
        rows.append({"round": rec.round, "activated": len(rec.activated), "total": total,
                     "parameters": rec.parameters, "where": rec.activated})
    return rows


__all__ = ["ConflictDetector", "MAMOConfig", "MAMOResult", "RoundRecord", "average_indicator", "conflicts",
           "cosine_matrix", "engine_backward", "layer_gradients", "learn_mamo", "proxy_indicator", "summarize_rounds",
           "topk_indicator"]
