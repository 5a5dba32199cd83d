"""MTVIB: the KL term (Eq. 10), the uncertainty-weighted loss (Eq. 22-23), the reparameterisation (Eq. 9), the
Table I architecture, the auxiliary-loss hook that brings β·KL into the trainer's backward, GS weights, and the
reproduction's paper data and table."""

import copy
import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Normal, kl_divergence

from mtlkit.aggregation import Mean
from mtlkit.config import RunConfig
from mtlkit.engine.autodiff import backward
from mtlkit.errors import ConfigError
from mtlkit.methods import build_method
from mtlkit.models import SingleTaskModels, build_model
from mtlkit.models.base import MTLModel, check_auxiliary_loss
from mtlkit.models.mtvib import MTVIB, GaussianEncoder, build_mtvib, build_stvib, decoder
from mtlkit.nn.losses import gaussian_kl
from mtlkit.reproduce.mtvib import ETAS, MODELS, PAPER, report, spec
from mtlkit.tasks import Task
from mtlkit.train import Trainer
from mtlkit.weighting import StepContext
from mtlkit.weighting.constant import Constant

TINY = {"hidden": 16, "latent": 4, "channels": 4, "decoder_widths": [8, 6]}


class _Data:
    def __init__(self, shape=(1, 12, 12), kinds=("multiclass", "multiclass")):
        self.input_shape = shape
        self.tasks = [Task(n, k, 3 if k == "multiclass" else 1) for n, k in zip("ab", kinds, strict=True)]


# ------------------------------------------------------------------------------------------------ KL (Eq. 10)
def test_gaussian_kl_hand_value_and_reductions():
    mu = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    std = torch.tensor([[0.5, 2.0], [1.0, 1.0]])
    # ½[(σ² + μ² − 1 − log σ²)] per dimension, summed: row 0 by hand, row 1 is the prior (0).
    row0 = 0.5 * ((0.25 + 1 - 1 - math.log(0.25)) + (4 + 4 - 1 - math.log(4)))
    per = gaussian_kl(mu, std, reduction="none")
    assert per.tolist() == pytest.approx([row0, 0.0], abs=1e-6)
    assert float(gaussian_kl(mu, std)) == pytest.approx(row0 / 2, abs=1e-6)
    assert float(gaussian_kl(mu, std, reduction="sum")) == pytest.approx(row0, abs=1e-6)


def test_gaussian_kl_matches_torch_distributions_and_monte_carlo():
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(5, 7, generator=g)
    std = torch.rand(5, 7, generator=g) * 1.5 + 0.2
    ref = kl_divergence(Normal(mu, std), Normal(0.0, 1.0)).sum(-1)
    assert torch.allclose(gaussian_kl(mu, std, reduction="none"), ref, atol=1e-5)
    # Monte Carlo: E_q[log q(z) − log p(z)] with 200k samples.
    z = mu + std * torch.randn(200_000, 5, 7, generator=g)
    mc = (Normal(mu, std).log_prob(z) - Normal(0.0, 1.0).log_prob(z)).sum(-1).mean(0)
    assert torch.allclose(gaussian_kl(mu, std, reduction="none"), mc, rtol=0.03, atol=0.03)


def test_gaussian_kl_rejects_bad_input():
    with pytest.raises(ValueError, match="same shape"):
        gaussian_kl(torch.zeros(2, 3), torch.ones(2, 4))
    with pytest.raises(ValueError, match="std must be > 0"):
        gaussian_kl(torch.zeros(2), torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match="unknown reduction"):
        gaussian_kl(torch.zeros(2), torch.ones(2), reduction="avg")


# ------------------------------------------------------------------------------------ uncertainty weighting (Eq. 22-23)
def test_mtvib_method_is_uw_classification_with_hand_value():
    m = build_method("mtvib")
    w = m.weighting
    w.setup(2)
    with torch.no_grad():
        w.log_var.copy_(torch.tensor([math.log(4.0), math.log(0.25)]))  # σ² = 4 and 1/4
    ce = torch.tensor([2.0, 0.5])
    weighted = w(ce, StepContext())
    # Eq. 23: CE_k / σ_k² + log σ_k.
    hand = [2.0 / 4.0 + math.log(2.0), 0.5 / 0.25 + math.log(0.5)]
    assert weighted.tolist() == pytest.approx(hand, abs=1e-6)
    # the learned σ receive the gradient d/ds [e^{-s} CE + s/2] = −e^{-s} CE + ½
    weighted.sum().backward()
    assert w.log_var.grad.tolist() == pytest.approx([-0.5 + 0.5, -2.0 + 0.5], abs=1e-6)


