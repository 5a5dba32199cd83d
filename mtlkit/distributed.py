"""Data-parallel training: R processes, each with a share of every global batch, that train exactly as one process.

Launch with PyTorch's own launcher (``torchrun --nproc_per_node 2 -m mtlkit train ...``; several machines:
``--nnodes N --node_rank i --rdzv_endpoint HOST:PORT``) or with ``mtlkit train --nproc 2`` (which calls
``torch.distributed.run`` for you). Backend: gloo on CPU, nccl on CUDA (each rank on ``cuda:LOCAL_RANK``).

What makes it exact (:class:`mtlkit.train.Trainer` with a :class:`DataParallel`):

* **Batches.** Every rank draws the same permutation of the training set (seeded per epoch) and takes its contiguous
  share of each global batch (:class:`mtlkit.data.loading.GlobalBatchSampler`), so the ranks' shares concatenated in
  rank order are the batch one process would train on.
* **Losses.** Each rank computes its tasks' losses on its share (mean over its ``n_r,t`` labelled samples). The loss
  vector the method sees has the *global* value ``L_t = Σ_r n_r,t L_r,t / N_t`` (one all-reduce of 2T numbers) and
  the gradient of ``(R n_r,t / N_t) L_r,t`` (:func:`global_losses`): the mean over ranks of any gradient of a function
  of the losses is then that function's gradient on the global batch. So every loss-space weighting (EW, UW, DWA,
  FAMO, STCH, ...) computes the same weights on every rank from the global losses, with no change to its code, and a
  weighting that reads gradients (GradNorm, MTMLAN's TDB, ExcessMTL) all-reduces them through ``ctx.reduce``.
* **Parameter-level aggregators** all-reduce (mean) the T x K matrix of per-task gradients before aggregating
  (T times the traffic of plain DDP), so every rank aggregates the same matrix. All-reducing local Gramians would
  *not* be exact: ``(Σ_r J_r)(Σ_r J_r)ᵀ ≠ Σ_r J_r J_rᵀ``.
* **Representation-level aggregators.** The rows of ``J`` w.r.t. z of rank r's samples are rank r's own
  (``J = [J_1, ..., J_R] / R`` along the sample axis), so the Gramian is exactly ``Σ_r J_r J_rᵀ / R²``: one T x T
  all-reduce. Aggregators that need J itself (GradDrop, PCGrad at representation level) all-gather it.
* **Everything else** (task heads, the encoder under representation level, weighting parameters) is all-reduced
  (mean) after the backward pass, as plain DDP does; parameters whose update is already global (the shared ones at
  parameter level) are not.
* **Random and stateful methods** draw from generators seeded identically on every rank and update their state from
  the same global quantities, so they stay identical without communication.
* **BatchNorm**: plain BatchNorm normalises each rank's share with that share's statistics (as torch's DDP does): not
  the 1-process computation; the running statistics are averaged over ranks before each evaluation. With
  ``train.sync_batchnorm`` (CUDA; torch's SyncBatchNorm has no CPU kernel) the statistics are those of the global batch.

Rank 0 writes the run directory (and holds its lock); every rank reads the checkpoint on resume.

Example:
    >>> dp = DataParallel.single()
    >>> dp.world_size, dp.is_main, float(dp.mean(torch.tensor(2.0)))
    (1, True, 2.0)
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from mtlkit.errors import ConfigError

#: Environment variables torchrun sets for each process.
ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass
class Traffic:
    """Numbers sent through collectives since the last :meth:`reset` (for the communication benchmark)."""

    all_reduce: int = 0
    all_gather: int = 0
    calls: int = 0

    def reset(self) -> None:
        self.all_reduce = self.all_gather = self.calls = 0


@dataclass
class DataParallel:
    """This process's place among the data-parallel ranks, and the collectives the loop uses.

    Build it with :meth:`from_env` (under torchrun) or :meth:`single` (one process: every collective is the
    identity). ``traffic`` counts the numbers each collective sends.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    traffic: Traffic = field(default_factory=Traffic)

    @classmethod
    def single(cls) -> DataParallel:
        return cls()

    @classmethod
    def from_env(cls, device: str = "auto") -> DataParallel:
        """The ranks torchrun started (``WORLD_SIZE`` > 1: the default process group is initialised here if it is
        not yet: gloo on CPU, nccl on CUDA); one process otherwise."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1 and not _initialized():
            return cls.single()
        if not _initialized():
            backend = "nccl" if _wants_cuda(device) else "gloo"
            missing = [k for k in ENV_KEYS if k not in os.environ]
            if missing:
                raise ConfigError(
                    f"WORLD_SIZE={world} but {', '.join(missing)} not set: launch with torchrun "
                    f"(torchrun --nproc_per_node {world} -m mtlkit train ...) or mtlkit train --nproc {world}"
                )
            torch.distributed.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))
        dist = torch.distributed
        return cls(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -- collectives (the identity in one process) -----------------------------------------------------------------
    def sum(self, t: Tensor) -> Tensor:
        """All-reduce sum (a new tensor; ``t`` is left unchanged)."""
        if not self.active:
            return t
        out = t.detach().clone().contiguous()
        self.traffic.all_reduce += out.numel()
        self.traffic.calls += 1
        torch.distributed.all_reduce(out)
        return out

    def mean(self, t: Tensor) -> Tensor:
        """All-reduce mean (a new tensor)."""
        return self.sum(t).div_(self.world_size) if self.active else t

    def mean_grads_(self, params: Iterable[Tensor]) -> None:
        """All-reduce (mean) the ``.grad`` of ``params`` in place, flattened into one buffer per dtype and device
        (one collective instead of one per tensor); parameters without a gradient on every rank keep none."""
        if not self.active:
            return
        params = list(params)  # iterated more than once below
        with_grad = [p for p in params if p.grad is not None]
        # A parameter may have a gradient on some ranks only (a task without samples there): agree on the set.
        flags = torch.tensor([p.grad is not None for p in params], dtype=torch.float64)
        if flags.numel() and bool(self.sum(flags).ne(self.world_size * flags).any()):
            for p in params:
                if p.grad is None and p.requires_grad:
                    p.grad = torch.zeros_like(p)
            with_grad = [p for p in params if p.grad is not None]
        groups: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
        for p in with_grad:
            assert p.grad is not None
            groups.setdefault((p.grad.dtype, p.grad.device), []).append(p)
        for ps in groups.values():
            flat = torch.cat([p.grad.reshape(-1) for p in ps if p.grad is not None])
            flat = self.mean(flat)
            offset = 0
            for p in ps:
                assert p.grad is not None
                n = p.grad.numel()
                p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
                offset += n

    def gather(self, t: Tensor, dim: int = -1) -> tuple[Tensor, slice]:
        """The ranks' ``t`` concatenated along ``dim`` in rank order (sizes along ``dim`` may differ), and the slice
        of it that is this rank's."""
        if not self.active:
            return t, slice(0, t.shape[dim])
        dim = dim % t.dim()
        size = torch.tensor([t.shape[dim]], dtype=torch.int64)
        sizes = [torch.zeros_like(size) for _ in range(self.world_size)]
        torch.distributed.all_gather(sizes, size)
        lens = [int(s) for s in sizes]
        pad = max(lens) - t.shape[dim]
        src = t.detach().contiguous()
        if pad:
            shape = list(src.shape)
            shape[dim] = pad
            src = torch.cat([src, src.new_zeros(shape)], dim=dim)
        parts = [torch.empty_like(src) for _ in range(self.world_size)]
        self.traffic.all_gather += src.numel() * (self.world_size - 1)
        self.traffic.calls += 1
        torch.distributed.all_gather(parts, src)
        out = torch.cat([p.narrow(dim, 0, n) for p, n in zip(parts, lens, strict=True)], dim=dim)
        start = sum(lens[: self.rank])
        return out, slice(start, start + lens[self.rank])

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()

    def broadcast_object(self, obj: object) -> object:
        """``obj`` as rank 0 has it (for errors and decisions that every rank must share)."""
        if not self.active:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def all_agree(self, flag: bool) -> bool:
        """True on every rank iff ``flag`` is True on every rank."""
        if not self.active:
            return flag
        return bool(self.sum(torch.tensor([0.0 if flag else 1.0], dtype=torch.float64)).item() == 0.0)


