"""STCH (smooth Tchebycheff scalarisation): the authors' formula, the paper's bounds and limits, phases, checkpoints.

Tolerances: the checks in float64 compare two evaluations of the same closed form (log-sum-exp and its variational
form Σ p·z − μ Σ p log p; softmax gradients), whose rounding is a few ulps of the largest term times T; 1e-12
(relative, on terms of order 1) leaves a margin of ~10³ over float64's eps 2.2e-16 and fails on any formula error.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.special
import torch

from mtlkit.config import RunConfig
from mtlkit.errors import ConfigError
from mtlkit.methods import build_method
from mtlkit.train import Trainer
from mtlkit.weighting.stch import STCH

TOL = 1e-12


def _active(T: int, mu: float, nadir, preference=None) -> STCH:
    """An STCH past its warm-up (nadir given), in float64."""
    s = STCH(mu=mu, warmup_epochs=0, nadir=nadir, preference=preference)
    s.setup(T)
    return s.double()


def _w(s: STCH) -> torch.Tensor:
    w = s.weights()
    assert w is not None
    return w


def _official_loss(losses: torch.Tensor, nadir: torch.Tensor, mu: float) -> torch.Tensor:
    """The authors' STCH phase, written as in STCH_MTL/LibMTL/weighting/STCH.py (λ = 1, max-shift not added back)."""
    ell = torch.log(losses / nadir + 1e-20)
    reg = ell - torch.max(ell.data).detach()
    return mu * torch.log(torch.sum(torch.exp(reg / mu))) * len(losses)


@pytest.mark.parametrize("mu", [0.01, 0.1, 1.0, 10.0])
@pytest.mark.parametrize("T", [2, 3, 7])
def test_value_and_gradient_are_the_authors_formula(mu, T):
    rng = np.random.default_rng(T * 100 + int(mu * 100))
    L = rng.uniform(0.05, 3.0, T)
    n = rng.uniform(0.1, 2.0, T).astype(np.float32).astype(np.float64)  # the nadir buffer is float32
    stch = _active(T, mu, n.tolist())
    losses = torch.tensor(L, requires_grad=True)
    out = stch(losses)
    (g_ours,) = torch.autograd.grad(out.sum(), losses)
    # value: T·μ·logsumexp(ℓ/μ) (scipy), the official loss plus the T·max it subtracts
    ell = np.log(L / n + 1e-20)
    value = T * mu * scipy.special.logsumexp(ell / mu)
    assert float(out.detach().sum()) == pytest.approx(value, rel=TOL, abs=TOL)
    official = _official_loss(torch.tensor(L, requires_grad=True), torch.tensor(n), mu)
    assert float(official.detach()) + T * ell.max() == pytest.approx(value, rel=TOL, abs=TOL)
    # gradient: the official loss's autograd gradient and the closed form T·softmax(ℓ/μ)_i / (L_i + ε n_i)
    lo = torch.tensor(L, requires_grad=True)
    (g_official,) = torch.autograd.grad(_official_loss(lo, torch.tensor(n), mu), lo)
    closed = T * scipy.special.softmax(ell / mu) / (L + 1e-20 * n)
    np.testing.assert_allclose(g_ours.numpy(), g_official.numpy(), rtol=TOL, atol=TOL)
    np.testing.assert_allclose(g_ours.numpy(), closed, rtol=TOL, atol=TOL)
    np.testing.assert_allclose(_w(stch).numpy(), T * scipy.special.softmax(ell / mu), rtol=TOL, atol=TOL)


def test_preference_enters_as_lambda_rescaled_to_sum_T():
    # λ chosen so that T·λ/Σλ = [0.75, 1.5, 0.75] is exact in the float32 buffer
    L, n, lam, mu = np.array([0.7, 1.3, 0.4]), np.array([1.0, 1.0, 0.5]), np.array([0.25, 0.5, 0.25]), 0.3
    stch = _active(3, mu, n.tolist(), preference=lam.tolist())
    lam_T = 3 * lam / lam.sum()
    ell = np.log(L / n + 1e-20)
    losses = torch.tensor(L, requires_grad=True)
    out = stch(losses)
    assert float(out.detach().sum()) == pytest.approx(3 * mu * scipy.special.logsumexp(lam_T * ell / mu), rel=TOL)
    (g,) = torch.autograd.grad(out.sum(), losses)
    p = scipy.special.softmax(lam_T * ell / mu)
    np.testing.assert_allclose(g.numpy(), 3 * p * lam_T / L, rtol=TOL)
    # λ and cλ are the same preference
    other = _active(3, mu, n.tolist(), preference=(7 * lam).tolist())
    torch.testing.assert_close(other(torch.tensor(L)), out.detach(), rtol=TOL, atol=TOL)


def test_entry_t_depends_on_task_t_only():
    stch = _active(4, 0.5, [1.0, 2.0, 0.5, 1.5])
    losses = torch.tensor([0.3, 2.5, 0.9, 1.1], dtype=torch.float64, requires_grad=True)
    jac = torch.autograd.functional.jacobian(lambda v: stch(v), losses)
    off = jac - torch.diag(torch.diagonal(jac))
    assert float(off.abs().max()) == 0.0
    assert bool((torch.diagonal(jac) > 0).all())


