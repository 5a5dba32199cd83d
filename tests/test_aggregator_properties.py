"""Property tests of every aggregator over the same input families (shared checks in ``aggregation_asserts``).

Families (``aggregation_asserts.make_family``): random, conflicting, duplicated rows, a zero row, rank-deficient,
tiny (1e-6·random) and huge (1e6·random), plus non_conflicting and pareto_stationary for specific properties; T in
{2, 3, 5, 10, 50} on a fixed grid and in [2, 50] in a hypothesis sweep; float32 and float64. Each test loops over
its cases and reports every failing case at once (family/T/dtype and the measured number against its tolerance).

Scaling under ``J → sJ`` (s > 0), derived from each method's equations and docstring ("linear": ``update(sJ) =
s·update(J)``; "invariant": ``update(sJ) = update(J)``). Tested for s = 1e-6 and 1e6.

=====================  =========  ==========================================================================
method                 scaling    reason
=====================  =========  ==========================================================================
Sum, Mean              linear     fixed weights
MGDA (FW and exact)    linear     argmin_{w∈Δ} wᵀ(s²G)w = argmin wᵀGw: the weights do not change
UPGrad                 linear     {x : sJx ≥ 0} = {x : Jx ≥ 0} and projecting onto a cone is positively homogeneous
DualProj               linear     same cone; the projected mean scales with s
CAGrad                 linear     dual solved on G/tr(G); radius c||g_0|| and the ball scale with s: weights fixed
PCGrad                 linear     the test ⟨g_i',g_j⟩ < 0 and the coefficient ⟨g_i',g_j⟩/||g_j||² are scale-free
GradVac                linear     cosines and ||g_i'||/||g_j|| are scale-free (fresh targets)
MAMG                   linear     the test ⟨g_i',g_j⟩ < 0 and the step δ/||g_i'-g_j|| = (||g_i'||²-||g_j||²)/
                                  ||g_i'-g_j||² are scale-free
GradDrop               linear     purity Σg/Σ|g| and the sign masks are scale-free (same U from the same seed)
IMTL-G                 linear     α ∝ G⁻¹√diag(G) scales as 1/s but is normalised to Σα = 1: weights fixed
Aligned-MTL            linear     B = √λ_min·V Λ^{-1/2} Vᵀ is homogeneous of degree 0 in G: weights fixed
Nash-MTL               invariant  normalize=False, Gα = 1/α (the paper): α(s²G) = α(G)/s, so update = (sJ)ᵀα/s
                                  = Jᵀα; ||update||² = αᵀGα = T whatever the scale
Nash-MTL normalize=T   linear     β = √||G||_F·α (its docstring): β(s²G) = β(G), so update = (sJ)ᵀβ
=====================  =========  ==========================================================================

Configurations are explicit where a default is a documented choice that may change (Nash-MTL's ``normalize``,
MGDA's solver); UPGrad, DualProj and CAGrad run with their defaults, which must meet the properties.

Properties claimed per method (and tested here):

* every method, every family, both dtypes: finite update of shape (P,) and J's dtype; J = 0 gives 0;
* permutation equivariance (rows of J permuted → same update): deterministic methods (MGDA, UPGrad, DualProj, CAGrad,
  IMTL-G, Aligned-MTL, Nash-MTL, Sum, Mean); GradDrop "given the seed" (its docstring); PCGrad, MAMG and GradVac
  only for T = 2 (their docstrings: the random order matters for T > 2), plus determinism under a seed (and through
  ``state_dict``) for every T;
* scaling per the table above; UPGrad and DualProj are not 0 at small scales (down to 1e-12);
* non-conflicting ``⟨g_i, d⟩ ≥ 0`` (on J and on J with reversed rows): UPGrad, DualProj, exact MGDA (there even
  ``⟨g_i, d⟩ ≥ ||d||²``, the min-norm point's optimality condition), MGDA at T = 2 (closed form), PCGrad at T = 2
  (``⟨g_1' + g_2', g_1⟩ = ||g_1||² - ⟨g_1,g_2⟩²/||g_2||² ≥ 0``); CAGrad at its optimum whenever its ball reaches the
  dual cone (the optimal value is then 0, so ``min_i ⟨g_i, d*⟩ ≥ 0``);
* KKT certificates (float64, ``KKT_TOL``): DualProj's weights, exact MGDA's weights (and Frank-Wolfe's at T = 2),
  the T projections behind UPGrad (a certified reference whose sum must give UPGrad's update), CAGrad's ball
  constraint and duality gap; with ``mtlkit.aggregation._solvers``' residuals and with independent ones (normalised
  by the problem data u, so that a huge weight on a null direction cannot dilute a violation);
* equality with brute force over supports (T ≤ 5) and with SLSQP (T ≤ 5) for UPGrad, DualProj, exact MGDA, CAGrad;
  Frank-Wolfe MGDA within the docstring's "a few percent" (5 %) of the optimum;
* documented relations: UPGrad with a duplicated task / a zero row, DualProj with a zero row, MGDA with a duplicated
  task / a zero row, IMTL-G with a duplicated task; UPGrad/DualProj without conflict = the mean; PCGrad/MAMG/GradVac/
  GradDrop without conflict = the sum; CAGrad rescale 0/1/2 and c = 0; PCGrad and MAMG at T = 2 = their closed forms,
  MAMG at T = 2 = 2·MGDA under conflict (both rules); GradVac's first step = PCGrad; GradDrop keeps one sign per
  coordinate; IMTL-G's equal projections; Aligned-MTL = σ_min·V Uᵀ1 from the SVD of J; Nash-MTL's bargaining
  equation and ``||update||² = T`` (``T·||G||_F`` normalised);
* the certificate functions themselves (``dual_cone_kkt_residual``, ``simplex_kkt_residual``) on hand-made optima.

Not claimed, hence not tested: Nash-MTL's permutation/scaling on singular Gramians (no solution of Gα = 1/α; the
update is set by the 1e-8 ridge and the stopping rule, per its docstring); PCGrad/MAMG/GradVac equivariance for T > 2.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import aggregation_asserts as aa
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
from mtlkit.aggregation._solvers import KKT_TOL, dual_cone_kkt_residual, simplex_kkt_residual

DTYPES = (torch.float64, torch.float32)


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """The matrices here are tiny (at most 50 x 103): with 2 intra-op threads on a loaded 2-core machine a 50 x 103
    matmul took 10 ms against 0.2 ms on one thread. One thread for this module; the setting is restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@dataclass(frozen=True)
class Spec:
    factory: Callable[[], object]
    scaling: str  # "linear" or "invariant" (table in the module docstring)
    equivariant: str = "all"  # "all": every T; "T=2": only two tasks (random order otherwise); "seed"
    invert_power: int = 1  # 2 for methods that invert G (rounding amplified by cond(G) = cond(J)²)
    skip: dict[str, str] = field(default_factory=dict)  # "property:family[:dtype]" -> documented reason


_NASH_SINGULAR = (
    "Gα = 1/α has no solution when G is singular (Nash-MTL docstring: the weights grow along the null "
    "direction, held by a 1e-8 ridge): the update is set by the ridge and Newton's stopping rule"
)


def _skips(families_per_property: dict[str, tuple[str, ...]], reason: str) -> dict[str, str]:
    return {f"{prop}:{fam}": reason for prop, fams in families_per_property.items() for fam in fams}


