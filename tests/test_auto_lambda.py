"""Auto-Lambda (mtlkit/weighting/auto_lambda.py): the meta-gradient against the authors' finite-difference formula
(exact where the losses are quadratic, second-order convergence otherwise), the look-ahead = SGD's next step, the
Adam step = torch.optim.Adam, the order meta step → weighted losses, buffers left alone, bad input, and the
callback in the training loop."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from mtlkit.config import RunConfig
from mtlkit.data import Split
from mtlkit.errors import ConfigError
from mtlkit.tasks import Task, stack_losses
from mtlkit.train import Trainer
from mtlkit.weighting import AutoLambda, AutoLambdaMeta, StepContext

EPS64 = float(np.finfo(np.float64).eps)
TASKS = [Task("a", "regression"), Task("b", "regression"), Task("c", "regression")]


class _Net(nn.Module):
    """Shared layer + one linear head per task; ``linear=True``: a frozen linear shared layer, so that the outputs
    are linear in the trained parameters (the heads) and the MSE losses quadratic in them."""

    def __init__(self, linear: bool, bn: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.enc = nn.Sequential(nn.Linear(5, 6), *(nn.BatchNorm1d(6),) * bn, *(nn.Tanh(),) * (not linear))
        self.heads = nn.ModuleDict({t.name: nn.Linear(6, 1) for t in TASKS})
        self.double()
        if linear:
            self.enc.requires_grad_(False)

    def forward(self, x):
        z = self.enc(x)
        return {k: h(z).squeeze(-1) for k, h in self.heads.items()}


def _split(n: int, seed: int) -> Split:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g, dtype=torch.float64)
    return Split(x, {t.name: torch.randn(n, generator=g, dtype=torch.float64) for t in TASKS})


def _bound(linear: bool, momentum: float = 0.9, wd: float = 1e-3, primary=None, bn: bool = False):
    net = _Net(linear, bn)
    opt = torch.optim.SGD(_trained(net), lr=0.1, momentum=momentum, weight_decay=wd)
    train, meta = _split(16, 1), _split(40, 2)
    # one real step, so that SGD has a momentum buffer the look-ahead must use
    opt.zero_grad()
    stack_losses(TASKS, net(train.x), train.y).sum().backward()
    opt.step()
    w = AutoLambda(init=0.3, primary=primary)
    w.setup(3)
    w.double()  # the model's dtype (a float32 λ would make the reference's finite difference cancel in float32)
    w.bind(net, opt, TASKS, meta, batch_size=12, seed=5)
    with torch.no_grad():
        w.lam.copy_(torch.tensor([0.3, 0.7, 1.1]))
    return net, opt, train, meta, w


def _trained(net: nn.Module) -> list[nn.Parameter]:
    return [p for p in net.parameters() if p.requires_grad]


def _authors_meta_gradient(net, opt, train, val_x, val_y, lam, primary, eps_scale=0.01):
    """lorenmt/auto-lambda's ``unrolled_backward`` (virtual step, validation gradient, central finite difference
    of ∇_λ L_train at θ ± εv, ε = eps_scale/||v||), rewritten here as the reference."""
    model_ = copy.deepcopy(net)
    group = opt.param_groups[0]
    loss = (lam * stack_losses(TASKS, net(train.x), train.y)).sum()
    grads = torch.autograd.grad(loss, _trained(net))
    with torch.no_grad():
        for w, w_, g in zip(_trained(net), _trained(model_), grads, strict=True):
            m = opt.state[w].get("momentum_buffer", 0.0) * group["momentum"]
            w_.copy_(w - group["lr"] * (m + g + group["weight_decay"] * w))
    val_loss = (primary * stack_losses(TASKS, model_(val_x), val_y)).sum()
    d_model = [
        torch.zeros_like(p) if d is None else d
        for d, p in zip(
            torch.autograd.grad(val_loss, _trained(model_), allow_unused=True), _trained(model_), strict=True
        )
    ]
    eps = eps_scale / torch.cat([d.reshape(-1) for d in d_model]).norm()
    lam_ = lam.clone().requires_grad_(True)

    def d_lam():
        return torch.autograd.grad((lam_ * stack_losses(TASKS, net(train.x), train.y)).sum(), lam_)[0]

    with torch.no_grad():
        for p, d in zip(_trained(net), d_model, strict=True):
            p.add_(eps * d)
    plus = d_lam()
    with torch.no_grad():
        for p, d in zip(_trained(net), d_model, strict=True):
            p.sub_(2 * eps * d)
    minus = d_lam()
    with torch.no_grad():
        for p, d in zip(_trained(net), d_model, strict=True):
            p.add_(eps * d)
    return -group["lr"] * (plus - minus) / (2 * eps), model_


def _meta_batch(w, meta, step):
    gen = torch.Generator().manual_seed((5 * 1_000_003 + step) * 2 + 1)
    idx = torch.randperm(len(meta), generator=gen)[:12]
    return meta.x[idx], {k: v[idx] for k, v in meta.y.items()}


@pytest.mark.parametrize("primary", [None, ["b"]])
def test_exact_meta_gradient_equals_the_finite_difference_on_quadratic_losses(primary):
    """Linear model + MSE: every L_i is quadratic in θ, so the central difference is exact (no O(ε²) term) and
    both agree to float64 rounding."""
    net, opt, train, meta, w = _bound(linear=True, primary=primary)
    losses = stack_losses(TASKS, net(train.x), train.y)
    got = w.meta_gradient(losses, step=4)
    mask = torch.tensor([1.0, 1.0, 1.0] if primary is None else [0.0, 1.0, 0.0], dtype=torch.float64)
    vx, vy = _meta_batch(w, meta, 4)
    want, _ = _authors_meta_gradient(net, opt, train, vx, vy, w.lam.clone(), mask)
    # the finite difference divides a difference of O(1) losses by 2ε ~ 0.02/||v||: rounding ~ eps64·L/ε
    torch.testing.assert_close(got, want.to(got.dtype), rtol=0, atol=1e4 * EPS64 * float(want.abs().max() + 1))


def test_finite_difference_converges_to_the_exact_term_at_second_order():
    net, opt, train, meta, w = _bound(linear=False)
    losses = stack_losses(TASKS, net(train.x), train.y)
    got = w.meta_gradient(losses, step=0).double()
    vx, vy = _meta_batch(w, meta, 0)
    mask = torch.ones(3, dtype=torch.float64)
    errs = []
    for scale in (0.4, 0.1):
        want, _ = _authors_meta_gradient(net, opt, train, vx, vy, w.lam.clone(), mask, eps_scale=scale)
        errs.append(float((want - got).abs().max()))
    # central difference: error ∝ ε², so a 4x smaller ε gives ~16x less (8x allows for the next term)
    assert errs[0] > 0 and errs[1] < errs[0] / 8, errs
    authors, _ = _authors_meta_gradient(net, opt, train, vx, vy, w.lam.clone(), mask)
    assert float((authors - got).abs().max()) <= errs[1]  # at their ε = 0.01/||v||, closer still


def test_look_ahead_is_sgd_s_next_step_and_buffers_stay():
    net, opt, train, meta, w = _bound(linear=False, bn=True)
    buffers = {k: v.clone() for k, v in net.named_buffers()}
    lam = w.lam.clone()
    losses = stack_losses(TASKS, net(train.x), train.y)
    buffers = {k: v.clone() for k, v in net.named_buffers()}  # after the training forward (BN updated there)
    w.meta_gradient(losses, step=1)
    for k, v in net.named_buffers():
        assert torch.equal(v, buffers[k]), k  # the look-ahead pass ran on copies
    # θ' of the reference equals the parameters SGD reaches when it steps along Σ λ_i ∇L_i
    vx, vy = _meta_batch(w, meta, 1)
    _, model_ = _authors_meta_gradient(net, opt, train, vx, vy, lam, torch.ones(3))
    opt.zero_grad()
    (lam * stack_losses(TASKS, net(train.x), train.y)).sum().backward()
    opt.step()
    for p, q in zip(net.parameters(), model_.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=100 * EPS64)


def test_meta_step_is_torch_adam_and_comes_before_the_weighted_losses():
    net, _, train, _, w = _bound(linear=False)
    lam = w.lam.clone().requires_grad_(True)
    adam = torch.optim.Adam([lam], lr=w.lr)
    for step in range(3):
        losses = stack_losses(TASKS, net(train.x), train.y)
        g = w.meta_gradient(losses, step)
        out = w(losses, StepContext(step=step))
        lam.grad = g.to(lam.dtype)
        adam.step()
        torch.testing.assert_close(w.lam, lam.detach(), rtol=0, atol=10 * EPS64)  # the same float64 operations
        # the step's weighted losses use the weights after this step's meta update (the authors' order)
        torch.testing.assert_close(out, w.lam * losses.detach(), rtol=0, atol=0)
    assert int(w.meta_steps) == 3
    fresh = AutoLambda(init=0.3)
    fresh.setup(3)
    fresh.double()
    fresh.load_state_dict(w.state_dict())
    assert torch.equal(fresh.lam, w.lam) and torch.equal(fresh.exp_avg_sq, w.exp_avg_sq)


def test_unbound_eval_and_bad_input(capsys):
    w = AutoLambda(init=0.2)
    w.setup(2)
    for _ in range(2):
        torch.testing.assert_close(w(torch.tensor([1.0, 2.0], requires_grad=True)), torch.tensor([0.2, 0.4]))
    assert capsys.readouterr().err.count("not bound") == 1
    net, opt, train, meta, w = _bound(linear=True)
    before = w.lam.clone()
    with torch.no_grad():  # evaluation passes leave the weights alone
        w(stack_losses(TASKS, net(train.x), train.y))
    assert torch.equal(w.lam, before)
    with pytest.raises(ConfigError, match=r"primary task\(s\) \['z'\]"):
        AutoLambda(primary="a,z").bind(net, opt, TASKS, meta, 4)
    with pytest.raises(ConfigError, match="at least one"):
        AutoLambda(primary=" , ")
    with pytest.raises(ConfigError, match="meta_split"):
        AutoLambda(meta_split="test")
    for bad in ({"lr": -1.0}, {"betas": (1.0, 0.5)}, {"eps": 0.0}, {"meta_batch_size": -2}, {"init": "x"}):
        with pytest.raises(ConfigError):
            AutoLambda(**bad)
    with pytest.raises(RuntimeError, match="not bound"):
        AutoLambda().meta_gradient(torch.ones(2))


def _cfg(tmp_path, method="auto_lambda", **options):
    return RunConfig.from_dict(
        {
            "dataset": {"name": "_toy"},
            "model": {"name": "hps", "options": {"encoder": "mlp", "hidden": [16], "head_hidden": 8}},
            "method": {"name": method, "options": options},
            "train": {"epochs": 1, "batch_size": 32, "lr": 0.05, "seed": 0, "progress": False, "num_threads": 1},
            "output": {"dir": str(tmp_path / "run"), "tensorboard": False},
        }
    )


def test_callback_binds_the_run_and_the_weights_move(tmp_path):
    trainer = Trainer(_cfg(tmp_path, lr=1e-2, meta_split="val"), callbacks=[AutoLambdaMeta()])
    w = trainer.method.weighting
    assert isinstance(w, AutoLambda)
    assert w._bound is not None and w._bound.split is trainer.data.val and w._bound.model is trainer.model
    trainer.fit()
    steps = -(-len(trainer.data.train) // 32)
    assert int(w.meta_steps) == steps and not torch.allclose(w.lam, torch.full_like(w.lam, 0.1))
    with pytest.raises(ConfigError, match="use method 'auto_lambda'"):
        Trainer(_cfg(tmp_path / "x", method="ew"), callbacks=[AutoLambdaMeta()])
    assert [type(c) for c in AutoLambda().callbacks()] == [AutoLambdaMeta]
