"""ExcessMTL: the official update re-implemented in numpy, the scale-free excess risk, limits, checkpoints, the loop.

Tolerances: in float64 the state (accumulated squares, risks, log-weights) is the same arithmetic as the reference,
up to the order of the sums and the log-space form of the multiplicative update (exp/log round trips): errors of a
few ulps per step, amplified by at most η·steps in the exponent; 1e-12 relative leaves a margin of ~10³ over
float64's eps 2.2e-16 at these sizes. The scale-invariance check carries ε = 1e-7 inside sqrt(S + ε) against
S >= 1 (losses scaled up by 10 and 100): a relative effect below 1e-7, hence rtol 1e-6.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from mtlkit.config import RunConfig
from mtlkit.errors import ConfigError
from mtlkit.methods import build_method
from mtlkit.train import Trainer
from mtlkit.weighting import StepContext
from mtlkit.weighting.excess_mtl import ExcessMTL

TOL = 1e-12


def _official(grads: list[np.ndarray], step_size: float, baseline_steps: int = 1) -> list[np.ndarray]:
    """The official ExcessMTL.backward (yifei-he/ExcessMTL), plainly in numpy: the weights after each step.

    ``baseline_steps > 1`` extends it as documented: the baseline is the mean risk of the first steps.
    """
    T = grads[0].shape[0]
    loss_weight, grad_sum, initial, acc, out = np.ones(T), np.zeros_like(grads[0]), None, np.zeros(T), []
    for t, g in enumerate(grads):
        grad_sum = grad_sum + g**2
        w = np.array([(g[i] * (1 / np.sqrt(grad_sum[i] + 1e-7))) @ g[i] for i in range(T)])
        if t < baseline_steps:
            acc = acc + w
            if t == baseline_steps - 1:
                initial = acc / baseline_steps
        else:
            w = w / initial
            loss_weight = loss_weight * np.exp(w * step_size)
            loss_weight = loss_weight / loss_weight.sum() * T
        out.append(loss_weight.copy())
    return out


def _linear_step(ex: ExcessMTL, theta: nn.Parameter, G: np.ndarray, c: np.ndarray | None = None) -> torch.Tensor:
    """Losses ``L_i = ⟨G_i, θ⟩ + c_i`` (their gradients are exactly the rows of G) through ``ex``."""
    Gt = torch.tensor(G)
    losses = Gt @ theta + (0.0 if c is None else torch.tensor(c))
    return ex(losses, StepContext(shared_params=[theta]))


def _w(ex: ExcessMTL) -> torch.Tensor:
    w = ex.weights()
    assert w is not None
    return w


def _double(ex: ExcessMTL, T: int) -> ExcessMTL:
    ex.setup(T)
    return ex.double()


@pytest.mark.parametrize("baseline_steps", [1, 3])
@pytest.mark.parametrize("T,P", [(2, 4), (3, 7), (6, 11)])
def test_weights_are_the_official_update(T, P, baseline_steps):
    rng = np.random.default_rng(T * 10 + P)
    # gradients changing from step to step (some coordinates exactly 0: the ε in sqrt(S + ε) then matters)
    grads = [rng.normal(size=(T, P)) * rng.uniform(0.1, 3.0, (T, 1)) for _ in range(8)]
    grads[0][:, 0] = 0.0
    ex = _double(ExcessMTL(step_size=0.3, baseline_steps=baseline_steps), T)
    theta = nn.Parameter(torch.zeros(P, dtype=torch.float64))
    ref = _official(grads, 0.3, baseline_steps)
    for t, G in enumerate(grads):
        c = np.full(T, 1.0)
        out = _linear_step(ex, theta, G, c)
        np.testing.assert_allclose(_w(ex).numpy(), ref[t], rtol=TOL, atol=TOL, err_msg=f"step {t}")
        np.testing.assert_allclose(out.detach().numpy(), ref[t] * c, rtol=TOL, atol=TOL)  # this step's weights
        assert _w(ex).sum().item() == pytest.approx(T, rel=TOL) and bool(torch.all(_w(ex) > 0))
    np.testing.assert_allclose(ex.grad_sq_sum.numpy(), sum(g**2 for g in grads), rtol=TOL, atol=TOL)


def test_per_task_gradients_of_a_network_are_those_of_autograd():
    """Through a real shared encoder: the risks ex computes are those of manually computed per-task gradients."""
    torch.manual_seed(0)
    enc = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4)).double()
    heads = [nn.Linear(4, 1).double() for _ in range(3)]
    x = torch.randn(16, 3, dtype=torch.float64)
    ex = _double(ExcessMTL(), 3)
    params = list(enc.parameters())
    S = None
    for step in range(3):
        z = enc(x * (1 + step))
        losses = torch.stack([h(z).pow(2).mean() * (t + 1) for t, h in enumerate(heads)])
        grads = [torch.autograd.grad(losses[t], params, retain_graph=True) for t in range(3)]
        J = torch.stack([torch.cat([g.flatten() for g in row]) for row in grads]).numpy()
        head_grads = [torch.autograd.grad(losses[t], heads[t].weight, retain_graph=True)[0] for t in range(3)]
        S = J**2 if S is None else S + J**2
        out = ex(losses, StepContext(shared_params=params))
        np.testing.assert_allclose(ex.excess_risks.numpy(), (J**2 / np.sqrt(S + 1e-7)).sum(1), rtol=TOL)
        out.sum().backward()  # the graph survives ExcessMTL's own gradient passes
        w = _w(ex)
        for t, h in enumerate(heads):  # head t gets w_t·∇L_t: entry t depends on task t's loss only
            torch.testing.assert_close(h.weight.grad, w[t] * head_grads[t], rtol=TOL, atol=TOL)
            h.zero_grad()
        enc.zero_grad()


def test_the_weights_do_not_depend_on_each_losss_scale():
    rng = np.random.default_rng(3)
    grads = [rng.normal(size=(3, 5)) for _ in range(6)]
    scale = np.array([[1.0], [100.0], [10.0]])  # scaled up: ε stays negligible against S (scaled down, it would not)
    a, b = _double(ExcessMTL(step_size=0.5), 3), _double(ExcessMTL(step_size=0.5), 3)
    ta, tb = (nn.Parameter(torch.zeros(5, dtype=torch.float64)) for _ in range(2))
    for G in grads:
        _linear_step(a, ta, G)
        _linear_step(b, tb, G * scale)
        np.testing.assert_allclose(_w(b).numpy(), _w(a).numpy(), rtol=1e-6)


def test_a_task_moving_away_from_convergence_gains_weight_and_tiny_steps_are_ew():
    G0 = np.array([[1.0, 0.0], [0.0, 1.0]])
    ex = _double(ExcessMTL(step_size=0.1), 2)
    theta = nn.Parameter(torch.zeros(2, dtype=torch.float64))
    _linear_step(ex, theta, G0)
    for k in range(1, 6):  # task 1's gradient grows: its excess risk relative to its baseline grows
        _linear_step(ex, theta, np.array([[1.0, 0.0], [0.0, 1.0 + k]]))
    w = _w(ex)
    assert w[1] > 1.0 > w[0]
    tiny = _double(ExcessMTL(step_size=1e-12), 2)
    for k in range(6):
        _linear_step(tiny, theta, np.array([[1.0, 0.0], [0.0, 1.0 + k]]))
    np.testing.assert_allclose(_w(tiny).numpy(), [1.0, 1.0], rtol=0, atol=1e-10)  # η → 0: EW


def test_grad_at_last_shared_layer_accumulates_that_layer_only():
    last = nn.Linear(4, 2)
    enc = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), last)
    x = torch.randn(8, 3)
    ex = ExcessMTL(grad_at="last_shared_layer")
    z = enc(x)
    ctx = StepContext(shared_params=list(enc.parameters()))  # no last_shared_layer: the last matrix, last.weight
    ex(torch.stack([z[:, 0].pow(2).mean(), z[:, 1].pow(2).mean()]), ctx)
    assert ex.grad_sq_sum.shape == (2, last.weight.numel())
    ex2 = ExcessMTL()
    ex2(torch.stack([enc(x)[:, 0].pow(2).mean(), enc(x)[:, 1].pow(2).mean()]), ctx)
    assert ex2.grad_sq_sum.shape == (2, sum(p.numel() for p in enc.parameters()))


def test_missing_context_and_gradient_free_tasks_are_errors():
    theta = nn.Parameter(torch.ones(2))
    losses = torch.stack([theta[0] ** 2, theta[1] ** 2])
    with pytest.raises(ValueError, match="shared_params"):
        ExcessMTL()(losses)
    other = nn.Parameter(torch.ones(1))
    losses = torch.stack([theta.pow(2).sum(), other.pow(2).sum()])
    with pytest.raises(ValueError, match=r"task\(s\) b "):  # task b never reaches the shared parameters
        ExcessMTL()(losses, StepContext(shared_params=[theta], task_names=["a", "b"]))


def test_changed_shared_parameters_are_refused():
    ex = ExcessMTL()
    a, b = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(3))
    ex(torch.stack([a.sum(), a.pow(2).sum()]), StepContext(shared_params=[a]))
    with pytest.raises(ValueError, match="must not change size"):
        ex(torch.stack([b.sum(), b.pow(2).sum()]), StepContext(shared_params=[b]))


def test_no_state_change_in_eval_or_without_grad():
    theta = nn.Parameter(torch.zeros(2, dtype=torch.float64))
    ex = _double(ExcessMTL(step_size=0.5), 2)
    for G in (np.eye(2), np.diag([1.0, 3.0])):
        _linear_step(ex, theta, G)
    before = {k: v.clone() for k, v in ex.state_dict().items() if isinstance(v, torch.Tensor)}
    ex.eval()
    _linear_step(ex, theta, np.diag([5.0, 1.0]))
    ex.train()
    with torch.no_grad():
        _linear_step(ex, theta, np.diag([5.0, 1.0]))
    for k, v in ex.state_dict().items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, before[k]), k


def test_state_dict_round_trip_continues_exactly():
    rng = np.random.default_rng(5)
    grads = [rng.normal(size=(3, 4)) for _ in range(6)]
    theta = nn.Parameter(torch.zeros(4, dtype=torch.float64))
    full = ExcessMTL(step_size=0.2)  # float32 buffers, as in training
    for G in grads:
        _linear_step(full, theta, G)
    first = ExcessMTL(step_size=0.2)
    for G in grads[:3]:
        _linear_step(first, theta, G)
    resumed = ExcessMTL(step_size=0.2)  # not set up, S of size 0: the checkpoint sets both
    resumed.load_state_dict(first.state_dict())
    assert resumed.num_tasks == 3 and resumed.grad_sq_sum.shape == (3, 4)
    for G in grads[3:]:
        _linear_step(resumed, theta, G)
    for k, v in full.state_dict().items():
        if isinstance(v, torch.Tensor):
            torch.testing.assert_close(resumed.state_dict()[k], v, rtol=0, atol=0, msg=k)


@pytest.mark.parametrize(
    "options, word",
    [
        ({"step_size": 0.0}, "step_size"),
        ({"step_size": -1.0}, "step_size"),
        ({"step_size": float("inf")}, "step_size"),
        ({"eps": 0.0}, "eps"),
        ({"baseline_steps": 0}, "baseline_steps"),
        ({"baseline_steps": 2.0}, "baseline_steps"),
        ({"baseline_steps": True}, "baseline_steps"),
        ({"grad_at": "representation"}, "grad_at"),
    ],
)
def test_bad_options_are_config_errors_naming_the_option(options, word):
    with pytest.raises(ConfigError, match=word):
        ExcessMTL(**options)
    with pytest.raises(ConfigError, match=word):
        build_method("excess_mtl", **options)


def _cfg(tmp_path, epochs: int, checkpoint_minutes: float = 10.0) -> RunConfig:
    return RunConfig.from_dict(
        {
            "dataset": {"name": "_toy"},
            "model": {"name": "hps", "options": {"encoder": "mlp", "hidden": [16], "head_hidden": 8}},
            "method": {"name": "excess_mtl", "options": {"step_size": 0.5}},
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
    full = Trainer(_cfg(tmp_path / "a", 2)).fit()
    for r in full.history:
        w = [r["weight/a"], r["weight/b"]]
        assert all(v > 0 for v in w) and sum(w) == pytest.approx(2.0, rel=1e-5) and w != [1.0, 1.0]
    Trainer(_cfg(tmp_path / "b", 1)).fit()
    resumed = Trainer(_cfg(tmp_path / "b", 2)).fit(resume=True)
    assert resumed.test == full.test
    ck_a, ck_b = (torch.load(tmp_path / d / "run" / "checkpoint.pt", weights_only=False) for d in ("a", "b"))
    for k, v in ck_a["model"].items():
        torch.testing.assert_close(ck_b["model"][k], v, rtol=0, atol=0)
    for k, v in ck_a["method"]["weighting"].items():
        if isinstance(v, torch.Tensor):
            torch.testing.assert_close(ck_b["method"]["weighting"][k], v, rtol=0, atol=0, msg=k)


def test_a_run_stopped_inside_an_epoch_resumes_bit_for_bit(tmp_path, monkeypatch):
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
