"""CAGrad: the best worst-case improvement in a ball around the mean gradient."""
from __future__ import annotations

import numpy as np
from scipy.optimize import minimize
from torch import Tensor

from mtlkit.aggregation._base import Aggregator
from mtlkit.aggregation._solvers import check_nonneg, project_simplex, to_numpy, to_weights, trace_normalize
from mtlkit.errors import ConfigError
from mtlkit.methods import Method, register
from mtlkit.weighting._base import EW


class CAGrad(Aggregator):
    """Conflict-Averse Gradient descent.

    Liu et al., "Conflict-Averse Gradient Descent for Multi-task Learning", NeurIPS 2021. With ``g_0`` the *mean*
    task gradient and ``φ = c² ||g_0||²``, the primal problem ``max_d min_i ⟨g_i, d⟩`` s.t.
    ``||d - g_0|| ≤ √φ`` is solved through its dual (the paper's Algorithm 1):

        w* = argmin_{w ∈ Δ}  g_wᵀ g_0 + √φ ||g_w||,     g_w = Σ_i w_i g_i,
        d* = g_0 + (√φ / ||g_w*||) g_w*.

    Everything is a function of ``G = J Jᵀ``, so this is Gramian-based. The dual is solved with SLSQP on the
    trace-normalised Gramian (the solution is invariant to the scale of G; normalising makes SLSQP's tolerances
    meaningful), as in the official code and LibMTL, with an analytic gradient.

    Scale (documented choice): the update is on the scale of the **mean** gradient, as in the paper and LibMTL:
    ``d = d* / (1 + c²)`` with ``rescale=1`` (default of the official code and LibMTL), ``d*`` with ``rescale=0``
    (torchjd's choice), ``d* / (1 + c)`` with ``rescale=2``. Hence **c = 0 gives exactly the mean** of the task
    gradients (not the sum): multiply the learning rate by T to compare with EW.

    Args:
        c: radius of the ball, relative to ``||g_0||`` (``c >= 0``; the paper uses 0.4-0.5).
        rescale: 0, 1 or 2, see above.

    Example:
        >>> import torch
        >>> CAGrad(c=0.0)(torch.tensor([[2.0, 0.0], [0.0, 4.0]]))
        tensor([1., 2.])
    """

    gramian_based = True

    def __init__(self, c: float = 0.4, rescale: int = 1) -> None:
        self.c = check_nonneg("c", c)
        if rescale not in (0, 1, 2) or isinstance(rescale, bool):
            raise ConfigError(f"rescale must be 0, 1 or 2, got {rescale!r}")
        self.rescale = int(rescale)

    def weights_from_gramian(self, G: Tensor) -> Tensor:
        T = G.shape[0]
        w = np.full(T, 1.0 / T)
        A = trace_normalize(to_numpy(G))
        if self.c > 0 and np.trace(A) > 0:
            b = np.full(T, 1.0 / T)
            Ab = A @ b
            sqrt_phi = self.c * np.sqrt(max(float(b @ Ab), 0.0) + 1e-8)

            def obj(x: np.ndarray) -> tuple[float, np.ndarray]:
                Ax = A @ x
                nrm = np.sqrt(max(float(x @ Ax), 0.0) + 1e-8)
                return float(x @ Ab + sqrt_phi * nrm), Ab + sqrt_phi * Ax / nrm

            res = minimize(obj, b.copy(), jac=True, method="SLSQP", bounds=[(0.0, 1.0)] * T,
                           constraints=({"type": "eq", "fun": lambda x: 1.0 - x.sum(), "jac": lambda x: -np.ones_like(x)},),
                           options={"maxiter": 200, "ftol": 1e-12})
            x = project_simplex(res.x)
            gw_norm = np.sqrt(max(float(x @ A @ x), 0.0))
            w = w + (sqrt_phi / (gw_norm + 1e-8)) * x
        if self.rescale == 1:
            w = w / (1.0 + self.c ** 2)
        elif self.rescale == 2:
            w = w / (1.0 + self.c)
        return to_weights(w, G)


@register("cagrad")
def _cagrad(c: float = 0.4, rescale: int = 1) -> Method:
    """CAGrad (Liu et al. 2021); update on the mean-gradient scale (c = 0 gives the mean)."""
    return Method(EW(), CAGrad(c=c, rescale=rescale))
