"""The Gramian formed without J equals J Jᵀ, and the engine's J-free update equals the one computed from J."""

import pytest
import torch
from torch import nn

from mtlkit.aggregation import IMTLG, MAMG, MGDA, CAGrad, DualProj, GradDrop, GradVac, Mean, NashMTL, PCGrad, UPGrad
from mtlkit.engine.autodiff import backward, stack
from mtlkit.engine.gramian import EncoderGramian, encoder_gramian, linear_sites
from mtlkit.models.hps import ChannelsLast

# Tolerances. Both sides of every comparison below are float64 and mathematically equal; they differ only in the
# order of their sums (J Jᵀ against the factorised Gramian, wᵀJ against the engine's update, and the blocking of
# whichever kernels ran: MKL's and ATen's differ between CPUs). A sum of n products has error <= n·eps·Σ|terms|
# (eps = 2.2e-16); here n <= 540 and the entries are O(1) or smaller, so the two sides agree to ~1e-12 at worst, ~1e-14
# typically. Weights chosen from G move by at most cond(G) times G's relative change: cond(G) < 500 for the _Net
# problems below (255 and 461), i.e. ~1e-13, plus whatever the aggregator's solver leaves (exact active-set /
# closed-form solvers: nothing; Nash-MTL's Newton solver: its own tolerance, see _nash_update_bound).
F64 = {"atol": 1e-10, "rtol": 1e-10}  # ~1e-12 worst case: a 100x margin for kernel-dependent summation orders
F64_SMALL = {"atol": 1e-12, "rtol": 1e-12}  # sums of <= 72 terms of O(1) (z-gradients, 35-entry rows): ~1e-14


def _jacobian(z, dz, params):
    return torch.stack(
        [
            torch.cat(
                [
                    (g if g is not None else torch.zeros_like(p)).reshape(-1)
                    for g, p in zip(
                        torch.autograd.grad(z, params, d, retain_graph=True, allow_unused=True), params, strict=True
                    )
                ]
            )
            for d in dz
        ]
    )


class _Tied(nn.Module):
    """The same weight used twice: its gradient is a sum of two products, so it must not be treated as one site."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(9, 9)
        self.b = nn.Linear(9, 6, bias=False)

    def forward(self, x):
        return self.b(torch.tanh(self.a(torch.tanh(self.a(x)))))


class _Seq(nn.Module):
    """A linear layer on a 3-D input (B x L x in): autograd sees a view and an mm over B·L rows."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(9, 7)

    def forward(self, x):
        return torch.tanh(self.lin(x.reshape(x.shape[0], 2, 9))).reshape(x.shape[0], -1)


