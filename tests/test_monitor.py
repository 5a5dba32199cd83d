"""mtlkit.monitor: the statistics against direct computations, and the monitor in the training loop (it never
changes training, agrees with independent per-task gradients, survives a resume without duplicate rows)."""

import json
import math

import pytest
import torch

from mtlkit.config import RunConfig, check_run_config
from mtlkit.errors import ConfigError
from mtlkit.monitor import (
    MONITOR_FILE,
    Monitor,
    conflicting_pairs,
    cosine_matrix,
    gradient_stats,
    read_monitor,
)
from mtlkit.train import Trainer


def _cfg(path, method="ew", **train):
    t = {"epochs": 2, "batch_size": 32, "lr": 0.01, "seed": 0, "progress": False, "log_every": 1, **train}
    return RunConfig.from_dict(
        {
            "dataset": {"name": "_toy"},
            "method": {"name": method},
            "model": {"name": "hps", "options": {"encoder": "mlp", "hidden": [16], "head_hidden": 8}},
            "train": t,
            "output": {"dir": str(path), "tensorboard": False},
        }
    )


def _rows(path):
    return [json.loads(line) for line in (path / MONITOR_FILE).read_text().splitlines()]


# -- the statistics ------------------------------------------------------------------------------------------------
def test_gramian_and_jacobian_paths_agree_with_direct_cosines():
    g = torch.Generator().manual_seed(0)
    J = torch.randn(5, 40, generator=g, dtype=torch.float64)
    w = torch.rand(5, generator=g, dtype=torch.float64)
    d = w @ J
    direct_cos = torch.nn.functional.cosine_similarity(J[:, None, :], J[None, :, :], dim=-1)
    direct_ucos = torch.nn.functional.cosine_similarity(J, d[None, :], dim=-1)
    for s in (gradient_stats(gramian=J @ J.T, weights=w), gradient_stats(jacobian=J, update=d)):
        torch.testing.assert_close(s.cos, direct_cos, rtol=0, atol=1e-12)
        torch.testing.assert_close(s.norms, J.norm(dim=1), rtol=1e-12, atol=0)
        torch.testing.assert_close(s.update_cos, direct_ucos, rtol=0, atol=1e-12)
        assert s.update_norm == pytest.approx(float(d.norm()), rel=1e-12)
        assert s.conflicts == int((torch.triu(direct_cos, 1) < 0).sum())


def test_conflicts_count_pairs_once_and_a_zero_gradient_has_no_cosine():
    J = torch.tensor([[1.0, 0.0], [-1.0, 0.1], [0.0, 0.0]])  # tasks 0 and 1 conflict; task 2 has no gradient
    s = gradient_stats(jacobian=J, update=J.sum(0))
    assert s.conflicts == 1 and s.update_cos is not None
    assert math.isnan(s.cos[2, 0]) and math.isnan(s.cos[2, 2]) and math.isnan(s.update_cos[2])
    assert s.cos[0, 0] == 1.0 and s.norms[2] == 0.0
    assert conflicting_pairs(torch.full((3, 3), -0.5)) == 3  # the diagonal and the lower triangle never count


def test_cosines_stay_in_range_under_rounding():
    g = torch.ones(3, 7) * 1e-3  # identical rows: cos = 1 up to rounding, never above
    c = cosine_matrix(g @ g.T)
    assert float(c.max()) <= 1.0 and float(c.min()) >= 1.0 - 1e-6


def test_bad_inputs_are_errors():
    with pytest.raises(ValueError, match="T x T"):
        gradient_stats(gramian=torch.ones(2, 3))
    with pytest.raises(ValueError, match="3 weights"):
        gradient_stats(gramian=torch.eye(2), weights=torch.ones(3))
    with pytest.raises(ValueError, match="Gramian or a Jacobian"):
        gradient_stats()
    with pytest.raises(ValueError, match="update of 3"):
        gradient_stats(jacobian=torch.eye(2), update=torch.ones(3))
    with pytest.raises(ConfigError, match="log_every"):
        Monitor(every=0).check(None)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"train\.log_every must be >= 0"):
        check_run_config(RunConfig.from_dict({"train": {"log_every": -1}}))


def test_read_monitor_skips_a_cut_last_row_and_refuses_damage(tmp_path):
    p = tmp_path / MONITOR_FILE
    p.write_text('{"step": 1}\n{"step": 2')
    assert read_monitor(tmp_path) == [{"step": 1}]
    p.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(ConfigError, match="line 2"):
        read_monitor(p)


# -- in the training loop ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("method", "extra"), [("mgda", {}), ("pcgrad", {}), ("uw", {"monitor_gradients": True})])
def test_monitoring_never_changes_training(tmp_path, method, extra):
    off = Trainer(_cfg(tmp_path / "off", method, log_every=0)).fit()
    t = Trainer(_cfg(tmp_path / "on", method, **extra))
    on = t.fit()
    assert on.test == off.test
    a, b = (torch.load(tmp_path / d / "checkpoint.pt", weights_only=False)["model"] for d in ("off", "on"))
    for k, v in a.items():
        torch.testing.assert_close(b[k], v, rtol=0, atol=0)
    rows = _rows(tmp_path / "on")
    assert [r["step"] for r in rows] == list(range(1, 2 * t._steps_per_epoch + 1))
    assert all(r["grads"] in ("gramian", "extra_backward") and len(r["cos"]) == 2 for r in rows)
    assert not (tmp_path / "off" / MONITOR_FILE).exists()
    assert "monitor/conflicts" in on.history[0] and "monitor/a/grad_norm" in on.history[-1]


