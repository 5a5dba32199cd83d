"""STCH: Smooth Tchebycheff scalarisation.

Lin, Zhang, Yang, Liu, Wang & Zhang, "Smooth Tchebycheff Scalarization for Multi-Objective Optimization", ICML 2024
(PMLR 235:30479-30509; arXiv:2402.19078, OpenReview m4dO5L6eCp), Sec. 3: the smooth Tchebycheff scalarisation
``g_μ(x|λ) = μ·log Σ_i exp(λ_i (f_i(x) − z_i*)/μ)`` (its max-shift for stability is Appendix B.1 according to
TorchJD's port; the paper's own equation numbers could not be checked against its text here, so none is quoted); its
multi-task form is the one of the authors' code (github.com/Xi-L/STCH, ``STCH_MTL/LibMTL/weighting/STCH.py``, the same
as LibMTL's ``weighting/STCH.py``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from mtlkit._registry import METHODS
from mtlkit.errors import ConfigError
from mtlkit.weighting._base import StepContext, Weighting, _check_losses


def _positive_vector(name: str, value: Sequence[float] | Tensor | None) -> Tensor | None:
    """``value`` as a 1-D float64 tensor of positive finite numbers (None stays None); ConfigError otherwise."""
    if value is None:
        return None
    try:
        v = torch.as_tensor(value, dtype=torch.float64).flatten()
    except (TypeError, ValueError, RuntimeError):
        raise ConfigError(f"STCH {name} must be a sequence of positive numbers, got {value!r}") from None
    if v.numel() == 0 or not bool(torch.isfinite(v).all()) or bool((v <= 0).any()):
        raise ConfigError(f"STCH {name} must be a non-empty sequence of positive finite numbers, got {value!r}")
    return v


@METHODS.register("stch")
class STCH(Weighting):
    r"""STCH (Lin et al. 2024): smooth Tchebycheff scalarisation of the nadir-normalised log losses.

    Smooth Tchebycheff: a log-sum-exp (soft maximum) of the tasks' normalised log losses, after a warm-up.

    The training objective, as in the authors' multi-task code, in three phases (epochs counted by
    ``on_epoch_end``):

    * warm-up, epochs ``0 … warmup_epochs−1``: ``Σ_i log(L_i + ε)`` (the official code's warm-up);
    * the mean training loss of each task over the *last* warm-up epoch is the nadir point ``n`` (the official code
      averages ``losses.detach()`` over that epoch's batches; the trainer's ``on_epoch_end`` passes exactly that);
    * afterwards, with ``ℓ_i = log(L_i/n_i + ε)``:
      ``T·g_μ = T·μ·log Σ_i exp(λ_i ℓ_i/μ)`` (Sec. 3 with ``f_i = ℓ_i``, ``z* = 0``; the factor T is the code's).

    How the authors' code treats the ideal and nadir points: no ideal point is estimated. Each loss is normalised
    as ``(L_i − z_i*)/(n_i − z_i*)`` with ``z* = 0`` (losses are ``>= 0``) and the nadir ``n`` measured after the
    warm-up (their Pareto-set-learning code normalises the same way with known ideal/nadir points), then the log is
    taken, so the reference point of the log-sum-exp is 0: ``ℓ_i = 0`` where task i is back at its post-warm-up
    loss. The scalarisation is then invariant to each loss's scale, and STCH pushes down the task that has improved
    least *relative to its own nadir*. The preference is ``λ = 1`` there (one run, no preference sweep).

    What is returned: STCH couples the tasks through the log-sum-exp, so its value is no sum of per-task terms; the
    T entries returned are ``T·(p_i λ_i ℓ_i − μ p_i log p_i)`` with ``p = softmax(λℓ/μ)`` *detached*. By the
    variational form of log-sum-exp, ``μ·LSE(λℓ/μ) = Σ_i p_i λ_i ℓ_i − μ Σ_i p_i log p_i``, the entries sum to the
    scalarised loss ``T·g_μ`` exactly; their gradient, ``T·Σ_i p_i λ_i ∇ℓ_i``, is exactly the gradient of
    ``T·g_μ`` (``∂g_μ/∂ℓ_i = p_i λ_i``); and entry i depends (differentiably) on task i's loss only, so an
    aggregator downstream would still see each task's own gradient, weighted by ``T p_i λ_i``. In the warm-up the
    entries are ``log(L_i + ε)``.

    Choices:
      * ``warmup_epochs`` counts every warm-up epoch, the nadir one included: the official ``STCH_warmup_epoch=k``
        (log losses in epochs ``0…k``, nadir from epoch k, STCH from epoch k+1) is ``warmup_epochs=k+1``; the
        default 5 reproduces the official default k = 4. ``mu = 1`` and ``ε = 1e-20`` are the official defaults.
      * ``nadir`` may be given instead of measured (then ``warmup_epochs`` may be 0: STCH from the first step).
      * ``preference`` λ (the paper's preference vector, official code: all 1) is rescaled to sum to T, so that the
        default is the official λ = 1 and ``mu`` keeps the official meaning (λ and cλ point the same way; only
        ``λ/μ`` matters for the weights p).
      * The value uses ``torch.logsumexp`` (the max-shift of Appendix B.1, added back); the official code subtracts
        the detached max ``m`` and does not add ``T·m`` back: same gradient, a value lower by ``T·m``.

    Scale: ``sum``. The weights ``T p_i λ_i`` on the ``∇ℓ_i`` sum to T (λ = 1), as EW's; note that ``∇ℓ_i =
    ∇L_i/(L_i + ε n_i)``: like every log-loss method, the update is in "relative" units, not in the losses' units.

    The trainer must call ``on_epoch_end(mean_losses)`` after every epoch (as for DWA); without it (a loop of one's
    own) STCH stays in its warm-up unless ``nadir`` is given and ``warmup_epochs=0``. The epoch count, the nadir
    and the last weights are buffers: a checkpoint resumes in the same phase with the same nadir.

    Example:
        >>> import math, torch
        >>> stch = STCH(mu=0.5, warmup_epochs=0, nadir=[2.0, 1.0])
        >>> out = stch(torch.tensor([2.0, 2.0], requires_grad=True))  # ℓ = log([1, 2]) = [0, 0.693]
        >>> ref = 2 * 0.5 * math.log(math.exp(0.0 / 0.5) + math.exp(math.log(2) / 0.5))  # T·μ·LSE(ℓ/μ) = log 5
        >>> round(float(out.detach().sum()), 4), round(ref, 4)
        (1.6094, 1.6094)
        >>> stch.weights()  # T·softmax(ℓ/μ): the task furthest above its nadir gets more
        tensor([0.4000, 1.6000])
    """

    nadir_point: Tensor
    has_nadir: Tensor
    preference_weights: Tensor
    epochs_seen: Tensor
    last_weights: Tensor

    def __init__(
        self,
        mu: float = 1.0,
        warmup_epochs: int = 5,
        preference: Sequence[float] | None = None,
        nadir: Sequence[float] | None = None,
        eps: float = 1e-20,
    ) -> None:
        super().__init__()
        if isinstance(mu, bool) or not isinstance(mu, (int, float)) or not math.isfinite(mu) or mu <= 0:
            raise ConfigError(f"STCH mu (smoothing parameter) must be a positive finite number, got {mu!r}")
        if isinstance(warmup_epochs, bool) or not isinstance(warmup_epochs, int) or warmup_epochs < 0:
            raise ConfigError(f"STCH warmup_epochs must be an int >= 0, got {warmup_epochs!r}")
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
            raise ConfigError(f"STCH eps must be a finite number >= 0, got {eps!r}")
        self._preference = _positive_vector("preference", preference)
        self._nadir = _positive_vector("nadir", nadir)
        if self._nadir is None and warmup_epochs < 1:
            raise ConfigError(
                "STCH warmup_epochs must be >= 1 when nadir is not given: the nadir point is the mean loss of the "
                "last warm-up epoch (or pass nadir=[...] to start STCH at once)"
            )
        self.mu, self.warmup_epochs, self.eps = float(mu), warmup_epochs, float(eps)

    def _build(self, num_tasks: int) -> None:
        for name, v in (("preference", self._preference), ("nadir", self._nadir)):
            if v is not None and v.numel() != num_tasks:
                raise ConfigError(f"STCH got {v.numel()} {name} values but T={num_tasks} tasks")
        pref = torch.ones(num_tasks) if self._preference is None else self._preference.float()
        self.register_buffer("preference_weights", num_tasks * pref / pref.sum())
        given = self._nadir is not None
        self.register_buffer("nadir_point", self._nadir.float() if self._nadir is not None else torch.ones(num_tasks))
        self.register_buffer("has_nadir", torch.tensor(given))
        self.register_buffer("epochs_seen", torch.zeros((), dtype=torch.long))
        self.register_buffer("last_weights", torch.ones(num_tasks))

    def in_warmup(self) -> bool:
        """Whether the next training step is a warm-up step (log losses), not STCH."""
        if self.num_tasks is None:
            return self.warmup_epochs > 0 or self._nadir is None
        return int(self.epochs_seen) < self.warmup_epochs or not bool(self.has_nadir)

    def weights(self) -> Tensor | None:
        """``T·p_i·λ_i`` of the last training step (the weights on the ``∇ℓ_i``); 1 in the warm-up."""
        return None if self.num_tasks is None else self.last_weights.clone()

    def forward(self, losses: Tensor, ctx: StepContext | None = None) -> Tensor:
        T = self._prepare(losses)
        if self.in_warmup():
            if self._updating():
                self.last_weights.fill_(1.0)
            return torch.log(losses + self.eps)
        lam = self.preference_weights.to(losses)
        ell = torch.log(losses / self.nadir_point.to(losses) + self.eps)
        with torch.no_grad():
            p = torch.softmax(lam * ell / self.mu, dim=0)  # ∂g_μ/∂(λ_i ℓ_i), detached
        if self._updating():
            self.last_weights.copy_(T * p * lam)
        # xlogy: p_i log p_i = 0 where p_i underflowed to 0 (small mu)
        return T * (p * lam * ell - self.mu * torch.special.xlogy(p, p))

    @torch.no_grad()
    def on_epoch_end(self, mean_losses: Tensor) -> None:
        mean_losses = torch.as_tensor(mean_losses, dtype=torch.float32)
        _check_losses(mean_losses)
        self._prepare(mean_losses)
        if not bool(self.has_nadir) and int(self.epochs_seen) == self.warmup_epochs - 1:
            m = mean_losses.detach().to(self.nadir_point)
            if not bool(torch.isfinite(m).all()) or bool((m <= 0).any()):
                raise ValueError(
                    f"STCH divides by the nadir point (the mean training losses of its last warm-up epoch), which "
                    f"must be positive and finite; got {m.tolist()}"
                )
            self.nadir_point.copy_(m)
            self.has_nadir.fill_(True)
        self.epochs_seen += 1

    def extra_repr(self) -> str:
        return f"mu={self.mu}, warmup_epochs={self.warmup_epochs}"