def test_trainer_backpropagates_eq23_including_beta_kl(tmp_path):
    """One trainer step's gradient = ∇[Σ_k (CE_k/σ_k² + log σ_k) + β·KL], computed by hand with the same noise."""
    cfg = RunConfig.from_dict(
        {
            "dataset": {"name": "_toy"},
            "model": {"name": "mtvib", "options": {**TINY, "beta": 0.5}},
            "method": {"name": "mtvib"},
            "train": {"epochs": 1, "batch_size": 16, "progress": False, "device": "cpu"},
            "output": {"dir": str(tmp_path / "r"), "tensorboard": False},
        }
    )
    tr = Trainer(cfg)
    with torch.no_grad():
        tr.method.weighting.log_var.copy_(torch.tensor([0.3, -0.2]))
    x, ys = tr.data.train.x[:16], {k: v[:16] for k, v in tr.data.train.y.items()}
    ref = copy.deepcopy(tr.model).train()
    s = tr.method.weighting.log_var.detach().clone()
    torch.manual_seed(123)
    tr.model.train()
    tr._step(x, ys, StepContext())
    torch.manual_seed(123)
    mu, std = ref.encoder(x)
    z = mu + std * torch.randn_like(std)
    out = ref.decode(z)
    ce = torch.stack([F.cross_entropy(out[n], ys[n]) for n in ("a", "b")])
    total = (torch.exp(-s) * ce + 0.5 * s).sum() + 0.5 * gaussian_kl(mu, std)
    ref.zero_grad()
    total.backward()
    for (name, p), q in zip(ref.named_parameters(), tr.model.parameters(), strict=True):
        assert q.grad is not None, name
        assert torch.allclose(p.grad, q.grad, atol=1e-5, rtol=1e-4), name
    # and the KL really is in there: without it the scale branch's gradient differs
    assert tr.model.encoder.scale[0].weight.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------- reparameterisation (Eq. 9)
def test_reparameterisation_gradient_flows_to_mu_and_sigma():
    mu = torch.tensor([0.5, -1.0], requires_grad=True)
    std = torch.tensor([2.0, 0.3], requires_grad=True)
    eps = torch.tensor([0.7, -1.2])
    z = MTVIB.reparameterize(mu, std, eps)
    assert z.tolist() == pytest.approx([0.5 + 2.0 * 0.7, -1.0 + 0.3 * -1.2])
    (z * torch.tensor([1.0, 3.0])).sum().backward()
    assert mu.grad.tolist() == pytest.approx([1.0, 3.0])  # ∂z/∂μ = 1
    assert std.grad.tolist() == pytest.approx([0.7, -3.6])  # ∂z/∂σ = ε


def test_model_gradient_reaches_mean_and_scale_branches_in_training():
    torch.manual_seed(0)
    m = build_mtvib(_Data(), **TINY, beta=0.0)
    out = m(torch.rand(8, 1, 12, 12))
    sum(F.cross_entropy(o, torch.zeros(8, dtype=torch.long)) for o in out.values()).backward()
    assert m.encoder.mean[0].weight.grad.abs().sum() > 0
    assert m.encoder.scale[0].weight.grad.abs().sum() > 0  # only through the sample z = μ + σ·ε (β = 0)
    # In eval mode with predict="mean" the heads read μ: σ gets no gradient from the task loss.
    m.zero_grad()
    m.eval()
    sum(o.sum() for o in m(torch.rand(8, 1, 12, 12)).values()).backward()
    assert m.encoder.scale[0].weight.grad is None or m.encoder.scale[0].weight.grad.abs().sum() == 0


# ----------------------------------------------------------------------------------------------- architecture, modes
def _linear_shapes(module):
    return [tuple(mod.weight.shape) for mod in module.modules() if isinstance(mod, torch.nn.Linear)]


