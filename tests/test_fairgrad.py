"""FairGrad (mtlkit/aggregation/fairgrad.py): the paper's equation, its consequences and limits, the authors' solver.

Tolerances. The weights solve ``(G + r·I) w = w^(-1/α)`` with the ridge ``r = eps·tr(G)`` (eps of G's dtype) to a
relative residual ``tol = 1e-9`` or to the residual's rounding floor; every bound below is built from those numbers
(:func:`_residual_bound`), and a difference of two solutions is bounded through the Jacobian of the equation,
``H = G + (1/α)·diag(w^(-1/α-1))`` (``||δw|| <= ||H⁻¹||·||δresidual||``).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from scipy.optimize import least_squares

import aggregation_asserts as aa
from mtlkit.aggregation import MGDA, NashMTL
from mtlkit.aggregation.fairgrad import FairGrad, solve_fair
from mtlkit.errors import ConfigError
from mtlkit.methods import build_method

EPS64 = float(np.finfo(np.float64).eps)
TOL = 1e-9  # FairGrad's default tol
ALPHAS = (0.25, 0.5, 1.0, 2.0, 5.0, 20.0)


def _J(fam: str, T: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return aa.make_family(fam, T, 0, dtype)


def _weights(J: torch.Tensor, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """FairGrad's weights and the Gramian, in float64."""
    G = J @ J.T
    return FairGrad(alpha=alpha).weights(G).double().numpy(), G.double().numpy()


def _residual_bound(G: np.ndarray, w: np.ndarray, alpha: float) -> float:
    """What ``||G w - w^(-1/α)||`` may be: the stopping rule (tol relative, or the rounding floor
    ``2T·eps·(||G||·||w|| + ||w^(-p)||)``) plus the ridge's ``eps·tr(G)·||w||``."""
    T, wp = len(w), w ** (-1.0 / alpha)
    nw, nwp = float(np.linalg.norm(w)), float(np.linalg.norm(wp))
    return TOL * nwp + 2 * T * EPS64 * (float(np.linalg.norm(G)) * nw + nwp) + EPS64 * float(np.trace(G)) * nw


def _inv_jacobian_norm(G: np.ndarray, w: np.ndarray, alpha: float) -> float:
    p = 1.0 / alpha
    return float(np.linalg.norm(np.linalg.inv(G + np.diag(p * w ** (-p - 1.0))), 2))


# ----------------------------------------------------------------------------------------------- the paper's equation
@pytest.mark.parametrize("alpha", ALPHAS)
def test_weights_solve_the_papers_equation(alpha):
    """``(G w)_i = w_i^(-1/α)``, ``w > 0`` (Sec. 3 / Eq. 4 of the arXiv version), to the bound of the solver."""
    for fam in ("random", "conflicting", "non_conflicting"):
        for T in (2, 3, 5, 10):
            w, G = _weights(_J(fam, T), alpha)
            assert (w > 0).all(), (fam, T)
            res = float(np.linalg.norm(G @ w - w ** (-1.0 / alpha)))
            assert res <= _residual_bound(G, w, alpha), (fam, T, res)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("alpha", ALPHAS)
def test_no_task_conflicts_with_the_update(alpha, dtype):
    """``⟨g_i, d⟩ = w_i^(-1/α) > 0`` for every task: FairGrad never increases a task's loss to first order (on
    Gramians where the equation has a solution: 0 is not in the convex hull of the gradients)."""
    for fam in ("random", "conflicting"):
        for T in (2, 3, 5, 10, 50):
            J = _J(fam, T, dtype)
            d = FairGrad(alpha=alpha)(J)
            assert d.dtype == dtype
            inner = (J.double() @ d.double()).numpy()
            assert (inner > 0).all(), (fam, T, inner.min())
            if dtype == torch.float64:
                w = FairGrad(alpha=alpha).weights(J @ J.T).numpy()
                target = w ** (-1.0 / alpha)
                # the residual bound, plus the rounding of d = wᵀJ and of Jd (T + P terms, eps each)
                slack = _residual_bound((J @ J.T).numpy(), w, alpha) + 4 * (T + J.shape[1]) * EPS64 * float(
                    np.abs(w) @ (J.norm(dim=1) ** 2).numpy()
                )
                assert np.linalg.norm(inner - target) <= slack, (fam, T)


def test_update_norm_identity_and_homogeneity():
    """``||d||² = wᵀGw = Σ_i w_i^(1-1/α)`` (from the equation), and ``d(sJ) = s^((1-α)/(1+α))·d(J)`` (the solve is on
    G/||G||_F, so for s a power of 2, sJ is exact and only the mapped-back factor is rounded: 1e-12)."""
    for alpha in ALPHAS:
        for T in (2, 5, 10):
            J = _J("conflicting", T)
            d, w = FairGrad(alpha=alpha)(J).numpy(), _weights(J, alpha)[0]
            want = float((w ** (1.0 - 1.0 / alpha)).sum())
            assert abs(float(d @ d) - want) <= 1e-8 * want, (alpha, T)
            for s in (2.0**-10, 2.0**10):
                ds = FairGrad(alpha=alpha)(s * J).numpy()
                np.testing.assert_allclose(ds, s ** ((1 - alpha) / (1 + alpha)) * d, rtol=1e-12, atol=0)


