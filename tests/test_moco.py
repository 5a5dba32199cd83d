"""MoCo (mtlkit/aggregation/moco.py): the paper's Algorithm 1 and the authors' code re-implemented plainly, the
fixed point (MGDA's regularised problem), tracking, limits, scale, state, options and training through the Trainer.

Tolerances. The reference re-implementations run in float64 like the aggregator on float64 input; they differ in
the order of operations only, so one call differs by a few ``(P + T)·eps64``. The λ step ``λ − γ_k(YYᵀ + ρI)λ`` is
non-expansive when ``γ_k·||YYᵀ + ρI|| ≤ 2`` and so is the projection, so over K calls the difference stays below
``C·K·(P + T)·eps64`` (C = 4, as in ``aggregation_asserts``); the inputs are scaled so that the condition holds.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from mtlkit.aggregation import MGDA
from mtlkit.aggregation.moco import MoCo
from mtlkit.config import RunConfig
from mtlkit.errors import ConfigError
from mtlkit.methods import build_method
from mtlkit.train import Trainer

EPS64 = float(np.finfo(np.float64).eps)


def _seq(T: int, P: int, K: int, seed: int, scale: float = 1.0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [scale * torch.randn(T, P, generator=g, dtype=torch.float64) for _ in range(K)]


def _proj_simplex_bisect(v: np.ndarray) -> np.ndarray:
    """Projection onto the simplex by bisection on the threshold θ of ``max(v - θ, 0)`` (independent of the sort
    algorithm in mtlkit), to float64 resolution."""
    lo, hi = float(v.min()) - 1.0, float(v.max())
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if np.maximum(v - mid, 0.0).sum() > 1.0:
            lo = mid
        else:
            hi = mid
    w = np.maximum(v - 0.5 * (lo + hi), 0.0)
    return w / w.sum()


def _paper_algorithm_1(Js, beta, beta_sigma, gamma, gamma_sigma, rho, init):
    """MoCo's Algorithm 1 as written in the paper (gradients as columns, one task at a time), without the ball
    projection of y_i: y_i ← y_i − β_k(y_i − h_i); λ ← Π_Δ(λ − γ_k(YᵀY + ρI)λ); d = Yλ."""
    T, P = Js[0].shape
    Y = None
    lam = np.full(T, 1.0 / T)
    out = []
    for k, J in enumerate(Js, start=1):
        H = J.numpy().T  # P x T: column i is task i's gradient
        if Y is None:
            Y = H.copy() if init == "grad" else np.zeros((P, T))
        b = beta / k**beta_sigma
        for i in range(T):
            Y[:, i] = Y[:, i] - b * (Y[:, i] - H[:, i])
        lam = _proj_simplex_bisect(lam - gamma / k**gamma_sigma * (Y.T @ Y + rho * np.eye(T)) @ lam)
        out.append(Y @ lam)
    return out


def _authors_tracking(Js, beta, sigma2, delta, sigma3):
    """The authors' Office-31 code (heshandevaka/MoCo, LibMTL/weighting/Tracking.py), re-written: y starts at 0, the
    λ step is along 2·YᵀYλ (no ρ), projection by sorting, step counter from 1."""
    T = Js[0].shape[0]
    y: np.ndarray | float = 0.0
    lambd = np.full(T, 1.0 / T)
    out = []
    for step, J in enumerate(Js, start=1):
        grads = J.numpy()
        y = y - beta / step**sigma2 * (y - grads.T)
        v = lambd - delta / step**sigma3 * 2 * y.T @ (y @ lambd)
        u = np.sort(v)[::-1]
        cssv = np.cumsum(u) - 1.0
        ind = np.arange(T) + 1
        cond = u - cssv / ind > 0
        lambd = np.maximum(v - cssv[cond][-1] / float(ind[cond][-1]), 0.0)
        out.append(y @ lambd)
    return out


def _run(agg: MoCo, Js) -> list[torch.Tensor]:
    return [agg(J) for J in Js]


def _tol(K: int, T: int, P: int) -> float:
    return 4.0 * K * (P + T) * EPS64


# ------------------------------------------------------------------------------------------- reference formulas
@pytest.mark.parametrize("init", ["grad", "zero"])
@pytest.mark.parametrize("T", [2, 3, 5, 10])
def test_matches_the_papers_algorithm_1(T, init):
    """Eight calls on random inputs (norms ~0.3·√P, so that γ_k·||YYᵀ + ρI|| < 2), several step-size settings."""
    P, K = 2 * T + 3, 8
    Js = _seq(T, P, K, seed=T, scale=0.3 / T**0.5)
    for opts in (
        {},
        {"beta": 0.9, "beta_sigma": 0.0, "gamma": 0.5, "gamma_sigma": 0.0, "rho": 0.1},
        {"beta": 0.2, "beta_sigma": 1.0, "gamma": 1.0, "gamma_sigma": 0.25, "rho": 1.0},
    ):
        full = {"beta": 0.5, "beta_sigma": 0.5, "gamma": 0.1, "gamma_sigma": 0.5, "rho": 0.0, **opts}
        ref = _paper_algorithm_1(Js, init=init, **full)
        got = _run(MoCo(init=init, **full), Js)
        for k, (d, r) in enumerate(zip(got, ref, strict=True)):
            err = float(np.linalg.norm(d.numpy() - r)) / max(float(np.linalg.norm(r)), 1e-300)
            assert err <= _tol(K, T, P), (opts, k, err)


def test_matches_the_authors_tracking_code_with_gamma_twice_their_delta():
    """The authors' code steps along 2·YᵀYλ from Y = 0 without ρ: MoCo(init="zero", gamma=2·delta, rho=0)."""
    for T in (2, 3, 5):
        P, K = 2 * T + 3, 10
        Js = _seq(T, P, K, seed=100 + T, scale=0.3 / T**0.5)
        ref = _authors_tracking(Js, beta=0.1, sigma2=0.5, delta=0.1, sigma3=0.5)
        got = _run(MoCo(beta=0.1, beta_sigma=0.5, gamma=0.2, gamma_sigma=0.5, rho=0.0, init="zero"), Js)
        for d, r in zip(got, ref, strict=True):
            assert float(np.linalg.norm(d.numpy() - r)) <= _tol(K, T, P) * float(np.linalg.norm(r)), T


