"""MMoE, CGC/PLE, cross-stitch, MTAN and DSelect-k: their equations, what they share, and that every one trains with a
parameter-level and a representation-level method (or refuses the latter with a ConfigError)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from mtlkit.config import RunConfig
from mtlkit.data import MTLData, Split
from mtlkit.errors import ConfigError
from mtlkit.models import build_model
from mtlkit.models.cross_stitch import CrossStitchUnit, stitch_init
from mtlkit.tasks import Task, stack_losses
from mtlkit.train import Trainer

TABULAR = {
    "mmoe": {"num_experts": 3, "expert_hidden": [8], "tower_hidden": 4},
    "cgc": {"task_experts": 2, "shared_experts": 2, "expert_hidden": [8], "tower_hidden": 4},
    "ple": {"num_levels": 3, "task_experts": 1, "shared_experts": 2, "expert_hidden": [8], "tower_hidden": 4},
    "cross_stitch": {"hidden": [8, 6], "head_hidden": 4},
    "dselect_k": {"num_experts": 3, "k": 2, "expert_hidden": [8], "tower_hidden": 4},
}
IMAGE = {
    "mmoe": {"num_experts": 2, "channels": 4, "width": 8},
    "cgc": {"task_experts": 1, "shared_experts": 1, "channels": 4, "width": 8},
    "ple": {"num_levels": 2, "task_experts": 1, "shared_experts": 1, "channels": 4, "width": 8},
    "cross_stitch": {"channels": 4, "width": 8, "head_hidden": 6},
    "mtan": {"channels": 4, "width": 8, "head_hidden": 6},
    "dselect_k": {"num_experts": 3, "k": 2, "gate": "static", "channels": 4, "width": 8},
}
#: models whose representation_is_shared_path is False (a representation-level method must be refused)
NO_REPRESENTATION = {"mtan", "ple"}


def tabular_data(n: int = 64, d: int = 7, tasks: int = 2, seed: int = 0) -> MTLData:
    """Small synthetic binary tasks on 7 features (unit tests only)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d, tasks, generator=g)

    def split(m: int) -> Split:
        x = torch.randn(m, d, generator=g)
        y = (x @ w > 0).long()
        return Split(x, {f"t{i}": y[:, i].clone() for i in range(tasks)})

    return MTLData("tab", [Task(f"t{i}", "binary") for i in range(tasks)], split(n), split(32), split(32))


def image_data(n: int = 48) -> MTLData:
    g = torch.Generator().manual_seed(1)

    def split(m: int) -> Split:
        x = torch.rand(m, 1, 12, 12, generator=g)
        return Split(x, {"a": (x[:, 0, :6].mean((1, 2)) > 0.5).long(), "b": (x[:, 0, 6:].mean((1, 2)) > 0.5).long()})

    return MTLData("img", [Task("a", "binary"), Task("b", "binary")], split(n), split(24), split(24))


def task_losses(model: nn.Module, data: MTLData) -> torch.Tensor:
    out = model(data.train.x)
    return stack_losses(data.tasks, out, data.train.y)


def reached(loss: torch.Tensor, params: list[nn.Parameter]) -> list[bool]:
    """Per parameter, whether ``loss`` has a non-zero gradient w.r.t. it."""
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return [g is not None and bool(g.abs().sum() > 0) for g in grads]


# --- MMoE ---------------------------------------------------------------------------------------------------------


def test_mmoe_gates_are_softmax_distributions_per_task_and_mix_as_eq6():
    torch.manual_seed(0)
    data = tabular_data(tasks=3)
    m: Any = build_model("mmoe", data, num_experts=5, expert_hidden=[6], tower_hidden=4).double()
    x = torch.randn(11, 7, dtype=torch.float64)
    w = m.gate_weights(x)
    assert sorted(w) == ["t0", "t1", "t2"]
    for g in w.values():
        assert g.shape == (11, 5) and bool((g > 0).all())
        torch.testing.assert_close(g.sum(1), torch.ones(11, dtype=torch.float64), rtol=0, atol=1e-12)
    assert not torch.allclose(w["t0"], w["t1"])  # each task has its own gate
    # Eq. 6 written out: tower_k(Σ_i g^k(x)_i f_i(x))
    out = m(x)
    for name, tw in m.towers.items():
        mix = sum(w[name][:, i : i + 1] * e(x) for i, e in enumerate(m.encoder))
        torch.testing.assert_close(out[name], tw(mix), rtol=0, atol=1e-12)