def test_permutation_equivariance():
    for alpha in (0.5, 1.0, 2.0):
        J = _J("conflicting", 5)
        d = FairGrad(alpha=alpha)(J)
        for perm in aa.permutations(5):
            torch.testing.assert_close(FairGrad(alpha=alpha)(J[perm]), d, rtol=1e-9, atol=0)


# ------------------------------------------------------------------------------------------------------------ limits
def test_alpha_one_is_nash_mtl():
    """α = 1 is Nash-MTL's ``G w = 1/w``. mtlkit's NashMTL adds a ridge ``1e-8·||G||_F``: to first order it moves the
    weights by ``δ = H⁻¹(1e-8·||G||_F·w)``, so the two differ by at most ``2||δ||`` plus both solvers' tolerances."""
    for fam in ("random", "conflicting"):
        for T in (2, 3, 5, 10):
            J = _J(fam, T)
            w, G = _weights(J, 1.0)
            wn = NashMTL().weights(J @ J.T).numpy()
            shift = float(np.linalg.norm(np.linalg.solve(G + np.diag(w**-2.0), 1e-8 * np.linalg.norm(G) * w)))
            solver = _inv_jacobian_norm(G, w, 1.0) * 2 * _residual_bound(G, w, 1.0)
            assert np.linalg.norm(w - wn) <= 2 * shift + solver, (fam, T)
            d = FairGrad()(J)
            assert abs(float(d @ d) - T) <= 1e-8 * T  # Nash-MTL's ||d||² = T


def test_large_alpha_tends_to_the_mgda_direction():
    """α → ∞ is max-min fairness: the direction of MGDA's min-norm point. The support tasks' inner products
    ``w_i^(-1/α) = exp(-log(w_i)/α)`` differ from equal by O(1/α), so the direction error falls like 1/α: measured
    α·error ≤ 1.8 at α = 100 and 1000 on these inputs (≤ 5 asserted), and a tenfold α cuts it ≥ 5x."""
    for fam in ("random", "conflicting"):
        for T in (3, 5, 10):
            J = _J(fam, T)
            m = MGDA(solver="exact")(J)
            m = m / m.norm()
            err = {}
            for alpha in (100.0, 1000.0):
                d = FairGrad(alpha=alpha)(J)
                err[alpha] = float((d / d.norm() - m).norm())
                assert alpha * err[alpha] <= 5.0, (fam, T, alpha, err[alpha])
            assert err[1000.0] <= err[100.0] / 5 or err[1000.0] <= 1e-6, (fam, T, err)


def test_small_alpha_tends_to_the_sum():
    """α → 0 is the utilitarian limit: when the sum of the gradients conflicts with no task (``G 1 > 0``), ``w → 1``.
    To first order ``w_i = (G w)_i^(-α) ≈ (G 1)_i^(-α)``, so ``|w_i - 1| <= 2α·max|log (G 1)_i|`` for small α."""
    for T in (2, 5, 10, 50):
        J = _J("non_conflicting", T)
        G1 = (J @ J.T).sum(dim=1).numpy()
        assert (G1 > 0).all()
        for alpha in (1e-2, 1e-3):
            w = _weights(J, alpha)[0]
            assert np.abs(w - 1).max() <= 2 * alpha * np.abs(np.log(G1)).max(), (T, alpha)


# --------------------------------------------------------------------------------- against the authors' formula
def _authors_weights(G: np.ndarray, alpha: float) -> np.ndarray:
    """The official code's solve, re-implemented plainly (OptMN-Lab/fairgrad, ``FairGrad.fairgrad``; LibMTL and
    torchjd are the same): SciPy's ``least_squares`` on ``G x - (1/x)^(1/α)`` from ``x = 1/T``, ``x ≥ 0``, defaults."""
    T = G.shape[0]
    return least_squares(lambda x: G @ x - np.power(1 / x, 1 / alpha), np.ones(T) / T, bounds=(0, np.inf)).x


def test_matches_the_authors_least_squares():
    """Same weights as the authors' solver. Bound: ours meets :func:`_residual_bound`; the reference stops when a step
    changes x by less than ``xtol·||x|| = 1e-8·||x||`` (SciPy's default), so its error is below that in practice
    (trust-region reflective converges superlinearly near a regular root). Hence
    ``||w - w_ref|| <= ||H⁻¹||·bound + 1e-8·||w_ref||``. Measured: max relative difference 6.2e-10 (T ≤ 10)."""
    worst = 0.0
    for fam in ("random", "conflicting", "non_conflicting"):
        for T in (2, 3, 5, 10):
            for alpha in (0.5, 1.0, 2.0, 5.0):
                w, G = _weights(_J(fam, T), alpha)
                ref = _authors_weights(G, alpha)
                diff = float(np.linalg.norm(w - ref))
                bound = _inv_jacobian_norm(G, w, alpha) * _residual_bound(G, w, alpha) + 1e-8 * np.linalg.norm(ref)
                assert diff <= bound, (fam, T, alpha, diff, bound)
                worst = max(worst, diff / float(np.linalg.norm(ref)))
    assert worst < 1e-8