# ------------------------------------------------------------------------------------- properties of the method
def _kkt_violation(M: np.ndarray, lam: np.ndarray) -> float:
    """Independent KKT residual of ``min_{λ∈Δ} ½λᵀMλ``: ``(Mλ)_i ≥ λᵀMλ`` for all i, with equality where λ_i > 0."""
    Ml = M @ lam
    val = float(lam @ Ml)
    low = float(np.maximum(val - Ml, 0.0).max())  # (Mλ)_i below λᵀMλ
    on = lam > 1e-12
    return max(low, float(np.abs(Ml[on] - val).max())) / float(np.linalg.norm(M, 2))


@pytest.mark.parametrize("rho", [0.0, 0.5])
def test_constant_gradients_converge_to_the_regularised_mgda_weights(rho):
    """With a fixed J (deterministic setting) Y = J and λ runs projected gradient descent on ½λᵀ(G + ρI)λ: with a
    constant step 1/||G + ρI|| it converges (linearly: G + ρI is positive definite for full-rank J) to the fixed
    point ``λ = Π_Δ(λ − γ(G + ρI)λ)``, the problem's minimiser; for ρ = 0 the update is MGDA's min-norm point."""
    for T in (2, 3, 5, 10):
        J = _seq(T, 2 * T + 3, 1, seed=7 + T)[0]
        G = (J @ J.T).numpy()
        M = G + rho * np.eye(T)
        step = 1.0 / float(np.linalg.norm(M, 2))
        agg = MoCo(beta=0.5, gamma=step, gamma_sigma=0.0, rho=rho)
        for _ in range(3000):
            d = agg(J)
        lam = agg.task_weights.numpy()
        fixed = _proj_simplex_bisect(lam - step * M @ lam)
        assert np.abs(fixed - lam).max() <= 1e-12, T
        assert _kkt_violation(M, lam) <= 1e-10, T
        if rho == 0.0:
            torch.testing.assert_close(d, MGDA(solver="exact")(J), rtol=1e-8, atol=1e-10)


