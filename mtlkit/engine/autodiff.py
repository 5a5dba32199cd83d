"""The engine: per-task gradients and the aggregated backward pass.

One public call, :func:`backward`, fills ``.grad`` of every parameter that the losses depend on:

* *task-specific* parameters (heads, a weighting's per-task parameters) receive their own task's gradient (the
  sum over tasks, which is the same thing since task t's loss is the only one that reaches them);
* *shared* parameters receive the aggregator's combination of the per-task gradients.

How the per-task gradients are obtained (``mode``):

* ``"loop"``: one ``autograd.grad`` per task. With ``representation`` given (the shared encoder's output z), the
  per-task ``∂L_t/∂z`` come first from *one* backward pass of the summed loss through the heads, with a hook on each
  node that reads z recording what each task sends there (every head runs its backward once, as in EW; see
  ``_head_phase`` for when it falls back to one pass per task); then the encoder is back-propagated once per task
  with that vector (``retain_graph``). No task's backward ever runs through another task's head.
* ``"batched"``: the same, but the encoder part is one vectorised ``autograd.grad(..., is_grads_batched=True)`` over
  the stacked ``∂L_t/∂z``, in chunks of ``chunk_size`` tasks to bound memory. On CPU the loop was faster in our
  measurements (benchmarks/step_time.py); on an accelerator batching usually pays. ``"auto"`` picks loop on CPU and
  batched elsewhere.

Gramian-based aggregators (``gramian_based``: MGDA, CAGrad, IMTL-G, Nash-MTL, UPGrad, DualProj, Aligned-MTL, PCGrad,
GradVac, MAMG, ...) at parameter level with a ``representation`` never hold the T x P matrix J:
:class:`mtlkit.engine.gramian.EncoderGramian` forms ``G = J Jᵀ`` from each linear layer's per-task output gradients and its
input (``<Δ_iᵀX, Δ_jᵀX> = <Δ_i, X Xᵀ Δ_j>``), with explicit rows only for the other parameters, and writes ``wᵀ J``
from the same pieces. At representation level they get G from the per-task ``∂L_t/∂z`` by column blocks and the
update as ``Σ_t w_t ∂L_t/∂z``, without stacking J either. Pass ``keep_jacobian=True`` to get J (and
``BackwardInfo.jacobian``) instead; a ``reduce`` (data parallel) also keeps J, so that the all-reduce acts on the
gradients themselves.

``level="representation"`` is the MGDA-UB trick (Sener & Koltun 2018, Sec. 3.3): the aggregator sees the T x (B·d)
matrix of gradients w.r.t. z instead of the T x P matrix w.r.t. the shared parameters, and the combined vector is
back-propagated through the encoder once: cost ≈ one backward of the summed loss whatever T.

Data-parallel training (:mod:`mtlkit.distributed`): pass ``reduce=`` a :class:`~mtlkit.distributed.DataParallel`.
At parameter level the T x K matrix J is all-reduced (mean) before aggregation, so that every process aggregates the
same matrix and writes the same update to the shared parameters; at representation level a Gramian-based method
all-reduces only the T x T Gramian of its rows (exact: each rank holds its own samples' rows), others all-gather J.
Task-specific gradients (and the encoder's at representation level) stay local: the caller all-reduces them
(:meth:`~mtlkit.distributed.DataParallel.mean_grads_`). A plain callable ``reduce`` is applied to J at parameter
level (the older interface).

Samples with only some task labels: ``present`` (bool, T) names the tasks with a labelled sample in the batch; the
others' rows are left out of the aggregation (:meth:`mtlkit.aggregation.Aggregator.restricted`) and get weight 0.

Loss scaling (float16 mixed precision, ``torch.amp.GradScaler``): pass the losses multiplied by S and
``loss_scale=S``. The per-task gradients then come out multiplied by S; the engine divides J by S (the Gramian by S²)
*before* the aggregator sees it, since Nash-MTL and others are not invariant to the scale of their input, and writes S
times the update into ``.grad``, so that every gradient (task heads included) stays in scaled units and the scaler's
``unscale_`` divides them all alike. A non-finite per-task gradient is then an overflow from scaling, not an error:
the aggregation is skipped (a stateful method's state is left as it was), the shared parameters' ``.grad`` are set to
inf so that ``scaler.step`` skips the step, and ``BackwardInfo.overflow`` is True.

Example:
    >>> import torch
    >>> from mtlkit.aggregation import Sum
    >>> enc = torch.nn.Linear(3, 4); heads = torch.nn.ModuleList([torch.nn.Linear(4, 1) for _ in range(2)])
    >>> z = enc(torch.randn(5, 3))
    >>> losses = stack([h(z).pow(2).mean() for h in heads])
    >>> info = backward(losses, shared_params=enc.parameters(), aggregator=Sum(), representation=z)
    >>> enc.weight.grad.shape
    torch.Size([4, 3])
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor
from torch.autograd.graph import Node

from mtlkit.aggregation._base import Aggregator, Sum
from mtlkit.distributed import DataParallel
from mtlkit.engine._graph import walk as _walk
from mtlkit.engine.gramian import EncoderGramian
from mtlkit.errors import ConfigError

Mode = Literal["auto", "loop", "batched"]
Level = Literal["parameter", "representation"]


@dataclass
class BackwardInfo:
    """What :func:`backward` computed, for logging and for methods that inspect gradients (e.g. MAMO).

    Attributes:
        jacobian: the T x K matrix the aggregator saw (K = #shared parameters, or numel(z) at representation level);
            None when no per-task gradients were needed (plain sum) or when the Gramian was formed without it.
        update: the aggregated K-vector (None when J was not formed, at parameter level).
        gramian: the T x T Gramian, when the engine formed it without J (Gramian-based method without ``reduce`` or
            ``keep_jacobian``: at parameter level with a representation, and at representation level).
        weights: the task weights w chosen from that Gramian (update = wᵀ J).
        overflow: with a ``loss_scale``, True when a per-task gradient was NaN or inf: the aggregation was skipped
            and the shared parameters' ``.grad`` hold inf (the other fields are None).

    With a ``loss_scale`` S, ``jacobian``, ``update`` and ``gramian`` are unscaled (what the aggregator saw and
    returned); ``.grad`` holds S times the update.
    """

    jacobian: Tensor | None = None
    update: Tensor | None = None
    gramian: Tensor | None = None
    weights: Tensor | None = None
    overflow: bool = False


class _TaskStack(torch.autograd.Function):
    """``torch.stack`` of scalar losses whose backward sends *no* gradient (None) to a task whose slice is all zero.

    With ``torch.stack``, back-propagating one task's loss still runs the backward of every other task's head with
    zero gradients (the stack's backward hands each input a dense zero tensor), which makes T per-task backward
    passes cost O(T²) head backwards. Returning None lets autograd skip those branches entirely.
    """

    @staticmethod
    def forward(ctx, *losses: Tensor) -> Tensor:
        return torch.stack(losses)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return tuple(g if bool(g.any()) else None for g in grad.unbind())


def stack(losses: Sequence[Tensor]) -> Tensor:
    """Stack per-task scalar losses into the (T,) vector :func:`backward` takes.

    Use this instead of ``torch.stack``: the values and gradients are identical, but back-propagating one entry
    does not run the other tasks' heads (with ``torch.stack`` the per-task backward passes cost O(T²) head
    backwards; at T = 40 on an MLP that was 20x EW instead of about 1.2x).

    Example:
        >>> import torch
        >>> a = torch.tensor(2.0, requires_grad=True); b = torch.tensor(3.0, requires_grad=True)
        >>> v = stack([a * a, b * b]); v[0].backward(); a.grad, b.grad
        (tensor(4.), None)
    """
    losses = list(losses)
    if not losses or any(not isinstance(loss, Tensor) or loss.dim() != 0 for loss in losses):
        raise ValueError("stack takes a non-empty sequence of scalar loss tensors")
    return _TaskStack.apply(*losses)


def check_losses(losses: Tensor, names: Sequence[str] | None = None) -> None:
    """Raise a clear error if ``losses`` is not a finite 1-D tensor of per-task losses."""
    if not isinstance(losses, Tensor) or losses.dim() != 1 or losses.numel() == 0:
        shape = tuple(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__
        raise ValueError(f"losses must be a 1-D tensor with one loss per task, got {shape}")
    finite = torch.isfinite(losses.detach())
    if not bool(finite.all()):
        bad = [int(i) for i in (~finite).nonzero().flatten()]
        labels = [names[i] if names is not None else f"#{i}" for i in bad]
        raise FloatingPointError(f"non-finite loss for task(s) {', '.join(labels)}: {losses.detach().tolist()}")


def _leaves(roots: Sequence[Tensor], stop: Tensor | None, exclude: set[int]) -> tuple[list[Tensor], list[Tensor], bool]:
    """Leaf tensors (parameters) reachable from ``roots`` without going through ``stop``, in one walk.

    Returns those not in ``exclude``, those in ``exclude`` (reached around ``stop``), and whether ``stop`` itself
    was reached (False when ``stop`` is None).
    """
    stop_fn = stop.grad_fn if stop is not None else None
    found: dict[int, Tensor] = {}
    around: dict[int, Tensor] = {}
    reached = False

    def at_stop(fn) -> bool:
        nonlocal reached
        if fn is stop_fn:
            reached = True
            return True
        return False

    for fn in _walk([r.grad_fn for r in roots], at_stop):
        var = getattr(fn, "variable", None)  # set on AccumulateGrad nodes: a leaf that requires grad
        if var is None:
            continue
        if stop is not None and var is stop:  # a leaf representation
            reached = True
        elif id(var) in exclude:
            around[id(var)] = var
        else:
            found[id(var)] = var
    return list(found.values()), list(around.values()), reached


def _depends_on(t: Tensor, ids: set[int]) -> bool:
    """Whether a leaf in ``ids`` is reachable from ``t``'s graph (stops at the first one found)."""
    for fn in _walk([t.grad_fn], lambda fn: False):
        var = getattr(fn, "variable", None)
        if var is not None and id(var) in ids:
            return True
    return False


def _check_representation(z: Tensor, shared_ids: set[int], leaf_only: bool = False) -> None:
    """Raise :class:`~mtlkit.errors.ConfigError` when ``z`` cannot carry the shared parameters' gradients.

    ``leaf_only``: only the O(1) checks (z requires grad and is not a leaf), as on the plain-sum path.
    """
    if not z.requires_grad:
        raise ConfigError(
            "representation does not require grad (a detached copy, or computed under "
            "torch.no_grad()): pass the encoder's output itself, the tensor the task heads read"
        )
    if z.grad_fn is None:
        if id(z) in shared_ids:  # a shared parameter read directly by the heads (e.g. an embedding table)
            return
        raise ConfigError(
            "representation is a leaf tensor (created with requires_grad=True, or "
            "z.detach().requires_grad_()): it does not depend on shared_params, so the shared "
            "parameters would get no gradient; pass the encoder's output itself, the tensor the task "
            "heads read"
        )
    if not leaf_only and not _depends_on(z, shared_ids):
        raise ConfigError(
            "representation does not depend on any of shared_params, so they would get no gradient: "
            "pass the encoder's output as representation and the encoder's parameters as "
            "shared_params (was representation computed from a detached tensor?)"
        )


def _shapes(params: Sequence[Tensor], at_most: int = 4) -> str:
    shown = ", ".join(str(tuple(p.shape)) for p in params[:at_most])
    return shown + (f" and {len(params) - at_most} more" if len(params) > at_most else "")


def _flat(grads: Sequence[Tensor | None], params: Sequence[Tensor]) -> Tensor:
    return torch.cat(
        [(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params, strict=True)]
    )


def _accumulate(param: Tensor, grad: Tensor, owned: bool = False) -> None:
    """Add ``grad`` to ``param.grad``. ``owned``: grad is a fresh tensor nobody else holds (then it is not copied)."""
    if param.grad is None:
        g = grad.detach()
        own = owned and g.is_contiguous() and g._base is None and g.shape == param.shape
        param.grad = g if own else g.clone()
    else:
        param.grad.add_(grad.detach())


def _accumulate_fresh(params: Sequence[Tensor], grads: Sequence[Tensor | None]) -> None:
    """Accumulate the outputs of one ``autograd.grad`` call without copying those that share no memory."""
    ptrs: dict[int, int] = {}
    for g in grads:
        if g is not None:
            ptrs[g.data_ptr()] = ptrs.get(g.data_ptr(), 0) + 1
    for p, g in zip(params, grads, strict=True):
        if g is not None:
            _accumulate(p, g, owned=ptrs[g.data_ptr()] == 1)


def _write_flat(update: Tensor, params: Sequence[Tensor]) -> None:
    offset = 0
    for p in params:
        n = p.numel()
        _accumulate(p, update[offset : offset + n].view_as(p))
        offset += n


def per_task_grads(losses: Tensor, params: Sequence[Tensor], retain_graph: bool = True) -> Tensor:
    """The T x P matrix of per-task gradients of ``losses`` w.r.t. ``params`` (one ``autograd.grad`` per task).

    Parameters a task does not reach get zeros. Does not touch ``.grad``.

    Example:
        >>> import torch
        >>> w = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> per_task_grads(torch.stack([w[0] * 3, w.pow(2).sum()]), [w])
        tensor([[3., 0.],
                [2., 4.]])
    """
    params = list(params)
    rows = []
    for t in range(losses.shape[0]):
        g = torch.autograd.grad(
            losses[t],
            params,
            retain_graph=True if retain_graph or t < losses.shape[0] - 1 else False,
            allow_unused=True,
        )
        rows.append(_flat(g, params))
    return torch.stack(rows)


def _resolve_mode(mode: Mode, z: Tensor) -> Literal["loop", "batched"]:
    """``"auto"``: the per-task loop on CPU (faster there in our measurements), vectorised elsewhere."""
    return ("loop" if z.device.type == "cpu" else "batched") if mode == "auto" else mode


def _encoder_jacobian(z: Tensor, dz: Tensor, params: list[Tensor], mode: Mode, chunk_size: int | None) -> Tensor:
    """Rows ``dz_t ᵀ ∂z/∂θ`` for every task t: the per-task gradients of the shared parameters."""
    mode = _resolve_mode(mode, z)
    T = dz.shape[0]
    if mode == "loop":
        # Fill a preallocated T x P matrix row by row: a list of rows plus torch.stack would hold J twice.
        J = torch.empty(T, sum(p.numel() for p in params), dtype=dz.dtype, device=dz.device)
        for t in range(T):
            J[t] = _flat(
                torch.autograd.grad(z, params, grad_outputs=dz[t], retain_graph=True, allow_unused=True), params
            )
        return J
    if mode != "batched":
        raise ValueError(f"unknown mode {mode!r}; valid modes are: auto, batched, loop")
    step = T if chunk_size is None else max(1, int(chunk_size))
    blocks = []
    for s in range(0, T, step):
        g = torch.autograd.grad(
            z, params, grad_outputs=dz[s : s + step], retain_graph=True, allow_unused=True, is_grads_batched=True
        )
        blocks.append(
            torch.cat(
                [
                    (
                        gi
                        if gi is not None
                        else torch.zeros(dz[s : s + step].shape[0], *p.shape, dtype=p.dtype, device=p.device)
                    ).reshape(gi.shape[0] if gi is not None else dz[s : s + step].shape[0], -1)
                    for gi, p in zip(g, params, strict=True)
                ],
                dim=1,
            )
        )
    return torch.cat(blocks)


def _split_node(losses: Tensor, z: Tensor) -> Node | None:
    """The autograd node that builds the (T,) loss vector from T per-task scalars (``stack`` or ``torch.stack``).

    Returns None when there is none, or when z can be reached from ``losses`` without going through it (then the
    per-task parts of the graph cannot be told apart by structure).
    """
    T, target = losses.shape[0], z.grad_fn
    boundary: dict[int, Node] = {}

    def at_boundary(fn: Node) -> bool:
        if fn is target or (
            type(fn).__name__ in ("_TaskStackBackward", "StackBackward0") and len(fn.next_functions) == T
        ):
            boundary[id(fn)] = fn
            return True
        return False

    for _ in _walk([losses.grad_fn], at_boundary):
        pass
    splits = [fn for fn in boundary.values() if fn is not target]
    return splits[0] if len(splits) == 1 and len(boundary) == 1 else None


def _consumers(split: Node, z: Tensor) -> list[list[tuple[Node, int]]] | None:
    """For each task, the graph edges (node, input index) through which that task's loss reads z.

    None when one node reads z for two tasks (a shared layer after z): then no single pass can separate them.
    """
    target = z.grad_fn
    owner: dict[int, int] = {}
    per_task: list[list[tuple[Node, int]]] = []
    for t, (root, _) in enumerate(split.next_functions):
        edges: list[tuple[Node, int]] = []
        for fn in _walk([root], lambda fn: fn is target):
            for i, (nxt, _) in enumerate(fn.next_functions):
                if nxt is target:
                    if owner.setdefault(id(fn), t) != t:
                        return None
                    edges.append((fn, i))
        per_task.append(edges)
    return per_task


def _is_elementwise(losses: Tensor, split: Node) -> bool:
    """True when ``losses[t]`` depends on task t's raw loss only (a per-task weighting, not a mixing one)."""
    if losses.grad_fn is split:
        return True
    edge = torch.autograd.graph.GradientEdge(split, 0)
    T = losses.shape[0]
    for t in range(T):
        (row,) = torch.autograd.grad(losses[t], [edge], retain_graph=True, allow_unused=True)
        if row is not None and bool((row.reshape(-1)[torch.arange(T) != t] != 0).any()):
            return False
    return True


def _head_phase(losses: Tensor, z: Tensor, task_leaves: list[Tensor]) -> tuple[list[Tensor], list[Tensor | None]]:
    """Per-task ``∂L_t/∂z`` (a list of T tensors shaped like z) and the task-specific parameters' gradients.

    One backward pass of ``Σ_t L_t`` down to z, with a hook on each node that reads z taking the gradient that
    task's loss sends to z: every head runs its backward once, as in EW, and no task pays for another's head. This
    needs the loss vector built by ``stack``/``torch.stack`` from per-task losses, each reading z through its own
    nodes, and a per-task (diagonal) weighting; otherwise it falls back to one ``autograd.grad`` per task, which
    gives the same numbers at a higher cost.

    The hooks keep the tensors autograd computed instead of copying them into one T x z.shape buffer: a buffer that
    large (40 MB at T = 40, batch 256, d = 1024) is a fresh memory mapping on every step, and filling it cost more in
    page faults (about 20 ms on the 2-core CPU) than the Gramian's product.
    """
    T = losses.shape[0]
    split = _split_node(losses, z) if z.grad_fn is not None else None
    per_task = _consumers(split, z) if split is not None else None
    if split is not None and per_task is not None and _is_elementwise(losses, split):
        dzs: list[Tensor | None] = [None] * T

        def record(t: int, i: int):
            def hook(grad_inputs, grad_outputs):
                g = grad_inputs[i]
                if g is None:
                    return None
                # Out of place: with two edges into z (``z + z``) autograd may hand both the same tensor.
                dzs[t] = g if dzs[t] is None else dzs[t] + g
                # Hand z nothing: the sum over tasks that autograd would build there is never used.
                return tuple(None if k == i else gk for k, gk in enumerate(grad_inputs))

            return hook

        handles = [fn.register_hook(record(t, i)) for t, edges in enumerate(per_task) for fn, i in edges]
        try:
            grads = torch.autograd.grad(
                losses,
                [z] + task_leaves,
                grad_outputs=torch.ones_like(losses),
                retain_graph=True,
                allow_unused=True,
                materialize_grads=False,
            )
        finally:
            for h in handles:
                h.remove()
        # a task whose loss does not read z sends it zeros
        return [d if d is not None else torch.zeros_like(z) for d in dzs], list(grads[1:])
    params = [z] + task_leaves
    dz, task_grads = [], [torch.zeros_like(p) for p in task_leaves]
    for t in range(T):
        g = torch.autograd.grad(losses[t], params, retain_graph=True, allow_unused=True)
        dz.append(g[0] if g[0] is not None else torch.zeros_like(z))
        for acc, gi in zip(task_grads, g[1:], strict=True):
            if gi is not None:
                acc.add_(gi)
    return dz, list(task_grads)


def _gramian_of_rows(rows: Sequence[Tensor], block_bytes: int = 4 << 20) -> Tensor:
    """``G = J Jᵀ`` for J with rows ``rows[t].reshape(-1)``, from column blocks of at most ``block_bytes``.

    Equal to one ``J @ J.T`` up to the order of float sums; the blocks keep every temporary small enough to be
    reused by the allocator from step to step, where one T x K copy of J would be a fresh mapping each time.
    """
    flat = [r.reshape(-1) for r in rows]
    T, K = len(flat), flat[0].numel()
    step = max(1, block_bytes // (T * flat[0].element_size()))
    G = torch.zeros(T, T, dtype=flat[0].dtype, device=flat[0].device)
    for s in range(0, K, step):
        block = torch.stack([f[s : s + step] for f in flat])
        G.addmm_(block, block.T)
    return G


def _combine_rows(w: Tensor, rows: Sequence[Tensor]) -> Tensor:
    """``Σ_t w_t rows[t]`` without stacking the rows (and without a host sync per weight)."""
    out = torch.zeros_like(rows[0])
    for t, r in enumerate(rows):
        out.addcmul_(r, w[t])
    return out


def _overflowed(per_row: Tensor, shared: Sequence[Tensor]) -> bool:
    """With a loss scale: whether a task's gradient row is non-finite, given one number per row that is non-finite
    exactly then (row sums of J, the Gramian's diagonal). If so, every shared parameter's ``.grad`` becomes inf, so
    that the scaler skips the step; the caller skips the aggregation."""
    if bool(torch.isfinite(per_row).all()):
        return False
    for p in shared:
        if p.grad is None:
            p.grad = torch.full_like(p, float("inf"))
        else:
            p.grad.fill_(float("inf"))
    return True


def _check_loss_scale(loss_scale: float | None) -> float | None:
    if loss_scale is None:
        return None
    s = float(loss_scale)
    if not (s > 0 and s != float("inf")):  # also refuses NaN
        raise ValueError(f"loss_scale must be a finite number > 0 (the scaler's S), got {loss_scale!r}")
    return s


def backward(
    losses: Tensor,
    shared_params: Iterable[Tensor],
    aggregator: Aggregator | None = None,
    representation: Tensor | None = None,
    level: Level = "parameter",
    mode: Mode = "auto",
    chunk_size: int | None = None,
    reduce: Callable[[Tensor], Tensor] | DataParallel | None = None,
    task_names: Sequence[str] | None = None,
    extra: Tensor | None = None,
    keep_jacobian: bool = False,
    present: Tensor | None = None,
    loss_scale: float | None = None,
) -> BackwardInfo:
    """Back-propagate per-task ``losses`` (shape (T,)) and write the aggregated update into ``.grad``.

    Args:
        losses: one scalar loss per task, already weighted by any loss-space method.
        shared_params: the parameters shared by all tasks (the ones the aggregator combines).
        aggregator: gradient-space method; None or :class:`~mtlkit.aggregation.Sum` = one backward of the sum.
        representation: the shared encoder's output z that every head reads (needed for ``level="representation"``;
            at parameter level it makes each task's head backward run once and lets the encoder part be batched).
            It must be the very tensor the losses were computed from, and every path from ``shared_params`` to the
            losses must go through it: a skip connection around z, or a shared layer after it, is an error (pass
            ``representation=None`` for such a model). A task whose loss reads neither z nor a shared parameter
            has a zero gradient row, as with ``representation=None``. With a plain sum (no per-task gradients)
            z is not used, and only checked to require grad and not to be a detached leaf.
        level: ``"parameter"`` (aggregate gradients of the shared parameters) or ``"representation"`` (of z).
        mode: ``"loop"``, ``"batched"`` or ``"auto"`` (see the module docstring).
        chunk_size: tasks per vectorised backward in batched mode (bounds memory).
        reduce: data parallelism: a :class:`~mtlkit.distributed.DataParallel` (see the module docstring), or a
            callable applied to the per-task gradient matrix at parameter level before aggregation.
        task_names: used in error messages.
        extra: an optional scalar loss that is not a task (a regulariser such as MTVIB's β·KL): its gradient is
            added to every parameter it reaches, outside the aggregation.
        keep_jacobian: form the T x K matrix J even for a Gramian-based method (for callers that inspect per-task
            gradients, e.g. MAMO's conflict detector). Otherwise, with a ``representation`` and no ``reduce``, such
            methods get ``G = J Jᵀ`` without holding J: from :func:`mtlkit.engine.gramian.encoder_gramian` at parameter
            level, from the per-task ``∂L_t/∂z`` at representation level.
        present: bool (T,): the tasks that have a labelled sample in this batch (None: all). The others are left
            out of the aggregation; their gradient rows (zero) are not seen by the aggregator.
        loss_scale: S when ``losses`` (and ``extra``) were multiplied by a loss scale S (float16 with a
            ``torch.amp.GradScaler``; see the module docstring): the aggregator sees the per-task gradients divided
            by S, ``.grad`` gets S times its update, and a non-finite per-task gradient skips the aggregation
            (``BackwardInfo.overflow``) instead of raising.

    Returns:
        :class:`BackwardInfo` with the per-task gradient matrix and the update (None for a plain sum).

    Raises:
        FloatingPointError: a loss is NaN/inf (names the task); without ``loss_scale``, also a task's gradient.
        ValueError: bad shapes, representation level without a representation, unknown mode/level.
        mtlkit.errors.ConfigError: (a ValueError) ``representation`` is not what the heads read: detached, a leaf,
            not an input of the losses' graph (e.g. the encoder was called twice), not computed from
            ``shared_params``, or bypassed by some of them. Raised before any ``.grad`` is written.

    Like ``torch.autograd.backward``, it *accumulates* into ``.grad``: zero the gradients before each call (e.g.
    ``optimizer.zero_grad()``).
    """
    check_losses(losses, task_names)
    scale = _check_loss_scale(loss_scale)
    shared = [p for p in shared_params if p.requires_grad]
    if not shared:
        raise ValueError(
            "shared_params is empty: pass the shared network's parameters (e.g. model.encoder.parameters())"
        )
    if mode not in ("auto", "loop", "batched"):
        raise ValueError(f"unknown mode {mode!r}; valid modes are: auto, batched, loop")
    if level not in ("parameter", "representation"):
        raise ValueError(f"unknown level {level!r}; valid levels are: parameter, representation")
    if level == "representation" and representation is None:
        raise ValueError("level='representation' needs the shared representation z (representation=...)")
    shared_ids = {id(p) for p in shared}
    if representation is not None:
        _check_representation(representation, shared_ids, leaf_only=True)
    agg = aggregator if aggregator is not None else Sum()
    if extra is not None:
        if not isinstance(extra, Tensor) or extra.numel() != 1:
            raise ValueError("extra must be a scalar tensor (a loss that is not a task)")
        if not bool(torch.isfinite(extra.detach()).all()):
            raise FloatingPointError(f"non-finite extra (auxiliary) loss: {float(extra.detach())}")
    dp = reduce if isinstance(reduce, DataParallel) and reduce.active else None
    rows: Callable[[Tensor], Tensor] | None = dp.mean if dp is not None else None
    if reduce is not None and not isinstance(reduce, DataParallel):
        if level == "representation":
            raise ValueError(
                "a callable reduce only applies at parameter level (the rows at representation level are each "
                "process's own samples): pass a mtlkit.distributed.DataParallel"
            )
        rows = reduce
    if present is not None:
        present = present.to(device="cpu", dtype=torch.bool).reshape(-1)
        if present.numel() != losses.shape[0]:
            raise ValueError(f"present has {present.numel()} entries for {losses.shape[0]} losses")
        if bool(present.all()):
            present = None
    if not agg.needs_per_task_grads and (rows is None or dp is not None):
        # A plain sum: one backward (under data parallelism the caller all-reduces the gradients, as DDP does).
        (losses.sum() if extra is None else losses.sum() + extra.reshape(())).backward()
        return BackwardInfo()

    z = representation
    task_leaves, around, reached = _leaves(list(losses.unbind()) if z is None else [losses], z, shared_ids)
    if z is not None:
        # Checked before anything is written to .grad. The walk above was needed anyway (the task-specific
        # parameters); _depends_on stops at the first shared parameter it meets below z (a few nodes).
        if not reached:
            raise ConfigError(
                "representation is not an input of the losses' graph: pass the tensor the task heads "
                "read (was the encoder called twice?)"
            )
        if around:
            one = len(around) == 1
            raise ConfigError(
                f"{len(around)} of shared_params (shape{'' if one else 's'} {_shapes(around)}) "
                f"reach{'es' if one else ''} the losses without going through representation (a skip "
                f"connection around it, a shared layer after it, or a head reading another encoder "
                f"call) and would get no gradient through that path: pass as representation a tensor "
                f"that every path from shared_params to the losses goes through, or "
                f"representation=None (per-task gradients through the whole graph, parameter level)"
            )
        _check_representation(z, shared_ids)
    if extra is not None and extra.requires_grad:
        extra.reshape(()).backward(retain_graph=True)
    T = losses.shape[0]
    if z is None:
        # Parameter level without a representation: each task's backward runs through its head and the encoder.
        params = shared + task_leaves
        task_grads = [torch.zeros_like(p) for p in task_leaves]
        J = torch.empty(T, sum(p.numel() for p in shared), dtype=shared[0].dtype, device=shared[0].device)
        for t in range(T):
            g = torch.autograd.grad(losses[t], params, retain_graph=True, allow_unused=True)
            J[t] = _flat(g[: len(shared)], shared)
            for acc, gi in zip(task_grads, g[len(shared) :], strict=True):
                if gi is not None:
                    acc.add_(gi)
        if rows is not None:
            J = rows(J)
        if scale is not None:
            if _overflowed(J.sum(dim=1), shared):
                _accumulate_fresh(task_leaves, task_grads)
                return BackwardInfo(overflow=True)
            J = J.div_(scale)
        update = _aggregate(agg, J, present)
        _write_flat(update if scale is None else update * scale, shared)
        _accumulate_fresh(task_leaves, task_grads)
        return BackwardInfo(jacobian=J, update=update)

    # With a representation: heads first (each task through its own head only), then the encoder.
    dzs, head_grads = _head_phase(losses, z, task_leaves)
    _accumulate_fresh(task_leaves, head_grads)
    without_J = agg.gramian_based and rows is None and not keep_jacobian
    if level == "representation":
        R = dp.world_size if dp is not None else 1
        if agg.gramian_based and not keep_jacobian:
            # G from the per-task rows and the update Σ_t w_t ∂L_t/∂z, never stacking the rows into J. Under data
            # parallelism each rank's rows are its own samples' and the global J is [J_1 .. J_R] / R
            # (mtlkit.distributed.global_losses), so G = Σ_r J_r J_rᵀ / R² exactly: one T x T all-reduce.
            G = _gramian_of_rows(dzs)
            if dp is not None:
                G = dp.sum(G).div_(R * R)
            if scale is not None:
                if _overflowed(G.diagonal(), shared):
                    return BackwardInfo(overflow=True)
                G = G.div_(scale * scale)
            w = _weights(agg, G, present).to(G.dtype)
            # R·(this rank's slice of the global update): the caller's mean over ranks makes it the sum. With a
            # loss scale the rows are scaled: this is S times the update.
            update = _combine_rows(w, dzs).reshape(-1)
            del dzs  # freed before the encoder's backward
            info = BackwardInfo(update=update if scale is None else update / scale, gramian=G, weights=w)
        else:
            J = torch.stack(dzs).reshape(T, -1)
            del dzs  # J holds them now
            mine: slice | None = None
            if dp is not None:
                J, mine = dp.gather(J, dim=1)
                J = J.div_(R)
            if scale is not None:
                if _overflowed(J.sum(dim=1), shared):
                    return BackwardInfo(overflow=True)
                J = J.div_(scale)
            update_all = _aggregate(agg, J, present)
            info = BackwardInfo(jacobian=J, update=update_all)
            update = update_all if mine is None else update_all[mine] * R
            if scale is not None:
                update = update * scale
        _accumulate_fresh(shared, torch.autograd.grad(z, shared, grad_outputs=update.view_as(z), allow_unused=True))
        return info
    stacked = torch.stack(dzs)
    del dzs
    if without_J:
        # G and the update wᵀJ without ever holding J (mtlkit.engine.gramian).
        held = EncoderGramian(z, stacked, shared, _resolve_mode(mode, z), chunk_size)
        del stacked
        G = held.gramian
        if scale is not None:
            if _overflowed(G.diagonal(), shared):
                return BackwardInfo(overflow=True)
            G = G / (scale * scale)
        w = _weights(agg, G, present)
        # combine works on the (scaled) per-task pieces: with a loss scale, S times the update
        for p, combined in zip(shared, held.combine(w), strict=True):
            _accumulate(p, combined, owned=True)
        return BackwardInfo(gramian=G, weights=w)
    J = _encoder_jacobian(z, stacked, shared, mode, chunk_size)
    if rows is not None:
        J = rows(J)
    if scale is not None:
        if _overflowed(J.sum(dim=1), shared):
            return BackwardInfo(overflow=True)
        J = J.div_(scale)
    update = _aggregate(agg, J, present)
    _write_flat(update if scale is None else update * scale, shared)
    return BackwardInfo(jacobian=J, update=update)


def _aggregate(agg: Aggregator, J: Tensor, present: Tensor | None) -> Tensor:
    """``agg(J)``, or with some tasks absent (``present``), the aggregation of the present tasks' rows alone."""
    if present is None:
        return agg(J)
    if not bool(present.any()):
        return torch.zeros(J.shape[1], dtype=J.dtype, device=J.device)
    keep = present.to(J.device)
    return agg.restricted(present)(J[keep])


def _weights(agg: Aggregator, G: Tensor, present: Tensor | None) -> Tensor:
    """``agg.weights(G)``, or with some tasks absent, the present tasks' weights from their sub-Gramian (0 for the
    others)."""
    if present is None:
        return agg.weights(G)
    w = torch.zeros(G.shape[0], dtype=G.dtype, device=G.device)
    if bool(present.any()):
        keep = present.to(G.device)
        w[keep] = agg.restricted(present).weights(G[keep][:, keep]).to(G.dtype)
    return w


def split_flat(vector: Tensor, params: Sequence[Tensor]) -> list[Tensor]:
    """Split a flat vector (a row of the Jacobian, or an update) back into tensors shaped like ``params``.

    Example:
        >>> import torch
        >>> [t.shape for t in split_flat(torch.arange(5.), [torch.zeros(2), torch.zeros(3)])]
        [torch.Size([2]), torch.Size([3])]
    """
    out, offset = [], 0
    for p in params:
        out.append(vector[..., offset : offset + p.numel()].reshape(*vector.shape[:-1], *p.shape))
        offset += p.numel()
    if offset != vector.shape[-1]:
        raise ValueError(f"vector has {vector.shape[-1]} entries but the parameters have {offset}")
    return out