def test_table_1_architecture_on_36x36():
    data = _Data(shape=(1, 36, 36))
    data.tasks = [Task("left", "multiclass", 10), Task("right", "multiclass", 10)]
    m = build_model("mtvib", data)
    assert _linear_shapes(m.encoder) == [(1024, 3136), (1024, 1024), (1024, 1024), (256, 1024), (256, 1024)]
    convs = [mod for mod in m.encoder.modules() if isinstance(mod, torch.nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size, c.stride) for c in convs] == [(64, (3, 3), (1, 1))] * 2
    for h in m.heads.values():  # Table I(d): FC 256x384 + BN + ReLU, FC 384x192, FC 192x10
        assert _linear_shapes(h) == [(384, 256), (192, 384), (10, 192)]
        assert sum(isinstance(mod, torch.nn.BatchNorm1d) for mod in h) == 1
    st = build_stvib(data)  # Table I(c): the middle decoder layer has BN + ReLU
    assert all(sum(isinstance(mod, torch.nn.BatchNorm1d) for mod in h) == 2 for h in st.heads.values())
    assert m.encoder.out_features == 256


def _eval_model(**kw):
    torch.manual_seed(0)
    x = torch.rand(6, 1, 12, 12)
    m = build_mtvib(_Data(), **TINY, **kw)
    m.train()
    m(x)  # BN statistics
    return m.eval(), x


def test_prediction_mean_is_deterministic_and_decodes_mu():
    m, x = _eval_model()
    a, b = m(x), m(x)
    assert all(torch.equal(a[k], b[k]) for k in a)
    mu, _ = m.distribution(x)
    assert torch.equal(a["a"], m.decode(mu)["a"])
    m.train()
    t1, t2 = m(x), m(x)
    assert not torch.allclose(t1["a"], t2["a"])  # training samples z whatever predict says


def test_prediction_sample_decodes_one_sample_drawn_from_the_generator():
    m, x = _eval_model(predict="sample")
    mu, std = m.distribution(x)
    m.generator = torch.Generator().manual_seed(7)
    s1 = m(x)
    eps = torch.randn(std.shape, generator=torch.Generator().manual_seed(7))
    assert torch.allclose(s1["a"], m.decode(mu + std * eps)["a"], atol=1e-6)  # one sample: its logits
    m.generator = torch.Generator().manual_seed(7)
    assert torch.equal(m(x)["a"], s1["a"])  # same generator state: same prediction
    m.generator = torch.Generator().manual_seed(8)
    assert not torch.allclose(m(x)["a"], s1["a"])  # another generator: another sample
    assert not torch.allclose(s1["a"].exp().sum(-1), torch.ones(6), atol=1e-3)  # logits, not log-probabilities


def test_prediction_average_is_the_mean_softmax_and_its_spread_shrinks_with_k():
    m, x = _eval_model(predict="average", num_samples=5)
    mu, std = m.distribution(x)
    m.generator = torch.Generator().manual_seed(3)
    avg = m(x)["a"]
    g = torch.Generator().manual_seed(3)
    probs = []
    for _ in range(5):
        eps = torch.randn(std.shape, generator=g)
        probs.append(m.decode(mu + std * eps)["a"].softmax(-1))
    assert torch.allclose(avg.exp(), torch.stack(probs).mean(0), atol=1e-5)  # log(mean_k softmax f(z_k))
    assert torch.allclose(avg.exp().sum(-1), torch.ones(6), atol=1e-5)
    with torch.no_grad():  # make σ large enough that the samples disagree
        m.encoder.scale[1].bias.fill_(3.0)

    def spread(k: int) -> float:  # std over 24 generators of the averaged probabilities
        m.num_samples = k
        outs = []
        for seed in range(24):
            m.generator = torch.Generator().manual_seed(100 + seed)
            outs.append(m(x)["a"].exp())
        return float(torch.stack(outs).detach().std(0).mean())

    s1, s64 = spread(1), spread(64)
    assert s1 > 0 and s64 < s1 / 4  # Monte Carlo error ~ 1/√K: towards the expectation E_z[p(y|z)] (1/8 expected)


