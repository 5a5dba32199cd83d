"""Base class of multi-task architectures and the model registry."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from mtlkit._registry import MODELS
from mtlkit.tasks import Task

if TYPE_CHECKING:
    from mtlkit.callbacks import Callback


class MTLModel(nn.Module):
    """A multi-task network split into a shared part and task-specific parts.

    Subclasses implement ``encode(x) -> z`` (the shared representation every head reads) and
    ``decode(z) -> {task: output}``. ``forward(x) = decode(encode(x))``. ``shared_parameters()`` are the parameters
    the gradient-space methods combine (default: those of ``self.encoder``); ``last_shared_layer()`` is where
    GradNorm-like methods measure gradient norms.

    **Hooks the training loop calls** (the contract between a model and :class:`mtlkit.train.Trainer`; each default
    does nothing, so a model overrides only what it needs and the loop never asks a model what it is):

    * :meth:`auxiliary_loss` — a non-task loss of the latest forward pass (MTVIB's β·KL), back-propagated with the
      task losses, outside any weighting or aggregation;
    * :meth:`auxiliary_tasks` — training-only tasks (RRMTDL's adversarial heads): trained, never selected on or
      reported;
    * :meth:`on_train_progress` — the fraction of training done, before every step (RRMTDL's λ schedule);
    * :meth:`task_first_layers` — per task, the first layer of its own network (MTMLAN's task-level balancing);
    * :meth:`representation_is_shared_path` — whether every path from a shared parameter to a loss goes through
      :meth:`encode`'s output (then the engine may use it; MAMO's task-owned modules below it say no);
    * :meth:`selection_groups` — parts selected on validation separately (STL: one per task);
    * :meth:`callbacks` — :class:`mtlkit.callbacks.Callback` s the model brings (MAMO's architecture search).

    Example:
        >>> import torch
        >>> class Two(MTLModel):
        ...     def __init__(self):
        ...         super().__init__(); self.encoder = torch.nn.Linear(3, 4)
        ...         self.heads = torch.nn.ModuleDict({"a": torch.nn.Linear(4, 1), "b": torch.nn.Linear(4, 1)})
        ...     def decode(self, z): return {k: h(z) for k, h in self.heads.items()}
        >>> m = Two(); sorted(m(torch.zeros(2, 3))), m.auxiliary_loss(), m.callbacks()
        (['a', 'b'], None, [])
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

    # -- hooks of the training loop (no-op defaults) -------------------------------------------------------------
    def auxiliary_loss(self) -> Tensor | None:
        """A scalar non-task loss computed by the latest forward pass (None: none)."""
        return None

    def auxiliary_tasks(self) -> list[Task]:
        """Training-only tasks (each ``Task(..., auxiliary=True)``), whose outputs ``forward`` also returns."""
        return []

    def on_train_progress(self, progress: float) -> None:
        """Called before every training step with the fraction of the run's steps done (0 <= progress < 1)."""

    def task_first_layers(self) -> Sequence[Sequence[Tensor]]:
        """Per task (in task order), the weight tensor(s) of the first layer of its task-specific network."""
        return ()

    def representation_is_shared_path(self) -> bool:
        """True when every path from :meth:`shared_parameters` to a loss goes through :meth:`encode`'s output."""
        return True

    def selection_groups(self) -> dict[str, nn.Module]:
        """Parts selected on validation separately: ``{task name: module}`` selects ``module`` on that task alone;
        empty (default): the whole model is selected on all tasks together."""
        return {}

    def callbacks(self) -> list[Callback]:
        """Callbacks this model brings to the run (after the config's own)."""
        return []


def check_auxiliary_loss(model: MTLModel) -> Tensor | None:
    """``model.auxiliary_loss()``, checked to be a scalar tensor or None.

    Example:
        >>> import torch
        >>> class Reg(MTLModel):
        ...     def __init__(self): super().__init__(); self.encoder = torch.nn.Linear(2, 2)
        ...     def auxiliary_loss(self): return self.encoder.weight.pow(2).sum()
        >>> m = Reg(); bool(check_auxiliary_loss(m) == m.encoder.weight.pow(2).sum())
        True
    """
    aux = model.auxiliary_loss()
    if aux is not None and (not isinstance(aux, Tensor) or aux.numel() != 1):
        raise TypeError(f"{type(model).__name__}.auxiliary_loss() must return a scalar tensor or None")
    return None if aux is None else aux.reshape(())


def register_model(name: str, **meta: Any) -> Callable[[Callable[..., MTLModel]], Callable[..., MTLModel]]:
    """Decorator: register a factory ``(data: MTLData, **options) -> MTLModel`` in :data:`mtlkit._registry.MODELS`
    (its options are its keyword arguments but ``data``; ``meta``: free-form metadata of the entry).

    Example:
        >>> from mtlkit._registry import MODELS
        >>> "data" in MODELS.get("hps").options, "hps" in available_models()
        (False, True)
    """
    return MODELS.register(name, **meta)


def available_models() -> list[str]:
    """Names accepted by :func:`build_model`."""
    return MODELS.names()


def build_model(name: str, data: Any, **options: Any) -> MTLModel:
    """Build model ``name`` for ``data``; unknown names/options raise :class:`ConfigError` listing the valid ones."""
    return MODELS.build(name, data, **options)
