"""MoDo: MGDA's weights moved by one projected step on a double-sampled Gramian, the update from a third sample.

Chen, Fernando, Ying & Chen, "Three-Way Trade-Off in Multi-Objective Learning: Optimization, Generalization and
Conflict-Avoidance", NeurIPS 2023 (arXiv:2305.20057, DOI 10.48550/arXiv.2305.20057). The aggregator is
:class:`MoDo`; the independent samples come from the :class:`MoDoSampler` callback (see the class docstring for why
a callback, and what it costs).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from mtlkit._registry import METHODS
from mtlkit.aggregation._base import Aggregator, Restricted, SumScale, restricted_view
from mtlkit.aggregation._solvers import check_int, check_nonneg, project_simplex, to_numpy, to_weights
from mtlkit.callbacks import Callback, StepInfo
from mtlkit.errors import ConfigError

if TYPE_CHECKING:
    from mtlkit.train import Trainer

log = logging.getLogger("mtlkit")


@METHODS.register("modo")
class MoDo(Aggregator):
    r"""MoDo (Chen et al. 2023): λ ← Π_Δ(λ − γ(J₁J₂ᵀ + ρI)λ) from two independent samples, update J₃ᵀλ (stateful).

    Multi-objective gradient with double sampling.

    Chen, Fernando, Ying & Chen, "Three-Way Trade-Off in Multi-Objective Learning: Optimization, Generalization
    and Conflict-Avoidance", NeurIPS 2023 (arXiv:2305.20057, DOI 10.48550/arXiv.2305.20057). MGDA's weights
    ``λ* = argmin_{λ∈Δ} ½||Jᵀλ||²`` are a non-linear function of the gradients, so MGDA on one stochastic batch is
    biased. MoDo moves λ by one projected gradient step per iteration on the (ρ-regularised) MGDA objective, with
    the Gramian estimated *without bias* from two independent samples ``z₁, z₂`` (``E[J₁J₂ᵀ] = E[J]E[J]ᵀ``, where
    ``E[J₁J₁ᵀ]`` would add the gradients' covariance), and steps the model along a third one, ``z₃``
    (Algorithm 1 of the paper, MoDo):

        λ_{t+1} = Π_Δ(λ_t − γ (∇F_{z₁}(x_t)ᵀ ∇F_{z₂}(x_t) + ρ I) λ_t)
        x_{t+1} = x_t − α ∇F_{z₃}(x_t) λ_{t+1}

    with ``∇F_z(x)`` the d x T matrix of task gradients on sample z (our ``J_zᵀ``, so ``∇F_{z₁}ᵀ∇F_{z₂} =
    J₁J₂ᵀ``), ``λ_0 = 1/T`` and ``Π_Δ`` the Euclidean projection onto the simplex
    (:func:`~mtlkit.aggregation._solvers.project_simplex`). The equation numbers of the paper could not be
    checked against its text here, so only the algorithm is quoted; its form is the one of the authors' code
    (heshandevaka/Trade-Off-MOL, ``LibMTL/weighting/MoDo.py``: ``λ ← Π_Δ(λ − γ(G₀ G₁ᵀ λ + ρλ))``).

    How the three samples are realised in this loop, and why: the loop hands an aggregator one Jacobian per step,
    the batch-mean gradients of the step's batch (that is ``J₃``: the engine applies ``J₃ᵀλ_{t+1}``). Splitting
    that batch is not possible inside the contract: the losses reach the engine already averaged over the batch
    (no per-sample losses), and at representation level the gradients of disjoint samples live in disjoint
    coordinates (their cross-Gramian is 0). So ``z₁, z₂`` are two *further* batches, drawn uniformly (independently
    of each other and of the step's batch) from the training split by the :class:`MoDoSampler` callback in
    ``on_losses``, which hands ``J₁J₂ᵀ`` (T x T) to this aggregator (:meth:`set_cross_gramian`). That is the
    paper's sampling (three independent samples); the authors' trainer also draws extra batches (two per step,
    ``next(loader)`` twice) rather than splitting one. Cost: two more forward passes and 2T more backward passes
    (per-task gradients of the shared parameters on each extra batch) per step, i.e. about 3x a per-task-gradient
    method. Without the callback (no cross-Gramian for the step) MoDo uses the step's own Gramian ``J₃J₃ᵀ`` for
    λ (``z₁ = z₂ = z₃``: the deterministic variant, biased for stochastic gradients) and says so once in the log.

    Choices where the paper leaves room, and why:

    * x update: the paper's ``J₃ᵀλ_{t+1}`` (the authors' LibMTL code, which draws two samples only, steps along
      ``(J₁ + J₂)ᵀλ_{t+1}``, reusing the λ samples; the paper's analysis needs the third one).
    * No symmetrisation of ``J₁J₂ᵀ``: the paper's and the code's step (it is symmetric in expectation).
    * Step sizes: constant, as in the paper's analysis and the authors' code; defaults ``gamma = 0.1``,
      ``rho = 0.1`` (the authors' LibMTL defaults for ``gamma_modo`` and ``rho_modo``).

    Scale: ``λ ∈ Δ``: the update is a **convex** combination of the step's task gradients (identical rows ``g``
    give ``g``). The λ step is not scale-free (``γ J₁J₂ᵀ`` grows with the gradients' square), as in the paper.
    Gramian-based: the engine gets the update ``λᵀJ₃`` without forming J₃. Level: the parameter level only
    (:class:`MoDoSampler` refuses the representation level: the gradients of different batches w.r.t. the
    representation are not comparable). State: ``lam`` and ``step`` in ``state_dict`` (the sampler is stateless:
    its batches are a function of the run's seed and the step).

    Batches where some tasks have no labelled sample (:meth:`~mtlkit.aggregation.Aggregator.restricted`): λ's
    present entries, renormalised to sum to 1 (uniform if they are all 0), take the projected step on the present
    tasks' simplex with the present tasks' block of the cross-Gramian (or of the step's Gramian), and are written
    back scaled by the mass they had: λ stays on the full simplex and the absent tasks' weights are unchanged. The
    cross-Gramian set for the step is consumed either way; ``step`` counts calls.

    Args:
        gamma: λ step size ``γ ≥ 0`` (0 keeps ``λ = 1/T``: the mean).
        rho: ``ρ ≥ 0``, the ℓ2 regularisation of the λ problem.
        sample_size: batch size of the two extra samples (0: the run's ``train.batch_size``).

    Example:
        >>> import torch
        >>> agg = MoDo(gamma=0.5, rho=0.0)
        >>> agg.set_cross_gramian(torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64))
        >>> J3 = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
        >>> agg(J3), agg.task_weights        # λ - 0.5·diag(1, 2)·λ = (1/4, 0) → Π_Δ: (5/8, 3/8)
        (tensor([0.6250, 0.3750], dtype=torch.float64), tensor([0.6250, 0.3750], dtype=torch.float64))
    """

    gramian_based = True
    scale = "convex"

    def __init__(self, gamma: float = 0.1, rho: float = 0.1, sample_size: int = 0) -> None:
        self.gamma = check_nonneg("gamma", gamma)
        self.rho = check_nonneg("rho", rho)
        self.sample_size = check_int("sample_size", sample_size, minimum=0)
        self._lam: np.ndarray | None = None
        self._step = 0
        self._cross: np.ndarray | None = None  # J₁J₂ᵀ for the coming call (consumed by it)
        self._warned = False

    @property
    def task_weights(self) -> Tensor | None:
        """The current λ (float64), None before the first call."""
        return None if self._lam is None else torch.from_numpy(self._lam.copy())

    def set_cross_gramian(self, G12: Tensor) -> None:
        """``J₁J₂ᵀ`` of two independent samples, for the next call's λ step (then forgotten).

        Raises:
            ValueError: not a square, finite matrix, or one of another size than the tasks seen so far.
        """
        if not isinstance(G12, Tensor) or G12.dim() != 2 or G12.shape[0] != G12.shape[1] or G12.shape[0] == 0:
            shape = tuple(G12.shape) if isinstance(G12, Tensor) else type(G12).__name__
            raise ValueError(f"a cross-Gramian J₁J₂ᵀ is a non-empty T x T matrix, got shape {shape}")
        if not bool(torch.isfinite(G12).all()):
            raise FloatingPointError("the cross-Gramian J₁J₂ᵀ of MoDo's extra samples contains NaN or inf")
        if self._lam is not None and G12.shape[0] != self._lam.shape[0]:
            raise ValueError(f"MoDo has {self._lam.shape[0]} tasks but got a {G12.shape[0]} x {G12.shape[0]} matrix")
        self._cross = G12.detach().to("cpu", torch.float64).numpy().copy()

    def weights_from_gramian(self, G: Tensor) -> Tensor:
        T = G.shape[0]
        if self._lam is not None and self._lam.shape[0] != T:
            raise ValueError(f"MoDo was used with {self._lam.shape[0]} tasks and now gets {T}; build a new one")
        M = self._cross
        self._cross = None
        if M is None:
            if not self._warned:
                log.warning(
                    "mtlkit: MoDo got no independent samples for its λ step (no MoDoSampler callback in this run): "
                    "it uses the step's own batch for all three samples (the deterministic variant)"
                )
                self._warned = True
            M = to_numpy(G)
        elif M.shape[0] != T:
            raise ValueError(f"MoDo's cross-Gramian is {M.shape[0]} x {M.shape[0]} but the step has {T} tasks")
        lam = np.full(T, 1.0 / T) if self._lam is None else self._lam
        if self.gamma > 0:  # λ_{t+1} = Π_Δ(λ_t − γ(J₁J₂ᵀ + ρI)λ_t)
            lam = project_simplex(lam - self.gamma * (M @ lam + self.rho * lam))
        self._lam, self._step = lam, self._step + 1
        return to_weights(lam, G)

    def _restricted(self, present: Tensor) -> Restricted:
        T = int(present.numel())
        if self._lam is not None and self._lam.shape[0] != T:
            raise ValueError(f"MoDo has {self._lam.shape[0]} tasks but present has {T} entries")
        if self._cross is not None and self._cross.shape[0] != T:
            raise ValueError(f"MoDo's cross-Gramian is {self._cross.shape[0]} x {self._cross.shape[0]} for {T} tasks")
        idx = present.nonzero().flatten().numpy()
        lam = np.full(T, 1.0 / T) if self._lam is None else self._lam
        mass = float(lam[idx].sum())

        def load(sub: MoDo) -> None:
            sub._lam = lam[idx] / mass if mass > 0 else np.full(len(idx), 1.0 / len(idx))
            sub._cross = None if self._cross is None else self._cross[np.ix_(idx, idx)].copy()

        def store(sub: MoDo) -> None:
            assert sub._lam is not None
            full = lam.copy()
            full[idx] = sub._lam * mass
            self._lam, self._step, self._cross, self._warned = full, sub._step, None, sub._warned

        return restricted_view(self, present, load, store)

    def callbacks(self) -> list[Callback]:
        """The callback that draws MoDo's independent samples (the trainer adds it to every run of this method)."""
        return [MoDoSampler()]

    def state_dict(self) -> dict[str, Any]:
        return {"lam": None if self._lam is None else torch.from_numpy(self._lam.copy()), "step": self._step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state) != {"lam", "step"}:
            raise ValueError(f"MoDo state needs keys lam, step; got {sorted(state)}")
        lam = state["lam"]
        self._lam = None if lam is None else lam.detach().to(torch.float64).numpy().copy()
        self._step = int(state["step"])


def _find_modo(aggregator: Aggregator) -> MoDo | None:
    inner = aggregator.inner if isinstance(aggregator, SumScale) else aggregator
    return inner if isinstance(inner, MoDo) else None


class MoDoSampler(Callback):
    """Draws MoDo's two independent samples each step and gives their cross-Gramian ``J₁J₂ᵀ`` to :class:`MoDo`.

    In ``on_losses`` (before the engine's backward, which calls MoDo): two batches of ``sample_size`` (default
    ``train.batch_size``) indices, each drawn uniformly without replacement from the training split, independently
    of each other and of the loop's batch, by a generator seeded with ``(train.seed, step)`` (no state: a resumed
    run draws the same batches). For each, a training-mode forward pass of the model and one backward per task
    give the T x P matrix of per-task gradients of the shared parameters (the unweighted task losses, as MoDo is
    a pure gradient-space method). The forward passes are ordinary training passes, as in the authors' trainer:
    batch-norm statistics see the extra batches and dropout draws from the global generator. With partial labels
    (``Split.mask``) each task's loss on an extra batch is over its labelled rows of it
    (:func:`~mtlkit.tasks.masked_losses`); a task with none there has a zero row in that sample's gradients, so
    its row and column of ``J₁J₂ᵀ`` are 0 for the step.

    Raises (in ``check``): :class:`~mtlkit.errors.ConfigError` when the run's method is not MoDo, or works at the
    representation level.

    Example:
        >>> MoDoSampler().key()
        'modo_sampler'
    """

    name = "modo_sampler"

    def check(self, trainer: Trainer) -> None:
        if _find_modo(trainer.method.aggregator) is None:
            raise ConfigError(
                f"the MoDoSampler callback draws samples for the MoDo aggregator, but this run's method is "
                f"{trainer.method.name!r} ({type(trainer.method.aggregator).__name__}): use method 'modo'"
            )
        if trainer.method.level != "parameter":
            raise ConfigError(
                "MoDo works at the parameter level only: the gradients of two different batches w.r.t. the "
                "representation live on different samples' coordinates (their cross-Gramian is 0)"
            )

    def on_losses(self, trainer: Trainer, step: StepInfo) -> None:
        from mtlkit.engine.autodiff import per_task_grads  # the engine imports the aggregators: imported late
        from mtlkit.tasks import masked_losses

        modo = _find_modo(trainer.method.aggregator)
        if modo is None:  # the method was replaced by another callback
            return
        train = trainer.data.train
        size = min(modo.sample_size or trainer.cfg.train.batch_size, len(train))
        shared = trainer.model.shared_parameters()
        device = next(iter(shared)).device
        J = []
        for k in (1, 2):
            gen = torch.Generator().manual_seed((trainer.cfg.train.seed * 1_000_003 + step.step) * 3 + k)
            idx = torch.randperm(len(train), generator=gen)[:size]
            x = train.x[idx].to(device)
            ys = {name: v[idx].to(device) for name, v in train.y.items()}
            # partial labels: each task's loss over its labelled rows of the sample (no label: a zero row of J_k)
            masks = None if train.mask is None else {k: m[idx].to(device) for k, m in train.mask.items()}
            losses, _ = masked_losses(trainer.train_tasks, trainer.model(x), ys, masks)
            J.append(per_task_grads(losses, shared, retain_graph=False))
        modo.set_cross_gramian(J[0] @ J[1].T)


__all__ = ["MoDo", "MoDoSampler"]