_SINGULAR_NASH = _skips({"perm": aa.SINGULAR_FAMILIES, "scale": aa.SINGULAR_FAMILIES}, _NASH_SINGULAR)
_SPEC_ARGS: dict[str, dict] = {
    "pcgrad": {"equivariant": "T=2"},
    "gradvac": {"equivariant": "T=2"},
    "mamg": {"equivariant": "T=2"},
    "graddrop": {"equivariant": "seed"},
    "imtl_g": {"invert_power": 2},
    "aligned_mtl": {"invert_power": 2},
    "nash_mtl": {"scaling": "invariant", "skip": _SINGULAR_NASH},
    "nash_mtl_normalized": {"skip": _SINGULAR_NASH},
}
SPECS: dict[str, Spec] = {
    name: Spec(**{"factory": factory, "scaling": "linear", **_SPEC_ARGS.get(name, {})})
    for name, factory in aa.AGGREGATORS.items()
}
NAMES = list(SPECS)


def _skipped(spec: Spec, prop: str, family: str, dtype: torch.dtype) -> bool:
    return f"{prop}:{family}" in spec.skip or f"{prop}:{family}:{str(dtype)[6:]}" in spec.skip


class Failures:
    """Collects failing cases so that one test reports all of them."""

    def __init__(self) -> None:
        self.items: list[str] = []

    def check(self, ok: bool, label: str, msg: str) -> None:
        if not ok:
            self.items.append(f"{label}: {msg}")

    def raise_if_any(self, what: str) -> None:
        if self.items:
            shown = "\n  ".join(self.items[:25])
            more = f"\n  ... and {len(self.items) - 25} more" if len(self.items) > 25 else ""
            raise AssertionError(f"{what}: {len(self.items)} failing case(s)\n  {shown}{more}")


def _grid(families=aa.FAMILIES, dtypes=DTYPES, task_counts=aa.TASK_COUNTS):
    for fam in families:
        for T in task_counts:
            for dtype in dtypes:
                yield fam, T, dtype, f"{fam}/T={T}/{str(dtype)[6:]}", aa.make_family(fam, T, 0, dtype)


# ------------------------------------------------------------------------------------------------------- structure
@pytest.mark.parametrize("name", NAMES)
def test_expected_structure(name):
    """Every family (the extra ones too), both dtypes: shape (P,), J's dtype, finite; Gramian-based: update = wᵀJ."""
    fails = Failures()
    for _fam, _T, _dtype, label, J in _grid(aa.ALL_FAMILIES):
        try:
            aa.assert_expected_structure(SPECS[name].factory, J)
        except Exception as e:  # report every case
            fails.check(False, label, f"{type(e).__name__}: {e}")
    fails.raise_if_any(f"{name}: structure")


def test_zero_matrix_gives_zero_update():
    """J = 0 is the one input whose update is 0 for every method (and it must not be NaN)."""
    fails = Failures()
    for name, spec in SPECS.items():
        for dtype in DTYPES:
            d = spec.factory()(torch.zeros(3, 5, dtype=dtype))
            fails.check(bool(torch.equal(d, torch.zeros(5, dtype=dtype))), f"{name}/{dtype}", f"got {d.tolist()}")
    fails.raise_if_any("zero matrix")


# --------------------------------------------------------------------------------------------------- permutations
def _perm_check(fails: Failures, spec: Spec, label: str, J: torch.Tensor) -> None:
    tol = aa.update_tol(J, spec.invert_power)
    dev = aa.permutation_difference(spec.factory, J, aa.permutations(J.shape[0]))
    fails.check(dev.within(tol), label, f"relative permutation difference {dev} > tol {tol:.3g}")


@pytest.mark.parametrize("dtype", DTYPES, ids=["float64", "float32"])
@pytest.mark.parametrize("name", NAMES)
def test_permutation_equivariance(name, dtype):
    """Permuting the rows of J leaves the update unchanged (relative to the term scale D), to ``update_tol``: the
    solvers' 1e-8 in float64, ``4·(P+T)·eps·cond(J)^k`` in float32 (``aggregation_asserts`` docstring).

    PCGrad, MAMG, GradVac: only T = 2 (one other task: the random order cannot matter; their docstrings say the
    output depends on the order for T > 2). GradDrop: for every T given the seed (its docstring)."""
    spec = SPECS[name]
    fails = Failures()
    tasks = (2,) if spec.equivariant == "T=2" else aa.TASK_COUNTS
    for fam, _T, dt, label, J in _grid(dtypes=(dtype,), task_counts=tasks):
        if _skipped(spec, "perm", fam, dt):
            continue
        _perm_check(fails, spec, label, J)
    fails.raise_if_any(f"{name}: permutation equivariance")


@pytest.mark.parametrize("name", ["pcgrad", "gradvac", "mamg", "graddrop"])
def test_randomised_methods_are_deterministic_under_a_seed(name):
    """Same seed, same J → bitwise the same update (every T); a resumed state gives the same next update."""
    spec = SPECS[name]
    fails = Failures()
    for _fam, _T, _dtype, label, J in _grid(("random", "conflicting")):
        a, b = spec.factory()(J), spec.factory()(J)
        fails.check(bool(torch.equal(a, b)), label, "two fresh aggregators with one seed disagree")
        agg = spec.factory()
        agg(J)
        twin = spec.factory()
        twin.load_state_dict(agg.state_dict())
        fails.check(bool(torch.equal(agg(J), twin(J))), label, "state_dict does not reproduce the next update")
    fails.raise_if_any(f"{name}: determinism")


# -------------------------------------------------------------------------------------------------------- scaling
SCALE_FAMILIES = (
    "random",
    "conflicting",
    "duplicated",
    "zero_row",
    "rank_deficient",
    "non_conflicting",
    "pareto_stationary",
)


@pytest.mark.parametrize("dtype", DTYPES, ids=["float64", "float32"])
@pytest.mark.parametrize("name", NAMES)
def test_scaling(name, dtype):
    """``update(sJ) = s·update(J)`` (linear) or ``= update(J)`` (invariant) for s = 1e-6, 1e6, per the table.

    Tolerance ``update_tol`` (sJ is J up to one rounding per entry, so the methods see a relative perturbation of
    eps; tiny and huge are the ``tiny``/``huge`` families). UPGrad and DualProj in particular must not return 0
    for small gradients."""
    spec = SPECS[name]
    fails = Failures()
    for fam, _T, dt, label, J in _grid(SCALE_FAMILIES, dtypes=(dtype,)):
        if _skipped(spec, "scale", fam, dt):
            continue
        tol = aa.update_tol(J, spec.invert_power)
        for s in (aa.TINY, aa.HUGE):
            dev = aa.scaling_difference(spec.factory, J, s, spec.scaling)
            fails.check(dev.within(tol), f"{label}/s={s:g}", f"{spec.scaling}: relative deviation {dev} > {tol:.3g}")
    fails.raise_if_any(f"{name}: {spec.scaling} under scaling")


@pytest.mark.parametrize("name", ["upgrad", "dualproj"])
def test_dual_cone_methods_do_not_vanish_for_small_gradients(name):
    """J with full row rank (random, tiny, conflicting; T ≤ P) is not stationary, so the projections are not all 0:
    the update is not 0 at any scale, and its norm is proportional to the scale."""
    fails = Failures()
    for _fam, _T, _dtype, label, J in _grid(("random", "conflicting")):
        for s in (1.0, 1e-6, 1e-12, 1e6):
            d = SPECS[name].factory()(J * s)
            ref = SPECS[name].factory()(J)
            ratio = float(d.to(torch.float64).norm() / (s * ref.to(torch.float64).norm()))
            fails.check(abs(ratio - 1.0) <= aa.update_tol(J), f"{label}/s={s:g}", f"||d(sJ)|| / (s||d(J)||) = {ratio}")
    fails.raise_if_any(f"{name}: small gradients")


# ---------------------------------------------------------------------------------------------- non-conflicting
NON_CONFLICTING = {
    "upgrad": aa.TASK_COUNTS,
    "dualproj": aa.TASK_COUNTS,
    "mgda_exact": aa.TASK_COUNTS,
    "mgda": (2,),
    "pcgrad": (2,),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=["float64", "float32"])
