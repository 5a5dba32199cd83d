"""RRMTDL: gradient reversal, DANN schedule, entangled-label protocol, the model, and the trainer hooks it uses."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from mtlkit.config import RunConfig
from mtlkit.data import MTLData, Split
from mtlkit.data.entangled import EntangledSpec, agreement_rate, entangle, sample_cells
from mtlkit.errors import ConfigError, DataError
from mtlkit.gradient_reversal import GradientReversal, dann_lambda, grad_reverse
from mtlkit.metrics import evaluate_outputs, selection_score
from mtlkit.models.base import MTLModel, register_model
from mtlkit.models.hps import MLPEncoder
from mtlkit.models.rrmtdl import RRMTDL, adversarial_name
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
    assert all(b > a for a, b in zip(vals, vals[1:]))
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
    m = _model(grl="constant", grl_scale=1.0)
    m.train()
    x = torch.randn(8, 5)
    y = torch.randint(0, 2, (8,))
    name = adversarial_name("a", "b")
    task = [t for t in m.auxiliary_tasks() if t.name == name][0]
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
    c = _model(grl="constant", grl_scale=0.7)
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
    with pytest.raises(ConfigError, match="grl"):
        RRMTDL(enc, _tasks(), grl="linear")  # type: ignore[arg-type]


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

    seen: list[float] = []

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
    return RunConfig.from_dict({"model": {"name": model, "options": options or {}},
                                "train": {"epochs": epochs, "batch_size": 16, "device": "cpu", "progress": False},
                                "output": {"tensorboard": False}})


def test_trainer_calls_progress_hook_every_step(tmp_path):
    _ProgressRecorder.seen = []
    Trainer(_cfg("_test_progress_recorder", epochs=3), _toy_data(), tmp_path / "run").fit()
    seen = _ProgressRecorder.seen
    assert len(seen) == 3 * 3  # 48 samples / 16 per batch x 3 epochs
    assert seen[0] == 0.0 and all(b > a for a, b in zip(seen, seen[1:])) and seen[-1] < 1.0
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
    assert all(not torch.equal(b, bn.running_mean) for b, bn in zip(before, bns))
    assert lambdas[0] == 0.0 and lambdas[-1] == pytest.approx(dann_lambda(5 / 6))
    assert not any(k.startswith("adv[") for k in res.test) and "a/accuracy" in res.test
    assert any(k.startswith("train/adv[") for k in res.history[0])


# --- real data (only when cached) -------------------------------------------------------------------------------

@pytest.mark.data
def test_entangled_images_real_pool_if_cached():
    from mtlkit.data.sources import cache_dir

    path = cache_dir() / "multi" / "multifashionmnist_tr60000_te30000_v0p2_s0.npz"
    if not path.is_file():
        pytest.skip(f"Multi-(Fashion+MNIST) entangled pool not cached at {path}; run `mtlkit reproduce rrmtdl` once")
    from mtlkit.data import build_dataset

    d = build_dataset("entangled_images", pair="ge5_footwear", n_train=300, n_val=100, n_test=200)
    assert d.info["agreement"]["train"] == 0.75 and d.info["agreement"]["test"] == 0.0
    assert d.train.x.shape[1:] == (1, 36, 36)
