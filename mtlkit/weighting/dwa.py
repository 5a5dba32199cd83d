"""DWA: Dynamic Weight Average.

Liu, Johns & Davison, "End-to-end multi-task learning with attention", CVPR 2019, Sec. 3.3, Eq. 7.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mtlkit._registry import METHODS
from mtlkit.errors import ConfigError
from mtlkit.weighting._base import StepContext, Weighting, _check_losses


@METHODS.register("dwa")
class DWA(Weighting):
    r"""Dynamic Weight Average (Liu et al. 2019), temperature 2 by default.

    Dynamic Weight Average: weights from the rate at which each task's loss went down over the last epochs.

    Eq. 7: ``w_t(e) = T·exp(r_t(e−1)/τ) / Σ_k exp(r_k(e−1)/τ)`` with ``r_t(e−1) = L_t(e−1)/L_t(e−2)``, where
    ``L_t(e)`` is task t's mean training loss over epoch e and τ the temperature (2 in the paper). The weights sum
    to T. In the first two epochs (no two past epochs to compare) every weight is 1, as in the paper.

    The training loop must call ``on_epoch_end(mean_losses)`` at the end of each epoch with the epoch's mean
    per-task training losses (like the official code and LibMTL, which average over the epoch's batches). The last
    two epoch means and the number of epochs seen are buffers, so a checkpoint resumes with the same weights.

    Example:
        >>> import torch
        >>> dwa = DWA(temperature=2.0)
        >>> dwa(torch.tensor([1.0, 1.0]))  # epoch 0: weights 1
        tensor([1., 1.])
        >>> dwa.on_epoch_end(torch.tensor([1.0, 1.0])); dwa.on_epoch_end(torch.tensor([0.5, 1.0]))
        >>> dwa.weights()  # r = [0.5, 1]: 2·softmax([0.25, 0.5])
        tensor([0.8756, 1.1244])
    """

    equal_weight_epochs = 2

    history: Tensor
    epochs_seen: Tensor

    def __init__(self, temperature: float = 2.0) -> None:
        super().__init__()
        if (
            isinstance(temperature, bool)
            or not isinstance(temperature, (int, float))
            or not math.isfinite(temperature)
            or temperature <= 0
        ):
            raise ConfigError(f"DWA temperature must be a positive finite number, got {temperature!r}")
        self.temperature = float(temperature)

    def _build(self, num_tasks: int) -> None:
        # history[0] = L(e-2), history[1] = L(e-1) once two epochs have ended.
        self.register_buffer("history", torch.zeros(2, num_tasks))
        self.register_buffer("epochs_seen", torch.zeros((), dtype=torch.long))

    def weights(self) -> Tensor | None:
        if self.num_tasks is None:
            return None
        if int(self.epochs_seen) < 2:
            return torch.ones(self.num_tasks, device=self.history.device)
        ratio = self.history[1] / self.history[0]
        return self.num_tasks * torch.softmax(ratio / self.temperature, dim=0)

    def forward(self, losses: Tensor, ctx: StepContext | None = None) -> Tensor:
        self._prepare(losses)
        w = self.weights()
        if w is None:  # _prepare has set the weighting up
            raise RuntimeError("DWA is not set up")
        return w.to(device=losses.device, dtype=losses.dtype) * losses

    def on_epoch_end(self, mean_losses: Tensor) -> None:
        mean_losses = torch.as_tensor(mean_losses, dtype=torch.float32)
        _check_losses(mean_losses)
        self._prepare(mean_losses)
        m = mean_losses.detach().to(self.history)
        if not bool(torch.isfinite(m).all()) or bool((m <= 0).any()):
            raise ValueError(f"DWA needs positive finite epoch mean losses, got {m.tolist()}")
        self.history[0] = self.history[1]
        self.history[1] = m
        self.epochs_seen += 1
