"""DSelect-k: the smooth-step, the single-expert selectors (and the folding of unused codes when n is not a power of
two), the k-sparse gate, the entropy regulariser through the auxiliary-loss hook, and bad options. Training with a
parameter-level and a representation-level method is in tests/test_architectures.py."""

from __future__ import annotations

import itertools
import math
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from mtlkit.errors import ConfigError
from mtlkit.models import available_models, build_model
from mtlkit.models.dselect_k import DSelectK, DSelectKGate, selector, selector_entropy, smooth_step
from mtlkit.tasks import Task, stack_losses

F64 = torch.float64
EPS = torch.finfo(F64).eps


def _data(d: int = 7, tasks: int = 2) -> Any:
    return SimpleNamespace(input_shape=(d,), tasks=[Task(f"t{i}", "binary") for i in range(tasks)])


def _code(bits: tuple[int, ...]) -> int:
    return int("".join(map(str, bits)), 2)  # bit 1 the most significant


# --- smooth-step ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gamma", [0.3, 1.0, 2.5])
def test_smooth_step_is_exactly_zero_and_one_outside_the_band_and_cubic_inside(gamma):
    b = gamma / 2
    out = torch.tensor([-100.0, -3 * b, -b, b, 3 * b, 100.0], dtype=F64)
    assert smooth_step(out, gamma).tolist() == [0.0, 0.0, 0.0, 1.0, 1.0, 1.0]  # exact, not approximately
    t = torch.linspace(-b, b, 101, dtype=F64)[1:-1]
    ref = -2 / gamma**3 * t**3 + 3 / (2 * gamma) * t + 0.5
    torch.testing.assert_close(smooth_step(t, gamma), ref, rtol=0, atol=4 * EPS)
    # symmetric: S(-t) = 1 - S(t)
    torch.testing.assert_close(smooth_step(-t, gamma), 1 - smooth_step(t, gamma), rtol=0, atol=4 * EPS)


@pytest.mark.parametrize("gamma", [0.3, 1.0, 2.5])
def test_smooth_step_is_continuous_and_c1_at_the_band_edges_and_monotone(gamma):
    b = gamma / 2
    for h in (1e-2, 1e-3, 1e-4):
        # S(b - h) = 1 - 3h²/γ² + O(h³), and S'(b - h) = 6h/γ² + O(h²): both vanish at the edge, from inside as from
        # outside (where S is constant); by symmetry the same at -b
        for edge, inside, level in ((b, b - h, 1.0), (-b, -b + h, 0.0)):
            s_in = float(smooth_step(torch.tensor(inside, dtype=F64), gamma))
            assert abs(s_in - level) <= 3.01 * h**2 / gamma**2
            slope_in = abs(s_in - float(smooth_step(torch.tensor(edge, dtype=F64), gamma))) / h
            slope_out = abs(float(smooth_step(torch.tensor(edge + math.copysign(h, edge), dtype=F64), gamma)) - level)
            assert slope_in <= 3.01 * h / gamma**2 and slope_out == 0.0
    # autograd's derivative matches central differences inside, is 0 outside, and tends to 0 at the edges
    t = torch.linspace(-1.5 * gamma, 1.5 * gamma, 601, dtype=F64, requires_grad=True)
    (grad,) = torch.autograd.grad(smooth_step(t, gamma).sum(), t)
    h = 1e-6
    fd = (smooth_step(t.detach() + h, gamma) - smooth_step(t.detach() - h, gamma)) / (2 * h)
    away = (t.detach().abs() - b).abs() > 2 * h  # central differences straddling an edge are one-sided
    torch.testing.assert_close(grad[away], fd[away], rtol=0, atol=1e-8)
    assert bool((grad[t.detach().abs() >= b] == 0).all())
    assert float(grad.max()) == pytest.approx(1.5 / gamma, rel=1e-12)  # S'(0) = 3/(2γ)
    values = smooth_step(t.detach(), gamma)
    assert bool((values.diff() >= 0).all())
    inside = t.detach().abs() < b
    assert bool((values[inside].diff() > 0).all())  # strictly increasing in the band