@pytest.mark.parametrize("mu", [1e-3, 0.1, 1.0, 5.0])
def test_the_papers_bounds_max_le_g_le_max_plus_mu_log_T(mu):
    """``max_i λ_i ℓ_i ≤ g_μ ≤ max_i λ_i ℓ_i + μ log T`` (the smooth approximation's bounds, Sec. 3)."""
    rng = np.random.default_rng(1)
    for T in (2, 5, 20):
        L, n = rng.uniform(0.1, 3.0, T), rng.uniform(0.1, 2.0, T).astype(np.float32).astype(np.float64)
        g = float(_active(T, mu, n.tolist())(torch.tensor(L)).sum()) / T
        m = float(np.log(L / n + 1e-20).max())
        assert m - TOL <= g <= m + mu * math.log(T) + TOL


def test_small_mu_is_tchebycheff_and_large_mu_is_linear_scalarisation():
    L, n = torch.tensor([0.5, 2.0, 1.0], dtype=torch.float64), [1.0, 1.0, 1.0]
    ell = torch.log(L)
    # μ → 0: the weights concentrate on the worst normalised task (classical Tchebycheff, max_i ℓ_i)
    small = _active(3, 1e-4, n)
    out = small(L.clone().requires_grad_(True))
    torch.testing.assert_close(_w(small), torch.tensor([0.0, 3.0, 0.0], dtype=torch.float64), atol=1e-12, rtol=0)
    assert float(out.detach().sum()) / 3 == pytest.approx(float(ell.max()), abs=1e-12)
    # μ → ∞: uniform weights λ = 1, the gradient of Σ_i ℓ_i (linear scalarisation of the normalised log losses)
    big = _active(3, 1e8, n)
    losses = L.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(big(losses).sum(), losses)
    torch.testing.assert_close(g, 1 / L, rtol=1e-7, atol=0)


def test_scale_invariance_of_the_normalised_losses():
    """Scaling a task's losses and its nadir by c > 0 changes nothing (ℓ = log(L/n) is unchanged)."""
    a = _active(2, 0.2, [1.0, 0.5])
    b = _active(2, 0.2, [1.0, 0.5 * 1000])
    L = torch.tensor([0.8, 0.3], dtype=torch.float64)
    torch.testing.assert_close(a(L), b(L * torch.tensor([1.0, 1000.0], dtype=torch.float64)), rtol=1e-12, atol=0)


def test_warmup_phases_follow_the_official_schedule():
    """warmup_epochs=k+1 is the official STCH_warmup_epoch=k: log losses in epochs 0..k, nadir = epoch k's mean."""
    stch = STCH(mu=1.0, warmup_epochs=2)
    L = torch.tensor([0.5, 2.0], requires_grad=True)
    for mean in ([1.0, 1.0], [0.8, 4.0]):  # epochs 0 and 1: warm-up, Σ log(L + ε)
        assert stch.in_warmup()
        out = stch(L)
        torch.testing.assert_close(out, torch.log(L.detach()))
        (g,) = torch.autograd.grad(out.sum(), L)
        torch.testing.assert_close(g, 1 / L.detach())
        torch.testing.assert_close(_w(stch), torch.ones(2))
        stch.on_epoch_end(torch.tensor(mean))
    assert not stch.in_warmup() and int(stch.epochs_seen) == 2
    torch.testing.assert_close(stch.nadir_point, torch.tensor([0.8, 4.0]))  # the last warm-up epoch's mean
    out = stch(L)
    ell = torch.log(L.detach() / torch.tensor([0.8, 4.0]))
    assert float(out.detach().sum()) == pytest.approx(float(2 * torch.logsumexp(ell, 0)), rel=1e-6)
    stch.on_epoch_end(torch.tensor([0.1, 0.1]))  # later epochs leave the nadir alone
    torch.testing.assert_close(stch.nadir_point, torch.tensor([0.8, 4.0]))


def test_a_nadir_epoch_with_a_zero_loss_is_refused():
    stch = STCH(warmup_epochs=1)
    stch(torch.ones(2))
    with pytest.raises(ValueError, match="nadir"):
        stch.on_epoch_end(torch.tensor([0.0, 1.0]))


