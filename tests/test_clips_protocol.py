"""Issue 23 (MTMLAN half): the clips stand-in's features never see the concepts, TDB's one-backward gradient norms,
the shared GradNorm/TDB set-up of the reproduction, its paired verdicts and the shared-update probe."""

import math

import numpy as np
import pytest
import torch

from mtlkit.data import MTLData, Split
from mtlkit.data.clips import (
    PAPER_CLIPS,
    PAPER_COUNTS,
    always_absent_accuracy,
    check_pretrain_source,
    label_tasks,
    pretraining_images,
)
from mtlkit.engine.autodiff import per_task_grads
from mtlkit.errors import ConfigError
from mtlkit.models.mtmlan import SharedFrameNet
from mtlkit.reproduce.mtmlan import (
    PAPER_TABLE2,
    TDB_ROWS,
    SharedUpdateProbe,
    paired_verdict,
    row_spec,
    tdb_num_samples,
)
from mtlkit.weighting import MTMLANTDB, GradNorm, StepContext

# --- point 1: the frame encoder is never trained on the concepts ---------------------------------------------------


def test_pretraining_dataset_is_disjoint_from_the_frames():
    with pytest.raises(ConfigError, match="concept classes themselves"):
        check_pretrain_source("fashion", "fashion")
    with pytest.raises(ConfigError, match="unknown pretrain_source"):
        check_pretrain_source("fashion", "cifar")
    check_pretrain_source("fashion", "mnist")  # MNIST digits for Fashion-MNIST frames
    # the images come from the pre-training dataset that was passed, never from the frames' dataset
    digits: dict[str, np.ndarray] = {"x_train": np.full((50, 28, 28), 7, np.uint8), "y_train": np.arange(50) % 10}
    x, y = pretraining_images("fashion", "mnist", 20, 0, images=digits)
    assert x.shape == (20, 28, 28) and bool((x == 7).all()) and set(y.tolist()) <= set(range(10))
    x2, _ = pretraining_images("fashion", "mnist", 20, 0, images=digits)
    np.testing.assert_array_equal(x, x2)  # seeded


def test_clips_refuses_pretraining_on_its_own_frames_before_loading_anything(monkeypatch):
    import mtlkit.data.clips as clips

    def boom(name):
        raise AssertionError("images were loaded before the configuration was checked")

    monkeypatch.setattr(clips, "load_images", boom)
    with pytest.raises(ConfigError, match="pretrain_source"):
        clips.build_clips(features="pretrained", source="fashion", pretrain_source="fashion")
    with pytest.raises(ConfigError, match="feature_pool"):
        clips.build_clips(features="pretrained", feature_pool=9)


def test_always_absent_accuracy_and_the_papers_table_II():
    rates = always_absent_accuracy(PAPER_COUNTS, PAPER_CLIPS)
    assert rates == [round(1 - c / 1540, 4) for c in PAPER_COUNTS]
    # the paper's CMLC 'accuracies' of demonstration and victim are below what a constant 'absent' scores
    assert PAPER_TABLE2["CMLC"][0] < rates[0] and PAPER_TABLE2["CMLC"][5] < rates[5]
    with pytest.raises(ConfigError):
        always_absent_accuracy([10, 2000], 1540)


# --- point 2: a substantial trained shared network ----------------------------------------------------------------


def test_shared_frame_net_on_features_is_a_trained_mlp():
    net = SharedFrameNet((5, 12), width=6, frame_hidden=(16, 8))
    kinds = [type(m).__name__ for m in net.frame.children()]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d", "ReLU", "Linear", "ReLU"]
    assert net(torch.randn(3, 5, 12)).shape == (3, 5, 6)
    assert all(p.requires_grad for p in net.parameters())
    with pytest.raises(ConfigError, match="widths"):
        SharedFrameNet((5, 12), frame_hidden=(0,))


# --- TDB: one backward gives each task's first-layer gradient norm -------------------------------------------------


def _heads_problem():
    torch.manual_seed(0)
    shared = torch.nn.Linear(4, 5).double()
    heads = [
        torch.nn.Sequential(torch.nn.Linear(5, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1)).double() for _ in range(3)
    ]
    x = torch.randn(8, 4, dtype=torch.float64)
    z = torch.tanh(shared(x))
    losses = torch.stack([(h(z) - j).pow(2).mean() * (j + 1) for j, h in enumerate(heads)])
    return shared, heads, losses


def test_tdb_first_layer_norms_equal_per_task_gradients():
    _, heads, losses = _heads_problem()
    layers = [[h[0].weight, h[0].bias] for h in heads]
    tdb = MTMLANTDB(counts=[1, 2, 3])
    tdb._prepare(losses)
    got = tdb._unweighted_grad_norms(losses, StepContext(task_layers=layers))
    expect = torch.stack([per_task_grads(losses[j : j + 1], layers[j]).norm() for j in range(3)])
    torch.testing.assert_close(got, expect.to(got), rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="distinct"):
        tdb._unweighted_grad_norms(losses, StepContext(task_layers=[layers[0], layers[0], layers[2]]))