def test_smooth_step_refuses_a_nonpositive_gamma():
    with pytest.raises(ConfigError, match="gamma"):
        smooth_step(torch.zeros(2), 0.0)


# --- single-expert selectors ----------------------------------------------------------------------------------------


def _reference_positions(s: torch.Tensor) -> torch.Tensor:
    """r over the 2^m positions, written out per position and bit (MSB first)."""
    m = s.shape[-1]
    cols = []
    for i in range(2**m):
        p = torch.ones(s.shape[:-1], dtype=s.dtype)
        for j in range(m):
            bit = (i >> (m - 1 - j)) & 1
            p = p * (s[..., j] if bit else 1 - s[..., j])
        cols.append(p)
    return torch.stack(cols, -1)


@pytest.mark.parametrize("n", [2, 3, 4, 5, 6, 7, 8, 9, 16])
def test_selector_is_the_product_distribution_with_unused_positions_folded(n):
    torch.manual_seed(n)
    m = math.ceil(math.log2(n))
    s = torch.rand(10, 3, m, dtype=F64)
    r = selector(s, n)
    assert r.shape == (10, 3, n) and bool((r >= 0).all())
    torch.testing.assert_close(r.sum(-1), torch.ones(10, 3, dtype=F64), rtol=0, atol=8 * EPS)
    positions = _reference_positions(s)
    ref = positions[..., :n].clone()
    for i in range(n, 2**m):  # the documented choice: position i >= n is expert i - n
        ref[..., i - n] += positions[..., i]
    torch.testing.assert_close(r, ref, rtol=0, atol=4 * EPS)
    # at z = 0 (s = 1/2) experts 0..2^m-n-1 own two positions each
    centre = selector(torch.full((m,), 0.5, dtype=F64), n)
    expected = torch.tensor([2.0 if e < 2**m - n else 1.0 for e in range(n)], dtype=F64) / 2**m
    torch.testing.assert_close(centre, expected, rtol=0, atol=4 * EPS)


@pytest.mark.parametrize("n", [2, 3, 5, 8])
def test_selector_is_one_hot_on_saturated_codes_and_every_expert_is_reachable(n):
    gamma = 0.7
    m = math.ceil(math.log2(n))
    g = torch.Generator().manual_seed(n)
    hits = torch.zeros(n, dtype=torch.long)
    for bits in itertools.product((0, 1), repeat=m):
        sign = torch.tensor(bits, dtype=F64) * 2 - 1
        z = sign * (gamma / 2 + 3 * torch.rand(m, generator=g, dtype=F64))  # |z_j| >= γ/2, random magnitudes
        r = selector(smooth_step(z, gamma), n)
        expert = _code(bits) if _code(bits) < n else _code(bits) - n
        assert r.tolist() == torch.nn.functional.one_hot(torch.tensor(expert), n).to(F64).tolist()  # exact
        hits[expert] += 1
    assert bool((hits >= 1).all()) and int(hits.sum()) == 2**m


def test_selector_refuses_codes_of_the_wrong_width():
    with pytest.raises(ValueError, match="3 bits"):
        selector(torch.rand(4, 2), 5)


def test_selector_entropy_is_the_shannon_entropy_with_finite_gradients_at_zero():
    r = torch.tensor([[0.2, 0.3, 0.5], [1.0, 0.0, 0.0], [0.5, 0.5, 0.0]], dtype=F64, requires_grad=True)
    ref = torch.tensor(
        [-(0.2 * math.log(0.2) + 0.3 * math.log(0.3) + 0.5 * math.log(0.5)), 0.0, math.log(2)], dtype=F64
    )
    torch.testing.assert_close(selector_entropy(r), ref, rtol=0, atol=4 * EPS)
    (grad,) = torch.autograd.grad(selector_entropy(r).sum(), r)
    assert bool(torch.isfinite(grad).all())


