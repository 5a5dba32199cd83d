"""``train.precision``: bf16 and fp16 autocast of the training forward pass, the aggregation in float32; fp16's loss
scale is removed from the per-task gradients before aggregation.

bf16. The bound: bfloat16 keeps 8 significant bits (unit roundoff u = 2^-8). A dot product of k terms rounded to bf16,
with terms of both signs (random initial weights), carries a relative error of about sqrt(k)·u on its result; the
model here has inner dimensions up to k = 144 (12 x 12 inputs), and an update passes two such products forward and
two backward. Every method's aggregated update of the shared parameters must match the float32 one within
4·sqrt(k)·u (0.19): the per-task gradients carry the rounding, the aggregation (float32) must not amplify it
beyond that. A method that aggregated in bf16, or a NaN, fails by far.

fp16 (a ``torch.amp.GradScaler`` with scale S). The engine given ``S·losses`` and ``loss_scale=S`` must write S times
the update the aggregator makes of the *unscaled* per-task gradients. Every registered method is checked against the
unscaled computation (float32): the scaled backward rounds each of its products differently from the unscaled one
(for S not a power of two), a relative difference of about eps per operation along a few layers; the tolerance is
32·eps32. Mis-handling the scale fails by far: a factor S on the update, or (what the unscaling is for) Nash-MTL,
FairGrad, MoCo and MoDo applied to S·J, which are not positively homogeneous (their update is not S times the one of
J; relative differences > 0.1 here). Then fp16 training runs on CPU (torch's CPU scaler): the update of the
scale-sensitive methods matches float32 within float16's bound (unit roundoff 2^-11, the same 4·sqrt(k)·u), steps
that overflow are skipped rather than raised on (the scale halves, the weights stay, a stateful aggregator's state
too), a NaN loss still raises, and a run resumed from its checkpoint (with the scaler's state) equals a straight run
bit for bit.
"""

from __future__ import annotations

import math

import pytest
import torch

from mtlkit import runs
from mtlkit._registry import METHODS
from mtlkit.config import RunConfig, check_precision
from mtlkit.engine.autodiff import backward, stack
from mtlkit.errors import ConfigError, NonFiniteLossError
from mtlkit.methods import build_method
from mtlkit.train import Trainer
from mtlkit.weighting import StepContext

U_BF16 = 2.0**-8
U_FP16 = 2.0**-11
K_MAX = 144  # the widest inner dimension of the model below (its 1x12x12 inputs)
TOL = 4 * math.sqrt(K_MAX) * U_BF16
TOL_FP16 = 4 * math.sqrt(K_MAX) * U_FP16
TOL_SCALE = 32 * torch.finfo(torch.float32).eps
#: Every registered method but STL (one model per task: nothing is aggregated).
METHOD_NAMES = [m for m in METHODS.names() if m != "stl"]
#: Methods whose update is not positively homogeneous in J: aggregating S·J changes them.
SCALE_SENSITIVE = ["nash_mtl", "fairgrad", "moco", "modo"]


def _cfg(method: str, precision: str, out) -> RunConfig:
    return RunConfig.from_dict(
        {
            "dataset": {"name": "_toy", "options": {"n_train": 64, "n_val": 16, "n_test": 16}},
            "model": {"name": "hps", "options": {"encoder": "mlp", "hidden": [32], "head_hidden": 16}},
            # TDB's default reads each task's first layer, which HPS heads do not declare: its other reading
            "method": {"name": method, "options": {"grad_at": "last_shared_layer"} if method == "mtmlan_tdb" else {}},
            "train": {
                "epochs": 1,
                "batch_size": 64,
                "optimizer": "sgd",
                "lr": 1e-12,  # the step leaves the weights as they were: only the gradients are compared
                "momentum": 0.0,
                "progress": False,
                "log_every": 0,
                "precision": precision,
                "seed": 0,
                "device": "cpu",
            },
            "output": {"dir": str(out), "overwrite": True, "tensorboard": False},
        }
    )


def _shared_update(method: str, precision: str, out) -> torch.Tensor:
    tr = Trainer(_cfg(method, precision, out))
    if tr.method.weighting.needs_task_counts:  # what the loop gives MTMLAN's TDB before training
        tr.method.weighting.set_counts([5, 7], num_samples=64)
    x = tr.data.train.x
    ys = dict(tr.data.train.y)
    ctx = StepContext(
        step=0,
        epoch=0,
        shared_params=tr._shared,
        last_shared_layer=tr._last_layer,
        task_names=tr.train_names,
        task_layers=tr._task_layers,
    )
    torch.manual_seed(1)  # randomised methods (RLW, GradDrop, PCGrad's order) draw the same in both runs
    tr._step(x, ys, ctx)
    return torch.cat([p.grad.reshape(-1) for p in tr.model.shared_parameters() if p.grad is not None])


