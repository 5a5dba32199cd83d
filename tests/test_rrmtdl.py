"""RRMTDL: gradient reversal, DANN schedule, entangled-label protocol, the model, and the trainer hooks it uses."""

from __future__ import annotations

import json
import math
from itertools import pairwise
from typing import ClassVar

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from mtlkit.config import RunConfig
from mtlkit.data import MTLData, Split
from mtlkit.data.entangled import EntangledSpec, agreement_rate, entangle, sample_cells
from mtlkit.errors import ConfigError, DataError
from mtlkit.metrics import evaluate_outputs, selection_score
from mtlkit.models.base import MTLModel, register_model
from mtlkit.models.hps import MLPEncoder
from mtlkit.models.rrmtdl import RRMTDL, adversarial_name
from mtlkit.nn.gradient_reversal import GradientReversal, dann_lambda, grad_reverse
from mtlkit.tasks import Task, stack_losses
from mtlkit.train import Trainer

# --- gradient reversal and schedule ---------------------------------------------------------------------------


@pytest.mark.parametrize("lam", [0.0, 0.3, 1.0, 2.5])
def test_grl_is_identity_forward_and_minus_lambda_backward(lam):
    torch.manual_seed(0)
    x = torch.randn(4, 3, requires_grad=True)
    upstream = torch.randn(4, 3)
    y = grad_reverse(x, lam)
    assert torch.equal(y, x)
    (y * upstream).sum().backward()
    assert torch.allclose(x.grad, -lam * upstream)
    # module form, with lambda changed between calls
    g = GradientReversal(1.0)
    g.lam = lam
    x2 = x.detach().clone().requires_grad_(True)
    (g(x2) * upstream).sum().backward()
    assert torch.allclose(x2.grad, -lam * upstream)


def test_grl_rejects_bad_lambda():
    with pytest.raises(ConfigError, match="coefficient"):
        grad_reverse(torch.zeros(1), -1.0)
    with pytest.raises(ConfigError, match="coefficient"):
        grad_reverse(torch.zeros(1), float("nan"))


def test_dann_schedule_end_points_and_monotone():
    assert dann_lambda(0.0) == 0.0
    assert dann_lambda(1.0) == pytest.approx(2 / (1 + math.exp(-10)) - 1)
    assert 0.9999 <= dann_lambda(1.0) < 1.0
    ps = np.linspace(0, 1, 21)
    vals = [dann_lambda(p) for p in ps]
    assert all(b > a for a, b in pairwise(vals))
    assert dann_lambda(1.0, scale=0.5) == pytest.approx(0.5 * dann_lambda(1.0))
    for bad in (-0.1, 1.1):
        with pytest.raises(ConfigError, match="progress"):
            dann_lambda(bad)


# --- entangled-label protocol ---------------------------------------------------------------------------------


def _pool(n, seed):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 2, n)
    b = rng.integers(0, 2, n)
    return torch.arange(n, dtype=torch.float32).unsqueeze(1), {"A": a, "B": b, "C": rng.integers(0, 2, n)}


def test_spec_defaults_are_the_papers_counts():
    s = EntangledSpec()
    assert s.train_counts() == {(1, 1): 4000, (0, 0): 2000, (1, 0): 1000, (0, 1): 1000}
    assert sum(s.test_counts().values()) == 8000 and s.test_counts()[(1, 1)] == s.test_counts()[(0, 0)] == 0