@pytest.mark.parametrize("name", list(NON_CONFLICTING))
def test_non_conflicting(name, dtype):
    """``⟨g_i, update⟩ ≥ -slack_i`` for every task (``aggregation_asserts.non_conflict_slack``: rounding of G and of
    wᵀJ, plus the certified solver residual), for J and for J with its rows reversed. Exact MGDA (and MGDA at T = 2,
    closed form): ``⟨g_i, d⟩ ≥ ||d||²`` (the min-norm point's optimality condition). PCGrad only at T = 2:
    ``⟨g_1' + g_2', g_1⟩ = ||g_1||² - ⟨g_1,g_2⟩²/||g_2||² ≥ 0`` (Cauchy-Schwarz)."""
    spec = SPECS[name]
    fails = Failures()
    for _fam, _T, _dt, label, J0 in _grid(aa.ALL_FAMILIES, dtypes=(dtype,), task_counts=NON_CONFLICTING[name]):
        for order, J in (("", J0), ("/reversed", J0.flip(0))):
            d, w, D = aa.evaluate(spec.factory, J)
            margin = float(d.to(torch.float64).norm()) ** 2 if name.startswith("mgda") else 0.0
            if margin:
                margin -= aa.ROUNDING_C * sum(J.shape) * aa.eps(dtype) * D * D  # ||d||² from the rounded d
            v = aa.non_conflict_violation(J, d, w, D, margin)
            fails.check(
                v <= 1.0, label + order, f"conflict {v:.3g} x the allowed slack (min cos {aa.min_cosine(J, d, D):.3g})"
            )
    fails.raise_if_any(f"{name}: non-conflicting")


# ---------------------------------------------------------------------------------------- KKT certificates (float64)
def _projections_reference(J: torch.Tensor, U: np.ndarray) -> np.ndarray:
    """Certified reference projections (BVLS on Jᵀ), cross-checked by both residuals; raises if not certified."""
    V = aa.dual_cone_reference(J, U)
    G = aa.gramian64(J)
    r_ind = aa.dual_cone_residual(G, U, V)
    assert r_ind <= KKT_TOL, f"reference projection not certified (independent residual {r_ind:.3g})"
    return V


@pytest.mark.parametrize("name", ["upgrad", "dualproj"])
def test_dual_cone_methods_kkt_certificate(name):
    """DualProj: its weights v solve ``min vᵀGv s.t. v ≥ 1/T`` to KKT_TOL (mtlkit's residual and an independent one
    normalised by u, not v). UPGrad returns only Σ_i v_i, so the T projections are computed by a certified reference
    (BVLS on Jᵀ, a different solver) and UPGrad's update must equal ``Jᵀ Σ_i v_i`` to ``update_tol``; mtlkit's
    residual must certify the reference too (a check of the residual)."""
    fails = Failures()
    for _fam, T, _dtype, label, J in _grid(aa.ALL_FAMILIES, dtypes=(torch.float64,)):
        G = aa.gramian64(J)
        d, w, D = aa.evaluate(SPECS[name].factory, J)
        wn = w.numpy()
        if name == "dualproj":
            U = np.full((1, T), 1.0 / T)
            r_lib = dual_cone_kkt_residual(G, U, wn[None])
            r_ind = aa.dual_cone_residual(G, U, wn[None])
            fails.check(r_lib <= KKT_TOL, label, f"mtlkit dual_cone_kkt_residual {r_lib:.3g} > {KKT_TOL:g}")
            fails.check(r_ind <= KKT_TOL, label, f"independent residual {r_ind:.3g} > {KKT_TOL:g}")
        else:
            U = np.eye(T) / T
        try:
            V = _projections_reference(J, U)
        except AssertionError as e:
            fails.check(False, label, str(e))
            continue
        r_lib_ref = dual_cone_kkt_residual(G, U, V)
        fails.check(r_lib_ref <= KKT_TOL, label, f"mtlkit residual rejects a certified point: {r_lib_ref:.3g}")
        w_ref = torch.from_numpy(V.sum(0))
        dev = aa.deviation(J, d, D, w_ref @ J, aa.term_scale(J, w_ref))
        tol = aa.update_tol(J)
        fails.check(dev.within(tol), label, f"update differs from the certified projections' by {dev} > {tol:.3g}")
    fails.raise_if_any(f"{name}: KKT certificate")


@pytest.mark.parametrize("name", ["mgda_exact", "mgda"])
def test_mgda_kkt_certificate(name):
    """Exact MGDA's weights satisfy the simplex QP's KKT conditions to KKT_TOL (mtlkit's and an independent residual)
    and give the reference min-norm point (BVLS); Frank-Wolfe (default) only at T = 2, where it is the closed form
    (for T > 2 it is documented as approximate)."""
    fails = Failures()
    tasks = aa.TASK_COUNTS if name == "mgda_exact" else (2,)
    for _fam, _T, _dtype, label, J in _grid(aa.ALL_FAMILIES, dtypes=(torch.float64,), task_counts=tasks):
        G = aa.gramian64(J)
        d, w, D = aa.evaluate(SPECS[name].factory, J)
        r_lib, r_ind = simplex_kkt_residual(G, w.numpy()), aa.simplex_residual(G, w.numpy())
        fails.check(r_lib <= KKT_TOL, label, f"mtlkit simplex_kkt_residual {r_lib:.3g} > {KKT_TOL:g}")
        fails.check(r_ind <= KKT_TOL, label, f"independent residual {r_ind:.3g} > {KKT_TOL:g}")
        w_ref = aa.simplex_reference(J)
        r_ref = aa.simplex_residual(G, w_ref)
        fails.check(r_ref <= KKT_TOL, label, f"reference not certified ({r_ref:.3g})")
        w_t = torch.from_numpy(w_ref)
        dev = aa.deviation(J, d, D, w_t @ J, aa.term_scale(J, w_t))
        fails.check(dev.within(aa.update_tol(J)), label, f"min-norm point differs from the reference by {dev}")
    fails.raise_if_any(f"{name}: KKT certificate")


def test_mgda_frank_wolfe_is_close_to_the_optimum():
    """Frank-Wolfe (default, T > 2): never below the optimum, and within the docstring's "a few percent" (5 %) of
    the optimal squared norm (relative to the largest squared gradient norm when the optimum is ~0)."""
    fails = Failures()
    for _fam, _T, _dtype, label, J in _grid(aa.ALL_FAMILIES, dtypes=(torch.float64,), task_counts=(3, 5, 10, 50)):
        d, _, _ = aa.evaluate(SPECS["mgda"].factory, J)
        d_ref = torch.from_numpy(aa.simplex_reference(J)) @ J
        fw, opt = float(d.norm()) ** 2, float(d_ref.norm()) ** 2
        floor = float(J.norm(dim=1).max()) ** 2
        fails.check(fw >= opt - 1e-9 * floor, label, f"below the optimum: {fw} < {opt}")
        fails.check(fw <= opt + 0.05 * max(opt, 1e-6 * floor), label, f"||d||² = {fw:.6g} vs optimum {opt:.6g}")
    fails.raise_if_any("mgda (Frank-Wolfe): optimality gap")


# ------------------------------------------------------------------------------------ brute force / generic solvers
SMALL_T = (2, 3, 4, 5)


