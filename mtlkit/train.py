"""The training loop: one loop for every method; it never tests a method's name.

A method declares what it needs (:class:`~mtlkit.methods.Method`): per-task gradients (``aggregator.
needs_per_task_grads``), the level of aggregation, losses after the step (``weighting.needs_loss_after_step``),
epoch-level hooks, one model per task (``single_task``).

Precision (``train.precision``): ``bf16`` and ``fp16`` run the training forward pass and the losses under
``torch.autocast``; ``fp16`` adds a ``torch.amp.GradScaler`` (:attr:`Trainer.scaler`): the weighted losses are
multiplied by its scale S *after* the weighting (loss-space methods see the unscaled losses), the engine divides the
per-task gradients by S before the aggregator sees them (``backward(..., loss_scale=S)``), ``scaler.unscale_``
divides every gradient before the callbacks' ``on_backward`` and the step, and a step whose gradients overflowed is
skipped (S lowered) instead of raising; a non-finite *loss* is still an error.

Run directory layout: ``config.yaml`` (resolved config), ``metrics.jsonl`` and ``metrics.csv`` (one row per epoch),
``monitor.jsonl`` (one row every ``train.log_every`` steps: losses, weights, gradient norms and cosines;
:mod:`mtlkit.monitor`), ``tb/`` (TensorBoard; ``tb/monitor``: the monitor's per-step events), ``checkpoint.pt`` (model, optimizer, scheduler, method state, fp16's loss scaler, RNG states, history, the selected
model; written at every epoch end and, inside a long epoch, every ``train.checkpoint_minutes``; ``--resume``
continues from it, inside the epoch where it was written, and reaches the same weights bit for bit as a run that was
never stopped), ``best.pt`` (model selected on the validation split), ``results.json`` (test metrics of the selected
model).

Epochs are numbered from 1 wherever a user reads them (metrics rows, results.json's ``best_epoch``,
:attr:`RunResult.best_epoch`, messages, TensorBoard steps); only the checkpoint's internal ``epoch`` (the index of the
last finished epoch, -1: none) counts from 0.

Run-directory safety (:mod:`mtlkit.runs`): a run holds the directory's exclusive lock while it writes; every file is
replaced atomically; ``checkpoint.pt`` is the commit point of an epoch: it is written first, and ``best.pt``,
``config.yaml`` and the metrics logs are derived from it afterwards (re-derived on resume), so a run stopped at any
moment, even by a failed write, resumes with each epoch logged once and a ``config.yaml`` that matches its weights.

Example:
    >>> from mtlkit.config import RunConfig, check_precision
    >>> cfg = RunConfig.from_dict({"train": {"epochs": 1}})
    >>> Trainer  # doctest: +ELLIPSIS
    <class 'mtlkit.train.Trainer'>
"""

from __future__ import annotations

import contextlib
import copy
import csv
import io
import json
import logging
import math
import sys
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml
from torch import Tensor, nn

from mtlkit import models, runs
from mtlkit.callbacks import Callback, StepInfo
from mtlkit.config import RunConfig, check_precision
from mtlkit.data import MTLData, Split, build_dataset
from mtlkit.data.loading import GlobalBatchSampler, make_batch_source
from mtlkit.devices import resolve_device
from mtlkit.distributed import DataParallel, average_buffers_, global_losses, global_value
from mtlkit.engine.autodiff import BackwardInfo, backward
from mtlkit.errors import ConfigError, MTLKitError, NonFiniteLossError, unknown_name
from mtlkit.evaluation import evaluate, load_selected
from mtlkit.evaluation import predict as predict  # re-exported: mtlkit.train.predict, where it was defined before
from mtlkit.methods import Method, build_method
from mtlkit.metrics import selection_score
from mtlkit.models import MTLModel
from mtlkit.models.base import check_auxiliary_loss
from mtlkit.monitor import Monitor
from mtlkit.tasks import Task, masked_losses, task_names
from mtlkit.weighting import StepContext

if TYPE_CHECKING:
    from tqdm import tqdm


log = logging.getLogger("mtlkit")
MARKER = runs.MARKER
#: Config keys that change what is logged, never what is learned: a resume may change them.
MONITOR_KEYS = {"train.log_every", "train.monitor_gradients"}
CHECKPOINT_FORMAT = 2  # 2: history rows number epochs from 1 and the checkpoint holds the selected model


def task_instance_counts(tasks: list[Task], split: Split) -> list[int]:
    """Training instances per task: positives for binary tasks (MTMLAN's n_j), all samples otherwise; only the
    labelled ones where the split has a label mask."""
    out = []
    masks = getattr(split, "mask", None) or {}
    for t in tasks:
        y = split.y.get(t.name)
        m = masks.get(t.target_key)
        if t.kind == "binary" and y is not None:
            out.append(int((y[m] if m is not None else y).gt(0.5).sum()))
        else:
            out.append(int(m.sum()) if m is not None else len(split))
    return out


def build_for(cfg: RunConfig, data: MTLData, method: Method) -> MTLModel:
    """The model of ``cfg`` for ``data``; for single-task methods, one such model per task."""
    return models.build_for(cfg.model.name, data, cfg.model.options, single_task=method.single_task)


def _optimizer(cfg: RunConfig, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    tc = cfg.train
    if tc.lr <= 0:
        raise ConfigError(f"train.lr must be > 0, got {tc.lr}")
    makers = {
        "adam": lambda: torch.optim.Adam(groups, lr=tc.lr, weight_decay=tc.weight_decay),
        "adamw": lambda: torch.optim.AdamW(groups, lr=tc.lr, weight_decay=tc.weight_decay),
        "sgd": lambda: torch.optim.SGD(groups, lr=tc.lr, momentum=tc.momentum, weight_decay=tc.weight_decay),
    }
    if tc.optimizer not in makers:
        raise unknown_name("optimizer", tc.optimizer, list(makers))
    return makers[tc.optimizer]()


def _scheduler(cfg: RunConfig, opt: torch.optim.Optimizer):
    tc = cfg.train
    makers = {
        "none": lambda: torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 1.0),
        "step": lambda: torch.optim.lr_scheduler.StepLR(opt, step_size=tc.step_size, gamma=tc.gamma),
        "cosine": lambda: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, tc.epochs)),
        # stepped with a validation value after each epoch (Trainer._step_scheduler); a scalar min_lr also covers
        # parameter groups added later (Trainer.add_parameters)
        "plateau": lambda: torch.optim.lr_scheduler.ReduceLROnPlateau(
            opt, mode="min", factor=tc.plateau_factor, patience=tc.plateau_patience, min_lr=tc.min_lr
        ),
    }
    if tc.scheduler not in makers:
        raise unknown_name("scheduler", tc.scheduler, list(makers))
    if tc.scheduler == "plateau":
        if not 0.0 < tc.plateau_factor < 1.0:
            raise ConfigError(f"train.plateau_factor must be in (0, 1), got {tc.plateau_factor}")
        if isinstance(tc.plateau_patience, bool) or not isinstance(tc.plateau_patience, int) or tc.plateau_patience < 0:
            raise ConfigError(f"train.plateau_patience must be an integer >= 0, got {tc.plateau_patience!r}")
        if not 0.0 <= tc.min_lr <= tc.lr:
            raise ConfigError(f"train.min_lr must be in [0, train.lr = {tc.lr}], got {tc.min_lr}")
        if tc.plateau_metric not in PLATEAU_METRICS:
            raise unknown_name("plateau metric", tc.plateau_metric, list(PLATEAU_METRICS))
    return makers[tc.scheduler]()