# --- the gate -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "k"), [(4, 1), (5, 2), (8, 3), (3, 5)])
@pytest.mark.parametrize("static", [True, False])
def test_gate_weights_are_the_softmax_mixture_of_the_selectors_and_sum_to_one(n, k, static):
    torch.manual_seed(0)
    gate = DSelectKGate(n, k, gamma=2.0, in_features=None if static else 6).double()
    with torch.no_grad():  # codes spread over the band and beyond, not only the tiny initial ones
        for p in gate.parameters():
            p.normal_(0, 1.0)
    x = torch.randn(9, 6, dtype=F64)
    q, r = gate(x)
    assert q.shape == (9, n) and r.shape == (9, k, n) and bool((q >= 0).all())
    torch.testing.assert_close(q.sum(1), torch.ones(9, dtype=F64), rtol=0, atol=16 * EPS)
    z, alpha = gate.codes_and_logits(x)
    for b in range(9):
        ref = sum(torch.softmax(alpha[b], 0)[i] * selector(smooth_step(z[b, i], 2.0), n) for i in range(k))
        torch.testing.assert_close(q[b], ref, rtol=0, atol=8 * EPS)
    if static:
        assert bool((q == q[0]).all())  # the task-only gate ignores x
    else:
        assert not torch.allclose(q[0], q[1])


@pytest.mark.parametrize("static", [True, False])
def test_saturated_gate_has_at_most_k_nonzeros_and_unselected_experts_get_no_gradient(static):
    torch.manual_seed(1)
    n, k, gamma = 7, 2, 1.0
    data = SimpleNamespace(input_shape=(5,), tasks=[Task("a", "binary")])
    gate = "static" if static else "per_example"
    model: Any = build_model("dselect_k", data, num_experts=n, k=k, gamma=gamma, gate=gate, expert_hidden=[4])
    model = model.double()
    g = model.gates["a"]
    x = torch.sign(torch.randn(40, 5, dtype=F64)) * (0.5 + torch.rand(40, 5, dtype=F64))  # |x_i| >= 1/2
    with torch.no_grad():  # every code bit at least γ/2 away from 0, for every input
        if static:
            g.z.copy_(torch.sign(torch.randn(k, g.num_bits)) * (gamma / 2 + torch.rand(k, g.num_bits)))
        else:  # z = ±2 x_i: saturated, with codes that differ from one example to the next
            codes = g.codes[1]
            codes.weight.zero_()
            codes.bias.zero_()
            for row in range(k * g.num_bits):
                codes.weight[row, row % 5] = 2.0 if row % 2 else -2.0
    q, r = g(x)
    assert bool(((r == 0) | (r == 1)).all())  # saturated selectors are one-hot
    assert bool(((q > 0).sum(1) <= k).all())
    torch.testing.assert_close(q.sum(1), torch.ones(40, dtype=F64), rtol=0, atol=8 * EPS)
    if not static:
        assert len({tuple(row) for row in (q > 0).tolist()}) > 1  # the selection depends on the example
    # sparsity is real: the task's loss sends exactly no gradient to the output of an expert of weight 0
    z = model.encode(x).detach().requires_grad_(True)
    loss = stack_losses(data.tasks, model.decode(z), {"a": (x[:, 1] > 0).long()})[0]
    (dz,) = torch.autograd.grad(loss, z)
    assert bool((dz[q == 0] == 0).all()) and bool((dz[q > 0].abs().sum(-1) > 0).all())


# --- the model and its entropy regulariser --------------------------------------------------------------------------


def test_model_mixes_the_experts_with_the_gate_weights_and_decode_needs_encode():
    torch.manual_seed(0)
    model: Any = build_model("dselect_k", _data(tasks=3), num_experts=6, k=2, expert_hidden=[5], tower_hidden=3)
    model = model.double()
    assert isinstance(model, DSelectK) and "dselect_k" in available_models()
    x = torch.randn(8, 7, dtype=F64)
    w = model.gate_weights(x)
    out = model(x)
    for name, tw in model.towers.items():
        mix = sum(w[name][:, i : i + 1] * e(x) for i, e in enumerate(model.encoder))
        torch.testing.assert_close(out[name], tw(mix), rtol=0, atol=1e-12)
    assert {id(p) for p in model.shared_parameters()} == {id(p) for p in model.encoder.parameters()}
    z = model.encode(x)
    assert z.shape == (8, 6, 5)
    with pytest.raises(RuntimeError, match="call encode first"):
        model.decode(z[:3])