@pytest.mark.parametrize("name", ["upgrad", "dualproj", "mgda_exact"])
def test_small_T_matches_brute_force_and_slsqp(name):
    """T ≤ 5: the update equals the brute-force solution over all supports (exact), to ``update_tol``; and the
    QP objective is not above SLSQP's (generic solver; it may be less accurate, never better)."""
    fails = Failures()
    for _fam, T, _dtype, label, J in _grid(aa.ALL_FAMILIES, dtypes=(torch.float64,), task_counts=SMALL_T):
        G = aa.gramian64(J)
        d, w, D = aa.evaluate(SPECS[name].factory, J)
        if name == "mgda_exact":
            w_bf = aa.simplex_brute_force(G)
            obj, obj_ref = float(w.numpy() @ G @ w.numpy()), None
        else:
            U = np.eye(T) / T if name == "upgrad" else np.full((1, T), 1.0 / T)
            V_bf = np.stack([aa.dual_cone_brute_force(G, u) for u in U])
            w_bf = V_bf.sum(0)
            V_sq = np.stack([aa.slsqp_dual_cone(G, u) for u in U])
            obj = sum(float(v @ G @ v) for v in V_bf)
            obj_ref = sum(float(v @ G @ v) for v in V_sq)
        w_t = torch.from_numpy(w_bf)
        dev = aa.deviation(J, d, D, w_t @ J, aa.term_scale(J, w_t))
        fails.check(dev.within(aa.update_tol(J)), label, f"differs from brute force by {dev}")
        if obj_ref is not None:
            scale = float(np.abs(G).max())
            fails.check(obj <= obj_ref + 1e-9 * scale, label, f"brute force {obj} above SLSQP {obj_ref}")
    fails.raise_if_any(f"{name}: brute force")


# ------------------------------------------------------------------------------------------------------- CAGrad
CAGRAD_CS = (0.4, 0.9)


def _cagrad_cases(task_counts=aa.TASK_COUNTS):
    for fam, T, _dtype, label, J in _grid(aa.ALL_FAMILIES, dtypes=(torch.float64,), task_counts=task_counts):
        for c in CAGRAD_CS:
            yield fam, T, f"{label}/c={c}", J, c


def _cagrad_d_star(J: torch.Tensor, c: float) -> tuple[np.ndarray, torch.Tensor, float]:
    """CAGrad's d* from the default rescale=1 update: weights times 1 + c² (its docstring: d = d*/(1 + c²))."""
    w = CAGrad(c=c).weights(J @ J.T).numpy() * (1.0 + c * c)
    wt = torch.from_numpy(w)
    return w, wt @ J, aa.term_scale(J, wt)


def test_cagrad_update_is_in_the_ball():
    """CAGrad's d* lies in the ball ``||d - g_0|| ≤ c||g_0||`` (g_0 the mean gradient), to KKT_TOL relative to the
    radius plus the rounding of d (``C·(P+T)·eps·D``)."""
    fails = Failures()
    for _fam, _T, label, J, c in _cagrad_cases():
        _, d, D = _cagrad_d_star(J, c)
        r = aa.cagrad_radius(J, c)
        excess = float((d - J.mean(0)).norm()) - r
        allowed = KKT_TOL * r + aa.ROUNDING_C * (sum(J.shape) * aa.EPS64 * D + aa.scale_floor(J))
        fails.check(
            excess <= allowed,
            label,
            f"outside the ball by {excess:.3g} = {excess / max(r, 1e-300):.3g}·radius (allowed {allowed:.3g})",
        )
    fails.raise_if_any("cagrad: in the ball")


def test_cagrad_duality_gap_is_closed():
    """CAGrad's value ``min_i ⟨g_i, d*⟩`` is within KKT_TOL·scale of an upper bound given by weak duality (the dual
    value at the simplex point behind CAGrad's weights, or at the min-norm point of the hull): d* is optimal for
    ``max_d min_i ⟨g_i, d⟩ s.t. ||d - g_0|| ≤ c||g_0||``; and never worse than the mean g_0 (which is feasible)."""
    fails = Failures()
    for _fam, _T, label, J, c in _cagrad_cases():
        w, d, _ = _cagrad_d_star(J, c)
        p = aa.cagrad_primal_value(J, d)
        ub = aa.cagrad_upper_bound(J, c, [aa.cagrad_simplex_point(w)])
        scale = aa.cagrad_scale(J, c)
        fails.check(p >= ub - KKT_TOL * scale, label, f"duality gap {(ub - p) / scale:.3g} (relative) > {KKT_TOL:g}")
        p_mean = aa.cagrad_primal_value(J, J.mean(0))
        fails.check(p >= p_mean - KKT_TOL * scale, label, f"worse than the mean: {p} < {p_mean}")
    fails.raise_if_any("cagrad: duality gap")


def test_cagrad_matches_a_generic_solver():
    """T ≤ 5: CAGrad's value ``min_i ⟨g_i, d*⟩`` is not below SLSQP's optimum of the primal problem (in (d, t)) by
    more than 1e-6·scale (SLSQP's constrained answers are accurate to about √ftol), and SLSQP's value is not above
    the weak-duality bound (a check of the reference)."""
    fails = Failures()
    for _fam, _T, label, J, c in _cagrad_cases(SMALL_T):
        w = CAGrad(c=c, rescale=0).weights(J @ J.T).numpy()
        d = torch.from_numpy(w) @ J
        p = aa.cagrad_primal_value(J, d)
        p_ref = aa.cagrad_slsqp_primal(J, c)
        scale = aa.cagrad_scale(J, c)
        ub = aa.cagrad_upper_bound(J, c, [aa.cagrad_simplex_point(w)])
        fails.check(p >= p_ref - 1e-6 * scale, label, f"value {p:.8g} below SLSQP's {p_ref:.8g}")
        fails.check(p_ref <= ub + 1e-6 * scale, label, f"reference above the dual bound ({p_ref} > {ub})")
    fails.raise_if_any("cagrad: generic solver")


def test_cagrad_does_not_hurt_a_task_at_pareto_stationary_points():
    """0 in the convex hull (g_1 = -g_0) makes the optimal value ≤ 0; when the ball reaches the dual cone {d : Jd ≥
    0} (checked with the reference projection of g_0) it is exactly 0, so ``min_i ⟨g_i, d*⟩ ≥ -KKT_TOL·scale``."""
    fails = Failures()
    reached = 0
    for fam, T, label, J, c in _cagrad_cases():
        if fam not in ("pareto_stationary", "zero_row"):
            continue
        U = np.full((1, T), 1.0 / T)
        proj = torch.from_numpy(aa.dual_cone_reference(J, U)[0]) @ J
        if float((proj - J.mean(0)).norm()) > aa.cagrad_radius(J, c):
            continue
        reached += 1
        d = CAGrad(c=c, rescale=0)(J)
        p = aa.cagrad_primal_value(J, d)
        scale = aa.cagrad_scale(J, c)
        fails.check(p >= -KKT_TOL * scale, label, f"min_i <g_i, d> = {p:.3g} (relative {p / scale:.3g}) < 0")
    assert reached >= 5, "the cases must include stationary points whose ball reaches the dual cone"
    fails.raise_if_any("cagrad: Pareto-stationary")


def test_cagrad_documented_relations():
    """rescale 1 and 2 divide d* by 1 + c² and 1 + c; c = 0 gives the mean (docstring)."""
    fails = Failures()
    for _fam, _T, _dtype, label, J in _grid(("random", "conflicting", "pareto_stationary")):
        tol = aa.update_tol(J)
        d0 = CAGrad(c=0.5, rescale=0)(J).to(torch.float64)
        D = float(J.to(torch.float64).norm(dim=1).sum())
        for rescale, div in ((1, 1.25), (2, 1.5)):
            diff = float((CAGrad(c=0.5, rescale=rescale)(J).to(torch.float64) - d0 / div).norm()) / D
            fails.check(diff <= tol, f"{label}/rescale={rescale}", f"{diff:.3g}")
        diff = float((CAGrad(c=0.0)(J).to(torch.float64) - J.to(torch.float64).mean(0)).norm()) / D
        fails.check(diff <= tol, f"{label}/c=0", f"not the mean: {diff:.3g}")
    fails.raise_if_any("cagrad: relations")


