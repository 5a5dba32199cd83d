"""``mtlkit bench zoo``'s architecture, device and dataset-size options."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mtlkit.bench import dataset_options
from mtlkit.cli import main
from mtlkit.errors import ConfigError

TOY = [
    "bench",
    "zoo",
    "--dataset",
    "_toy",
    "--methods",
    "ew",
    "--seeds",
    "0",
    "--epochs",
    "1",
    "--n-train",
    "96",
    "--n-test",
    "32",
    "--batch-size",
    "32",
    "--set",
    "model.options={encoder: mlp, hidden: [16], head_hidden: 8}",
]


def test_zoo_model_names_runs_and_tables_and_trains_that_model(tmp_path, capsys):
    out = tmp_path / "zoo"
    assert main([*TOY, "--model", "hps", "--device", "cpu", "--out", str(out)]) == 0
    table = (out / "zoo__toy_hps.md").read_text()
    assert "model hps" in table and json.loads((out / "zoo__toy_hps.json").read_text()).keys() == {"stl", "ew"}
    for m in ("stl", "ew"):
        cfg = (out / f"_toy-hps-{m}-s0" / "config.yaml").read_text()
        assert "name: hps" in cfg and "device: cpu" in cfg
    # a zoo without --model keeps its own names: the two zoos do not collide in one --out
    assert main([*TOY, "--out", str(out)]) == 0
    assert (out / "zoo__toy.md").is_file() and (out / "_toy-ew-s0").is_dir()
    # an unknown model is refused before anything is trained, naming the valid ones
    capsys.readouterr()
    assert main([*TOY, "--model", "nope", "--out", str(tmp_path / "bad")]) != 0
    err = capsys.readouterr().err
    assert "unknown model 'nope'" in err and "hps" in err and not (tmp_path / "bad").exists()


def test_size_flags_only_for_datasets_that_have_them():
    assert dataset_options("_toy", None, None) == {}
    assert dataset_options("_toy", 10, 5) == {"n_train": 10, "n_test": 5}
    with pytest.raises(ConfigError, match=r"dataset 'yeast' has no n_train option \(--n-train\)"):
        dataset_options("yeast", 10, None)


def test_paired_differences_agree_with_a_paired_t_test_and_pair_only_common_seeds():
    from scipy import stats

    from mtlkit.bench import paired_differences

    rng = np.random.default_rng(0)
    for _ in range(50):
        n = int(rng.integers(2, 7))
        base = rng.normal(size=n)
        other = base + rng.normal(loc=rng.normal(), scale=rng.uniform(0.1, 2.0), size=n)
        d = {"stl": dict(enumerate(base)), "m": dict(enumerate(other))}
        (row,) = paired_differences(d, "stl")
        test = stats.ttest_rel(other, base)
        np.testing.assert_allclose(row.mean, np.mean(other - base), rtol=1e-12)
        # the 95 % interval excludes 0 exactly when the two-sided paired t-test rejects at 5 %
        assert row.separated == (test.pvalue < 0.05)
        np.testing.assert_allclose(row.p_value, test.pvalue, rtol=1e-9)
    # seeds 1 and 2 are common; seed 0 of "m" and seed 3 of "stl" have no partner
    d = {"stl": {1: 0.0, 2: 1.0, 3: 5.0}, "m": {0: 9.0, 1: 1.0, 2: 3.0}}
    (row,) = paired_differences(d, "stl")
    assert row.seeds == (1, 2) and row.differences == (1.0, 2.0)
    # one common seed: no interval, no row
    assert paired_differences({"stl": {0: 0.0}, "m": {0: 1.0, 1: 2.0}}, "stl") == []


def test_paired_differences_name_bad_input():
    from mtlkit.bench import paired_differences, separation_table

    with pytest.raises(ConfigError, match="baseline 'ew' has no runs"):
        paired_differences({"stl": {0: 0.0}}, "ew")
    with pytest.raises(ConfigError, match="confidence"):
        paired_differences({"stl": {0: 0.0}}, "stl", confidence=1.5)
    assert separation_table({"x": {0: 1.0}}, ("stl", "ew")) == ""
    table = separation_table({"stl": {0: 0.0, 1: 0.1, 2: -0.1}, "ew": {0: 3.0, 1: 3.1, 2: 2.9}}, ("stl", "ew"))
    assert "| ew | +3.00 ± 0.00 * | – |" in table and "| stl | – | -3.00 ± 0.00 * |" in table


def test_zoo_page_pairs_seeds_against_stl_and_ew(tmp_path):
    out = tmp_path / "zoo"
    argv = list(TOY)
    i = argv.index("--seeds")
    argv[i + 1 : i + 2] = ["0", "1"]
    assert main([*argv, "--out", str(out)]) == 0
    table = (out / "zoo__toy.md").read_text()
    numbers = json.loads((out / "zoo__toy.json").read_text())
    assert "Paired per-seed differences of Δm" in table and "over 2 seeds" in table
    for m in ("stl", "ew"):
        by_seed = numbers[m]["delta_m_by_seed"]
        assert list(by_seed) == ["0", "1"] and list(by_seed.values()) == numbers[m]["delta_m"]
    diff = [numbers["ew"]["delta_m_by_seed"][s] - numbers["stl"]["delta_m_by_seed"][s] for s in ("0", "1")]
    assert f"| ew | {np.mean(diff):+.2f} ± " in table