def test_tracking_averages_out_zero_mean_noise():
    """J_k = J̄ + ε_k with i.i.d. N(0, σ²) entries: Y_K − J̄ = Σ_j c_j ε_j (c_j the tracking recursion's weights), so
    E||Y_K − J̄||² = σ²·T·P·Σ_j c_j², far below the noise's σ²·T·P (the paper's tracking error, in expectation);
    checked at 4x that mean (a χ² with T·P degrees of freedom is below 4x its mean with probability > 0.999)."""
    T, P, K, sigma = 3, 40, 400, 1.0
    g = torch.Generator().manual_seed(0)
    Jbar = torch.randn(T, P, generator=g, dtype=torch.float64)
    agg = MoCo(beta=0.5, beta_sigma=0.5)
    for _ in range(K):
        agg(Jbar + sigma * torch.randn(T, P, generator=g, dtype=torch.float64))
    betas = [1.0] + [0.5 / k**0.5 for k in range(2, K + 1)]  # init="grad": Y_1 = J_1, i.e. β_1 = 1 in effect
    c = np.array([b * np.prod([1.0 - bb for bb in betas[j + 1 :]]) for j, b in enumerate(betas)])
    expected = sigma**2 * T * P * float((c * c).sum())
    err = float(((agg.state_dict()["y"] - Jbar) ** 2).sum())
    assert float((c * c).sum()) < 0.05 and err <= 4 * expected, (err, expected)


def test_no_tracking_and_no_weight_step_is_the_mean_of_the_current_gradients():
    """β_k = 1 (β = 1, σ = 0) makes Y = J at every call; γ = 0 keeps λ = 1/T: the update is then the mean, call
    after call."""
    agg = MoCo(beta=1.0, beta_sigma=0.0, gamma=0.0)
    for J in _seq(4, 9, 5, seed=3):
        torch.testing.assert_close(agg(J), J.mean(0), rtol=0, atol=4 * 13 * EPS64 * float(J.abs().max()))


def test_identical_rows_and_positive_multiples_give_a_convex_combination():
    """Declared scale "convex": T identical rows g give g at every call; rows c_t·g give λᵀc·g with λ ∈ Δ."""
    g = torch.randn(7, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    agg = MoCo()
    for _ in range(4):
        torch.testing.assert_close(agg(g.repeat(3, 1)), g, rtol=1e-15, atol=0)
    c = torch.tensor([0.5, 1.0, 3.0], dtype=torch.float64)
    agg = MoCo()
    for _ in range(4):
        d = agg(c[:, None] * g[None, :])
        lam = agg.task_weights
        assert bool((lam >= 0).all()) and abs(float(lam.sum()) - 1) <= 1e-15
        torch.testing.assert_close(d, float(lam @ c) * g, rtol=1e-14, atol=0)


def test_zero_gradients_give_zero_and_permuted_tasks_give_the_same_updates():
    assert torch.equal(MoCo()(torch.zeros(3, 5)), torch.zeros(5))
    Js = _seq(4, 11, 6, seed=5, scale=0.3)
    perm = torch.tensor([2, 0, 3, 1])
    a, b = _run(MoCo(rho=0.1), Js), _run(MoCo(rho=0.1), [J[perm] for J in Js])
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=_tol(6, 4, 11), atol=0)


def test_sum_scale_multiplies_by_T():
    Js = _seq(3, 8, 3, seed=2)
    native, summed = build_method("moco").aggregator, build_method("moco", scale="sum").aggregator
    for J in Js:
        torch.testing.assert_close(summed(J), 3 * native(J), rtol=1e-15, atol=0)