# ------------------------------------------------------------------------------------------- documented relations
def _same(a: torch.Tensor, b: torch.Tensor, J: torch.Tensor, power: int = 1) -> bool:
    """``a`` equals ``b`` to ``update_tol`` relative to ``Σ_t ||g_t||`` (the weights of these relations are O(1))."""
    return aa.deviation(J, a, aa.term_scale(J, None), b).within(aa.update_tol(J, power))


def test_duplicated_and_zero_rows_relations():
    """A duplicated task does not change the dual cone or the convex hull, and a zero row adds nothing to either:

    * UPGrad([J; g_i]) = (T·UPGrad(J) + π_J(g_i)) / (T + 1)   (mean of the projections; π_J(g_i) by the reference);
    * UPGrad([J; 0]) = T/(T + 1)·UPGrad(J) and DualProj([J; 0]) = T/(T + 1)·DualProj(J)   (π(0) = 0; mean shrinks);
    * MGDA([J; g_i]) = MGDA(J)  (same hull) and MGDA([J; 0]) = 0   (exact solver; 0 is then the min-norm point);
    * IMTL-G([J; g_i]) = IMTL-G(J)  (its docstring: the duplicates share the deduplicated Jacobian's weight; J has
      full row rank here).
    """
    fails = Failures()
    for _fam, T, _dtype, label, J in _grid(("random", "conflicting"), task_counts=(2, 3, 5, 10, 49)):
        i = T // 2
        Jdup = torch.cat([J, J[i : i + 1]])
        Jzero = torch.cat([J, torch.zeros_like(J[:1])])
        up = UPGrad()(J).to(torch.float64)
        pi = torch.from_numpy(aa.dual_cone_reference(J.to(torch.float64), np.eye(T)[i : i + 1])[0]) @ J.to(
            torch.float64
        )
        fails.check(_same(UPGrad()(Jdup), (T * up + pi) / (T + 1), J), label, "UPGrad, duplicated task")
        fails.check(_same(UPGrad()(Jzero), T / (T + 1) * up, J), label, "UPGrad, zero row")
        dp = DualProj()(J).to(torch.float64)
        fails.check(_same(DualProj()(Jzero), T / (T + 1) * dp, J), label, "DualProj, zero row")
        mg = MGDA(solver="exact")
        fails.check(_same(mg(Jdup), mg(J), J), label, "MGDA, duplicated task")
        fails.check(_same(mg(Jzero), torch.zeros_like(J[0]), J), label, "MGDA, zero row")
        fails.check(_same(IMTLG()(Jdup), IMTLG()(J), J, power=2), label, "IMTL-G, duplicated task")
    fails.raise_if_any("duplicated / zero rows")


@pytest.mark.parametrize("name", ["upgrad", "dualproj", "pcgrad", "mamg", "gradvac", "graddrop"])
def test_without_conflict(name):
    """All inner products > 0 (the family's entries are all > 0): UPGrad and DualProj give the mean (every g_i is
    in the dual cone); PCGrad, MAMG and GradVac (targets start at 0) edit nothing and give the sum; GradDrop keeps
    every coordinate (all of one sign: purity 1) and gives the sum."""
    fails = Failures()
    for _fam, _T, _dtype, label, J in _grid(("non_conflicting",)):
        d = SPECS[name].factory()(J)
        ref = J.mean(0) if name in ("upgrad", "dualproj") else J.sum(0)
        fails.check(_same(d, ref, J), label, "not the plain mean/sum")
    fails.raise_if_any(f"{name}: no conflict")


def test_pairwise_surgery_closed_forms_for_two_tasks():
    """T = 2: PCGrad is ``g_i - min(⟨g_i,g_j⟩, 0)/||g_j||²·g_j`` summed (Yu et al. 2020, Algorithm 1); MAMG cuts the
    larger of two conflicting gradients to ``||g_j||`` along ``g_i - g_j`` (its docstring); GradVac's first step is
    PCGrad (targets start at 0, docstring), for every T with the same seed. MAMG at T = 2 (its docstring): both
    rules give the same update, twice MGDA's min-norm point when the pair conflicts."""
    fails = Failures()
    for _fam, _T, _dtype, label, J in _grid(("random", "conflicting", "pareto_stationary"), task_counts=(2,)):
        J64 = J.to(torch.float64)
        g = [J64[0], J64[1]]
        dot = float(g[0] @ g[1])
        pc = sum(g[i] - min(dot, 0.0) / float(g[1 - i] @ g[1 - i]) * g[1 - i] for i in range(2))
        fails.check(_same(PCGrad(seed=3)(J), pc, J), label, "PCGrad closed form")
        mm = []
        for i in range(2):
            gi, gj = g[i], g[1 - i]
            delta = float((gi @ gi - gj @ gj) / (gi - gj).norm()) if dot < 0 else 0.0
            mm.append(gi - max(delta, 0.0) * (gi - gj) / (gi - gj).norm() if delta > 0 else gi)
        fails.check(_same(MAMG(seed=3)(J), mm[0] + mm[1], J), label, "MAMG closed form")
        fails.check(_same(MAMG(seed=3, rule="grow")(J), MAMG(seed=3)(J), J), label, "MAMG rules differ at T = 2")
        if dot < 0:
            fails.check(_same(MAMG(seed=3)(J), 2 * MGDA(solver="exact")(J), J), label, "MAMG is not 2·MGDA")
    for _fam, _T, _dtype, label, J in _grid(("random", "conflicting")):
        fails.check(_same(GradVac(seed=3)(J), PCGrad(seed=3)(J), J), label, "GradVac's first step is not PCGrad")
    fails.raise_if_any("pairwise surgery")


def test_graddrop_keeps_one_sign_per_coordinate():
    """leak = 0: each coordinate of the update is the sum of the positive entries or the sum of the negative entries
    of its column (one sign is kept, Chen et al. 2020 Algorithm 1); a column of one sign is kept whole (purity 0 or 1);
    leak = 1 gives the plain sum."""
    fails = Failures()
    for _fam, T, dtype, label, J in _grid(aa.ALL_FAMILIES):
        d = GradDrop(seed=5)(J).to(torch.float64)
        J64 = J.to(torch.float64)
        pos, neg = J64.clamp(min=0).sum(0), J64.clamp(max=0).sum(0)
        tol = aa.ROUNDING_C * T * aa.eps(dtype) * J64.abs().sum(0)  # γ_T of the column's sum
        ok = ((d - pos).abs() <= tol) | ((d - neg).abs() <= tol)
        fails.check(bool(ok.all()), label, f"{int((~ok).sum())} coordinates keep both signs")
        one_sign = (J64 >= 0).all(0) | (J64 <= 0).all(0)
        fails.check(bool(((d - J64.sum(0)).abs() <= tol)[one_sign].all()), label, "a one-sign column was dropped")
        fails.check(_same(GradDrop(leak=1.0)(J), J.sum(0), J), label, "leak=1 is not the sum")
    fails.raise_if_any("graddrop")


def test_imtlg_equal_projections():
    """IMTL-G: the update has equal projections on every unit task gradient (rows ≠ 0) and Σα = 1, whenever that
    system has a solution (rows independent apart from duplicates and zero rows). Tolerance: rounding amplified by
    cond(G) = cond(J)² (the method solves with G⁺)."""
    fails = Failures()
    for _fam, _T, _dtype, label, J in _grid(("random", "conflicting", "duplicated", "zero_row", "tiny", "huge")):
        d, w, D = aa.evaluate(IMTLG, J)
        J64, d64 = J.to(torch.float64), d.to(torch.float64)
        n = J64.norm(dim=1)
        rows = n > 0
        proj = (J64[rows] @ d64) / n[rows]
        tol = aa.update_tol(J, 2)
        spread = float((proj.max() - proj.min()) / max(D, 1e-300))
        fails.check(spread <= tol, label, f"projections differ by {spread:.3g} (relative) > {tol:.3g}")
        fails.check(abs(float(w.to(torch.float64).sum()) - 1.0) <= tol, label, f"Σα = {float(w.sum())}")
    fails.raise_if_any("imtl_g")