def global_losses(dp: DataParallel, losses: Tensor, counts: Tensor) -> tuple[Tensor, Tensor]:
    """The loss vector a method sees under data parallelism, and the global labelled counts per task.

    Args:
        losses: this rank's per-task losses (T,), each the mean over this rank's ``counts[t]`` labelled samples.
        counts: (T,) labelled samples per task on this rank.

    Returns:
        ``(losses_g, N)``: ``losses_g`` has the value of the global loss ``Σ_r n_r L_r / N`` and the gradient of
        ``(R n_r / N) L_r``, so that the mean over ranks of any gradient of ``f(losses_g)`` is ``∇f`` on the global
        batch (chain rule: ``∂f/∂L_t`` is evaluated at the global value on every rank). A task with no labelled
        sample on any rank (``N_t = 0``) has value 0 and no gradient.

    Example:
        >>> L, N = global_losses(DataParallel.single(), torch.tensor([0.5, 2.0]), torch.tensor([4, 4]))
        >>> L.tolist(), N.tolist()
        ([0.5, 2.0], [4, 4])
    """
    if not dp.active:
        return losses, counts
    n = counts.to(device=losses.device, dtype=losses.dtype)
    value, N = _global_mean(dp, losses, n)
    c = torch.where(N > 0, dp.world_size * n / N.clamp(min=1), torch.zeros_like(n))
    scaled = c * losses
    return scaled - scaled.detach() + value, N.round().to(torch.int64)