def test_mmoe_shared_part_is_the_experts_and_decode_needs_encode():
    data = tabular_data()
    m: Any = build_model("mmoe", data, **TABULAR["mmoe"])
    expert_ids = {id(p) for p in m.encoder.parameters()}
    assert {id(p) for p in m.shared_parameters()} == expert_ids
    assert len(m.last_shared_layer()) == 3  # one weight per expert
    z = m.encode(data.train.x)
    assert z.shape == (64, 3, 8)
    with pytest.raises(RuntimeError, match="call encode first"):
        m.decode(z[:5])


# --- CGC / PLE ------------------------------------------------------------------------------------------------------


def test_cgc_task_experts_are_reached_only_through_their_own_gate():
    torch.manual_seed(0)
    data = tabular_data()
    m: Any = build_model("cgc", data, **TABULAR["cgc"])
    losses = task_losses(m, data)
    experts = {t: list(m.task_experts[0][t].parameters()) for t in ("t0", "t1")}
    shared = list(m.shared_experts[0].parameters())
    grads = torch.autograd.grad(losses[0], experts["t1"], retain_graph=True, allow_unused=True)
    assert all(g is None or bool((g == 0).all()) for g in grads)  # exactly zero, not merely small
    assert any(reached(losses[0], experts["t0"])) and any(reached(losses[0], shared))
    assert any(reached(losses[1], experts["t1"])) and any(reached(losses[1], shared))
    assert {id(p) for p in m.shared_parameters()} == {id(p) for p in shared}


def test_ple_last_level_task_experts_are_private_lower_levels_reach_every_task_through_the_shared_gate():
    torch.manual_seed(0)
    data = tabular_data()
    m: Any = build_model("ple", data, **TABULAR["ple"])
    losses = task_losses(m, data)
    last = list(m.task_experts[-1]["t1"].parameters())
    grads = torch.autograd.grad(losses[0], last, retain_graph=True, allow_unused=True)
    assert all(g is None or bool((g == 0).all()) for g in grads)
    # Sec. 4.3: the shared gate of a lower level mixes every task's experts into the shared branch
    assert any(reached(losses[0], list(m.task_experts[0]["t1"].parameters())))


@pytest.mark.parametrize("name", ["mmoe", "cgc", "ple", "cross_stitch", "dselect_k"])
def test_shared_parameters_are_exactly_those_reached_by_more_than_one_task(name):
    torch.manual_seed(0)
    data = tabular_data(tasks=3)
    m: Any = build_model(name, data, **TABULAR[name])
    losses = task_losses(m, data)
    params = list(m.parameters())
    hits = torch.tensor([reached(losses[t], params) for t in range(3)]).sum(0)
    shared = {id(p) for p in m.shared_parameters()}
    for p, h in zip(params, hits.tolist(), strict=True):
        assert h == (3 if id(p) in shared else 1), (name, tuple(p.shape), h)


def test_image_models_share_exactly_what_reaches_every_task():
    torch.manual_seed(0)
    data = image_data()
    for name in ("mtan", "ple", "cross_stitch", "dselect_k"):
        m: Any = build_model(name, data, **IMAGE[name])
        losses = task_losses(m, data)
        params = list(m.parameters())
        hits = torch.tensor([reached(losses[t], params) for t in range(2)]).sum(0)
        shared = {id(p) for p in m.shared_parameters()}
        for p, h in zip(params, hits.tolist(), strict=True):
            assert h == (2 if id(p) in shared else 1), (name, tuple(p.shape), h)


# --- cross-stitch ---------------------------------------------------------------------------------------------------


def test_cross_stitch_units_start_as_stated_and_mix_as_eq1():
    torch.testing.assert_close(stitch_init(2), torch.tensor([[0.9, 0.1], [0.1, 0.9]]))
    a3 = stitch_init(3, 0.7)
    torch.testing.assert_close(a3.sum(1), torch.ones(3))
    assert float(a3[0, 0]) == pytest.approx(0.7) and float(a3[0, 1]) == pytest.approx(0.15)
    with pytest.raises(ConfigError, match="alpha_same"):
        stitch_init(2, 1.5)
    torch.manual_seed(0)
    unit = CrossStitchUnit(3, 0.8, lr_scale=100.0).double()
    with torch.no_grad():
        unit.beta.add_(0.01 * torch.randn(3, 3, dtype=torch.float64))  # any α, not only the initial one
    xs = torch.randn(3, 4, 2, 5, 5, dtype=torch.float64)  # (tasks, batch, channels, H, W)
    out = unit(xs)
    alpha = unit.alpha
    for t in range(3):
        torch.testing.assert_close(out[t], sum(alpha[t, s] * xs[s] for s in range(3)), rtol=0, atol=1e-12)


