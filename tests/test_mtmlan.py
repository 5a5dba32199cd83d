"""MTMLAN pieces: the sample-level loss (Eq. 9), the self-attention (Eq. 5-6), the models, the multi-label metrics
against scikit-learn, the clips builder (counts, co-occurrence, split pools, determinism), yeast parsing, and a
short end-to-end run through the trainer with TDB."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mtlkit.data import MTLData, Split
from mtlkit.data.clips import (
    BACKGROUND_CLASSES,
    CONCEPT_CLASSES,
    CONCEPTS,
    PAPER_COUNTS,
    ClipSpec,
    assign_labels,
    label_tasks,
    make_layout,
)
from mtlkit.data.yeast import parse_yeast_csv
from mtlkit.errors import ConfigError, DataError
from mtlkit.metrics.multilabel import (
    average_precision_per_label,
    hamming_loss,
    mean_average_precision,
    micro_f1,
    multilabel_report,
    per_label_accuracy,
)
from mtlkit.models import build_model
from mtlkit.models.mtmlan import SelfAttention, SharedFrameNet
from mtlkit.nn.losses import focal_bce, sample_level_loss

skm = pytest.importorskip("sklearn.metrics")


# --- Eq. 9 -------------------------------------------------------------------------------------------------------


def test_focal_equals_bce_at_beta_zero():
    torch.manual_seed(0)
    z, y = torch.randn(50) * 3, (torch.rand(50) > 0.5).float()
    torch.testing.assert_close(focal_bce(z, y, beta=0.0), F.binary_cross_entropy_with_logits(z, y))
    torch.testing.assert_close(
        focal_bce(z, y, beta=0.0, reduction="none"), F.binary_cross_entropy_with_logits(z, y, reduction="none")
    )


def test_focal_hand_values_at_beta_two():
    # p = 0.8 for y = 1: -(0.2)^2 log 0.8 ; p = 0.8 for y = 0: p_k = 0.2, -(0.8)^2 log 0.2
    z = torch.log(torch.tensor([0.8 / 0.2, 0.8 / 0.2], dtype=torch.float64))
    got = focal_bce(z, torch.tensor([1.0, 0.0], dtype=torch.float64), beta=2.0, reduction="none")
    expect = torch.tensor([-(0.2**2) * math.log(0.8), -(0.8**2) * math.log(0.2)], dtype=torch.float64)
    torch.testing.assert_close(got, expect)


def test_focal_downweights_easy_examples_and_is_differentiable():
    z = torch.tensor([4.0, -0.5], requires_grad=True)  # an easy positive, a hard positive
    y = torch.ones(2)
    ratio = focal_bce(z, y, 2.0, "none") / F.binary_cross_entropy_with_logits(z, y, reduction="none")
    assert ratio[0] < 0.01 and ratio[1] > 0.3
    focal_bce(z, y).backward()
    assert torch.isfinite(z.grad).all() and (z.grad < 0).all()


def test_focal_bad_input():
    with pytest.raises(ValueError, match="elements"):
        focal_bce(torch.zeros(3), torch.zeros(4))
    with pytest.raises(ValueError, match="beta"):
        focal_bce(torch.zeros(3), torch.zeros(3), beta=-1)
    with pytest.raises(ValueError, match="0 or 1"):
        focal_bce(torch.zeros(2), torch.tensor([0.0, 2.0]))
    with pytest.raises(ValueError, match="reduction"):
        focal_bce(torch.zeros(2), torch.zeros(2), reduction="max")


def test_sample_level_loss_is_a_task_option():
    a, b = label_tasks(["a"], loss="sample_level", beta=2.0)[0], label_tasks(["a"], loss="bce")[0]
    out, y = torch.tensor([[3.0], [-1.0]]), torch.tensor([1, 1])
    assert float(a.compute_loss(out, y)) < float(b.compute_loss(out, y))
    torch.testing.assert_close(a.compute_loss(out, y), focal_bce(out, y, 2.0))
    with pytest.raises(ConfigError, match="unknown label loss"):
        label_tasks(["a"], loss="focal")
    assert sample_level_loss(0.0)(out, y) == pytest.approx(float(b.compute_loss(out, y)))


# --- attention and models -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("hops", [1, 3])
def test_attention_rows_sum_to_one_over_frames_and_A_is_MH(hops):
    torch.manual_seed(0)
    att = SelfAttention(6, 5, hops)
    H = torch.randn(4, 9, 6)
    A, M = att(H)
    assert M.shape == (4, hops, 9)
    torch.testing.assert_close(M.sum(-1), torch.ones(4, hops))
    assert (M >= 0).all()
    torch.testing.assert_close(A, torch.bmm(M, H).flatten(1))
    # Eq. 5 by hand for the first clip
    manual = torch.softmax((att.w_s2.weight @ torch.tanh(att.w_s1.weight @ H[0].T)), dim=-1)
    torch.testing.assert_close(M[0], manual)


def _toy_data(shape, n=12, labels=("a", "b", "c")):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, *shape, generator=g)
    y = {k: (torch.rand(n, generator=g) > 0.5).long() for k in labels}
    s = Split(x, y)
    return MTLData("toy", label_tasks(list(labels)), s, s, s)


def test_mtmlan_and_cmlc_on_frames_features_and_tabular():
    for shape in [(5, 1, 28, 28), (5, 7), (11,)]:
        data = _toy_data(shape)
        m, c = (
            build_model("mtmlan", data, width=8, hidden=4, attention_dim=4),
            build_model("cmlc", data, width=8, hidden=4),
        )
        for model in (m, c):
            out = model(data.train.x[:3])
            assert set(out) == {"a", "b", "c"} and all(v.shape == (3, 1) for v in out.values())
        layers = m.task_first_layers()
        assert len(layers) == 3
        # the first layers are task-specific: distinct tensors, none of them shared
        shared = {id(p) for p in m.shared_parameters()}
        assert all(id(p) not in shared for ls in layers for p in ls)
        assert len({id(ls[0]) for ls in layers}) == 3


def test_mtmlan_heads_are_independent():
    data = _toy_data((5, 7))
    m = build_model("mtmlan", data, width=8, hidden=4, attention_dim=4)
    out = m(data.train.x[:4])
    out["a"].sum().backward()
    assert all(p.grad is None for p in m.heads["b"].parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.heads["a"].parameters())


def test_model_bad_input():
    with pytest.raises(ConfigError, match="not binary"):
        from mtlkit.tasks import Task

        d = _toy_data((5, 7))
        d.tasks = [Task("a", "multiclass", 3)]
        build_model("mtmlan", d)
    with pytest.raises(ConfigError, match="clip must be"):
        SharedFrameNet((3, 4, 5))
    with pytest.raises(ConfigError, match="pre-trained"):
        SharedFrameNet((5, 1, 28, 28), freeze=True)
    with pytest.raises(ConfigError, match="pretrained"):
        build_model("mtmlan", _toy_data((5, 7)), pretrained=True)


# --- metrics vs scikit-learn --------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("threshold", [0.5, 0.3])
def test_metrics_match_sklearn(seed, threshold):
    rng = np.random.default_rng(seed)
    y = (rng.random((60, 5)) < [0.1, 0.3, 0.5, 0.7, 0.05]).astype(int)
    y[0] = 1  # every label has a positive
    s = rng.normal(size=(60, 5)) + 1.5 * y
    s[:5, 0] = s[5, 0]  # ties
    S, Y = torch.tensor(s, dtype=torch.float32), torch.tensor(y)
    pred = (1 / (1 + np.exp(-S.numpy().astype(np.float64))) >= threshold).astype(int)
    assert micro_f1(S, Y, threshold) == pytest.approx(skm.f1_score(y, pred, average="micro"))
    assert hamming_loss(S, Y, threshold) == pytest.approx(skm.hamming_loss(y, pred))
    aps = [skm.average_precision_score(y[:, j], S.numpy()[:, j]) for j in range(5)]
    assert average_precision_per_label(S, Y) == pytest.approx(aps, abs=1e-5)
    assert mean_average_precision(S, Y) == pytest.approx(np.mean(aps), abs=1e-5)
    assert per_label_accuracy(S, Y, threshold) == pytest.approx(
        [skm.accuracy_score(y[:, j], pred[:, j]) for j in range(5)]
    )


def test_map_skips_labels_without_positives_and_report_stacks_tasks():
    y = torch.tensor([[1, 0], [0, 0], [1, 0]])
    s = torch.tensor([[2.0, 1.0], [-1.0, 0.0], [0.5, -1.0]])
    ap = average_precision_per_label(s, y)
    assert ap[0] == 1.0 and math.isnan(ap[1])
    assert mean_average_precision(s, y) == 1.0
    tasks = label_tasks(["u", "v"])
    rep = multilabel_report(tasks, {"u": s[:, :1], "v": s[:, 1]}, {"u": y[:, 0], "v": y[:, 1]})
    assert rep["hamming_loss"] == pytest.approx(hamming_loss(s, y))
    with pytest.raises(ValueError, match="same shape"):
        micro_f1(torch.zeros(3, 2), torch.zeros(3, 3))
    with pytest.raises(ValueError, match="threshold"):
        micro_f1(s, y, threshold=1.5)


# --- clips builder --------------------------------------------------------------------------------------------------


def _fake_pools(n=300):
    rng = np.random.default_rng(1)
    return {k: rng.integers(0, 10, size=n) for k in ("train", "val", "test")}


def test_clip_labels_have_table_I_counts_and_partner_cooccurrence():
    spec = ClipSpec()
    labels = assign_labels(spec, np.random.default_rng(0))
    assert labels.sum(0).tolist() == list(PAPER_COUNTS) and labels.shape == (1540, 7)
    # co-occurrence above chance for the partner pair (damage, victim)
    p = labels.mean(0)
    lift = (labels[:, 4] & labels[:, 5]).mean() / (p[4] * p[5])
    assert lift > 1.5
    # no partner boost -> close to independence
    flat = assign_labels(ClipSpec(cooccur=1.0), np.random.default_rng(0))
    q = flat.mean(0)
    assert (flat[:, 4] & flat[:, 5]).mean() / (q[4] * q[5]) < lift
    # scaled counts for another size
    assert ClipSpec(n_clips=770).scaled_counts() == [75, 169, 486, 136, 186, 156, 406]


def test_clip_layout_runs_splits_pools_and_determinism():
    pools = _fake_pools()
    spec = ClipSpec(n_clips=200, frames=16, seed=3)
    a, b = make_layout(spec, pools), make_layout(spec, pools)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    c = make_layout(ClipSpec(n_clips=200, frames=16, seed=4), pools)
    assert not np.array_equal(a["index"], c["index"])
    assert np.bincount(a["split"], minlength=3).tolist() == [120, 40, 40]
    names = ("train", "val", "test")
    for i in range(200):
        cls = pools[names[a["split"][i]]][a["index"][i]]  # frames come from the clip's own pool
        for j, c_ in enumerate(CONCEPT_CLASSES):
            where = np.flatnonzero(cls == c_)
            assert (where.size > 0) == bool(a["labels"][i, j])
            if where.size:
                assert where.size >= 2 and np.all(np.diff(where) == 1)  # one contiguous run
        assert set(cls[~np.isin(cls, CONCEPT_CLASSES)]) <= set(BACKGROUND_CLASSES)


def test_clip_spec_errors():
    with pytest.raises(ConfigError, match="frames"):
        ClipSpec(frames=8).check()
    with pytest.raises(ConfigError, match="counts"):
        ClipSpec(counts=(1, 2)).check()
    with pytest.raises(ConfigError, match="source"):
        ClipSpec(source="cifar").check()
    with pytest.raises(ConfigError, match="no image of class"):
        make_layout(ClipSpec(n_clips=20, frames=14), {k: np.zeros(10, int) for k in ("train", "val", "test")})


# --- yeast parsing --------------------------------------------------------------------------------------------------


def test_yeast_csv_parser():
    X, _, names = parse_yeast_csv("Att1,Att2,Class1,Class2\n0.5,-1,1,0\n0.25,2,0,1\n")
    assert X.dtype == np.float32 and X.tolist() == [[0.5, -1.0], [0.25, 2.0]] and names == ["Class1", "Class2"]
    with pytest.raises(DataError, match="labels other than"):
        parse_yeast_csv("Att1,Class1\n0.5,2\n")
    with pytest.raises(DataError, match="header"):
        parse_yeast_csv("foo,bar\n1,2\n")


# --- end to end: TDB through the trainer ---------------------------------------------------------------------------


def test_tdb_trains_mtmlan_through_the_trainer(tmp_path):
    from mtlkit.config import RunConfig
    from mtlkit.train import Trainer

    g = torch.Generator().manual_seed(0)
    n, labels = 40, ("a", "b")
    x = torch.randn(n, 6, 5, generator=g)
    y = {"a": (x[:, :, 0].mean(1) > 0).long(), "b": (x[:, 2:4, 1].mean(1) > 0.6).long()}
    s = Split(x, y)
    data = MTLData(
        "toy",
        label_tasks(list(labels), loss="sample_level"),
        s,
        s,
        s,
        info={"train_counts": [int(y[k].sum()) for k in labels]},
    )
    cfg = RunConfig.from_dict(
        {
            "model": {"name": "mtmlan", "options": {"width": 8, "hidden": 4, "attention_dim": 4}},
            "method": {"name": "mtmlan_tdb", "options": {"counts": data.info["train_counts"], "lr": 0.05}},
            "train": {"epochs": 2, "batch_size": 10, "device": "cpu", "progress": False, "num_threads": 1},
            "output": {"tensorboard": False},
        }
    )
    threads = torch.get_num_threads()
    try:
        res = Trainer(cfg, data=data, run_dir=tmp_path / "run").fit()
    finally:
        torch.set_num_threads(threads)
    w = torch.tensor([res.history[-1][f"weight/{k}"] for k in labels])
    assert float(w.sum()) == pytest.approx(2.0, abs=1e-4)
    assert not torch.allclose(w, torch.ones(2))  # the gradient norms at the heads' first layers moved the weights


@pytest.mark.parametrize("name", ["mtmlan_clips", "mtmlan_yeast"])
def test_shipped_configs_build_their_method(name):
    from pathlib import Path

    from mtlkit.config import RunConfig
    from mtlkit.methods import build_method

    cfg = RunConfig.from_yaml(Path(__file__).resolve().parents[1] / "configs" / f"{name}.yaml")
    m = build_method(cfg.method.name, **cfg.method.options)
    n_labels = 7 if cfg.dataset.name == "clips" else 14
    m.weighting.setup(n_labels)
    assert m.weighting.penalty.shape == (n_labels,)
    assert cfg.dataset.options["loss"] == "sample_level" and cfg.model.name == "mtmlan"


# --- real data (fetched on first use: tests/conftest.py) ----------------------------------------------------------


@pytest.mark.data("fashion")
def test_real_clips_follow_table_I_and_draw_frames_from_their_own_split():
    from mtlkit.data import build_dataset

    d = build_dataset("clips", n_clips=154, frames=14, seed=5)
    total = [int(d.train.y[c].sum() + d.val.y[c].sum() + d.test.y[c].sum()) for c in CONCEPTS]
    assert total == ClipSpec(n_clips=154).scaled_counts()
    assert (len(d.train), len(d.val), len(d.test)) == (92, 31, 31)
    assert d.train.x.shape[1:] == (14, 1, 28, 28) and float(d.train.x.max()) <= 1.0
    again = build_dataset("clips", n_clips=154, frames=14, seed=5)
    assert torch.equal(again.test.x, d.test.x)


@pytest.mark.data("yeast")
def test_real_yeast_shapes_and_standardisation():
    from mtlkit.data import build_dataset

    d = build_dataset("yeast")
    assert len(d.tasks) == 14 and d.input_shape == (103,)
    assert len(d.train) + len(d.val) + len(d.test) == 2417
    assert d.train.x.mean(0).abs().max() < 1e-4
    assert d.info["train_counts"][-1] < d.info["train_counts"][11]  # Class14 rare, Class12 frequent


# --- the reproduction's options (issue 23) --------------------------------------------------------------------------


def _repro_args(tmp_path, *extra):
    import argparse

    from mtlkit.reproduce.mtmlan import add_arguments

    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args(["--out", str(tmp_path / "out"), *extra])


def test_reproduce_mtmlan_bad_options_are_config_errors(tmp_path):
    from mtlkit.reproduce.mtmlan import run

    with pytest.raises(ConfigError, match="--tdb-lrs"):
        run(_repro_args(tmp_path, "--tdb-lrs", "0"))
    with pytest.raises(ConfigError, match="--jobs"):
        run(_repro_args(tmp_path, "--jobs", "0"))
    with pytest.raises(ConfigError, match="distinct"):
        run(_repro_args(tmp_path, "--seeds", "1", "1"))
    with pytest.raises(ConfigError, match="Table III row"):
        run(_repro_args(tmp_path, "--rows", "MTMLAN", "Nope"))


@pytest.mark.data("yeast")
def test_reproduce_mtmlan_tunes_on_validation_writes_results_and_reuses(tmp_path, capsys):
    import json

    from mtlkit.reproduce.mtmlan import run

    common = [
        "--dataset", "yeast", "--rows", "GradNorm", "MTMLAN", "--seeds", "0", "--epochs", "1",
        "--tdb-lrs", "0.03", "0.3", "--betas", "2", "--jobs", "1", "--probe-every", "20",
        "--results", str(tmp_path / "res" / "mtmlan_yeast_test"),
    ]  # fmt: skip
    assert run(_repro_args(tmp_path, *common)) == 0
    rep = json.loads((tmp_path / "res" / "mtmlan_yeast_test.json").read_text())
    tn = rep["tuning"]
    assert [g["tdb_lr"] for g in tn["grid"]] == [0.03, 0.3]
    assert tn["chosen"]["score"] == max(g["score"] for g in tn["grid"])  # chosen on validation only
    assert rep["chosen"]["tdb_lr"] == tn["chosen"]["tdb_lr"]
    gn = rep["results"]["GradNorm"][0]
    assert gn["probe"]["steps_measured"] >= 1 and gn["spec"]["method_options"]["counts"] == [1] * 14
    md = (tmp_path / "res" / "mtmlan_yeast_test.md").read_text()
    assert "± 0" not in md and "not testable at this budget (1 seed" in md
    assert all(r[0]["trained_now"] for r in rep["results"].values())
    capsys.readouterr()
    assert run(_repro_args(tmp_path, *common, "--reuse")) == 0  # finished runs are read back, not retrained
    again = json.loads((tmp_path / "res" / "mtmlan_yeast_test.json").read_text())
    assert not any(r[0]["trained_now"] for r in again["results"].values())
    assert again["results"]["MTMLAN"][0]["test"] == rep["results"]["MTMLAN"][0]["test"]