@pytest.mark.parametrize("agreement,n_train", [(0.5, 120), (0.75, 80), (0.9, 100), (1.0, 30), (0.75, 7)])
def test_entangled_split_has_exact_counts_and_rates(agreement, n_train):
    spec = EntangledSpec(n_train=n_train, agreement=agreement, n_val=40, n_test=61)
    pools = {"train": _pool(2000, 1), "val": _pool(2000, 2), "test": _pool(2000, 3)}
    d = entangle("toy", pools, ("A", "B"), spec, seed=0, extra_tasks=("C",))
    assert [t.name for t in d.tasks] == ["A", "B", "C"]
    want = spec.train_counts()
    assert sum(want.values()) == n_train
    got = d.info["counts"]["train"]
    assert got == {f"{i}{j}": want[(i, j)] for i, j in want}
    # the realised agreement is the requested one up to rounding to whole samples
    assert abs(agreement_rate(d.train.y["A"].numpy(), d.train.y["B"].numpy()) - agreement) <= 0.5 / n_train + 1e-12
    assert d.info["agreement"]["test"] == 0.0 and d.info["agreement"]["val_reversed"] == 0.0
    assert len(d.test) == 61 and int((d.test.y["A"] == d.test.y["B"]).sum()) == 0
    assert d.info["counts"]["test"] == {"11": 0, "00": 0, "10": 31, "01": 30}
    # validation: training-like and test-like, disjoint samples of the validation pool
    assert len(d.val) == 40 and d.info["counts"]["val"] == {f"{i}{j}": v for (i, j), v in spec.train_counts(40).items()}
    ids_val = set(d.val.x[:, 0].tolist())
    ids_rev = set(d.info["val_reversed"].x[:, 0].tolist())
    assert not ids_val & ids_rev
    # no sample is drawn twice and labels match the pool
    assert len(set(d.train.x[:, 0].tolist())) == n_train
    idx = d.train.x[:, 0].long().numpy()
    assert np.array_equal(d.train.y["A"].numpy(), pools["train"][1]["A"][idx])


def test_entangled_errors_when_pool_too_small():
    a = np.array([1, 1, 0, 0, 1])
    b = np.array([1, 0, 0, 1, 1])
    with pytest.raises(DataError, match=r"\(A=1, B=1\).*3 are needed"):
        sample_cells(a, b, {(1, 1): 3}, np.random.default_rng(0))
    pools = {"train": _pool(50, 1), "val": _pool(50, 2), "test": _pool(50, 3)}
    with pytest.raises(DataError, match="test"):
        entangle("toy", pools, ("A", "B"), EntangledSpec(n_train=10, n_val=4, n_test=200))
    with pytest.raises(ValueError, match="binary"):
        sample_cells(np.array([2, 0]), np.array([1, 0]), {(1, 1): 1}, np.random.default_rng(0))
    with pytest.raises(ConfigError, match="agreement"):
        EntangledSpec(agreement=1.5)
    with pytest.raises(ConfigError, match="attribute 'Z'"):
        entangle("toy", pools, ("A", "Z"), EntangledSpec(n_train=4, n_val=4, n_test=4))


# --- the model --------------------------------------------------------------------------------------------------


def _tasks():
    return [Task("a", "binary"), Task("b", "binary")]


def _model(**kw):
    torch.manual_seed(0)
    return RRMTDL(MLPEncoder((5,), (8,), batch_norm=True), _tasks(), branch_width=6, proj_width=4, **kw)


def test_inference_uses_target_heads_only_and_aux_tasks_are_auxiliary():
    m = _model()
    x = torch.randn(6, 5)
    assert set(m.train()(x)) == {"a", "b", adversarial_name("a", "b"), adversarial_name("b", "a")}
    assert set(m.eval()(x)) == {"a", "b"}
    aux = m.auxiliary_tasks()
    assert [t.target_key for t in aux] == ["b", "a"] and all(t.auxiliary for t in aux)