def test_tdb_with_uniform_penalty_is_gradnorm():
    shared, _, losses = _heads_problem()
    ctx = StepContext(last_shared_layer=[shared.weight])
    gn = GradNorm(alpha=1.0, lr=0.05, optimizer="sgd")
    tdb = MTMLANTDB(counts=[1, 1, 1], num_samples=1, alpha=1.0, lr=0.05, grad_at="last_shared_layer")
    for _ in range(3):
        gn(losses, ctx)
        tdb(losses * 1.0, ctx)
    torch.testing.assert_close(gn.weights(), tdb.weights())
    w = gn.weights()
    assert w is not None and not torch.allclose(w, torch.ones(3))  # the weights did move


# --- point 3: one set-up for GradNorm and every TDB row ----------------------------------------------------------


def test_rows_share_the_gradnorm_tdb_setup_and_penalties_average_one():
    counts = [91, 195, 584, 157]
    N = tdb_num_samples(counts)
    assert np.mean([N / c for c in counts]) == pytest.approx(1.0, rel=1e-12)
    specs = {r: row_spec(r, counts, 0.3, alpha=1.0, grad_at="task_first_layer") for r in TDB_ROWS}
    shared_keys = ("alpha", "lr", "optimizer", "grad_at")
    for r, s in specs.items():
        assert s["method"] == "mtmlan_tdb"
        assert {k: s["method_options"][k] for k in shared_keys} == {
            k: specs["GradNorm"]["method_options"][k] for k in shared_keys
        }, r
    assert specs["GradNorm"]["method_options"]["counts"] == [1] * 4
    assert specs["MTMLAN"]["method_options"]["counts"] == counts
    assert specs["MTMLAN w/o TIP"]["method_options"] == specs["GradNorm"]["method_options"]
    assert (specs["GradNorm"]["loss"], specs["MTMLAN"]["loss"]) == ("bce", "sample_level")
    with pytest.raises(ConfigError):
        tdb_num_samples([3, 0])


# --- points 4-5: paired verdicts --------------------------------------------------------------------------------


def test_paired_verdict_interval_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    d = [0.012, 0.031, 0.02, 0.018]
    verdict, mean, lo, hi = paired_verdict(d, ">")
    half = stats.t.ppf(0.975, len(d) - 1) * np.std(d, ddof=1) / math.sqrt(len(d))
    assert mean == pytest.approx(np.mean(d), rel=1e-12)
    # the quantile table holds 4 significant digits: the half-width agrees to 5e-4 relative
    assert (hi - lo) / 2 == pytest.approx(half, rel=5e-4)
    assert verdict == "reproduced"
    assert paired_verdict([-0.02, -0.03, -0.025], ">")[0] == "not reproduced (reversed)"
    assert paired_verdict([0.02, -0.03, 0.01], "≈")[0].startswith("reproduced")
    assert paired_verdict([0.2, 0.21, 0.19], "≈")[0] == "not reproduced"
    assert paired_verdict([0.1, 0.2], ">")[0].startswith("not testable")
    with pytest.raises(ConfigError):
        paired_verdict([0.1, 0.2, 0.3], "<")


# --- point 2: the probe measures what the weights do to the shared update -----------------------------------------


def _train_with_probe(tmp_path, method, options):
    from mtlkit.config import RunConfig
    from mtlkit.train import Trainer

    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 6, 5, generator=g)
    y = {"a": (x[:, :, 0].mean(1) > 0).long(), "b": (x[:, 2:4, 1].mean(1) > 0.3).long()}
    s = Split(x, y)
    data = MTLData("toy", label_tasks(["a", "b"]), s, s, s)
    cfg = RunConfig.from_dict(
        {
            "model": {"name": "mtmlan", "options": {"width": 8, "hidden": 4, "attention_dim": 4, "frame_hidden": [8]}},
            "method": {"name": method, "options": options},
            "train": {"epochs": 1, "batch_size": 10, "device": "cpu", "progress": False, "num_threads": 1},
            "output": {"tensorboard": False},
        }
    )
    probe = SharedUpdateProbe(every=1)
    threads = torch.get_num_threads()
    try:
        Trainer(cfg, data=data, run_dir=tmp_path / method, callbacks=[probe]).fit()
    finally:
        torch.set_num_threads(threads)
    return probe


def test_probe_sees_no_change_under_equal_weights_and_a_change_under_unequal_ones(tmp_path):
    eq = _train_with_probe(tmp_path, "ew", {})
    assert eq.results()["steps_measured"] == 4
    eps = torch.finfo(torch.float32).eps
    for r in eq.records:  # EW: the method's gradient is the equal-weight one
        assert r["grad_cos"] == pytest.approx(1.0, abs=1e3 * eps)
        assert r["grad_norm_ratio"] == pytest.approx(1.0, abs=1e3 * eps)
        assert r["adam_rel_diff"] < 1e3 * eps
    unequal = _train_with_probe(tmp_path, "constant", {"weights": [0.2, 1.8]})
    ratios = [r["weight_max_over_min"] for r in unequal.records]
    assert ratios == pytest.approx([9.0] * 4)
    assert max(r["grad_cos"] for r in unequal.records) < 1 - 1e-4
    with pytest.raises(ConfigError):
        SharedUpdateProbe(every=0)
