"""Base class of multi-task architectures and the model registry."""
from __future__ import annotations

import inspect
from typing import Any, Callable, Iterator

from torch import Tensor, nn

from mtlkit.errors import ConfigError, unknown_name


class MTLModel(nn.Module):
    """A multi-task network split into a shared part and task-specific parts.

    Subclasses implement ``encode(x) -> z`` (the shared representation every head reads) and
    ``decode(z) -> {task: output}``. ``forward(x) = decode(encode(x))``. ``shared_parameters()`` are the parameters
    the gradient-space methods combine (default: those of ``self.encoder``); ``last_shared_layer()`` is where
    GradNorm-like methods measure gradient norms.
    """

    encoder: nn.Module

    def encode(self, x: Tensor) -> Tensor:
        return self.encoder(x)

    def decode(self, z: Tensor) -> dict[str, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return self.decode(self.encode(x))

    def shared_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.encoder.parameters() if p.requires_grad]

    def last_shared_layer(self) -> list[nn.Parameter]:
        weights = [p for p in self.shared_parameters() if p.dim() >= 2]
        return weights[-1:]

    def task_parameters(self) -> Iterator[nn.Parameter]:
        shared = {id(p) for p in self.shared_parameters()}
        return (p for p in self.parameters() if id(p) not in shared)


_MODELS: dict[str, Callable[..., MTLModel]] = {}


def register_model(name: str) -> Callable[[Callable[..., MTLModel]], Callable[..., MTLModel]]:
    """Decorator: register a factory ``(data: MTLData, **options) -> MTLModel``."""

    def deco(fn: Callable[..., MTLModel]) -> Callable[..., MTLModel]:
        _MODELS[name] = fn
        return fn

    return deco


def _load_all() -> None:
    """Import every model module of the package (each registers its factories)."""
    import importlib
    import pkgutil

    import mtlkit.models as pkg

    for mod in pkgutil.iter_modules(pkg.__path__):
        if not mod.name.startswith("_") and mod.name != "base":
            importlib.import_module(f"mtlkit.models.{mod.name}")


def available_models() -> list[str]:
    _load_all()
    return sorted(_MODELS)


def build_model(name: str, data: Any, **options: Any) -> MTLModel:
    """Build model ``name`` for ``data``; unknown names/options raise :class:`ConfigError` listing the valid ones."""
    _load_all()
    if name not in _MODELS:
        raise unknown_name("model", name, list(_MODELS))
    fn = _MODELS[name]
    valid = [p for p in inspect.signature(fn).parameters if p != "data"]
    bad = [k for k in options if k not in valid]
    if bad:
        raise ConfigError(f"model {name!r} has no option(s) {bad}; its options are: {', '.join(valid)}")
    return fn(data, **options)
