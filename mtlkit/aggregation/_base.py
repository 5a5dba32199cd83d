"""Base class of gradient-space methods (aggregators), the trivial ones (Sum, Mean) and the sum-scale wrapper."""

from __future__ import annotations

import copy
import functools
from abc import ABC
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Literal, TypeVar

import torch
from torch import Tensor

from mtlkit.errors import ConfigError

if TYPE_CHECKING:  # annotations only: the loop imports the callbacks, methods do not need to
    from mtlkit.callbacks import Callback

#: Where an aggregator works: on the gradients of the shared parameters or of the shared representation.
Level = Literal["parameter", "representation"]
#: How an aggregator's update relates to the task gradients it is given (:attr:`Aggregator.scale`).
Scale = Literal["sum", "mean", "convex", "affine", "fixed_norm"]
#: The factor that puts an update of each scale on the sum scale (T = number of tasks); None: no factor can.
SUM_SCALE_FACTOR: dict[str, str | None] = {"sum": "1", "mean": "T", "convex": "T", "affine": "T", "fixed_norm": None}
#: What each scale means, for listings and errors.
SCALE_MEANING: dict[str, str] = {
    "sum": "on the scale of the sum of the task gradients (T identical rows g give T·g)",
    "mean": "on the scale of their mean (T identical rows g give g)",
    "convex": "a convex combination of them (weights >= 0 summing to 1; T identical rows g give g)",
    "affine": "an affine combination of them (weights summing to 1, some may be negative; T identical rows g give g)",
    "fixed_norm": "of a norm set by T, not by the gradients (T identical rows g give √T·g/||g||)",
}


def _check_matrix(J: Tensor) -> None:
    if not isinstance(J, Tensor) or J.dim() != 2:
        shape = tuple(J.shape) if isinstance(J, Tensor) else type(J).__name__
        raise ValueError(f"an aggregator takes a T x P matrix of per-task gradients, got shape {shape}")
    if J.shape[0] == 0:
        raise ValueError("an aggregator needs at least one task gradient (got T = 0)")


def _check_finite(per_row: Tensor) -> None:
    """Raise if a row of J holds NaN or inf, given one number per row that is non-finite exactly then.

    The diagonal of G = J Jᵀ (or the row sums) is such a number: a NaN or inf entry makes it NaN or inf. Checking
    it instead of ``isfinite(J)`` avoids a T x P temporary (40 x 262k entries at representation level on T = 40).
    """
    finite = torch.isfinite(per_row)
    if not bool(finite.all()):
        bad = (~finite).nonzero().flatten().tolist()
        raise FloatingPointError(f"per-task gradients of tasks {bad} contain NaN or inf (or overflow)")


def check_present(present: Tensor | Sequence[bool], T: int | None = None) -> Tensor:
    """``present`` as a bool (T,) CPU tensor, checked: one dimension, at least one True, and ``T`` entries when given.

    Example:
        >>> check_present([True, False])
        tensor([ True, False])
    """
    p = present if isinstance(present, Tensor) else torch.as_tensor(present)
    if p.dtype != torch.bool or p.dim() != 1 or p.numel() == 0:
        raise ValueError(f"present must be a 1-D bool tensor with one entry per task, got {p.dtype} {tuple(p.shape)}")
    if not bool(p.any()):
        raise ValueError("present names no task: a step needs at least one task with a labelled sample")
    if T is not None and p.numel() != T:
        raise ValueError(f"present has {p.numel()} entries but the aggregator's state is for {T} tasks")
    return p.detach().to("cpu")


_A = TypeVar("_A", bound="Aggregator")