class _Checkpointed(nn.Module):
    """A block under activation checkpointing: its saved inputs are recomputed when the engine reads them."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(18, 8)
        self.b = nn.Linear(8, 6)

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint

        return self.b(checkpoint(lambda v: torch.tanh(self.a(v)), x, use_reentrant=False))


def _encoders():
    conv = nn.Sequential(
        nn.Unflatten(1, (1, 3, 6)),
        nn.Conv2d(1, 2, 3, padding=1),
        nn.BatchNorm2d(2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(36, 10),
        nn.ReLU(),
        nn.Linear(10, 5),
    )
    # The same with NHWC activations and conv weights, as in mtlkit's conv trunk.
    conv_last = nn.Sequential(
        nn.Unflatten(1, (1, 3, 6)),
        ChannelsLast(),
        nn.Conv2d(1, 2, 3, padding=1),
        nn.BatchNorm2d(2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(36, 10),
        nn.ReLU(),
        nn.Linear(10, 5),
    ).to(memory_format=torch.channels_last)
    return {
        # (encoder, input columns, number of linear sites expected with B = 4 rows)
        "mlp": (nn.Sequential(nn.Linear(18, 12), nn.Tanh(), nn.Linear(12, 8), nn.Tanh(), nn.Linear(8, 6)), 18, 3),
        "no_bias": (nn.Sequential(nn.Linear(18, 12, bias=False), nn.ReLU(), nn.Linear(12, 5, bias=False)), 18, 2),
        "conv_bn": (conv, 18, 2),  # the conv and BatchNorm parameters get explicit rows
        "conv_channels_last": (conv_last, 18, 2),
        "narrow": (nn.Sequential(nn.Linear(18, 3), nn.Tanh(), nn.Linear(3, 6)), 18, 1),  # B=4 >= in=3: explicit
        "tied": (_Tied(), 9, 1),  # only self.b is a site
        "seq": (_Seq(), 18, 1),
        "checkpointed": (_Checkpointed(), 18, 2),
    }


def _setup(name, seed, T):
    """A float64 encoder from _encoders(), its output z on 4 rows, its parameters, T random z-gradients, and J."""
    torch.manual_seed(seed)
    enc, cols, n_sites = _encoders()[name]
    enc = enc.double()
    z = enc(torch.randn(4, cols, dtype=torch.float64))
    params = list(enc.parameters())
    dz = torch.randn(T, *z.shape, dtype=torch.float64)
    dz[T // 2] = 0.0  # a task that sends nothing to z
    return z, params, dz, _jacobian(z, dz, params), n_sites


@pytest.mark.parametrize("name", list(_encoders()))
@pytest.mark.parametrize("mode", ["loop", "batched"])
def test_gramian_without_jacobian_equals_J_Jt(name, mode):
    z, params, dz, J, n_sites = _setup(name, 0, T=5)
    assert len(linear_sites(z, params)) == n_sites  # the identity is really exercised (or really skipped)
    G = encoder_gramian(z, dz, params, mode=mode, chunk_size=2)
    torch.testing.assert_close(G, J @ J.T, **F64)
    assert torch.equal(G, G.T)


@pytest.mark.parametrize("name", list(_encoders()))
def test_combine_equals_weighted_rows_of_J(name):
    z, params, dz, J, _ = _setup(name, 3, T=3)
    w = torch.tensor([0.7, -0.2, 1.5], dtype=torch.float64)
    got = EncoderGramian(z, dz, params).combine(w)
    assert [g.shape for g in got] == [p.shape for p in params]
    torch.testing.assert_close(torch.cat([g.reshape(-1) for g in got]), w @ J, **F64)


def test_only_shared_parameters_are_counted():
    # A frozen first layer (not in `shared`) contributes nothing to G, and is not a site.
    torch.manual_seed(1)
    enc = nn.Sequential(nn.Linear(10, 8), nn.Tanh(), nn.Linear(8, 6)).double()
    z = enc(torch.randn(3, 10, dtype=torch.float64))
    shared = list(enc[2].parameters())
    dz = torch.randn(2, *z.shape, dtype=torch.float64)
    assert [s.weight is enc[2].weight for s in linear_sites(z, shared)] == [True]
    J = _jacobian(z, dz, shared)
    torch.testing.assert_close(encoder_gramian(z, dz, shared), J @ J.T, **F64)


def _nash_update_bound(agg, w, M):
    """How far apart two Nash-MTL updates ``wᵀM`` may be when both come from ``solve_nash`` stopping by its own rule.

    The returned weights ``w`` solve ``(G/s) w = 1/w`` (``s`` = 1, or ``||G||_F`` with ``normalize=True``) up to the
    residual ``r`` at which ``solve_nash`` stopped: ``||r|| <= tol·(1 + ||1/w||)``. (That is its rule on the scale it
    solves on; a relative rule ``tol·||1/w||`` is tighter and holds on every scale, since a solve on ``G/c²`` mapped
    back by ``w = β/c`` multiplies the residual and ``||1/w||`` alike by ``c``.) ``r`` is the gradient of the strictly
    convex ``½wᵀ(G/s)w - Σ log w``, whose Hessian ``H = G/s + diag(1/w²) ⪰ diag(1/w²)`` (G is PSD), so ``w`` lies
    within ``||H⁻¹||·||r|| <= max(w)²·||r||`` of the exact root (to first order: ``w`` is within ~1e-6 of it
    relatively, ``H`` does not change on the way). The two runs see the same ``G`` up to float64 rounding but may stop
    one Newton step apart (one iterate just above the threshold on one CPU's kernels, just below on another's): their
    weights differ by up to twice that bound, their updates by that times ``||M||₂``.
    """
    w = w.to(torch.float64)
    crit = agg.tol * (1.0 + float((1.0 / w).norm()))
    return 2.0 * float(w.max()) ** 2 * crit * float(torch.linalg.matrix_norm(M.to(torch.float64), 2))


def _assert_updates_close(agg, got, expected, w, M):
    """``got`` and ``expected`` are the same aggregated update (flattened) from two engine paths."""
    if isinstance(agg, NashMTL):
        bound = _nash_update_bound(agg, w, M)
        assert float((got - expected).norm()) <= bound + F64["atol"], (float((got - expected).norm()), bound)
    else:
        torch.testing.assert_close(got, expected, **F64)


class _Net(nn.Module):
    def __init__(self, T=4):
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 12), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(12, 1) for _ in range(T))

    def losses(self, x):
        z = self.enc(x)
        return torch.stack([((h(z).squeeze(-1) - t) ** 2).mean() for t, h in enumerate(self.heads)]), z


@pytest.mark.parametrize("make", [MGDA, UPGrad, Mean, IMTLG, CAGrad, DualProj, NashMTL, PCGrad, GradVac, MAMG])
@pytest.mark.parametrize("mode", ["loop", "batched"])
def test_engine_without_J_writes_the_same_grads_as_with_J(make, mode):
    torch.manual_seed(2)
    net = _Net().double()
    x = torch.randn(6, 20, dtype=torch.float64)
    grads = {}
    for keep in (True, False):
        agg = make()  # fresh: stateful / seeded methods start from the same state
        net.zero_grad()
        losses, z = net.losses(x)
        info = backward(
            losses, net.enc.parameters(), agg, representation=z, keep_jacobian=keep, mode=mode, chunk_size=3
        )
        grads[keep] = [p.grad.clone() for p in net.parameters()]
        if keep:
            J = info.jacobian
        else:
            assert info.jacobian is None and info.update is None
            torch.testing.assert_close(info.gramian, J @ J.T, **F64)
            torch.testing.assert_close(info.weights @ J, torch.cat([p.grad.reshape(-1) for p in net.enc.parameters()]))
            w = info.weights
    n_enc = len(list(net.enc.parameters()))
    # the shared parameters hold the aggregated update (its weights may come from an iterative solver) ...
    _assert_updates_close(
        agg,
        torch.cat([g.reshape(-1) for g in grads[False][:n_enc]]),
        torch.cat([g.reshape(-1) for g in grads[True][:n_enc]]),
        w,
        J,
    )
    # ... each head its own task's gradient, whatever the weights
    for a, b in zip(grads[True][n_enc:], grads[False][n_enc:], strict=True):
        torch.testing.assert_close(a, b, **F64)


@pytest.mark.parametrize("make", [MGDA, UPGrad, Mean, IMTLG, CAGrad, DualProj, NashMTL, PCGrad, GradVac, MAMG])
def test_representation_level_without_J_writes_the_same_grads_as_with_J(make):
    torch.manual_seed(3)
    net = _Net().double()
    x = torch.randn(6, 20, dtype=torch.float64)
    grads, infos = {}, {}
    for keep in (True, False):
        agg = make()
        net.zero_grad()
        losses, z = net.losses(x)
        infos[keep] = backward(
            losses, net.enc.parameters(), agg, representation=z, level="representation", keep_jacobian=keep
        )
        grads[keep] = [p.grad.clone() for p in net.parameters()]
    J = infos[True].jacobian
    assert J.shape == (4, 6 * 12) and infos[False].jacobian is None
    torch.testing.assert_close(infos[False].gramian, J @ J.T, **F64_SMALL)
    w = infos[False].weights
    _assert_updates_close(agg, infos[False].update, infos[True].update, w, J)
    torch.testing.assert_close(infos[False].update, w @ J, **F64_SMALL)
    # the encoder's gradient is wᵀ J_θ (J_θ: the parameter-level Jacobian), the heads' do not depend on w
    net.zero_grad()
    losses, z = net.losses(x)
    J_theta = _jacobian(z, J.reshape(-1, *z.shape), list(net.enc.parameters()))
    n_enc = len(list(net.enc.parameters()))
    _assert_updates_close(
        agg,
        torch.cat([g.reshape(-1) for g in grads[False][:n_enc]]),
        torch.cat([g.reshape(-1) for g in grads[True][:n_enc]]),
        w,
        J_theta,
    )
    for a, b in zip(grads[True][n_enc:], grads[False][n_enc:], strict=True):
        torch.testing.assert_close(a, b, **F64)


@pytest.mark.parametrize("block_bytes", [8, 8 * 40, 1 << 20])  # one column per block, several, a single block
def test_gramian_of_rows_by_column_blocks(block_bytes):
    from mtlkit.engine.autodiff import _combine_rows, _gramian_of_rows

    torch.manual_seed(0)
    a = torch.randn(7, 5, dtype=torch.float64)
    rows = [a, torch.randn(5, 7, dtype=torch.float64).T, 2 * a]  # a transposed (non-contiguous) row; a multiple
    assert not rows[1].is_contiguous()
    J = torch.stack([r.reshape(-1) for r in rows])
    torch.testing.assert_close(_gramian_of_rows(rows, block_bytes), J @ J.T, **F64_SMALL)
    w = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    torch.testing.assert_close(_combine_rows(w, rows).reshape(-1), w @ J)


def test_nan_gradient_is_named_and_weights_checks_its_input():
    net = _Net(T=2)
    z = net.enc(torch.randn(6, 20))
    # finite loss, NaN gradient for task 1 only: d sqrt(0·s)/ds = 0·∞
    bad = stack([net.heads[0](z).pow(2).mean(), net.heads[1](z).pow(2).mean() + (net.heads[1](z).sum() * 0).sqrt()])
    with pytest.raises(FloatingPointError, match=r"tasks \[1\]"):
        backward(bad, net.enc.parameters(), MGDA(), representation=z)
    with pytest.raises(FloatingPointError, match=r"tasks \[1\]"):
        backward(bad, net.enc.parameters(), MGDA(), representation=z, level="representation")
    with pytest.raises(ValueError, match="T x T"):
        MGDA().weights(torch.ones(2, 3))
    with pytest.raises(ValueError, match="not only their Gramian"):
        GradDrop().weights(torch.eye(2))
