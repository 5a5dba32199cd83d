"""The method registry: a method name maps to a factory that returns a :class:`Method`.

A :class:`Method` is a loss-space weighting plus a gradient-space aggregator (either may be the trivial one) and the
level at which the aggregator works. Method files register themselves with :func:`register`; the trainer only calls
:func:`build_method` and never tests a method's name.

Example:
    >>> m = build_method("ew")
    >>> type(m.weighting).__name__, type(m.aggregator).__name__
    ('EW', 'Sum')
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

from mtlkit._registry import check_options, import_submodules
from mtlkit.aggregation._base import Aggregator, Sum
from mtlkit.errors import ConfigError, unknown_name
from mtlkit.weighting._base import EW, Weighting

Level = Literal["parameter", "representation"]


@dataclass
class Method:
    """A multi-task method as the training loop sees it.

    Attributes:
        weighting: loss-space part (EW for pure gradient-space methods).
        aggregator: gradient-space part (Sum for pure loss-space methods).
        level: where the aggregator works: ``"parameter"`` (shared parameters) or ``"representation"``.
        name: registry name (for logs only).
        single_task: True for STL, which trains one model per task (the loop builds them).
    """

    weighting: Weighting = field(default_factory=EW)
    aggregator: Aggregator = field(default_factory=Sum)
    level: Level = "parameter"
    name: str = "ew"
    single_task: bool = False

    def state_dict(self) -> dict[str, Any]:
        return {"weighting": self.weighting.state_dict(), "aggregator": self.aggregator.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.weighting.load_state_dict(state["weighting"])
        self.aggregator.load_state_dict(state["aggregator"])


_REGISTRY: dict[str, Callable[..., Method]] = {}


def register(name: str) -> Callable[[Callable[..., Method]], Callable[..., Method]]:
    """Decorator: register a factory ``(**options) -> Method`` under ``name`` (lower case)."""

    def deco(factory: Callable[..., Method]) -> Callable[..., Method]:
        key = name.lower()
        if key in _REGISTRY and _REGISTRY[key] is not factory:
            raise ValueError(f"method {key!r} is registered twice")
        _REGISTRY[key] = factory
        return factory

    return deco


def _load_all() -> None:
    # Importing the packages runs every method file's @register; every public module of the two method packages is
    # imported (as for the dataset and model registries), so a new method file needs no edit of an __init__.
    import mtlkit.aggregation
    import mtlkit.weighting

    for pkg in (mtlkit.aggregation, mtlkit.weighting):
        import_submodules(pkg.__name__, pkg.__path__)


def available_methods() -> list[str]:
    """Names accepted by :func:`build_method`."""
    _load_all()
    return sorted(_REGISTRY)


def method_options(name: str) -> dict[str, Any]:
    """The options of method ``name`` (its factory's keyword arguments) with their defaults.

    Example:
        >>> method_options("cagrad")["c"]
        0.4
    """
    _load_all()
    key = name.lower()
    if key not in _REGISTRY:
        raise unknown_name("method", name, list(_REGISTRY))
    params = inspect.signature(_REGISTRY[key]).parameters.values()
    return {p.name: (None if p.default is p.empty else p.default) for p in params
            if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


def describe_method(name: str, detail: bool = False) -> str:
    """One line on method ``name`` (options with defaults, then its summary); with ``detail``, also the default
    level and the full documentation of its weighting and aggregator (paper, equations, choices).

    Example:
        >>> describe_method("ew")
        'ew: Equal weighting: one backward of the summed loss.'
    """
    options = method_options(name)
    key = name.lower()
    doc = inspect.getdoc(_REGISTRY[key]) or ""
    opts = ", ".join(f"{k}={v!r}" for k, v in options.items())
    m = build_method(key)
    level = f" [{m.level} level]" if m.aggregator.needs_per_task_grads else ""
    line = f"{key}{' (' + opts + ')' if opts else ''}{level}: {doc.splitlines()[0] if doc else '(no description)'}"
    if not detail:
        return line
    parts = [line, "", f"default level: {m.level}" + (" (one model per task)" if m.single_task else "")]
    for role, obj in (("weighting", m.weighting), ("aggregator", m.aggregator)):
        parts += ["", f"{role}: {type(obj).__module__}.{type(obj).__name__}", "",
                  inspect.getdoc(type(obj)) or "(no documentation)"]
    return "\n".join(parts)


def build_method(name: str, level: Level | None = None, **options: Any) -> Method:
    """Build the method ``name`` with its ``options`` (keyword arguments of its factory).

    Raises:
        ConfigError: unknown name (lists the valid ones) or unknown option (lists the valid options).
    """
    _load_all()
    key = name.lower()
    if key not in _REGISTRY:
        raise unknown_name("method", name, list(_REGISTRY))
    factory = _REGISTRY[key]
    check_options("method", key, factory, options)
    method = factory(**options)
    if not isinstance(method, Method):
        raise TypeError(f"factory of method {key!r} returned {type(method).__name__}, not Method")
    method.name = key
    if level is not None:
        if level not in ("parameter", "representation"):
            raise ConfigError(f"unknown level {level!r}; valid levels are: parameter, representation")
        method.level = level
    return method


@register("ew")
def _ew() -> Method:
    """Equal weighting: one backward of the summed loss."""
    return Method(EW(), Sum())


@register("stl")
def _stl() -> Method:
    """Single-task learning: one model per task, each trained on its own loss (the Δm reference)."""
    return Method(EW(), Sum(), single_task=True)


@register("mean")
def _mean() -> Method:
    """Mean of the task gradients (EW scaled by 1/T)."""
    from mtlkit.aggregation._base import Mean

    return Method(EW(), Mean())
