"""Properties of the gradient-space methods (aggregators): each test checks what the method promises."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from mtlkit._registry import METHODS
from mtlkit.aggregation import (
    IMTLG,
    MAMG,
    MGDA,
    AlignedMTL,
    CAGrad,
    DualProj,
    GradDrop,
    GradVac,
    NashMTL,
    PCGrad,
    UPGrad,
)
from mtlkit.aggregation._base import Aggregator
from mtlkit.aggregation._solvers import min_norm_simplex_exact
from mtlkit.engine.autodiff import backward
from mtlkit.errors import ConfigError
from mtlkit.methods import available_methods, build_method

#: Every method registered as an Aggregator class (one file per method, mtlkit/aggregation/).
ZOO = [e.name for e in METHODS if isinstance(e.obj, type) and issubclass(e.obj, Aggregator)]


def _rand(T: int, P: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(T, P, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _conflicting_pair(seed: int) -> torch.Tensor:
    """Two gradients with a negative inner product and different norms."""
    g = torch.Generator().manual_seed(seed)
    while True:
        J = torch.randn(2, 6, generator=g, dtype=torch.float64)
        J[0] *= 3.0
        if J[0] @ J[1] < -0.1:
            return J


# ---------------------------------------------------------------------------------------------------------------- MGDA
def _brute_min_norm(G: np.ndarray, n: int) -> float:
    """Smallest wᵀGw over a dense grid of the simplex (T = 2 or 3)."""
    T = G.shape[0]
    grid = np.linspace(0.0, 1.0, n)
    if T == 2:
        W = np.stack([grid, 1 - grid], axis=1)
    else:
        a, b = np.meshgrid(grid, grid)
        keep = a + b <= 1.0
        W = np.stack([a[keep], b[keep], 1 - a[keep] - b[keep]], axis=1)
    return float(np.einsum("ki,ij,kj->k", W, G, W).min())


@pytest.mark.parametrize("T", [2, 3])
@pytest.mark.parametrize("solver", ["frank_wolfe", "exact"])
def test_mgda_is_min_norm_convex_combination(T, solver):
    agg = MGDA(solver=solver)
    for seed in range(20):
        J = _rand(T, 4, seed)
        G = J @ J.T
        w = agg.weights_from_gramian(G).numpy()
        assert (w >= -1e-12).all() and abs(w.sum() - 1) < 1e-9  # in the convex hull
        val = float(w @ G.numpy() @ w)
        brute = _brute_min_norm(G.numpy(), 2001 if T == 2 else 301)
        assert val <= brute + 1e-9  # no grid point is shorter
        assert torch.allclose(agg(J), torch.from_numpy(w) @ J)


def test_mgda_exact_solver_matches_scipy_for_more_tasks():
    from scipy.optimize import minimize

    for seed in range(15):
        T = 3 + seed % 4
        J = _rand(T, 3 + seed % 5, seed)
        G = (J @ J.T).numpy()
        w = min_norm_simplex_exact(G)
        ref = minimize(
            lambda x: x @ G @ x,  # noqa: B023 - minimize calls it in this iteration
            np.full(T, 1 / T),
            jac=lambda x: 2 * G @ x,  # noqa: B023 - likewise
            method="SLSQP",
            bounds=[(0, 1)] * T,
            constraints=({"type": "eq", "fun": lambda x: x.sum() - 1},),
            options={"ftol": 1e-15, "maxiter": 500},
        )
        assert w @ G @ w <= ref.x @ G @ ref.x + 1e-10


# ------------------------------------------------------------------------------------------------------------- PCGrad
def test_pcgrad_removes_conflict_between_two_tasks():
    for seed in range(20):
        J = _conflicting_pair(seed)
        Gp = PCGrad(seed=seed).modified_gradients(J)
        assert Gp[0] @ J[1] >= -1e-10 and Gp[1] @ J[0] >= -1e-10
        assert torch.allclose(PCGrad(seed=seed)(J), Gp.sum(0))


# --------------------------------------------------------------------------------------------------------------- MAMG
def test_mamg_spec_properties_on_a_conflicting_pair():
    for seed in range(20):
        J = _conflicting_pair(seed)  # ||g_0|| > ||g_1||, <g_0, g_1> < 0
        g0, g1 = J
        Gp = MAMG(seed=seed).modified_gradients(J)
        new0 = Gp[0]
        u = (g0 - g1) / (g0 - g1).norm()
        assert abs(float((new0 + g1) @ u)) < 1e-10  # sum ⟂ interfering direction
        assert torch.isclose(new0.norm(), g1.norm())  # equal norms after
        s = new0 + g1
        assert torch.isclose(new0 @ s, g1 @ s)  # equal projections on g_i' + g_j
        assert torch.equal(Gp[1], g1)  # the smaller one is never amplified
        assert new0.norm() <= g0.norm()


def test_mamg_norm_never_grows_and_random_tasks():
    for seed in range(20):
        J = _rand(4, 5, seed)
        Gp = MAMG(seed=seed).modified_gradients(J)
        assert (Gp.norm(dim=1) <= J.norm(dim=1) + 1e-12).all()


def test_mamg_grow_reading_grows_the_smaller_gradient_onto_the_bisector():
    for seed in range(20):
        J = _conflicting_pair(seed)  # ||g_0|| > ||g_1||, <g_0, g_1> < 0
        g0, g1 = J
        Gp = MAMG(seed=seed, rule="grow").modified_gradients(J)
        assert torch.equal(Gp[0], g0)  # the larger one is kept
        u = (g1 - g0) / (g1 - g0).norm()
        assert abs(float((Gp[1] + g0) @ u)) < 1e-10 * float(J.norm()) ** 2  # on the bisector
        assert torch.isclose(Gp[1].norm(), g0.norm())  # grown to the larger norm


@pytest.mark.parametrize("rule", ["shrink", "grow"])
def test_mamg_two_conflicting_tasks_is_twice_the_mgda_min_norm_point(rule):
    """For T = 2 both readings give g_1 + g_2 - δu: twice MGDA's min-norm point under conflict, else the sum."""
    conflicts = 0
    for seed in range(40):
        J = _rand(2, 6, seed)
        J[0] *= 1.0 + seed % 3  # unequal norms
        mamg = MAMG(seed=seed, rule=rule)(J)
        if float(J[0] @ J[1]) < 0:
            conflicts += 1
            w = min_norm_simplex_exact((J @ J.T).numpy())
            # float64, a handful of flops on O(||J||) numbers: 1e-12 relative is ~1e4 eps
            assert torch.allclose(mamg, 2.0 * torch.tensor(w) @ J, rtol=0, atol=1e-12 * float(J.norm()))
        else:
            assert torch.allclose(mamg, J.sum(0), rtol=0, atol=1e-12 * float(J.norm()))
    assert 10 <= conflicts <= 30


