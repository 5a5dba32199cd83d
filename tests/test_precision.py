"""``train.precision=bf16``: the training forward pass under autocast, the aggregation in float32.

The bound: bfloat16 keeps 8 significant bits (unit roundoff u = 2^-8). A dot product of k terms rounded to bf16,
with terms of both signs (random initial weights), carries a relative error of about sqrt(k)·u on its result; the
model here has inner dimensions up to k = 144 (12 x 12 inputs), and an update passes two such products forward and
two backward. Every method's aggregated update of the shared parameters must match the float32 one within
4·sqrt(k)·u (0.19): the per-task gradients carry the rounding, the aggregation (float32) must not amplify it
beyond that. A method that aggregated in bf16, or a NaN, fails by far.
"""

from __future__ import annotations

import math

import pytest
import torch

from mtlkit._registry import METHODS
from mtlkit.config import RunConfig
from mtlkit.errors import ConfigError
from mtlkit.train import Trainer
from mtlkit.weighting import StepContext

U_BF16 = 2.0**-8
K_MAX = 144  # the widest inner dimension of the model below (its 1x12x12 inputs)
TOL = 4 * math.sqrt(K_MAX) * U_BF16


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
@pytest.mark.parametrize("method", [m for m in METHODS.names() if m != "stl"])
def test_bf16_update_matches_float32_within_the_dtype_bound(method, tmp_path):
    a = _shared_update(method, "fp32", tmp_path / "fp32")
    b = _shared_update(method, "bf16", tmp_path / "bf16")
    assert a.dtype == b.dtype == torch.float32 and bool(torch.isfinite(b).all())
    rel = float((a - b).norm() / a.norm())
    assert 0 < rel <= TOL, f"{method}: relative difference {rel:.4f} (bound {TOL:.3f})"  # 0: autocast did nothing


def test_fp16_and_unknown_precisions_are_refused_with_the_reason(tmp_path):
    with pytest.raises(ConfigError, match=r"fp16 is not supported yet.*unscaled before aggregation"):
        Trainer(_cfg("ew", "fp16", tmp_path / "a"))
    with pytest.raises(ConfigError, match=r"unknown train\.precision 'fp8'"):
        Trainer(_cfg("ew", "fp8", tmp_path / "b"))