def test_literal_decoder_collapses_to_one_linear_map_and_bn_relu_does_not():
    torch.manual_seed(0)
    lit = decoder(4, 3, (8, 6), bn_relu_middle=False).eval()
    bn = decoder(4, 3, (8, 6), bn_relu_middle=True).eval()
    with torch.no_grad():
        bn[4].running_mean.uniform_(-1, 1)  # a non-trivial BN so that the ReLU cuts somewhere

    def tail(d):  # everything after the first hidden layer's ReLU
        return d[3:]

    h1, h2 = torch.randn(5, 8), torch.randn(5, 8)
    f = tail(lit)
    with torch.no_grad():
        l1, l2 = lit[3], lit[4]
        assert isinstance(l1, torch.nn.Linear) and isinstance(l2, torch.nn.Linear)
        w = l2.weight @ l1.weight  # FC 384x192 then FC 192xC = one C x 384 matrix
        b = l2.weight @ l1.bias + l2.bias
        assert torch.allclose(f(h1), h1 @ w.T + b, atol=1e-5)
        assert torch.allclose(f(0.3 * h1 + 0.7 * h2), 0.3 * f(h1) + 0.7 * f(h2), atol=1e-5)  # affine
        g = tail(bn)
        assert not torch.allclose(g(0.3 * h1 + 0.7 * h2), 0.3 * g(h1) + 0.7 * g(h2), atol=1e-3)
    assert spec("MTVIB-BN")["model"]["options"] == {"decoder_bn_relu": True}
    assert spec("MTVIB")["model"]["options"] == {}


def test_auxiliary_loss_is_beta_kl_of_the_last_training_pass_and_consumed():
    torch.manual_seed(0)
    m = build_mtvib(_Data(), **TINY, beta=0.25).train()
    x = torch.rand(5, 1, 12, 12)
    with torch.no_grad():
        mu, std = m.encoder(x)  # train-mode BN: batch statistics, so the same (μ, σ) as the forward below
    m(x)
    aux = m.auxiliary_loss()
    assert aux is not None and aux.requires_grad
    assert float(aux.detach()) == pytest.approx(0.25 * float(gaussian_kl(mu, std)), rel=1e-5)
    assert m.auxiliary_loss() is None  # consumed: a stale KL is never added twice
    m.eval()
    m(x)
    assert m.auxiliary_loss() is None  # evaluation / attack passes leave nothing for the hook


def test_hook_sums_over_stl_members_and_engine_adds_it_outside_aggregation():
    torch.manual_seed(0)
    data = _Data()
    members = {
        t.name: build_stvib(type("D", (), {"input_shape": data.input_shape, "tasks": [t]})(), **TINY)
        for t in data.tasks
    }
    stl = SingleTaskModels(members)
    stl(torch.rand(4, 1, 12, 12))
    kls = [float(m.last_kl) for m in members.values()]
    total = check_auxiliary_loss(stl)  # the STL model's hook sums its members' hooks
    assert float(total.detach()) == pytest.approx(1e-3 * sum(kls), rel=1e-5)
    assert check_auxiliary_loss(MTLModel()) is None  # the base hook's default: no auxiliary loss

    # engine: with a non-trivial aggregator the extra loss' gradient is added as is (not aggregated)
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    losses = torch.stack([w[0] ** 2, 3 * w[1]])
    extra = 5 * w.sum()
    backward(losses, [w], Mean(), extra=extra)
    assert w.grad.tolist() == pytest.approx([(2.0 + 0.0) / 2 + 5, (0.0 + 3.0) / 2 + 5])
    w.grad = None
    with pytest.raises(ValueError, match="scalar"):
        backward(torch.stack([w[0], w[1]]), [w], extra=torch.ones(2))


def test_bad_options_are_named():
    with pytest.raises(ConfigError, match="not multiclass"):
        build_mtvib(_Data(kinds=("multiclass", "binary")), **TINY)
    with pytest.raises(ConfigError, match="predict must be one of mean, sample, average"):
        build_mtvib(_Data(), **TINY, predict="median")
    with pytest.raises(ConfigError, match="beta"):
        build_mtvib(_Data(), **TINY, beta=-1.0)
    with pytest.raises(ConfigError, match="decoder widths"):
        decoder(4, 3, (8, 8, 8))
    with pytest.raises(ConfigError, match="mean_activation"):
        GaussianEncoder((1, 12, 12), mean_activation="tanh")


def test_mtvib_and_stvib_train_end_to_end(tmp_path):
    for model, method in (("mtvib", "mtvib"), ("stvib", "stl")):
        cfg = RunConfig.from_dict(
            {
                "dataset": {"name": "_toy"},
                "model": {"name": model, "options": TINY},
                "method": {"name": method},
                "train": {"epochs": 1, "batch_size": 32, "progress": False, "device": "cpu"},
                "output": {"dir": str(tmp_path / model), "tensorboard": False},
            }
        )
        res = Trainer(cfg).fit()
        assert all(0.0 <= res.test[f"{t}/accuracy"] <= 1.0 for t in "ab")
        assert math.isfinite(res.test["a/loss"])