def test_aligned_mtl_matches_svd_reference():
    """Aligned-MTL = ``σ_min·V_r U_rᵀ 1`` from the thin SVD ``J = U Σ Vᵀ`` restricted to the rank r (float64; the
    rank read off the SVD of J with a cut at 1e-8·σ_max, far from both the structural zeros ~1e-15·σ_max and the
    smallest true singular value of these families): with ``B = σ_min U Σ⁻¹ Uᵀ`` the update is ``Jᵀ B 1``."""
    fails = Failures()
    for _fam, T, _dtype, label, J in _grid(aa.ALL_FAMILIES, dtypes=(torch.float64,)):
        d, _, D = aa.evaluate(AlignedMTL, J)
        U, S, Vh = torch.linalg.svd(J, full_matrices=False)
        r = int((S > 1e-8 * S[0]).sum())
        ref = S[r - 1] * (Vh[:r].T @ (U[:, :r].T @ torch.ones(T, dtype=torch.float64)))
        w_ref = U[:, :r] @ ((S[r - 1] / S[:r]) * (U[:, :r].T @ torch.ones(T, dtype=torch.float64)))  # B 1
        dev = aa.deviation(J, d, D, ref, aa.term_scale(J, w_ref))
        tol = aa.update_tol(J, 2)
        fails.check(dev.within(tol), label, f"differs from the SVD reference by {dev} > {tol:.3g} (rank {r})")
    fails.raise_if_any("aligned_mtl")


def test_nash_mtl_bargaining_equation():
    """Nash-MTL: α > 0 solves ``G α = 1/α`` (normalize=False) or ``(G/||G||_F) β = 1/β`` (normalize=True) to the
    solver's documented stop (relative residual ``tol = 1e-9``) plus the documented ridge ``1e-8·||G||_F`` (which
    adds ``ridge·||α||``), x2, both scale-free; hence ``||update||² = αᵀGα = T`` (resp. ``T·||G||_F``) to
    ``||α||·(that)/T`` relative. Families with nonsingular G only (singular: no solution, see the docstring)."""
    fails = Failures()
    for _fam, T, _dtype, label, J in _grid(
        ("random", "conflicting", "non_conflicting", "tiny", "huge"), dtypes=(torch.float64,)
    ):
        G = aa.gramian64(J)
        n = float(np.linalg.norm(G))
        for normalize in (False, True):
            agg = NashMTL(normalize=normalize)
            a = agg.weights(J @ J.T).numpy()
            fails.check(bool((a > 0).all()), label, "α not positive")
            A = G / n if normalize else G
            resid = float(np.linalg.norm(A @ a - 1.0 / a))
            ridge = 1e-8 * float(np.linalg.norm(A)) * float(np.linalg.norm(a))
            allowed = 2.0 * (agg.tol * float(np.linalg.norm(1.0 / a)) + ridge)
            fails.check(resid <= allowed, f"{label}/normalize={normalize}", f"||Aα - 1/α|| {resid:.3g} > {allowed:.3g}")
            target = T * (n if normalize else 1.0)
            rel = abs(float(a @ G @ a) / target - 1.0)
            bound = float(np.linalg.norm(a)) * allowed / T + aa.ROUNDING_C * T * aa.EPS64
            fails.check(rel <= bound, f"{label}/normalize={normalize}", f"||d||²/target - 1 = {rel:.3g} > {bound:.3g}")
    fails.raise_if_any("nash_mtl")


# ------------------------------------------------------------------------------------------- the certificate API
def test_solver_certificate_api():
    """``dual_cone_kkt_residual`` / ``simplex_kkt_residual`` (mtlkit.aggregation._solvers): 0 at hand-made exact
    optima, scale-free (G → sG, u → su), positive away from the optimum, and not fooled by a huge weight on a null
    direction (a zero task: the weight multiplies nothing, so it must not dilute the other entries' violation)."""
    G = np.array([[1.0, -0.5], [-0.5, 1.0]])
    # projection of g_1 onto {x : Jx ≥ 0}: v = (1, 0.5) makes (Gv)_2 = 0 (active)
    U, V = np.array([[1.0, 0.0]]), np.array([[1.0, 0.5]])
    assert dual_cone_kkt_residual(G, U, V) <= 1e-15
    assert dual_cone_kkt_residual(1e6 * G, 1e-3 * U, 1e-3 * V) <= 1e-15
    assert dual_cone_kkt_residual(G, U, np.array([[1.0, 0.4]])) > KKT_TOL  # (Gv)_2 < 0: conflicts
    assert dual_cone_kkt_residual(G, U, np.array([[1.0, 0.6]])) > KKT_TOL  # complementarity fails
    assert simplex_kkt_residual(np.eye(3), np.full(3, 1 / 3)) <= 1e-15
    assert simplex_kkt_residual(1e-8 * np.eye(3), np.full(3, 1 / 3)) <= 1e-15
    assert simplex_kkt_residual(np.eye(3), np.array([0.5, 0.5, 0.0])) > KKT_TOL
    # A zero third task: its weight is free. A point that is wrong in the first entries must still be rejected.
    G3 = np.zeros((3, 3))
    G3[:2, :2] = G
    U3 = np.array([[1.0, 0.0, 0.0]])
    assert dual_cone_kkt_residual(G3, U3, np.array([[1.0, 0.5, 7.0]])) <= 1e-15  # optimal (free entry)
    wrong = np.array([[1.0, 0.8, 1e15]])  # complementarity fails
    assert dual_cone_kkt_residual(G3, U3, wrong) > KKT_TOL, "a huge weight on a zero task hides a KKT violation"


# ------------------------------------------------------------------------------------------------ hypothesis sweep
DETERMINISTIC = [n for n, s in SPECS.items() if s.equivariant == "all"]


# derandomize: the same examples on every run (CI is deterministic); no shrinking phase: a failing example is
# reported as drawn (shrinking would re-run the whole method set dozens of times).
@settings(
    max_examples=12,
    derandomize=True,
    deadline=None,
    database=None,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    family=st.sampled_from(aa.ALL_FAMILIES),
    T=st.integers(2, 50),
    seed=st.integers(1, 10_000),
    dtype=st.sampled_from(DTYPES),
)
def test_sweep_permutation_scaling_non_conflict(family, T, seed, dtype):
    """Other T, seeds and P (P = T + 1 .. 2T + 3): permutation equivariance and scaling (s = 1e-6) of every
    deterministic method, and non-conflict of UPGrad, DualProj and exact MGDA."""
    P = T + 1 + seed % (T + 3)
    J = aa.make_family(family, T, seed, dtype, P=P)
    fails = Failures()
    label = f"{family}/T={T}/P={P}/{str(dtype)[6:]}/seed={seed}"
    for name in DETERMINISTIC:
        spec = SPECS[name]
        tol = aa.update_tol(J, spec.invert_power)
        if not _skipped(spec, "perm", family, dtype):
            dev = aa.permutation_difference(spec.factory, J, aa.permutations(T, 2, seed))
            fails.check(dev.within(tol), f"{name}/{label}", f"permutation difference {dev} > {tol:.3g}")
        if not _skipped(spec, "scale", family, dtype) and family not in ("tiny", "huge"):
            dev = aa.scaling_difference(spec.factory, J, aa.TINY, spec.scaling)
            fails.check(dev.within(tol), f"{name}/{label}", f"scaling deviation {dev} > {tol:.3g}")
    for name in ("upgrad", "dualproj", "mgda_exact"):
        d, w, D = aa.evaluate(SPECS[name].factory, J)
        v = aa.non_conflict_violation(J, d, w, D)
        fails.check(v <= 1.0, f"{name}/{label}", f"conflict {v:.3g} x the allowed slack")
    fails.raise_if_any("sweep")