def test_adversarial_gradient_on_branch_is_reversed_and_scaled():
    m = _model(lambda_schedule="constant", grl_scale=1.0)
    m.train()
    x = torch.randn(8, 5)
    y = torch.randint(0, 2, (8,))
    name = adversarial_name("a", "b")
    task = next(t for t in m.auxiliary_tasks() if t.name == name)
    branch = m.branches[0][0].weight

    def grad(lam, reverse=True):
        m.grl.lam = lam
        m.zero_grad()
        h = m.branches[0](m.encode(x))
        r = m.adv_proj[0](m.grl(h) if reverse else h)
        task.compute_loss(m.adv_heads[name](r), y).backward()
        return branch.grad.clone(), m.adv_heads[name].weight.grad.clone()

    plain, head_plain = grad(1.0, reverse=False)
    g1, head1 = grad(1.0)
    g05, _ = grad(0.5)
    assert plain.abs().sum() > 0
    assert torch.allclose(g1, -plain, atol=1e-6)  # the branch unlearns the misleading task
    assert torch.allclose(g05, -0.5 * plain, atol=1e-6)
    assert torch.allclose(head1, head_plain, atol=1e-6)  # the adversarial head itself learns it normally


def test_progress_hook_sets_dann_or_constant_lambda():
    m = _model()
    assert m.grl_lambda == 0.0
    m.on_train_progress(0.3)
    assert m.grl_lambda == pytest.approx(dann_lambda(0.3))
    c = _model(lambda_schedule="constant", grl_scale=0.7)
    c.on_train_progress(0.9)
    assert c.grl_lambda == pytest.approx(0.7)
    with pytest.raises(ConfigError, match="progress"):
        m.on_train_progress(1.5)


def test_bad_groups_are_rejected():
    enc = MLPEncoder((5,), (8,))
    with pytest.raises(ConfigError, match="unknown task 'z'"):
        RRMTDL(enc, _tasks(), groups=[{"target": ["a"], "misleading": ["z"]}, {"target": ["b"]}])
    with pytest.raises(ConfigError, match=r"\['b'\] are the target of no group"):
        RRMTDL(enc, _tasks(), groups=[{"target": ["a"], "misleading": ["b"]}])
    with pytest.raises(ConfigError, match="both target and misleading"):
        RRMTDL(enc, _tasks(), groups=[{"target": ["a", "b"], "misleading": ["a"]}])
    with pytest.raises(ConfigError, match="unknown key"):
        RRMTDL(enc, _tasks(), groups=[{"target": ["a", "b"], "auxilary": ["a"]}])
    with pytest.raises(ConfigError, match="lambda_schedule must be one of 'dann', 'constant', 'zero'"):
        RRMTDL(enc, _tasks(), lambda_schedule="linear")  # type: ignore[arg-type]


# --- auxiliary tasks in metrics ---------------------------------------------------------------------------------


def test_auxiliary_tasks_are_trained_but_never_selected_or_reported():
    a, aux = Task("a", "binary"), Task("adv", "binary", auxiliary=True, target="b")
    out = {"a": torch.tensor([5.0, -5.0]), "adv": torch.tensor([-5.0, 5.0])}
    y = {"a": torch.tensor([1, 0]), "b": torch.tensor([1, 0])}
    losses = stack_losses([a, aux], out, y)  # the auxiliary head is trained on b's labels
    assert losses[1] > losses[0]
    res = evaluate_outputs([a, aux], out, y)
    assert set(res) == {"a/accuracy"}
    assert selection_score([a, aux], {"a/accuracy": 0.25, "adv/accuracy": 1.0}) == 0.25
    with pytest.raises(ValueError, match="non-auxiliary"):
        selection_score([aux], {"adv/accuracy": 1.0})


# --- trainer hooks (generic) ------------------------------------------------------------------------------------


def _toy_data(n=48, d=5):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g)
    ya = (x[:, 0] > 0).long()
    yb = (x[:, 1] > 0).long()
    s = Split(x, {"a": ya, "b": yb})
    return MTLData("toy", _tasks(), s, s.subset(torch.arange(16)), s.subset(torch.arange(16, 32)))


class _ProgressRecorder(MTLModel):
    """A plain model that only declares the generic hook (no RRMTDL code involved)."""

    seen: ClassVar[list[float]] = []

    def __init__(self, data):
        super().__init__()
        self.encoder = nn.Linear(data.input_shape[0], 4)
        self.heads = nn.ModuleDict({t.name: nn.Linear(4, 1) for t in data.tasks})

    def decode(self, z):
        return {k: h(z) for k, h in self.heads.items()}

    def on_train_progress(self, p: float) -> None:
        type(self).seen.append(p)