def test_engine_gramian_rows_agree_with_independent_per_task_gradients(tmp_path):
    """Step 1 of MGDA (Gramian formed by the engine without J) and of EW with T extra backward passes see the same
    model and batch: the same gradient norms and cosines, up to float32 summation order."""
    Trainer(_cfg(tmp_path / "mgda", "mgda", epochs=1)).fit()
    Trainer(_cfg(tmp_path / "ew", "ew", epochs=1, monitor_gradients=True)).fit()
    (g,), (e,) = _rows(tmp_path / "mgda")[:1], _rows(tmp_path / "ew")[:1]
    assert (g["grads"], e["grads"]) == ("gramian", "extra_backward")
    assert g["grad_norm"] == pytest.approx(e["grad_norm"], rel=1e-5)
    assert g["cos"][0][1] == pytest.approx(e["cos"][0][1], abs=1e-5)
    # EW's update is the sum of the task gradients: its cosines follow from G alone
    n, c = e["grad_norm"], e["cos"][0][1]
    norm = math.sqrt(n[0] ** 2 + n[1] ** 2 + 2 * c * n[0] * n[1])
    assert e["update_cos"][0] == pytest.approx((n[0] + c * n[1]) / norm, rel=1e-5)
    assert sum(g["agg_weight"]) == pytest.approx(1.0, rel=1e-5)  # MGDA's weights are convex


def test_without_per_task_gradients_only_losses_and_weights_are_logged(tmp_path):
    Trainer(_cfg(tmp_path / "uw", "uw", epochs=1, log_every=2)).fit()
    rows = _rows(tmp_path / "uw")
    assert [r["step"] for r in rows] == [1, 3]  # the first step, then every 2nd
    assert all(r["grads"] == "none" and "cos" not in r and len(r["loss_weight"]) == 2 for r in rows)


def _stop_at(monkeypatch, calls):
    real, count = Trainer._step, [0]

    def step(self, *args, **kwargs):
        count[0] += 1
        if count[0] == calls:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "_step", step)


def test_a_resumed_run_logs_each_step_once_and_the_same_rows(tmp_path, monkeypatch):
    full = Trainer(_cfg(tmp_path / "a", "mgda")).fit()
    cfg = _cfg(tmp_path / "b", "mgda", checkpoint_minutes=1e-9)
    t = Trainer(cfg)
    _stop_at(monkeypatch, t._steps_per_epoch + 2)  # killed in the second step of the second epoch
    with pytest.raises(KeyboardInterrupt):
        t.fit()
    with open(tmp_path / "b" / MONITOR_FILE, "a") as f:
        f.write('{"step": 99, "cut sh')  # a row half-written when the process died
    monkeypatch.undo()
    resumed = Trainer(cfg).fit(resume=True)
    assert _rows(tmp_path / "b") == _rows(tmp_path / "a")  # each step once, bit for bit the same values
    drop = {"seconds"}
    assert [{k: v for k, v in h.items() if k not in drop} for h in resumed.history] == [
        {k: v for k, v in h.items() if k not in drop} for h in full.history
    ]  # the epoch means of the monitor too


def test_monitoring_may_be_switched_on_when_resuming(tmp_path):
    Trainer(_cfg(tmp_path, "pcgrad", epochs=1, log_every=0)).fit()
    Trainer(_cfg(tmp_path, "pcgrad", epochs=2, log_every=3)).fit(resume=True)
    steps = [r["step"] for r in _rows(tmp_path)]
    t = Trainer(_cfg(tmp_path / "x", "pcgrad"))
    n = t._steps_per_epoch
    assert steps == [s + 1 for s in range(n, 2 * n) if s % 3 == 0]  # only the steps trained with monitoring


def test_tensorboard_gets_the_monitor_scalars_and_the_cosine_image(tmp_path):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    cfg = _cfg(tmp_path, "mgda", epochs=1).override(["output.tensorboard=true"])
    Trainer(cfg).fit()
    acc = event_accumulator.EventAccumulator(str(tmp_path / "tb" / "monitor"))
    acc.Reload()
    tags = acc.Tags()
    assert {"monitor/conflicts", "monitor/grad_norm/a", "monitor/cos/a~b", "monitor/agg_weight/b"} <= set(
        tags["scalars"]
    )
    assert "monitor/cosine" in tags["images"]
    rows = _rows(tmp_path)
    assert [e.step for e in acc.Scalars("monitor/conflicts")] == [r["step"] for r in rows]
    assert [e.value for e in acc.Scalars("monitor/cos/a~b")] == pytest.approx([r["cos"][0][1] for r in rows])