def test_no_state_change_in_eval_or_without_grad():
    stch = _active(2, 0.5, [1.0, 1.0])
    stch(torch.tensor([1.0, 3.0], dtype=torch.float64, requires_grad=True))
    before = _w(stch)
    stch.eval()
    stch(torch.tensor([3.0, 1.0], dtype=torch.float64))
    stch.train()
    with torch.no_grad():
        stch(torch.tensor([3.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(_w(stch), before)


@pytest.mark.parametrize(
    "options, word",
    [
        ({"mu": 0.0}, "mu"),
        ({"mu": -1.0}, "mu"),
        ({"mu": float("nan")}, "mu"),
        ({"mu": True}, "mu"),
        ({"warmup_epochs": -1}, "warmup_epochs"),
        ({"warmup_epochs": 1.5}, "warmup_epochs"),
        ({"warmup_epochs": 0}, "warmup_epochs"),  # no nadir given: nothing to measure it in
        ({"preference": [1.0, -1.0]}, "preference"),
        ({"preference": []}, "preference"),
        ({"preference": "ab"}, "preference"),
        ({"nadir": [0.0, 1.0]}, "nadir"),
        ({"eps": -1e-3}, "eps"),
    ],
)
def test_bad_options_are_config_errors_naming_the_option(options, word):
    with pytest.raises(ConfigError, match=word):
        STCH(**options)
    with pytest.raises(ConfigError, match=word):
        build_method("stch", **options)


def test_option_lengths_are_checked_against_T():
    for opt in ("preference", "nadir"):
        s = STCH(preference=[1.0, 2.0, 3.0]) if opt == "preference" else STCH(nadir=[1.0, 2.0, 3.0])
        with pytest.raises(ConfigError, match=opt):
            s.setup(2)


def test_state_dict_round_trip_resumes_phase_and_nadir():
    a = STCH(mu=0.3, warmup_epochs=1)
    L = torch.tensor([0.6, 1.7], requires_grad=True)
    a(L)
    a.on_epoch_end(torch.tensor([0.9, 1.2]))
    out_a = a(L)
    b = STCH(mu=0.3, warmup_epochs=1)
    b.load_state_dict(a.state_dict())
    assert b.num_tasks == 2 and not b.in_warmup()
    torch.testing.assert_close(b(L), out_a)
    torch.testing.assert_close(_w(b), _w(a))
    fresh = STCH(mu=0.3, warmup_epochs=1)
    fresh.setup(2)
    assert fresh.in_warmup()


def _cfg(tmp_path, epochs: int, checkpoint_minutes: float = 10.0) -> RunConfig:
    return RunConfig.from_dict(
        {
            "dataset": {"name": "_toy"},
            "model": {"name": "hps", "options": {"encoder": "mlp", "hidden": [16], "head_hidden": 8}},
            "method": {"name": "stch", "options": {"warmup_epochs": 1, "mu": 0.5}},
            "train": {
                "epochs": epochs,
                "batch_size": 32,
                "lr": 0.01,
                "seed": 0,
                "progress": False,
                "checkpoint_minutes": checkpoint_minutes,
            },
            "output": {"dir": str(tmp_path / "run"), "tensorboard": False},
        }
    )


def test_trains_through_the_trainer_and_resumes(tmp_path):
    full = Trainer(_cfg(tmp_path / "a", 3)).fit()
    rows = full.history
    assert [r["weight/a"] for r in rows[:1]] == [1.0]  # warm-up epoch
    for r in rows[1:]:  # STCH epochs: weights T·softmax, positive, summing to T
        w = [r["weight/a"], r["weight/b"]]
        assert all(v > 0 for v in w) and sum(w) == pytest.approx(2.0, rel=1e-5) and w != [1.0, 1.0]
    assert rows[-1]["train/a/loss"] < rows[0]["train/a/loss"] or rows[-1]["train/b/loss"] < rows[0]["train/b/loss"]
    Trainer(_cfg(tmp_path / "b", 1)).fit()
    resumed = Trainer(_cfg(tmp_path / "b", 3)).fit(resume=True)
    assert resumed.test == full.test
    ck_a, ck_b = (torch.load(tmp_path / d / "run" / "checkpoint.pt", weights_only=False) for d in ("a", "b"))
    for k, v in ck_a["model"].items():
        torch.testing.assert_close(ck_b["model"][k], v, rtol=0, atol=0)
    torch.testing.assert_close(
        ck_b["method"]["weighting"]["nadir_point"], ck_a["method"]["weighting"]["nadir_point"], rtol=0, atol=0
    )


def test_a_run_stopped_inside_an_epoch_resumes_bit_for_bit(tmp_path, monkeypatch):
    """Killed in the STCH phase's first epoch (after the nadir epoch), resumed from the mid-epoch checkpoint."""
    full = Trainer(_cfg(tmp_path / "a", 2)).fit()
    cfg = _cfg(tmp_path / "b", 2, checkpoint_minutes=1e-9)  # a checkpoint after every step
    t = Trainer(cfg)
    steps, real, count = -(-len(t.data.train) // 32), Trainer._step, [0]

    def step(self, *args, **kwargs):
        count[0] += 1
        if count[0] == steps + 2:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "_step", step)
    with pytest.raises(KeyboardInterrupt):
        t.fit()
    ck = torch.load(tmp_path / "b" / "run" / "checkpoint.pt", weights_only=False)
    assert (ck["epoch"], ck["in_epoch"]["batch"]) == (0, 1)  # inside the second epoch
    monkeypatch.undo()
    resumed = Trainer(cfg).fit(resume=True)
    assert resumed.test == full.test
    assert [r["weight/a"] for r in resumed.history] == [r["weight/a"] for r in full.history]