register_model("_test_progress_recorder")(lambda data: _ProgressRecorder(data))


def _cfg(model, options=None, epochs=2):
    return RunConfig.from_dict(
        {
            "model": {"name": model, "options": options or {}},
            "train": {"epochs": epochs, "batch_size": 16, "device": "cpu", "progress": False},
            "output": {"tensorboard": False},
        }
    )


def test_trainer_calls_progress_hook_every_step(tmp_path):
    _ProgressRecorder.seen = []
    Trainer(_cfg("_test_progress_recorder", epochs=3), _toy_data(), tmp_path / "run").fit()
    seen = _ProgressRecorder.seen
    assert len(seen) == 3 * 3  # 48 samples / 16 per batch x 3 epochs
    assert seen[0] == 0.0 and all(b > a for a, b in pairwise(seen)) and seen[-1] < 1.0
    assert seen == pytest.approx([i / 9 for i in range(9)])


def test_rrmtdl_trains_with_batchnorm_in_train_mode_and_reports_targets_only(tmp_path):
    opts = {"encoder": "mlp", "hidden": [8], "branch_width": 6, "proj_width": 4}
    trainer = Trainer(_cfg("rrmtdl", opts), _toy_data(), tmp_path / "run")
    bns = [m for m in trainer.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert bns
    flags: list[bool] = []
    for bn in bns:
        bn.register_forward_hook(lambda mod, inp, out: flags.append(mod.training) if torch.is_grad_enabled() else None)
    before = [bn.running_mean.clone() for bn in bns]
    lambdas: list[float] = []
    trainer.model.register_forward_pre_hook(lambda mod, inp: lambdas.append(mod.grl_lambda) if mod.training else None)
    res = trainer.fit()
    assert flags and all(flags)  # every gradient-enabled forward ran BatchNorm in train mode
    assert all(not torch.equal(b, bn.running_mean) for b, bn in zip(before, bns, strict=True))
    assert lambdas[0] == 0.0 and lambdas[-1] == pytest.approx(dann_lambda(5 / 6))
    assert not any(k.startswith("adv[") for k in res.test) and "a/accuracy" in res.test
    assert any(k.startswith("train/adv[") for k in res.history[0])


# --- real data (fetched on first use: tests/conftest.py) ------------------------------------------------------


@pytest.mark.data("mnist", "fashion")
def test_entangled_images_real_pool():
    # the Multi-(Fashion+MNIST) pool is built from the two source datasets and cached (seconds, once)
    from mtlkit.data import build_dataset

    d = build_dataset("entangled_images", pair="ge5_footwear", n_train=300, n_val=100, n_test=200)
    assert d.info["agreement"]["train"] == 0.75 and d.info["agreement"]["test"] == 0.0
    assert d.train.x.shape[1:] == (1, 36, 36)


# --- λ-schedule controls: λ = 0 (no reversed gradient) and constant λ = 1 ---------------------------------------


def _adversarial_grads(m, x, y, bypass=False):
    """Gradients of the adversarial losses alone (full training-mode forward) on every parameter; ``bypass`` swaps
    the reversal layer for the identity (the un-reversed reference)."""
    grl = m.grl
    if bypass:
        m.grl = nn.Identity()
    try:
        m.train()
        m.zero_grad(set_to_none=True)
        out = m(x)
        aux = m.auxiliary_tasks()
        sum(t.compute_loss(out[t.name], y[t.target_key]) for t in aux).backward()
    finally:
        m.grl = grl
    return {n: (None if p.grad is None else p.grad.clone()) for n, p in m.named_parameters()}


def _xy(n=16):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 5, generator=g)
    return x, {"a": (x[:, 0] > 0).long(), "b": (x[:, 1] > 0).long()}