def test_entropy_regulariser_is_lambda_times_the_batch_mean_entropy_and_reaches_the_codes_only():
    torch.manual_seed(0)
    lam = 0.3
    model: Any = build_model("dselect_k", _data(), num_experts=5, k=3, entropy_weight=lam, expert_hidden=[4])
    model = model.double()
    x = torch.randn(12, 7, dtype=F64)
    model(x)
    aux = model.auxiliary_loss()
    assert aux is not None and model.auxiliary_loss() is None  # consumed
    ref = sum(-(r * r.log()).sum(-1).sum(-1).mean() for r in model.selectors(x).values())
    torch.testing.assert_close(aux, lam * ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(model.entropy(x), ref, rtol=0, atol=1e-12)
    # the selectors' codes only: not the logits α (the entropy is the selectors'), nor experts or towers
    code_ids = {id(p) for g in model.gates.values() for p in g.codes.parameters()}
    params = list(model.parameters())
    grads = torch.autograd.grad(aux, params, allow_unused=True)
    for p, gr in zip(params, grads, strict=True):
        reached = gr is not None and bool((gr != 0).any())
        assert reached == (id(p) in code_ids), tuple(p.shape)
    model.eval()
    model(x)
    assert model.auxiliary_loss() is None  # evaluation leaves no loss
    model.train()
    with torch.no_grad():
        model(x)
    assert model.auxiliary_loss() is None
    off: Any = build_model("dselect_k", _data(), num_experts=5, entropy_weight=0.0, expert_hidden=[4])
    off(torch.randn(4, 7))
    assert off.auxiliary_loss() is None


def test_minimising_the_entropy_drives_the_selectors_to_binary_codes():
    torch.manual_seed(0)
    gate = DSelectKGate(6, k=2, gamma=1.0).double()  # static: starts at the centre of the cube
    opt = torch.optim.SGD(gate.parameters(), lr=0.5)
    x = torch.zeros(1, 1, dtype=F64)
    start = float(selector_entropy(gate(x)[1]).sum().detach())
    assert start > 2 * math.log(6) * 0.9  # near-uniform selectors
    for _ in range(30):
        opt.zero_grad()
        selector_entropy(gate(x)[1]).sum().backward()
        opt.step()
    _, r = gate(x)
    assert float(selector_entropy(r).sum().detach()) == 0.0
    assert bool(((r == 0) | (r == 1)).all()) and bool((gate.z.detach().abs() >= 0.5).all())


def test_auxiliary_loss_is_finite_with_saturated_selectors_and_its_gradient_too():
    model: Any = build_model("dselect_k", _data(), num_experts=4, k=2, gate="static", entropy_weight=1.0)
    with torch.no_grad():
        for g in model.gates.values():
            g.z.copy_(torch.tensor([[2.0, -0.1], [-3.0, 4.0]]))  # one bit of the first selector in the band
    model(torch.randn(3, 7))
    aux = model.auxiliary_loss()
    grads = torch.autograd.grad(aux, [g.z for g in model.gates.values()])
    assert bool(torch.isfinite(aux)) and all(bool(torch.isfinite(gr).all()) for gr in grads)
    assert all(float(gr[1].abs().sum()) == 0.0 for gr in grads)  # the saturated selector: zero entropy, no gradient


# --- options --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"k": 0}, "dselect_k: k "),
        ({"num_experts": 1}, "num_experts must be >= 2"),
        ({"gamma": 0.0}, "gamma must be > 0"),
        ({"gamma": -1.0}, "gamma must be > 0"),
        ({"gate": "dense"}, "unknown gate 'dense'"),
        ({"entropy_weight": -1e-3}, "entropy_weight must be >= 0"),
        ({"num_nonzeros": 2}, "no option"),
    ],
)
def test_bad_options_are_config_errors_naming_the_option(options, message):
    with pytest.raises(ConfigError, match=message):
        build_model("dselect_k", _data(), **options)
