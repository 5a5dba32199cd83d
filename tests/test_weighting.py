"""Loss-space methods: hand-computed values, the properties each paper promises, checkpoints and bad inputs."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mtlkit.errors import ConfigError
from mtlkit.methods import available_methods, build_method, method_parts
from mtlkit.weighting import (
    DWA,
    EW,
    FAMO,
    GLS,
    IMTLL,
    MTMLANTDB,
    RLW,
    UW,
    DBMTLAggregator,
    GradNorm,
    LogLoss,
    StepContext,
    Weighting,
)

#: Every registered method with a weighting of its own (a Weighting class, or a composite with one).
OURS = [n for n in available_methods() if method_parts(n)[0] not in (None, EW)]


# ---------------------------------------------------------------------------------------------------------- helpers
class _Net(nn.Module):
    """Tiny HPS net: shared encoder (last shared layer enc[2]) + one linear head per task."""

    def __init__(self, T: int = 2, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.enc = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(16, 1) for _ in range(T))
        self.x = torch.randn(64, 4)
        # Task 0 is easy (a constant), task 1 is pure noise (its loss cannot go down much).
        self.y = torch.stack([torch.full((64,), 2.0), torch.randn(64)] + [torch.randn(64) for _ in range(T - 2)])

    def losses(self) -> torch.Tensor:
        z = self.enc(self.x)
        return torch.stack([(h(z).squeeze(-1) - self.y[t]).pow(2).mean() for t, h in enumerate(self.heads)])

    def ctx(self, step: int = 0) -> StepContext:
        return StepContext(
            step=step,
            shared_params=list(self.enc.parameters()),
            last_shared_layer=[self.enc[2].weight],
            task_layers=[[h.weight] for h in self.heads],
        )


def _train(net: _Net, weighting: Weighting, steps: int, check=None) -> None:
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    for s in range(steps):
        out = weighting(net.losses(), net.ctx(s))
        opt.zero_grad()
        out.sum().backward()
        opt.step()
        if check is not None:
            check(weighting)


def _sums_to(T):
    def check(w):
        assert w.weights().sum().item() == pytest.approx(T, abs=1e-5)
        assert bool((w.weights() > 0).all())

    return check


# ---------------------------------------------------------------------------------------------------------- UW
def test_uw_classification_hand_value():
    uw = UW(form="classification")
    uw.setup(1)
    with torch.no_grad():
        uw.log_var.fill_(math.log(4.0))  # σ² = 4, σ = 2
    out = uw(torch.tensor([3.0]))
    assert out.item() == pytest.approx(3.0 / 4.0 + math.log(2.0))  # (1/σ²)·CE + log σ (MTVIB Eq. 22)
    assert uw.weights().item() == pytest.approx(0.25)


def test_uw_regression_hand_value_and_mixed_forms():
    uw = UW(form=["regression", "classification"])
    uw.setup(2)
    with torch.no_grad():
        uw.log_var.fill_(math.log(4.0))
    out = uw(torch.tensor([3.0, 3.0]))
    assert out[0].item() == pytest.approx(3.0 / 8.0 + math.log(2.0))  # L/(2σ²) + log σ
    assert out[1].item() == pytest.approx(3.0 / 4.0 + math.log(2.0))


@pytest.mark.parametrize("form,optimum", [("regression", lambda L: L), ("classification", lambda L: 2 * L)])
def test_uw_optimal_sigma(form, optimum):
    L = 1.7
    uw = UW(form=form)
    uw.setup(1)
    for delta, sign in [(0.0, 0), (-0.3, -1), (0.3, 1)]:
        with torch.no_grad():
            uw.log_var.fill_(math.log(optimum(L)) + delta)
        uw.zero_grad()
        uw(torch.tensor([L])).sum().backward()
        g = uw.log_var.grad.item()
        if sign == 0:
            assert g == pytest.approx(0.0, abs=1e-6)  # σ² = L (regression) / 2L (classification)
        else:
            assert math.copysign(1, g) == sign  # a minimum: the gradient points away from it


def test_uw_needs_setup_and_checks():
    with pytest.raises(RuntimeError, match="setup"):
        UW()(torch.ones(2))
    with pytest.raises(ValueError, match="form"):
        UW(form="poisson")
    uw = UW(form=["regression"] * 3)
    with pytest.raises(ValueError, match="forms"):
        uw.setup(2)
    uw = UW()
    uw.setup(2)
    with pytest.raises(ValueError, match="T=2"):
        uw(torch.ones(3))
    with pytest.raises(ValueError, match="already set up"):
        uw.setup(3)
    uw.setup(2)  # idempotent


# ---------------------------------------------------------------------------------------------------------- DWA
def test_dwa_hand_example_and_sum():
    dwa = DWA(temperature=2.0)
    L = torch.tensor([2.0, 1.0, 0.5])
    assert torch.equal(dwa(L), L)  # epoch 0
    dwa.on_epoch_end(torch.tensor([1.0, 1.0, 1.0]))
    assert torch.equal(dwa(L), L)  # epoch 1: still weights 1
    dwa.on_epoch_end(torch.tensor([0.5, 1.0, 1.5]))
    r = [0.5, 1.0, 1.5]
    e = [math.exp(v / 2.0) for v in r]
    expected = torch.tensor([3 * v / sum(e) for v in e])
    torch.testing.assert_close(dwa.weights(), expected)
    torch.testing.assert_close(dwa(L), expected * L)
    assert dwa.weights().sum().item() == pytest.approx(3.0)
    dwa.on_epoch_end(torch.tensor([0.25, 1.0, 3.0]))  # only the last two epochs count
    e = [math.exp(v / 2.0) for v in [0.5, 1.0, 2.0]]
    torch.testing.assert_close(dwa.weights(), torch.tensor([3 * v / sum(e) for v in e]))


@pytest.mark.parametrize("temp", [0.0, -1.0, float("nan"), float("inf")])
def test_dwa_bad_temperature(temp):
    with pytest.raises(ValueError, match="temperature"):
        DWA(temperature=temp)


def test_dwa_bad_epoch_losses():
    dwa = DWA()
    dwa(torch.ones(2))
    with pytest.raises(ValueError):
        dwa.on_epoch_end(torch.ones(3))
    with pytest.raises(ValueError, match="positive"):
        dwa.on_epoch_end(torch.tensor([1.0, 0.0]))


# ---------------------------------------------------------------------------------------------------------- GradNorm
def test_gradnorm_sums_to_T_and_favours_the_slow_task():
    net = _Net()
    gn = GradNorm(alpha=1.5)
    _train(net, gn, 20, check=_sums_to(2))
    w = gn.weights()
    assert w[1] > 1.2 > 0.8 > w[0]  # task 1 (noise) trains slowly: more weight; the easy task less


def test_gradnorm_analytic_gradient_matches_autograd():
    net = _Net(T=3)
    gn = GradNorm(alpha=1.5, lr=0.01, optimizer="sgd")
    gn.setup(3)
    with torch.no_grad():
        gn.task_weights.copy_(torch.tensor([0.5, 1.0, 1.5]))
        gn.initial_losses.copy_(torch.tensor([2.0, 1.0, 1.0]))
        gn.has_initial.fill_(True)
    losses = net.losses()
    W = net.enc[2].weight
    # Reference: L_grad = Σ |‖∇_W w_t L_t‖ − Ḡ r_t^α| with the target detached, differentiated by autograd.
    w = gn.task_weights.clone().requires_grad_(True)
    G = torch.stack(
        [torch.autograd.grad(w[t] * losses[t], W, create_graph=True, retain_graph=True)[0].norm() for t in range(3)]
    )
    Lt = losses.detach() / gn.initial_losses
    r = Lt / Lt.mean()
    target = (G.mean() * r**1.5).detach()
    (gw,) = torch.autograd.grad((G - target).abs().sum(), w)
    expected = gn.task_weights - 0.01 * gw.detach()
    expected = 3 * expected / expected.sum()
    out = gn(losses, net.ctx())
    torch.testing.assert_close(out, torch.tensor([0.5, 1.0, 1.5]) * losses)  # this step uses w(t)
    torch.testing.assert_close(gn.weights(), expected)


def test_gradnorm_layer_fallback_and_errors():
    net = _Net()
    gn = GradNorm()
    gn(net.losses(), StepContext(shared_params=list(net.enc.parameters())))  # falls back to enc[2].weight
    assert gn.weights().sum().item() == pytest.approx(2.0)
    with pytest.raises(ValueError, match="last_shared_layer"):
        GradNorm()(net.losses(), StepContext())
    with pytest.raises(ValueError, match="alpha"):
        GradNorm(alpha=-1.0)
    with pytest.raises(ValueError, match="optimizer"):
        GradNorm(optimizer="rmsprop")
    with pytest.raises(ValueError, match="lr"):
        GradNorm(lr=0.0)


def test_gradnorm_no_update_in_eval_or_no_grad():
    net = _Net()
    gn = GradNorm()
    gn(net.losses(), net.ctx())
    before = gn.state_dict()
    gn.eval()
    gn(net.losses(), net.ctx())
    gn.train()
    with torch.no_grad():
        gn(net.losses(), net.ctx())
    for k, v in gn.state_dict().items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, before[k]), k


# ---------------------------------------------------------------------------------------------------------- TDB
@pytest.mark.parametrize("grad_at", ["task_first_layer", "last_shared_layer"])
def test_tdb_both_gradient_locations_work(grad_at):
    net = _Net()
    tdb = MTMLANTDB(counts=[50, 50], grad_at=grad_at, lr=0.01)
    _train(net, tdb, 15, check=_sums_to(2))
    assert tdb.weights()[1] > tdb.weights()[0]  # the slow task gains weight either way


def test_tdb_uses_the_chosen_layer():
    net = _Net()
    losses = net.losses()
    for grad_at, params in [
        ("task_first_layer", [[h.weight] for h in net.heads]),
        ("last_shared_layer", [[net.enc[2].weight]] * 2),
    ]:
        tdb = MTMLANTDB(counts=[1, 1], grad_at=grad_at)
        tdb(losses, net.ctx())
        ref = torch.stack([torch.autograd.grad(losses[t], params[t], retain_graph=True)[0].norm() for t in range(2)])
        torch.testing.assert_close(tdb.grad_norms, ref)


def test_tdb_penalty_favours_the_rare_task():
    # Equal training rates (first step, r = 1); task 1 (rare) has the smaller gradient norm, so GradNorm raises its
    # weight; the N/n_j penalty (N/n = [1.11, 10]) makes it rise faster than under plain GradNorm.
    W = nn.Parameter(torch.eye(2))
    x = torch.tensor([1.0, 1.0])

    def losses():
        v = W @ x
        return torch.stack([3 * v[0] ** 2, v[1] ** 2])

    ctx = StepContext(last_shared_layer=[W])
    gn = GradNorm(alpha=1.0, lr=0.01, optimizer="sgd")
    tdb = MTMLANTDB(counts=[90, 10], alpha=1.0, lr=0.01, grad_at="last_shared_layer")
    gn(losses(), ctx)
    tdb(losses(), ctx)
    assert tdb.weights().sum().item() == pytest.approx(2.0)
    assert tdb.weights()[1] > gn.weights()[1] > 1.0
    torch.testing.assert_close(tdb.penalty, torch.tensor([100 / 90, 10.0]))
    # Equal counts: the penalty is a common factor N/n = T, i.e. GradNorm with T times the learning rate.
    eq = MTMLANTDB(counts=[5, 5], alpha=1.0, lr=0.005, grad_at="last_shared_layer")
    eq(losses(), ctx)
    torch.testing.assert_close(eq.weights(), gn.weights())


def test_tdb_errors():
    net = _Net()
    with pytest.raises(ValueError, match="counts"):
        MTMLANTDB()(net.losses(), net.ctx())
    with pytest.raises(ValueError, match="task_layers"):
        MTMLANTDB(counts=[1, 2])(net.losses(), StepContext(last_shared_layer=[net.enc[2].weight]))
    with pytest.raises(ValueError, match="counts"):
        MTMLANTDB(counts=[1, 2, 3])(net.losses(), net.ctx())
    with pytest.raises(ValueError, match="counts"):
        MTMLANTDB(counts=[1, 0])
    with pytest.raises(ValueError, match="grad_at"):
        MTMLANTDB(counts=[1, 1], grad_at="middle")
    tdb = MTMLANTDB()
    assert tdb.needs_task_counts and not GradNorm().needs_task_counts
    tdb.set_counts([3, 1], num_samples=8)
    assert not tdb.needs_task_counts
    with pytest.raises(TypeError):
        GradNorm().set_counts([1, 2])
    tdb(net.losses(), net.ctx())
    torch.testing.assert_close(tdb.penalty, torch.tensor([8 / 3, 8.0]))


# ---------------------------------------------------------------------------------------------------------- RLW
def test_rlw_positive_sums_and_reproducible():
    a, b = RLW(seed=3), RLW(seed=3)
    L = torch.ones(4, requires_grad=True)
    wa = [a(L).detach() for _ in range(5)]
    wb = [b(L).detach() for _ in range(5)]
    for x, y in zip(wa, wb, strict=True):
        assert torch.equal(x, y)
        assert bool((x > 0).all()) and x.sum().item() == pytest.approx(1.0)
    assert not torch.equal(wa[0], wa[1])  # a fresh draw every step
    t = RLW(seed=3, total="tasks")
    w = t(L).detach()
    assert w.sum().item() == pytest.approx(4.0)
    torch.testing.assert_close(w, 4 * wa[0])
    torch.manual_seed(7)
    c = RLW()(L).detach()
    torch.manual_seed(7)
    assert torch.equal(RLW()(L).detach(), c)  # seed=None follows torch.manual_seed


def test_rlw_eval_draws_nothing():
    r = RLW(seed=0)
    r(torch.ones(3))
    state = r.rng_state.clone()
    r.eval()
    torch.testing.assert_close(r(torch.ones(3)), torch.full((3,), 1 / 3))
    assert torch.equal(r.rng_state, state)


def test_rlw_bad_options():
    with pytest.raises(ValueError, match="total"):
        RLW(total="two")
    with pytest.raises(ValueError, match="seed"):
        RLW(seed=1.5)


# ---------------------------------------------------------------------------------------------------------- GLS
def test_gls_gradient_is_that_of_the_geometric_mean():
    torch.manual_seed(0)
    theta = torch.randn(5, dtype=torch.float64, requires_grad=True)
    A = torch.randn(3, 5, dtype=torch.float64)

    def losses():
        return (A @ theta).pow(2) + 0.1  # three positive losses

    out = GLS()(losses())
    (g,) = torch.autograd.grad(out.sum(), theta)
    L = losses()
    geo = L.prod() ** (1 / 3)
    (ref,) = torch.autograd.grad(geo, theta)
    torch.testing.assert_close(g, ref)
    assert out.sum().item() == pytest.approx(geo.item())


def test_gls_rejects_non_positive():
    with pytest.raises(ValueError, match="positive"):
        GLS()(torch.tensor([1.0, 0.0]))


# ---------------------------------------------------------------------------------------------------------- IMTL-L
def test_imtl_l_hand_value_and_optimum():
    m = IMTLL()
    m.setup(2)
    with torch.no_grad():
        m.log_scale.copy_(torch.tensor([math.log(2.0), -1.0]))
    out = m(torch.tensor([3.0, 4.0]))
    torch.testing.assert_close(out, torch.tensor([2 * 3.0 - math.log(2.0), math.exp(-1) * 4.0 + 1.0]))
    # At s = -log L the gradient in s vanishes: e^s L = 1 for every task.
    with torch.no_grad():
        m.log_scale.copy_(-torch.log(torch.tensor([3.0, 4.0])))
    m.zero_grad()
    m(torch.tensor([3.0, 4.0])).sum().backward()
    torch.testing.assert_close(m.log_scale.grad, torch.zeros(2))
    with pytest.raises(RuntimeError, match="setup"):
        IMTLL()(torch.ones(2))


# ---------------------------------------------------------------------------------------------------------- FAMO
def test_famo_moves_toward_the_task_that_improved_less():
    famo = FAMO()
    for _ in range(3):
        famo(torch.tensor([1.0, 1.0, 1.0], requires_grad=True))
        famo.after_step(torch.tensor([0.5, 0.9, 0.7]))  # task 1 improved least, task 0 most
    w = famo.weights()
    assert w[1] > w[2] > w[0]
    assert w.sum().item() == pytest.approx(1.0)


def test_famo_matches_the_official_update():
    """Replays the official Cranial-XIX/FAMO update (torch.optim.Adam on the logits) on random losses."""
    torch.manual_seed(0)
    T, lr, gamma = 3, 0.025, 1e-3
    w = torch.zeros(T, requires_grad=True)
    opt = torch.optim.Adam([w], lr=lr, weight_decay=gamma)
    famo = FAMO(lr=lr, weight_decay=gamma)
    theta = torch.randn(T, requires_grad=True)
    for _ in range(6):
        L = theta.pow(2) + torch.rand(T)
        # official get_weighted_loss
        z = F.softmax(w, -1)
        D = L - 0 + 1e-8
        c = (z / D).sum().detach()
        ref_loss = (D.log() * z / c).sum()
        ours = famo(L)
        torch.testing.assert_close(ours.sum(), ref_loss)
        (g_ref,) = torch.autograd.grad(ref_loss, theta, retain_graph=True)
        (g_ours,) = torch.autograd.grad(ours.sum(), theta)
        torch.testing.assert_close(g_ours, g_ref)
        new = L.detach() * torch.rand(T)
        # official update
        delta = (L.detach() + 1e-8).log() - (new + 1e-8).log()
        d = torch.autograd.grad(F.softmax(w, -1), w, grad_outputs=delta)[0]
        opt.zero_grad()
        w.grad = d
        opt.step()
        famo.after_step(new)
        torch.testing.assert_close(famo.logits, w.detach())


def test_famo_errors():
    with pytest.raises(RuntimeError, match="before"):
        f = FAMO()
        f.setup(2)
        f.after_step(torch.ones(2))
    with pytest.raises(ValueError, match="lr"):
        FAMO(lr=-1)
    with pytest.raises(ValueError, match="min_losses"):
        FAMO(min_losses=[2.0, 2.0])(torch.ones(2))


# ---------------------------------------------------------------------------------------------------------- DB-MTL
def test_dbmtl_scaled_gradients_have_equal_norms():
    torch.manual_seed(0)
    agg = DBMTLAggregator(beta=0.9)
    for _ in range(4):
        # Orthogonal blocks: the update's block t is task t's scaled EMA gradient.
        J = torch.zeros(3, 6)
        J[0, :2] = torch.randn(2) * 10
        J[1, 2:4] = torch.randn(2)
        J[2, 4:] = torch.randn(2) * 0.01
        u = agg(J)
        norms = torch.stack([u[:2].norm(), u[2:4].norm(), u[4:].norm()])
        torch.testing.assert_close(norms, norms.max().expand(3), rtol=1e-4, atol=0)  # eps = 1e-8 in α
    torch.testing.assert_close(agg.last_scales * agg._buffer.norm(dim=1), norms)


def test_dbmtl_ema_and_log_losses():
    agg = DBMTLAggregator(beta=0.5)
    J1, J2 = torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([[4.0, 0.0], [0.0, 1.0]])
    agg(J1)
    torch.testing.assert_close(agg._buffer, 0.5 * J1)  # zero-initialised EMA, as LibMTL
    agg(J2)
    torch.testing.assert_close(agg._buffer, 0.5 * (0.5 * J1) + 0.5 * J2)
    with pytest.raises(ValueError, match="shape"):
        agg(torch.ones(2, 3))
    torch.testing.assert_close(LogLoss()(torch.tensor([1.0, math.e])), torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError):
        DBMTLAggregator(beta=1.0)


# ---------------------------------------------------------------------------------------------------------- state
def _step(w: Weighting, net: _Net, epoch_end: bool = False) -> torch.Tensor:
    out = w(net.losses(), net.ctx())
    if w.needs_loss_after_step:
        with torch.no_grad():
            w.after_step(net.losses() * 0.9)
    if epoch_end:
        w.on_epoch_end(net.losses().detach() * torch.linspace(0.5, 1.5, len(net.heads)) + 0.1)
    return out.detach()


@pytest.mark.parametrize(
    "make",
    [
        lambda: UW(),
        lambda: IMTLL(),
        lambda: DWA(),
        lambda: GradNorm(),
        lambda: GradNorm(optimizer="sgd"),
        lambda: MTMLANTDB(counts=[3, 1, 2]),
        lambda: RLW(seed=1),
        lambda: GLS(),
        lambda: FAMO(),
        lambda: LogLoss(),
        lambda: EW(),
    ],
    ids=lambda f: "",
)
def test_state_dict_round_trip(make):
    net = _Net(T=3)
    a = make()
    a.setup(3)
    if isinstance(a, (UW, IMTLL)):
        with torch.no_grad():
            next(a.parameters()).copy_(torch.tensor([0.1, -0.2, 0.3]))
    for _ in range(3):
        _step(a, net, epoch_end=True)
    state = a.state_dict()
    b = make()
    b.load_state_dict(state)  # sets b up with the checkpoint's T
    assert b.num_tasks == 3
    na = _step(a, net, epoch_end=True)
    nb = _step(b, net, epoch_end=True)
    torch.testing.assert_close(na, nb, rtol=0, atol=0)
    torch.testing.assert_close(_step(a, net), _step(b, net), rtol=0, atol=0)
    if a.weights() is not None:
        torch.testing.assert_close(a.weights(), b.weights(), rtol=0, atol=0)


def test_state_dict_rejects_other_T():
    a = DWA()
    a.setup(3)
    b = DWA()
    b.setup(2)
    with pytest.raises((ValueError, RuntimeError)):
        b.load_state_dict(a.state_dict())


def test_dbmtl_method_state_round_trip():
    m1, m2 = build_method("dbmtl"), build_method("dbmtl")
    J = torch.randn(2, 5)
    m1.aggregator(J)
    m2.load_state_dict(m1.state_dict())
    J2 = torch.randn(2, 5)
    torch.testing.assert_close(m1.aggregator(J2), m2.aggregator(J2), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------- registry
@pytest.mark.parametrize("name", OURS)
def test_every_method_builds_and_runs(name):
    assert {"uw", "dwa", "gradnorm", "mtmlan_tdb", "rlw", "gls", "imtl_l", "famo", "dbmtl"} <= set(OURS)
    m = build_method(name)
    assert m.name == name
    if name == "mtmlan_tdb":
        m = build_method(name, counts=[10, 30])
    net = _Net()
    m.weighting.setup(2)
    out = m.weighting(net.losses(), net.ctx())
    assert out.shape == (2,)
    if m.weighting.needs_loss_after_step:
        m.weighting.after_step(net.losses().detach())


def test_options_are_checked_by_the_registry():
    with pytest.raises(ConfigError, match="temperature"):
        build_method("dwa", temp=2.0)
    assert build_method("dwa", temperature=3.0).weighting.temperature == 3.0
    assert build_method("uw", form="classification").weighting.form == "classification"
    with pytest.raises(ValueError, match="temperature"):
        build_method("dwa", temperature=-2.0)


# ---------------------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "make",
    [
        lambda: DWA(),
        lambda: GLS(),
        lambda: RLW(seed=0),
        lambda: FAMO(),
        lambda: LogLoss(),
        lambda: GradNorm(),
        lambda: EW(),
    ],
    ids=lambda f: "",
)
def test_bad_loss_shapes(make):
    w = make()
    for bad in [torch.tensor(1.0), torch.ones(2, 2), torch.ones(0), [1.0, 2.0]]:
        with pytest.raises(ValueError, match="1-D"):
            w(bad)
    w.setup(2)
    with pytest.raises(ValueError, match="T=2"):
        w(torch.ones(3))


def test_setup_rejects_bad_T():
    for bad in [0, -1, 2.0, True]:
        with pytest.raises(ValueError, match="num_tasks"):
            DWA().setup(bad)