def _is_upstream_of_grl(name):
    return name.startswith(("encoder.", "branches."))


def test_lambda_zero_sends_no_reversed_gradient_into_branch_or_trunk():
    m = _model(lambda_schedule="zero")
    x, y = _xy()
    plain = _adversarial_grads(m, x, y, bypass=True)
    for p in (0.0, 0.3, 0.999, 1.0):  # at every training progress
        m.on_train_progress(p)
        assert m.grl_lambda == 0.0
        g = _adversarial_grads(m, x, y)
        upstream = [n for n in g if _is_upstream_of_grl(n)]
        assert upstream and all(g[n] is not None for n in upstream)  # still in the graph ...
        for n in upstream:  # ... but exactly zero: branch and shared trunk get no adversarial gradient
            assert torch.count_nonzero(g[n]) == 0, n
            assert plain[n] is not None and plain[n].abs().sum() > 0, n  # (the un-reversed gradient is not zero)
        # the adversarial heads and projections still learn their misleading task, exactly as without reversal
        adv = [n for n in g if n.startswith(("adv_heads.", "adv_proj."))]
        assert adv
        for n in adv:
            assert g[n] is not None and g[n].abs().sum() > 0, n
            assert torch.allclose(g[n], plain[n], atol=1e-7), n
        # the target path is not touched by the adversarial loss at all
        assert all(g[n] is None for n in g if n.startswith(("heads.", "target_proj.")))


def test_lambda_zero_total_gradient_on_shared_parameters_is_the_target_gradient():
    m = _model(lambda_schedule="zero")
    x, y = _xy()
    m.train()
    targets = list(m.tasks)

    def grads(with_adversarial):
        m.zero_grad(set_to_none=True)
        out = m(x)
        loss = sum(t.compute_loss(out[t.name], y[t.name]) for t in targets)
        if with_adversarial:
            loss = loss + sum(t.compute_loss(out[t.name], y[t.target_key]) for t in m.auxiliary_tasks())
        loss.backward()
        return {n: p.grad.clone() for n, p in m.named_parameters() if _is_upstream_of_grl(n)}

    full, target_only = grads(True), grads(False)
    assert all(torch.equal(full[n], target_only[n]) for n in full)
    assert m.shared_parameters() and all(
        _is_upstream_of_grl(n) for n, p in m.named_parameters() if any(p is q for q in m.shared_parameters())
    )


def test_grl_lambda_zero_is_exactly_zero_even_for_infinite_gradients():
    x = torch.ones(3, requires_grad=True)
    (grad_reverse(x, 0.0) * torch.tensor([float("inf"), -1.0, 2.0])).sum().backward()
    assert torch.equal(x.grad, torch.zeros(3)) and not torch.signbit(x.grad).any()


def test_constant_lambda_reverses_by_minus_one_at_every_progress():
    m = _model(lambda_schedule="constant")
    x, y = _xy()
    plain = _adversarial_grads(m, x, y, bypass=True)
    upstream = [n for n in plain if _is_upstream_of_grl(n)]
    for p in np.linspace(0.0, 1.0, 11):
        m.on_train_progress(float(p))
        assert m.grl_lambda == 1.0
        u = torch.randn(4, 6)
        h = torch.randn(4, 6, requires_grad=True)
        (m.grl(h) * u).sum().backward()
        assert torch.equal(h.grad, -u)  # the layer itself: exactly −1 · upstream
        g = _adversarial_grads(m, x, y)
        for n in upstream:  # through the whole model: branch and trunk get minus the un-reversed gradient
            assert torch.allclose(g[n], -plain[n], atol=1e-6), (p, n)
        for n in (k for k in g if k.startswith(("adv_heads.", "adv_proj."))):
            assert torch.allclose(g[n], plain[n], atol=1e-7), (p, n)


