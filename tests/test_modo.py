"""MoDo (mtlkit/aggregation/modo.py): the authors' λ step, the simplex, convergence to MGDA's min-norm point on
exact gradients, the third sample's update, state, bad input, and the sampler callback in the training loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mtlkit.aggregation import MGDA, MoDo, MoDoSampler, on_sum_scale
from mtlkit.config import RunConfig
from mtlkit.engine.autodiff import per_task_grads
from mtlkit.errors import ConfigError
from mtlkit.tasks import stack_losses
from mtlkit.train import Trainer

EPS64 = float(np.finfo(np.float64).eps)


def _authors_projection(y: np.ndarray) -> np.ndarray:
    """The sort-based simplex projection of the authors' code (``_projection2simplex`` in Trade-Off-MOL's
    LibMTL MoDo), rewritten here in NumPy as an independent reference."""
    m = len(y)
    s = np.sort(y)[::-1]
    tmax_f = (y.sum() - 1.0) / m
    tmpsum = 0.0
    for i in range(m - 1):
        tmpsum += s[i]
        tmax = (tmpsum - 1.0) / (i + 1.0)
        if tmax > s[i + 1]:
            tmax_f = tmax
            break
    return np.maximum(y - tmax_f, 0.0)


def _authors_steps(J1s, J2s, gamma, rho):
    """λ ← Π(λ − γ(G₀ G₁ᵀ λ + ρλ)) of the authors' code, from λ = 1/T."""
    T = J1s[0].shape[0]
    lam = np.full(T, 1.0 / T)
    out = []
    for J1, J2 in zip(J1s, J2s, strict=True):
        lam = _authors_projection(lam - gamma * (J1 @ (J2.T @ lam) + rho * lam))
        out.append(lam)
    return out


@pytest.mark.parametrize("T", [2, 3, 7])
def test_lambda_steps_match_the_authors_formula_and_the_update_uses_the_third_sample(T):
    rng = np.random.default_rng(T)
    agg = MoDo(gamma=0.3, rho=0.05)
    J1s = [rng.standard_normal((T, 11)) for _ in range(6)]
    J2s = [rng.standard_normal((T, 11)) for _ in range(6)]
    J3s = [torch.from_numpy(rng.standard_normal((T, 11))) for _ in range(6)]
    want = _authors_steps(J1s, J2s, 0.3, 0.05)
    for J1, J2, J3, lam in zip(J1s, J2s, J3s, want, strict=True):
        agg.set_cross_gramian(torch.from_numpy(J1 @ J2.T))
        d = agg(J3)
        # a projection and a few products of O(1) numbers: float64 rounding times a small factor
        got = agg.task_weights
        assert got is not None
        np.testing.assert_allclose(got.numpy(), lam, rtol=0, atol=100 * EPS64)
        torch.testing.assert_close(d, torch.from_numpy(lam) @ J3, rtol=0, atol=1e3 * EPS64)
        assert got.min() >= 0 and abs(float(got.sum()) - 1) <= 10 * EPS64


def test_exact_gradients_converge_to_mgda_min_norm_point():
    """With z₁ = z₂ = z₃ (exact gradients) and ρ = 0, the λ step is projected gradient descent on ½λᵀGλ over the
    simplex: for γ < 2/λ_max(G) it converges to MGDA's solution (unique update Jᵀλ*)."""
    rng = np.random.default_rng(0)
    J = torch.from_numpy(rng.standard_normal((4, 9)))
    G = (J @ J.T).numpy()
    gamma = 1.0 / np.linalg.eigvalsh(G).max()
    agg = MoDo(gamma=gamma, rho=0.0)
    for _ in range(4000):
        agg.set_cross_gramian(J @ J.T)
        d = agg(J)
    ref = MGDA(solver="exact")(J)
    torch.testing.assert_close(d, ref, rtol=1e-8, atol=1e-8)
    # MGDA's optimality condition, which MoDo's fixed point inherits: ⟨g_i, d⟩ ≥ ||d||² for every task
    assert float((J @ d).min()) >= float(d @ d) * (1 - 1e-8)


def test_scale_and_weights():
    agg = MoDo()
    g = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    for _ in range(3):
        agg.set_cross_gramian(torch.randn(3, 3, dtype=torch.float64))
        torch.testing.assert_close(agg(g.repeat(3, 1)), g)  # convex: identical rows give the row
    assert MoDo.scale == "convex" and MoDo.gramian_based
    J = torch.randn(3, 5, dtype=torch.float64)
    wrapped = on_sum_scale(MoDo())
    torch.testing.assert_close(wrapped(J), 3 * MoDo()(J))
    assert MoDo(gamma=0.0)(J).allclose(J.mean(0))  # γ = 0 keeps λ = 1/T


def test_without_independent_samples_it_uses_the_step_gramian_and_says_so(capsys):
    J = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    a, b = MoDo(gamma=0.2), MoDo(gamma=0.2)
    for _ in range(3):
        b.set_cross_gramian(J @ J.T)
        torch.testing.assert_close(a(J), b(J), rtol=0, atol=0)
    assert capsys.readouterr().err.count("no independent samples") == 1  # the mtlkit log, once


