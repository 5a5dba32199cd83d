"""Fault injection through the command line: each fault is run as a ``mtlkit`` subprocess, as a user would run it.

For every fault the test asserts the exit code, one error line that names the problem, no traceback, and that every
file present before the command is byte for byte the same afterwards (sha256 of each file, compared). The commands
that must succeed instead (a dataset's own defaults, an FGSM evaluation) are checked for what they write.

Runs are tiny (300 real MultiMNIST images, an MLP encoder, 1 epoch); the faults that must be refused before any data
is loaded cost only the interpreter's start.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mtlkit.cli import main
from mtlkit.config import RunConfig, check_run_config, dataset_defaults_for
from mtlkit.errors import ConfigError
from mtlkit.robustness import DEFAULT_EPS

TINY_MODEL = "model.options={encoder: mlp, hidden: [16], head_hidden: 8}"
ZOO = [
    "bench",
    "zoo",
    "--dataset",
    "multimnist",
    "--methods",
    "ew",
    "--seeds",
    "0",
    "--n-train",
    "300",
    "--n-test",
    "100",
    "--batch-size",
    "64",
    "--set",
    TINY_MODEL,
]


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``mtlkit ARGS`` in a fresh interpreter (the installed package; one torch thread: the machine is shared)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env.pop("MTLKIT_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", "mtlkit.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def snapshot(*roots: Path) -> dict[str, str]:
    """sha256 of every file under ``roots``."""
    return {
        str(p): hashlib.sha256(p.read_bytes()).hexdigest()
        for root in roots
        for p in sorted(Path(root).rglob("*"))
        if p.is_file()
    }


def assert_refused(proc: subprocess.CompletedProcess, *phrases: str, rc: int = 2) -> str:
    """Exit code ``rc``, no traceback, exactly one error line, naming every phrase; returns that line."""
    out = proc.stdout + proc.stderr
    assert proc.returncode == rc, out
    assert "Traceback" not in out, out
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, out
    for phrase in phrases:
        assert phrase in errors[0], errors[0]
    return errors[0]


def assert_succeeded(proc: subprocess.CompletedProcess) -> None:
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "Traceback" not in out and "error:" not in proc.stderr, out


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("faults")


@pytest.fixture(scope="module")
def run_dir(work) -> Path:
    """A finished tiny MultiMNIST run (trained in this process: the faults are what runs as subprocesses)."""
    run = work / "run"
    assert (
        main(
            [
                "train",
                "--epochs",
                "1",
                "--no-progress",
                "--run-dir",
                str(run),
                "--set",
                TINY_MODEL,
                "--set",
                "dataset.options.n_train=300",
                "--set",
                "dataset.options.n_test=100",
                "--set",
                "output.tensorboard=false",
            ]
        )
        == 0
    )
    return run


@pytest.fixture(scope="module")
def zoo(work) -> Path:
    """A finished tiny zoo (STL + EW, 1 epoch, seed 0) and its table."""
    out = work / "zoo"
    assert main(ZOO + ["--epochs", "1", "--out", str(out)]) == 0
    assert (out / "zoo_multimnist.md").is_file() and (out / "multimnist-ew-s0" / "results.json").is_file()
    return out


# --- bench zoo ---------------------------------------------------------------------------------------------------


@pytest.mark.data("mnist")
def test_zoo_rerun_with_another_budget_is_refused_and_changes_nothing(zoo, work):
    before = snapshot(zoo)
    proc = cli(*ZOO, "--epochs", "2", "--out", str(zoo), cwd=work)
    assert_refused(
        proc, str(zoo), "another config", "train.epochs: 1 there, 2 requested", "nothing was trained", "--overwrite"
    )
    assert snapshot(zoo) == before


@pytest.mark.data("mnist")
def test_zoo_rerun_of_the_same_budget_needs_reuse_or_overwrite(zoo, capsys):
    before = snapshot(zoo)  # in this process: the subprocess path is the test above
    assert main(ZOO + ["--epochs", "1", "--out", str(zoo)]) == 2
    err = capsys.readouterr().err
    assert "already holds 2 runs of this zoo" in err and "zoo_multimnist.md" in err and "--reuse" in err, err
    assert snapshot(zoo) == before


@pytest.mark.data("mnist")
def test_zoo_overwrite_retrains_another_budget_and_replaces_the_table(zoo, work, capsys):
    import shutil

    copy = work / "zoo-overwritten"
    shutil.copytree(zoo, copy)
    (copy / "zoo_multimnist_partial.md").write_text("a stale partial table\n")
    assert main(ZOO + ["--epochs", "2", "--out", str(copy), "--overwrite"]) == 0
    assert ", 2 epochs," in (copy / "zoo_multimnist.md").read_text()
    assert not (copy / "zoo_multimnist_partial.md").exists()
    assert RunConfig.from_yaml(copy / "multimnist-ew-s0" / "config.yaml").train.epochs == 2
    capsys.readouterr()


@pytest.mark.data("mnist")
def test_zoo_checks_every_method_name_before_training_anything(zoo, work):
    before = snapshot(zoo)
    fresh = work / "zoo-fresh"
    proc = cli(
        *ZOO[: ZOO.index("--methods") + 1],
        "ew",
        "nosuch",
        *ZOO[ZOO.index("--seeds") :],
        "--epochs",
        "1",
        "--out",
        str(fresh),
        cwd=work,
    )
    assert_refused(proc, "unknown method 'nosuch'", "valid methods are")
    assert not fresh.exists()  # STL was not trained first
    # into a finished zoo with --reuse (in this process): refused as well, nothing touched
    assert (
        main(
            ZOO[: ZOO.index("--methods") + 1]
            + ["ew", "nosuch"]
            + ZOO[ZOO.index("--seeds") :]
            + ["--epochs", "1", "--out", str(zoo), "--reuse"]
        )
        == 2
    )
    assert snapshot(zoo) == before


@pytest.mark.data("mnist")
def test_zoo_flags_that_contradict_are_refused(zoo, capsys):
    before = snapshot(zoo)
    assert main(ZOO + ["--epochs", "1", "--out", str(zoo), "--reuse", "--overwrite"]) == 2
    assert "pass one of the two" in capsys.readouterr().err
    assert main(ZOO + ["--epochs", "1", "--out", str(zoo / "zoo_multimnist.md")]) == 2
    assert "is a file, not a directory" in capsys.readouterr().err
    assert (
        main(
            ZOO
            + ["--epochs", "1", "--out", str(zoo), "--set", "model.name=stl", "--set", "method.level=representation"]
        )
        == 2
    )
    assert "model 'stl'" in capsys.readouterr().err
    assert snapshot(zoo) == before


# --- eval --------------------------------------------------------------------------------------------------------


@pytest.mark.data("mnist")
@pytest.mark.parametrize(
    "args,phrases",
    [
        (["--attack", "fgsm", "--eps", "-0.5"], ["argument --eps", "-0.5", "finite number >= 0"]),
        (["--attack", "pgd", "--pgd-steps", "0"], ["argument --pgd-steps", "must be >= 1, got 0"]),
    ],
)
def test_eval_bad_values_are_refused_at_argument_check(run_dir, work, args, phrases):
    before = snapshot(run_dir)
    assert_refused(cli("eval", str(run_dir), *args, cwd=work), *phrases)
    assert snapshot(run_dir) == before


@pytest.mark.data("mnist")
@pytest.mark.parametrize(
    "args,phrase",
    [
        (["--attack", "fgsm", "--eps", "nan"], "finite number >= 0"),
        (["--attack", "fgsm", "--eps", "inf"], "finite number >= 0"),
        (["--attack", "fgsm", "--eps", "x"], "'x' is not a number"),
        (["--attack", "pgd", "--pgd-steps", "1.5"], "'1.5' is not an integer"),
        (["--eps", "0.1"], "--eps does not apply to --attack none"),
        (["--attack", "fgsm", "--pgd-steps", "3"], "--pgd-steps does not apply to --attack fgsm"),
        (["--target-task", "left"], "--target-task does not apply to --attack none"),
        (["--device", "nodevice"], "'nodevice' is not a device"),
    ],
)
def test_eval_argument_checks_in_process(run_dir, capsys, args, phrase):
    before = snapshot(run_dir)
    try:
        rc = main(["eval", str(run_dir), *args])
    except SystemExit as e:  # argparse's own refusal
        rc = e.code
    assert rc == 2 and phrase in capsys.readouterr().err
    assert snapshot(run_dir) == before


@pytest.mark.data("mnist")
def test_eval_fgsm_uses_the_default_grid_and_writes_json_into_the_run(run_dir, work, capsys):
    before = snapshot(run_dir)
    proc = cli("eval", str(run_dir), "--attack", "fgsm", cwd=work)
    assert_succeeded(proc)
    path = run_dir / "eval_test_fgsm.json"
    assert f"results written to {path}" in proc.stderr
    saved = json.loads(path.read_text())
    assert saved == json.loads(proc.stdout)  # what is printed is what is written
    assert saved["eps"] == list(DEFAULT_EPS) and list(saved["results"]) == [str(e) for e in DEFAULT_EPS]
    assert saved["attack"] == "fgsm" and saved["split"] == "test"
    assert all(0 <= r["left/accuracy"] <= 1 for r in saved["results"].values())
    after = snapshot(run_dir)
    assert {k: v for k, v in after.items() if k != str(path)} == before  # the run itself is untouched
    # a second evaluation does not replace the first silently (in this process), only with --overwrite
    capsys.readouterr()
    assert main(["eval", str(run_dir), "--attack", "fgsm", "--eps", "0", "0.1"]) == 2
    err = capsys.readouterr().err
    assert f"{path} exists" in err and "--overwrite" in err, err
    assert snapshot(run_dir) == after
    assert main(["eval", str(run_dir), "--attack", "fgsm", "--eps", "0", "0.1", "--overwrite"]) == 0
    assert json.loads(path.read_text())["eps"] == [0.0, 0.1]


# --- train: impossible combinations and dataset defaults ---------------------------------------------------------


@pytest.mark.data("mnist")
def test_stl_model_at_representation_level_is_refused_before_anything_is_touched(run_dir, work):
    before = snapshot(run_dir)
    # --overwrite on an existing run: a config error must be found before the run directory is emptied
    proc = cli(
        "train", "--model", "stl", "--level", "representation", "--run-dir", str(run_dir), "--overwrite", cwd=work
    )
    assert_refused(proc, "model 'stl'", "level 'representation'", "no shared representation")
    assert snapshot(run_dir) == before


@pytest.mark.parametrize(
    "sets,phrases",
    [
        (["model.name=stl", "method.level=representation"], ["model 'stl'", "level 'representation'"]),
        (["model.name=stl", "method.name=graddrop"], ["model 'stl'", "method 'graddrop'", "--level parameter"]),
        (["method.name=stl", "method.level=representation"], ["method 'stl'", "level 'representation'"]),
        (["method.level=representation"], ["method 'ew'", "level 'representation'"]),
        (["method.name=mtmlan_tdb"], ["method 'mtmlan_tdb'", "model 'hps'", "grad_at=last_shared_layer"]),
        (
            ["dataset.name=yeast", "dataset.options.n_train=300"],
            ["dataset 'yeast'", "n_train", "by --set dataset.options.n_train=300"],
        ),
        (["method.name=cagrad", "method.options.cc=1"], ["method 'cagrad'", "['cc']", "c, rescale"]),
        (["model.name=nosuch"], ["unknown model 'nosuch'"]),
        (["train.lr=-1"], ["train.lr must be a finite number > 0"]),
        (["train.epochs=["], ["not valid YAML"]),
    ],
)
def test_impossible_configs_are_refused_by_config_validation(sets, phrases):
    with pytest.raises(ConfigError) as e:
        RunConfig.resolve(None, sets)
    for phrase in phrases:
        assert phrase in str(e.value), str(e.value)


def test_a_config_files_option_that_the_chosen_dataset_lacks_names_the_file(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("dataset:\n  name: multimnist\n  options: {n_train: 600}\n")
    assert RunConfig.resolve(path, []).dataset.options["n_train"] == 600  # yours win over the dataset's defaults
    with pytest.raises(ConfigError, match=r"dataset 'yeast' has no option.*n_train.*set in .*mine\.yaml"):
        RunConfig.resolve(path, ["dataset.name=yeast"])


def test_every_listed_dataset_brings_defaults_that_pass_validation():
    from mtlkit._registry import DATASETS

    builtin = [e.name for e in DATASETS if e.module.startswith("mtlkit.")]
    assert {"multimnist", "yeast", "clips", "entangled_census"} <= set(builtin)
    for name in builtin:
        assert dataset_defaults_for(name), f"configs/datasets.yaml has no entry for {name}"
        cfg = RunConfig.resolve(None, [f"dataset.name={name}"])
        check_run_config(cfg)
        # every model the entry lists options for takes them
        for model in dataset_defaults_for(name).get("models", {}):
            check_run_config(RunConfig.resolve(None, [f"dataset.name={name}", f"model.name={model}"]))
    # the embedded default is unchanged: reduced MultiMNIST, HPS conv + EW, 3 epochs
    d = RunConfig.resolve(None, []).to_dict()
    assert d["dataset"] == {
        "name": "multimnist",
        "options": {"n_train": 20000, "n_test": 10000, "val_fraction": 0.1, "seed": 0},
    }
    assert d["model"] == {"name": "hps", "options": {"encoder": "conv"}}
    assert (d["method"]["name"], d["train"]["epochs"], d["train"]["batch_size"]) == ("ew", 3, 256)


@pytest.mark.data("yeast")
def test_train_dataset_yeast_from_the_default_config(work, capsys):
    keep = work / "keep.txt"
    keep.write_text("a file of the user's\n")
    before = snapshot(work / "keep.txt")
    run = work / "yeast-run"
    proc = cli(
        "train",
        "--dataset",
        "yeast",
        "--epochs",
        "1",
        "--no-progress",
        "--run-dir",
        str(run),
        "--set",
        "model.options.mlp_hidden=[16]",
        "--set",
        "model.options.head_hidden=8",
        "--set",
        "output.tensorboard=false",
        cwd=work,
    )
    assert_succeeded(proc)
    assert "mtlkit: yeast (1450 train / 483 val / 484 test), model mtmlan" in proc.stderr, proc.stderr
    saved = RunConfig.from_yaml(run / "config.yaml")
    assert saved.dataset.options == {"seed": 0, "loss": "bce"} and saved.model.options["mlp_hidden"] == [16]
    assert saved.train.batch_size == 64  # the dataset's own, not MultiMNIST's 256
    assert (run / "results.json").is_file() and snapshot(keep) == before
    # an option the user sets that yeast does not take: refused, naming it and where it was set (in this process)
    before = snapshot(run)
    assert (
        main(
            [
                "train",
                "--dataset",
                "yeast",
                "--set",
                "dataset.options.n_train=300",
                "--run-dir",
                str(run),
                "--overwrite",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "dataset 'yeast' has no option(s) ['n_train']" in err and "--set dataset.options.n_train=300" in err, err
    assert snapshot(run) == before


@pytest.mark.data("census")
def test_train_dataset_entangled_census_from_the_default_config(work, capsys):
    run = work / "census-run"  # in this process (the subprocess path is yeast's test)
    assert (
        main(
            [
                "train",
                "--dataset",
                "entangled_census",
                "--epochs",
                "1",
                "--no-progress",
                "--run-dir",
                str(run),
                "--set",
                "dataset.options={n_train: 200, n_val: 50, n_test: 100}",
                "--set",
                "model.options.hidden=[16]",
                "--set",
                "output.tensorboard=false",
            ]
        )
        == 0
    )
    assert "mtlkit: entangled_census (200 train / 50 val / 100 test), model hps" in capsys.readouterr().err
    assert RunConfig.from_yaml(run / "config.yaml").model.options["encoder"] == "mlp"