def test_mamg_readings_keep_their_norm_property_and_differ_for_three_tasks():
    differ = 0
    for seed in range(20):
        J = _rand(3, 5, seed)
        J[0] *= 3.0
        shrink = MAMG(seed=seed, rule="shrink").modified_gradients(J)
        grow = MAMG(seed=seed, rule="grow").modified_gradients(J)
        assert (shrink.norm(dim=1) <= J.norm(dim=1) * (1 + 1e-12)).all()  # a clipping: no norm grows
        assert (grow.norm(dim=1) >= J.norm(dim=1) * (1 - 1e-12)).all()  # no norm shrinks
        differ += not torch.allclose(shrink.sum(0), grow.sum(0), rtol=1e-6)
    assert differ > 0


def test_mamg_one_conflicting_pair_among_three_tasks_edits_only_that_pair():
    # g_0 and g_1 conflict (||g_0|| > ||g_1||); g_2 is orthogonal to both
    J = torch.tensor([[3.0, 0.0, 0.0], [-1.0, 1.0, 0.0], [0.0, 0.0, 2.0]], dtype=torch.float64)
    shrink = MAMG(rule="shrink").modified_gradients(J)
    assert torch.isclose(shrink[0].norm(), J[1].norm()) and torch.equal(shrink[1:], J[1:])
    grow = MAMG(rule="grow").modified_gradients(J)
    assert torch.isclose(grow[1].norm(), J[0].norm()) and torch.equal(grow[0], J[0]) and torch.equal(grow[2], J[2])
    with pytest.raises(ConfigError, match="unknown MAMG rule"):
        MAMG(rule="clip")


