"""ConFIG: the direction with equal cosine to every task gradient, scaled by the sum of their projections on it."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from mtlkit._registry import METHODS
from mtlkit.aggregation._base import Aggregator
from mtlkit.aggregation._solvers import pinvh, to_numpy, to_weights


@METHODS.register("conflict_free")
class ConFIG(Aggregator):
    """ConFIG (Liu et al. 2025): the update with one cosine to all task gradients, as long as their projections' sum.

    The direction is the pseudo-inverse of the unit gradients times a vector of ones.

    Conflict-Free Inverse Gradients. Registered as ``"conflict_free"``: ``"config"`` would read as a run
    configuration (``mtlkit/config.py``, the CLI's ``--config``) and names are lower case, so the acronym cannot be
    kept as such; ``conflictfree`` is the name of the authors' own package, and the acronym's expansion.

    Liu, Chu & Thuerey, "ConFIG: Towards Conflict-free Training of Physics Informed Neural Networks", ICLR 2025,
    OpenReview APojAzJQiq, arXiv:2408.11104 (no DOI), Sec. 3, the ConFIG operator (Eq. 2 of the arXiv version, as
    torchjd cites it):

        g_ConFIG = (Σ_i g_iᵀ g_u) g_u,     g_u = U([U(g_1), …, U(g_T)]^(-ᵀ) 1_T),     U(g) = g / ||g||,

    with ``M^(-ᵀ)`` the pseudo-inverse of ``Mᵀ``. When the unit gradients ``u_i`` are linearly independent,
    ``u_iᵀ g_u`` is the same for every task: the update has the **same cosine with every task gradient** and
    ``⟨g_i, g_ConFIG⟩ > 0`` for all i (conflict-free; the paper's direction weights ``ŵ = 1``). Its length is the sum
    of the projections of the task gradients on the direction: it shrinks as the gradients oppose each other.

    Gramian form (ours; the reference codes work on J). With ``D = diag(||g_i||)`` and the cosine matrix
    ``C = D⁻¹ G D⁻¹`` (the Gramian of the unit gradients ``U = D⁻¹ J``), ``U⁺ 1 = Uᵀ C⁺ 1 = Jᵀ D⁻¹ z`` with
    ``z = C⁺ 1``; then ``||U⁺ 1||² = zᵀ C z`` and ``Σ_i g_iᵀ U⁺1 = dᵀ C z`` (``d = diag(D)``), so the update is
    ``wᵀ J`` with ``w = (dᵀ C z / zᵀ C z) · D⁻¹ z``. Only G is needed: Gramian-based (also at
    ``level="representation"``).

    Choices where the paper and the codes differ or are silent:

    * Normalisation ``U(g) = g/||g||`` exactly, a zero gradient giving a zero unit vector (the codes'
      ``nan_to_num``); the paper writes ``g/(||g|| + ε)``. A zero task then takes no part in the direction and adds
      0 to the length: the update is ConFIG's on the other tasks.
    * Pseudo-inverse: :func:`~mtlkit.aggregation._solvers.pinvh` on ``C``, which drops the eigenvalues that are
      round-off of a Gramian computed in G's dtype (``≲ 2·eps·tr(C)``, see ``rank_cutoff``). The official code
      (``torch.linalg.lstsq`` on ``U``, minimum-norm) and torchjd (``torch.linalg.pinv(U)``) cut singular values of
      ``U`` at ``max(T, P)·eps·σ_max``; both are the same pseudo-inverse on well-conditioned inputs. On dependent unit
      gradients (duplicated tasks, ``g_2 = -g_1``) no direction has equal cosines; ``U⁺1`` is then the least-squares
      one, as in the codes, and conflicts are possible.
    * No direction: when ``1`` is orthogonal to the range of ``C`` (``||C z||² <= T·eps``; e.g. two opposite
      gradients), ``U⁺1`` is 0 in exact arithmetic and its computed value is round-off, which normalising would blow
      up to a full-length update in an arbitrary direction (the codes do so). The update is 0 there.
    * The official code's two-task shortcut (``ConFIG_update_double``, the sum of the two gradients' components
      orthogonal to each other) is the same direction for non-parallel pairs; it is not used (it returns NaN for
      parallel gradients). The momentum variant (M-ConFIG) and other direction weights or length models of the
      official package are not implemented.

    Scale: the **sum** scale, as in the paper and both codes (T identical rows g give T·g; rows c_t·g give
    ``Σ_t c_t·g``), and linear under scaling (``update(s·J) = s·update(J)``).

    Example:
        >>> import torch
        >>> ConFIG()(torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]]))   # torchjd's example, same output
        tensor([0.1588, 2.0706, 2.0706])
    """

    gramian_based = True
    scale = "sum"

    def weights_from_gramian(self, G: Tensor) -> Tensor:
        A = to_numpy(G)
        T = A.shape[0]
        d = np.sqrt(np.clip(np.diag(A), 0.0, None))
        inv_d = np.divide(1.0, d, out=np.zeros_like(d), where=d > 0)  # a zero gradient's unit vector is 0
        C = A * np.outer(inv_d, inv_d)
        z = pinvh(C, G.dtype) @ np.ones(T)
        Cz = C @ z  # = U U⁺ 1, the projection of 1 onto the range of U
        sq = float(z @ Cz)  # ||U⁺ 1||²
        eps = max(float(torch.finfo(G.dtype).eps), float(np.finfo(np.float64).eps))  # G's precision, not below float64
        if not float(Cz @ Cz) > T * eps or not sq > 0:
            return to_weights(np.zeros(T), G)
        return to_weights((float(d @ Cz) / sq) * inv_d * z, G)