def test_solve_fair_diagonal_closed_form():
    """Orthogonal gradients: ``G = diag(λ)`` gives ``w_i = λ_i^(-α/(α+1))`` exactly (Newton's start; a fixed point)."""
    lam = np.array([4.0, 0.25, 9.0])
    for alpha in ALPHAS:
        np.testing.assert_allclose(solve_fair(np.diag(lam), alpha), lam ** (-alpha / (alpha + 1)), rtol=1e-12)


# ------------------------------------------------------------------------------------------ degenerate Gramians
def test_zero_gradient_task_gets_weight_zero_and_changes_nothing():
    J = _J("random", 4)
    Jz = torch.cat([J[:2], torch.zeros(1, J.shape[1], dtype=J.dtype), J[2:]])
    for alpha in (0.5, 1.0, 2.0):
        w = FairGrad(alpha=alpha).weights(Jz @ Jz.T)
        assert w[2] == 0
        torch.testing.assert_close(FairGrad(alpha=alpha)(Jz), FairGrad(alpha=alpha)(J), rtol=1e-12, atol=0)
    assert torch.equal(FairGrad()(torch.zeros(3, 4)), torch.zeros(4))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_pareto_stationary_inputs_give_a_finite_update_without_warning(dtype):
    """No positive solution exists when 0 is in the convex hull (``g_1 = -g_0``, or rank-deficient rows): the ridge
    holds the weights and the solver stops at the residual's rounding floor, without a non-convergence warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for fam in ("pareto_stationary", "rank_deficient", "duplicated"):
            for T in (2, 3, 5, 10, 50):
                for alpha in (0.5, 1.0, 2.0, 5.0, 20.0):
                    d = FairGrad(alpha=alpha)(_J(fam, T, dtype))
                    assert torch.isfinite(d).all(), (fam, T, alpha)


def test_non_convergence_warns():
    """α = 1000 sends the weights of tasks MGDA drops towards 1e-100 and below: 5 Newton steps are not enough."""
    J = _J("random", 5)
    with pytest.warns(RuntimeWarning, match="raise max_iter"):
        FairGrad(alpha=1000.0, max_iter=5)(J)


# -------------------------------------------------------------------------------------------------------- options
def test_max_norm_clips_the_update_only():
    J = _J("conflicting", 5)
    d = FairGrad(alpha=2.0)(J)
    c = FairGrad(alpha=2.0, max_norm=0.1 * float(d.norm()))(J)
    torch.testing.assert_close(c, 0.1 * d, rtol=1e-12, atol=0)
    torch.testing.assert_close(FairGrad(alpha=2.0, max_norm=10 * float(d.norm()))(J), d, rtol=0, atol=0)


@pytest.mark.parametrize(
    "options, name",
    [
        ({"alpha": 0.0}, "alpha"),
        ({"alpha": -1.0}, "alpha"),
        ({"alpha": float("nan")}, "alpha"),
        ({"alpha": float("inf")}, "alpha"),
        ({"alpha": "two"}, "alpha"),
        ({"max_norm": -1.0}, "max_norm"),
        ({"max_iter": 0}, "max_iter"),
        ({"max_iter": 1.5}, "max_iter"),
        ({"tol": 0.0}, "tol"),
        ({"alfa": 1.0}, "alfa"),
    ],
)
def test_bad_options_raise_config_error_naming_the_option(options, name):
    with pytest.raises(ConfigError, match=name):
        build_method("fairgrad", **options)


def test_registered_with_its_options_and_scale():
    m = build_method("fairgrad", alpha=2.0)
    assert isinstance(m.aggregator, FairGrad) and m.aggregator.alpha == 2.0 and m.aggregator.gramian_based
    with pytest.raises(ConfigError, match="cannot be put on the sum scale"):
        build_method("fairgrad", scale="sum")


# ------------------------------------------------------------------------------------------------------ training
def test_trains_through_the_trainer(tmp_path):
    from mtlkit.config import RunConfig
    from mtlkit.train import Trainer

    cfg = RunConfig.from_dict(
        {
            "dataset": {"name": "_toy"},
            "model": {"name": "hps", "options": {"encoder": "mlp", "hidden": [16], "head_hidden": 8}},
            "train": {"epochs": 3, "batch_size": 32, "lr": 0.01, "seed": 0, "progress": False},
            "method": {"name": "fairgrad", "options": {"alpha": 2.0}},
            "output": {"dir": str(tmp_path / "run"), "tensorboard": False},
        }
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no non-convergence warning on real gradients
        result = Trainer(cfg).fit()
    first, last = result.history[0], result.history[-1]
    for task in ("a", "b"):
        assert last[f"train/{task}/loss"] < first[f"train/{task}/loss"]
    assert all(np.isfinite(v) for v in result.test.values())
    assert (tmp_path / "run" / "results.json").exists()