def test_mamg_unchanged_when_norms_equal_or_no_conflict():
    J = torch.tensor([[1.0, 0.0], [-0.6, 0.8]], dtype=torch.float64)  # conflict, equal norms
    assert torch.allclose(MAMG().modified_gradients(J), J)
    J = torch.tensor([[3.0, 1.0], [0.5, 2.0]], dtype=torch.float64)  # no conflict
    assert torch.equal(MAMG().modified_gradients(J), J)


# ------------------------------------------------------------------------------------------------------------- CAGrad
def test_cagrad_c0_is_the_mean():
    for seed in range(5):
        J = _rand(3, 7, seed)
        for rescale in (0, 1, 2):
            assert torch.allclose(CAGrad(c=0.0, rescale=rescale)(J), J.mean(0))


def test_cagrad_improves_worst_case_within_the_ball():
    for seed in range(10):
        J = _rand(3, 5, seed)
        g0 = J.mean(0)
        c = 0.5
        d = CAGrad(c=c, rescale=0)(J)  # the paper's d* (primal solution)
        assert (d - g0).norm() <= c * g0.norm() * (1 + 1e-4) + 1e-6
        assert (J @ d).min() >= (J @ g0).min() - 1e-6
        assert torch.allclose(CAGrad(c=c, rescale=1)(J), d / (1 + c**2))


def _cagrad_cases():
    """Gramians (float64 J) of every kind the dual meets: T = 2..40, rank-deficient, duplicated and opposite tasks."""
    gen = torch.Generator().manual_seed(0)
    for k in range(40):
        T, P = [2, 3, 5, 10, 40][k % 5], [300, 4, 20, 1000][k % 4]
        J = torch.randn(T, P, generator=gen, dtype=torch.float64)
        J = J + 3 * float(torch.rand(1, generator=gen)) * torch.randn(P, generator=gen, dtype=torch.float64)
        if k % 7 == 0:
            J[1] = J[0]
        if k % 11 == 0:
            J[-1] = -J[0]
        yield J, [0.1, 0.4, 0.9, 2.0][k % 4]


def test_cagrad_dual_is_exact_zero_duality_gap(monkeypatch):
    """Strong duality: the primal value min_i ⟨g_i, d*⟩ equals the dual value f(w*) at the returned w*."""
    from mtlkit.aggregation import cagrad

    slsqp = cagrad._slsqp

    def no_fallback(*args):
        raise AssertionError("the exact solver fell back to SLSQP")

    monkeypatch.setattr(cagrad, "_slsqp", no_fallback)
    zero_cases = 0
    for J, c in _cagrad_cases():
        T = J.shape[0]
        A = (J @ J.T / torch.trace(J @ J.T)).numpy()
        L = torch.tensor(cagrad.factor(A)[0])  # LᵀL = A: columns are the task gradients
        sqrt_phi = c * float(np.sqrt(A.mean() + 1e-8))
        w = cagrad.cagrad_dual(A, sqrt_phi)
        assert (w >= 0).all() and abs(w.sum() - 1) < 1e-12
        g0, gw = L @ torch.full((T,), 1.0 / T, dtype=torch.float64), L @ torch.tensor(w)
        dual = float(g0 @ gw + sqrt_phi * gw.norm())
        tol = 1e-9
        if gw.norm() > 1e-6:
            d = g0 + sqrt_phi * gw / gw.norm()  # the paper's primal solution
        else:  # 0 in the hull is optimal (f = 0): a primal point is the projection of g0 onto {d : J d >= 0}
            zero_cases += 1
            d = L @ torch.tensor(cagrad.project_dual_cone(A, np.full(T, 1.0 / T))[0])
            assert (d - g0).norm() <= sqrt_phi * (1 + 1e-9)
            tol = 1e-8  # f(w) = √φ ||g_w||, g_w ~ 1e-9 from NNLS
        primal = float((L.T @ d).min())  # min_i ⟨g_i, d⟩
        assert abs(primal - dual) <= tol * (1 + abs(dual)), (T, c, primal, dual)
        if T > 10:
            continue  # SLSQP takes ~1 s per solve at T = 40
        # never worse than the reference implementations' SLSQP
        u = np.full(T, 1.0 / T)
        ref = torch.tensor(slsqp(A, A @ u, sqrt_phi, u))
        f_ref = float(g0 @ (L @ ref) + sqrt_phi * (L @ ref).norm())
        assert dual <= f_ref + 1e-12
    assert zero_cases > 0  # the cases include optima with g_w = 0


