"""Seeing what a method does while it trains: per-task losses, gradient norms, weights and conflicts.

Every ``train.log_every`` steps (the first step, then every ``log_every``-th; 0 turns monitoring off) the
:class:`Monitor` callback, which the trainer adds itself, records one row:

* each task's loss (unweighted) and weight: ``loss_weight``, the loss-space weight the weighting reports
  (:meth:`mtlkit.weighting.Weighting.weights`, e.g. UW's ``exp(-s_t)``), and ``agg_weight``, the weights ``w`` a
  Gramian-based aggregator chose (update ``= wᵀ J``; :attr:`mtlkit.engine.autodiff.BackwardInfo.weights`);
* each task's gradient norm ``||g_t|| = √G_tt``, the T x T cosine matrix ``cos_ij = G_ij / √(G_ii G_jj)``, the
  number of conflicting pairs (``i < j`` with ``cos_ij < 0``, the definition of gradient conflict of
  *Gradient Surgery for Multi-Task Learning*, Yu et al., NeurIPS 2020, Def. 1, https://doi.org/10.48550/arXiv.2001.06782),
  and the cosine of the update ``d`` with each task gradient, ``cos(d, g_t)``.

**No extra backward pass.** The cosines come from the Gramian ``G = J Jᵀ`` the engine already formed
(:class:`~mtlkit.engine.autodiff.BackwardInfo`): for a Gramian-based aggregator that never held J, ``d = wᵀ J``
gives ``⟨d, g_t⟩ = (G w)_t`` and ``||d||² = wᵀ G w``, so ``cos(d, g_t) = (G w)_t / √(wᵀ G w · G_tt)`` with no
P-dimensional vector at all. Where the engine holds J instead (aggregators that need the gradients themselves,
``keep_jacobian``, models without a representation), ``G = J Jᵀ`` and ``J d`` are computed from it: O(T²P)
arithmetic, no backward. At representation level (MGDA-UB) these are the gradients w.r.t. the shared
representation z, not the parameters; each row says which (``level``). For a method that combines a weighting with
an aggregator, J holds the gradients of the *weighted* losses, the ones the aggregator combined (cosines do not
change under positive per-task scaling; norms do).

**Loss-space methods and EW** back-propagate one summed loss, so no per-task gradient exists for free: their rows
hold the losses and the loss weights only. ``train.monitor_gradients: true`` asks for the rest at the price of T
extra backward passes on each logged step (``autograd.grad`` of each unweighted task loss w.r.t. the shared
parameters, which leaves ``.grad`` and hence training untouched); the update is then the shared parameters'
``.grad`` after the engine's backward (it includes a model's auxiliary loss, e.g. MTVIB's β·KL).

Where the rows go: ``monitor.jsonl`` in the run directory (one JSON object per logged step; ``step`` counts optimizer
steps from 1; a cosine that is undefined because a gradient is zero is ``null``), TensorBoard under ``tb/monitor``
(scalars ``monitor/<quantity>/<task>``, ``monitor/conflicts``, the pairwise cosines as ``monitor/cos/<i>~<j>`` up
to T = 10, and the cosine matrix as an image ``monitor/cosine``: blue +1, white 0, red -1, grey undefined) and, per
epoch, means over that epoch's rows in ``metrics.jsonl``/``metrics.csv`` (``monitor/conflicts``,
``monitor/<task>/grad_norm``, ``monitor/<task>/update_cos``).

Resuming: ``monitor.jsonl`` is an append-only log (rows are written as they come, so it can be read while the run
trains), not a file replaced atomically like the others: on ``--resume`` it is first cut back to the rows of the
steps the checkpoint had trained, so that a resumed run logs each step once; TensorBoard drops the events after the
checkpoint (``purge_step``). The epoch means are kept in the checkpoint (the callback's state), so a resumed run's
metrics rows equal those of a run never stopped. The monitor only reads (an *observer* callback): it never changes
training, and a run may be resumed with monitoring switched on, off or to another ``log_every``.

Example:
    >>> import torch
    >>> s = gradient_stats(gramian=torch.tensor([[1.0, -0.5], [-0.5, 1.0]]), weights=torch.tensor([0.5, 0.5]))
    >>> s.cos[0, 1].item(), s.conflicts, [round(c, 4) for c in s.update_cos.tolist()]
    (-0.5, 1, [0.5, 0.5])
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from mtlkit.callbacks import Callback, StepInfo
from mtlkit.errors import ConfigError

if TYPE_CHECKING:
    from mtlkit.engine.autodiff import BackwardInfo
    from mtlkit.train import Trainer

log = logging.getLogger("mtlkit")

#: The per-step log in a run directory.
MONITOR_FILE = "monitor.jsonl"
#: Pairwise cosines go to TensorBoard as scalars up to this many tasks (T(T-1)/2 scalars; the image always).
TB_PAIR_SCALARS_MAX_T = 10


@dataclass
class GradientStats:
    """What the monitor derives from the task gradients of one step (float64 tensors on the CPU).

    Attributes:
        cos: T x T cosine matrix (NaN where a gradient is zero).
        norms: the T gradient norms.
        conflicts: the number of pairs ``i < j`` with ``cos_ij < 0``.
        update_cos: the cosine of the update with each task gradient (None when the update is not known).
        update_norm: the update's norm (None when not known).
    """

    cos: Tensor
    norms: Tensor
    conflicts: int
    update_cos: Tensor | None = None
    update_norm: float | None = None


def cosine_matrix(gramian: Tensor) -> Tensor:
    """``cos_ij = G_ij / √(G_ii G_jj)`` (float64, clamped to [-1, 1] against rounding; NaN where ``G_ii = 0``).

    Example:
        >>> cosine_matrix(torch.tensor([[4.0, 2.0], [2.0, 4.0]]))
        tensor([[1.0000, 0.5000],
                [0.5000, 1.0000]], dtype=torch.float64)
    """
    G = _check_gramian(gramian)
    d = G.diagonal().clamp_min(0).sqrt()
    denom = d[:, None] * d[None, :]
    cos = (G / denom).clamp(-1.0, 1.0)
    return torch.where(denom > 0, cos, torch.full_like(cos, math.nan))


def conflicting_pairs(cos: Tensor) -> int:
    """The number of task pairs ``i < j`` whose gradients conflict (``cos_ij < 0``; undefined ones do not count).

    Example:
        >>> conflicting_pairs(torch.tensor([[1.0, -0.1, 0.2], [-0.1, 1.0, -0.3], [0.2, -0.3, 1.0]]))
        2
    """
    upper = torch.triu(torch.ones_like(cos, dtype=torch.bool), diagonal=1)
    return int(((cos < 0) & upper).sum())


def gradient_stats(
    gramian: Tensor | None = None,
    weights: Tensor | None = None,
    jacobian: Tensor | None = None,
    update: Tensor | None = None,
) -> GradientStats:
    """Cosines, norms, conflicts and the update's cosines from a Gramian (and the weights) or from a Jacobian.

    Args:
        gramian: ``G = J Jᵀ`` (T x T). With ``weights`` w (update ``d = wᵀ J``): ``⟨d, g_t⟩ = (G w)_t`` and
            ``||d||² = wᵀ G w``.
        weights: the T weights of the update (with ``gramian`` only).
        jacobian: J (T x K), when no Gramian is given: ``G = J Jᵀ``; with ``update`` d (K): ``⟨d, g_t⟩ = (J d)_t``.
        update: the K-vector d (with ``jacobian``).

    Raises:
        ValueError: neither a Gramian nor a Jacobian, or shapes that do not fit.

    Example:
        >>> J = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])
        >>> s = gradient_stats(jacobian=J, update=J.sum(0))
        >>> s.conflicts, s.norms.tolist(), s.update_cos.tolist()
        (1, [1.0, 1.4142135623730951], [0.0, 0.7071067811865475])
    """
    if gramian is not None:
        G = _check_gramian(gramian)
        dots = norm2 = None
        if weights is not None:
            w = weights.detach().to("cpu", torch.float64).reshape(-1)
            if w.numel() != G.shape[0]:
                raise ValueError(f"{w.numel()} weights for a {G.shape[0]} x {G.shape[0]} Gramian")
            dots = G @ w
            norm2 = float(w @ dots)
    elif jacobian is not None:
        if jacobian.dim() != 2 or jacobian.shape[0] == 0:
            raise ValueError(f"a Jacobian is a T x K matrix with T >= 1, got shape {tuple(jacobian.shape)}")
        J = jacobian.detach()
        G = (J @ J.T).to("cpu", torch.float64)
        dots = norm2 = None
        if update is not None:
            u = update.detach().reshape(-1)
            if u.numel() != J.shape[1]:
                raise ValueError(f"an update of {u.numel()} entries for a Jacobian of {J.shape[1]} columns")
            dots = (J @ u).to("cpu", torch.float64)
            norm2 = float(u.to(torch.float64) @ u.to(torch.float64))
    else:
        raise ValueError("gradient_stats needs a Gramian or a Jacobian")
    cos = cosine_matrix(G)
    norms = G.diagonal().clamp_min(0).sqrt()
    stats = GradientStats(cos=cos, norms=norms, conflicts=conflicting_pairs(cos))
    if dots is not None and norm2 is not None:
        unorm = math.sqrt(max(norm2, 0.0))  # wᵀGw >= 0 up to rounding
        denom = norms * unorm
        uc = (dots / denom).clamp(-1.0, 1.0)
        stats.update_cos = torch.where(denom > 0, uc, torch.full_like(uc, math.nan))
        stats.update_norm = unorm
    return stats


def _check_gramian(G: Tensor) -> Tensor:
    if not isinstance(G, Tensor) or G.dim() != 2 or G.shape[0] != G.shape[1] or G.shape[0] == 0:
        shape = tuple(G.shape) if isinstance(G, Tensor) else type(G).__name__
        raise ValueError(f"a Gramian is a non-empty T x T matrix, got shape {shape}")
    return G.detach().to("cpu", torch.float64)


def read_monitor(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a ``monitor.jsonl`` (a run directory or the file); ``[]`` when there is none. A last line cut
    short (a run killed while writing it) is skipped; any other unreadable line is a ConfigError naming it.

    Example:
        >>> read_monitor("/nonexistent-run")
        []
    """
    p = Path(path)
    p = p / MONITOR_FILE if p.is_dir() or p.suffix != ".jsonl" else p
    if not p.is_file():
        return []
    lines = p.read_text().splitlines()
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:  # a row being written when the run stopped: a resume cuts it anyway
                break
            raise ConfigError(f"{p}, line {i + 1}: not a JSON row (the file is damaged)") from None
    return rows