class Aggregator(ABC):
    """Turns the T x P matrix ``J`` of per-task gradients (row t = gradient of task t's loss) into one update.

    Subclasses implement either

    * ``weights_from_gramian(G)`` and set ``gramian_based = True``: the method only needs the T x T Gramian
      ``G = J Jᵀ``; the update is ``wᵀ J``, which the engine obtains without materialising anything beyond what it
      already holds (or by one backward of ``Σ w_t L_t`` at representation level), or
    * ``aggregate(J)`` for methods that need the gradients themselves (PCGrad, MAMG, GradDrop, ...).

    Conventions: the returned update is a *descent direction to be applied like a gradient* (the optimizer steps along
    its negative). Its scale is the one of the method's paper and reference code, and every subclass declares it in
    :attr:`scale` (one of :data:`Scale`): ``"sum"`` (like EW's ``Σ_t g_t``), ``"mean"``, ``"convex"`` or
    ``"affine"`` (like one task gradient: ``build_method(..., scale="sum")`` multiplies them by T, see
    :class:`SumScale`) or ``"fixed_norm"`` (Nash-MTL: the norm does not follow the gradients). Stateful aggregators
    keep their state in ``state_dict``/``load_state_dict`` so that checkpoints resume exactly. A default level other
    than ``"parameter"`` is the class attribute :attr:`default_level` (GradDrop: ``"representation"``).

    Batches where some tasks have no labelled sample: :meth:`restricted` gives the aggregator of the present tasks'
    rows (an absent task's zero row would drag min-norm methods such as MGDA to a zero update). An aggregator that
    keeps per-task state overrides ``_restricted`` so that such a step reads and updates only the present tasks'
    part of it.

    Example:
        >>> import torch
        >>> from mtlkit.aggregation import Sum
        >>> Sum()(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
        tensor([1., 2.])
    """

    #: True when the method only needs the Gramian G = J Jᵀ (then implement ``weights_from_gramian``).
    gramian_based: ClassVar[bool] = False
    #: False only for methods whose update is the plain sum of task gradients (then no per-task backward is run).
    needs_per_task_grads: ClassVar[bool] = True
    #: False for methods whose output depends on task order (e.g. random projection order); documented per method.
    permutation_equivariant: ClassVar[bool] = True
    #: The level ``build_method`` gives the method unless the user chooses one.
    default_level: ClassVar[Level] = "parameter"
    #: The scale of the update (see the class docstring). Declared by every concrete subclass: no default here, so
    #: that a new method cannot inherit a claim about its update it does not make.
    scale: ClassVar[Scale]

    def __call__(self, J: Tensor) -> Tensor:
        _check_matrix(J)
        if self.gramian_based:
            return self.weights(J @ J.T).to(J.dtype) @ J
        _check_finite(J.sum(dim=1))
        return self.aggregate(J)

    def weights(self, G: Tensor) -> Tensor:
        """Task weights ``w`` from the Gramian ``G = J Jᵀ`` (checked: square, finite diagonal); update = ``wᵀ J``.

        The engine calls this directly when it forms G without J (:mod:`mtlkit.engine.gramian`).

        Raises:
            ValueError: the method is not Gramian-based, or G is not a square matrix.
            FloatingPointError: a task's gradient holds NaN or inf (its diagonal entry is not finite).
        """
        if not self.gramian_based:
            raise ValueError(f"{type(self).__name__} needs the gradients themselves, not only their Gramian")
        if not isinstance(G, Tensor) or G.dim() != 2 or G.shape[0] != G.shape[1] or G.shape[0] == 0:
            shape = tuple(G.shape) if isinstance(G, Tensor) else type(G).__name__
            raise ValueError(f"a Gramian is a non-empty T x T matrix, got shape {shape}")
        _check_finite(G.diagonal())
        return self.weights_from_gramian(G)

    def weights_from_gramian(self, G: Tensor) -> Tensor:  # pragma: no cover - abstract in practice
        """Return the T task weights ``w`` such that the update is ``wᵀ J`` (Gramian-based methods only)."""
        raise NotImplementedError(f"{type(self).__name__} is not Gramian-based")

    def aggregate(self, J: Tensor) -> Tensor:  # pragma: no cover - abstract in practice
        """Return the P-dimensional update from the T x P matrix of per-task gradients."""
        raise NotImplementedError(f"{type(self).__name__} must implement aggregate()")

    def callbacks(self) -> list[Callback]:
        """Callbacks the method needs in the run (added by the trainer, like a model's; default: none). MoDo's
        sampler of independent batches is one."""
        return []

    def restricted(self, present: Tensor | Sequence[bool]) -> Aggregator:
        """The aggregator of the sub-matrix of the *present* tasks' rows, for a step where the others have no label.

        ``present`` is a bool (T,) mask with at least one True. The returned aggregator takes ``J[present]`` (or
        the Gramian ``G[present][:, present]``) and has this one's flags (``gramian_based``, ...); its update is
        this method applied to the present tasks alone (weights: one per present task). With every task present
        it is ``self``. A method without per-task state (``state_dict()`` empty, or only the random generator of a
        :class:`~mtlkit.aggregation._random.SeededAggregator`, which then draws over the present tasks) returns
        ``self``; a stateful one returns an object that reads the present tasks' part of the state and writes its
        update back, leaving the absent tasks' part as it was (each class's docstring says how).

        Use: ``sub = agg.restricted(present); update = sub(J[present])``, or
        ``w = zeros(T); w[present] = sub.weights(G[present][:, present])``.

        Raises:
            ValueError: ``present`` is not a 1-D bool mask with a True, or does not match the state's T.
            ConfigError: the method keeps per-task state and defines no restriction (``_restricted``).

        Example:
            >>> import torch
            >>> J = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
            >>> Mean().restricted(torch.tensor([True, False, True]))(J[[0, 2]])
            tensor([2.0000, 1.5000])
        """
        p = check_present(present)
        if bool(p.all()):
            return self
        return self._restricted(p)

    def _restricted(self, present: Tensor) -> Aggregator:
        """:meth:`restricted` for a checked mask with some task absent; override in aggregators with per-task state."""
        extra = sorted(set(self.state_dict()) - {"generator"})
        if extra:
            raise ConfigError(
                f"{type(self).__name__} keeps per-task state ({', '.join(extra)}) but does not define how a batch in "
                f"which some tasks have no labelled sample updates it (it overrides no `_restricted`): use it with "
                f"fully labelled data, or give it a `_restricted` (see Aggregator.restricted)"
            )
        return self

    # State for checkpoints (stateless by default).
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} is stateless but got state keys {sorted(state)}")

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({params})"