# -------------------------------------------------------------------------------------------- GS (constant weights)
def test_constant_weights_hand_value_and_errors():
    c = Constant([0.25, 0.75])
    assert c(torch.tensor([2.0, 4.0])).tolist() == pytest.approx([0.5, 3.0])
    assert build_method("constant").weighting(torch.tensor([1.0, 2.0, 3.0])).tolist() == [1.0, 2.0, 3.0]
    with pytest.raises(ValueError, match="weights but there are"):
        Constant([1.0, 1.0])(torch.ones(3))
    with pytest.raises(ValueError, match="finite numbers >= 0"):
        Constant([-1.0, 1.0])


# ------------------------------------------------------------------------------------------------ reproduction data
def test_paper_numbers_are_complete_and_report_puts_them_beside_ours():
    for ds in ("multimnist", "multifashion"):
        assert set(PAPER[ds]) == set(MODELS)
        for m in MODELS:
            assert set(PAPER[ds][m]) == {"left", "right"}
            assert all(set(PAPER[ds][m][t]) == set(ETAS) for t in ("left", "right"))
    assert PAPER["multimnist"]["MTVIB"]["right"][0.0] == 93.7
    assert PAPER["multifashion"]["MTVIB"]["left"][0.0] == 86.2
    assert PAPER["multifashion"]["UWL"]["left"][0.30] == 40.5  # Table IV, last row of task 1
    curves = {
        "UWL": [
            {"0.0": {"left/accuracy": 0.5, "right/accuracy": 0.25, "joint_accuracy": 0.1}},
            {"0.0": {"left/accuracy": 0.7, "right/accuracy": 0.25, "joint_accuracy": 0.2}},
        ]
    }
    md = report("multifashion", curves, [0.0], ["left", "right"], {"epochs": 1}, {}, 60.0)
    assert "60.0 ± 10.0 (86.7)" in md and "25.0 ± 0.0 (85.3)" in md and "15.0 ± 5.0" in md
    assert "epochs=1" in md
    with pytest.raises(ValueError, match="unknown MTVIB-paper model"):
        spec("VAE")


def test_rebuild_writes_table_and_plots_from_results(tmp_path):
    import json

    from mtlkit.reproduce.mtvib import rebuild

    c = {
        "0.0": {"left/accuracy": 0.9, "right/accuracy": 0.8, "joint_accuracy": 0.7},
        "0.3": {"left/accuracy": 0.45, "right/accuracy": 0.4, "joint_accuracy": 0.1},
    }
    (tmp_path / "results.json").write_text(
        json.dumps(
            {
                "dataset": "multimnist",
                "budget": {"epochs": 2},
                "etas": [0.0, 0.3],
                "curves": {"GS": [c], "MTVIB": [c]},
                "seconds": 5.0,
            }
        )
    )
    md = rebuild(tmp_path)
    # One seed per model: means only, no "± 0.0" spread that was never measured.
    assert "| 90.0 (94.7) |" in md and "| 45.0 (76.8) |" in md and "±" not in md.split("mean ± std")[-1]
    assert "42.5 points lost; 50.0 % of the clean accuracy kept" in md
    assert (tmp_path / "table.md").is_file() and (tmp_path / "accuracy_vs_eta.png").stat().st_size > 1000
    assert (tmp_path / "joint_accuracy_vs_eta.png").is_file()