def test_cagrad_fallback_to_slsqp_warns_and_still_solves():
    from mtlkit.aggregation import cagrad

    J = _rand(4, 9, 3)
    A = (J @ J.T / torch.trace(J @ J.T)).numpy()
    sqrt_phi = 0.5 * float(np.sqrt(A.mean() + 1e-8))
    exact = cagrad.cagrad_dual(A, sqrt_phi)
    with pytest.warns(RuntimeWarning, match="did not certify an answer in 0 rounds"):
        fallback = cagrad.cagrad_dual(A, sqrt_phi, max_iter=0)
    assert np.allclose(fallback, exact, atol=1e-4)


# -------------------------------------------------------------------------------------------------- UPGrad / DualProj
@pytest.mark.parametrize("cls", [UPGrad, DualProj])
def test_dual_cone_methods_never_conflict(cls):
    for seed in range(60):
        T, P = 2 + seed % 5, 2 + seed % 7
        J = _rand(T, P, seed)
        d = cls()(J)
        # relative to ||g_i|| ||d||, with a floor for d ~ 0 (the dual cone can be {0} when T > P)
        scale = J.norm(dim=1) * torch.clamp(d.norm(), min=1e-6 * J.norm())
        assert ((J @ d) / scale).min() >= -1e-7, seed


@pytest.mark.parametrize("cls", [UPGrad, DualProj])
def test_dual_cone_methods_are_the_mean_without_conflict(cls):
    J = _rand(3, 5, 0).abs()  # all inner products > 0
    assert torch.allclose(cls()(J), J.mean(0), atol=1e-10)


# ------------------------------------------------------------------------------------------------------------- IMTL-G
def test_imtlg_equal_projections_on_unit_gradients():
    for seed in range(10):
        J = _rand(3, 6, seed) * torch.tensor([[1.0], [5.0], [0.2]], dtype=torch.float64)
        d = IMTLG()(J)
        proj = (J / J.norm(dim=1, keepdim=True)) @ d
        assert torch.allclose(proj, proj[0].expand(3), rtol=1e-8)
        assert abs(float(IMTLG().weights_from_gramian(J @ J.T).sum()) - 1) < 1e-10


# --------------------------------------------------------------------------------------------------------- Nash-MTL
def test_nash_mtl_solves_bargaining_equation():
    J = torch.tensor([[1.0, 0.5, 0.0], [0.0, 2.0, -1.0], [-0.5, 0.0, 3.0]], dtype=torch.float64)
    G = J @ J.T
    a = NashMTL(normalize=False).weights_from_gramian(G)
    assert (a > 0).all()
    assert torch.allclose(G @ a, 1 / a, rtol=1e-6)
    a = NashMTL(normalize=True).weights_from_gramian(G)  # the option: (G/||G||_F) α = 1/α
    assert torch.allclose(G @ a, torch.linalg.norm(G) / a, rtol=1e-6)
    # diagonal worked example: α_i = 1/√G_ii
    a = NashMTL(normalize=False).weights_from_gramian(torch.diag(torch.tensor([4.0, 0.25], dtype=torch.float64)))
    assert torch.allclose(a, torch.tensor([0.5, 2.0], dtype=torch.float64), rtol=1e-6)