# ------------------------------------------------------------------------------------------ declared output scale
# Every aggregator declares ``scale`` (mtlkit.aggregation._base.Scale); these tests hold each class to it on the two
# inputs where the scales are defined exactly: T identical rows g, and T rows c_t·g with c_t > 0 (one direction, no
# conflict). Expected updates, derived from each method's equations:
#   sum          T·g               Σ_t c_t·g
#   mean         k·g               k·mean(c)·g          (k = 1; CAGrad: d* = (1+c)·g_0 on aligned rows, so
#                                                         k = (1+c)/(1+c²) for rescale=1, 1+c for rescale=0, 1 for 2)
#   convex       g                 λ·g, λ ∈ [min c, max c], weights >= 0 summing to 1 (Gramian-based)
#   affine       g                 λ·g, weights summing to 1 (IMTL-G: λ = Σc²/Σc)
#   fixed_norm   √T·g/||g||        √T·g/||g||           (Nash-MTL: G α = 1/α with G = ||g||²·c cᵀ)
from mtlkit._registry import METHODS  # noqa: E402
from mtlkit.aggregation._base import SUM_SCALE_FACTOR, Aggregator, Mean, Sum, SumScale, on_sum_scale  # noqa: E402
from mtlkit.aggregation._random import PairwiseSurgery, SeededAggregator  # noqa: E402
from mtlkit.aggregation.fairgrad import FairGrad  # noqa: E402
from mtlkit.aggregation.moco import MoCo  # noqa: E402
from mtlkit.aggregation.modo import MoDo  # noqa: E402
from mtlkit.engine.autodiff import backward  # noqa: E402
from mtlkit.errors import ConfigError  # noqa: E402
from mtlkit.methods import Composite  # noqa: E402
from mtlkit.weighting.dbmtl import DBMTLAggregator  # noqa: E402

_C = 0.4  # CAGrad's default c


def _registered_aggregators() -> list[type]:
    """Every aggregator class ``build_method`` can build: the registered classes, the composites' aggregators."""
    classes: set[type] = {Sum}
    for e in METHODS:
        if isinstance(e.obj, type) and issubclass(e.obj, Aggregator):
            classes.add(e.obj)
        elif isinstance(e.obj, Composite):
            classes.add(e.obj.aggregator)
    return sorted(classes, key=lambda c: c.__name__)


#: The configurations each class's scale is tested in, with the gain k of a mean-scale update (see above). Default:
#: the class with its defaults, k = 1.
SCALE_CASES: dict[type, list[tuple[str, Callable[[], Aggregator], float]]] = {
    CAGrad: [
        ("CAGrad()", CAGrad, (1 + _C) / (1 + _C**2)),
        ("CAGrad(rescale=2)", lambda: CAGrad(rescale=2), 1.0),
        ("CAGrad(rescale=0)", lambda: CAGrad(rescale=0), 1 + _C),
        ("CAGrad(c=0)", lambda: CAGrad(c=0.0), 1.0),
    ],
    # The EMA of a constant input reaches it only in the limit; beta=0 is that limit (no EMA).
    DBMTLAggregator: [("DBMTLAggregator(beta=0)", lambda: DBMTLAggregator(beta=0.0), 1.0)],
    NashMTL: [("NashMTL()", NashMTL, 1.0), ("NashMTL(max_iter=300)", lambda: NashMTL(max_iter=300), 1.0)],
}
#: Classes whose update on positive multiples is not the one their scale names, and why.
MULTIPLES_EXEMPT = {
    DBMTLAggregator: "every row is rescaled to the largest norm: T·max(c)·g, the sum only when the "
    "norms are equal (its docstring: 'stays on EW's scale')"
}
#: Abstract bases (no method of their own).
ABSTRACT = {SeededAggregator, PairwiseSurgery}


def _cases(cls: type) -> list[tuple[str, Callable[[], Aggregator], float]]:
    return SCALE_CASES.get(cls, [(f"{cls.__name__}()", cls, 1.0)])


def _scale_tol(cls: type, J: torch.Tensor) -> float:
    """update_tol of the aggregation asserts (solver 1e-8, rounding (P+T)·eps·κ^k, κ = 1 for one direction); Nash-MTL
    adds its ridge (1e-8·||G||_F on G, which moves α by ~½·1e-8 relative, see its docstring)."""
    tol = aa.update_tol(J, 2 if cls in (IMTLG, AlignedMTL) else 1)
    return tol + (1e-8 if cls is NashMTL else 0.0)