@pytest.mark.filterwarnings("ignore:method 'dwa' keeps every task weight at 1")
@pytest.mark.parametrize("method", METHOD_NAMES)
def test_bf16_update_matches_float32_within_the_dtype_bound(method, tmp_path):
    a = _shared_update(method, "fp32", tmp_path / "fp32")
    b = _shared_update(method, "bf16", tmp_path / "bf16")
    assert a.dtype == b.dtype == torch.float32 and bool(torch.isfinite(b).all())
    rel = float((a - b).norm() / a.norm())
    assert 0 < rel <= TOL, f"{method}: relative difference {rel:.4f} (bound {TOL:.3f})"  # 0: autocast did nothing


def test_unknown_precisions_are_refused_and_fp16_is_accepted(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown train\.precision 'fp8'"):
        Trainer(_cfg("ew", "fp8", tmp_path / "b"))
    check_precision("fp16")


# -- fp16: the engine under a loss scale -----------------------------------------------------------------------------
#: The engine's routes to the per-task gradients: J without a representation; with z at parameter level (Gramian-based
#: methods: the Gramian from the encoder's pieces, EncoderGramian); the rows ∂L_t/∂z at representation level.
PATHS = ("parameter", "encoder", "representation")


def _engine(method: str, path: str, scale: float | None, told: bool = True, half: bool = False):
    """What the engine writes on a 3-task MLP for ``method``'s aggregator with the losses multiplied by ``scale``
    (the engine given ``loss_scale=scale`` when ``told``): the shared and the heads' gradients, flat and divided by
    ``scale``, the BackwardInfo and the aggregator. ``half``: the heads read z through a float16 cast (where
    autocast's float16 gradients would overflow)."""
    torch.manual_seed(0)
    enc = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 6))
    heads = torch.nn.ModuleList([torch.nn.Linear(6, 1) for _ in range(3)])
    x, ys = torch.randn(7, 5), torch.randn(3, 7, 1)
    agg = build_method(method).aggregator
    z = enc(x)
    losses = stack([(h(z.half().float() if half else z) - y).pow(2).mean() for h, y in zip(heads, ys, strict=True)])
    torch.manual_seed(1)  # randomised aggregators draw the same in every run
    info = backward(
        losses if scale is None else losses * scale,
        list(enc.parameters()),
        agg,
        representation=None if path == "parameter" else z,
        level="representation" if path == "representation" else "parameter",
        loss_scale=scale if told else None,
    )
    S = 1.0 if scale is None else scale
    shared, own = (
        torch.cat([p.grad.reshape(-1) / S for p in m.parameters() if p.grad is not None]) for m in (enc, heads)
    )
    return torch.cat([shared, own]), shared, info, agg


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_the_loss_scale_is_removed_before_aggregation_for_every_method(method):
    """S·losses with loss_scale=S: .grad is S times the unscaled update (heads included), and what BackwardInfo
    reports (J, G, the update, the weights) is the unscaled computation's."""
    for path in PATHS:
        ref, _, ref_info, _ = _engine(method, path, None)
        # not a power of two (the scaler's are): the scaled computation rounds differently, within the tolerance
        got, _, info, _ = _engine(method, path, 3000.0)
        where = f"{method} ({path})"
        assert _rel(got, ref) <= TOL_SCALE, f"{where}: relative difference {_rel(got, ref):.2e}"
        assert not info.overflow
        for field in ("jacobian", "update", "gramian", "weights"):
            a, b = getattr(info, field), getattr(ref_info, field)
            assert (a is None) == (b is None), f"{where}: {field}"
            if b is not None and bool(b.ne(0).any()):
                assert _rel(a, b) <= TOL_SCALE, f"{where}: {field} differs by {_rel(a, b):.2e}"


@pytest.mark.parametrize("method", SCALE_SENSITIVE)
def test_aggregating_the_scaled_gradients_would_change_these_methods(method):
    """Why the engine unscales first: given S·J (the engine not told the scale), these methods' update divided by S
    is another update; the test above would catch an engine that did so."""
    ref = _engine(method, "encoder", None)[0]
    wrong = _engine(method, "encoder", 2.0**16, told=False)[0]
    assert _rel(wrong, ref) > 0.1


@pytest.mark.parametrize("path", PATHS)
def test_an_overflowing_scaled_gradient_skips_the_aggregation(path):
    """S·∂L/∂z beyond float16's range at the heads' float16 input: the per-task gradients are inf. Told the scale,
    the engine skips the aggregation (Nash-MTL's state untouched) and sets the shared gradients to inf for the
    scaler; not told, the same gradients are an error, as in float32."""
    S = 2.0**40
    _, shared, info, agg = _engine("nash_mtl", path, S, half=True)
    assert info.overflow and info.jacobian is None and info.update is None and info.gramian is None
    assert shared.numel() == 8 * 5 + 8 + 6 * 8 + 6 and bool(torch.isinf(shared).all())
    assert agg.state_dict() == {"step": 0, "alpha": None}
    with pytest.raises(FloatingPointError, match="NaN or inf"):
        _engine("nash_mtl", path, S, told=False, half=True)


def test_the_engine_refuses_a_bad_loss_scale():
    w = torch.ones(2, requires_grad=True)
    for bad in (0.0, -2.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="loss_scale must be a finite number > 0"):
            backward(stack([w[0] * 2, w[1] * 3]), [w], build_method("mgda").aggregator, loss_scale=bad)