def _clean(values: Sequence[float]) -> list[float | None]:
    """JSON has no NaN: undefined values are written as null."""
    return [None if not math.isfinite(v) else float(v) for v in values]


def _cos_image(cos: Tensor, cell: int = 8) -> Any:
    """The cosine matrix as an H x W x 3 uint8 image: blue +1, white 0, red -1, grey where undefined."""
    c = cos.float()
    nan = torch.isnan(c)
    c = torch.nan_to_num(c, nan=0.0)
    pos, neg = c.clamp_min(0), (-c).clamp_min(0)
    rgb = torch.stack([1 - pos, 1 - pos - neg, 1 - neg], dim=-1).clamp(0, 1)
    rgb[nan] = 0.6
    img = (rgb * 255).round().to(torch.uint8)
    img = img.repeat_interleave(cell, 0).repeat_interleave(cell, 1)
    return img.numpy()


class Monitor(Callback):
    """The built-in monitoring callback (see the module docstring); the trainer adds it when
    ``train.log_every > 0``.

    Args:
        every: log the first step and every ``every``-th step after it (>= 1).
        gradients: for methods whose engine forms no per-task gradients, compute them with T extra backward passes
            on each logged step (``train.monitor_gradients``).
        tensorboard: also write TensorBoard events under ``tb/monitor``.

    Example:
        >>> Monitor(every=10).key(), Monitor.observer
        ('monitor', True)
    """

    name = "monitor"
    observer: ClassVar[bool] = True

    def __init__(self, every: int, gradients: bool = False, tensorboard: bool = True) -> None:
        self.every = every
        self.gradients = gradients
        self.tensorboard = tensorboard
        self._file: Any = None
        self._writer: Any = None
        self._jacobian: Tensor | None = None
        self._epoch_sums: dict[str, list[float]] = {}  # key -> [sum, count]: the epoch means of metrics rows
        self._names: list[str] = []
        self._started = False  # set by start(): steps taken outside Trainer.fit are not logged
        self._writes = True  # False on data-parallel ranks other than 0: they compute (collectives) but write nothing

    # -- callback events -------------------------------------------------------------------------------------------
    def check(self, trainer: Trainer) -> None:
        if isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 1:
            raise ConfigError(f"the monitor logs every N >= 1 steps (train.log_every; 0: off), got {self.every!r}")

    def on_train_start(self, trainer: Trainer) -> None:
        self._writes = trainer.dp.is_main
        self.start(trainer.run_dir, trainer.train_names, trainer.start_step)

    def start(self, run_dir: str | Path, task_names: Sequence[str], start_step: int = 0) -> None:
        """Where to write, the task names, and the steps already trained (a resume): ``monitor.jsonl`` is cut back
        to the rows of those steps."""
        self._dir = Path(run_dir)
        self._names = list(task_names)
        self._started = True
        self._start = int(start_step)
        if self._writes:
            self._cut_back(self._dir / MONITOR_FILE, self._start)

    def due(self, step: StepInfo) -> bool:
        """Whether ``step`` is logged: the first step and every ``every``-th after it, once :meth:`start` has said
        where (a step taken outside :meth:`mtlkit.train.Trainer.fit` writes nothing)."""
        return self._started and step.step % self.every == 0

    def on_losses(self, trainer: Trainer, step: StepInfo) -> None:
        self._jacobian = None
        if self.gradients and self.due(step) and not trainer.method.aggregator.needs_per_task_grads:
            from mtlkit.engine.autodiff import per_task_grads

            shared = [p for p in trainer.model.shared_parameters() if p.requires_grad]
            if shared:  # T autograd.grad calls on the retained graph: .grad is not touched
                # data parallel: every rank computes its rows, the mean is the global batch's (trainer.reduce)
                self._jacobian = trainer.reduce(per_task_grads(step.losses, shared, retain_graph=True))

    def on_backward(self, trainer: Trainer, step: StepInfo) -> None:
        if not self.due(step):
            return
        stats, source = self._stats(trainer, step.info)
        w = trainer.method.weighting.weights()
        row = self.record(
            step=step.step + 1,
            epoch=step.epoch + 1,
            lr=float(trainer.optimizer.param_groups[0]["lr"]),
            losses=step.losses,
            loss_weight=None if w is None else w.detach(),
            agg_weight=None if step.info is None else step.info.weights,
            stats=stats,
            source=source,
            level=trainer.method.level if source in ("gramian", "jacobian") else "parameter",
        )
        self._accumulate(row)

    def on_epoch_end(self, trainer: Trainer, epoch: int, row: dict[str, float]) -> None:
        for key, (total, count) in sorted(self._epoch_sums.items()):
            if count:
                row[key] = total / count
        self._epoch_sums = {}

    def on_checkpoint(self, trainer: Trainer) -> None:
        # The checkpoint says "these steps are done": their rows reach the disk no later than it does.
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
        if self._writer is not None:
            self._writer.flush()

    def on_exit(self, trainer: Trainer) -> None:
        self.close()

    def state_dict(self) -> dict[str, Any]:
        return {"epoch_sums": {k: list(v) for k, v in self._epoch_sums.items()}}

    def load_state_dict(self, state: dict[str, Any], trainer: Trainer) -> None:
        self._epoch_sums = {k: list(v) for k, v in (state.get("epoch_sums") or {}).items()}

    # -- the work ----------------------------------------------------------------------------------------------
    def _stats(self, trainer: Trainer, info: BackwardInfo | None) -> tuple[GradientStats | None, str]:
        """The step's gradient statistics and where they came from (``gramian``, ``jacobian``,
        ``extra_backward`` or ``none``)."""
        if info is not None and info.gramian is not None:
            return gradient_stats(gramian=info.gramian, weights=info.weights), "gramian"
        if info is not None and info.jacobian is not None:
            return gradient_stats(jacobian=info.jacobian, update=info.update), "jacobian"
        if self._jacobian is not None:
            shared = [p for p in trainer.model.shared_parameters() if p.requires_grad]
            d = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in shared])
            J, self._jacobian = self._jacobian, None
            return gradient_stats(jacobian=J, update=d), "extra_backward"
        return None, "none"

    def record(
        self,
        step: int,
        epoch: int,
        lr: float,
        losses: Tensor,
        stats: GradientStats | None,
        source: str = "none",
        level: str = "parameter",
        loss_weight: Tensor | None = None,
        agg_weight: Tensor | None = None,
    ) -> dict[str, Any]:
        """Write one row (``monitor.jsonl`` and TensorBoard) and return it, after :meth:`start` (which
        ``on_train_start`` calls); ``benchmarks/monitor_overhead.py`` calls this directly."""
        row: dict[str, Any] = {
            "step": step,
            "epoch": epoch,
            "lr": lr,
            "tasks": self._names,
            "grads": source,
            "level": level,
            "loss": _clean(losses.detach().cpu().double().tolist()),
        }
        if loss_weight is not None:
            row["loss_weight"] = _clean(loss_weight.detach().cpu().double().reshape(-1).tolist())
        if agg_weight is not None:
            row["agg_weight"] = _clean(agg_weight.detach().cpu().double().reshape(-1).tolist())
        if stats is not None:
            row["grad_norm"] = _clean(stats.norms.tolist())
            row["cos"] = [_clean(r) for r in stats.cos.tolist()]
            row["conflicts"] = stats.conflicts
            if stats.update_cos is not None:
                row["update_cos"] = _clean(stats.update_cos.tolist())
                row["update_norm"] = stats.update_norm
        if not self._writes:
            return row
        if self._file is None:
            self._file = open(self._dir / MONITOR_FILE, "a", encoding="utf-8")  # held open across steps
        self._file.write(json.dumps(row, allow_nan=False) + "\n")
        self._file.flush()  # readable while the run trains (mtlkit report); fsynced at each checkpoint
        if self.tensorboard:
            self._tensorboard(row, stats)
        return row

    def _tensorboard(self, row: dict[str, Any], stats: GradientStats | None) -> None:
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: events a stopped run logged after its checkpoint are dropped (steps count from 1)
            purge = self._start + 1 if self._start > 0 else None
            self._writer = SummaryWriter(str(self._dir / "tb" / "monitor"), purge_step=purge)
        wr, s = self._writer, row["step"]
        for key in ("loss", "loss_weight", "agg_weight", "grad_norm", "update_cos"):
            for name, v in zip(self._names, row.get(key) or [], strict=False):
                if v is not None:
                    wr.add_scalar(f"monitor/{key}/{name}", v, s)
        if stats is not None:
            wr.add_scalar("monitor/conflicts", stats.conflicts, s)
            if row.get("update_norm") is not None:
                wr.add_scalar("monitor/update_norm", row["update_norm"], s)
            T = len(self._names)
            if T <= TB_PAIR_SCALARS_MAX_T:
                for i in range(T):
                    for j in range(i + 1, T):
                        v = row["cos"][i][j]
                        if v is not None:
                            wr.add_scalar(f"monitor/cos/{self._names[i]}~{self._names[j]}", v, s)
            wr.add_image("monitor/cosine", _cos_image(stats.cos), s, dataformats="HWC")

    def _accumulate(self, row: dict[str, Any]) -> None:
        """Sums for the epoch means in the metrics row (kept in the checkpoint: a resume continues them)."""

        def add(key: str, v: float | None) -> None:
            if v is not None:
                acc = self._epoch_sums.setdefault(key, [0.0, 0.0])
                acc[0] += float(v)
                acc[1] += 1.0

        if "conflicts" in row:
            add("monitor/conflicts", row["conflicts"])
        for key in ("grad_norm", "update_cos"):
            for name, v in zip(self._names, row.get(key) or [], strict=False):
                add(f"monitor/{name}/{key}", v)

    @staticmethod
    def _cut_back(path: Path, done: int) -> None:
        """Keep the rows of the first ``done`` steps (those the checkpoint holds): a resumed run logs the rest
        again, once. Written atomically, and only if anything changes (a finished run resumed with nothing to
        train leaves the file as it is)."""
        if not path.is_file():
            return
        from mtlkit import runs

        text = path.read_text(encoding="utf-8")
        kept = []
        for line in text.splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # the half-written last row of a killed run
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= done:
                kept.append(line + "\n")
        new = "".join(kept)
        if new != text:
            runs.atomic_write_text(path, new)

    def close(self) -> None:
        """Close the file and the TensorBoard writer (``on_exit``: when fit returns or raises)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None


__all__ = [
    "MONITOR_FILE",
    "GradientStats",
    "Monitor",
    "conflicting_pairs",
    "cosine_matrix",
    "gradient_stats",
    "read_monitor",
]
