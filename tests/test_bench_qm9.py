"""``mtlkit bench zoo`` on error metrics in their units and against a dataset's published STL values (QM9), and the
QM9 dataset's declaration of those values in the units of its ``mae_units`` metric."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mtlkit.bench import (
    ReferenceSTL,
    format_value,
    metric_caption,
    metric_scale,
    plot_zoo,
    reference_stl,
    table_metrics,
    zoo_table,
)
from mtlkit.cli import main
from mtlkit.data import MTLData, Split, register_dataset
from mtlkit.errors import ConfigError
from mtlkit.metrics import delta_m
from mtlkit.tasks import Task

EPS64 = float(np.finfo(np.float64).eps)


def test_fraction_metrics_are_percent_and_error_metrics_keep_their_units():
    assert [metric_scale(m) for m in ("accuracy", "auc", "a/average_precision", "joint_accuracy")] == [100.0] * 4
    assert [metric_scale(m) for m in ("mae", "mse", "U0/mae_units", "loss")] == [1.0] * 4
    # error metrics: 4 significant digits of the mean, in their units (an MAE of 60.576 meV is not 6057.60)
    assert format_value(60.576, 1.2345, "mae_units") == "60.58 ± 1.23"
    assert format_value(0.07212, None, "mae_units") == "0.07212"
    assert format_value(1234.5, None, "mae") == "1234.50"
    assert format_value(0.8521, 0.0199, "accuracy") == "85.21 ± 1.99"
    assert "x 100" not in metric_caption([("U0/mae_units", False)], {"mae_units": {"U0": "meV"}})
    assert metric_caption([("a/accuracy", True)]) == "accuracy (x 100, in %)"


def _results() -> dict[str, list[dict[str, float]]]:
    # two tasks in very different units: an energy MAE in meV and a dipole MAE in D
    return {
        "stl": [{"U0/mae_units": 60.0, "mu/mae_units": 0.070}, {"U0/mae_units": 64.0, "mu/mae_units": 0.074}],
        "ew": [{"U0/mae_units": 90.0, "mu/mae_units": 0.090}, {"U0/mae_units": 100.0, "mu/mae_units": 0.094}],
    }


def test_zoo_table_in_units_with_a_published_stl_reference():
    keys = [("U0/mae_units", False), ("mu/mae_units", False)]
    ref = ReferenceSTL("mae_units", {"U0": 58.838, "mu": 0.0671}, "papers")
    units = {"mae_units": {"U0": "meV", "mu": "D"}}
    table, numbers = zoo_table(_results(), keys, reference=ref, units=units)
    header = table.splitlines()[0]
    assert "U0/mae_units [meV]" in header and "mu/mae_units [D]" in header and "Δm % vs ref. STL (↓)" in header
    # values as they are (no x 100): EW's U0 mean 95 meV ± 5
    assert "| ew | 2 | 95.00 ± 5.00 | 0.09200 ± 0.00200 |" in table
    # Δm against the zoo's STL (means 62, 0.072) and against the published values, per seed, lower is better
    own = [
        100 * np.mean([(90 - 62) / 62, (0.090 - 0.072) / 0.072]),
        100 * np.mean([(100 - 62) / 62, (0.094 - 0.072) / 0.072]),
    ]
    pub = [
        100 * np.mean([(90 - 58.838) / 58.838, (0.090 - 0.0671) / 0.0671]),
        100 * np.mean([(100 - 58.838) / 58.838, (0.094 - 0.0671) / 0.0671]),
    ]
    tol = 64 * EPS64 * 100
    assert numbers["ew"]["delta_m"] == pytest.approx(own, abs=tol)
    assert numbers["ew"]["delta_m_reference"] == pytest.approx(pub, abs=tol)
    assert f"| {np.mean(own):+.2f} ± {np.std(own):.2f} | {np.mean(pub):+.2f} ± {np.std(pub):.2f} |" in table
    # the published row: its values, its Δm against the zoo's STL, and +0.00 against itself
    pub_row = next(line for line in table.splitlines() if line.startswith("| STL (published)"))
    published_vs_ours = delta_m([58.838, 0.0671], [62.0, 0.072], [False, False])
    assert pub_row == f"| STL (published) | – | 58.84 | 0.06710 | {published_vs_ours:+.2f} | +0.00 |"
    # Δm is a relative change: the same on the standardised MAE as in units (each task's factor cancels)
    scale = {"U0": 7.3e3, "mu": 1.5}
    std = {m: [{k: v / scale[k.split("/")[0]] for k, v in r.items()} for r in rs] for m, rs in _results().items()}
    _, n2 = zoo_table(std, keys)
    assert n2["ew"]["delta_m"] == pytest.approx(own, rel=16 * EPS64 * 100)


def test_zoo_plot_of_metrics_in_units_is_relative_to_stl_and_draws_both_delta_m(tmp_path):
    keys = [("U0/mae_units", False), ("mu/mae_units", False)]
    ref = ReferenceSTL("mae_units", {"U0": 58.838, "mu": 0.0671})
    _, numbers = zoo_table(_results(), keys, reference=ref)
    fig = plot_zoo(numbers, [k for k, _ in keys], tmp_path / "z.png", "qm9", ylabel="test mae_units")
    assert (tmp_path / "z.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bars, dm, dm_ref = fig.axes
    # per task, % of the zoo's STL mean: U0 bars (stl, ew), then mu bars (stl, ew)
    heights = [b.get_height() for b in bars.patches]
    assert heights == pytest.approx([100.0, 100 * 95 / 62, 100.0, 100 * 0.092 / 0.072], rel=16 * EPS64)
    # Δm against the zoo's STL, and (own axis) against the published STL: one bar per method, in method order
    for axis, key in ((dm, "delta_m"), (dm_ref, "delta_m_reference")):
        widths = {t.get_text(): b.get_width() for t, b in zip(axis.get_yticklabels(), axis.patches, strict=True)}
        assert widths == pytest.approx({m: float(np.mean(numbers[m][key])) for m in numbers}, abs=1e-9)


def test_reference_stl_declaration_is_checked():
    tasks = [Task("a", "regression", metrics=("mae", "mse")), Task("b", "regression", metrics=("mae", "mse"))]
    ok = reference_stl({"reference_stl": {"metric": "mse", "values": {"a": 2, "b": 0.5}, "source": "s"}}, tasks)
    assert ok == ReferenceSTL("mse", {"a": 2.0, "b": 0.5}, "s")
    assert table_metrics(tasks, ok) == [("a/mse", False), ("b/mse", False)]
    assert table_metrics(tasks) == [("a/mae", False), ("b/mae", False)]
    assert reference_stl({}, tasks) is None and reference_stl(None, tasks) is None
    with pytest.raises(ConfigError, match="no value for task"):
        reference_stl({"reference_stl": {"metric": "mae", "values": {"a": 1.0}}}, tasks)
    with pytest.raises(ConfigError, match="'accuracy', which task"):
        reference_stl({"reference_stl": {"metric": "accuracy", "values": {"a": 1.0, "b": 1.0}}}, tasks)
    with pytest.raises(ConfigError, match="finite non-zero"):
        reference_stl({"reference_stl": {"metric": "mae", "values": {"a": 1.0, "b": 0.0}}}, tasks)
    with pytest.raises(ConfigError, match="must be"):
        reference_stl({"reference_stl": [1, 2]}, tasks)


@register_dataset("_toy_ref")
def toy_reference(n_train: int = 96, n_test: int = 32, seed: int = 0) -> MTLData:
    """Two regression tasks with a declared published STL (unit tests of ``bench zoo`` only)."""
    g = torch.Generator().manual_seed(seed)

    def split(n: int) -> Split:
        x = torch.randn(n, 4, generator=g)
        return Split(x, {"a": x[:, 0] + 0.1 * x[:, 1], "b": x[:, 2] * x[:, 3]})

    tasks = [Task(t, "regression", 1, metrics=("mse", "mae")) for t in ("a", "b")]
    info = {
        "reference_stl": {"metric": "mae", "values": {"a": 0.25, "b": 0.5}, "source": "a test's numbers"},
        "metric_units": {"mae": {"a": "m", "b": "s"}},
    }
    return MTLData("_toy_ref", tasks, split(n_train), split(32), split(n_test), info=info)


def test_zoo_command_shows_both_delta_m_for_a_dataset_with_reference_stl(tmp_path):
    out = tmp_path / "zoo"
    argv = ["bench", "zoo", "--dataset", "_toy_ref", "--model", "hps", "--methods", "ew", "--seeds", "0"]
    argv += ["--epochs", "1", "--batch-size", "32", "--device", "cpu", "--out", str(out)]
    argv += ["--set", "model.options={encoder: mlp, hidden: [8], head_hidden: 4}"]
    assert main(argv) == 0
    text = (out / "zoo__toy_ref_hps.md").read_text()
    # the reference's metric (mae, not the tasks' first metric mse), in units, and both Δm columns
    assert "a/mae [m]" in text and "b/mae [s]" in text and "/mse" not in text and "x 100" not in text
    assert "Δm % vs ref. STL (↓)" in text and "a test's numbers" in text
    assert "| STL (published) | – | 0.2500 | 0.5000 |" in text
    numbers = json.loads((out / "zoo__toy_ref_hps.json").read_text())
    assert set(numbers) == {"stl", "ew"}  # methods only: readers iterate it as such
    ew_test = json.loads(next((out / "_toy_ref-hps-ew-s0").glob("results.json")).read_text())["test"]
    expected = delta_m([ew_test["a/mae"], ew_test["b/mae"]], [0.25, 0.5], [False, False])
    assert numbers["ew"]["delta_m_reference"] == pytest.approx([expected], abs=1e-9)
    assert (out / "zoo__toy_ref_hps.png").is_file()


@pytest.mark.data("qm9")
def test_qm9_declares_the_papers_stl_in_the_units_of_mae_units():
    pytest.importorskip("rdkit", reason="the qm9 graphs need RDKit: pip install -e '.[molecules]'")
    from mtlkit.data import build_dataset
    from mtlkit.data.qm9 import STL_MAE, TARGETS
    from mtlkit.metrics import evaluate_outputs

    d = build_dataset("qm9", n_molecules=60, n_val=10, n_test=10, seed=1)
    ref = reference_stl(d.info, d.tasks)
    assert ref is not None and ref.metric == "mae_units" and ref.values == STL_MAE
    units = d.info["metric_units"]["mae_units"]
    energies = ("homo", "lumo", "zpve", "U0", "U", "H", "G")
    assert all(units[e] == "meV" for e in energies) and units["mu"] == "D" and units["cv"] == "cal/(mol K)"
    assert table_metrics(d.tasks, ref) == [(f"{t.name}/mae_units", False) for t in TARGETS]
    # mae_units is the MAE of the de-standardised values in the reported unit: meV for ε_HOMO (stored in eV)
    torch.manual_seed(0)
    out = {t.name: torch.randn(len(d.test), 1) for t in d.tasks}
    got = evaluate_outputs(d.tasks, out, d.test.y)
    for t in d.tasks:
        std = t.extra["std"]
        pred_ev = out[t.name].double().reshape(-1) * std + t.extra["mean"]
        true_ev = d.test.y[t.name].double() * std + t.extra["mean"]
        factor = 1000.0 if t.name in energies else 1.0
        by_hand = float((pred_ev - true_ev).abs().mean()) * factor
        assert got[f"{t.name}/mae_units"] == pytest.approx(by_hand, rel=8 * float(torch.finfo(torch.float32).eps))


@pytest.mark.skipif(
    not hasattr(__import__("mtlkit.config", fromlist=["TrainConfig"]).TrainConfig, "plateau_factor"),
    reason="train.scheduler=plateau not in this mtlkit yet (the lead's train.py/config.py patch)",
)
@pytest.mark.parametrize("metric", ["score", "delta_m_reference"])
def test_plateau_scheduler_steps_on_the_validation_value(tmp_path, metric):
    from mtlkit.bench import reference_delta_m
    from mtlkit.config import RunConfig
    from mtlkit.train import Trainer

    cfg = RunConfig.from_dict(
        {
            "dataset": {"name": "_toy_ref"},
            "model": {"name": "hps", "options": {"encoder": "mlp", "hidden": [8], "head_hidden": 4}},
            "method": {"name": "ew"},
            "train": {
                "epochs": 8,
                "batch_size": 32,
                "lr": 0.3,  # large: the validation value stops improving within a few epochs
                "progress": False,
                "device": "cpu",
                "scheduler": "plateau",
                "plateau_factor": 0.5,
                "plateau_patience": 0,
                "min_lr": 1e-3,
                "plateau_metric": metric,
            },
            "output": {"dir": str(tmp_path / "run"), "tensorboard": False},
        }
    )
    trainer = Trainer(cfg)
    history = trainer.fit().history
    # replay torch's rule (mode min, relative threshold 1e-4, patience 0) on the logged validation values
    lr, best, expected = 0.3, float("inf"), []
    for row in history:
        val = {k.removeprefix("val/"): v for k, v in row.items() if k.startswith("val/")}
        if metric == "score":
            value = float(np.mean([val[f"{t.name}/mse"] for t in trainer.tasks]))  # minus the selection score
        else:
            value = reference_delta_m(trainer.data.info, trainer.tasks, val)
        if value < best * (1 - 1e-4):
            best = value
        else:
            lr = max(0.5 * lr, 1e-3)
        expected.append(lr)
    assert [row["lr"] for row in history] == pytest.approx(expected, rel=1e-12)
    assert expected[-1] < 0.3  # the schedule did act