class Sum(Aggregator):
    """Equal weighting in gradient space: the update is ``Σ_t g_t`` (one backward of the summed loss; the floor).

    Example:
        >>> import torch
        >>> Sum()(torch.ones(3, 2))
        tensor([3., 3.])
    """

    needs_per_task_grads = False
    scale = "sum"

    def aggregate(self, J: Tensor) -> Tensor:
        return J.sum(dim=0)


class Mean(Aggregator):
    """The update is the mean of the task gradients, ``(1/T) Σ_t g_t``.

    Example:
        >>> import torch
        >>> Mean()(torch.tensor([[2.0, 0.0], [0.0, 2.0]]))
        tensor([1., 1.])
    """

    gramian_based = True
    scale = "mean"

    def weights_from_gramian(self, G: Tensor) -> Tensor:
        T = G.shape[0]
        return torch.full((T,), 1.0 / T, dtype=G.dtype, device=G.device)


def scale_of(aggregator: Aggregator | type[Aggregator]) -> str | None:
    """The declared :attr:`~Aggregator.scale` of an aggregator (instance or class), None if it declares none.

    Example:
        >>> scale_of(Sum), scale_of(Mean()), scale_of(on_sum_scale(Mean()))
        ('sum', 'mean', 'sum')
    """
    return getattr(aggregator, "scale", None)


class SumScale(Aggregator):
    """An aggregator of mean, convex or affine scale, its update multiplied by T: on the sum scale.

    Built by :func:`on_sum_scale` (``build_method(..., scale="sum")``), as a subclass made for the wrapped class
    that copies its flags (``gramian_based``, ``needs_per_task_grads``, ``permutation_equivariant``,
    ``default_level``), so that the engine treats it as it treats the wrapped aggregator. A Gramian-based one stays
    Gramian-based: its *weights* are multiplied by T (the engine never forms J for it). The state
    (``state_dict``/``load_state_dict``) is the wrapped aggregator's, and so are its other attributes
    (``wrapped.c`` reads ``inner.c``).

    Example:
        >>> import torch
        >>> agg = on_sum_scale(Mean())
        >>> agg(torch.tensor([[2.0, 0.0], [0.0, 4.0]])), agg.gramian_based, type(agg).__name__
        (tensor([2., 4.]), True, 'MeanOnSumScale')
    """

    scale = "sum"

    def __init__(self, inner: Aggregator) -> None:
        self.inner = inner

    def weights_from_gramian(self, G: Tensor) -> Tensor:
        return self.inner.weights_from_gramian(G) * G.shape[0]

    def aggregate(self, J: Tensor) -> Tensor:
        return self.inner.aggregate(J) * J.shape[0]

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state)

    def callbacks(self) -> list[Callback]:
        return self.inner.callbacks()

    def _restricted(self, present: Tensor) -> Aggregator:
        # The inner aggregator restricted, still multiplied by the number of rows it is given (T' present tasks).
        return type(self)(self.inner.restricted(present))

    def __getattr__(self, name: str) -> Any:
        # Only reached for attributes the wrapper lacks; "inner" itself missing (e.g. during copy) must not recurse.
        if name == "inner" or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.inner, name)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.inner!r})"


def _flags(cls: type[Aggregator]) -> dict[str, Any]:
    """The class attributes the engine reads, for a wrapper that must be treated like ``cls``."""
    return {
        k: getattr(cls, k)
        for k in ("gramian_based", "needs_per_task_grads", "permutation_equivariant", "default_level")
    }