def test_state_round_trip_and_bad_input():
    J = torch.randn(3, 4, dtype=torch.float64)
    a = MoDo(gamma=0.5)
    a(J)
    b = MoDo(gamma=0.5)
    b.load_state_dict(a.state_dict())
    J2 = torch.randn(3, 4, dtype=torch.float64)
    torch.testing.assert_close(a(J2), b(J2), rtol=0, atol=0)
    assert a.state_dict()["step"] == 2
    with pytest.raises(ValueError, match="T x T"):
        a.set_cross_gramian(torch.ones(3, 2))
    with pytest.raises(ValueError, match="3 tasks"):
        a.set_cross_gramian(torch.ones(2, 2))
    with pytest.raises(FloatingPointError, match="NaN"):
        a.set_cross_gramian(torch.full((3, 3), float("nan")))
    with pytest.raises(ValueError, match="keys"):
        a.load_state_dict({"lam": None})
    for bad in ({"gamma": -1.0}, {"rho": -0.1}, {"sample_size": -1}):
        with pytest.raises(ConfigError):
            MoDo(**bad)


def _cfg(tmp_path, method="modo", level=None, **options):
    m = {"name": method, "options": options}
    if level:
        m["level"] = level
    return RunConfig.from_dict(
        {
            "dataset": {"name": "_toy"},
            "model": {"name": "hps", "options": {"encoder": "mlp", "hidden": [16], "head_hidden": 8}},
            "method": m,
            "train": {"epochs": 1, "batch_size": 32, "lr": 0.01, "seed": 3, "progress": False, "num_threads": 1},
            "output": {"dir": str(tmp_path / "run"), "tensorboard": False},
        }
    )


def test_sampler_hands_the_cross_gramian_of_two_independent_batches(tmp_path):
    trainer = Trainer(_cfg(tmp_path, sample_size=8), callbacks=[MoDoSampler()])
    modo = trainer.method.aggregator
    assert isinstance(modo, MoDo)
    seen: list[torch.Tensor] = []
    original = modo.set_cross_gramian

    def record(G: torch.Tensor) -> None:
        seen.append(G.clone())
        original(G)

    modo.set_cross_gramian = record  # type: ignore[method-assign,assignment]
    with torch.no_grad():
        before = [p.clone() for p in trainer.model.parameters()]
    trainer.fit()
    steps = -(-len(trainer.data.train) // 32)
    assert len(seen) == steps and modo.state_dict()["step"] == steps
    # The first step's matrix, recomputed independently: the seeded draws at the initial parameters.
    model = trainer.model.train()  # the sampler's passes are training passes (fit ends in eval mode)
    with torch.no_grad():
        for p, b in zip(model.parameters(), before, strict=True):
            p.copy_(b)
    shared = model.shared_parameters()
    train = trainer.data.train
    J = []
    for k in (1, 2):
        idx = torch.randperm(len(train), generator=torch.Generator().manual_seed((3 * 1_000_003 + 0) * 3 + k))[:8]
        losses = stack_losses(trainer.train_tasks, model(train.x[idx]), {n: v[idx] for n, v in train.y.items()})
        J.append(per_task_grads(losses, shared))
    want = J[0] @ J[1].T
    # float32 products of P-long rows: rounding of the order of eps32·||J₁||·||J₂||
    tol = 10 * float(np.finfo(np.float32).eps) * float(J[0].norm() * J[1].norm())
    torch.testing.assert_close(seen[0], want, rtol=0, atol=tol)


def test_sampler_refuses_other_methods_and_the_representation_level(tmp_path):
    with pytest.raises(ConfigError, match="use method 'modo'"):
        Trainer(_cfg(tmp_path, method="mgda"), callbacks=[MoDoSampler()])
    with pytest.raises(ConfigError, match="parameter level only"):
        Trainer(_cfg(tmp_path, level="representation"), callbacks=[MoDoSampler()])
    assert [type(c) for c in MoDo().callbacks()] == [MoDoSampler]


def test_the_trainer_adds_the_methods_own_callbacks(tmp_path):
    """A run of modo / auto_lambda gets the method's callback without being passed it (mtlkit train, the zoo)."""
    from mtlkit.config import RunConfig
    from mtlkit.weighting.auto_lambda import AutoLambdaMeta

    for method, cls in (("modo", MoDoSampler), ("auto_lambda", AutoLambdaMeta)):
        cfg = RunConfig.from_dict(
            {
                "dataset": {"name": "_toy", "options": {"n_train": 64, "n_test": 16}},
                "model": {"name": "hps", "options": {"encoder": "mlp", "hidden": [8], "head_hidden": 4}},
                "method": {"name": method},
                "train": {"epochs": 1, "batch_size": 16, "progress": False, "log_every": 0},
                "output": {"dir": str(tmp_path / method), "tensorboard": False},
            }
        )
        assert [type(cb) for cb in Trainer(cfg).callbacks] == [cls]
        assert [type(cb) for cb in Trainer(cfg.override(["output.overwrite=true"]), callbacks=[cls()]).callbacks] == [
            cls
        ]
