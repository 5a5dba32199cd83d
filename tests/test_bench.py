"""``mtlkit bench zoo``'s architecture, device and dataset-size options."""

from __future__ import annotations

import json

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
