"""Edge cases of the Gramian-based aggregators: the rank cut-off of Aligned-MTL and IMTL-G on rank-deficient and
ill-conditioned inputs in float32 and float64, Nash-MTL's equation at every scale, GradVac's moving average.

Right answer for a rank-deficient Jacobian (duplicated, triplicated or linearly dependent tasks, or T > P): the
method's formula on the exact rank-r spectrum of the data, computed here in float64 from the SVD of the stored J
(``J = U S Wᵀ``, top r), never from a Gramian. For IMTL-G with duplicated tasks this is also the deduplicated
Jacobian's update (tested). Inputs whose small eigenvalue is far below the dtype's resolution (a 1e-6 perturbation
in float32) are rank-deficient in that dtype; those far above it (1e-3 and 1e-6 in float64, 1e-2 in float32) are
full rank and their right answer keeps every eigenvalue.

Tolerance: ``4 · κ_r · cut / λ_max``, with ``κ_r = λ_max / λ_r`` the condition number of the retained spectrum and
``cut = 2 · (eps · tr G + T · eps64 · λ_max)`` (the formula ``rank_cutoff`` documents, eps of the input's dtype), a
bound on the round-off of the computed G and of the float64 eigensolver. To first order a perturbation δG moves
the weights by about ``κ_r · ||δG|| / λ_max`` relative at most; the 4 covers the constants. Over the 864
(case, method) pairs of the tests below the error reached 0.08x this tolerance in float32 and 0.12x in float64.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mtlkit.aggregation import IMTLG, AlignedMTL, GradVac, NashMTL
from mtlkit.aggregation._solvers import eigh, to_numpy
from mtlkit.aggregation.nash_mtl import _RIDGE
from mtlkit.methods import build_method

E64 = float(np.finfo(np.float64).eps)
F32, F64 = torch.float32, torch.float64


# ----------------------------------------------------------------------------------------------------- families
def _base(T: int, P: int, gen: torch.Generator) -> torch.Tensor:
    """Correlated tasks (a shared component of random weight) with norms within a factor e² of each other."""
    J = torch.randn(T, P, generator=gen, dtype=F64)
    J = J + 2.0 * float(torch.rand(1, generator=gen)) * torch.randn(P, generator=gen, dtype=F64)
    return J * torch.exp(2 * torch.rand(T, 1, generator=gen, dtype=F64) - 1)


def _family(name: str, T: int, P: int, seed: int, dtype: torch.dtype) -> tuple[torch.Tensor, int]:
    """``(J in dtype, r)``: the input and its structural rank (a near-duplicate counted as a duplicate)."""
    gen = torch.Generator().manual_seed(seed)
    # near-duplicates on independent rows of similar norms, so that the pair's small eigenvalue is ~e²/4 · λ_max
    J = torch.randn(T, P, generator=gen, dtype=F64) if name.startswith("near") else _base(T, P, gen)
    deps = 1
    if name == "dup":
        J[1] = J[0]
    elif name == "dup3":
        J[1] = J[0]
        J[2] = J[0]
        deps = 2
    elif name == "dup_ulp":  # a task computed twice: the copy differs by at most one ulp per entry
        J = J.to(F32)
        ulp = torch.finfo(F32).eps * torch.randint(-1, 2, (P,), generator=gen).to(F32)
        J[1] = J[0] * (1 + ulp)
        J = J.to(F64)
    elif name == "dep":  # row 3 = row 1 + row 2 (rounded in the dtype: not exactly dependent in float32)
        J[2] = J[0] + J[1]
    elif name == "dep2":
        J[2] = J[0] + J[1]
        J[3] = J[0] - 2 * J[1]
        deps = 2
    elif name.startswith("near"):  # row 2 = row 1 + e·||row 1||·(random unit vector)
        e = float(name[4:])
        d = torch.randn(P, generator=gen, dtype=F64)
        J[1] = J[0] + e * J[0].norm() * d / d.norm()  # r below: that of the exact duplicate
    elif name == "wide":  # more tasks than parameters
        deps = 0
    else:
        raise ValueError(name)
    return J.to(dtype), min(T - deps, P)


def _ill(T: int, P: int, seed: int, kappa_J: float, dtype: torch.dtype) -> torch.Tensor:
    """Full row rank, singular values log-spaced from 1 to 1/kappa_J (cond(G) = kappa_J²)."""
    gen = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(T, T, generator=gen, dtype=F64))
    W, _ = torch.linalg.qr(torch.randn(P, T, generator=gen, dtype=F64))
    s = torch.logspace(0, -float(np.log10(kappa_J)), T, dtype=F64)
    return ((U * s) @ W.T).to(dtype)


# ----------------------------------------------------------------------------------------------------- reference
def _cut(lam: np.ndarray, dtype: torch.dtype) -> float:
    """The round-off level of the module docstring, ``2 · (eps · Σ|λ| + T · eps64 · max|λ|)`` (written out here so
    that the tolerance does not come from the code under test; ``rank_cutoff`` documents the same formula)."""
    eps = max(float(torch.finfo(dtype).eps), E64)
    return 2.0 * (eps * float(np.abs(lam).sum()) + lam.size * E64 * float(np.abs(lam).max()))


def _reference(J: torch.Tensor, r: int) -> dict:
    """Aligned-MTL's and IMTL-G's updates on the exact rank-r spectrum of the stored J (float64 SVD), the condition
    number of that spectrum and the tolerance of the module docstring."""
    X = J.to(F64).numpy()
    T = X.shape[0]
    U, s, _ = np.linalg.svd(X, full_matrices=False)
    lam = np.zeros(T)
    lam[: len(s)] = s**2
    U, s = U[:, :r], s[:r]
    aligned = s[-1] * (U / s) @ (U.T @ np.ones(T))  # B 1 = σ_r · U_r S_r⁻¹ U_rᵀ 1
    v = (U / s**2) @ (U.T @ np.linalg.norm(X, axis=1))  # G_r⁺ √diag(G)
    kappa = float(s[0] ** 2 / s[-1] ** 2)
    tol = 4.0 * kappa * _cut(lam, J.dtype) / float(lam.max())
    return {"aligned_mtl": aligned @ X, "imtl_g": (v / v.sum()) @ X, "kappa": kappa, "tol": tol, "lam": lam}


AGGS = {"aligned_mtl": AlignedMTL, "imtl_g": IMTLG}


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _check(cases, label_fmt: str, max_tol: float) -> None:
    """Run both methods through the public API on each ``(label, J, r)`` and compare with the reference."""
    fails, n = [], 0
    for label, J, r in cases:
        ref = _reference(J, r)
        assert ref["tol"] <= max_tol, f"{label}: the case is too ill-conditioned to test (tol {ref['tol']:.2g})"
        for name, make in AGGS.items():
            n += 1
            got = make()(J).to(F64).numpy()
            err = _rel(got, ref[name])
            if not err <= ref["tol"]:
                fails.append(f"{name} {label}: error {err:.3g} > tol {ref['tol']:.3g} (kappa_r {ref['kappa']:.3g})")
    assert not fails, f"{len(fails)} of {n} cases wrong ({label_fmt}):\n" + "\n".join(fails[:25])


# ------------------------------------------------------------------------------------ rank-deficient inputs
RANK_DEFICIENT = {
    F32: ["dup", "dup3", "dup_ulp", "dep", "dep2", "near1e-6", "wide"],
    F64: ["dup", "dup3", "dep", "dep2", "wide"],
}


def _deficient_cases(dtype):
    for fam in RANK_DEFICIENT[dtype]:
        for T in (2, 3, 5, 10, 20):
            if (fam in ("dup3", "dep") and T < 3) or (fam == "dep2" and T < 4):
                continue
            for P in (10,) if fam == "wide" else (10, 100, 1000):
                if (fam == "wide") != (T > P) or (fam != "wide" and P < 2 * T):  # P ~ T: ill-conditioned by chance
                    continue
                for seed in (0, 1, 2):
                    J, r = _family(fam, T, P, seed, dtype)
                    assert r < T
                    yield f"{fam} T={T} P={P} seed={seed}", J, r


@pytest.mark.parametrize("dtype", [F32, F64], ids=["float32", "float64"])
def test_rank_deficient_inputs_give_the_exact_rank_answer(dtype):
    """Duplicated, 1-ulp-duplicated (float32), triplicated, dependent (one or two relations), nearly duplicated below
    the dtype's resolution (1e-6 in float32) and T > P: the update is the formula on the exact rank-r spectrum.

    Before the cut-off followed the dtype, float32 round-off eigenvalues passed the float64-eps cut and the update
    collapsed or was garbage: 128 of these 402 (float32 case, method) pairs were wrong, and 2 of the 246 float64
    ones (SciPy's round-off eigenvalue above ``T · eps64 · λ_max``)."""
    _check(_deficient_cases(dtype), str(dtype), max_tol=0.05)


def test_float64_spurious_eigenvalue_above_the_old_cut_is_dropped():
    """float64: the round-off eigenvalue of a duplicated or dependent task can land just above ``T · eps64 · λ_max``
    (NumPy's rule, the former cut-off). Three of the 22 such cases among 2700 float64 ones (these families, seeds
    0-59): before, Aligned-MTL's update was off by 100 % and IMTL-G's by 0.6-100 %."""
    cases = []
    for fam, T, P, seed in [("dep", 3, 100, 18), ("dup", 5, 1000, 27), ("dup3", 3, 1000, 32)]:
        J, r = _family(fam, T, P, seed, F64)
        lam, _ = eigh(to_numpy(J @ J.T))
        assert lam[T - r - 1] > T * E64 * lam.max(), "no longer above the old cut-off: pick another case"
        cases.append((f"{fam} T={T} P={P} seed={seed}", J, r))
    _check(cases, "float64, above the old cut", max_tol=1e-6)


def test_imtlg_with_duplicated_tasks_is_the_deduplicated_update():
    """IMTL-G's condition (equal projections on every unit gradient) is the same with a task repeated, and Σα = 1
    sums the copies' weights, so the update of [g1, g1, g2, ...] is that of [g1, g2, ...], in both dtypes."""
    fails = []
    for dtype in (F32, F64):
        for T in (3, 5, 10):
            for P in (10, 100, 1000):
                for seed in (0, 1):
                    J, r = _family("dup", T, P, seed, dtype)
                    dedup = J[1:]
                    ref = _reference(dedup, r)
                    got = IMTLG()(J).to(F64).numpy()
                    if not _rel(got, ref["imtl_g"]) <= ref["tol"]:
                        fails.append(f"{dtype} T={T} P={P} seed={seed}: {_rel(got, ref['imtl_g']):.3g}")
    assert not fails, fails


# ----------------------------------------------------------------------------------------------- full rank
def test_near_duplicates_above_the_resolution_keep_full_rank():
    """A genuine small eigenvalue well above the dtype's round-off is kept: near-duplicates at 1e-3 and 1e-6 in
    float64, 1e-2 in float32 (the right answer is then the full-rank one; for Aligned-MTL it is a much shorter
    update, as the method prescribes)."""
    cases = []
    for dtype, fams in ((F64, ("near1e-3", "near1e-6")), (F32, ("near1e-2",))):
        for fam in fams:
            for T in (2, 3, 5):
                for P in (100, 1000):
                    for seed in (0, 1, 2):
                        J, _ = _family(fam, T, P, seed, dtype)
                        cases.append((f"{dtype} {fam} T={T} P={P} seed={seed}", J, T))
    _check(cases, "near-duplicates, full rank", max_tol=0.25)


def test_ill_conditioned_full_rank_inputs_are_accurate():
    """Full row rank with cond(G) up to 9e4 (float32) and 1e10 (float64): every eigenvalue kept and resolved to the
    tolerance (mtlkit solves the eigenproblem in float64 even for float32 G)."""
    cases = []
    for dtype, kappas in ((F32, (30, 100, 300)), (F64, (100, 1e3, 1e5))):
        for kappa in kappas:
            for T in (2, 3, 5, 10, 20):
                for P in (100, 1000):
                    cases.append((f"{dtype} kappa_J={kappa:g} T={T} P={P}", _ill(T, P, T + P, kappa, dtype), T))
    _check(cases, "ill-conditioned", max_tol=0.25)


def test_float32_genuine_eigenvalue_near_the_noise_floor_is_kept():
    """cond(G) = 1e6 in float32: the smallest eigenvalue, 8.4 eps32 · λ_max, lies 2-4x above the cut-off and 7-14x
    above the round-off measured for P ≤ 1e3 (0.6 eps32 · tr G), so it is kept. The tolerance of the module docstring
    is vacuous here; instead the update must be 4x closer to the full-rank answer than dropping the eigenvalue would
    put it (that distance is at least 20 % here, checked). A cut of ``T · eps32 · λ_max`` (LibMTL's, torchjd's)
    drops it for T ≥ 9."""
    fails = []
    for T in (2, 3, 5, 10, 20):
        for P in (100, 1000):
            for seed in (0, 1):
                J = _ill(T, P, seed, 1e3, F32)
                full, reduced = _reference(J, T), _reference(J, T - 1)
                assert full["lam"].min() >= 2 * _cut(full["lam"], F32)
                for name, make in AGGS.items():
                    gap = _rel(reduced[name], full[name])  # what dropping the eigenvalue changes
                    assert gap >= 0.1
                    err = _rel(make()(J).to(F64).numpy(), full[name])
                    if not err <= gap / 4:
                        fails.append(f"{name} T={T} P={P} seed={seed}: {err:.3g} (dropping it: {gap:.3g})")
    assert not fails, fails


def test_float32_near_duplicates_at_the_resolution_give_one_of_the_two_answers():
    """1e-3 near-duplicates in float32: the genuine eigenvalue (~e²/4 · λ ≈ 2 eps32 · λ_max) is as large as the
    cut-off, so either rank is a legitimate reading of the data. The update must be one of the two answers; kept,
    its small eigenvalue carries G's round-off (≤ 0.6 eps32 · tr G measured, against ≥ 2 eps32 · tr G when kept):
    ≤ 30 % on the eigenvalue, hence 0.3 on the update."""
    fails = []
    for T in (2, 3, 5, 10):
        for P in (10, 100, 1000):
            for seed in (0, 1, 2):
                J, _ = _family("near1e-3", T, P, seed, F32)
                lo, hi = _reference(J, min(T - 1, P)), _reference(J, min(T, P))
                for name, make in AGGS.items():
                    got = make()(J).to(F64).numpy()
                    err = min(_rel(got, lo[name]), _rel(got, hi[name]))
                    if not err <= 0.3:
                        fails.append(f"{name} T={T} P={P} seed={seed}: {err:.3g}")
    assert not fails, fails


# ------------------------------------------------------------------------------------------------- cut-off
def test_rank_cutoff_follows_dtype_and_scale():
    from mtlkit.aggregation._solvers import rank_cutoff

    lam = np.array([-1e-12, 0.0, 3e-9, 0.25, 1.0])
    c64, c32 = rank_cutoff(lam, F64), rank_cutoff(lam, F32)
    assert c64 == pytest.approx(2 * E64 * (np.abs(lam).sum() + 5 * 1.0))
    assert c32 == pytest.approx(2 * (torch.finfo(F32).eps * np.abs(lam).sum() + 5 * E64))
    assert rank_cutoff(lam) == c64 == rank_cutoff(lam, np.float64)
    assert rank_cutoff(lam, np.float32) == c32
    assert rank_cutoff(lam, torch.int64) == c64  # integer G is exact; float64 rounding only
    assert rank_cutoff(1e8 * lam, F32) == pytest.approx(1e8 * c32)  # relative to G's scale
    assert rank_cutoff(np.array([]), F32) == 0.0
    assert 3e-9 > c64 and 3e-9 < c32  # resolved in float64, round-off in float32


def test_pinvh_and_aligned_keep_the_top_eigenvalue_in_half_precision():
    """bfloat16 with T = 100 orthonormal tasks: 2·eps·tr(G) exceeds λ_max, the largest eigenvalue is still kept."""
    from mtlkit.aggregation._solvers import pinvh

    J = torch.eye(100, dtype=torch.bfloat16)
    for agg in (AlignedMTL(), IMTLG()):
        d = agg(J)
        assert torch.isfinite(d).all() and d.float().norm() > 0
    P = pinvh(np.eye(100), torch.bfloat16)  # cut 1.56 > λ = 1: one direction kept
    assert np.isfinite(P).all() and np.trace(P) == pytest.approx(1.0)
    np.testing.assert_allclose(pinvh(np.diag([4.0, 0.5]), np.float16), np.diag([0.25, 2.0]))


# -------------------------------------------------------------------------------------------------- Nash-MTL
def _nash_cases():
    for T in (2, 3, 5, 10):
        for seed in range(3):
            gen = torch.Generator().manual_seed(100 * T + seed)
            J = torch.randn(T, 20, generator=gen, dtype=F64) * torch.exp(torch.randn(T, 1, generator=gen, dtype=F64))
            J[-1] -= 0.7 * J[0]  # a conflicting pair
            yield f"T={T} seed={seed}", J @ J.T


@pytest.mark.parametrize("scale", [1e-6, 1.0, 1e6])
def test_nash_default_solves_the_papers_equation(scale):
    """Default weights solve Navon et al.'s ``G α = 1/α`` (not ``G α = ||G||_F / α``) at any scale of G.

    Bound: the solver stops when ``||(G/n)β - 1/β|| <= tol·||1/β||`` on ``G/n + ridge·I`` (n = ||G||_F, ridge 1e-8)
    and returns ``α = β/√n``, so ``r = Gα - 1/α`` has ``||r|| <= tol·||1/α|| + ridge·n·||α||``; elementwise
    ``|α_i (Gα)_i - 1| = α_i |r_i| <= α_i ||r||``, plus the float64 rounding of ``Gα`` (x2 for safety)."""
    for label, G in _nash_cases():
        G = scale * G
        agg = NashMTL()
        a = agg.weights(G).numpy()
        Gn = G.numpy()
        assert (a > 0).all(), label
        n = float(np.linalg.norm(Gn))
        r_bound = agg.tol * np.linalg.norm(1 / a) + _RIDGE * n * np.linalg.norm(a)
        rounding = 4 * len(a) * E64 * n * np.abs(a).sum()
        lhs = np.abs(a * (Gn @ a) - 1.0)
        assert (lhs <= 2 * a * (r_bound + rounding)).all(), (label, lhs.max())
        # the update has norm √T whatever the scale (αᵀGα = Σ α_i (Gα)_i = T)
        assert abs(a @ Gn @ a / len(a) - 1.0) <= 2 * np.abs(a).max() * (r_bound + rounding) * np.sqrt(len(a)), label


def test_nash_weights_scale_as_one_over_sqrt_of_the_gramian():
    """α(sG) = α(G)/√s: both solves run on G/||G||_F (equal up to rounding); they may still stop one Newton step
    apart, i.e. up to ``2 · max(α)² · tol · ||1/α||`` apart (the residual bound times ``||H⁻¹|| <= max(α)²``)."""
    for label, G in _nash_cases():
        agg = NashMTL()
        a = agg.weights(G).numpy()
        bound = 2 * a.max() ** 2 * agg.tol * np.linalg.norm(1 / a) + 1e-13 * a.max()
        for s in (1e-6, 1e6):
            b = NashMTL().weights(s * G).numpy()
            assert np.abs(b * np.sqrt(s) - a).max() <= bound, label


def test_nash_normalize_option_is_sqrt_frobenius_times_the_paper():
    """``normalize=True`` returns ``√||G||_F`` times the default weights: it solves ``(G/||G||_F) β = 1/β``; its
    update is homogeneous of degree 1 in the gradients (``||update||² = T·||G||_F``)."""
    for label, G in _nash_cases():
        for s in (1e-6, 1.0, 1e6):
            Gs = s * G
            n = float(torch.linalg.norm(Gs))
            a, b = NashMTL().weights(Gs).numpy(), NashMTL(normalize=True).weights(Gs).numpy()
            np.testing.assert_allclose(b, np.sqrt(n) * a, rtol=1e-12, err_msg=label)
            # βᵀGβ = n(T - ridge·||β||² + βᵀr): the ridge 1e-8 and the stopping residual
            slack = (_RIDGE * b @ b + 2 * np.linalg.norm(b) * 1e-9 * np.linalg.norm(1 / b)) / len(b) + 1e-12
            assert abs(b @ Gs.numpy() @ b / (len(b) * n) - 1.0) <= slack, label


def test_nash_registered_default_and_warm_start_follow_the_paper():
    """``build_method('nash_mtl')`` uses the paper's equation; warm-started later steps (stored weights rescaled into
    the solver's units) still solve it, and a step with reused weights returns them unchanged."""
    agg = build_method("nash_mtl", update_weights_every=2).aggregator
    assert agg.normalize is False
    Gs = [G for _, G in _nash_cases() if G.shape[0] == 3]
    for k, G in enumerate(Gs[:3]):
        G = 10.0 ** (3 * k) * G  # the scale changes between steps
        a = agg.weights(G).numpy()
        reused = agg.weights(G).numpy()
        assert np.array_equal(a, reused)
        assert np.abs(a * (G.numpy() @ a) - 1).max() < 1e-6


# --------------------------------------------------------------------------------------------------- GradVac
def test_gradvac_target_follows_the_cosine_at_every_step():
    """Eq. (3) is applied to every pair at every step, also when no edit is made (cosine above its target): a
    target starting at 0 rises toward a positive cosine (early LibMTL only updated it inside the edit branch,
    where it could only fall)."""
    J = torch.tensor([[1.0, 0.2], [0.6, 1.0]], dtype=F64)  # cosine > 0 = initial target: no edit
    cos = float(J[0] @ J[1] / (J[0].norm() * J[1].norm()))
    agg = GradVac(beta=0.25)
    assert torch.allclose(agg(J), J.sum(0))
    targets = agg.state_dict()["targets"]
    assert torch.allclose(targets, torch.tensor([[0.0, 0.25 * cos], [0.25 * cos, 0.0]], dtype=F64))