def test_default_schedule_is_dann_and_scales_the_reversal_by_lambda_p():
    m = _model()
    assert m.schedule == "dann"
    x, y = _xy()
    plain = _adversarial_grads(m, x, y, bypass=True)
    for p in (0.0, 0.1, 0.5, 0.9):
        m.on_train_progress(p)
        lam = dann_lambda(p)
        assert m.grl_lambda == pytest.approx(lam)
        g = _adversarial_grads(m, x, y)
        for n in (k for k in g if _is_upstream_of_grl(k)):
            assert torch.allclose(g[n], -lam * plain[n], atol=1e-6), (p, n)


def test_lambda_schedule_options_are_checked():
    enc = MLPEncoder((5,), (8,))
    with pytest.raises(ConfigError, match="no effect with lambda_schedule='zero'"):
        RRMTDL(enc, _tasks(), lambda_schedule="zero", grl_scale=0.5)
    with pytest.raises(ConfigError, match="only shapes the 'dann' schedule"):
        RRMTDL(enc, _tasks(), lambda_schedule="constant", grl_gamma=5.0)
    with pytest.raises(ConfigError, match="grl_scale >= 0"):
        RRMTDL(enc, _tasks(), grl_scale=float("nan"))
    c = RRMTDL(enc, _tasks(), lambda_schedule="constant", grl_scale=2.0)
    c.on_train_progress(0.0)
    assert c.grl_lambda == 2.0


@pytest.mark.parametrize(
    "schedule,expected", [("zero", lambda p: 0.0), ("constant", lambda p: 1.0), (None, dann_lambda)]
)
def test_lambda_schedule_is_a_model_option_read_by_the_trainer(tmp_path, schedule, expected):
    opts = {"encoder": "mlp", "hidden": [8], "branch_width": 6, "proj_width": 4}
    sets = [] if schedule is None else [f"model.options.lambda_schedule={schedule}"]  # as `--set` on the CLI
    cfg = _cfg("rrmtdl", opts, epochs=2).override(sets)
    trainer = Trainer(cfg, _toy_data(), tmp_path / "run")
    lambdas: list[float] = []
    trainer.model.register_forward_pre_hook(lambda mod, inp: lambdas.append(mod.grl_lambda) if mod.training else None)
    trainer.fit()
    progress = [i / 6 for i in range(6)]  # 48 samples / 16 per batch x 2 epochs
    assert lambdas == pytest.approx([expected(p) for p in progress])


def test_lambda_zero_control_differs_from_rrmtdl_only_by_the_reversed_gradient(tmp_path):
    """Same seed: same initial weights and batches. After one step (λ_DANN(0) = 0) the two are identical; after
    more steps they differ only because the DANN λ becomes positive."""
    opts = {"encoder": "mlp", "hidden": [8], "branch_width": 6, "proj_width": 4}
    data = _toy_data()

    def trained(schedule, epochs):  # one batch of all 48 samples per epoch: one step per epoch
        cfg = _cfg("rrmtdl", {**opts, "lambda_schedule": schedule}, epochs=epochs).override(["train.batch_size=48"])
        t = Trainer(cfg, data, tmp_path / f"{schedule}-{epochs}")
        init = {k: v.clone() for k, v in t.model.state_dict().items()}
        t.fit()  # t.model is then the validation-selected model; the last one is in the checkpoint
        last = torch.load(t.run_dir / "checkpoint.pt", map_location="cpu", weights_only=False)["model"]
        return init, last

    init_d, one_d = trained("dann", 1)
    init_z, one_z = trained("zero", 1)
    assert all(torch.equal(init_d[k], init_z[k]) for k in init_d)
    assert all(torch.equal(one_d[k], one_z[k]) for k in one_d)
    _, three_d = trained("dann", 3)
    _, three_z = trained("zero", 3)
    differ = {k for k in three_d if not torch.equal(three_d[k], three_z[k])}
    assert any(k.startswith("encoder.") for k in differ)


# --- reproduce rrmtdl: verdicts, paired differences, the new rows, --reuse -------------------------------------