def test_nash_mtl_options():
    J1, J2 = _rand(2, 4, 1), _rand(2, 4, 2)
    agg = NashMTL(update_weights_every=2)
    w1 = agg.weights_from_gramian(J1 @ J1.T)
    w2 = agg.weights_from_gramian(J2 @ J2.T)  # reused
    assert torch.equal(w1, w2)
    d = NashMTL(max_norm=0.1)(J1 * 100)
    assert d.norm() <= 0.1 + 1e-9


# ------------------------------------------------------------------------------------------------- Aligned-MTL, GradVac
def test_aligned_mtl_orthogonal_gradients_scaled_to_smallest():
    J = torch.tensor([[3.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 2.0]], dtype=torch.float64)
    assert torch.allclose(AlignedMTL()(J), torch.ones(3, dtype=torch.float64))
    J = _rand(3, 6, 0)  # aligned components have equal singular values
    w = AlignedMTL().weights_from_gramian(J @ J.T)
    assert torch.allclose(AlignedMTL()(2 * J), 2 * (w @ J))  # positively homogeneous


def test_gradvac_reaches_target_cosine():
    J = _conflicting_pair(0)
    agg = GradVac()
    agg.load_state_dict({**agg.state_dict(), "targets": torch.full((2, 2), 0.3, dtype=torch.float64)})
    Gp = agg.modified_gradients(J)
    cos = (Gp[0] @ J[1]) / (Gp[0].norm() * J[1].norm())
    assert torch.isclose(cos, torch.tensor(0.3, dtype=torch.float64))


def _surgery_on_vectors(Js, rule, seed):
    """The papers' Algorithm 1 literally, on P-vectors, for a sequence of steps (state carried; returns the last):
    for each i, edit a copy of g_i against every other g_j in a random order drawn as the aggregators draw it (one
    randperm per task, in task order, from a seeded generator)."""
    gen = torch.Generator().manual_seed(seed)
    T = Js[0].shape[0]
    targets = torch.zeros(T, T, dtype=torch.float64)
    for J in Js:
        out = []
        for i in range(T):
            g = J[i].clone()
            for j in [j for j in torch.randperm(T, generator=gen).tolist() if j != i]:
                g = rule(g, J[j], targets, i, j)
            out.append(g)
    return torch.stack(out)


def _pcgrad_rule(g, gj, targets, i, j):
    dot = g @ gj
    return g - dot / (gj @ gj) * gj if dot < 0 else g


def _mamg_rule(g, gj, targets, i, j):
    if g @ gj < 0:
        u = (g - gj) / (g - gj).norm()
        delta = (g + gj) @ u
        if delta > 0:
            return g - delta * u
    return g


def _gradvac_rule(g, gj, targets, i, j, beta=0.3):
    phi, t = (g @ gj) / (g.norm() * gj.norm()), targets[i, j]
    if phi < t:
        scale = (t * (1 - phi**2).sqrt() - phi * (1 - t**2).sqrt()) / (gj.norm() * (1 - t**2).sqrt())
        g = g + g.norm() * scale * gj
    targets[i, j] = (1 - beta) * t + beta * phi
    return g


