"""Multi-task methods as the training loop sees them: a registry name maps to a :class:`Method`.

A :class:`Method` is a loss-space weighting plus a gradient-space aggregator (either may be the trivial one), the
level at which the aggregator works and whether it trains one model per task. The registry is
:data:`mtlkit._registry.METHODS`; it holds

* the method classes themselves: each aggregator or weighting file decorates its class
  (``@METHODS.register("cagrad")`` on ``class CAGrad(Aggregator)``); an Aggregator ``A`` builds
  ``Method(EW(), A(**options))`` at ``A.default_level``, a Weighting ``W`` builds ``Method(W(**options), Sum())``;
* the **composites** of the table below (:class:`Composite`): methods that combine a weighting and an aggregator or
  fix some of their options (``stl``, ``mtvib``, ``dbmtl``, ...);
* a user's own factories ``(**options) -> Method`` or classes, registered with :func:`register_method`.

A method's options are its constructor's keyword arguments (read from the signature: they cannot drift from the
code). The trainer only calls :func:`build_method` and never tests a method's name.

Example:
    >>> m = build_method("ew")
    >>> type(m.weighting).__name__, type(m.aggregator).__name__
    ('EW', 'Sum')
    >>> m = build_method("cagrad", c=0.5, scale="sum")
    >>> type(m.aggregator).__name__, m.aggregator.c
    ('CAGradOnSumScale', 0.5)
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from mtlkit._registry import METHODS, REQUIRED, Entry, Option, signature_options
from mtlkit.aggregation._base import SCALE_MEANING, Aggregator, Level, Mean, Sum, on_sum_scale, scale_of
from mtlkit.errors import ConfigError
from mtlkit.weighting._base import EW, Weighting
from mtlkit.weighting.dbmtl import DBMTLAggregator, LogLoss
from mtlkit.weighting.uw import UW

if TYPE_CHECKING:  # annotations only
    from mtlkit.callbacks import Callback

#: ``build_method``'s ``scale``: the method's own scale, or every update put on the sum scale (x T where it can be).
ScaleChoice = Literal["native", "sum"]
SCALE_CHOICES: tuple[str, ...] = ("native", "sum")
LEVELS: tuple[str, ...] = ("parameter", "representation")

F = TypeVar("F")


@dataclass
class Method:
    """A multi-task method as the training loop sees it.

    Attributes:
        weighting: loss-space part (EW for pure gradient-space methods).
        aggregator: gradient-space part (Sum for pure loss-space methods).
        level: where the aggregator works: ``"parameter"`` (shared parameters) or ``"representation"``.
        name: registry name (for logs only).
        single_task: True for STL, which trains one model per task (the loop builds them).

    Example:
        >>> m = Method()
        >>> m.name, m.level, sorted(m.state_dict())
        ('ew', 'parameter', ['aggregator', 'weighting'])
    """

    weighting: Weighting = field(default_factory=EW)
    aggregator: Aggregator = field(default_factory=Sum)
    level: Level = "parameter"
    name: str = "ew"
    single_task: bool = False

    def callbacks(self) -> list[Callback]:
        """The callbacks the weighting and the aggregator bring (the trainer adds them to the run)."""
        return [*self.weighting.callbacks(), *self.aggregator.callbacks()]

    def state_dict(self) -> dict[str, Any]:
        """The weighting's and the aggregator's state (for checkpoints)."""
        return {"weighting": self.weighting.state_dict(), "aggregator": self.aggregator.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.weighting.load_state_dict(state["weighting"])
        self.aggregator.load_state_dict(state["aggregator"])


@dataclass(frozen=True)
class Composite:
    """A method made of a weighting class and an aggregator class, some of whose options are fixed.

    Calling it with options builds the :class:`Method`: each option goes to the constructor that takes it. Its
    ``__signature__`` is the union of both constructors' options minus the fixed ones, so the registry reads (and
    checks) its options like any class's. An option name taken by both constructors raises ``ValueError`` when the
    composite is made (fix it in one of them): it could not be routed.

    Args:
        weighting: the Weighting class (EW: none).
        aggregator: the Aggregator class (Sum: none).
        weighting_fixed: options passed to the weighting and not offered to the user.
        aggregator_fixed: the same for the aggregator.
        single_task: the method trains one model per task (STL).
        summary: the one-line description ``mtlkit methods`` shows.

    Example:
        >>> c = Composite(weighting=UW, weighting_fixed={"form": "classification"}, summary="UW, classification.")
        >>> str(inspect.signature(c))
        '(*, init_log_var: float = 0.0) -> mtlkit.methods.Method'
        >>> m = c(init_log_var=1.0)
        >>> m.weighting.form, m.weighting.init_log_var, type(m.aggregator).__name__
        ('classification', 1.0, 'Sum')
    """

    weighting: type[Weighting] = EW
    aggregator: type[Aggregator] = Sum
    weighting_fixed: Mapping[str, Any] = field(default_factory=dict)
    aggregator_fixed: Mapping[str, Any] = field(default_factory=dict)
    single_task: bool = False
    summary: str = ""
    _routes: dict[str, str] = field(init=False, repr=False, compare=False, default_factory=dict)

    def __post_init__(self) -> None:
        w_opts, w_open = signature_options(self.weighting)
        a_opts, a_open = signature_options(self.aggregator)
        if w_open or a_open:
            raise ValueError("a Composite needs constructors without **kwargs (their options must be routable)")
        for cls, opts, fixed in (
            (self.weighting, w_opts, self.weighting_fixed),
            (self.aggregator, a_opts, self.aggregator_fixed),
        ):
            bad = [k for k in fixed if k not in opts]
            if bad:
                raise ValueError(f"{cls.__name__} has no option(s) {bad} to fix")
        w_free = [o for n, o in w_opts.items() if n not in self.weighting_fixed]
        a_free = [o for n, o in a_opts.items() if n not in self.aggregator_fixed]
        both = sorted({o.name for o in w_free} & {o.name for o in a_free})
        if both:
            raise ValueError(
                f"option(s) {both} are taken by both {self.weighting.__name__} and "
                f"{self.aggregator.__name__}: fix them in one of the two (weighting_fixed/"
                f"aggregator_fixed) so that every option has one constructor"
            )
        routes = {o.name: "weighting" for o in w_free} | {o.name: "aggregator" for o in a_free}
        params = [
            inspect.Parameter(
                o.name,
                inspect.Parameter.KEYWORD_ONLY,
                default=inspect.Parameter.empty if o.required else o.default,
                annotation=inspect.Parameter.empty if o.annotation is None else o.annotation,
            )
            for o in [*w_free, *a_free]
        ]
        self._routes.update(routes)
        # Instance attributes read by inspect.signature, inspect.getdoc and the registry (Entry.module).
        object.__setattr__(self, "__signature__", inspect.Signature(params, return_annotation=Method))
        object.__setattr__(self, "__doc__", self.summary or None)
        object.__setattr__(self, "__module__", _caller_module())

    def __call__(self, **options: Any) -> Method:
        bad = [k for k in options if k not in self._routes]
        if bad:
            raise ConfigError(f"no option(s) {bad}; the options are: {', '.join(self._routes) or '(none)'}")
        w_kw = {**self.weighting_fixed, **{k: v for k, v in options.items() if self._routes[k] == "weighting"}}
        a_kw = {**self.aggregator_fixed, **{k: v for k, v in options.items() if self._routes[k] == "aggregator"}}
        return Method(
            self.weighting(**w_kw),
            self.aggregator(**a_kw),
            level=self.aggregator.default_level,
            single_task=self.single_task,
        )


def _caller_module() -> str:
    """The module that made the Composite (the frame above the dataclass's ``__init__``)."""
    try:
        return str(sys._getframe(3).f_globals.get("__name__", __name__))
    except ValueError:  # pragma: no cover - a shallower stack than expected
        return __name__


def register_method(name: str, obj: F | None = None, /, **meta: Any) -> Any:
    """Register a method under ``name`` (lower case): an Aggregator or Weighting class, a :class:`Composite`, or a
    factory ``(**options) -> Method``. A decorator without ``obj``; returns ``obj`` unchanged.

    ``meta``: free-form metadata, e.g. ``zoo=False, zoo_reason="..."`` keeps it out of the default benchmark lists
    (:func:`zoo_methods`).

    Raises:
        ValueError: the name is already registered with another object, or is not lower case.

    Example:
        >>> from mtlkit.weighting._base import Weighting
        >>> @register_method("_doc_half")
        ... class Half(Weighting):
        ...     '''Every loss times ``factor``.'''
        ...     def __init__(self, factor: float = 0.5) -> None:
        ...         super().__init__()
        ...         self.factor = factor
        ...     def forward(self, losses, ctx=None):
        ...         return self.factor * losses
        >>> build_method("_doc_half", factor=0.25).weighting.factor
        0.25
    """
    if name != name.lower():
        raise ValueError(f"method names are lower case, got {name!r}")
    if obj is None:
        return METHODS.register(name, **meta)
    return METHODS.register(name, obj, **meta)


# ------------------------------------------------------------------------------------------------ the composites
#: Methods that combine or fix things (the classes register themselves in their own files).
COMPOSITES: dict[str, Composite] = {
    "ew": Composite(summary="Equal weighting: one backward of the summed loss."),
    "stl": Composite(
        single_task=True,
        summary="Single-task learning: one model per task, each trained on its own loss (the Δm reference).",
    ),
    "mean": Composite(aggregator=Mean, summary="Mean of the task gradients (EW scaled by 1/T)."),
    "mtvib": Composite(
        weighting=UW,
        weighting_fixed={"form": "classification"},
        summary="MTVIB Eq. 23 task part: UW, classification form (Eq. 22); β·KL comes from the MTVIB "
        "model's hook (mtlkit.weighting.mtvib).",
    ),
    # LogLoss and DBMTLAggregator both take eps: the log's (LibMTL's 1e-8) is fixed, the norm guard's is the option.
    "dbmtl": Composite(
        weighting=LogLoss,
        weighting_fixed={"eps": 1e-8},
        aggregator=DBMTLAggregator,
        summary="DB-MTL (Lin et al. 2023): log losses + EMA gradients rescaled to the largest norm (parameter level).",
    ),
}
for _name, _composite in COMPOSITES.items():
    METHODS.register(_name, _composite)
del _name, _composite


# ------------------------------------------------------------------------------------------------ reading the registry
def _entry(name: str) -> Entry[Any]:
    return METHODS.get(name.lower() if isinstance(name, str) else name)


def available_methods() -> list[str]:
    """Names accepted by :func:`build_method`.

    Example:
        >>> {"ew", "mgda", "uw", "dbmtl"} <= set(available_methods())
        True
    """
    return METHODS.names()


def zoo_methods() -> list[str]:
    """The methods a benchmark trains by default: every registered one but those registered with ``zoo=False``
    (their ``zoo_reason`` says why), ``stl`` and ``ew`` first (the baselines), the others by name.

    Example:
        >>> zoo = zoo_methods()
        >>> zoo[:2], "mtmlan_tdb" in zoo, "mgda" in zoo
        (['stl', 'ew'], False, True)
    """
    names = [e.name for e in METHODS if e.meta.get("zoo", True)]
    first = [n for n in ("stl", "ew") if n in names]
    return first + [n for n in names if n not in first]


def method_options(name: str) -> dict[str, Any]:
    """The options of method ``name`` (its constructor's keyword arguments) with their defaults (None where an
    option has no default).

    Example:
        >>> method_options("cagrad")
        {'c': 0.4, 'rescale': 1}
    """
    return {k: (None if o.required else o.default) for k, o in _entry(name).options.items()}


def method_parts(name: str) -> tuple[type[Weighting] | None, type[Aggregator] | None, bool]:
    """The weighting class, the aggregator class and ``single_task`` of method ``name``, read from its registration
    without building it (None for the parts of a plain factory, which only building reveals).

    Example:
        >>> w, a, single = method_parts("dbmtl")
        >>> w.__name__, a.__name__, single
        ('LogLoss', 'DBMTLAggregator', False)
    """
    obj = _entry(name).obj
    if isinstance(obj, type) and issubclass(obj, Aggregator):
        return EW, obj, False
    if isinstance(obj, type) and issubclass(obj, Weighting):
        return obj, Sum, False
    if isinstance(obj, Composite):
        return obj.weighting, obj.aggregator, obj.single_task
    return None, None, False


def method_scale(name: str) -> str | None:
    """The declared output scale of method ``name``'s aggregator (``"sum"``, ``"mean"``, ...; see
    :class:`~mtlkit.aggregation.Aggregator`), None if it declares none or is a factory that cannot be built with its
    defaults.

    Example:
        >>> method_scale("mgda"), method_scale("uw"), method_scale("nash_mtl")
        ('convex', 'sum', 'fixed_norm')
    """
    _, agg, _ = method_parts(name)
    if agg is None:
        try:
            agg = type(build_method(name).aggregator)
        except Exception:  # a user factory whose options have no defaults: nothing to say
            return None
    return scale_of(agg)


def _options_text(options: Mapping[str, Option]) -> str:
    return ", ".join(k if o.required else f"{k}={o.default!r}" for k, o in options.items())


def data_parallel_route(weighting: Any, aggregator: Any, level: str) -> str:
    """How a method stays exact under data parallelism (:mod:`mtlkit.distributed`), from what it declares.

    Example:
        >>> from mtlkit.aggregation import MGDA
        >>> print(data_parallel_route(None, MGDA, "representation"))  # doctest: +NORMALIZE_WHITESPACE
        the loss values (2T numbers), then the T x T Gramian of the gradients w.r.t. z (exact: each rank holds its
        own samples' rows), then every gradient
    """
    first = "the loss values (2T numbers)"
    if weighting is not None and getattr(weighting, "reads_gradients", False):
        first += " and the gradients the weighting reads (all-reduced through StepContext.reduce)"
    if aggregator is None or not aggregator.needs_per_task_grads:
        return f"{first}, then the summed gradients (plain DDP)"
    if level == "representation":
        if aggregator.gramian_based:
            return (
                f"{first}, then the T x T Gramian of the gradients w.r.t. z (exact: each rank holds its own "
                f"samples' rows), then every gradient"
            )
        return f"{first}, then the per-task gradients w.r.t. z all-gathered along the samples, then every gradient"
    return (
        f"{first}, then the T x K matrix of per-task gradients of the shared parameters (all-reduced before "
        f"aggregation: every rank aggregates the same matrix), then the task heads' gradients"
    )


def describe_method(name: str, detail: bool = False) -> str:
    """One line on method ``name``: options with defaults, level (for gradient-space methods) and output scale, then
    its summary; with ``detail``, also the default level, the scale explained and the full documentation of its
    weighting and aggregator (paper, equations, choices).

    Example:
        >>> describe_method("ew")
        'ew [sum scale]: Equal weighting: one backward of the summed loss.'
        >>> describe_method("cagrad")
        'cagrad (c=0.4, rescale=1) [parameter level, mean scale]: CAGrad (Liu et al. 2021); update on the \
mean-gradient scale (c = 0 gives the mean).'
    """
    entry = _entry(name)
    key = entry.name
    weighting, aggregator, single = method_parts(key)
    if weighting is None:  # a plain factory: its parts are only known by building it (with its defaults)
        try:
            m = build_method(key)
            weighting, aggregator, single = type(m.weighting), type(m.aggregator), m.single_task
        except Exception:
            pass
    scale = scale_of(aggregator) if aggregator is not None else None
    level = aggregator.default_level if aggregator is not None else "parameter"
    tags = [f"{level} level"] if aggregator is not None and aggregator.needs_per_task_grads else []
    tags.append(f"{scale or 'undeclared'} scale")
    opts = _options_text(entry.options)
    line = f"{key}{' (' + opts + ')' if opts else ''} [{', '.join(tags)}]: {entry.summary or '(no description)'}"
    if not detail:
        return line
    parts = [
        line,
        "",
        f"default level: {level}" + (" (one model per task)" if single else ""),
        f"scale: {scale or 'undeclared'}"
        + (f": the update is {SCALE_MEANING[scale]}" if scale in SCALE_MEANING else "")
        + (
            ""
            if aggregator is None or aggregator.needs_per_task_grads
            else " (one backward of the summed weighted losses; the weighting sets their weights)"
        ),
    ]
    parts.append(f"data parallel: {data_parallel_route(weighting, aggregator, level)}")
    for role, cls in (("weighting", weighting), ("aggregator", aggregator)):
        if cls is not None:
            parts += ["", f"{role}: {cls.__module__}.{cls.__name__}", "", inspect.getdoc(cls) or "(no documentation)"]
    return "\n".join(parts)


def build_method(name: str, level: Level | None = None, scale: ScaleChoice = "native", **options: Any) -> Method:
    """Build the method ``name`` with its ``options`` (keyword arguments of its constructor).

    Args:
        name: a registered method (:func:`available_methods`; case-insensitive).
        level: ``"parameter"`` or ``"representation"``; None: the method's default level.
        scale: ``"native"`` (the method's own output scale, see :func:`method_scale`) or ``"sum"``: the update is put
            on the sum scale (mean, convex and affine ones multiplied by T, :func:`~mtlkit.aggregation.on_sum_scale`).
        options: the method's options.

    Raises:
        ConfigError: unknown name (lists the valid ones), unknown option (lists the valid options), unknown level or
            scale, or a method that cannot be put on the sum scale (names it and why).

    Example:
        >>> build_method("graddrop").level, build_method("graddrop", level="parameter").level
        ('representation', 'parameter')
        >>> build_method("nash_mtl", scale="sum")
        Traceback (most recent call last):
        ...
        mtlkit.errors.ConfigError: method 'nash_mtl' (NashMTL) cannot be put on the sum scale: its update is of a \
norm set by T, not by the gradients (T identical rows g give √T·g/||g||), so no factor makes it follow the sum of the \
task gradients; use scale 'native'
    """
    entry = _entry(name)
    key = entry.name
    if level is not None and level not in LEVELS:
        raise ConfigError(f"unknown level {level!r}; valid levels are: {', '.join(LEVELS)}")
    if scale not in SCALE_CHOICES:
        raise ConfigError(f"unknown method scale {scale!r}; valid scales are: {', '.join(SCALE_CHOICES)}")
    METHODS.check(key, options)
    obj = entry.obj
    if isinstance(obj, type) and issubclass(obj, Aggregator):
        method = Method(EW(), obj(**options), level=obj.default_level)
    elif isinstance(obj, type) and issubclass(obj, Weighting):
        method = Method(obj(**options), Sum())
    else:
        method = obj(**options)
        if not isinstance(method, Method):
            raise TypeError(f"factory of method {key!r} returned {type(method).__name__}, not Method")
    method.name = key
    if level is not None:
        method.level = level
    if scale == "sum":
        method.aggregator = on_sum_scale(method.aggregator, key)
    return method


__all__ = [
    "COMPOSITES",
    "LEVELS",
    "METHODS",
    "REQUIRED",
    "SCALE_CHOICES",
    "Composite",
    "Method",
    "available_methods",
    "build_method",
    "describe_method",
    "method_options",
    "method_parts",
    "method_scale",
    "register_method",
    "zoo_methods",
]