def test_verdict_rule():
    from mtlkit.reproduce.rrmtdl import verdict

    assert verdict([0.02, 0.01, 0.03])[0] == "reproduced"
    assert verdict([0.02, 0.001, 0.05])[0] == "inconclusive at this budget"  # all positive, mean 2.37 <= std 2.46
    assert verdict([0.03, -0.01, 0.04])[0] == "inconclusive at this budget"  # one seed negative
    assert verdict([0.0, 0.0, 0.0])[0] == "not reproduced"
    assert verdict([-0.01, 0.02, -0.02])[0] == "not reproduced"
    assert verdict([0.05])[0] == "not testable at this budget"
    assert verdict([])[0] == "not testable at this budget"


def _toy_entangled(pair="p", agreement=0.75, seed=0, n_train=48, n_val=16, n_test=24):
    rng = np.random.default_rng(123)  # the pools are the same at every build (a real dataset's are fixed)

    def pool(n):
        a, b = rng.integers(0, 2, n), rng.integers(0, 2, n)
        x = np.concatenate([np.stack([a, b], 1) + 0.5 * rng.standard_normal((n, 2)), rng.standard_normal((n, 3))], 1)
        return torch.from_numpy(x.astype(np.float32)), {"A": a, "B": b}

    return entangle(
        "toy_entangled",
        {"train": pool(400), "val": pool(400), "test": pool(400)},
        ("A", "B"),
        EntangledSpec(n_train, agreement, 2 / 3, n_val, n_test),
        seed,
        info={"groups": None},
    )


