"""MTMLAN's task-level dynamic balancing (TDB): GradNorm with an inverse task-frequency penalty.

Tianyi Wang and Shu-Ching Chen, "Multi-Label Multi-Task Learning with Dynamic Task Weight Balancing", IEEE 21st
International Conference on Information Reuse and Integration for Data Science (IRI 2020), pp. 245-252, 2020,
doi 10.1109/IRI49571.2020.00042; Sec. III-B-2, Eq. 10-16 and the ten-step procedure that follows them. The
sample-level half (focal-style loss, Eq. 8-9) is a loss (:func:`mtlkit.nn.losses.sample_level_loss`), not a
weighting.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from mtlkit._registry import METHODS
from mtlkit.errors import ConfigError
from mtlkit.weighting._base import StepContext
from mtlkit.weighting.gradnorm import GradNorm

GRAD_AT = ("task_first_layer", "last_shared_layer")


@METHODS.register(
    "mtmlan_tdb",
    zoo=False,
    zoo_reason="its default grad_at='task_first_layer' needs a model that exposes each task's first layer (model mtmlan); the zoo trains HPS",
)
class MTMLANTDB(GradNorm):
    r"""MTMLAN task-level dynamic balancing: GradNorm + N/n_j task-imbalance penalty (Eq. 10-16).

    Task-level dynamic balancing: GradNorm's gradient loss with each task's term multiplied by ``N/n_j``.

    Eq. 10: ``TL(t) = Σ_j (N/n_j)·|G_W^{(j)}(t) − Ḡ_W(t)·r_j(t)^θ|₁`` with ``G_W^{(j)} = ||∇_W w_j L_j||₂``
    (Eq. 11), ``Ḡ_W = E_T[G_W^{(j)}]`` (Eq. 12), ``r_j = L̂_j / E_T[L̂_j]`` (Eq. 13), ``L̂_j = L_j(t)/L_j(0)``
    (Eq. 14), then ``w ← w − lr·∂TL/∂w`` and the renormalisation ``w_j ← T·w_j/Σ_k w_k`` (Eq. 15-16). ``n_j`` is
    the number of training instances of task (concept) j and ``N`` the total; ``N/n_j`` (the inverse task
    distribution) makes the weight of a rare task move faster towards its GradNorm target. Everything else —
    the ten steps of the paper's list, the constant target, the analytic gradient, buffers — is shared with
    :class:`~mtlkit.weighting.GradNorm`; only the penalty and the place where gradient norms are taken differ.

    Ambiguities and choices:
      * **Where the gradient norms are taken** (``grad_at``). The definition after Eq. 10 says ``W`` is "the last
        layer of the shared-network" (GradNorm's choice), but the sentence introducing Eq. 10 *and* step 2 of the
        procedure say "the first layer in each one of the task-specific networks". Default
        ``"task_first_layer"``: it is stated twice, including in the step list an implementer follows, and it is
        what distinguishes TDB from the GradNorm baseline of the paper's Table III. Then
        ``G_j = w_j·||∇_{W_j} L_j||`` with ``W_j`` = ``ctx.task_layers[j]`` (the trainer must fill it). Use
        ``grad_at="last_shared_layer"`` for the other reading (``ctx.last_shared_layer``, as GradNorm).
      * **N**: "the total number of training instances". ``num_samples`` sets it; by default ``N = Σ_j n_j``,
        which is the "Total" row of the paper's Table I (3,225 = sum of the concept counts). N only rescales all
        terms together (i.e. the learning rate), the ratios ``n_j`` carry the penalty.
      * **Restoring-force exponent**: the paper writes θ in Eq. 10 and α in the text, and reports α = 1 as best;
        ``alpha`` defaults to 1.0.
      * **Optimiser**: default plain gradient descent (``optimizer="sgd"``). With Adam the penalty would be
        (almost exactly) a no-op: Adam divides each coordinate's step by the running RMS of its own gradient,
        so a constant per-task factor ``N/n_j`` cancels and TDB degenerates into GradNorm. Because the gradient
        ``(N/n_j)·||∇L_j||`` has the units of the gradient norms, ``lr`` needs tuning per model.

    Counts come from the data: pass ``counts=`` (and ``num_samples=``) to the constructor / ``build_method``, or let
    the training loop call ``set_counts`` while ``needs_task_counts`` is True. Weights are buffers (no optimiser
    parameters); with the default ``grad_at`` the loop must fill ``StepContext.task_layers``.

    Example:
        >>> import torch
        >>> from mtlkit.weighting import StepContext
        >>> W0 = torch.nn.Parameter(torch.ones(1, 2)); W1 = torch.nn.Parameter(torch.ones(1, 2))
        >>> x = torch.tensor([1.0, 1.0])
        >>> losses = torch.stack([(W0 @ x).pow(2).sum(), 0.5 * (W1 @ x).pow(2).sum()])
        >>> tdb = MTMLANTDB(counts=[90, 10], lr=0.001)   # task 1 is rare: N/n = [1.11, 10]
        >>> _ = tdb(losses, StepContext(task_layers=[[W0], [W1]]))
        >>> tdb.weights()  # task 1's gradient is below the mean: its weight rises, ten times faster than GradNorm's
        tensor([0.9829, 1.0171])
    """

    penalty: Tensor
    has_counts: Tensor

    def __init__(
        self,
        counts: Sequence[int] | Tensor | None = None,
        num_samples: int | None = None,
        alpha: float = 1.0,
        grad_at: str = "task_first_layer",
        lr: float = 1e-3,
        optimizer: str = "sgd",
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        min_weight: float = 1e-3,
    ) -> None:
        super().__init__(alpha=alpha, lr=lr, optimizer=optimizer, betas=betas, eps=eps, min_weight=min_weight)
        if grad_at not in GRAD_AT:
            raise ConfigError(f"unknown grad_at {grad_at!r}; valid values are: {', '.join(GRAD_AT)}")
        self.grad_at = grad_at
        self._counts: Tensor | None = None
        self._num_samples: float | None = None
        if counts is not None:
            self._store_counts(counts, num_samples)
        elif num_samples is not None:
            raise ConfigError("num_samples (N) was given without counts (n_j)")

    # ---------------------------------------------------------------- counts / penalty
    @property
    def needs_task_counts(self) -> bool:  # type: ignore[override]
        """True until the counts n_j are known (then the training loop should call ``set_counts``)."""
        return self._counts is None

    def _store_counts(self, counts: Sequence[int] | Tensor, num_samples: int | None) -> None:
        c = torch.as_tensor(counts, dtype=torch.float64).flatten()
        if c.numel() == 0 or not bool(torch.isfinite(c).all()) or bool((c <= 0).any()):
            raise ConfigError(f"counts must be positive per-task instance counts n_j, got {c.tolist()}")
        N = float(c.sum()) if num_samples is None else float(num_samples)
        if not N > 0:
            raise ConfigError(f"num_samples (N) must be positive, got {num_samples!r}")
        if self.num_tasks is not None and c.numel() != self.num_tasks:
            raise ConfigError(f"got {c.numel()} counts but T={self.num_tasks} tasks")
        self._counts, self._num_samples = c, N
        if self.num_tasks is not None:
            self.penalty.copy_((N / c).to(self.penalty))
            self.has_counts.fill_(True)

    def set_counts(self, counts: Sequence[int] | Tensor, num_samples: int | None = None) -> None:
        """Set the per-task instance counts ``n_j`` (and ``N``; default ``Σ n_j``) after construction.

        Counts given to the constructor take precedence: the loop only calls this while ``needs_task_counts``.
        """
        self._store_counts(counts, num_samples)

    def _build(self, num_tasks: int) -> None:
        if self._counts is not None and self._counts.numel() != num_tasks:
            raise ConfigError(f"MTMLANTDB got {self._counts.numel()} counts but T={num_tasks} tasks")
        super()._build(num_tasks)
        known = self._counts is not None
        if self._counts is not None and self._num_samples is not None:  # set together by _store_counts
            pen = (self._num_samples / self._counts).float()
        else:
            pen = torch.ones(num_tasks)
        self.register_buffer("penalty", pen)
        self.register_buffer("has_counts", torch.tensor(known))

    def _penalty(self) -> Tensor:
        if not bool(self.has_counts):
            raise ValueError(
                "MTMLANTDB needs the per-task instance counts n_j: build it with counts=[...] "
                "(from the training data) or call set_counts(counts) before training"
            )
        return self.penalty

    # ---------------------------------------------------------------- gradient norms
    def _unweighted_grad_norms(self, losses: Tensor, ctx: StepContext | None) -> Tensor:
        if self.grad_at == "last_shared_layer":
            return super()._unweighted_grad_norms(losses, ctx)
        layers = list(ctx.task_layers) if ctx is not None else []
        if len(layers) != losses.shape[0]:
            raise ValueError(
                f"MTMLANTDB(grad_at='task_first_layer') needs StepContext(task_layers=...) with the first-layer "
                f"weights of each of the T={losses.shape[0]} task-specific networks (got {len(layers)}); or use "
                f"grad_at='last_shared_layer'"
            )
        flat = [p for ls in layers for p in ls]
        if len({id(p) for p in flat}) != len(flat):
            raise ValueError("MTMLANTDB(grad_at='task_first_layer'): the tasks' first layers must be distinct tensors")
        # W_j belongs to task j's own network, so it reaches L_j only: ∂(Σ_k L_k)/∂W_j = ∂L_j/∂W_j. One backward
        # of the sum gives every task's row at once; T separate backwards from the stacked losses would each
        # traverse the whole graph (every head), several times slower for recurrent heads.
        grads = torch.autograd.grad(losses.sum(), flat, retain_graph=True, allow_unused=True)
        if ctx is not None:  # data parallel: the global batch's gradients (the identity in one process)
            grads = tuple(None if g is None else ctx.reduce(g.detach()) for g in grads)
        norms, k = [], 0
        for ls in layers:
            sq = losses.new_zeros(())
            for g in grads[k : k + len(ls)]:
                if g is not None:
                    sq = sq + g.detach().pow(2).sum().to(sq)
            norms.append(sq.sqrt())
            k += len(ls)
        return torch.stack(norms)
