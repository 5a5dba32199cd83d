"""MTVIB and STVIB: a stochastic (variational information bottleneck) shared representation.

Qian, Chen, Zhang, Wen & Gechter, "Multi-task variational information bottleneck", arXiv preprint arXiv:2007.00339
(2020; v4 2021), doi:10.48550/arXiv.2007.00339 (MTVIB). Implemented:

* the encoder ``p_φ(z|x) = N(μ_z(x), diag σ_z(x)²)`` of Table I(c)/(d) for 36x36 inputs: Conv64 3x3 + BN + ReLU,
  MaxPool 2, Conv64 3x3 + BN + ReLU, MaxPool 2, FC 3136x1024 + BN + ReLU, FC 1024x1024 + BN + ReLU (x2), then two
  parallel FC 1024x256 + BN layers, one giving μ, one giving σ (latent dimension 256);
* the reparameterised sample ``z = μ_z(x) + σ_z(x) ⊙ ε``, ``ε ~ N(0, I)`` (Eq. 9);
* one decoder per task; MTVIB (Table I(d)): FC 256x384 + BN + ReLU, FC 384x192, FC 192xC; STVIB (Table I(c)):
  FC 256x384 + BN + ReLU, FC 384x192 + BN + ReLU, FC 192xC;
* the KL term ``KL(p_φ(z|x) || N(0, I))`` of Eq. 8/10 (:func:`mtlkit.nn.losses.gaussian_kl`), exposed, multiplied by β
  (``beta``, 1e-3 in the paper), through the generic auxiliary-loss hook (:meth:`MTVIB.auxiliary_loss`): the
  trainer adds ``β·KL`` of the latest forward pass to the backward, outside any task weighting or gradient
  aggregation. The uncertainty-weighted task part of Eq. 23 is the method ``mtvib`` (= :class:`mtlkit.weighting.UW`
  with the classification form); ``mtlkit train --model mtvib --method mtvib`` is the paper's MTVIB and
  ``--model stvib --method stl`` its STVIB (one VIB per task, loss CE + β·KL, Eq. 4). Eq. 22 as printed has a sign
  error (``log p ≈ (1/σ²)·log softmax + log σ`` makes the loss ``CE/σ² − log σ``, unbounded below as σ → ∞); we
  follow Eq. 23 and Kendall, Gal & Cipolla (CVPR 2018, Eq. 10): ``CE/σ² + log σ``.

Choices where the paper is ambiguous (and why):

* Table I lists "FC 1024x256 + BN + ReLU" for both μ and σ. μ keeps BN + ReLU by default (``mean_activation=
  "relu"``, literal Table I; ``"linear"`` is the usual VIB). σ uses BN then **softplus** instead of ReLU
  (plus ``min_std``): a ReLU gives σ = 0 on half of its inputs, where ``log σ`` in the KL is infinite.
* Table I(d) draws the MTVIB decoders' middle layer "FC 384x192" without BN + ReLU (unlike (b) and (c)). Read
  literally, FC 384x192 followed by FC 192xC is one linear map of rank <= C (two layers with nothing between them
  collapse into one), so the literal MTVIB decoder is a one-hidden-layer MLP while STVIB's has two hidden layers. Both
  readings are the option ``decoder_bn_relu``: ``False`` (literal, default for ``mtvib``) or ``True`` (BN + ReLU as
  in (b)/(c), default for ``stvib``); ``mtlkit reproduce mtvib --models MTVIB MTVIB-BN`` trains both side by side.
* Prediction (Sec. IV, end: "we first sample the latent variable z ... whose outputs are our model's predictions"),
  option ``predict`` in eval mode:

  - ``"mean"`` (**default of the model**): decode ``z = μ``; deterministic, so model selection on validation and
    repeated evaluations see one well-defined function;
  - ``"sample"``: decode one sample ``z = μ + σ ⊙ ε`` (the paper's literal prediction), logits of that sample;
  - ``"average"``: decode ``num_samples`` = K samples and return ``log(mean_k softmax(f(z_k)))``, the Monte Carlo
    estimate of the predictive distribution ``E_z[p(y|z)]`` (Alemi et al., "Deep Variational Information
    Bottleneck", ICLR 2017, use K = 12); still valid logits for the cross-entropy and argmax.

  The noise is drawn from ``generator`` (a :class:`torch.Generator` on the model's device) when it is set, else from
  torch's global generator. In training mode one sample is drawn per example (Eq. 23's Monte Carlo estimate with
  one sample), whatever ``predict`` says. ``mtlkit reproduce mtvib --predict`` sets the mode used under attack.
* The KL is averaged over the batch (the 1/N of Eq. 23) and summed over the 256 latent dimensions.

Example:
    >>> import torch
    >>> from types import SimpleNamespace
    >>> from mtlkit.tasks import Task
    >>> tasks = [Task("a", "multiclass", 10), Task("b", "multiclass", 10)]
    >>> data = SimpleNamespace(input_shape=(1, 36, 36), tasks=tasks)
    >>> m = build_mtvib(data, hidden=32, latent=8, decoder_widths=(16, 8))
    >>> {k: tuple(v.shape) for k, v in m(torch.rand(2, 1, 36, 36)).items()}
    {'a': (2, 10), 'b': (2, 10)}
    >>> bool(m.auxiliary_loss() >= 0)  # β·KL of that (training) forward pass
    True
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtlkit.errors import ConfigError
from mtlkit.models.base import MTLModel, register_model
from mtlkit.models.hps import conv_trunk
from mtlkit.nn.losses import gaussian_kl

Predict = Literal["mean", "sample", "average"]
PREDICT_MODES: tuple[str, ...] = ("mean", "sample", "average")
MeanActivation = Literal["relu", "linear"]


class GaussianEncoder(nn.Module):
    """``x -> (μ, σ)`` of ``p_φ(z|x)``: MTVIB Table I(c)/(d) encoder (see the module docstring for the choices).

    Example:
        >>> import torch
        >>> enc = GaussianEncoder((1, 36, 36), hidden=16, latent=4)
        >>> mu, std = enc(torch.rand(3, 1, 36, 36)); tuple(mu.shape), bool((std > 0).all())
        ((3, 4), True)
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        channels: int = 64,
        hidden: int = 1024,
        depth: int = 3,
        latent: int = 256,
        mean_activation: MeanActivation = "relu",
        min_std: float = 1e-4,
    ):
        super().__init__()
        if len(input_shape) != 3:
            raise ConfigError(f"GaussianEncoder needs (C, H, W) inputs, got input_shape {tuple(input_shape)}")
        if mean_activation not in ("relu", "linear"):
            raise ConfigError(f"mean_activation must be 'relu' or 'linear', got {mean_activation!r}")
        if depth < 1 or latent < 1 or hidden < 1 or min_std <= 0:
            raise ConfigError("GaussianEncoder needs depth, latent, hidden >= 1 and min_std > 0")
        conv, flat = conv_trunk(input_shape, channels)
        fcs: list[nn.Module] = []
        d = flat
        for _ in range(depth):  # FC 3136x1024, 1024x1024, 1024x1024, each + BN + ReLU
            fcs += [nn.Linear(d, hidden), nn.BatchNorm1d(hidden), nn.ReLU()]
            d = hidden
        self.trunk = nn.Sequential(*conv, *fcs)
        mean_layers: list[nn.Module] = [nn.Linear(d, latent), nn.BatchNorm1d(latent)]
        if mean_activation == "relu":
            mean_layers.append(nn.ReLU())
        self.mean = nn.Sequential(*mean_layers)
        self.scale = nn.Sequential(nn.Linear(d, latent), nn.BatchNorm1d(latent))
        self.min_std = float(min_std)
        self.out_features = latent

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.trunk(x)
        return self.mean(h), F.softplus(self.scale(h)) + self.min_std


