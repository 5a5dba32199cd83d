"""Samples with only some task labels (issue 18, item 6): the label mask of a split, the masked task losses, and
aggregators restricted to the tasks present in a batch.

* :func:`mtlkit.data.drop_labels` and the ``label_fraction_removed`` option of MultiMNIST/census: exact counts per
  task, reproducible in the seed, independent across tasks, training split only, recorded in ``info``.
* :func:`mtlkit.tasks.masked_losses`: each task's loss over its labelled rows (against an independent computation,
  for every task kind and a custom loss), exactly :func:`~mtlkit.tasks.stack_losses` with every row labelled, a
  task without labelled rows: loss 0, count 0 and an all-zero gradient row.
* :meth:`mtlkit.aggregation.Aggregator.restricted`, for every registered method (native and sum scale): at the first
  call it equals a fresh aggregator run on the present rows only; for stateful ones, after a full call, it equals a
  fresh aggregator loaded with the present tasks' slice of the state (through the public ``load_state_dict``),
  writes the updated slice back and leaves the absent tasks' state as it was; a later full call works.

Tolerances: two computations of the same quantity in float64 by different roundings (e.g. a λ renormalised to the
present tasks, 1/T' against (1/T)/(T'/T)) agree to a few hundred ulps of the terms summed, so updates are compared
with ``atol = 1e4·eps·D``, ``D = Σ_t ||g_t||`` (the scale of the terms, as in ``aggregation_asserts``); solvers run
the same deterministic steps on the same inputs, so that bound covers them too.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtlkit._registry import DATASETS
from mtlkit.aggregation import MGDA, Aggregator, GradDrop, MoCo, MoDo, NashMTL, SDMGrad, SumScale
from mtlkit.aggregation._base import Restricted, on_sum_scale
from mtlkit.aggregation.gradvac import GradVac
from mtlkit.aggregation.modo import MoDoSampler
from mtlkit.data import Split, build_dataset, drop_labels
from mtlkit.engine.autodiff import per_task_grads, stack
from mtlkit.errors import ConfigError
from mtlkit.methods import available_methods, build_method
from mtlkit.nn.losses import focal_bce, sample_level_loss
from mtlkit.tasks import Task, masked_losses, stack_losses
from mtlkit.weighting.dbmtl import DBMTLAggregator

EPS = torch.finfo(torch.float64).eps


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ================================================================================================ drop_labels
def _split(n: int, keys: tuple[str, ...] = ("a", "b")) -> Split:
    return Split(torch.zeros(n, 2), {k: torch.arange(n) % 3 for k in keys})


def test_drop_labels_removes_exactly_the_stated_count_per_task_and_keeps_the_targets():
    s = _split(1001)
    d = drop_labels(s, 0.3, seed=0)
    assert d.mask is not None and set(d.mask) == {"a", "b"}
    for m in d.mask.values():
        assert m.dtype == torch.bool and m.shape == (1001,)
        assert int((~m).sum()) == round(0.3 * 1001)  # 300
    assert d.labelled_counts() == {"a": 701, "b": 701}
    assert d.y is s.y and d.x is s.x  # values of unlabelled rows stay (same tensors, same dtype)
    e = drop_labels(s, {"b": 0.75}, seed=0)
    assert e.mask is not None and set(e.mask) == {"b"} and int(e.mask["b"].sum()) == 1001 - round(0.75 * 1001)
    assert drop_labels(s, 0.0, seed=0).mask is None  # nothing removed: the complete-label path
    assert drop_labels(s, {"a": 0.0}, seed=0).mask is None


def test_drop_labels_is_reproducible_in_the_seed_and_independent_across_tasks():
    s = _split(10_000)
    a, b, c = drop_labels(s, 0.5, seed=3), drop_labels(s, 0.5, seed=3), drop_labels(s, 0.5, seed=4)
    assert a.mask is not None and b.mask is not None and c.mask is not None
    for k in ("a", "b"):
        assert torch.equal(a.mask[k], b.mask[k])
        assert not torch.equal(a.mask[k], c.mask[k])
    # Independent draws: the rows unlabelled for both tasks follow the hypergeometric law of two independent
    # 5000-of-10000 draws: mean 2500, sd = sqrt(k·(k/N)·(1-k/N)·(N-k)/(N-1)) ≈ 25; identical draws give 5000.
    both = int((~a.mask["a"] & ~a.mask["b"]).sum())
    assert abs(both - 2500) < 6 * 25, both
    # A task's draw depends on its name and the seed, not on the other tasks of the split.
    alone = drop_labels(_split(10_000, ("b",)), 0.5, seed=3)
    assert alone.mask is not None and torch.equal(alone.mask["b"], a.mask["b"])


def test_drop_labels_keeps_existing_masks_and_subset_carries_them():
    s = _split(100)
    first = drop_labels(s, {"a": 0.5}, seed=0)
    second = drop_labels(first, 0.5, seed=1)
    assert first.mask is not None and second.mask is not None
    assert not bool((second.mask["a"] & ~first.mask["a"]).any())  # removed labels stay removed
    assert second.labelled_counts() == {"a": 50 - 25, "b": 50}
    idx = torch.tensor([3, 1, 4, 1, 5])
    sub = second.subset(idx)
    assert sub.mask is not None and torch.equal(sub.mask["a"], second.mask["a"][idx])
    assert s.subset(idx).mask is None


@pytest.mark.parametrize("bad", [1.0, -0.1, float("nan"), "0.5", True, None, {"a": 1.0}, {"c": 0.1}])
def test_drop_labels_rejects_bad_fractions(bad):
    with pytest.raises(ConfigError, match=r"label_fraction_removed|unknown task"):
        drop_labels(_split(10), bad, seed=0)


def test_split_masks_are_checked_and_bad_seeds_raise():
    with pytest.raises(ConfigError, match="bool tensor of shape"):
        Split(torch.zeros(3, 1), {"a": torch.zeros(3)}, {"a": torch.ones(3)})
    with pytest.raises(ConfigError, match="bool tensor of shape"):
        Split(torch.zeros(3, 1), {"a": torch.zeros(3)}, {"a": torch.ones(2, dtype=torch.bool)})
    with pytest.raises(ConfigError, match="without targets"):
        Split(torch.zeros(3, 1), {"a": torch.zeros(3)}, {"b": torch.ones(3, dtype=torch.bool)})
    with pytest.raises(ConfigError, match="seed"):
        drop_labels(_split(10), 0.5, seed=1.5)  # type: ignore[arg-type]


# ========================================================================================= dataset option
def test_every_builder_with_partial_labels_lists_the_option_and_checks_it_before_building():
    for name in ("multimnist", "multifashion", "multifashionmnist", "census"):
        assert DATASETS.get(name).options["label_fraction_removed"].default == 0.0, name
    # checked before anything is loaded or built (these would take minutes otherwise)
    with pytest.raises(ConfigError, match="in \\[0, 1\\)"):
        build_dataset("multimnist", label_fraction_removed=1.0)
    with pytest.raises(ConfigError, match="unknown task"):
        build_dataset("multifashion", label_fraction_removed={"middle": 0.1})
    with pytest.raises(ConfigError, match="in \\[0, 1\\)"):
        build_dataset("census", label_fraction_removed={"income": 1.5})


@pytest.mark.data("mnist")
def test_multimnist_option_removes_training_labels_only_and_records_them():
    spec = {"n_train": 200, "n_test": 100, "seed": 2}
    full = build_dataset("multimnist", **spec)
    d = build_dataset("multimnist", label_fraction_removed=0.25, **spec)
    n = len(d.train)
    assert n == len(full.train) == 180  # 10 % of n_train is validation
    assert d.train.mask is not None and set(d.train.mask) == {"left", "right"}
    kept = n - round(0.25 * n)
    assert d.train.labelled_counts() == {"left": kept, "right": kept}
    assert d.val.mask is None and d.test.mask is None and full.train.mask is None
    for k in ("left", "right"):  # the images and every label value are those of the complete build
        assert torch.equal(d.train.y[k], full.train.y[k])
    assert torch.equal(d.train.x, full.train.x)
    assert d.info["label_fraction_removed"] == {"left": 0.25, "right": 0.25}
    assert d.info["labels_kept"] == {"left": kept, "right": kept}
    assert full.info["labels_kept"] == {"left": n, "right": n}
    one = build_dataset("multimnist", label_fraction_removed={"right": 0.5}, **spec)
    assert one.train.mask is not None and set(one.train.mask) == {"right"}
    assert one.info["labels_kept"] == {"left": n, "right": n - round(0.5 * n)}


@pytest.mark.data("census")
def test_census_option_removes_training_labels_only_and_records_them():
    d = build_dataset("census", n_train=1000, label_fraction_removed={"income": 0.3}, seed=1)
    assert d.train.mask is not None and set(d.train.mask) == {"income"}
    assert d.train.labelled_counts() == {"income": 700, "marital": 1000}
    assert d.val.mask is None and d.test.mask is None
    assert d.info["label_fraction_removed"] == {"income": 0.3, "marital": 0.0}
    assert d.info["labels_kept"] == {"income": 700, "marital": 1000}


# ========================================================================================= masked_losses
B = 12
KINDS: dict[str, Task] = {
    "c": Task("c", "multiclass", 5),
    "b": Task("b", "binary"),
    "m": Task("m", "multilabel", 3),
    "r": Task("r", "regression"),
}


def _reference(kind: str, out: Tensor, y: Tensor) -> Tensor:
    """Each default loss written out (not through torch.nn.functional's loss functions)."""
    if kind == "multiclass":
        return -out.log_softmax(dim=1).gather(1, y[:, None]).mean()
    if kind in ("binary", "multilabel"):
        z, t = out.reshape(y.shape), y.to(out.dtype)
        return (t * F.softplus(-z) + (1 - t) * F.softplus(z)).mean()
    return ((out.reshape(y.shape) - y) ** 2).mean()


def _batch(seed: int = 0) -> tuple[nn.Module, Tensor, dict[str, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    net = nn.Linear(4, 5 + 1 + 3 + 1).double()
    x = torch.randn(B, 4, generator=g, dtype=torch.float64)
    y = {
        "c": torch.randint(0, 5, (B,), generator=g),
        "b": torch.randint(0, 2, (B,), generator=g),
        "m": torch.randint(0, 2, (B, 3), generator=g),
        "r": torch.randn(B, generator=g, dtype=torch.float64),
    }
    return net, x, y


def _outputs(net: nn.Module, x: Tensor) -> dict[str, Tensor]:
    o = net(x)
    return {"c": o[:, :5], "b": o[:, 5:6], "m": o[:, 6:9], "r": o[:, 9]}


def _masks(seed: int = 1) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k in KINDS:
        m = torch.rand(B, generator=g) < 0.5
        m[0], m[2] = True, False  # some rows labelled, some not
        out[k] = m
    return out


def test_masked_losses_average_each_task_over_its_labelled_rows_for_every_kind():
    net, x, y = _batch()
    masks = _masks()
    garbage = {  # unlabelled rows' targets that a loss reading them would choke on or be changed by
        "c": torch.where(masks["c"], y["c"], torch.full_like(y["c"], 999)),
        "b": torch.where(masks["b"], y["b"], torch.full_like(y["b"], 7)),
        "m": torch.where(masks["m"][:, None], y["m"], torch.full_like(y["m"], 5)),
        "r": torch.where(masks["r"], y["r"], torch.full_like(y["r"], float("nan"))),
    }
    tasks = list(KINDS.values())
    losses, counts = masked_losses(tasks, _outputs(net, x), garbage, masks)
    out = _outputs(net, x)
    for i, (k, t) in enumerate(KINDS.items()):
        m = masks[k]
        ref = _reference(t.kind, out[k][m], y[k][m])
        # the default BCE and MSE cast the targets with .float(): computed to float32's precision
        eps = EPS if t.kind == "multiclass" else torch.finfo(torch.float32).eps
        assert torch.allclose(losses[i], ref, rtol=64 * eps, atol=0), (k, losses[i].item(), ref.item())
        assert int(counts[i]) == int(m.sum())
    assert counts.dtype == torch.int64 and counts.shape == (len(tasks),)
    assert torch.isfinite(per_task_grads(losses, list(net.parameters()))).all()


def test_masked_losses_with_every_row_labelled_is_stack_losses():
    net, x, y = _batch()
    tasks = list(KINDS.values())
    ref = stack_losses(tasks, _outputs(net, x), y)
    every = {k: torch.ones(B, dtype=torch.bool) for k in KINDS}
    for masks in (None, every, {"c": every["c"]}, {}):
        losses, counts = masked_losses(tasks, _outputs(net, x), y, masks)
        assert torch.equal(losses, ref), masks
        assert counts.tolist() == [B] * len(tasks)
    partial = {"r": _masks()["r"]}  # a key left out: that task is fully labelled
    losses, counts = masked_losses(tasks, _outputs(net, x), y, partial)
    assert torch.equal(losses[:3], ref[:3]) and counts.tolist() == [B, B, B, int(partial["r"].sum())]


def test_a_task_without_labelled_rows_has_loss_zero_count_zero_and_a_zero_gradient_row():
    net, x, y = _batch()
    tasks = list(KINDS.values())
    masks = _masks()
    masks["m"] = torch.zeros(B, dtype=torch.bool)
    y = {**y, "m": torch.full_like(y["m"], -3)}  # never read
    losses, counts = masked_losses(tasks, _outputs(net, x), y, masks)
    assert losses.detach()[2].item() == 0.0 and int(counts[2]) == 0 and losses.requires_grad
    params = list(net.parameters())
    J = per_task_grads(losses, params)
    assert torch.isfinite(J).all() and torch.equal(J[2], torch.zeros_like(J[2]))
    out = _outputs(net, x)
    for i in (0, 1, 3):  # the other rows: the gradients of the subset losses
        k = list(KINDS)[i]
        alone = per_task_grads(stack([tasks[i].compute_loss(out[k][masks[k]], y[k][masks[k]])]), params)[0]
        assert torch.allclose(J[i], alone, rtol=0, atol=64 * EPS * float(alone.abs().max())), k
    # an output holding inf (a diverged head): the empty-slice zero stays 0, no NaN
    out = _outputs(net, x)
    out["m"] = out["m"] + torch.tensor(float("inf"), dtype=torch.float64)
    losses, _ = masked_losses(tasks, out, y, masks)
    assert losses.detach()[2].item() == 0.0


def test_auxiliary_heads_use_the_mask_of_the_labels_they_read_and_custom_losses_see_labelled_rows():
    net, x, y = _batch()
    masks = _masks()
    adv = Task("adv_c", "multiclass", 5, auxiliary=True, target="c")  # RRMTDL's adversarial heads
    focal = Task("b", "binary", loss=sample_level_loss(beta=2.0))  # MTMLAN's sample-level loss
    out = _outputs(net, x)
    outputs = {"adv_c": out["c"].flip(1), "b": out["b"]}
    losses, counts = masked_losses([adv, focal], outputs, y, masks)
    mc, mb = masks["c"], masks["b"]
    ref = _reference("multiclass", outputs["adv_c"][mc], y["c"][mc])
    assert torch.allclose(losses[0], ref, rtol=64 * EPS, atol=0)
    focal_ref = focal_bce(out["b"][mb], y["b"][mb], beta=2.0)  # float32: the loss casts integer targets so
    assert torch.allclose(losses[1], focal_ref.to(losses.dtype), rtol=64 * torch.finfo(torch.float32).eps, atol=0)
    assert counts.tolist() == [int(mc.sum()), int(mb.sum())]


def test_bad_masks_raise():
    net, x, y = _batch()
    tasks = [KINDS["c"]]
    for bad in (torch.ones(B), torch.ones(B - 1, dtype=torch.bool), torch.ones(B, 1, dtype=torch.bool)):
        with pytest.raises(ValueError, match="label mask of 'c'"):
            masked_losses(tasks, _outputs(net, x), y, {"c": bad})


# ========================================================================================= restricted aggregators
T, P = 4, 7
PRESENT = torch.tensor([True, False, True, True])
IDX = PRESENT.nonzero().flatten()

#: Methods whose aggregator keeps per-task state but defines no restriction yet (restricted raises ConfigError).
#: Extra configurations: other code paths of the stateful and per-task-option methods.
EXTRA = [
    ("sdmgrad", {"solver": "pgd"}),
    ("nash_mtl", {"update_weights_every": 2}),
    ("nash_mtl", {"normalize": True, "max_norm": 1.0}),
    ("moco", {"init": "zero"}),
    ("moco", {"beta": 0.3, "gamma": 2.0, "gamma_sigma": 0.0, "rho": 0.1}),
    ("modo", {"gamma": 2.0}),
    ("graddrop", {"leak": [0.1, 0.5, 0.9, 0.3]}),
    ("gradvac", {"beta": 0.5}),
    ("mgda", {"solver": "frank_wolfe"}),
]


def _cases() -> list[tuple[str, dict, str]]:
    out = []
    for name, opts in [(n, {}) for n in available_methods()] + EXTRA:
        out.append((name, opts, "native"))
        try:
            if type(build_method(name, scale="sum", **opts).aggregator) is not type(
                build_method(name, **opts).aggregator
            ):
                out.append((name, opts, "sum"))
        except ConfigError:  # fixed-norm methods (Nash-MTL) cannot be put on the sum scale
            pass
    return out


CASES = _cases()
IDS = [f"{n}{'-' + '-'.join(f'{k}={v}' for k, v in o.items()) if o else ''}-{s}" for n, o, s in CASES]


def _make(name: str, opts: dict, scale: str) -> Aggregator:
    return build_method(name, scale=scale, **opts).aggregator  # type: ignore[arg-type]


def _J(seed: int, rows: int = T) -> Tensor:
    return torch.randn(rows, P, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _tol(J: Tensor) -> float:
    return 1e4 * EPS * float(J.norm(dim=1).sum())


def _core(agg: Aggregator) -> Aggregator:
    return agg.inner if isinstance(agg, SumScale) else agg


@pytest.mark.parametrize("name, opts, scale", CASES, ids=IDS)
def test_restricted_at_the_first_call_is_the_method_on_the_present_rows(name, opts, scale):
    J = _J(0)
    agg = _make(name, opts, scale)
    assert agg.restricted(torch.ones(T, dtype=torch.bool)) is agg  # every task present: the aggregator itself
    if isinstance(_core(agg), GradDrop) and "leak" in opts:  # per-task options: the present tasks' ones
        ref = on_sum_scale(GradDrop(leak=[opts["leak"][i] for i in IDX.tolist()]))  # GradDrop: sum scale already
    else:
        ref = _make(name, opts, scale)
    sub = agg.restricted(PRESENT)
    for flag in ("gramian_based", "needs_per_task_grads", "permutation_equivariant", "default_level", "scale"):
        assert getattr(sub, flag) == getattr(agg, flag), flag
    update = sub(J[PRESENT])
    expected = ref(J[PRESENT])
    assert update.shape == (P,) and torch.isfinite(update).all()
    assert float(update.norm()) > 0  # random rows: no method's update vanishes (an absent zero row would, MGDA's)
    assert torch.allclose(update, expected, rtol=0, atol=_tol(J[PRESENT])), (update, expected)
    if scale == "sum":  # the sum scale multiplies by the number of rows given (T'), not by T
        native = _make(name, opts, "native").restricted(PRESENT)(J[PRESENT])
        assert torch.allclose(update, len(IDX) * native, rtol=0, atol=len(IDX) * _tol(J[PRESENT]))
    if agg.gramian_based:  # the engine's path without J: weights from the present block of G
        Gp = (J @ J.T)[PRESENT][:, PRESENT]
        w = _make(name, opts, scale).restricted(PRESENT).weights(Gp)
        w_expected = _make(name, opts, scale).weights(Gp)
        assert w.shape == (len(IDX),) and torch.isfinite(w).all()
        assert torch.allclose(w, w_expected, rtol=0, atol=1e4 * EPS * float(w_expected.abs().sum()))
    # a full call afterwards works
    after = agg(_J(1))
    assert after.shape == (P,) and torch.isfinite(after).all()


# --- stateful methods: a reference loaded with the present tasks' slice through the public state API ----------
def _simplex_part(v: Tensor) -> tuple[Tensor, float]:
    part = v[IDX].to(torch.float64)
    mass = float(part.sum())
    return (part / mass if mass > 0 else torch.full((len(IDX),), 1.0 / len(IDX), dtype=torch.float64)), mass


def _slice_state(agg: Aggregator, state: dict) -> dict:
    """The state a fresh aggregator on the present tasks should start from (the class docstrings' rules)."""
    core = _core(agg)
    if isinstance(core, MoCo):
        return {"y": state["y"][IDX].clone(), "lam": _simplex_part(state["lam"])[0], "step": state["step"]}
    if isinstance(core, MoDo):
        return {"lam": _simplex_part(state["lam"])[0], "step": state["step"]}
    if isinstance(core, NashMTL):
        return {"alpha": state["alpha"][IDX].clone(), "step": state["step"]}
    if isinstance(core, GradVac):
        return {"generator": state["generator"].clone(), "targets": state["targets"][IDX][:, IDX].clone()}
    if isinstance(core, SDMGrad):
        return {"w": _simplex_part(state["w"])[0]}
    if isinstance(core, DBMTLAggregator):  # once it defines a restriction: its EMA rows of the present tasks
        return {"grad_buffer": state["grad_buffer"][IDX].clone(), "step": state["step"]}
    raise AssertionError(f"{type(core).__name__} is stateful: give this test its slicing rule")


def _check_written_back(agg: Aggregator, before: dict, after: dict, ref_after: dict) -> None:
    """Absent tasks' state unchanged; present tasks' state = the reference's (simplex parts scaled by their mass)."""
    core, absent = _core(agg), (~PRESENT).nonzero().flatten()
    close = {"rtol": 0.0, "atol": 1e4 * EPS}
    if isinstance(core, (MoCo, MoDo, SDMGrad)):
        key = "w" if isinstance(core, SDMGrad) else "lam"
        _, mass = _simplex_part(before[key])
        assert torch.equal(after[key][absent], before[key][absent])
        assert torch.allclose(after[key][IDX], ref_after[key] * mass, **close)
        assert abs(float(after[key].sum()) - 1.0) < 1e3 * EPS and bool((after[key] >= 0).all())
    if isinstance(core, MoCo):
        assert torch.equal(after["y"][absent], before["y"][absent])
        assert torch.allclose(after["y"][IDX], ref_after["y"], rtol=0, atol=1e4 * EPS * float(before["y"].abs().max()))
    if isinstance(core, DBMTLAggregator):
        assert torch.equal(after["grad_buffer"][absent], before["grad_buffer"][absent])
        assert torch.allclose(after["grad_buffer"][IDX], ref_after["grad_buffer"], rtol=0, atol=1e4 * EPS * 4)
    if isinstance(core, NashMTL):
        assert torch.equal(after["alpha"][absent], before["alpha"][absent])
        assert torch.allclose(after["alpha"][IDX], ref_after["alpha"], rtol=1e4 * EPS)
    if isinstance(core, GradVac):
        t, r = after["targets"], ref_after["targets"]
        assert torch.equal(t[absent], before["targets"][absent]) and torch.equal(
            t[:, absent], before["targets"][:, absent]
        )
        assert torch.allclose(t[IDX][:, IDX], r, rtol=0, atol=1e4 * EPS)
        assert torch.equal(after["generator"], ref_after["generator"])  # the same draws, from the same generator
    for k in ("step",):
        if k in after:
            assert after[k] == ref_after[k]


STATEFUL = []
for _c, _i in zip(CASES, IDS, strict=True):
    _a = _make(*_c)
    _a(_J(9))
    if set(_a.state_dict()) - {"generator"}:
        STATEFUL.append(pytest.param(*_c, id=_i))


def test_the_stateful_cases_are_those_the_brief_names():
    names = {p.values[0] for p in STATEFUL}
    assert names == {"dbmtl", "gradvac", "moco", "modo", "nash_mtl", "sdmgrad"}, names


@pytest.mark.parametrize("name, opts, scale", STATEFUL)
def test_restricted_stateful_methods_update_only_the_present_tasks_state(name, opts, scale):
    agg = _make(name, opts, scale)
    for s in range(3):  # some history, with conflicting rows so that the state moves
        agg(_J(10 + s) * torch.tensor([1.0, -1.0, 2.0, 0.5], dtype=torch.float64)[:, None])
    before = copy.deepcopy(agg.state_dict())
    ref = _make(name, opts, "native")
    ref.load_state_dict(_slice_state(agg, before))
    ref = on_sum_scale(ref) if scale == "sum" else ref
    J = _J(20)
    sub = agg.restricted(PRESENT)
    assert isinstance(sub, Restricted) or isinstance(_core(sub), Restricted)
    update = sub(J[PRESENT])
    expected = ref(J[PRESENT])
    assert torch.isfinite(update).all() and float(update.norm()) > 0
    assert torch.allclose(update, expected, rtol=0, atol=_tol(J[PRESENT])), (update, expected)
    _check_written_back(agg, before, agg.state_dict(), ref.state_dict())
    # the Gramian path writes back as well (the engine's call for Gramian-based methods)
    if agg.gramian_based:
        before = copy.deepcopy(agg.state_dict())
        ref = _make(name, opts, "native")
        ref.load_state_dict(_slice_state(agg, before))
        ref = on_sum_scale(ref) if scale == "sum" else ref
        G = (J @ J.T)[PRESENT][:, PRESENT]
        w = agg.restricted(PRESENT).weights(G)
        assert torch.allclose(w, ref.weights(G), rtol=0, atol=1e4 * EPS * len(IDX))
        _check_written_back(agg, before, agg.state_dict(), ref.state_dict())
    after = agg(_J(21))  # a full call afterwards works
    assert after.shape == (P,) and torch.isfinite(after).all()


def test_moco_rows_of_tasks_never_present_start_at_their_gradient_or_zero():
    J0, J1 = _J(0), _J(1)
    agg = MoCo(beta=0.5, beta_sigma=0.0)
    agg.restricted(PRESENT)(J0[PRESENT])
    y = agg.state_dict()["y"]
    assert torch.isnan(y[1]).all() and torch.equal(y[IDX], J0[IDX])  # init="grad": row 1 not initialised yet
    out = agg(J1)
    y = agg.state_dict()["y"]
    assert torch.isfinite(out).all() and torch.isfinite(y).all()
    assert torch.allclose(y[1], J1[1], rtol=0, atol=4 * EPS * float(J1.abs().max()))  # starts at its gradient
    assert torch.allclose(y[IDX], J0[IDX] + 0.5 * (J1[IDX] - J0[IDX]), rtol=0, atol=8 * EPS * 4)
    zero = MoCo(beta=0.5, beta_sigma=0.0, init="zero")
    zero.restricted(PRESENT)(J0[PRESENT])
    assert torch.equal(zero.state_dict()["y"][1], torch.zeros(P, dtype=torch.float64))


def test_nash_entries_never_solved_are_solved_before_they_are_reused():
    agg = NashMTL(update_weights_every=3)
    agg.restricted(PRESENT)(_J(0)[PRESENT])  # step 0: solves the present tasks
    assert np.isnan(agg.state_dict()["alpha"][1].item())
    out = agg(_J(1))  # step 1 would reuse α: task 1 has none, so it solves
    alpha = agg.state_dict()["alpha"]
    assert torch.isfinite(out).all() and torch.isfinite(alpha).all()
    G = _J(1) @ _J(1).T  # the bargaining equation G α = 1/α holds for the step's Gramian
    assert torch.allclose(G @ alpha, 1.0 / alpha, rtol=1e-6)


def test_modo_uses_the_present_block_of_the_cross_gramian_and_consumes_it():
    C = _J(3) @ _J(4).T
    agg, ref = MoDo(gamma=1.0), MoDo(gamma=1.0)
    agg.set_cross_gramian(C)
    ref.set_cross_gramian(C[PRESENT][:, PRESENT])
    J = _J(5)[PRESENT]
    assert torch.allclose(agg.restricted(PRESENT)(J), ref(J), rtol=0, atol=_tol(J))
    assert agg._cross is None  # consumed by the step, as a full call does


def test_mgda_without_an_absent_tasks_zero_row_is_not_zero():
    J = _J(0)
    J[1] = 0.0  # what masked_losses gives an absent task
    assert torch.equal(MGDA()(J), torch.zeros(P, dtype=torch.float64))  # the min-norm point of a hull with 0
    d = MGDA().restricted(PRESENT)(J[PRESENT])
    assert float(d.norm()) > 0
    # and it is MGDA's optimum on the present tasks: ⟨g_i, d⟩ ≥ ||d||² for each of them
    assert bool(((J[PRESENT] @ d) >= float(d @ d) * (1 - 1e-9)).all())


def test_restricted_checks_its_mask_and_the_state_size():
    for bad in (torch.tensor([1, 0, 1]), torch.ones(2, 2, dtype=torch.bool), torch.zeros(3, dtype=torch.bool)):
        with pytest.raises(ValueError, match="present"):
            MGDA().restricted(bad)
    for agg in (NashMTL(), MoCo(), MoDo(), GradVac(), SDMGrad(solver="pgd")):
        agg(_J(0))
        with pytest.raises(ValueError, match=r"present has 3 entries"):
            agg.restricted(torch.tensor([True, False, True]))
    with pytest.raises(ValueError, match="3 leak values"):
        GradDrop(leak=[0.1, 0.2, 0.3]).restricted(PRESENT)


class _Stateful(Aggregator):
    """A user's aggregator with per-task state and no restriction rule."""

    scale = "sum"

    def aggregate(self, J: Tensor) -> Tensor:
        return J.sum(0)

    def state_dict(self) -> dict:
        return {"ema": torch.zeros(T)}


def test_a_stateful_aggregator_without_a_restriction_rule_says_so():
    with pytest.raises(ConfigError, match="does not define how a batch"):
        _Stateful().restricted(PRESENT)
    agg = _Stateful()
    assert agg.restricted(torch.ones(T, dtype=torch.bool)) is agg  # every task present: the aggregator itself


# ========================================================================================= MoDo's extra samples
def test_modo_sampler_reads_only_labelled_rows_of_its_extra_batches():
    g = torch.Generator().manual_seed(0)
    n = 40
    x = torch.randn(n, 3, generator=g)
    labels = {"a": torch.randint(0, 3, (n,), generator=g), "b": torch.full((n,), 999)}  # b: never labelled
    train = Split(x, labels, {"b": torch.zeros(n, dtype=torch.bool)})

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.enc, self.ha, self.hb = nn.Linear(3, 4), nn.Linear(4, 3), nn.Linear(4, 3)

        def forward(self, x: Tensor) -> dict[str, Tensor]:
            z = self.enc(x)
            return {"a": self.ha(z), "b": self.hb(z)}

        def shared_parameters(self) -> list[Tensor]:
            return list(self.enc.parameters())

    modo = MoDo()
    trainer = SimpleNamespace(
        method=SimpleNamespace(aggregator=modo, level="parameter", name="modo"),
        data=SimpleNamespace(train=train),
        cfg=SimpleNamespace(train=SimpleNamespace(batch_size=8, seed=0)),
        model=Net(),
        train_tasks=[Task("a", "multiclass", 3), Task("b", "multiclass", 3)],
    )
    MoDoSampler().on_losses(trainer, SimpleNamespace(step=0))  # type: ignore[arg-type]
    C = modo._cross
    assert C is not None and np.isfinite(C).all()
    assert C[0, 0] != 0 and not C[1].any() and not C[:, 1].any()  # task b: zero gradients on both samples