def test_fgsm_curve_is_cached_per_run_and_reused_only_for_the_same_sweep(tmp_path, monkeypatch):
    import argparse

    import mtlkit.robustness as rb
    from mtlkit.data import build_dataset
    from mtlkit.reproduce.mtvib import _curve

    data = build_dataset("_toy")
    net = build_mtvib(data, **TINY)
    calls = []
    real = rb.fgsm_sweep

    def spy(*a, **k):
        calls.append((a[3], a[4], a[5]))
        return real(*a, **k)

    monkeypatch.setattr(rb, "fgsm_sweep", spy)

    def args(**kw):
        base = {"reuse": True, "attack_batch": 64, "eta_reading": "pixel", "attack_loss": "auto", "no_clip": False}
        base.update(predict="mean", num_samples=4, device="cpu")
        return argparse.Namespace(**{**base, **kw})

    first = _curve(net, data, [0.0, 0.1], args(), tmp_path, "MTVIB", 0)
    assert _curve(net, data, [0.0, 0.1], args(), tmp_path, "MTVIB", 0) == first  # read back
    assert calls == [([0.0, 0.1], 1.0, "sum")]
    _curve(net, data, [0.0, 0.2], args(), tmp_path, "MTVIB", 0)  # another sweep: computed again
    _curve(net, data, [0.0, 0.2], args(reuse=False), tmp_path, "MTVIB", 0)  # no --reuse: again
    _curve(net, data, [0.0, 0.2], args(predict="sample"), tmp_path, "MTVIB", 0)  # another prediction mode
    assert net.predict == "sample" and net.generator is not None  # set on the model for its attack
    _curve(net, data, [0.0, 0.2], args(), tmp_path, "STL", 0)  # STL: attacked per task (auto)
    _curve(net, data, [0.0, 0.2], args(), tmp_path, "MTVIB", 0, "pixel255")  # another reading: its own file
    assert calls[1:] == [([0.0, 0.2], 1.0, "sum")] * 3 + [([0.0, 0.2], 1.0, "per-task"), ([0.0, 0.2], 1 / 255, "sum")]
    assert (tmp_path / "fgsm_pixel.json").is_file() and (tmp_path / "fgsm_pixel255.json").is_file()


def _curve_of(a, hi=None):
    hi = a / 2 if hi is None else hi
    return {
        "0.0": {"left/accuracy": a, "right/accuracy": a, "joint_accuracy": a * a},
        "0.3": {"left/accuracy": hi, "right/accuracy": hi, "joint_accuracy": hi * hi},
    }


def test_paired_differences_are_per_seed_and_verdicts_follow_the_stated_rules():
    from mtlkit.reproduce.mtvib import paired, verdicts

    names = ["left", "right"]
    # MTVIB decays less than UWL on every seed, and by a different amount each time
    mt = [_curve_of(0.9, 0.6), _curve_of(0.8, 0.6), _curve_of(0.85, 0.5)]
    uw = [_curve_of(0.9, 0.5), _curve_of(0.81, 0.4), _curve_of(0.86, 0.45)]
    curves = {"MTVIB": mt, "UWL": uw, "GS": [_curve_of(0.9, 0.7)] * 3}
    budget = {"epochs": 3, "n_train": 6000, "seeds": [0, 1, 2]}
    d = paired(curves, budget, "MTVIB", "UWL", 0.3, names, decay=True)
    assert d == pytest.approx({0: 10.0, 1: 21.0, 2: 6.0})
    assert paired(curves, budget, "MTVIB", "UWL", 0.0, names) == pytest.approx({0: 0.0, 1: -1.0, 2: -1.0})
    # pairing is by seed, not by position: a merged table with other seeds per model
    merged = {"seeds": {"MTVIB": [0, 1, 2], "UWL": [2, 0]}}
    m2 = {"MTVIB": mt, "UWL": [uw[2], uw[0]]}
    assert paired(m2, merged, "MTVIB", "UWL", 0.3, names, decay=True) == pytest.approx({0: 10.0, 2: 6.0})
    v = "\n".join(verdicts("multimnist", curves, [0.0, 0.3], names, budget))
    assert "decays more slowly than UWL** (paper at η = 0.3: +19.6 points): reproduced" in v
    assert "decays more slowly than GS** (paper at η = 0.3: +1.7 points): not reproduced" in v
    assert "Clean accuracy 94.9 / 93.7 %**: not testable at this budget" in v
    assert "on par with UWL** (paper: differences roughly 0.5 %): reproduced" in v
    full = {**budget, "epochs": 200, "n_train": 120000, "n_test": 10000, "lr": 1e-4, "batch_size": 200}
    assert "94.9 / 93.7 %**: not reproduced" in "\n".join(verdicts("multimnist", curves, [0.0, 0.3], names, full))
    one = {k: v[:1] for k, v in curves.items()}
    v1 = "\n".join(verdicts("multimnist", one, [0.0, 0.3], names, {"seeds": [0]}))
    assert v1.count("not testable with 1 paired seed(s); no ordering claimed") == 4 and "reproduced" not in v1
    md = report("multimnist", one, [0.0, 0.3], names, {"seeds": [0]}, {}, 1.0)
    assert "±" not in md.split("mean ± std")[-1]  # one seed: no spread printed anywhere after the header
    # an attack that removes almost nothing (1.5 and 0.5 points) leaves no decay to compare, even if one model's
    # curve is flatter on every seed
    weak = {"MTVIB": [_curve_of(0.9, 0.895)] * 3, "UWL": [_curve_of(0.9, 0.885)] * 3}
    vw = "\n".join(verdicts("multimnist", weak, [0.0, 0.3], names, budget))
    assert "decays more slowly than UWL** (paper at η = 0.3: +19.6 points): not testable under this η reading" in vw
    assert "removes only 0.5 (MTVIB) and 1.5 (UWL) points" in vw