def decoder(
    latent: int, num_outputs: int, widths: Sequence[int] = (384, 192), bn_relu_middle: bool = False
) -> nn.Sequential:
    """Task decoder: FC latent x 384 + BN + ReLU, FC 384 x 192 (+ BN + ReLU if ``bn_relu_middle``), FC 192 x C."""
    if len(widths) != 2:
        raise ConfigError(f"decoder widths must be two numbers (384, 192 in the paper), got {tuple(widths)}")
    a, b = widths
    layers: list[nn.Module] = [nn.Linear(latent, a), nn.BatchNorm1d(a), nn.ReLU(), nn.Linear(a, b)]
    if bn_relu_middle:
        layers += [nn.BatchNorm1d(b), nn.ReLU()]
    layers.append(nn.Linear(b, num_outputs))
    return nn.Sequential(*layers)


class MTVIB(MTLModel):
    """Stochastic encoder + one decoder per task (MTVIB Table I(d); with one task, STVIB Table I(c)).

    ``encode(x)`` returns the representation the heads read: a reparameterised sample (Eq. 9) in training mode, μ
    (``predict="mean"``) or one sample (``"sample"``, ``"average"``) in eval mode; it stores ``β·KL`` of that pass
    for :meth:`auxiliary_loss` (training mode only). ``forward`` in eval mode with ``predict="average"`` averages the
    predictive distributions of ``num_samples`` samples (see the module docstring).

    Example:
        >>> import torch
        >>> enc = GaussianEncoder((1, 36, 36), hidden=16, latent=4)
        >>> m = MTVIB(enc, {"a": decoder(4, 3, (8, 8))}, beta=1e-3)
        >>> out = m(torch.rand(5, 1, 36, 36)); tuple(out["a"].shape), m.auxiliary_loss() is not None
        ((5, 3), True)
        >>> m.auxiliary_loss() is None  # consumed: only the latest forward's KL is ever used once
        True
    """

    def __init__(
        self,
        encoder: GaussianEncoder,
        heads: dict[str, nn.Module],
        beta: float = 1e-3,
        predict: Predict = "mean",
        num_samples: int = 12,
    ):
        super().__init__()
        if beta < 0:
            raise ConfigError(f"beta must be >= 0, got {beta}")
        if predict not in PREDICT_MODES:
            raise ConfigError(f"predict must be one of {', '.join(PREDICT_MODES)}, got {predict!r}")
        if num_samples < 1:
            raise ConfigError(f"num_samples must be >= 1, got {num_samples}")
        self.encoder = encoder
        self.heads = nn.ModuleDict(heads)
        self.beta = float(beta)
        self.predict = predict
        self.num_samples = int(num_samples)
        self.generator: torch.Generator | None = None  # source of ε when set (see the module docstring)
        self._aux: Tensor | None = None
        self.last_kl: Tensor | None = None  # detached KL of the latest forward (for logging)

    def distribution(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(μ, σ)`` of ``p_φ(z|x)``."""
        return self.encoder(x)

    @staticmethod
    def reparameterize(mu: Tensor, std: Tensor, eps: Tensor | None = None) -> Tensor:
        """Eq. 9: ``z = μ + σ ⊙ ε`` with ``ε ~ N(0, I)`` (or the given ``eps``); differentiable in μ and σ.

        Example:
            >>> import torch
            >>> MTVIB.reparameterize(torch.tensor([1.0]), torch.tensor([2.0]), eps=torch.tensor([0.5]))
            tensor([2.])
        """
        if eps is None:
            eps = torch.randn_like(std)
        return mu + std * eps

    def _noise(self, std: Tensor) -> Tensor:
        if self.generator is None:
            return torch.randn_like(std)
        return torch.randn(std.shape, generator=self.generator, device=std.device, dtype=std.dtype)

    def _record(self, mu: Tensor, std: Tensor) -> None:
        kl = gaussian_kl(mu, std)
        self.last_kl = kl.detach()
        # Only a training pass with grad leaves a loss for the hook (an attack's or an evaluation's pass does not).
        self._aux = self.beta * kl if (self.beta > 0 and self.training and torch.is_grad_enabled()) else None

    def encode(self, x: Tensor) -> Tensor:
        mu, std = self.distribution(x)
        self._record(mu, std)
        if self.training or self.predict != "mean":
            return self.reparameterize(mu, std, self._noise(std))
        return mu

    def decode(self, z: Tensor) -> dict[str, Tensor]:
        return {name: h(z) for name, h in self.heads.items()}

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        if self.training or self.predict != "average":
            return self.decode(self.encode(x))
        mu, std = self.distribution(x)
        self._record(mu, std)
        probs: dict[str, Tensor] = {}
        for _ in range(self.num_samples):
            for k, v in self.decode(self.reparameterize(mu, std, self._noise(std))).items():
                p = v.softmax(dim=-1)
                probs[k] = probs[k] + p if k in probs else p
        return {k: torch.log(p / self.num_samples + 1e-12) for k, p in probs.items()}

    def auxiliary_loss(self) -> Tensor | None:
        """``β·KL(p_φ(z|x) || N(0, I))`` (batch mean) of the latest training-mode forward pass, or None; consumed.

        This is the generic hook of :func:`mtlkit.models.base.auxiliary_loss`: the trainer back-propagates it
        together with the (weighted) task losses.
        """
        aux, self._aux = self._aux, None
        return aux


def _build(
    data,
    beta: float,
    latent: int,
    hidden: int,
    depth: int,
    channels: int,
    decoder_widths: Sequence[int],
    decoder_bn_relu: bool,
    mean_activation: MeanActivation,
    predict: Predict,
    num_samples: int,
    min_std: float,
) -> MTVIB:
    bad = [t.name for t in data.tasks if t.kind != "multiclass"]
    if bad:
        raise ConfigError(f"MTVIB decoders are softmax classifiers; task(s) {bad} are not multiclass")
    enc = GaussianEncoder(
        data.input_shape,
        channels=channels,
        hidden=hidden,
        depth=depth,
        latent=latent,
        mean_activation=mean_activation,
        min_std=min_std,
    )
    heads: dict[str, nn.Module] = {
        t.name: decoder(latent, t.num_outputs, decoder_widths, decoder_bn_relu) for t in data.tasks
    }
    return MTVIB(enc, heads, beta=beta, predict=predict, num_samples=num_samples)


@register_model("mtvib")
def build_mtvib(
    data,
    beta: float = 1e-3,
    latent: int = 256,
    hidden: int = 1024,
    depth: int = 3,
    channels: int = 64,
    decoder_widths: Sequence[int] = (384, 192),
    decoder_bn_relu: bool = False,
    mean_activation: MeanActivation = "relu",
    predict: Predict = "mean",
    num_samples: int = 12,
    min_std: float = 1e-4,
) -> MTVIB:
    """MTVIB, Table I(d): shared Gaussian encoder, one decoder per task (middle layer without BN + ReLU)."""
    return _build(
        data,
        beta,
        latent,
        hidden,
        depth,
        channels,
        decoder_widths,
        decoder_bn_relu,
        mean_activation,
        predict,
        num_samples,
        min_std,
    )


@register_model("stvib")
def build_stvib(
    data,
    beta: float = 1e-3,
    latent: int = 256,
    hidden: int = 1024,
    depth: int = 3,
    channels: int = 64,
    decoder_widths: Sequence[int] = (384, 192),
    decoder_bn_relu: bool = True,
    mean_activation: MeanActivation = "relu",
    predict: Predict = "mean",
    num_samples: int = 12,
    min_std: float = 1e-4,
) -> MTVIB:
    """STVIB, Table I(c): the VIB of one task (use with ``--method stl``: one such model per task)."""
    return _build(
        data,
        beta,
        latent,
        hidden,
        depth,
        channels,
        decoder_widths,
        decoder_bn_relu,
        mean_activation,
        predict,
        num_samples,
        min_std,
    )
