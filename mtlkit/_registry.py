"""mtlkit's registries: one generic :class:`Registry` and its instances (methods, models, datasets, metrics,
reproductions).

A registry maps a name to an object (a class, a factory function, a record) plus free-form metadata. It reads the
options a user may pass from the object's signature, so that listing, checking and building never drift from the
code. Each registry names the packages whose modules register into it: they are imported the first time the registry
is read, so a new file in such a package needs no edit anywhere else.

The instances live here, so that a method file imports :data:`METHODS` without importing :mod:`mtlkit.methods`
(which imports method files): this module imports nothing of mtlkit but :mod:`mtlkit.errors`.

Example:
    >>> reg = Registry("colour")
    >>> @reg.register("teal", hue=180)
    ... def teal(alpha: float = 1.0) -> str:
    ...     '''A blue-green.'''
    ...     return f"teal@{alpha}"
    >>> reg.names(), reg.get("teal").summary, reg.get("teal").meta["hue"]
    (['teal'], 'A blue-green.', 180)
    >>> reg.build("teal", alpha=0.5)
    'teal@0.5'
    >>> reg.build("teal", alpa=0.5)
    Traceback (most recent call last):
    ...
    mtlkit.errors.ConfigError: colour 'teal' has no option(s) ['alpa']; its options are: alpha
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Generic, TypeVar, overload

from mtlkit.errors import ConfigError, unknown_name

T = TypeVar("T")


def import_submodules(package: str, path: Iterable[str], skip: Iterable[str] = ()) -> None:
    """Import every public module of ``package`` (located at ``path``) except ``skip``: each registers itself.

    Example:
        >>> import mtlkit.aggregation as pkg
        >>> import_submodules(pkg.__name__, pkg.__path__)
    """
    skipped = set(skip)
    for mod in pkgutil.iter_modules(path):
        if not mod.name.startswith("_") and mod.name not in skipped:
            importlib.import_module(f"{package}.{mod.name}")


class _Required:
    """Type of :data:`REQUIRED` (the default of an option that has none)."""

    _instance: _Required | None = None

    def __new__(cls) -> _Required:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "REQUIRED"

    def __reduce__(self) -> str:
        return "REQUIRED"


#: The default of an :class:`Option` that has no default (the user must give it).
REQUIRED: Any = _Required()


@dataclass(frozen=True)
class Option:
    """One option of a registered object: a keyword argument of its signature.

    Attributes:
        name: the keyword.
        default: its default, or :data:`REQUIRED` when it has none.
        annotation: its type annotation (evaluated where it can be, else the string as written), or None.

    Example:
        >>> Option("c", 0.4, "float").required, Option("weights").required
        (False, True)
    """

    name: str
    default: Any = REQUIRED
    annotation: Any = None

    @property
    def required(self) -> bool:
        """Whether the option has no default."""
        return self.default is REQUIRED


def signature_options(obj: Any, positional: Sequence[str] = ()) -> tuple[dict[str, Option], bool]:
    """The options of ``obj``'s signature (a class: its ``__init__``) except ``positional``, ``*args`` and
    ``**kwargs``; and whether it takes ``**kwargs`` (then it accepts any option). An object that is not callable, or
    whose signature cannot be read, has no options.

    Example:
        >>> def f(data, k: int = 3, *rest, **extra): ...
        >>> opts, open_ended = signature_options(f, positional=("data",))
        >>> list(opts), opts["k"].default, open_ended
        (['k'], 3, True)
    """
    if not callable(obj):
        return {}, False
    try:
        try:  # annotations as objects where they resolve (modules with ``from __future__ import annotations``)
            sig = inspect.signature(obj, eval_str=True)
        except Exception:
            sig = inspect.signature(obj)
    except (TypeError, ValueError):  # a builtin without a signature
        return {}, False
    params = sig.parameters.values()
    reserved = set(positional)
    options: dict[str, Option] = {}
    open_ended = False
    for p in params:
        if p.kind is p.VAR_KEYWORD:
            open_ended = True
        elif p.kind is not p.VAR_POSITIONAL and p.name not in reserved:
            options[p.name] = Option(
                p.name,
                REQUIRED if p.default is p.empty else p.default,
                None if p.annotation is p.empty else p.annotation,
            )
    return options, open_ended


def _summary(obj: Any) -> str:
    # obj's own docstring (inspect.getdoc would fall back to a base class's, e.g. Aggregator's for an undocumented
    # subclass: a summary of the wrong thing)
    doc = inspect.cleandoc(getattr(obj, "__doc__", None) or "")
    return doc.splitlines()[0].strip() if doc else ""


@dataclass(frozen=True)
class Entry(Generic[T]):
    """A registered object and what the registry knows about it.

    Attributes:
        name: the registered name.
        obj: the object (a class, a factory, a record).
        meta: the keyword arguments given to :meth:`Registry.register` (read-only).
        module: the module ``obj`` was defined in (``obj.__module__``; for an instance, its own ``__module__`` if set).
        summary: the first line of its docstring (or ``meta["summary"]`` when given).
        options: its options by name, from its signature (:func:`signature_options`).
        open_ended: whether it takes ``**kwargs`` (then any option passes :meth:`Registry.check`).

    Example:
        >>> reg = Registry("thing")
        >>> _ = reg.register("f", lambda k=1: k, zoo=False)
        >>> e = reg.get("f")
        >>> e.name, list(e.options), e.options["k"].default, dict(e.meta)
        ('f', ['k'], 1, {'zoo': False})
    """

    name: str
    obj: T
    meta: Mapping[str, Any]
    module: str
    summary: str
    options: dict[str, Option] = field(default_factory=dict)
    open_ended: bool = False


class Registry(Generic[T]):
    """Names mapped to objects, with options read from their signatures and modules imported on first read.

    Args:
        kind: what is registered, for messages (``"method"``: "unknown method 'x'; valid methods are: ...").
        packages: dotted names of packages whose public submodules (not starting with ``_``) are imported the first
            time the registry is read, so that each registers itself; a plain module in the list is imported itself.
        skip: submodule names of those packages not to import.
        positional: call arguments the registry's user passes itself (models get ``data``), not user options.

    Reading (``names``, ``get``, ``in``, iteration, ``check``, ``build``) loads the packages; ``register`` does not.
    A name registered twice with another object raises ``ValueError`` (a programming error, not a config one).

    Example:
        >>> shapes = Registry("shape", positional=("size",))
        >>> @shapes.register("square")
        ... class Square:
        ...     '''A square.'''
        ...     def __init__(self, size: float, rounded: bool = False) -> None:
        ...         self.size, self.rounded = size, rounded
        >>> list(shapes.get("square").options), "square" in shapes
        (['rounded'], True)
        >>> shapes.build("square", 2.0, rounded=True).rounded
        True
        >>> shapes.get("circle")
        Traceback (most recent call last):
        ...
        mtlkit.errors.ConfigError: unknown shape 'circle'; valid shapes are: square
    """

    def __init__(
        self, kind: str, packages: Sequence[str] = (), skip: Sequence[str] = (), positional: Sequence[str] = ()
    ) -> None:
        self.kind = kind
        self.packages = tuple(packages)
        self.skip = tuple(skip)
        self.positional = tuple(positional)
        self._entries: dict[str, Entry[T]] = {}
        self._loaded = not self.packages
        self._loading = False

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, packages={list(self.packages)})"

    # ------------------------------------------------------------------------------------------------ writing
    @overload
    def register(self, name: str, obj: None = None, /, **meta: Any) -> Callable[[T], T]: ...

    @overload
    def register(self, name: str, obj: T, /, **meta: Any) -> T: ...

    def register(self, name: str, obj: Any = None, /, **meta: Any) -> Any:
        """Register ``obj`` under ``name`` with metadata ``meta``; without ``obj``, return a decorator that does.

        Returns ``obj`` (the decorated class or function is unchanged).

        Raises:
            ValueError: ``name`` is already registered with another object.

        Example:
            >>> reg = Registry("thing")
            >>> f = reg.register("f", len)
            >>> reg.register("f", max)
            Traceback (most recent call last):
            ...
            ValueError: thing 'f' is registered twice (builtins.len, then builtins.max)
        """
        if obj is None:

            def deco(o: T) -> T:
                self.register(name, o, **meta)
                return o

            return deco
        if not isinstance(name, str) or not name:
            raise ValueError(f"a {self.kind} name must be a non-empty string, got {name!r}")
        old = self._entries.get(name)
        if old is not None:
            if old.obj is obj:
                return obj
            raise ValueError(f"{self.kind} {name!r} is registered twice ({_where(old.obj)}, then {_where(obj)})")
        options, open_ended = signature_options(obj, self.positional)
        summary = str(meta["summary"]) if "summary" in meta else _summary(obj)
        module = getattr(obj, "__module__", None) or type(obj).__module__
        self._entries[name] = Entry(name, obj, MappingProxyType(dict(meta)), module, summary, options, open_ended)
        return obj

    # ------------------------------------------------------------------------------------------------ reading
    def _load(self) -> None:
        if self._loaded or self._loading:  # while loading, a module that reads the registry sees what is there
            return
        self._loading = True
        try:
            for name in self.packages:
                mod = importlib.import_module(name)
                path = getattr(mod, "__path__", None)
                if path is not None:
                    import_submodules(name, path, self.skip)
            self._loaded = True
        finally:
            self._loading = False

    def names(self) -> list[str]:
        """The registered names, sorted.

        Example:
            >>> from mtlkit._registry import METHODS
            >>> "cagrad" in METHODS.names()
            True
        """
        self._load()
        return sorted(self._entries)

    def entries(self) -> list[Entry[T]]:
        """The entries, sorted by name."""
        self._load()
        return [self._entries[n] for n in sorted(self._entries)]

    def __iter__(self) -> Iterator[Entry[T]]:
        return iter(self.entries())

    def __len__(self) -> int:
        self._load()
        return len(self._entries)

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._entries

    def get(self, name: str) -> Entry[T]:
        """The entry of ``name``.

        Raises:
            ConfigError: unknown name (the message lists the valid ones).
        """
        self._load()
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise unknown_name(self.kind, str(name), list(self._entries)) from None

    def __getitem__(self, name: str) -> T:
        """The registered object of ``name`` (``registry.get(name).obj``)."""
        return self.get(name).obj

    def check(self, name: str, options: Mapping[str, Any]) -> None:
        """Raise :class:`ConfigError` if ``name`` is unknown or ``options`` holds a keyword its object does not take
        (the message names the unknown ones and lists the valid ones)."""
        entry = self.get(name)
        if entry.open_ended:
            return
        bad = [k for k in options if k not in entry.options]
        if bad:
            raise ConfigError(
                f"{self.kind} {name!r} has no option(s) {bad}; its options are: {', '.join(entry.options) or '(none)'}"
            )

    def build(self, name: str, *args: Any, **options: Any) -> Any:
        """:meth:`check` ``options``, then call the object: ``obj(*args, **options)`` (``args``: the positional
        arguments the registry's user passes itself)."""
        self.check(name, options)
        return self._entries[name].obj(*args, **options)  # type: ignore[operator]


def _where(obj: Any) -> str:
    return (
        f"{getattr(obj, '__module__', None) or type(obj).__module__}."
        f"{getattr(obj, '__qualname__', None) or type(obj).__qualname__}"
    )


#: Multi-task methods (:mod:`mtlkit.methods`): Aggregator and Weighting classes, composites, user factories.
METHODS: Registry[Any] = Registry("method", packages=("mtlkit.aggregation", "mtlkit.weighting", "mtlkit.methods"))
#: Architectures (:mod:`mtlkit.models`): factories ``(data, **options) -> MTLModel``.
MODELS: Registry[Any] = Registry("model", packages=("mtlkit.models",), skip=("base",), positional=("data",))
#: Datasets (:mod:`mtlkit.data`): builders ``(**options) -> MTLData``.
DATASETS: Registry[Any] = Registry("dataset", packages=("mtlkit.data",), skip=("sources", "multimnist"))
#: Per-task metrics (:mod:`mtlkit.metrics`): ``fn(head output, target, task) -> float``, meta ``higher_is_better``.
METRICS: Registry[Any] = Registry(
    "metric", packages=("mtlkit.metrics", "mtlkit.metrics.multilabel"), positional=("output", "target", "task")
)
#: Paper reproductions (:mod:`mtlkit.reproduce`), run by ``mtlkit reproduce NAME``.
REPRODUCTIONS: Registry[Any] = Registry("reproduction", packages=("mtlkit.reproduce",))

__all__ = [
    "DATASETS",
    "METHODS",
    "METRICS",
    "MODELS",
    "REPRODUCTIONS",
    "REQUIRED",
    "Entry",
    "Option",
    "Registry",
    "import_submodules",
    "signature_options",
]