def test_reproduce_rrmtdl_rows_paired_differences_verdicts_and_reuse(tmp_path, monkeypatch, capsys):
    import argparse

    from mtlkit.data import register_dataset
    from mtlkit.reproduce import rrmtdl as rep

    register_dataset("_test_entangled_toy")(_toy_entangled)
    toy = {
        "dataset": "_test_entangled_toy",
        "pairs": ["p"],
        "small": {"n_train": 48, "n_val": 16, "n_test": 24},
        "full": {"n_train": 64, "n_val": 16, "n_test": 24},
        "trunks": {"mlp": {"small": {"encoder": "mlp", "hidden": [8]}, "full": {"encoder": "mlp", "hidden": [8]}}},
        "trunk": "mlp",
    }
    monkeypatch.setitem(rep.SETUPS, "toy", toy)
    parser = argparse.ArgumentParser()
    rep.add_arguments(parser)
    argv = [
        "--dataset",
        "toy",
        "--seeds",
        "0",
        "1",
        "--epochs",
        "2",
        "--rates",
        "0.75",
        "1.0",
        "--batch-size",
        "16",
        "--device",
        "cpu",
        "--out",
        str(tmp_path),
    ]
    args = parser.parse_args(argv)
    assert args.methods == ["HPS+EW", "RRMTDL", "RRMTDL-lambda0", "RRMTDL-lambda1const"]
    assert parser.parse_args([]).rates == [0.5, 0.75, 0.9, 1.0]
    assert parser.parse_args([]).device == "auto"
    assert rep.run(args) == 0
    text = (tmp_path / "report.md").read_text()
    for label in (
        "| HPS+EW |",
        "| RRMTDL |",
        "| RRMTDL (λ=0) |",
        "| RRMTDL (λ=1 const) |",
        "| RRMTDL − HPS+EW |",
        "| RRMTDL − RRMTDL (λ=0) |",
        "100 %",
        "Verdict rule",
        "## Verdicts",
    ):
        assert label in text, label
    assert "Command: `mtlkit reproduce rrmtdl --dataset toy --methods HPS+EW RRMTDL RRMTDL-lambda0 " in text
    # the budget is stated above every table
    blocks = text.split("\n\n")
    for i, b in enumerate(blocks):
        if b.startswith("| ") and "|---" in b:
            assert "Budget (small CPU budget; toy)" in blocks[i - 1], blocks[i - 1][:80]
    res = json.loads((tmp_path / "results.json").read_text())
    comps = res["datasets"]["toy"]["pairs"]["p"]["paired_differences"]
    rows = res["datasets"]["toy"]["pairs"]["p"]["rows"]
    first = comps[0]
    assert (first["a"], first["b"]) == ("RRMTDL", "HPS+EW")
    for s in ("0", "1"):  # per-seed paired differences are the rows' differences
        assert first["per_seed"][s] == pytest.approx(
            rows["RRMTDL"][s]["test/mean_accuracy"] - rows["HPS+EW"][s]["test/mean_accuracy"]
        )
    assert first["verdict"] == rep.verdict(list(first["per_seed"].values()))[0]
    assert set(res["datasets"]["toy"]["sweep"]["p"]["rows"]) == {"HPS+EW", "RRMTDL", "RRMTDL-lambda0"}
    lam0 = yaml.safe_load((tmp_path / "toy" / "p" / "agree0.75" / "RRMTDL-lambda0-s1" / "config.yaml").read_text())
    assert lam0["model"]["options"]["lambda_schedule"] == "zero"
    assert lam0["dataset"]["options"] == {
        "pair": "p",
        "agreement": 0.75,
        "seed": 1,
        "n_train": 48,
        "n_val": 16,
        "n_test": 24,
    }
    assert lam0["train"]["device"] == "cpu"  # --device is passed through to the Trainer
    capsys.readouterr()
    # --reuse: nothing retrains, the same numbers come back
    assert rep.run(parser.parse_args(argv + ["--reuse"])) == 0
    err = capsys.readouterr().err
    assert "0 runs trained" in (tmp_path / "report.md").read_text() and "(read back)" in err
    again = json.loads((tmp_path / "results.json").read_text())
    assert again["datasets"]["toy"]["pairs"]["p"]["rows"] == rows
    # a stopped run (no results.json) is trained again (resumed from its checkpoint), the others read back
    (tmp_path / "toy" / "p" / "agree0.75" / "RRMTDL-s0" / "results.json").unlink()
    assert rep.run(parser.parse_args(argv + ["--reuse"])) == 0
    assert "1 runs trained" in (tmp_path / "report.md").read_text()
    assert json.loads((tmp_path / "results.json").read_text())["datasets"]["toy"]["pairs"]["p"]["rows"] == rows
    # another budget never mixes with the saved runs
    with pytest.raises(ConfigError, match="refusing to reuse"):
        rep.run(parser.parse_args(argv + ["--reuse", "--epochs", "3"]))


def test_image_pairs_default_to_the_conv_trunk_which_fits_36x36_images():
    import argparse

    from mtlkit.models.base import build_model
    from mtlkit.reproduce import rrmtdl as rep

    parser = argparse.ArgumentParser()
    rep.add_arguments(parser)
    args = parser.parse_args([])
    assert args.dataset == ["images", "census"] and len(args.seeds) >= 3
    assert rep._trunk(rep.SETUPS["images"], args) == ("conv", {"encoder": "conv", "width": 384})
    assert rep._trunk(rep.SETUPS["census"], args)[0] == "mlp"
    assert rep._trunk(rep.SETUPS["images"], parser.parse_args(["--trunk", "mlp"]))[0] == "mlp"
    x = torch.zeros(3, 1, 36, 36)
    s = Split(x, {"a": torch.zeros(3, dtype=torch.long), "b": torch.ones(3, dtype=torch.long)})
    data = MTLData("img", _tasks(), s, s, s)
    for name, opts in (("rrmtdl", {**rep.RRMTDL_WIDTHS, "lambda_schedule": "zero"}), ("hps", {})):
        m = build_model(name, data, encoder="conv", width=384, **opts)
        assert m.encoder[-3].in_features == 64 * 7 * 7  # 36 -> 34 -> 17 -> 15 -> 7
        out = m.eval()(x)
        assert set(out) == {"a", "b"} and out["a"].shape[0] == 3
