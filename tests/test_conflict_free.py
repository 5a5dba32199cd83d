"""ConFIG (mtlkit/aggregation/conflict_free.py, registered "conflict_free"): the authors' formula, its properties.

Tolerance for comparing two updates: ``aggregation_asserts.update_tol(J, 2)``, i.e. ``max(1e-8, 4·(P+T)·eps·κ²)``
with κ the condition number of J on its range: our update goes through the Gramian (cosine matrix ``C = U Uᵀ``,
condition κ(U)²), the references through U itself, and both round ``U⁺1`` and the length.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import aggregation_asserts as aa
from mtlkit.aggregation.conflict_free import ConFIG
from mtlkit.errors import ConfigError
from mtlkit.methods import build_method

FAMILIES = ("random", "conflicting", "duplicated", "zero_row", "rank_deficient", "non_conflicting", "tiny", "huge")


def _official(J: np.ndarray, solve: str = "lstsq") -> np.ndarray:
    """The authors' ``ConFIG_update`` (tum-pbs/ConFIG, ``conflictfree/grad_operator.py``, EqualWeight and
    ProjectionLength), re-implemented plainly in NumPy: unit rows (zero rows stay 0), ``g_u`` the minimum-norm
    least-squares solution of ``U g = 1`` (their ``torch.linalg.lstsq``; ``solve="pinv"``: torchjd's ``pinv(U) @ 1``),
    normalised, then scaled by the sum of the projections ``Σ_i g_iᵀ ĝ_u``."""
    norms = np.linalg.norm(J, axis=1, keepdims=True)
    U = np.divide(J, norms, out=np.zeros_like(J), where=norms > 0)
    ones = np.ones(J.shape[0])
    g = np.linalg.lstsq(U, ones, rcond=None)[0] if solve == "lstsq" else np.linalg.pinv(U) @ ones
    n = np.linalg.norm(g)
    unit = g / n if n > 0 else np.zeros_like(g)
    return float((J @ unit).sum()) * unit


def _official_two(g1: np.ndarray, g2: np.ndarray) -> np.ndarray:
    """The authors' two-task form (``ConFIG_update_double``): ``g_v = U(U(O(g_1, g_2)) + U(O(g_2, g_1)))`` with
    ``O(a, b) = b - (aᵀb/||a||²) a``, and the update ``(g_1ᵀg_v + g_2ᵀg_v) g_v``."""

    def unit(v: np.ndarray) -> np.ndarray:
        return v / np.linalg.norm(v)

    def orth(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return b - (a @ b) / (a @ a) * a

    gv = unit(unit(orth(g1, g2)) + unit(orth(g2, g1)))
    return float(g1 @ gv + g2 @ gv) * gv


def _rel(a: torch.Tensor | np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


# ------------------------------------------------------------------------------------------ the authors' formula
@pytest.mark.parametrize("solve", ["lstsq", "pinv"])
def test_matches_the_authors_formula(solve):
    """Same update as the official code (lstsq) and torchjd (pinv) on every family, T up to 50, float64.
    Measured: max relative difference 4.4e-13 (conflicting, T = 50)."""
    worst = 0.0
    for fam in FAMILIES:
        for T in aa.TASK_COUNTS:
            J = aa.make_family(fam, T, 0, torch.float64)
            ref = _official(J.numpy(), solve)
            err = _rel(ConFIG()(J), ref)
            assert err <= aa.update_tol(J, 2), (fam, T, err)
            worst = max(worst, err)
    assert worst < 1e-11


def test_torchjd_example():
    """torchjd's ConFIG docstring example gives tensor([0.1588, 2.0706, 2.0706])."""
    d = ConFIG()(torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]]))
    torch.testing.assert_close(d, torch.tensor([0.1588, 2.0706, 2.0706]), rtol=0, atol=5e-5)


def test_two_tasks_equal_the_authors_closed_form():
    """For two non-parallel gradients the pseudo-inverse form equals the official two-task shortcut."""
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        J = torch.randn(2, 7, generator=g, dtype=torch.float64)
        J[0] *= 5.0
        ref = _official_two(J[0].numpy(), J[1].numpy())
        assert _rel(ConFIG()(J), ref) <= aa.update_tol(J, 2)