@pytest.mark.parametrize(
    "make,rule",
    [
        (lambda: PCGrad(seed=3), _pcgrad_rule),
        (lambda: MAMG(seed=3), _mamg_rule),
        (lambda: GradVac(beta=0.3, seed=3), _gradvac_rule),
    ],
)
def test_pairwise_surgery_equals_the_papers_loop_on_vectors(make, rule):
    """The Gramian-coefficient, all-rows-per-round implementation gives the papers' sequential result (3 steps, so
    GradVac's targets and the generator carry over)."""
    for T in (3, 7):
        J = [_rand(T, 12, 10 * T + k) for k in range(3)]
        for J_k in J:
            J_k[T // 2] -= 2 * J_k[0]  # make some pairs conflict
        agg = make()
        got = [agg.modified_gradients(J_k) for J_k in J]
        for steps in (1, 2, 3):
            # the reference replays the steps from the start
            assert torch.allclose(got[steps - 1], _surgery_on_vectors(J[:steps], rule, seed=3), atol=1e-10), (T, steps)


# --------------------------------------------------------------------------------------------------- non-conflicting
@pytest.mark.parametrize("name", ["pcgrad", "mamg", "gradvac", "graddrop"])
def test_no_conflict_means_plain_sum(name):
    J = _rand(4, 6, 3).abs() + 0.1  # all cosines > 0 (≥ GradVac's 0 targets)
    assert torch.allclose(build_method(name).aggregator(J), J.sum(0))


# ---------------------------------------------------------------------------------------------- permutation / seeds
@pytest.mark.parametrize("name", ZOO)
def test_permutation_equivariance_or_seeded_reproducibility(name):
    J = _rand(4, 8, 11)
    perm = torch.tensor([2, 0, 3, 1])
    out = build_method(name).aggregator(J)
    if build_method(name).aggregator.permutation_equivariant:
        assert torch.allclose(build_method(name).aggregator(J[perm]), out, atol=1e-7), name
    else:
        assert torch.equal(build_method(name, seed=5).aggregator(J), build_method(name, seed=5).aggregator(J))


@pytest.mark.parametrize("name", ["pcgrad", "gradvac", "mamg", "graddrop", "nash_mtl"])
def test_state_dict_round_trip(name):
    agg = build_method(name, **({"update_weights_every": 2} if name == "nash_mtl" else {})).aggregator
    for s in range(3):
        agg(_rand(3, 10, s))
    state = copy.deepcopy(agg.state_dict())
    nxt = [_rand(3, 10, 100 + k) for k in range(2)]
    expected = [agg(J) for J in nxt]
    fresh = build_method(name, seed=7) if name != "nash_mtl" else build_method(name, update_weights_every=2)
    fresh.aggregator.load_state_dict(state)
    assert all(torch.equal(fresh.aggregator(J), e) for J, e in zip(nxt, expected, strict=True))


def test_random_methods_depend_on_seed():
    J = _rand(4, 50, 0)
    assert not torch.equal(GradDrop(seed=0)(J), GradDrop(seed=1)(J))


# ----------------------------------------------------------------------------------------------- registry, options
def test_every_registered_name_builds():
    assert {
        "mgda",
        "pcgrad",
        "cagrad",
        "gradvac",
        "imtl_g",
        "nash_mtl",
        "graddrop",
        "upgrad",
        "aligned_mtl",
        "dualproj",
        "mamg",
    } <= set(ZOO)
    J = _rand(3, 5, 0, dtype=torch.float32)
    for name in available_methods():
        m = build_method(name)
        assert m.name == name
        out = m.aggregator(J)
        assert out.shape == (5,) and out.dtype == torch.float32 and torch.isfinite(out).all()


@pytest.mark.parametrize(
    "name, options",
    [
        ("cagrad", {"c": -0.1}),
        ("cagrad", {"rescale": 3}),
        ("mgda", {"max_iter": 0}),
        ("mgda", {"solver": "cvx"}),
        ("gradvac", {"beta": 0.0}),
        ("gradvac", {"beta": 1.5}),
        ("graddrop", {"leak": 2.0}),
        ("pcgrad", {"seed": -1}),
        ("nash_mtl", {"update_weights_every": 0}),
        ("nash_mtl", {"max_norm": -1.0}),
        ("upgrad", {"reg_eps": -1.0}),
        ("mamg", {"seed": 1.5}),
        ("nash_mtl", {"bogus": 1}),
    ],
)
def test_bad_options_raise(name, options):
    with pytest.raises(ConfigError):
        build_method(name, **options)


def test_bad_inputs_raise():
    with pytest.raises(ValueError):
        MGDA()(torch.ones(3))
    with pytest.raises(FloatingPointError):
        PCGrad()(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]))
    with pytest.raises(ValueError):
        GradDrop(leak=[0.1, 0.2])(torch.ones(3, 2))
    agg = GradVac()
    agg(torch.ones(2, 3))
    with pytest.raises(ValueError):
        agg(torch.ones(3, 3))


