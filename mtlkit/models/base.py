"""Base class of multi-task architectures and the model registry."""
from __future__ import annotations

from typing import Any, Callable, Iterator

from torch import Tensor, nn

from mtlkit._registry import check_options, import_submodules
from mtlkit.errors import unknown_name


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


def auxiliary_loss(model: nn.Module) -> Tensor | None:
    """Sum of the auxiliary (non-task) losses that the modules of ``model`` computed in their latest forward pass.

    Protocol: a module may define ``auxiliary_loss(self) -> Tensor | None`` returning a scalar loss of its *own*
    (not its submodules'), e.g. MTVIB's ``β·KL`` regulariser; the training loop back-propagates the sum together
    with the task losses, outside any task weighting or gradient aggregation. Returns None when no module has one.

    Example:
        >>> import torch
        >>> class Reg(torch.nn.Linear):
        ...     def auxiliary_loss(self): return self.weight.pow(2).sum()
        >>> net = torch.nn.Sequential(Reg(2, 2), torch.nn.ReLU())
        >>> bool(auxiliary_loss(net) == net[0].weight.pow(2).sum())
        True
    """
    total: Tensor | None = None
    for m in model.modules():
        fn = getattr(m, "auxiliary_loss", None)
        if not callable(fn):
            continue
        aux = fn()
        if aux is None:
            continue
        if not isinstance(aux, Tensor) or aux.numel() != 1:
            raise ValueError(f"{type(m).__name__}.auxiliary_loss() must return a scalar tensor or None")
        total = aux.reshape(()) if total is None else total + aux.reshape(())
    return total


_MODELS: dict[str, Callable[..., MTLModel]] = {}


def register_model(name: str) -> Callable[[Callable[..., MTLModel]], Callable[..., MTLModel]]:
    """Decorator: register a factory ``(data: MTLData, **options) -> MTLModel``."""

    def deco(fn: Callable[..., MTLModel]) -> Callable[..., MTLModel]:
        _MODELS[name] = fn
        return fn

    return deco


def _load_all() -> None:
    """Import every model module of the package (each registers its factories)."""
    import mtlkit.models as pkg

    import_submodules(pkg.__name__, pkg.__path__, skip=("base",))


def available_models() -> list[str]:
    _load_all()
    return sorted(_MODELS)


def build_model(name: str, data: Any, **options: Any) -> MTLModel:
    """Build model ``name`` for ``data``; unknown names/options raise :class:`ConfigError` listing the valid ones."""
    _load_all()
    if name not in _MODELS:
        raise unknown_name("model", name, list(_MODELS))
    fn = _MODELS[name]
    check_options("model", name, fn, options, positional=("data",))
    return fn(data, **options)