# -- fp16: training on CPU -------------------------------------------------------------------------------------------
def _train_cfg(method: str, out, epochs: int = 1, level: str | None = None) -> RunConfig:
    """A few fp16 steps of a small MLP on the 2-task toy data (4 steps per epoch)."""
    return RunConfig.from_dict(
        {
            "dataset": {"name": "_toy", "options": {"n_train": 64, "n_val": 16, "n_test": 16}},
            "model": {"name": "hps", "options": {"encoder": "mlp", "hidden": [32], "head_hidden": 16}},
            "method": {"name": method, **({"level": level} if level else {})},
            "train": {
                "epochs": epochs,
                "batch_size": 16,
                "optimizer": "adam",
                "lr": 1e-2,
                "progress": False,
                "log_every": 0,
                "precision": "fp16",
                "seed": 0,
                "device": "cpu",
                "checkpoint_minutes": 0,
            },
            "output": {"dir": str(out), "tensorboard": False},
        }
    )


@pytest.mark.parametrize("method", ["ew", "mgda", *SCALE_SENSITIVE])
def test_fp16_update_matches_float32_within_the_dtype_bound(method, tmp_path):
    """The loop end to end: the weighted losses scaled, the engine unscaling, scaler.unscale_ before the step."""
    a = _shared_update(method, "fp32", tmp_path / "fp32")
    b = _shared_update(method, "fp16", tmp_path / "fp16")
    assert bool(torch.isfinite(b).all())
    rel = _rel(b, a)
    assert 0 < rel <= TOL_FP16, f"{method}: relative difference {rel:.4f} (bound {TOL_FP16:.3f})"


TRAINED = [("ew", None), ("uw", None), ("famo", None), ("nash_mtl", None), ("pcgrad", None), ("mgda", "representation")]


@pytest.mark.parametrize(("method", "level"), TRAINED)
def test_fp16_training_on_cpu_finishes_with_finite_weights(method, level, tmp_path):
    tr = Trainer(_train_cfg(method, tmp_path, level=level))
    before = [p.detach().clone() for p in tr.model.parameters()]
    tr.fit()
    assert tr.scaler.is_enabled()
    after = list(tr.model.parameters())
    assert all(bool(torch.isfinite(p).all()) for p in after)
    assert all(not torch.equal(a, b) for a, b in zip(before, after, strict=True))
    # the scaler's first scale overflows nothing on this model: each of the 4 steps was taken
    assert tr.scaler.state_dict()["scale"] == 2.0**16 and tr.scaler.state_dict()["_growth_tracker"] == 4


# torch's warning when no optimizer step has run by the scheduler's first step (every step here is skipped)
@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before `optimizer.step\\(\\)`")
@pytest.mark.parametrize(("method", "level"), TRAINED)
def test_fp16_steps_that_overflow_are_skipped_and_lower_the_scale(method, level, tmp_path):
    tr = Trainer(_train_cfg(method, tmp_path, level=level))
    tr.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40)  # every scaled gradient overflows float16
    before = [p.detach().clone() for p in tr.model.parameters()]
    tr.fit()  # no NonFiniteLossError
    assert tr.scaler.get_scale() == 2.0**36  # 4 steps, 4 overflows: halved each time
    assert all(torch.equal(a, b) for a, b in zip(before, tr.model.parameters(), strict=True))
    assert not tr.optimizer.state  # no step was taken
    if method == "nash_mtl":
        assert tr.method.aggregator.state_dict() == {"step": 0, "alpha": None}


def test_fp16_a_nan_loss_is_still_an_error(tmp_path):
    tr = Trainer(_train_cfg("nash_mtl", tmp_path))
    with torch.no_grad():
        next(tr.model.parameters()).view(-1)[0] = float("nan")
    with pytest.raises(NonFiniteLossError, match="non-finite loss"):
        tr.fit()


def test_fp16_resume_restores_the_scaler_and_equals_a_straight_run(tmp_path):
    """A scaler that doubles S after every step taken and halves it after every overflow: on this model some steps
    of epoch 2 overflow, at a scale only the checkpoint's scaler state knows (a fresh scaler would skip none).
    Nash-MTL: a stateful aggregator (its warm start) that skipped steps must not have touched."""
    method = "nash_mtl"

    def scaler() -> torch.amp.GradScaler:
        return torch.amp.GradScaler("cpu", init_scale=2.0**20, growth_interval=1)

    straight = Trainer(_train_cfg(method, tmp_path / "straight", epochs=2))
    straight.scaler = scaler()
    straight.fit()
    first = Trainer(_train_cfg(method, tmp_path / "resumed", epochs=1))
    first.scaler = scaler()
    first.fit()
    Trainer(_train_cfg(method, tmp_path / "resumed", epochs=2)).fit(resume=True)  # its own scaler: replaced on resume
    a, b = (
        runs.load_checkpoint(tmp_path / d / "checkpoint.pt", map_location="cpu", hint="")
        for d in ("straight", "resumed")
    )
    assert a["scaler"] == b["scaler"] and a["scaler"]["scale"] != 2.0**16
    assert a["model"].keys() == b["model"].keys()
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