def _direction(T: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(aa.n_params(T), generator=gen, dtype=torch.float64)
    c = 0.5 + 1.5 * torch.rand(T, generator=gen, dtype=torch.float64)
    return g.to(dtype), c.to(dtype)


def _check_scale(
    fails: Failures,
    cls: type,
    label: str,
    agg: Aggregator,
    J: torch.Tensor,
    g: torch.Tensor,
    c: torch.Tensor,
    gain: float,
) -> None:
    scale, T = cls.scale, J.shape[0]
    d = agg(J).to(torch.float64)
    g64, c64 = g.to(torch.float64), c.to(torch.float64)
    tol = _scale_tol(cls, J)
    if scale in ("convex", "affine"):  # parallel to g, weights summing to 1 (and >= 0 for convex)
        lam = float(d @ g64 / (g64 @ g64))
        ref = lam * g64
        lo, hi = float(c64.min()), float(c64.max())
        if scale == "convex":
            fails.check(lo * (1 - tol) <= lam <= hi * (1 + tol), label, f"λ = {lam:.6g} outside [{lo:.6g}, {hi:.6g}]")
        if cls.gramian_based:
            w = agg.weights(J @ J.T).to(torch.float64) if not isinstance(agg, SumScale) else None
            if w is not None:
                fails.check(abs(float(w.sum()) - 1) <= tol, label, f"weights sum to {float(w.sum()):.10g}, not 1")
                if scale == "convex":
                    fails.check(float(w.min()) >= -tol, label, f"negative weight {float(w.min()):.3g}")
    else:
        ref = {"sum": c64.sum() * g64, "mean": gain * c64.mean() * g64, "fixed_norm": T**0.5 * g64 / g64.norm()}[scale]
    err = float((d - ref).norm() / ref.norm())
    fails.check(err <= tol, label, f"relative error {err:.3g} > tol {tol:.3g} ({scale} scale)")


@pytest.mark.parametrize("cls", _registered_aggregators(), ids=lambda c: c.__name__)
def test_declared_scale_holds_on_aligned_gradients(cls):
    """T identical rows g, and T positive multiples c_t·g: the update each declared scale names (table above)."""
    assert cls.scale in SUM_SCALE_FACTOR, f"{cls.__name__} declares unknown scale {cls.scale!r}"
    fails = Failures()
    for label, make, gain in _cases(cls):
        for T in (2, 3, 5, 10):
            for dtype in DTYPES:
                g, c = _direction(T, dtype, seed=T)
                where = f"{label}/T={T}/{str(dtype)[6:]}"
                _check_scale(fails, cls, f"{where}/identical", make(), g.repeat(T, 1), g, torch.ones_like(c), gain)
                if cls not in MULTIPLES_EXEMPT:
                    _check_scale(fails, cls, f"{where}/multiples", make(), c[:, None] * g[None, :], g, c, gain)
    fails.raise_if_any(f"{cls.__name__}: declared scale {cls.scale!r}")


def test_convex_and_affine_declarations_are_tight():
    """ "convex" weights are >= 0 and sum to 1 on every family; an "affine" method does give negative weights
    somewhere (else it should declare "convex"): IMTL-G on conflicting rows (T = 3) and random ones (T = 5)."""
    fails = Failures()
    for cls in _registered_aggregators():
        if cls.scale not in ("convex", "affine") or not cls.gramian_based:
            continue  # (MoCo: convex, from tracked gradients, not weights of G; tested in tests/test_moco.py)
        negative = False
        for _fam, _T, _dtype, label, J in _grid(aa.FAMILIES, dtypes=(torch.float64,), task_counts=(2, 3, 5)):
            w = cls().weights(J @ J.T)
            fails.check(
                abs(float(w.sum()) - 1) <= 1e-8 or float(w.abs().sum()) == 0,
                f"{cls.__name__}/{label}",
                f"weights sum to {float(w.sum()):.10g}",
            )
            negative |= bool((w < -1e-12).any())
            if cls.scale == "convex":
                fails.check(float(w.min()) >= -1e-12, f"{cls.__name__}/{label}", f"weight {float(w.min()):.3g} < 0")
        if cls.scale == "affine":
            fails.check(negative, cls.__name__, "declared affine but no weight was ever negative: declare convex")
    fails.raise_if_any("convex/affine declarations")


def test_every_aggregator_class_declares_a_known_scale():
    """Every Aggregator subclass of mtlkit (registered or not, abstract bases aside) declares a scale of the list."""
    seen, todo = set(), list(Aggregator.__subclasses__())
    while todo:
        cls = todo.pop()
        if cls not in seen:
            seen.add(cls)
            todo.extend(cls.__subclasses__())
    ours = [c for c in seen if c.__module__.startswith("mtlkit.") and c not in ABSTRACT]
    assert set(_registered_aggregators()) <= set(ours)
    bad = [c.__name__ for c in ours if getattr(c, "scale", None) not in SUM_SCALE_FACTOR]
    assert not bad, f"aggregators without a (known) declared scale: {bad}"


def test_every_registered_aggregator_is_in_the_property_suite():
    """A new aggregator file is held to this module's properties: each registered class has a factory in
    ``aggregation_asserts.AGGREGATORS`` (or an explicit reason here)."""
    elsewhere = {
        DBMTLAggregator: "stateful EMA of the gradients (DB-MTL); tested in test_weighting.py",
        FairGrad: "its update scales as s^((1-α)/(1+α)) with J (no linear scaling to test); tested in test_fairgrad.py",
        MoCo: "stateful tracking of the gradients (the update follows J only over steps); tested in test_moco.py",
        MoDo: "stateful projected step on λ (γ·J₁J₂ᵀ grows with ||J||²: no linear scaling to test); tested in "
        "test_modo.py",
    }
    covered = {type(factory()) for factory in aa.AGGREGATORS.values()}
    missing = [c.__name__ for c in _registered_aggregators() if c not in covered and c not in elsewhere]
    assert not missing, f"add these to aggregation_asserts.AGGREGATORS: {missing}"


# ------------------------------------------------------------------------------------------ the sum-scale wrapper
_WRAPPABLE = [c for c in _registered_aggregators() if SUM_SCALE_FACTOR[c.scale] == "T"]


@pytest.mark.parametrize("cls", _WRAPPABLE, ids=lambda c: c.__name__)
def test_sum_scale_wrapper_multiplies_by_T_and_keeps_the_flags(cls):
    """on_sum_scale: T·(the update) on random and aligned inputs; Gramian-based stays Gramian-based (weights x T);
    the engine's flags are the wrapped class's."""
    fails = Failures()
    for label, make, gain in _cases(cls):
        wrapped = on_sum_scale(make())
        for flag in ("gramian_based", "needs_per_task_grads", "permutation_equivariant", "default_level"):
            fails.check(getattr(wrapped, flag) == getattr(cls, flag), label, f"{flag} differs")
        fails.check(wrapped.scale == "sum", label, f"scale {wrapped.scale!r}")
        for _fam, T, _dtype, where, J in _grid(("random", "conflicting"), task_counts=(2, 5)):
            ref = make()(J)
            out = on_sum_scale(make())(J)
            tol = aa.update_tol(J)
            fails.check(
                bool(torch.allclose(out, T * ref, rtol=tol, atol=tol * float(T * ref.norm()))),
                f"{label}/{where}",
                "wrapped update is not T x the update",
            )
            if cls.gramian_based:
                G = J @ J.T
                fails.check(
                    bool(torch.equal(on_sum_scale(make()).weights(G), T * make().weights(G))),
                    f"{label}/{where}",
                    "weights are not T x the weights",
                )
        g, _ = _direction(4, torch.float64, seed=0)
        d = on_sum_scale(make())(g.repeat(4, 1))
        err = float((d - 4 * gain * g).norm() / (4 * gain * g).norm())
        fails.check(err <= 1e-8, f"{label}/identical", f"relative error {err:.3g} from T·g")
    fails.raise_if_any(f"{cls.__name__} on the sum scale")


def test_sum_scale_wrapper_returns_sum_scale_aggregators_themselves_and_refuses_the_others():
    pc = PCGrad(seed=1)
    assert on_sum_scale(pc) is pc and on_sum_scale(Sum()).scale == "sum"
    with pytest.raises(ConfigError, match=r"'nash_mtl'.*cannot be put on the sum scale.*norm set by T"):
        on_sum_scale(NashMTL(), "nash_mtl")

    class Undeclared(Aggregator):
        def aggregate(self, J):
            return J.mean(dim=0)

    with pytest.raises(ConfigError, match="declares no output scale"):
        on_sum_scale(Undeclared())


def test_sum_scale_wrapper_delegates_state_and_attributes():
    class CountingMean(Mean):
        """Mean that counts its calls (a stateful mean-scale aggregator)."""

        def __init__(self) -> None:
            self.calls = 0

        def weights_from_gramian(self, G):
            self.calls += 1
            return super().weights_from_gramian(G)

        def state_dict(self):
            return {"calls": self.calls}

        def load_state_dict(self, state):
            self.calls = int(state["calls"])

    wrapped = on_sum_scale(CountingMean())
    J = torch.tensor([[1.0, 0.0], [0.0, 3.0]])
    assert torch.equal(wrapped(J), J.sum(0)) and wrapped(J) is not None
    assert wrapped.state_dict() == {"calls": 2} and wrapped.calls == 2  # the inner aggregator's
    fresh = on_sum_scale(CountingMean())
    fresh.load_state_dict(wrapped.state_dict())
    assert fresh.inner.calls == 2
    assert on_sum_scale(CAGrad(c=0.7)).c == 0.7  # attributes read through


@pytest.mark.parametrize("level", ["parameter", "representation"])
def test_sum_scale_wrapper_through_the_engine(level):
    """The engine calls ``weights(G)`` of a Gramian-based aggregator (it never forms J at representation level):
    the wrapped MGDA's gradients are T x MGDA's."""
    torch.manual_seed(0)
    enc = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh())
    heads = torch.nn.ModuleList(torch.nn.Linear(6, 1) for _ in range(3))
    x, y = torch.randn(8, 4), torch.randn(3, 8)

    def grads(agg):
        for p in enc.parameters():
            p.grad = None
        z = enc(x)
        losses = torch.stack([((h(z).squeeze(-1) - y[t]) ** 2).mean() for t, h in enumerate(heads)])
        backward(losses, list(enc.parameters()), agg, representation=z, level=level)
        return [p.grad.clone() for p in enc.parameters()]

    ref, out = grads(MGDA()), grads(on_sum_scale(MGDA()))
    for r, o in zip(ref, out, strict=True):
        torch.testing.assert_close(o, 3 * r, rtol=1e-5, atol=1e-7)  # float32 engine, same weights up to the factor