# ------------------------------------------------------------------------------------------------- state, errors
def test_state_dict_round_trip_gives_the_same_next_updates_bit_for_bit():
    Js = _seq(3, 10, 5, seed=9)
    agg = MoCo(rho=0.1)
    _run(agg, Js[:3])
    state = copy.deepcopy(agg.state_dict())
    assert set(state) == {"y", "lam", "step"} and state["step"] == 3 and state["y"].shape == (3, 10)
    expected = _run(agg, Js[3:])
    fresh = MoCo(rho=0.1)
    fresh.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(_run(fresh, Js[3:]), expected, strict=True))
    empty = MoCo()
    empty.load_state_dict(MoCo().state_dict())  # before the first call: nothing tracked yet
    assert empty.task_weights is None
    with pytest.raises(ValueError, match="keys"):
        MoCo().load_state_dict({"y": None})


def test_a_change_of_shape_is_refused_with_the_reason():
    agg = MoCo()
    agg(torch.ones(2, 4))
    with pytest.raises(ValueError, match=r"shape \(2, 4\) but got \(2, 5\).*level 'parameter' only"):
        agg(torch.ones(2, 5))
    with pytest.raises(ValueError, match=r"\(3, 4\)"):
        agg(torch.ones(3, 4))


@pytest.mark.parametrize(
    "options, option",
    [
        ({"beta": 0.0}, "beta"),
        ({"beta": 1.5}, "beta"),
        ({"beta_sigma": -1.0}, "beta_sigma"),
        ({"gamma": -0.1}, "gamma"),
        ({"gamma_sigma": float("nan")}, "gamma_sigma"),
        ({"rho": -1.0}, "rho"),
        ({"rho": "big"}, "rho"),
        ({"init": "ones"}, "init"),
    ],
)
def test_bad_options_raise_config_errors_naming_the_option(options, option):
    with pytest.raises(ConfigError, match=rf"^{option} must"):
        build_method("moco", **options)


# ---------------------------------------------------------------------------------------------------- training
def _cfg(tmp_path, **train):
    t = {"epochs": 2, "batch_size": 32, "lr": 0.01, "seed": 0, "progress": False, **train}
    return RunConfig.from_dict(
        {
            "dataset": {"name": "_toy"},
            "model": {"name": "hps", "options": {"encoder": "mlp", "hidden": [16], "head_hidden": 8}},
            "method": {"name": "moco", "options": {"rho": 0.1}},
            "train": t,
            "output": {"dir": str(tmp_path / "run"), "tensorboard": False},
        }
    )


def test_trains_and_a_run_stopped_inside_an_epoch_resumes_bit_for_bit(tmp_path, monkeypatch):
    """The training loss goes down; killed in the second step of the second epoch (checkpoint every step), the
    resumed run restores Y, λ and the step counter and ends with the same weights as the uninterrupted run."""
    full = Trainer(_cfg(tmp_path / "a")).fit()
    assert full.history[-1]["train/a/loss"] < full.history[0]["train/a/loss"]
    cfg = _cfg(tmp_path / "b", checkpoint_minutes=1e-9)
    t = Trainer(cfg)
    steps = -(-len(t.data.train) // 32)
    real, count = Trainer._step, [0]

    def step(self, *args, **kwargs):
        count[0] += 1
        if count[0] == steps + 2:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "_step", step)
    with pytest.raises(KeyboardInterrupt):
        t.fit()
    monkeypatch.undo()
    ck = torch.load(tmp_path / "b" / "run" / "checkpoint.pt", weights_only=False)
    assert ck["method"]["aggregator"]["step"] == steps + 1  # every step so far is in the state
    resumed = Trainer(cfg).fit(resume=True)
    assert resumed.test == full.test
    a, b = (torch.load(tmp_path / d / "run" / "checkpoint.pt", weights_only=False) for d in ("a", "b"))
    for k, v in a["model"].items():
        torch.testing.assert_close(b["model"][k], v, rtol=0, atol=0)
    torch.testing.assert_close(b["method"]["aggregator"]["y"], a["method"]["aggregator"]["y"], rtol=0, atol=0)
