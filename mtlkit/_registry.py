"""Helpers shared by mtlkit's registries (methods, models, datasets, reproductions)."""
from __future__ import annotations

import importlib
import inspect
import pkgutil
from typing import Any, Callable, Iterable

from mtlkit.errors import ConfigError


def import_submodules(package: str, path: Iterable[str], skip: Iterable[str] = ()) -> None:
    """Import every public module of ``package`` (located at ``path``) except ``skip``: each registers itself."""
    skipped = set(skip)
    for mod in pkgutil.iter_modules(path):
        if not mod.name.startswith("_") and mod.name not in skipped:
            importlib.import_module(f"{package}.{mod.name}")


def check_options(kind: str, name: str, factory: Callable[..., Any], options: dict[str, Any],
                  positional: Iterable[str] = ()) -> None:
    """Raise :class:`ConfigError` if ``options`` holds a keyword ``factory`` does not take (listing the valid ones).

    ``positional`` names arguments the registry passes itself (e.g. ``data``), which are not user options.
    """
    params = inspect.signature(factory).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    reserved = set(positional)
    valid = [n for n, p in params.items() if n not in reserved and p.kind is not p.VAR_POSITIONAL]
    bad = [k for k in options if k not in valid]
    if bad:
        raise ConfigError(f"{kind} {name!r} has no option(s) {bad}; its options are: {', '.join(valid) or '(none)'}")