# ------------------------------------------------------------------------------------------------- properties
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_equal_cosines_and_no_conflict_on_independent_gradients(dtype):
    """Linearly independent unit gradients: ``U g_u = 1``, so every task has the same cosine with the update (the
    paper's equal direction weights) and it is positive: ``⟨g_i, d⟩ > 0`` for all i. Cosines agree to update_tol."""
    for fam in ("random", "conflicting", "non_conflicting"):
        for T in aa.TASK_COUNTS:
            J = aa.make_family(fam, T, 0, dtype)
            d = ConFIG()(J).double()
            J64 = J.double()
            cos = (J64 @ d) / (J64.norm(dim=1) * d.norm())
            assert (cos > 0).all(), (fam, T)
            assert float(cos.max() - cos.min()) <= aa.update_tol(J, 2) * float(cos.max()), (fam, T)


def test_length_is_the_sum_of_the_projections():
    """``||d|| = Σ_i g_iᵀ d / ||d||``: the paper's length rule."""
    for fam in ("random", "conflicting", "rank_deficient"):
        for T in (2, 3, 10):
            J = aa.make_family(fam, T, 0, torch.float64)
            d = ConFIG()(J)
            n = float(d.norm())
            assert abs(n - float((J @ d).sum()) / n) <= 1e-12 * float(J.norm(dim=1).sum()), (fam, T)


def test_sum_scale_linearity_and_permutations():
    g = torch.randn(9, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for T in (2, 3, 5):
        torch.testing.assert_close(ConFIG()(g.repeat(T, 1)), T * g, rtol=1e-12, atol=0)  # T identical rows: T·g
    J = aa.make_family("conflicting", 5, 0, torch.float64)
    d = ConFIG()(J)
    for s in (2.0**-20, 2.0**20):  # powers of 2: sJ is exact, so is the scaling of the update
        torch.testing.assert_close(ConFIG()(s * J), s * d, rtol=1e-14, atol=0)
    for perm in aa.permutations(5):
        torch.testing.assert_close(ConFIG()(J[perm]), d, rtol=aa.update_tol(J, 2), atol=0)


def test_zero_gradient_is_ignored():
    """A zero row has a zero unit vector: it takes no part in the direction and adds 0 to the length."""
    J = aa.make_family("random", 4, 0, torch.float64)
    Jz = torch.cat([J[:1], torch.zeros(1, J.shape[1], dtype=J.dtype), J[1:]])
    torch.testing.assert_close(ConFIG()(Jz), ConFIG()(J), rtol=aa.update_tol(J, 2), atol=0)
    assert torch.equal(ConFIG()(torch.zeros(3, 4)), torch.zeros(4))


def test_opposite_gradients_give_a_zero_update():
    """``g_2 = -c·g_1``: 1 is orthogonal to the range of U, ``U⁺1 = 0``; the update is 0, not normalised round-off."""
    g = torch.randn(6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for dtype in (torch.float64, torch.float32):
        J = torch.stack([g, -3.0 * g]).to(dtype)
        assert torch.equal(ConFIG()(J), torch.zeros(6, dtype=dtype))


# -------------------------------------------------------------------------------------------------- registry
def test_registered_as_conflict_free_without_options():
    m = build_method("conflict_free")
    assert isinstance(m.aggregator, ConFIG) and m.aggregator.gramian_based and m.aggregator.scale == "sum"
    assert type(build_method("conflict_free", scale="sum").aggregator) is ConFIG  # already on the sum scale
    with pytest.raises(ConfigError, match="weights"):
        build_method("conflict_free", weights=[1.0, 2.0])


# ------------------------------------------------------------------------------------------------------ training
def test_trains_through_the_trainer(tmp_path):
    from mtlkit.config import RunConfig
    from mtlkit.train import Trainer

    cfg = RunConfig.from_dict(
        {
            "dataset": {"name": "_toy"},
            "model": {"name": "hps", "options": {"encoder": "mlp", "hidden": [16], "head_hidden": 8}},
            "train": {"epochs": 3, "batch_size": 32, "lr": 0.01, "seed": 0, "progress": False},
            "method": {"name": "conflict_free"},
            "output": {"dir": str(tmp_path / "run"), "tensorboard": False},
        }
    )
    result = Trainer(cfg).fit()
    first, last = result.history[0], result.history[-1]
    for task in ("a", "b"):
        assert last[f"train/{task}/loss"] < first[f"train/{task}/loss"]
    assert all(np.isfinite(v) for v in result.test.values())
    assert (tmp_path / "run" / "results.json").exists()