def test_cross_stitch_lr_scale_multiplies_the_first_adam_step_of_alpha():
    for scale in (1.0, 1000.0):
        unit = CrossStitchUnit(2, 0.9, lr_scale=scale).double()
        torch.testing.assert_close(unit.alpha, stitch_init(2).double())  # the scale never changes the initial α
        opt = torch.optim.Adam(unit.parameters(), lr=1e-4, eps=1e-30)
        before = unit.alpha.detach().clone()
        xs = torch.randn(2, 8, 3, dtype=torch.float64)
        unit(xs).pow(2).sum().backward()
        opt.step()
        # Adam's first step moves every parameter by lr·sign(g): α = scale·β moves by scale·lr
        torch.testing.assert_close((unit.alpha - before).abs(), torch.full((2, 2), scale * 1e-4).double())


# --- MTAN -----------------------------------------------------------------------------------------------------------


def test_mtan_masks_lie_in_open_unit_interval_and_gate_the_shared_features():
    torch.manual_seed(0)
    data = image_data()
    m: Any = build_model("mtan", data, **IMAGE["mtan"]).double().eval()
    x = data.train.x[:6].double()
    masks = m.attention_masks(x)
    assert sorted(masks) == ["a", "b"] and all(len(v) == 3 for v in masks.values())
    for a in (a for v in masks.values() for a in v):
        assert bool((a > 0).all()) and bool((a < 1).all())
    assert not torch.allclose(masks["a"][0], masks["b"][0])  # task-specific masks
    with pytest.raises(TypeError, match="no shared representation"):
        m.encode(x)


def test_mtan_refuses_tabular_inputs():
    with pytest.raises(ConfigError, match="image inputs"):
        build_model("mtan", tabular_data())


# --- every architecture x a parameter-level and a representation-level method -------------------------------------


def _run(tmp_path, data: MTLData, model: str, options: dict, method: str, level: str):
    cfg = RunConfig.from_dict(
        {
            "dataset": {"name": "_toy"},
            "model": {"name": model, "options": options},
            "method": {"name": method, "level": level},
            "train": {"epochs": 1, "batch_size": 16, "lr": 1e-3, "seed": 0, "progress": False},
            "output": {"dir": str(tmp_path / f"{model}-{method}-{level}"), "tensorboard": False},
        }
    )
    return Trainer(cfg, data=data)


CASES = [("tab", n, o) for n, o in TABULAR.items()] + [("img", n, o) for n, o in IMAGE.items()]


@pytest.mark.parametrize(("kind", "name", "options"), CASES, ids=[f"{k}-{n}" for k, n, _ in CASES])
def test_every_architecture_trains_with_pcgrad_and_with_representation_level_mgda(tmp_path, kind, name, options):
    torch.manual_seed(0)
    data = tabular_data() if kind == "tab" else image_data()
    trainer = _run(tmp_path, data, name, options, "pcgrad", "parameter")
    before = [p.detach().clone() for p in trainer.model.parameters()]
    result = trainer.fit()
    assert all(0.0 <= result.test[f"{t.name}/accuracy"] <= 1.0 for t in data.tasks)
    moved = [not torch.equal(b, p.detach()) for b, p in zip(before, trainer.model.parameters(), strict=True)]
    assert all(moved)  # every parameter, shared or task-owned, got an update
    options = {**options, "num_levels": 1} if name == "ple" and kind == "tab" else options  # PLE(1) = CGC: allowed
    if name in NO_REPRESENTATION and not (name == "ple" and kind == "tab"):
        with pytest.raises(ConfigError, match="representation level"):
            _run(tmp_path, data, name, options, "mgda", "representation")
    else:
        result = _run(tmp_path, data, name, options, "mgda", "representation").fit()
        assert all(0.0 <= result.test[f"{t.name}/accuracy"] <= 1.0 for t in data.tasks)


def test_bad_architecture_options_are_config_errors():
    data = tabular_data()
    with pytest.raises(ConfigError, match="num_experts"):
        build_model("mmoe", data, num_experts=0)
    with pytest.raises(ConfigError, match="conv experts need"):
        build_model("mmoe", data, expert="conv")
    with pytest.raises(ConfigError, match="num_levels"):
        build_model("ple", data, num_levels=0)
    with pytest.raises(ConfigError, match="no option"):
        build_model("cgc", data, num_levels=2)
    with pytest.raises(ConfigError, match="alpha_lr_scale"):
        build_model("cross_stitch", data, alpha_lr_scale=0.0)
    with pytest.raises(ConfigError, match="dselect_k: k "):
        build_model("dselect_k", data, k=0)
    with pytest.raises(ConfigError, match="unknown gate"):
        build_model("dselect_k", data, gate="softmax")
