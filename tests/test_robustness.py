"""FGSM (MTVIB Eq. 25) and PGD: exact step, clipping, ε-ball, targets, mode restoration; robust evaluation at η = 0
equals clean evaluation; ``mtlkit eval --attack fgsm`` on a saved run."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mtlkit.cli import main
from mtlkit.config import RunConfig
from mtlkit.data import Split
from mtlkit.errors import ConfigError
from mtlkit.evaluation import evaluate, robust_metrics, robustness_curve
from mtlkit.models import HPS
from mtlkit.models.mtvib import build_mtvib
from mtlkit.robustness import fgsm, input_gradient, pgd
from mtlkit.tasks import Task
from mtlkit.train import Trainer

TASKS = [Task("a", "multiclass", 3), Task("b", "multiclass", 3)]


def _model(seed: int = 0) -> HPS:
    torch.manual_seed(seed)
    enc = nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.BatchNorm1d(12), nn.Tanh())
    return HPS(enc, {"a": nn.Linear(12, 3), "b": nn.Linear(12, 3)})


def _batch(n: int = 10, lo: float = 0.3, hi: float = 0.7, seed: int = 1, side: int = 4):
    g = torch.Generator().manual_seed(seed)
    x = lo + (hi - lo) * torch.rand(n, 1, side, side, generator=g)
    y = {"a": torch.randint(0, 3, (n,), generator=g), "b": torch.randint(0, 3, (n,), generator=g)}
    return x, y


def _summed_ce_grad(model, x, y, tasks=("a", "b")):
    x = x.clone().requires_grad_(True)
    out = model(x)
    sum(F.cross_entropy(out[t], y[t]) for t in tasks).backward()
    return x.grad


def test_fgsm_moves_each_pixel_by_exactly_eta_in_the_gradient_sign():
    model = _model().eval()
    x, y = _batch()  # pixels in [0.3, 0.7]: no clipping at η = 0.1
    g = _summed_ce_grad(model, x, y)
    assert bool((g != 0).all())
    adv = fgsm(model, TASKS, x, y, eps=0.1)
    assert torch.allclose(adv - x, 0.1 * g.sign(), atol=1e-6)
    assert torch.allclose((adv - x).abs(), torch.full_like(x, 0.1), atol=1e-6)


def test_fgsm_targets_one_task_and_clips_to_unit_interval():
    model = _model().eval()
    x, y = _batch()
    ga = _summed_ce_grad(model, x, y, tasks=("a",))
    adv = fgsm(model, TASKS, x, y, eps=0.05, target_task="a")
    assert torch.allclose(adv - x, 0.05 * ga.sign(), atol=1e-6)
    x01, _ = _batch(lo=0.0, hi=1.0)
    x01[0, 0, 0, 0], x01[0, 0, 0, 1] = 0.0, 1.0
    g = _summed_ce_grad(model, x01, y)
    adv = fgsm(model, TASKS, x01, y, eps=0.3)
    assert float(adv.min()) >= 0.0 and float(adv.max()) <= 1.0
    assert torch.allclose(adv, (x01 + 0.3 * g.sign()).clamp(0, 1))  # the step is taken before clipping


def test_fgsm_restores_mode_and_touches_no_parameter_gradient():
    model = _model().train()
    x, y = _batch()
    fgsm(model, TASKS, x, y, eps=0.1)
    pgd(model, TASKS, x, y, eps=0.1, steps=2)
    assert model.training
    assert all(p.grad is None for p in model.parameters())
    assert fgsm(model, TASKS, x, y, eps=0.0).equal(x)


def test_pgd_stays_in_the_eps_ball_and_unit_interval():
    model = _model().eval()
    x, y = _batch(lo=0.0, hi=1.0)
    for eps in (0.05, 0.2):
        adv = pgd(model, TASKS, x, y, eps=eps, steps=5, alpha=0.1, generator=torch.Generator().manual_seed(0))
        assert float((adv - x).abs().max()) <= eps + 1e-6
        assert float(adv.min()) >= 0.0 and float(adv.max()) <= 1.0
    # one step of size η from x is FGSM
    assert torch.allclose(
        pgd(model, TASKS, x, y, eps=0.1, steps=1, alpha=0.1, random_start=False), fgsm(model, TASKS, x, y, eps=0.1)
    )


def test_pgd_is_at_least_as_strong_as_fgsm_on_the_loss():
    model = _model().eval()
    x, y = _batch(n=64)

    def loss(xx):
        with torch.no_grad():
            out = model(xx)
            return float(sum(F.cross_entropy(out[t], y[t]) for t in "ab"))

    l_f = loss(fgsm(model, TASKS, x, y, eps=0.1))
    l_p = loss(pgd(model, TASKS, x, y, eps=0.1, steps=10, random_start=False))
    assert loss(x) < l_f <= l_p + 1e-4


def test_attack_errors_are_named():
    model = _model().eval()
    x, y = _batch()
    with pytest.raises(ValueError, match="eps must be"):
        fgsm(model, TASKS, x, y, eps=-0.1)
    with pytest.raises(ValueError, match="eps must be"):
        fgsm(model, TASKS, x, y, eps=float("nan"))
    with pytest.raises(ValueError, match="unknown target task 'c'"):
        input_gradient(model, TASKS, x, y, target_task="c")
    with pytest.raises(ValueError, match="no targets"):
        fgsm(model, TASKS, x, {"a": y["a"]}, eps=0.1)
    with pytest.raises(ValueError, match="steps"):
        pgd(model, TASKS, x, y, eps=0.1, steps=0)
    with pytest.raises(ConfigError, match="unknown attack"):
        robust_metrics(model, TASKS, Split(x, y), "cw", 0.1)


@pytest.mark.parametrize("which", ["hps", "mtvib"])
def test_eta_zero_reproduces_clean_accuracy(which):
    if which == "hps":
        x, y = _batch(n=40, lo=0.0, hi=1.0)
        model = _model()
    else:
        x, y = _batch(n=40, lo=0.0, hi=1.0, side=12)
        torch.manual_seed(0)
        data = type("D", (), {"input_shape": (1, 12, 12), "tasks": TASKS})()
        model = build_mtvib(data, hidden=8, latent=4, channels=2, decoder_widths=(6, 5))
    model.train()
    model(x)  # BN running statistics
    split = Split(x, y)
    clean = evaluate(model, split, TASKS)
    curve = robustness_curve(model, TASKS, split, [0.0, 0.3], "fgsm", batch_size=16)
    for k in ("a/accuracy", "b/accuracy", "joint_accuracy"):
        assert curve["0.0"][k] == pytest.approx(clean[k])
    assert robust_metrics(model, TASKS, split, "pgd", 0.0)["a/accuracy"] == pytest.approx(clean["a/accuracy"])
    assert robust_metrics(model, TASKS, split, "none", 0.3)["joint_accuracy"] == pytest.approx(clean["joint_accuracy"])


def test_cli_eval_fgsm_on_a_saved_mtvib_run(tmp_path, capsys):
    cfg = RunConfig.from_dict(
        {
            "dataset": {"name": "_toy"},
            "model": {"name": "mtvib", "options": {"hidden": 16, "latent": 4, "channels": 4, "decoder_widths": [8, 6]}},
            "method": {"name": "mtvib"},
            "train": {"epochs": 1, "batch_size": 32, "progress": False, "device": "cpu"},
            "output": {"dir": str(tmp_path / "run"), "tensorboard": False},
        }
    )
    res = Trainer(cfg).fit()
    assert main(["eval", str(tmp_path / "run"), "--attack", "fgsm", "--eps", "0", "0.1"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["results"]) == {"0.0", "0.1"}
    assert out["results"]["0.0"]["a/accuracy"] == pytest.approx(res.test["a/accuracy"])
    assert main(["eval", str(tmp_path / "run"), "--attack", "fgsm", "--eps", "0.1", "--target-task", "zz"]) == 2
    assert "unknown target task" in capsys.readouterr().err


@pytest.mark.parametrize("target", [None, "b"])
def test_fgsm_curve_equals_one_attack_per_eta(target):
    # The curve reuses one input gradient for every η; it must give exactly robust_metrics' numbers per η.
    x, y = _batch(n=40, lo=0.0, hi=1.0)
    model = _model()
    model.train()
    model(x)
    split = Split(x, y)
    etas = [0.0, 0.05, 0.2, 0.5]
    curve = robustness_curve(model, TASKS, split, etas, "fgsm", target_task=target, batch_size=16)
    for e in etas:
        assert curve[str(e)] == robust_metrics(model, TASKS, split, "fgsm", e, target_task=target, batch_size=16)
    # not a vacuous equality: the attack changes the metrics
    assert (
        curve["0.5"]["joint_accuracy"] != curve["0.0"]["joint_accuracy"]
        or curve["0.5"]["a/accuracy"] != curve["0.0"]["a/accuracy"]
    )
    with pytest.raises(ValueError, match="eps"):
        robustness_curve(model, TASKS, split, [0.1, -0.1], "fgsm")


# ------------------------------------------------------------------- η readings and the attack loss (fgsm_sweep)
@pytest.mark.parametrize("reading", ["pixel", "std", "pixel255"])
def test_eta_units_pixel_step_is_eta_times_the_readings_scale_then_clipped(reading):
    from mtlkit.robustness import PIXEL_STD, eta_scale, fgsm_directions, perturb

    model = _model().eval()
    x, y = _batch(lo=0.0, hi=1.0)
    x[0, 0, 0, 0], x[0, 0, 0, 1] = 0.0, 1.0  # pixels on the range's ends
    scale = eta_scale(reading, PIXEL_STD["mnist"])
    assert scale == {"pixel": 1.0, "std": 0.3081, "pixel255": 1 / 255}[reading]
    with torch.enable_grad():
        d = fgsm_directions(model, TASKS, x, y)["*"]
    eta = 0.3
    adv = perturb(x, d, eta, scale)
    unclipped = perturb(x, d, eta, scale, clip=None)
    assert torch.allclose((unclipped - x).abs(), torch.full_like(x, eta * scale), atol=1e-6)  # |Δ| = η·scale
    assert float((adv - x).abs().max()) == pytest.approx(eta * scale, abs=1e-6)
    assert float(adv.min()) >= 0.0 and float(adv.max()) <= 1.0
    assert torch.equal(adv, unclipped.clamp(0, 1))  # clipping to the valid range, after the step
    # the same as plain FGSM at eps = η·scale
    assert torch.allclose(adv, fgsm(model, TASKS, x, y, eps=eta * scale), atol=1e-6)
    with pytest.raises(ConfigError, match="unknown η reading"):
        eta_scale("percent")
    with pytest.raises(ConfigError, match="std"):
        eta_scale("std")


def test_sweep_with_scale_equals_fgsm_at_the_scaled_eps_and_the_curve_for_scale_one():
    from mtlkit.robustness import fgsm_sweep

    x, y = _batch(n=40, lo=0.0, hi=1.0)
    model = _model()
    model.train()
    model(x)
    split = Split(x, y)
    etas = [0.0, 0.1, 0.3]
    ours = fgsm_sweep(model, TASKS, split, etas, scale=0.5, batch_size=16)
    for e in etas:
        assert ours[str(e)] == robust_metrics(model, TASKS, split, "fgsm", e * 0.5, batch_size=16)
    assert fgsm_sweep(model, TASKS, split, etas, batch_size=16) == robustness_curve(
        model, TASKS, split, etas, "fgsm", batch_size=16
    )
    with pytest.raises(ConfigError, match="attack loss"):
        fgsm_sweep(model, TASKS, split, etas, loss="max")
    with pytest.raises(ConfigError, match="scale > 0"):
        fgsm_sweep(model, TASKS, split, etas, scale=0.0)


def test_per_task_attack_uses_each_tasks_own_loss_and_agrees_with_sum_for_one_task():
    from mtlkit.models import MTLModel, SingleTaskModels
    from mtlkit.robustness import fgsm_directions, fgsm_sweep

    x, y = _batch(n=48, lo=0.0, hi=1.0)
    split = Split(x, y)
    etas = [0.0, 0.1, 0.4]
    shared = _model()
    shared.train()
    shared(x)
    shared.eval()
    with torch.enable_grad():
        dirs = fgsm_directions(shared, TASKS, x, y, "per-task")
        dsum = fgsm_directions(shared, TASKS, x, y, "sum")["*"]
    assert torch.equal(dirs["a"], _summed_ce_grad(shared, x, y, tasks=("a",)).sign())
    assert not torch.equal(dirs["a"], dsum)  # a shared encoder: the summed gradient differs from a's own
    per = fgsm_sweep(shared, TASKS, split, etas, loss="per-task", batch_size=16)
    summed = fgsm_sweep(shared, TASKS, split, etas, loss="sum", batch_size=16)
    assert per["0.0"] == summed["0.0"]  # no attack: nothing to differ
    assert per != summed
    # task a measured on the input attacked along a's own loss = FGSM targeted at a
    for e in etas:
        assert per[str(e)]["a/accuracy"] == robust_metrics(shared, TASKS, split, "fgsm", e, "a", 16)["a/accuracy"]
    # one task: per-task and sum are the same attack
    one = [TASKS[0]]
    single = Split(x, {"a": y["a"]})
    assert fgsm_sweep(shared, one, single, etas, loss="per-task", batch_size=16) == fgsm_sweep(
        shared, one, single, etas, loss="sum", batch_size=16
    )
    # independent models (STL): per-task = each member attacked alone on its own loss
    members: dict[str, MTLModel] = {}
    for k, t in enumerate("ab"):
        torch.manual_seed(10 + k)
        enc = nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.Tanh())
        members[t] = HPS(enc, {t: nn.Linear(12, 3)})
    stl = SingleTaskModels(members).eval()
    stl_per = fgsm_sweep(stl, TASKS, split, etas, loss="per-task", batch_size=16)
    for t in "ab":
        alone = fgsm_sweep(members[t], [Task(t, "multiclass", 3)], Split(x, {t: y[t]}), etas, batch_size=16)
        for e in etas:
            assert stl_per[str(e)][f"{t}/accuracy"] == alone[str(e)][f"{t}/accuracy"]
    assert fgsm_sweep(stl, TASKS, split, etas, loss="sum", batch_size=16) != stl_per  # the sum mixes the two