@functools.cache
def _sum_scale_class(cls: type[Aggregator]) -> type[SumScale]:
    flags = _flags(cls)
    return type(
        f"{cls.__name__}OnSumScale",
        (SumScale,),
        {
            **flags,
            "__module__": __name__,
            "__qualname__": f"{cls.__name__}OnSumScale",
            "__doc__": f"{cls.__name__} on the sum scale (x T).",
        },
    )


def on_sum_scale(aggregator: Aggregator, name: str | None = None) -> Aggregator:
    """``aggregator`` with its update on the sum scale: itself if it is already, else a :class:`SumScale` (x T).

    Args:
        aggregator: the aggregator to put on the sum scale.
        name: the method's name, for the error message.

    Raises:
        ConfigError: its scale cannot be put on the sum scale (``"fixed_norm"``: no constant factor does) or it
            declares none.

    Example:
        >>> type(on_sum_scale(Sum())).__name__
        'Sum'
    """
    what = f"method {name!r} ({type(aggregator).__name__})" if name else type(aggregator).__name__
    scale = scale_of(aggregator)
    if scale is None:
        raise ConfigError(
            f"{what} declares no output scale (class attribute `scale`), so it cannot be put on the "
            f"sum scale; use scale 'native'"
        )
    if scale not in SUM_SCALE_FACTOR:
        raise ConfigError(
            f"{what} declares the unknown scale {scale!r}; known scales are: {', '.join(SUM_SCALE_FACTOR)}"
        )
    factor = SUM_SCALE_FACTOR[scale]
    if factor is None:
        raise ConfigError(
            f"{what} cannot be put on the sum scale: its update is {SCALE_MEANING[scale]}, so no "
            f"factor makes it follow the sum of the task gradients; use scale 'native'"
        )
    if factor == "1":
        return aggregator
    return _sum_scale_class(type(aggregator))(aggregator)


class Restricted(Aggregator):
    """What :meth:`Aggregator.restricted` returns for a stateful method: runs ``sub`` (a copy of the method that holds
    the present tasks' part of the state) on the present tasks' rows, then hands its updated state back.

    Built by :func:`restricted_view`, as a subclass made for the wrapped class that copies its flags (like
    :class:`SumScale`), so that the engine treats it as the method itself. Attributes it lacks are the sub-method's
    (``view.task_weights`` is the present tasks' λ). Its ``state_dict`` is the full method's (the state lives there).

    Example:
        >>> import torch
        >>> from mtlkit.aggregation import MoCo
        >>> full = MoCo(beta=1.0, gamma=0.0)
        >>> view = full.restricted(torch.tensor([True, False]))
        >>> view(torch.tensor([[1.0, 2.0]])), full.state_dict()["y"][0]
        (tensor([1., 2.]), tensor([1., 2.]))
    """

    scale = "sum"  # replaced by the wrapped class's in restricted_view (the class attribute must exist)

    def __init__(self, full: Aggregator, present: Tensor, sub: Aggregator, write_back: Callable[[], None]) -> None:
        self.full, self.present, self.sub = full, present, sub
        self._write_back = write_back

    def weights_from_gramian(self, G: Tensor) -> Tensor:
        w = self.sub.weights_from_gramian(G)
        self._write_back()
        return w

    def aggregate(self, J: Tensor) -> Tensor:
        update = self.sub.aggregate(J)
        self._write_back()
        return update

    def state_dict(self) -> dict[str, Any]:
        return self.full.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        raise ValueError("load the state into the full aggregator, not into its restriction to some tasks")

    def __getattr__(self, name: str) -> Any:
        if name == "sub" or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.sub, name)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.sub!r}, present={self.present.tolist()})"


@functools.cache
def _restricted_class(cls: type[Aggregator]) -> type[Restricted]:
    return type(
        f"{cls.__name__}Restricted",
        (Restricted,),
        {
            **_flags(cls),
            "scale": getattr(cls, "scale", None),
            "__module__": __name__,
            "__qualname__": f"{cls.__name__}Restricted",
            "__doc__": f"{cls.__name__} on some of its tasks (see Restricted).",
        },
    )


def restricted_view(full: _A, present: Tensor, load: Callable[[_A], None], store: Callable[[_A], None]) -> Restricted:
    """The restriction of a stateful aggregator ``full`` to the ``present`` tasks (for ``_restricted``).

    ``load(sub)`` puts the present tasks' part of ``full``'s state into ``sub`` (a shallow copy of ``full``: same
    options, same random generator); after each call of the returned aggregator, ``store(sub)`` writes ``sub``'s
    updated state back into ``full``.
    """
    sub = copy.copy(full)
    load(sub)
    return _restricted_class(type(full))(full, present, sub, lambda: store(sub))