#: What ``train.scheduler: plateau`` watches (``train.plateau_metric``), lower is better.
PLATEAU_METRICS = ("score", "delta_m_reference")


def default_run_dir(cfg: RunConfig) -> Path:
    return Path("runs") / f"{cfg.dataset.name}-{cfg.method.name}-s{cfg.train.seed}"


def prepare_run_dir(path: Path, overwrite: bool, resume: bool) -> runs.RunLock:
    """Create the run directory and lock it (:func:`mtlkit.runs.open_run_dir`); returns the held lock."""
    lock = runs.open_run_dir(path, overwrite=overwrite, resume=resume)
    if lock is None:  # open_run_dir returns no lock only with check_only=True
        raise RuntimeError(f"open_run_dir returned no lock for {path}")
    return lock


@dataclass
class RunResult:
    """What :meth:`Trainer.fit` returns."""

    run_dir: Path
    test: dict[str, float]
    val: dict[str, float]
    best_epoch: int | dict[str, int]  # from 1 (per task for one-model-per-task methods)
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0


class Trainer:
    """Trains ``cfg.model`` on ``cfg.dataset`` with ``cfg.method``; see the module docstring.

    Args:
        cfg: the run configuration.
        data: an already built dataset (else built from ``cfg.dataset``).
        run_dir: where to write (default ``runs/<dataset>-<method>-s<seed>``).
        callbacks: extra :class:`~mtlkit.callbacks.Callback` s (before the model's and the method's own).
        parallel: this process's data-parallel ranks (:mod:`mtlkit.distributed`); default: those torchrun started
            (``DataParallel.from_env``), or one process.

    Attributes:
        scaler: the ``torch.amp.GradScaler`` of ``train.precision=fp16`` (disabled otherwise); its state is in the
            checkpoint. Replace it before :meth:`fit` to use other scaler settings (a resume restores the saved ones).
    """

    def __init__(
        self,
        cfg: RunConfig,
        data: MTLData | None = None,
        run_dir: str | Path | None = None,
        callbacks: Sequence[Callback] = (),
        parallel: DataParallel | None = None,
    ):
        self.cfg = cfg
        tc = cfg.train
        if tc.epochs < 1 or tc.batch_size < 1:
            raise ConfigError(f"train.epochs and train.batch_size must be >= 1 (got {tc.epochs}, {tc.batch_size})")
        if not (math.isfinite(tc.checkpoint_minutes) and tc.checkpoint_minutes >= 0):
            raise ConfigError(
                f"train.checkpoint_minutes must be a finite number >= 0 (0: only at epoch ends), got "
                f"{tc.checkpoint_minutes}"
            )
        check_precision(tc.precision)
        self.dp = parallel if parallel is not None else DataParallel.from_env(tc.device)
        self.device = resolve_device(tc.device)
        if self.dp.active and self.device.type == "cuda":  # one GPU per rank
            self.device = torch.device("cuda", self.dp.local_rank)
        # cfg.method.level and .scale are not checked when the config loads: build_method checks them (ConfigError)
        self.method = build_method(
            cfg.method.name,
            level=cfg.method.level,
            scale=cfg.method.scale,
            **cfg.method.options,
        )
        self.data = data if data is not None else build_dataset(cfg.dataset.name, **cfg.dataset.options)
        self.tasks = self.data.tasks
        self.names = task_names(self.tasks)
        self.run_dir = Path(run_dir or cfg.output.dir or default_run_dir(cfg))
        # Seeded for the model's initialisation; the caller's random state is given back afterwards (constructing
        # a trainer changes nothing global) and training starts from the state the construction left (fit).
        caller_rng = runs.rng_state()
        try:
            runs.seed_everything(tc.seed)
            self._build(cfg, callbacks)
            self._start_rng = runs.rng_state()
        finally:
            runs.set_rng_state(caller_rng)

    def _build(self, cfg: RunConfig, callbacks: Sequence[Callback]) -> None:
        """The model, the method's set-up, the optimizer, the scheduler and the callbacks (seeded by __init__)."""
        tc = cfg.train
        self.model = build_for(cfg, self.data, self.method)
        if tc.sync_batchnorm:
            if self.device.type != "cuda":
                raise ConfigError(
                    "train.sync_batchnorm needs CUDA (torch's SyncBatchNorm has no CPU kernel); on CPU, plain "
                    "BatchNorm normalises each rank's share of the batch with its own statistics"
                )
            self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        self.model = self.model.to(self.device)
        # Extra training-only tasks a model may declare (e.g. RRMTDL's adversarial heads): trained, never selected
        # on or reported (Task.auxiliary).
        self.train_tasks = self.tasks + _auxiliary_tasks(self.model)
        self.train_names = task_names(self.train_tasks)
        self._set_up_method(self.method)
        n_equal = self.method.weighting.equal_weight_epochs
        if tc.epochs <= n_equal:
            warnings.warn(
                f"method {cfg.method.name!r} keeps every task weight at 1 for its first {n_equal} epochs: "
                f"with train.epochs={tc.epochs} it trains exactly as EW",
                UserWarning,
                stacklevel=3,
            )
        groups: list[dict[str, Any]] = [{"params": list(self.model.parameters())}]
        extra = [p for p in self.method.weighting.parameters() if p.requires_grad]
        if extra:
            groups.append({"params": extra, "weight_decay": 0.0})
        self.optimizer = _optimizer(cfg, groups)
        self.scheduler = _scheduler(cfg, self.optimizer)
        # fp16's loss scale (disabled, a no-op, for other precisions). Meant for CUDA; torch's CPU scaler makes it
        # testable on CPU.
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=tc.precision == "fp16")
        # The config's callbacks first, then the model's own (e.g. MAMO's architecture search), then the method's
        # (MoDo's sampler; one the caller passed already is not added twice), then the monitor (an observer: it
        # reads what the others left).
        monitor = (
            [Monitor(tc.log_every, gradients=tc.monitor_gradients, tensorboard=cfg.output.tensorboard)]
            if tc.log_every
            else []
        )
        given = {cb.key() for cb in callbacks}
        own = [cb for cb in self.method.callbacks() if cb.key() not in given]
        self.callbacks: list[Callback] = [*callbacks, *self.model.callbacks(), *own, *monitor]
        keys = [cb.key() for cb in self.callbacks]
        if len(set(keys)) != len(keys):
            raise ConfigError(f"two callbacks of this run have the same name ({keys}); give each its own `name`")
        self.model_changed()
        for cb in self.callbacks:  # configuration errors now, before a run directory is touched
            cb.check(self)
        # The sampler's own checks (under data parallelism every rank needs a sample of every global batch), here so
        # that they come before a run directory is touched; fit draws the batches from the same sampler's rule.
        self._steps_per_epoch = GlobalBatchSampler(
            len(self.data.train), tc.batch_size, tc.seed, self.dp.rank, self.dp.world_size
        ).num_batches
        #: Optimizer steps already trained when :meth:`fit` started (0, or where a resume continues from).
        self.start_step = 0
        self._committed: str | None = None  # what checkpoint.pt holds, for messages ("the end of epoch 2")
        self._best_state: Any = None  # the selected model (per task for one-model-per-task methods)
        self._unfinished_results = False  # a finished run resumed to train further: its results.json goes
        self._last_losses: Tensor | None = None  # partial labels: each task's last loss where it had labels

    # -- services for callbacks (mtlkit.callbacks) ---------------------------------------------------------------
    def reduce(self, t: Tensor) -> Tensor:
        """The global batch's value of a gradient computed from this step's losses on this rank's share: the
        all-reduce mean over data-parallel ranks (:mod:`mtlkit.distributed`); ``t`` itself in one process. Every
        rank must call it at the same point (a collective)."""
        return self.dp.mean(t) if self.dp.active else t

    def model_changed(self) -> None:
        """Read again what the loop derives from the model (shared parameters, the layers methods measure, whether
        the engine may use the representation); call after changing the model's structure."""
        m = self.model
        self._shared = m.shared_parameters()
        self._last_layer = m.last_shared_layer()
        self._task_layers = m.task_first_layers()
        self._selection_groups = m.selection_groups()
        self._use_rep = self.method.aggregator.needs_per_task_grads and m.representation_is_shared_path()
        if self.method.level == "representation" and not m.representation_is_shared_path():
            raise ConfigError(
                f"model {self.cfg.model.name!r} has task-owned parameters below its representation, "
                f"which representation-level aggregation would give no gradient: use parameter level "
                f"(method {self.method.name!r} is set to representation level)"
            )

    def add_parameters(self, params: Sequence[nn.Parameter]) -> None:
        """Add ``params`` (e.g. modules a callback grew) to the optimizer as a new parameter group, at the current
        learning rate and following the learning-rate schedule from now on; then :meth:`model_changed`."""
        self._add_group({"params": list(params)})
        self.model_changed()

    def _add_group(self, group: dict[str, Any]) -> None:
        """A new optimizer parameter group at the current learning rate, which the schedule follows from now on."""
        if not group["params"]:
            return
        group = {
            **group,
            "lr": self.optimizer.param_groups[0]["lr"],
            "initial_lr": self.optimizer.param_groups[0].get("initial_lr", self.cfg.train.lr),
        }
        self.optimizer.add_param_group(group)
        sched = self.scheduler
        if hasattr(sched, "base_lrs"):  # ReduceLROnPlateau has none (its scalar min_lr covers the new group)
            sched.base_lrs.append(group["initial_lr"])
        if hasattr(sched, "lr_lambdas"):
            sched.lr_lambdas.append(sched.lr_lambdas[0])
        sched._last_lr = [g["lr"] for g in self.optimizer.param_groups]  # what get_last_lr() reports

    def selected_state(self) -> Any:
        """The model state selected on validation since the run (or the last :meth:`restart_selection`) began:
        ``model.state_dict()`` on the CPU (for models with selection groups, one state per group); None before
        the first epoch."""
        return self._best_state

    def selected_epoch(self) -> int | dict[str, int] | None:
        """The epoch (from 0) of :meth:`selected_state` (per group for models with selection groups); None before
        the first selection."""
        if self._selection_groups:
            return dict(self._best["member_epoch"]) or None
        return None if self._best["epoch"] < 0 else int(self._best["epoch"])

    def restart_selection(self) -> None:
        """Forget the selection so far: the next epochs alone compete (the final model is selected among them)."""
        self._best["score"], self._best["epoch"] = -float("inf"), -1
        self._best["member_score"], self._best["member_epoch"] = {}, {}
        self._best_state = None

    def replace_method(self, method: Method) -> None:
        """Train with ``method`` from the next step on (its learnable weighting parameters join the optimizer)."""
        self._set_up_method(method)
        self.method = method
        self._add_group({"params": [p for p in method.weighting.parameters() if p.requires_grad], "weight_decay": 0.0})
        self.model_changed()

    def _set_up_method(self, method: Method) -> None:
        method.weighting.setup(len(self.train_tasks))
        if method.weighting.needs_task_counts:
            method.weighting.set_counts(task_instance_counts(self.train_tasks, self.data.train))
        method.weighting.to(self.device)

    # -- checkpoints -------------------------------------------------------------------------------------------
    def _checkpoint(
        self,
        epoch: int,
        best: dict[str, Any],
        history: list[dict[str, float]],
        seconds: float,
        in_epoch: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Everything a resume needs. ``epoch``: the index of the last finished epoch (-1: none); ``in_epoch``: where
        the next one stands when saved inside it (batches done, their summed losses, its seconds so far);
        ``seconds``: the training time so far; ``best_state``: the selected model (best.pt is derived from it)."""
        return {
            "format": CHECKPOINT_FORMAT,
            "epoch": epoch,
            "in_epoch": in_epoch,
            "train_seconds": seconds,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "method": self.method.state_dict(),
            "rng": runs.rng_state(),
            "best": best,
            "best_state": self._best_state,
            "history": history,
            "config": self.cfg.to_dict(),
            "callbacks": {cb.key(): cb.state_dict() for cb in self.callbacks},
            "last_losses": self._last_losses,
            "scaler": self.scaler.state_dict(),  # {} unless fp16
            "observers": [cb.key() for cb in self.callbacks if cb.observer],
        }

    def _check_finite_parameters(self, where: str) -> None:
        """Never save a diverged model: a finite loss can still have produced an overflowing update."""
        params = list(self.model.parameters()) + list(self.method.weighting.parameters())
        bad = [n for n, p in self.model.named_parameters() if not bool(torch.isfinite(p).all())]
        if bad or not all(bool(torch.isfinite(p).all()) for p in params):
            raise NonFiniteLossError(
                f"training diverged {where}: parameters became NaN or infinite "
                f"({', '.join(bad[:3]) or 'the method state'}{', ...' if len(bad) > 3 else ''})"
                f"; {self._lr_hint()}"
            )

    def _lr_hint(self) -> str:
        lr = self.cfg.train.lr
        return f"lower the learning rate (train.lr is {lr:g}; try --lr {lr / 10:g}) or check the data"

    def _commit(
        self,
        epoch: int,
        best: dict[str, Any],
        history: list[dict[str, float]],
        seconds: float,
        in_epoch: dict[str, Any] | None = None,
        where: str = "",
    ) -> None:
        """Write checkpoint.pt (the commit point), then the files derived from it."""
        self._check_finite_parameters(where)
        done = {"epoch": epoch + 1, "batch": in_epoch["batch"] if in_epoch else None}
        if self.dp.is_main:  # every rank holds the same state: rank 0 writes it
            runs.save_checkpoint(
                self._checkpoint(epoch, best, history, seconds, in_epoch), self.run_dir / "checkpoint.pt", meta=done
            )
        self._committed = (
            f"batch {in_epoch['batch']} of epoch {epoch + 2}" if in_epoch else f"the end of epoch {epoch + 1}"
        )
        self._train_seconds = seconds  # what results.json reports: the training time the checkpoint holds
        self._derive(best, history)
        for cb in self.callbacks:
            cb.on_checkpoint(self)

    def _derive(self, best: dict[str, Any], history: list[dict[str, float]]) -> None:
        """best.pt, config.yaml and the metrics logs as the last checkpoint says (each written only if it
        changes); a finished run's results.json goes once the run trains past it. Rank 0 only."""
        if not self.dp.is_main:
            return
        if self._unfinished_results:
            (self.run_dir / "results.json").unlink(missing_ok=True)
            self._unfinished_results = False
        self._write_config()
        selected = _best_epochs(best, bool(self._selection_groups))
        if self._best_state is not None and runs.checkpoint_meta(self.run_dir / "best.pt") != {"best_epoch": selected}:
            runs.save_checkpoint(self._best_state, self.run_dir / "best.pt", meta={"best_epoch": selected})
        if history:
            runs.write_if_changed(self.run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in history))
            runs.write_if_changed(self.run_dir / "metrics.csv", _csv(history))

    def _write_config(self) -> None:
        """config.yaml from ``cfg``, unless it already says the same (a run directory that was moved or copied
        keeps its file: only ``output.dir`` would differ)."""
        path, new = self.run_dir / "config.yaml", self.cfg.to_dict()
        try:
            old = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError):
            old = None

        def placeless(d: dict[str, Any]) -> dict[str, Any]:
            return {**d, "output": {**(d.get("output") or {}), "dir": None}}

        if not (isinstance(old, dict) and placeless(old) == placeless(new)):
            runs.atomic_write_text(path, yaml.safe_dump(new, sort_keys=False))

    # -- training ----------------------------------------------------------------------------------------------
    def _where(self, ctx: StepContext) -> str:
        b = ctx.step - ctx.epoch * self._steps_per_epoch
        return f"at epoch {ctx.epoch + 1}, step {b + 1} of {self._steps_per_epoch}"

    def _step(
        self,
        x: Tensor,
        ys: dict[str, Tensor],
        ctx: StepContext,
        info: StepInfo | None = None,
        masks: dict[str, Tensor] | None = None,
    ) -> Tensor:
        if info is None:
            info = StepInfo(
                ctx.epoch, ctx.step - ctx.epoch * self._steps_per_epoch, ctx.step, self._steps_per_epoch, torch.empty(0)
            )
        with self._autocast():
            if self._use_rep:
                # float32 z: the engine's Gramian w.r.t. z (and the aggregation) stay in float32 under bf16
                z = _at_least_fp32(self.model.encode(x))
                out = self.model.decode(z)
            else:
                z, out = None, self.model(x)
            losses, counts = masked_losses(self.train_tasks, out, ys, masks)
            losses = _at_least_fp32(losses)
        if self.dp.active:
            # the global batch's loss values, this rank's share of their gradient (mtlkit.distributed)
            losses, counts = global_losses(self.dp, losses, counts)
        present: Tensor | None = None
        if masks is not None and not bool((counts > 0).all()):
            present = counts > 0
            ctx.present = present
            losses = self._fill_absent(losses, present)
            if not bool(present.any()):  # no task has a label in this batch: nothing to learn from it
                self._remember_losses(losses, counts)
                return losses.detach()
        finite = torch.isfinite(losses.detach())
        if not bool(finite.all()):
            bad = [self.train_names[i] for i in (~finite).nonzero().flatten().tolist()]
            raise NonFiniteLossError(
                f"training diverged {self._where(ctx)}: non-finite loss for task(s) "
                f"{', '.join(bad)} (losses {losses.detach().tolist()}); {self._lr_hint()}"
            )
        weighted = self.method.weighting(losses, ctx)
        if present is not None:  # weighted zero: an absent task sends no gradient to the model nor to the method
            weighted = weighted * present.to(device=weighted.device, dtype=weighted.dtype)
        finite = torch.isfinite(weighted.detach())
        if not bool(finite.all()):
            bad = (
                [self.train_names[i] for i in (~finite).nonzero().flatten().tolist()]
                if finite.shape == losses.shape
                else self.train_names
            )
            raise NonFiniteLossError(
                f"training diverged {self._where(ctx)}: method {self.method.name} weighted the "
                f"finite losses {[round(v, 4) for v in losses.detach().tolist()]} into "
                f"non-finite ones for task(s) {', '.join(bad)} "
                f"({weighted.detach().tolist()}); {self._lr_hint()}"
            )
        info.losses = losses
        for cb in self.callbacks:
            cb.on_losses(self, info)
        wants = [cb.wants_jacobian(self, info) for cb in self.callbacks]  # every callback is asked: no short-circuit
        keep = any(wants)
        scaler = self.scaler
        scale: float | None = None
        try:
            aux = check_auxiliary_loss(self.model)  # non-task losses of the model's modules (e.g. MTVIB's β·KL), if any
            if scaler.is_enabled():
                # fp16: the loss scale S multiplies the weighted losses (after the weighting, which saw the unscaled
                # ones); the engine unscales the per-task gradients before aggregating them (loss_scale)
                weighted = scaler.scale(weighted)
                aux = None if aux is None else scaler.scale(aux)
                scale = scaler.get_scale()
            self.optimizer.zero_grad(set_to_none=True)
            # A model without shared parameters (e.g. one-task models of STL on PLE/MMoE) under a plain sum: one
            # backward (the engine's shared_params must not be empty)
            no_shared = not self._shared and not self.method.aggregator.needs_per_task_grads
            if no_shared:
                (weighted.sum() if aux is None else weighted.sum() + aux.reshape(())).backward()
                info.info = BackwardInfo()
            else:
                info.info = backward(
                    weighted,
                    self._shared,
                    self.method.aggregator,
                    representation=z,
                    level=self.method.level,
                    # not checked when the config loads: backward checks it (ValueError for an unknown mode)
                    mode=self.cfg.train.engine_mode,
                    chunk_size=self.cfg.train.chunk_size,
                    task_names=self.train_names,
                    extra=aux,
                    keep_jacobian=keep,
                    reduce=self.dp if self.dp.active else None,
                    present=present,
                    loss_scale=scale,
                )
        except NonFiniteLossError:
            raise
        except FloatingPointError as e:  # a task gradient (or the model's own loss) overflowed; the message names it
            raise NonFiniteLossError(
                f"training diverged {self._where(ctx)} (method {self.method.name}): {e}; {self._lr_hint()}"
            ) from e
        if self.dp.active:
            self._reduce_gradients(aux is not None)
        info.losses = losses.detach()
        skipped = False
        if scale is not None:
            scaler.unscale_(self.optimizer)  # every gradient divided by S (and checked for inf/NaN) before it is read
        if not info.info.overflow:  # a step the engine found overflowing is skipped: nothing for the callbacks
            for cb in self.callbacks:
                cb.on_backward(self, info)
        if scale is None:
            self.optimizer.step()
        else:
            scaler.step(self.optimizer)  # skipped if a gradient is inf/NaN (from scaling: the loss was finite)
            scaler.update()  # lowers S after a skipped step
            skipped = scaler.get_scale() < scale
        if self.method.weighting.needs_loss_after_step and not skipped:  # a skipped step changed nothing to measure
            with torch.no_grad(), self._autocast():
                new, new_counts = masked_losses(self.train_tasks, self.model(x), ys, masks)
            new = global_value(self.dp, _at_least_fp32(new), new_counts)
            if present is not None:
                new = torch.where(present.to(new.device), new, losses.detach())
            self.method.weighting.after_step(new)
        if masks is not None:
            self._remember_losses(losses, counts)
        return losses.detach()

    def _remember_losses(self, losses: Tensor, counts: Tensor) -> None:
        """Each task's last loss on a batch where it had labels (what :meth:`_fill_absent` gives absent tasks)."""
        has = (counts > 0).to(losses.device)
        prev = self._last_losses if self._last_losses is not None else losses.detach()
        self._last_losses = torch.where(has, losses.detach(), prev)

    def _fill_absent(self, losses: Tensor, present: Tensor) -> Tensor:
        """The loss vector the method sees when some tasks have no labelled sample in the batch: an absent task's
        entry is its last seen loss (a constant: no gradient), so that every method's statistics (loss ratios,
        histories, first losses) stay finite; its weighted loss is then multiplied by 0. Before a task was ever
        seen, its last loss is the mean of this batch's present ones."""
        keep = present.to(losses.device)
        first = losses.detach()[keep].mean() if bool(keep.any()) else torch.ones((), dtype=losses.dtype)
        last = self._last_losses
        if last is None:
            last = torch.full_like(losses.detach(), float(first))
        return torch.where(keep, losses, last.to(losses.device))

    def _reduce_gradients(self, has_extra: bool) -> None:
        """All-reduce (mean) the gradients that are still this rank's own after the engine: task heads, weighting
        parameters, and the shared ones unless the engine already wrote the global update there (parameter level
        with per-task gradients, no extra loss: J was all-reduced before aggregation)."""
        m = self.method
        done = m.aggregator.needs_per_task_grads and m.level == "parameter" and not has_extra
        skip = {id(p) for p in self._shared} if done else set()
        params = [*self.model.parameters(), *m.weighting.parameters()]
        self.dp.mean_grads_([p for p in params if p.requires_grad and id(p) not in skip])

    def _autocast(self) -> Any:
        """The training forward pass's precision (``train.precision``): bf16 or fp16 autocast on this run's device,
        or nothing. Parameters, gradients, the aggregation and the optimizer stay float32."""
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.cfg.train.precision)
        if dtype is not None:
            return torch.autocast(device_type=self.device.type, dtype=dtype)
        return contextlib.nullcontext()

    def fit(self, resume: bool = False) -> RunResult:
        """Train (or continue with ``resume``), select on validation, evaluate the selection on test.

        The run directory stays locked (:mod:`mtlkit.runs`) until this returns or raises.
        """
        lock = self._open_run_dir(resume)
        threads = torch.get_num_threads()
        if self.cfg.train.num_threads:  # for this run only: the caller's setting is restored afterwards
            torch.set_num_threads(self.cfg.train.num_threads)
        quiet = not self.dp.is_main and log.getEffectiveLevel() < logging.WARNING
        level = log.level
        if quiet:  # rank 0 speaks for all ranks
            log.setLevel(logging.WARNING)
        try:
            return self._fit(resume)
        except (NonFiniteLossError, runs.RunDirError) as e:
            raise _with_context(e, self._state_sentence(e)) from e
        finally:
            try:
                for cb in self.callbacks:
                    cb.on_exit(self)
            finally:
                torch.set_num_threads(threads)
                if quiet:
                    log.setLevel(level)
                if lock is not None:
                    lock.release()

    def _open_run_dir(self, resume: bool) -> runs.RunLock | None:
        """Rank 0 creates and locks the run directory (the lock's record names the ranks); the other ranks wait
        for it and share its outcome (the same error on every rank)."""
        lock, error = None, None
        if self.dp.is_main:
            try:
                lock = prepare_run_dir(self.run_dir, self.cfg.output.overwrite, resume)
            except runs.RunDirError as e:
                error = e
        outcome = self.dp.broadcast_object(None if error is None else str(error))
        if error is not None:
            raise error
        if outcome is not None:
            raise runs.RunDirError(f"rank 0 could not open the run directory: {outcome}")
        if lock is not None and lock.stale:
            log.warning(
                f"mtlkit: note: {self.run_dir} was last locked by {runs._describe_holder(lock.stale)}, "
                f"which stopped without releasing it; taking over"
            )
        return lock

    def _state_sentence(self, e: Exception) -> str:
        if self._committed is None:
            return f" Nothing was saved in {self.run_dir}: it stopped before the first checkpoint."
        ck = self.run_dir / "checkpoint.pt"
        if isinstance(e, NonFiniteLossError):
            return (
                f" {ck} still holds the run as of {self._committed} (nothing was saved after it diverged); "
                f"resuming would diverge again: retrain with other settings (--overwrite)"
            )
        return (
            f" {ck} still holds the run as of {self._committed}; once that is fixed, continue it with: "
            f"{resume_command(self.run_dir, self.cfg)}"
        )

    def _fit(self, resume: bool) -> RunResult:
        cfg, tc = self.cfg, self.cfg.train
        history: list[dict[str, float]] = []
        best: dict[str, Any] = {"score": -float("inf"), "epoch": -1, "member_score": {}, "member_epoch": {}}
        start, in_epoch, carried = 0, None, 0.0
        self._committed = None
        self._best_state = None
        self._last_losses = None
        self._best = best
        self._unfinished_results = False
        if resume:
            start, in_epoch, carried, best, history = self._resume()
            self._best = best
        else:
            runs.set_rng_state(self._start_rng)  # the random state the (seeded) construction left
            if self.dp.is_main:
                runs.atomic_write_text(self.run_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        self._train_seconds = carried
        writer = None
        if cfg.output.tensorboard and self.dp.is_main:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: TensorBoard drops what a stopped run logged after its checkpoint (steps are epochs from 1)
            writer = SummaryWriter(str(self.run_dir / "tb"), purge_step=start + 1 if resume else None)
        # The training batches: this rank's share of each global batch, drawn in a seeded order per epoch (a
        # resume redraws the same), from the in-memory tensors or a DataLoader (mtlkit.data.loading).
        source = make_batch_source(
            self.data.train,
            tc.batch_size,
            tc.seed,
            self.device,
            self.dp.rank,
            self.dp.world_size,
            loader=tc.loader,
            num_workers=tc.num_workers,
        )
        steps_per_epoch = self._steps_per_epoch = source.num_batches
        self.start_step = start * steps_per_epoch + (int(in_epoch["batch"]) if in_epoch is not None else 0)
        for cb in self.callbacks:
            cb.on_train_start(self)
        t0 = last_save = time.time()
        save_every = 60.0 * tc.checkpoint_minutes
        trained = False
        try:
            for epoch in range(start, tc.epochs):
                trained = True
                self.model.train()
                first, loss_sum, e0 = 0, torch.zeros(len(self.train_tasks)), time.time()
                if in_epoch is not None:  # resuming inside this epoch
                    first, loss_sum = int(in_epoch["batch"]), in_epoch["loss_sum"].clone()
                    e0 -= float(in_epoch["seconds"])
                    in_epoch = None
                for cb in self.callbacks:
                    cb.on_epoch_start(self, epoch)
                bar = _Progress(
                    f"epoch {epoch + 1}/{tc.epochs}", first, steps_per_epoch, tc.progress and self.dp.is_main
                )
                for b, (_, x, ys, masks) in zip(bar, source.batches(epoch, first), strict=True):
                    step = epoch * steps_per_epoch + b
                    self.model.on_train_progress(step / (tc.epochs * steps_per_epoch))
                    ctx = StepContext(
                        step=step,
                        epoch=epoch,
                        shared_params=self._shared,
                        last_shared_layer=self._last_layer,
                        task_names=self.train_names,
                        task_layers=self._task_layers,
                        reduce=self.reduce,
                    )
                    info = StepInfo(epoch, b, step, steps_per_epoch, torch.empty(0))
                    losses = self._step(x, ys, ctx, info, masks).cpu()
                    for cb in self.callbacks:
                        cb.on_batch_end(self, info)
                    loss_sum += losses
                    bar.loss(float(losses.sum()))
                    if save_every > 0 and b + 1 < steps_per_epoch and time.time() - last_save >= save_every:
                        now = time.time()
                        self._commit(
                            epoch - 1,
                            best,
                            history,
                            carried + now - t0,
                            {"batch": b + 1, "loss_sum": loss_sum.clone(), "seconds": now - e0},
                            where=f"at epoch {epoch + 1}, step {b + 1} of {steps_per_epoch}",
                        )
                        last_save = time.time()
                bar.close()
                mean_losses = loss_sum / steps_per_epoch
                self.method.weighting.on_epoch_end(mean_losses.to(self.device))
                average_buffers_(self.dp, [self.model])  # BatchNorm's running statistics: the same on every rank
                val = evaluate(self.model, self.data.val, self.tasks, tc.eval_batch_size, self.device)
                self._step_scheduler(val)  # before the row: its "lr" is the next epoch's, as before
                row = {
                    "epoch": epoch + 1,
                    "seconds": time.time() - e0,
                    "lr": self.optimizer.param_groups[0]["lr"],
                    **{f"train/{k}/loss": float(v) for k, v in zip(self.train_names, mean_losses, strict=True)},
                    **{f"val/{k}": v for k, v in val.items()},
                }
                w = self.method.weighting.weights()
                if w is not None:
                    row.update(
                        {f"weight/{k}": float(v) for k, v in zip(self.train_names, w.detach().cpu(), strict=True)}
                    )
                self._select(epoch, val, best)
                history.append(row)
                for cb in self.callbacks:
                    cb.on_epoch_end(self, epoch, row)
                self._commit(epoch, best, history, carried + time.time() - t0, where=f"in epoch {epoch + 1}")
                last_save = time.time()
                self._tensorboard(row, writer)
                log.info(_epoch_line(row, self.tasks))
        finally:
            if writer is not None:
                writer.close()
        if not trained:
            log.info(
                f"mtlkit: {self.run_dir} already finished its {tc.epochs} epoch{'s' if tc.epochs != 1 else ''}; "
                f"nothing to train (the selected model is evaluated again)"
            )
        for cb in self.callbacks:
            cb.on_train_end(self)
        return self._finish(best, history, self._train_seconds)

    def _resume(self) -> tuple[int, dict[str, Any] | None, float, dict[str, Any], list[dict[str, float]]]:
        """Load checkpoint.pt (verified) into the trainer; nothing is written here."""
        cfg, tc = self.cfg, self.cfg.train
        path = self.run_dir / "checkpoint.pt"
        # Rank 0 reads it and sends it to the others (who need no shared file system).
        where = self.device if not self.dp.active else "cpu"
        ck = (
            runs.load_checkpoint(path, map_location=where, hint="delete that run to retrain it")
            if self.dp.is_main
            else None
        )
        if self.dp.active:
            ck = _to_device(self.dp.broadcast_object(ck), self.device)
        assert isinstance(ck, dict)
        diff = _resume_differences(ck["config"], cfg.to_dict())
        if diff:
            raise ConfigError(
                f"cannot resume {self.run_dir}: its config differs in {diff} (only train.epochs, "
                f"output.* and {', '.join(sorted(runs.REUSE_IGNORED))} may change on resume; see its "
                f"config.yaml)"
            )
        # Checkpoints older than mid-epoch saving have neither key: they were written at an epoch end.
        in_epoch, carried = ck.get("in_epoch"), float(ck.get("train_seconds", 0.0))
        start = ck["epoch"] + 1
        _refuse_shorter_budget(self.run_dir, tc.epochs, start, in_epoch is not None)
        saved = ck.get("callbacks", {})
        # Observers (e.g. the monitor) only read: a resume may add or drop them.
        saved_observers = set(ck.get("observers", ()))
        kept = sorted(k for k in saved if k not in saved_observers)
        here = sorted(cb.key() for cb in self.callbacks if not cb.observer)
        if kept != here:
            raise ConfigError(
                f"cannot resume {self.run_dir}: it was trained with the callbacks {kept}, this run has {here}"
            )
        for cb in self.callbacks:  # before the model and the optimizer: a callback may re-grow what it grew
            if cb.key() in saved:
                cb.load_state_dict(saved[cb.key()], self)
        self.model.load_state_dict(ck["model"])
        self.optimizer.load_state_dict(ck["optimizer"])
        self.scheduler.load_state_dict(ck["scheduler"])
        self.method.load_state_dict(ck["method"])
        if ck.get("scaler"):  # fp16 (the precision cannot change on resume); older checkpoints have none
            self.scaler.load_state_dict(ck["scaler"])
        self._last_losses = ck.get("last_losses")
        runs.set_rng_state(ck["rng"])
        best, history = ck["best"], ck["history"]
        if ck.get("format", 1) < 2:  # older checkpoints numbered their history rows from 0
            history = [{**r, "epoch": int(r["epoch"]) + 1} for r in history]
        self._best_state = ck.get("best_state")
        has_best = best["epoch"] >= 0 or bool(best["member_epoch"])
        if self._best_state is None and has_best:  # older checkpoints: the selected model is only in best.pt
            self._best_state = runs.load_checkpoint(
                self.run_dir / "best.pt", map_location=self.device, hint="delete that run to retrain it"
            )
        self._committed = f"batch {in_epoch['batch']} of epoch {start + 1}" if in_epoch else f"the end of epoch {start}"
        self._unfinished_results = tc.epochs > start or in_epoch is not None
        return start, in_epoch, carried, best, history

    def _step_scheduler(self, val: dict[str, float]) -> None:
        """One epoch of the learning-rate schedule; ReduceLROnPlateau is given this epoch's validation value
        (``train.plateau_metric``, lower is better: the same on every rank, each evaluates the whole split)."""
        if not isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            self.scheduler.step()
            return
        if self.cfg.train.plateau_metric == "delta_m_reference":
            from mtlkit.bench import reference_delta_m

            value = reference_delta_m(self.data.info, self.tasks, val)
            if value is None:
                raise ConfigError(
                    f"train.plateau_metric=delta_m_reference, but dataset {self.data.name!r} declares no "
                    f"published STL values (MTLData.info['reference_stl']); use plateau_metric=score"
                )
        else:
            value = -selection_score(self.tasks, val)
        self.scheduler.step(value)

    def _select(self, epoch: int, val: dict[str, float], best: dict[str, Any]) -> None:
        """Keep the model with the best validation score (per selection group, e.g. per task for STL), in memory;
        the checkpoint holds it and best.pt is written from it."""
        groups = self._selection_groups
        if groups:
            states = dict(self._best_state or {})
            tasks = {t.name: t for t in self.tasks}
            for name, module in groups.items():
                s = selection_score([tasks[name]], val)
                if s > best["member_score"].get(name, -float("inf")):
                    best["member_score"][name], best["member_epoch"][name] = s, epoch
                    states[name] = _cpu_copy(module.state_dict())
            self._best_state = states
            return
        score = selection_score(self.tasks, val)
        if score > best["score"]:
            best["score"], best["epoch"] = score, epoch
            self._best_state = _cpu_copy(self.model.state_dict())

    def _finish(self, best: dict[str, Any], history: list[dict[str, float]], seconds: float) -> RunResult:
        self._derive(best, history)  # a run stopped right after its last checkpoint: derive what it had not
        load_selected(self.model, self._best_state)
        best_epoch = _best_epochs(best, bool(self._selection_groups))
        tc = self.cfg.train
        val = evaluate(self.model, self.data.val, self.tasks, tc.eval_batch_size, self.device)
        test = evaluate(self.model, self.data.test, self.tasks, tc.eval_batch_size, self.device)
        result = {
            "dataset": self.data.name,
            "method": self.method.name,
            "seed": tc.seed,
            "best_epoch": best_epoch,
            "epochs": tc.epochs,
            "val": val,
            "test": test,
            "train_seconds": seconds,
            "n_train": len(self.data.train),
            "n_val": len(self.data.val),
            "n_test": len(self.data.test),
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "code": runs.code_provenance(),
        }
        for cb in self.callbacks:
            extra = cb.results()
            if extra:
                result[cb.key()] = extra
        if self.dp.is_main:
            runs.write_if_changed(self.run_dir / "results.json", json.dumps(result, indent=2))
        self.dp.barrier()  # the run's files are complete when fit returns on any rank
        return RunResult(self.run_dir, test, val, best_epoch, history, seconds)

    def _tensorboard(self, row: dict[str, float], writer) -> None:
        if writer is not None:
            for k, v in row.items():
                if k != "epoch":
                    writer.add_scalar(k, v, row["epoch"])
            writer.flush()


def _refuse_shorter_budget(run_dir: Path, epochs: int, finished: int, partial: bool) -> None:
    """ConfigError when a resume asks for fewer epochs than the checkpoint has already trained (config.yaml would
    then contradict the weights)."""
    reached = finished + (1 if partial else 0)  # epochs finished, plus the one it stopped inside
    if epochs < reached:
        done = f"{finished} epoch{'s' if finished != 1 else ''}" + (
            f" and part of epoch {finished + 1}" if partial else ""
        )
        raise ConfigError(
            f"cannot resume {run_dir} with train.epochs={epochs}: it has already trained {done}, so its "
            f"weights are past epoch {epochs}. Resume with --epochs {reached} or more, or train a new "
            f"run in another --run-dir"
        )


def train_or_reuse(
    cfg: RunConfig,
    data: MTLData | None = None,
    run_dir: str | Path | None = None,
    reuse: bool = False,
    callbacks: Sequence[Callback] = (),
) -> tuple[dict[str, Any], MTLModel, bool]:
    """Train the run ``cfg`` into ``run_dir``; return its ``results.json``, its selected model and whether it trained
    now. With ``reuse``, a finished run of the same config is read back instead (its best.pt loaded) and a stopped
    one continues from its checkpoint; a run of another config is an error (:func:`mtlkit.runs.finished_run`).
    Benchmarks and reproductions that resume in pieces (``--reuse``) all go through here.

    Example:
        >>> train_or_reuse  # doctest: +ELLIPSIS
        <function train_or_reuse at ...>
    """
    from mtlkit.evaluation import load_run

    path = Path(run_dir or cfg.output.dir or default_run_dir(cfg))
    done = runs.finished_run(path, cfg) if reuse else None
    if done is not None:
        _, _, model = load_run(path, device=cfg.train.device, data=data)
        return done, model, False
    trainer = Trainer(cfg, data=data, run_dir=path, callbacks=callbacks)
    trainer.fit(resume=reuse and runs.resumable_run(path, cfg))
    return json.loads((path / "results.json").read_text()), trainer.model, True


def check_run_dir(cfg: RunConfig, resume: bool = False, run_dir: str | Path | None = None) -> Path:
    """The run directory :meth:`Trainer.fit` will use, after the checks it will make there that need no data: not
    a file, writable, not locked by another run, not overwritten without ``output.overwrite``; for ``resume``, a
    checkpoint that passes its hash check and has not trained past ``train.epochs``. Writes nothing. The command
    line calls it before building the dataset, so that these errors come at once."""
    path = Path(run_dir or cfg.output.dir or default_run_dir(cfg))
    runs.open_run_dir(path, cfg.output.overwrite, resume, check_only=True)
    if resume:
        meta = runs.verify_checkpoint(path / "checkpoint.pt", hint="delete that run to retrain it")
        if meta and "epoch" in meta:
            _refuse_shorter_budget(path, cfg.train.epochs, int(meta["epoch"]), bool(meta.get("batch")))
    return path


def resume_command(run_dir: Path, cfg: RunConfig) -> str:
    """The command that continues the run in ``run_dir`` towards ``cfg``'s budget (``--epochs`` only when its
    config.yaml, which a resume reads, does not already say it)."""
    cmd = f"mtlkit train --run-dir {run_dir} --resume"
    try:
        saved = (yaml.safe_load((Path(run_dir) / "config.yaml").read_text()) or {}).get("train", {}).get("epochs")
    except (OSError, yaml.YAMLError, AttributeError):
        saved = None
    return cmd if saved == cfg.train.epochs else f"{cmd} --epochs {cfg.train.epochs}"


def _at_least_fp32(t: Tensor) -> Tensor:
    """``t`` in float32 if autocast made it bf16/fp16; float32 and float64 tensors as they are."""
    return t.float() if t.dtype in (torch.bfloat16, torch.float16) else t


def _to_device(obj: Any, device: torch.device) -> Any:
    """``obj`` (a checkpoint: nested dicts, lists, tuples) with every tensor moved to ``device``."""
    if isinstance(obj, Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device(v, device) for v in obj)
    return obj


def _cpu_copy(state: dict[str, Any]) -> dict[str, Any]:
    return {k: v.detach().to("cpu", copy=True) if isinstance(v, Tensor) else copy.deepcopy(v) for k, v in state.items()}


def _best_epochs(best: dict[str, Any], per_member: bool) -> int | dict[str, int]:
    """The selected epoch(s), numbered from 1 (0: none yet)."""
    if per_member:
        return {k: int(v) + 1 for k, v in best["member_epoch"].items()}
    return int(best["epoch"]) + 1


def _csv(history: list[dict[str, float]]) -> str:
    fields: list[str] = []
    for r in history:
        fields += [k for k in r if k not in fields]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, restval="", lineterminator="\n")
    w.writeheader()
    w.writerows(history)
    return buf.getvalue()