def test_zero_gradients_give_zero_update():
    J = torch.zeros(3, 4)
    for name in ZOO:
        assert torch.equal(build_method(name).aggregator(J), torch.zeros(4)), name


# --------------------------------------------------------------------------------------------------- integration
class _TwoHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(4, 8), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(8, 1) for _ in range(2))

    def forward(self, x):
        z = self.enc(x)
        return z, [h(z).squeeze(-1) for h in self.heads]


@pytest.mark.parametrize("name", ZOO)
def test_training_through_the_engine_reduces_the_loss(name):
    torch.manual_seed(0)
    x = torch.randn(32, 4)
    ys = [x[:, 0] - x[:, 1], torch.sin(x[:, 2]) + 0.5 * x[:, 0]]
    net = _TwoHead()
    method = build_method(name)
    opt = torch.optim.SGD(net.parameters(), lr=0.05)

    def losses():
        z, outs = net(x)
        return z, torch.stack([((o - y) ** 2).mean() for o, y in zip(outs, ys, strict=True)])

    with torch.no_grad():
        start = float(losses()[1].sum())
    for _ in range(15):
        opt.zero_grad()
        z, L = losses()
        backward(
            method.weighting(L),
            shared_params=net.enc.parameters(),
            aggregator=method.aggregator,
            representation=z,
            level=method.level,
        )
        opt.step()
    with torch.no_grad():
        end = float(losses()[1].sum())
    assert end < start, (name, start, end)


@pytest.mark.parametrize("name", ZOO)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_gradient_rows_are_named(name, bad):
    J = torch.randn(3, 5, generator=torch.Generator().manual_seed(0))
    J[2, 3] = bad
    with pytest.raises(FloatingPointError, match=r"tasks \[2\]"):
        build_method(name).aggregator(J)


def test_pinvh_matches_numpy_pseudo_inverse_on_singular_and_indefinite_matrices():
    from mtlkit.aggregation._solvers import pinvh

    rng = np.random.default_rng(0)
    J = rng.standard_normal((6, 3))
    for A in (J @ J.T, np.diag([2.0, -1.0, 0.0, 0.5]), np.zeros((3, 3))):  # rank 3 of 6, indefinite, zero
        np.testing.assert_allclose(pinvh(A), np.linalg.pinv(A, hermitian=True), atol=1e-12)


