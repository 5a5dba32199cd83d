"""SDMGrad (mtlkit/aggregation/sdmgrad.py): the optimality conditions of ``min_{w∈Δ} ½||Jᵀw + λ g_0||²``, independent
references (BVLS on the shifted gradients, brute force over supports), the limits λ = 0 (MGDA) and λ → ∞ (the mean),
the authors' projected-gradient loop re-implemented plainly, the exact and "pgd" solvers agreeing, the property suite
of ``aggregation_asserts``, state, options and training through the Trainer.

Tolerances: exact solutions are certified to ``KKT_TOL`` (1e-9) and compared with ``aggregation_asserts.update_tol``
(``max(1e-8, C·(P + T)·eps·cond(J))``, its module docstring). The authors' loop and ours run the same float64
arithmetic in another order; in the convergent regime (step ≤ 1/λ_max, non-expansive iterations) the difference
stays below ``C·K·(P + T)·eps64`` after K iterations in all.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import aggregation_asserts as aa
from mtlkit.aggregation import MGDA
from mtlkit.aggregation._solvers import KKT_TOL, simplex_kkt_residual
from mtlkit.aggregation.sdmgrad import SDMGrad
from mtlkit.config import RunConfig
from mtlkit.errors import ConfigError
from mtlkit.methods import build_method
from mtlkit.train import Trainer

EPS64 = float(np.finfo(np.float64).eps)
LAMDAS = (0.0, 0.3, 1.0, 10.0)
DTYPES = (torch.float64, torch.float32)


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny matrices: one intra-op thread is faster on a loaded 2-core machine (as in the property suite)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _grid(families=aa.ALL_FAMILIES, task_counts=aa.TASK_COUNTS, dtypes=(torch.float64,)):
    for fam in families:
        for T in task_counts:
            for dtype in dtypes:
                yield f"{fam}/T={T}/{str(dtype)[6:]}", aa.make_family(fam, T, 0, dtype)


def _inner(J: torch.Tensor, lamda: float) -> tuple[np.ndarray, np.ndarray]:
    """``w*`` recovered from the returned weights ``v = (w* + λ/T)/(1 + λ)``, and the shifted Gramian
    ``G_s = S G Sᵀ`` (row i of ``S J`` is ``g_i + λ g_0``), both float64."""
    T = J.shape[0]
    v = SDMGrad(lamda=lamda).weights(J @ J.T).to(torch.float64).numpy()
    w = (1.0 + lamda) * v - lamda / T
    S = np.eye(T) + lamda * np.full((T, T), 1.0 / T)
    return w, S @ aa.gramian64(J) @ S.T


def _shifted(J: torch.Tensor, lamda: float) -> torch.Tensor:
    return J + lamda * J.mean(0, keepdim=True)


def _update_from_inner(J: torch.Tensor, w: np.ndarray, lamda: float) -> tuple[torch.Tensor, float]:
    v = torch.from_numpy((w + lamda / J.shape[0]) / (1.0 + lamda))
    return v @ J.to(torch.float64), aa.term_scale(J, v)


class Failures:
    def __init__(self) -> None:
        self.items: list[str] = []

    def check(self, ok: bool, label: str, msg: str) -> None:
        if not ok:
            self.items.append(f"{label}: {msg}")

    def raise_if_any(self, what: str) -> None:
        if self.items:
            raise AssertionError(f"{what}: {len(self.items)} failing case(s)\n  " + "\n  ".join(self.items[:25]))


# ------------------------------------------------------------------------------------------ optimality (float64)
def test_weights_solve_the_regularised_min_norm_problem():
    """``w*`` satisfies the KKT conditions of ``min_{w∈Δ} ||Σ_i w_i (g_i + λ g_0)||²`` to KKT_TOL (mtlkit's residual
    and the independent one of ``aggregation_asserts``), and the update equals the one of an independent solver
    (BVLS on the shifted gradients themselves, not on a factor of G) to ``update_tol``; every family, T, λ."""
    fails = Failures()
    for label, J in _grid():
        for lamda in LAMDAS:
            w, Gs = _inner(J, lamda)
            where = f"{label}/λ={lamda}"
            r_lib, r_ind = simplex_kkt_residual(Gs, w), aa.simplex_residual(Gs, w)
            fails.check(r_lib <= KKT_TOL, where, f"mtlkit KKT residual {r_lib:.3g}")
            fails.check(r_ind <= KKT_TOL, where, f"independent KKT residual {r_ind:.3g}")
            d, D = _update_from_inner(J, w, lamda)
            d_ref, D_ref = _update_from_inner(J, aa.simplex_reference(_shifted(J, lamda)), lamda)
            dev = aa.deviation(J, d, D, d_ref, D_ref)
            fails.check(dev.within(aa.update_tol(J)), where, f"differs from BVLS by {dev}")
    fails.raise_if_any("sdmgrad: optimality")


def test_small_T_matches_brute_force_over_supports():
    fails = Failures()
    for label, J in _grid(task_counts=(2, 3, 4, 5)):
        for lamda in LAMDAS:
            w, Gs = _inner(J, lamda)
            d, D = _update_from_inner(J, w, lamda)
            d_bf, D_bf = _update_from_inner(J, aa.simplex_brute_force(Gs), lamda)
            dev = aa.deviation(J, d, D, d_bf, D_bf)
            fails.check(dev.within(aa.update_tol(J)), f"{label}/λ={lamda}", f"differs from brute force by {dev}")
    fails.raise_if_any("sdmgrad: brute force")


def test_primal_solution_properties():
    """With ``d* = Jᵀw* + λ g_0`` (so the update is ``d = d*/(1 + λ)``): ``⟨g_i + λ g_0, d*⟩ ≥ ||d*||²`` for every
    task (the min-norm point's condition, i.e. zero duality gap of ``max_d min_i ⟨g_i + λ g_0, d⟩ − ½||d||²``), and
    averaging over i, ``⟨g_0, d⟩ ≥ ||d||²``: the update never conflicts with the mean gradient. Slack: the KKT
    certificate (``KKT_TOL·||G_s||_F ≤ KKT_TOL·tr(G_s)``, G_s the shifted Gramian) plus the rounding of d* and of
    the inner products, ``C·(P + T)·eps64·max_i ||g_i + λ g_0||·D`` with D the term scale ``Σ_i w_i ||g_i + λ g_0||``
    (d* cancels down to round-off at Pareto-stationary points, so its error is relative to D, not to ||d*||)."""
    fails = Failures()
    for label, J in _grid():
        J64 = J.to(torch.float64)
        for lamda in LAMDAS:
            w, Gs = _inner(J, lamda)
            Js = _shifted(J64, lamda)
            d_star = torch.from_numpy(w) @ Js
            nd = float(d_star.norm())
            norms = Js.norm(dim=1)
            D = float(torch.from_numpy(np.abs(w)) @ norms)
            slack = KKT_TOL * float(np.trace(Gs)) + aa.ROUNDING_C * sum(J.shape) * EPS64 * float(norms.max()) * D
            margin = (Js @ d_star - nd**2).min().item()
            fails.check(margin >= -slack, f"{label}/λ={lamda}", f"⟨g_i + λg_0, d*⟩ - ||d*||² = {margin:.3g}")
            d = d_star / (1.0 + lamda)
            g0 = J64.mean(0)
            gap = float(g0 @ d) - float(d @ d)
            fails.check(gap >= -slack, f"{label}/λ={lamda}", f"⟨g_0, d⟩ - ||d||² = {gap:.3g} < 0")
    fails.raise_if_any("sdmgrad: primal properties")


# ---------------------------------------------------------------------------------------------------- the limits
def test_lambda_zero_is_mgda_and_large_lambda_is_the_mean():
    """λ = 0: exact MGDA's update (to update_tol). For every λ the weights are within ``1/(1 + λ)`` of 1/T and at
    least ``λ/(T(1 + λ))`` (``v = (w* + λ/T)/(1 + λ)`` with ``w* ∈ Δ``); λ = 1e8 gives the mean to ~1e-8."""
    fails = Failures()
    for label, J in _grid():
        T = J.shape[0]
        d, _, D = aa.evaluate(lambda: SDMGrad(lamda=0.0), J)
        d_m, _, D_m = aa.evaluate(lambda: MGDA(solver="exact"), J)
        dev = aa.deviation(J, d, D, d_m, D_m)
        fails.check(dev.within(aa.update_tol(J)), f"{label}/λ=0", f"differs from MGDA by {dev}")
        for lamda in (*LAMDAS, 1e8):
            v = SDMGrad(lamda=lamda).weights(J @ J.T).numpy()
            dist = float(np.abs(v - 1.0 / T).max())
            fails.check(dist <= 1.0 / (1.0 + lamda) + 1e-15, f"{label}/λ={lamda}", f"|v - 1/T| = {dist:.3g}")
            fails.check(float(v.min()) >= lamda / (T * (1.0 + lamda)) - 1e-15, f"{label}/λ={lamda}", "v too small")
            fails.check(abs(float(v.sum()) - 1.0) <= 1e-12, f"{label}/λ={lamda}", f"Σv = {float(v.sum())!r}")
    fails.raise_if_any("sdmgrad: limits")


# ----------------------------------------------------------------------------------- the property suite's checks
@pytest.mark.parametrize("dtype", DTYPES, ids=["float64", "float32"])
def test_structure_permutation_and_linear_scaling(dtype):
    """The checks ``test_aggregator_properties`` runs on every aggregator of ``aggregation_asserts.AGGREGATORS``
    (SDMGrad belongs there as ``"sdmgrad": SDMGrad`` with scaling "linear": w* is invariant under J → sJ): the
    update is ``weights(JJᵀ)ᵀJ``, finite, in J's dtype; permuting the tasks and scaling J by 1e-6/1e6 change it by
    at most ``update_tol``."""
    fails = Failures()
    for label, J in _grid(dtypes=(dtype,)):
        try:
            aa.assert_expected_structure(SDMGrad, J)
        except AssertionError as e:
            fails.check(False, label, f"structure: {e}")
        tol = aa.update_tol(J)
        dev = aa.permutation_difference(SDMGrad, J, aa.permutations(J.shape[0]))
        fails.check(dev.within(tol), label, f"permutation difference {dev} > {tol:.3g}")
        for s in (aa.TINY, aa.HUGE):
            dev = aa.scaling_difference(SDMGrad, J, s, "linear")
            fails.check(dev.within(tol), f"{label}/s={s:g}", f"scaling deviation {dev} > {tol:.3g}")
    fails.raise_if_any(f"sdmgrad: property suite ({dtype})")


def test_zero_gradients_give_zero_for_both_solvers():
    for solver in ("exact", "pgd"):
        for dtype in DTYPES:
            assert torch.equal(SDMGrad(solver=solver)(torch.zeros(3, 5, dtype=dtype)), torch.zeros(5, dtype=dtype))


def test_sum_scale_multiplies_the_weights_by_T():
    J = aa.make_family("conflicting", 4)
    G = J @ J.T
    wrapped = build_method("sdmgrad", scale="sum").aggregator
    assert wrapped.gramian_based and torch.equal(wrapped.weights(G), 4 * SDMGrad().weights(G))


# ----------------------------------------------------------------------------------- the authors' inner loop (pgd)
def _proj_simplex_sort(v: np.ndarray) -> np.ndarray:
    """The authors' ``euclidean_proj_simplex`` (Duchi et al. 2008), re-written."""
    n = v.shape[0]
    u = np.sort(v)[::-1]
    cssv = np.cumsum(u)
    rho = np.nonzero(u * np.arange(1, n + 1) > (cssv - 1.0))[0][-1]
    return np.maximum(v - (cssv[rho] - 1.0) / (rho + 1.0), 0.0)


def _authors_sdmgrad(Js, lamda=0.3, niter=20, lr=10.0, eps=0.0):
    """OptMN-Lab/sdmgrad ``SDMGrad.sdmgrad`` in its single-batch use (the three gradient matrices are the same J),
    with torch's SGD as in their code; w persists across calls. ``eps``: their 1e-4 under the square roots."""
    T = Js[0].shape[0]
    w = torch.full((T,), 1.0 / T, dtype=torch.float64)
    out = []
    for J in Js:
        grads = J.T.to(torch.float64)  # P x T, as in their code
        GG = grads.T @ grads
        GG = GG / torch.mean(torch.sqrt(torch.diag(GG) + eps)).pow(2)
        Gg = torch.mean(GG, dim=1)
        w.requires_grad = True
        optimizer = torch.optim.SGD([w], lr=lr, momentum=0.5)
        for _ in range(niter):
            optimizer.zero_grad()
            w.grad = torch.mv(GG, w.detach()) + lamda * Gg
            optimizer.step()
            w.data.copy_(torch.from_numpy(_proj_simplex_sort(w.data.numpy())))
        w.requires_grad = False
        out.append((grads @ w + lamda * grads.mean(1)) / (1 + lamda))
    return out


def _lr_max(J: torch.Tensor) -> float:
    """1/λ_max of the normalised Gramian Ĝ = G/s² (s the mean gradient norm): a non-expansive step."""
    G = aa.gramian64(J)
    s = float(np.sqrt(np.diag(G)).mean())
    return 1.0 / float(np.linalg.eigvalsh(G / s**2).max())


def test_pgd_solver_is_the_authors_loop():
    """Five warm-started calls against the re-written authors' loop. Convergent step (1/λ_max(Ĝ)): to
    ``C·K·(P + T)·eps64`` for every T. The authors' default lr = 10 lies far beyond 2/λ_max for random Gramians
    (λ_max(Ĝ) ≈ 1-T), so rounding differences can grow by up to |1 − lr·λ| per iteration: compared at T = 2 and 3
    only, where the projection's clipping keeps the loops together (measured ≤ 1e-10), to 1e-8."""
    for T in aa.TASK_COUNTS:
        Js = [aa.make_family(fam, T, seed) for seed, fam in enumerate(("random", "conflicting", "random"))]
        lr = _lr_max(Js[0]) * 0.9
        ref = _authors_sdmgrad(Js, lr=lr)
        agg = SDMGrad(solver="pgd", lr=lr)
        tol = aa.ROUNDING_C * 20 * len(Js) * (Js[0].shape[1] + T) * EPS64
        for d, r in zip((agg(J) for J in Js), ref, strict=True):
            assert float((d - r).norm()) <= tol * float(r.norm()), (T, float((d - r).norm() / r.norm()))
    for T in (2, 3):
        Js = [aa.make_family("random", T, seed) for seed in range(5)]
        agg = SDMGrad(solver="pgd")
        for d, r in zip((agg(J) for J in Js), _authors_sdmgrad(Js), strict=True):
            assert float((d - r).norm()) <= 1e-8 * float(r.norm()), T


def test_pgd_solver_converges_to_the_exact_one():
    """With a step below 2/λ_max(Ĝ), no momentum and enough iterations, projected gradient descent reaches the
    certified minimiser: the updates agree to update_tol. Well-conditioned full-rank families (strongly convex, linear
    rate); on "conflicting" (ill-conditioned: one shared direction plus 0.3·noise) 2000 iterations still left ~1e-3."""
    fails = Failures()
    for label, J in _grid(("random", "non_conflicting"), task_counts=(2, 3, 5, 10)):
        for lamda in (0.3, 1.0):
            w = SDMGrad(lamda=lamda, solver="pgd", lr=_lr_max(J), momentum=0.0, niter=1500).weights(J @ J.T)
            d, D = w @ J, aa.term_scale(J, w)
            d_ex, _, D_ex = aa.evaluate(lambda lam=lamda: SDMGrad(lamda=lam), J)
            dev = aa.deviation(J, d, D, d_ex, D_ex)
            fails.check(dev.within(aa.update_tol(J)), f"{label}/λ={lamda}", f"pgd differs from exact by {dev}")
    fails.raise_if_any("sdmgrad: pgd vs exact")


def test_pgd_state_round_trip_and_errors():
    Js = [aa.make_family("random", 3, seed) for seed in range(5)]
    agg = SDMGrad(solver="pgd")
    for J in Js[:3]:
        agg(J)
    state = copy.deepcopy(agg.state_dict())
    assert set(state) == {"w"} and state["w"].shape == (3,)
    expected = [agg(J) for J in Js[3:]]
    fresh = SDMGrad(solver="pgd")
    fresh.load_state_dict(state)
    assert all(torch.equal(fresh(J), e) for J, e in zip(Js[3:], expected, strict=True))
    assert SDMGrad().state_dict() == {}  # the exact solver is stateless
    with pytest.raises(ValueError, match="keys"):
        SDMGrad().load_state_dict(state)
    with pytest.raises(ValueError, match="3 tasks and now gets 4"):
        agg(aa.make_family("random", 4))


@pytest.mark.parametrize(
    "options, option",
    [
        ({"lamda": -0.1}, "lamda"),
        ({"lamda": "x"}, "lamda"),
        ({"solver": "cvxpy"}, "solver"),
        ({"niter": 0}, "niter"),
        ({"lr": 0.0}, "lr"),
        ({"momentum": 1.0}, "momentum"),
        ({"momentum": -0.5}, "momentum"),
    ],
)
def test_bad_options_raise_config_errors_naming_the_option(options, option):
    with pytest.raises(ConfigError, match=option):
        build_method("sdmgrad", **options)


# ---------------------------------------------------------------------------------------------------- training
def _cfg(tmp_path, options, **train):
    t = {"epochs": 2, "batch_size": 32, "lr": 0.01, "seed": 0, "progress": False, **train}
    return RunConfig.from_dict(
        {
            "dataset": {"name": "_toy"},
            "model": {"name": "hps", "options": {"encoder": "mlp", "hidden": [16], "head_hidden": 8}},
            "method": {"name": "sdmgrad", "options": options},
            "train": t,
            "output": {"dir": str(tmp_path / "run"), "tensorboard": False},
        }
    )


def test_trains_and_the_pgd_state_resumes_bit_for_bit(tmp_path):
    """Both solvers train (the loss goes down); with the stateful "pgd" solver a run stopped after epoch 1 and
    resumed ends with the same weights as the uninterrupted run."""
    exact = Trainer(_cfg(tmp_path / "e", {})).fit()
    assert exact.history[-1]["train/a/loss"] < exact.history[0]["train/a/loss"]
    full = Trainer(_cfg(tmp_path / "a", {"solver": "pgd"}, epochs=3)).fit()
    assert full.history[-1]["train/a/loss"] < full.history[0]["train/a/loss"]
    Trainer(_cfg(tmp_path / "b", {"solver": "pgd"}, epochs=1)).fit()
    resumed = Trainer(_cfg(tmp_path / "b", {"solver": "pgd"}, epochs=3)).fit(resume=True)
    assert resumed.test == full.test
    a, b = (torch.load(tmp_path / d / "run" / "checkpoint.pt", weights_only=False) for d in ("a", "b"))
    for k, v in a["model"].items():
        torch.testing.assert_close(b["model"][k], v, rtol=0, atol=0)
    assert torch.equal(a["method"]["aggregator"]["w"], b["method"]["aggregator"]["w"])