def test_readings_section_ranks_readings_by_distance_to_the_paper_stl():
    paper_l = PAPER["multimnist"]["STL"]["left"]
    paper_r = PAPER["multimnist"]["STL"]["right"]
    near = {str(e): {"left/accuracy": paper_l[e] / 100, "right/accuracy": paper_r[e] / 100} for e in (0.0, 0.3)}
    far = {str(e): {"left/accuracy": 0.1, "right/accuracy": 0.1} for e in (0.0, 0.3)}
    for c in (near, far):
        for v in c.values():
            v["joint_accuracy"] = 0.0
    # ten points below the paper at every η: the same attack effect on a weaker model
    lower = {
        str(e): {
            "left/accuracy": (paper_l[e] - 10) / 100,
            "right/accuracy": (paper_r[e] - 10) / 100,
            "joint_accuracy": 0,
        }
        for e in (0.0, 0.3)
    }
    extra = {"readings": {"STL": {"pixel": [far], "std": [near], "pixel255": [lower]}}}
    md = report("multimnist", {"STL": [near]}, [0.0, 0.3], ["left", "right"], {"seeds": [0]}, extra, 1.0)
    assert (
        "RMSE to the paper's STL accuracy over η > 0 (points): pixel 63.6, std 0.0, pixel255 10.0; closest: std." in md
    )
    # far loses nothing where the paper's STL loses 17.7 / 23.6 points: rms 20.9; lower loses what the paper's does
    assert (
        "(clean − attacked, ours vs the paper's) over η > 0: pixel 20.9, std 0.0, pixel255 0.0; closest: **std**" in md
    )


def test_merge_puts_models_from_several_runs_side_by_side_and_refuses_conflicts(tmp_path):
    import json

    from mtlkit.errors import ConfigError
    from mtlkit.reproduce.mtvib import merge

    curve = _curve_of

    def write(name, curves, seeds, epochs=1):
        d = tmp_path / name
        d.mkdir()
        (d / "results.json").write_text(
            json.dumps(
                {
                    "dataset": "multimnist",
                    "etas": [0.0, 0.3],
                    "seconds": 60.0,
                    "budget": {"epochs": epochs, "seeds": seeds},
                    "curves": curves,
                }
            )
        )
        return d

    a = write("a", {"UWL": [curve(0.9), curve(0.8)], "STL": []}, [0, 1])
    b = write("b", {"STL": [curve(0.6)]}, [0])
    md = merge([a, b], tmp_path / "m")
    assert "UWL (n=2)" in md and "STL (n=1)" in md and "| 60.0 (94.8) | 85.0 ± 5.0 (95.0) |" in md
    res = json.loads((tmp_path / "m" / "results.json").read_text())
    assert res["budget"]["seeds"] == {"UWL": [0, 1], "STL": [0]} and res["seconds"] == 120.0
    assert (tmp_path / "m" / "accuracy_vs_eta.png").is_file()
    merge([a, b], tmp_path / "m")  # re-merging into a merge directory is fine
    with pytest.raises(ConfigError, match="model UWL is in more than one"):
        merge([a, write("c", {"UWL": [curve(0.5)]}, [2])], tmp_path / "m2")
    with pytest.raises(ConfigError, match="budget differs"):
        merge([a, write("d", {"GS": [curve(0.5)]}, [0], epochs=200)], tmp_path / "m3")
    with pytest.raises(ConfigError, match="refusing to overwrite"):
        merge([b], a)
    with pytest.raises(ConfigError, match=re.escape("no results.json")):
        merge([tmp_path / "nowhere"], tmp_path / "m4")