# ------------------------------------------------------------------------------------- certified QP solvers (edges)
def _brute_nnls(M: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Exact NNLS by enumerating supports (small T): the best feasible least-squares solution over all supports."""
    import itertools

    T = M.shape[1]
    best, best_val = np.zeros(T), float(b @ b)
    for k in range(1, T + 1):
        for S in itertools.combinations(range(T), k):
            z = np.zeros(T)
            z[list(S)] = np.linalg.lstsq(M[:, list(S)], b, rcond=None)[0]
            val = float(np.sum((M @ z - b) ** 2))
            if (z >= 0).all() and val < best_val:
                best, best_val = z, val
    return best


def test_nnls_certified_repairs_a_wrong_scipy_answer(monkeypatch):
    """SciPy's nnls has returned sub-optimal points (scipy issues #21140, #25389): the certificate must catch them."""
    from mtlkit.aggregation import _solvers

    rng = np.random.default_rng(0)
    monkeypatch.setattr(_solvers, "nnls", lambda M, b, maxiter=None: (np.abs(rng.standard_normal(M.shape[1])), 0.0))
    for seed in range(10):
        r = np.random.default_rng(seed)
        M = r.standard_normal((6, 4)) @ r.standard_normal((4, 5))  # rank 4 < 5 columns: dependent columns
        b = r.standard_normal(6)
        x = _solvers.nnls_certified(M, b)
        assert _solvers.nnls_kkt_residual(M, b, x) <= _solvers.KKT_TOL
        ref = _brute_nnls(M, b)
        # the minimiser need not be unique (dependent columns), the fitted vector M x is: compare that
        assert np.linalg.norm(M @ x - M @ ref) <= 1e-10 * np.linalg.norm(b)


def test_nnls_kkt_residual_detects_a_wrong_active_set():
    M, b = np.eye(3), np.array([1.0, -1.0, 2.0])
    assert _solvers_mod().nnls_kkt_residual(M, b, np.array([1.0, 0.0, 2.0])) == 0.0
    assert _solvers_mod().nnls_kkt_residual(M, b, np.array([1.0, 0.0, 0.0])) > 0.1  # x_3 left at 0 with g_3 < 0
    assert _solvers_mod().nnls_kkt_residual(M, b, np.array([1.0, 0.3, 2.0])) > 0.1  # x_2 > 0 with g_2 > 0


def _solvers_mod():
    from mtlkit.aggregation import _solvers

    return _solvers


@pytest.mark.parametrize("make", [UPGrad, DualProj])
def test_dual_cone_methods_do_not_depend_on_the_scale_of_J(make):
    """update(s J) = s update(J): tiny gradients (||J||_F² = 9e-6 gave exactly 0 before) keep their direction."""
    for seed in range(5):
        J = _rand(4, 7, seed)
        J = J * (3e-3 / J.norm())  # ||J||_F² = 9e-6
        ref = make()(J)
        assert ref.norm() > 0
        for s in (1e-6, 1e6):
            # float64: the QP is solved on G / tr(G), identical up to round-off for every s
            assert torch.allclose(make()(s * J), s * ref, rtol=1e-9, atol=0.0)
    Z = torch.zeros(3, 5, dtype=torch.float64)
    assert torch.equal(make()(Z), torch.zeros(5, dtype=torch.float64))  # zero only for J = 0


def test_upgrad_is_certified_and_permutation_equivariant_on_rank_deficient_jacobians():
    from mtlkit.aggregation._solvers import KKT_TOL, dual_cone_kkt_residual

    rng = np.random.default_rng(0)
    for _seed in range(5):
        J = torch.tensor(rng.standard_normal((20, 19)) @ rng.standard_normal((19, 100)))  # rank 19
        G = (J @ J.T).numpy()
        A = G / np.trace(G)
        V = _solvers_mod().project_dual_cone(A, np.eye(20) / 20)
        assert dual_cone_kkt_residual(A, np.eye(20) / 20, V) <= KKT_TOL
        u = UPGrad()(J)
        assert float((J @ u).min()) >= -1e-12 * float(J.norm()) ** 2 * u.norm() / J.norm()  # no conflict
        p = torch.tensor(rng.permutation(20))
        assert (UPGrad()(J[p]) - u).norm() <= 1e-8 * J.norm()


def test_cagrad_does_not_conflict_at_a_pareto_stationary_point():
    """0 in the convex hull and c ≥ 1: the optimum of max_d min_i ⟨g_i, d⟩ in the ball is 0, so no task is hurt."""
    rng = np.random.default_rng(1)
    for seed in range(10):
        T = int(rng.integers(2, 6))
        J = rng.standard_normal((T, 8))
        J[-1] = -(rng.random(T - 1) @ J[:-1])  # 0 = a positive combination of the rows
        J = torch.tensor(J)
        for c in (1.0, 1.5, 2.0):
            d = CAGrad(c=c, rescale=0)(J)
            scale = float((J * J).sum()) / T
            assert float((J @ d).min()) >= -1e-10 * scale, (seed, c)
            assert (d - J.mean(0)).norm() <= c * J.mean(0).norm() * (1 + 1e-9) + 1e-6  # in the ball (√φ has +1e-8)