def _global_mean(dp: DataParallel, losses: Tensor, n: Tensor) -> tuple[Tensor, Tensor]:
    """``(Σ_r n_r L_r / N, N)`` over ranks (one all-reduce of 2T numbers; 0 where ``N_t = 0``)."""
    T = losses.shape[0]
    stats = dp.sum(torch.cat([n * losses.detach(), n]))
    total, N = stats[:T], stats[T:]
    return torch.where(N > 0, total / N.clamp(min=1), torch.zeros_like(total)), N


def global_value(dp: DataParallel, losses: Tensor, counts: Tensor) -> Tensor:
    """The value of :func:`global_losses` alone (no gradient): e.g. the losses after the step (FAMO)."""
    if not dp.active:
        return losses
    return _global_mean(dp, losses, counts.to(device=losses.device, dtype=losses.dtype))[0]


def average_buffers_(dp: DataParallel, modules: Sequence[torch.nn.Module]) -> None:
    """Average the floating-point buffers (BatchNorm running statistics) over ranks, so that every rank evaluates
    and saves the same model."""
    if not dp.active:
        return
    for m in modules:
        for b in m.buffers():
            if b.is_floating_point():
                b.copy_(dp.mean(b))


def _initialized() -> bool:
    return bool(torch.distributed.is_available() and torch.distributed.is_initialized())


def _wants_cuda(device: str) -> bool:
    if device == "auto":
        return torch.cuda.is_available()
    return str(device).startswith("cuda")


def launch_local(nproc: int, argv: Sequence[str]) -> int:
    """Run ``mtlkit`` with ``argv`` in ``nproc`` local processes through ``torch.distributed.run`` (what
    ``mtlkit train --nproc N`` does): standalone rendezvous on this machine, one thread each unless
    ``OMP_NUM_THREADS`` says otherwise. Returns the launcher's exit status (0, or 1 if a rank failed)."""
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    if nproc < 1:
        raise ConfigError(f"--nproc must be >= 1, got {nproc}")
    args = ["--standalone", "--nproc_per_node", str(nproc), "-m", "mtlkit", *argv]
    try:
        torchrun.main(args)
    except ChildFailedError as e:
        failures = getattr(e, "failures", {})
        first = next(iter(failures.values()), None) if failures else None
        rank = getattr(first, "local_rank", "?") if first is not None else "?"
        code = getattr(first, "exitcode", "?") if first is not None else "?"
        import sys

        print(
            f"mtlkit: error: rank {rank} of the {nproc} processes failed (exit code {code}); see its output above",
            file=sys.stderr,
        )
        return 1
    return 0