def _with_context(e: MTLKitError, extra: str) -> MTLKitError:
    """The same error with ``extra`` appended to its message (OSError attributes kept)."""
    new = type(e)(str(e).rstrip(".") + "." + extra)
    for attr in ("errno", "strerror", "filename"):
        if hasattr(e, attr):
            setattr(new, attr, getattr(e, attr))
    return new


def _resume_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Config keys that differ between a checkpoint and a resume request, ignoring those allowed to change."""
    return runs.config_differences(old, new, allowed=runs.REUSE_IGNORED | {"train.epochs"} | MONITOR_KEYS)


def _auxiliary_tasks(model: MTLModel) -> list[Task]:
    """The training-only tasks ``model.auxiliary_tasks()`` declares; each must be marked ``auxiliary`` so that it
    is never selected on or reported."""
    aux = list(model.auxiliary_tasks())
    not_aux = [t.name for t in aux if not t.auxiliary]
    if not_aux:
        raise ConfigError(f"model.auxiliary_tasks() returned task(s) {not_aux} without auxiliary=True")
    return aux


class _Progress:
    """The batches of one epoch, with progress suited to where stderr goes: a tqdm bar on a terminal, otherwise
    (a file, a pipe, a CI log) one plain line every ``every`` seconds; nothing when ``enabled`` is false
    (``--no-progress``). The per-epoch summary line is printed by the loop either way."""

    def __init__(self, desc: str, first: int, total: int, enabled: bool, every: float = 30.0):
        self.desc, self.first, self.total, self.every = desc, first, total, every
        self.mode = "none" if not enabled else ("bar" if _isatty(sys.stderr) else "lines")
        self._bar: tqdm[int] | None = None
        self._t0 = self._last = time.time()
        self._b = first

    def __iter__(self):
        it: Iterable[int] = range(self.first, self.total)
        if self.mode == "bar":
            from tqdm.auto import tqdm

            self._bar = tqdm(it, desc=self.desc, leave=False, file=sys.stderr, dynamic_ncols=True)
            it = self._bar
        for b in it:
            self._b = b
            yield b

    def loss(self, value: float) -> None:
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{value:.4f}")
        elif self.mode == "lines" and time.time() - self._last >= self.every:
            self._last = time.time()
            log.info(f"{self.desc}: step {self._b + 1}/{self.total}, loss {value:.4f}, {self._last - self._t0:.0f}s")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def _epoch_line(row: dict[str, float], tasks: list[Task]) -> str:
    parts = [f"epoch {row['epoch']}", f"{row['seconds']:.0f}s"]
    for t in tasks:
        parts.append(f"{t.name}: val {t.metrics[0]} {row[f'val/{t.name}/{t.metrics[0]}']:.4f}")
    return " | ".join(parts)


def format_results(tasks: list[Task], test: dict[str, float], best_epoch: int | dict[str, int] | None = None) -> str:
    """A small markdown table of the test metrics; with ``best_epoch`` (:attr:`RunResult.best_epoch`), a column with
    the epoch each task's model was selected at (the same table for every method, one model or one per task).

    Example:
        >>> from mtlkit.tasks import Task
        >>> print(format_results([Task("a", "multiclass", 3)], {"a/accuracy": 0.5}, {"a": 2}))
        | task | metric | test | selected epoch |
        |---|---|---|---|
        | a | accuracy | 0.5000 | 2 |
    """

    def epoch_of(name: str | None) -> str:
        if isinstance(best_epoch, dict):
            return str(best_epoch.get(name, "")) if name else "per task"
        return str(best_epoch)

    col = best_epoch is not None
    lines = [
        "| task | metric | test |" + (" selected epoch |" if col else ""),
        "|---|---|---|" + ("---|" if col else ""),
    ]
    for t in tasks:
        for m in t.metrics:
            lines.append(
                f"| {t.name} | {m} | {test[f'{t.name}/{m}']:.4f} |" + (f" {epoch_of(t.name)} |" if col else "")
            )
    if "joint_accuracy" in test:
        lines.append(
            f"| (all) | joint_accuracy | {test['joint_accuracy']:.4f} |" + (f" {epoch_of(None)} |" if col else "")
        )
    return "\n".join(lines)
