"""The training loop, config and CLI: determinism, resume, bad inputs, run-directory safety."""

import json
import re
import warnings

import numpy as np
import pytest
import torch

from mtlkit.cli import main
from mtlkit.config import RunConfig
from mtlkit.errors import ConfigError, NonFiniteLossError
from mtlkit.train import Trainer


def _cfg(tmp_path, **train):
    t = {"epochs": 2, "batch_size": 32, "lr": 0.01, "seed": 0, "progress": False, **train}
    return RunConfig.from_dict(
        {
            "dataset": {"name": "_toy"},
            "model": {"name": "hps", "options": {"encoder": "mlp", "hidden": [16], "head_hidden": 8}},
            "train": t,
            "output": {"dir": str(tmp_path / "run"), "tensorboard": False},
        }
    )


def test_fit_writes_run_and_is_deterministic(tmp_path):
    cfg = _cfg(tmp_path)
    r1 = Trainer(cfg).fit()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]  # epochs are numbered from 1 wherever a user reads them
    assert json.loads((tmp_path / "run" / "results.json").read_text())["test"] == r1.test
    # results.json says which code trained the run
    from mtlkit import __version__
    from mtlkit.runs import code_provenance

    code = json.loads((tmp_path / "run" / "results.json").read_text())["code"]
    assert code == code_provenance() and code["version"] == __version__
    r2 = Trainer(cfg.override(["output.overwrite=true"])).fit()
    assert r1.test == r2.test


def test_resume_reaches_the_same_final_state(tmp_path):
    full = Trainer(_cfg(tmp_path / "a", epochs=3)).fit()
    Trainer(_cfg(tmp_path / "b", epochs=1)).fit()
    t = Trainer(_cfg(tmp_path / "b", epochs=3))
    resumed = t.fit(resume=True)
    assert resumed.test == full.test
    assert [h["val/a/accuracy"] for h in resumed.history] == [h["val/a/accuracy"] for h in full.history]
    ck_full = torch.load(tmp_path / "a" / "run" / "checkpoint.pt", weights_only=False)
    ck_res = torch.load(tmp_path / "b" / "run" / "checkpoint.pt", weights_only=False)
    assert ck_res["epoch"] == ck_full["epoch"] == 2
    for k, v in ck_full["model"].items():  # the last epoch's weights, bit for bit
        torch.testing.assert_close(ck_res["model"][k], v, rtol=0, atol=0)


def _stop_at(monkeypatch, calls: int) -> None:
    """Make the trainer's ``calls``-th training step raise KeyboardInterrupt (a killed run)."""
    real, count = Trainer._step, [0]

    def step(self, *args, **kwargs):
        count[0] += 1
        if count[0] == calls:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "_step", step)


@pytest.mark.parametrize("method", ["ew", "pcgrad", "gradnorm", "famo", "rlw", "uw"])
def test_a_run_stopped_inside_an_epoch_resumes_bit_for_bit(tmp_path, monkeypatch, method):
    full = Trainer(_cfg(tmp_path / "a", epochs=2).override([f"method.name={method}"])).fit()
    cfg = _cfg(tmp_path / "b", epochs=2, checkpoint_minutes=1e-9).override([f"method.name={method}"])  # every step
    t = Trainer(cfg)
    steps = -(-len(t.data.train) // 32)
    assert steps >= 3
    _stop_at(monkeypatch, steps + 2)  # killed in the second step of the second epoch
    with pytest.raises(KeyboardInterrupt):
        t.fit()
    ck = torch.load(tmp_path / "b" / "run" / "checkpoint.pt", weights_only=False)
    assert (ck["epoch"], ck["in_epoch"]["batch"]) == (0, 1) and not (tmp_path / "b" / "run" / "results.json").exists()
    monkeypatch.undo()
    resumed = Trainer(cfg).fit(resume=True)
    assert resumed.test == full.test
    drop = {"seconds"}
    assert [{k: v for k, v in h.items() if k not in drop} for h in resumed.history] == [
        {k: v for k, v in h.items() if k not in drop} for h in full.history
    ]  # the epoch's mean losses too
    a, b = (torch.load(tmp_path / d / "run" / "checkpoint.pt", weights_only=False) for d in ("a", "b"))
    for k, v in a["model"].items():
        torch.testing.assert_close(b["model"][k], v, rtol=0, atol=0)
    assert b["in_epoch"] is None and b["train_seconds"] >= ck["train_seconds"] > 0


def test_without_mid_epoch_checkpoints_a_stopped_epoch_is_redone(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path, epochs=2, checkpoint_minutes=0)
    t = Trainer(cfg)
    _stop_at(monkeypatch, -(-len(t.data.train) // 32) + 2)
    with pytest.raises(KeyboardInterrupt):
        t.fit()
    ck = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert (ck["epoch"], ck["in_epoch"]) == (0, None)  # the end of the first epoch, nothing later
    monkeypatch.undo()
    full = Trainer(_cfg(tmp_path / "a", epochs=2)).fit()
    assert Trainer(cfg).fit(resume=True).test == full.test


def test_resume_refuses_a_changed_config(tmp_path):
    Trainer(_cfg(tmp_path, epochs=1)).fit()
    with pytest.raises(ConfigError, match=re.escape("train.lr")):
        Trainer(_cfg(tmp_path, epochs=2, lr=0.5)).fit(resume=True)
    (tmp_path / "run" / "checkpoint.pt").write_bytes(b"truncated")
    with pytest.raises(ConfigError, match=r"cannot read .*checkpoint\.pt .*delete that run"):
        Trainer(_cfg(tmp_path, epochs=2)).fit(resume=True)


def test_existing_run_dir_is_not_overwritten(tmp_path):
    Trainer(_cfg(tmp_path, epochs=1)).fit()
    with pytest.raises(ConfigError, match="--overwrite"):
        Trainer(_cfg(tmp_path, epochs=1)).fit()
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    cfg = _cfg(tmp_path, epochs=1).override([f"output.dir={foreign}", "output.overwrite=true"])
    with pytest.raises(ConfigError, match="not an mtlkit run"):
        Trainer(cfg).fit()
    assert (foreign / "thesis.tex").read_text() == "precious"


def test_nan_loss_stops_with_task_and_step(tmp_path):
    t = Trainer(_cfg(tmp_path, epochs=1))
    with torch.no_grad():
        for p in t.model.heads["b"].parameters():
            p.fill_(float("nan"))
    with pytest.raises(NonFiniteLossError, match=r"at epoch 1, step 1 of 3: non-finite loss for task\(s\) b "):
        t.fit()


@pytest.mark.parametrize("method", ["stl", "mean"])
def test_methods_train(tmp_path, method):
    res = Trainer(_cfg(tmp_path, epochs=1).override([f"method.name={method}"])).fit()
    assert set(res.test) >= {"a/accuracy", "b/accuracy", "joint_accuracy"}


def test_stl_selects_each_task_separately(tmp_path):
    t = Trainer(_cfg(tmp_path, epochs=3).override(["method.name=stl"]))
    res = t.fit()
    assert isinstance(res.best_epoch, dict) and set(res.best_epoch) == {"a", "b"}
    for name in ("a", "b"):
        accs = [h[f"val/{name}/accuracy"] for h in res.history]
        assert accs[res.best_epoch[name] - 1] == max(accs)  # best_epoch counts from 1


def test_bad_config_values(tmp_path):
    with pytest.raises(ConfigError, match="valid methods"):
        Trainer(_cfg(tmp_path).override(["method.name=sgdx"]))
    with pytest.raises(ConfigError, match="valid optimizers"):
        Trainer(_cfg(tmp_path, optimizer="lion"))
    with pytest.raises(ConfigError, match="valid models"):
        Trainer(_cfg(tmp_path).override(["model.name=resnet"]))
    with pytest.raises(ConfigError, match=r"CUDA|device"):
        Trainer(_cfg(tmp_path, device="cuda:7" if not torch.cuda.is_available() else "nonsense"))
    with pytest.raises(ConfigError, match="valid keys in train"):
        RunConfig.from_dict({"train": {"learning_rate": 1}})
    with pytest.raises(ConfigError, match="must be an integer"):
        RunConfig.from_dict({"train": {"epochs": 1.5}})
    for bad in (-1, float("nan")):
        with pytest.raises(ConfigError, match="checkpoint_minutes must be a finite number >= 0"):
            Trainer(_cfg(tmp_path, checkpoint_minutes=bad))


def test_yaml_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        RunConfig.from_yaml(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        RunConfig.from_yaml(tmp_path / "none.yaml")


def test_cli_train_and_errors(tmp_path, capsys):
    cfg = _cfg(tmp_path, epochs=1)
    path = tmp_path / "c.yaml"
    import yaml

    path.write_text(yaml.safe_dump(cfg.to_dict()))
    assert main(["train", "--config", str(path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "| a | accuracy |" in out and "joint_accuracy" in out
    assert main(["train", "--config", str(path), "--method", "nope"]) == 2
    assert "valid methods are" in capsys.readouterr().err
    assert main(["train", "--config", str(path)]) == 2  # run dir exists
    assert "--overwrite" in capsys.readouterr().err
    assert main(["train", "--config", str(path), "--set", "train.nope=1"]) == 2
    assert "unknown config key" in capsys.readouterr().err


def test_cli_train_interrupted_says_how_to_resume(tmp_path, monkeypatch, capsys):
    import yaml

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(_cfg(tmp_path, epochs=2, checkpoint_minutes=1.0e-9).to_dict()))
    _stop_at(monkeypatch, 1)
    assert main(["train", "--config", str(path), "--no-progress"]) == 130
    assert "interrupted before the first checkpoint" in capsys.readouterr().err
    monkeypatch.undo()
    _stop_at(monkeypatch, 6)  # 3 steps per epoch: killed in the third step of the second epoch
    assert main(["train", "--config", str(path), "--no-progress", "--overwrite"]) == 130
    err = capsys.readouterr().err
    assert "as of batch 2 of epoch 2" in err and f"mtlkit train --run-dir {tmp_path / 'run'} --resume" in err
    monkeypatch.undo()
    assert main(["train", "--run-dir", str(tmp_path / "run"), "--resume", "--no-progress"]) == 0
    full = Trainer(_cfg(tmp_path / "whole", epochs=2)).fit()
    assert json.loads((tmp_path / "run" / "results.json").read_text())["test"] == full.test


def test_cli_eval_clean_matches_results_and_attack_hurts(tmp_path, capsys):
    cfg = _cfg(tmp_path, epochs=2)
    res = Trainer(cfg).fit()
    run = str(tmp_path / "run")
    assert main(["eval", run, "--attack", "fgsm", "--eps", "0", "0.3"]) == 0
    out = json.loads(capsys.readouterr().out)
    clean = out["results"]["0.0"]
    assert clean["a/accuracy"] == pytest.approx(res.test["a/accuracy"])  # η = 0 reproduces clean accuracy
    assert out["results"]["0.3"]["joint_accuracy"] <= clean["joint_accuracy"]
    assert main(["eval", str(tmp_path)]) == 2  # not a run directory
    assert "not a finished mtlkit run" in capsys.readouterr().err


def test_cli_methods_lists_registries(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert "hps" in out and "multimnist" in out
    # every method on its own line, with its options' defaults, for aggregators the level, and the output scale
    assert "  cagrad (c=0.4, rescale=1) [parameter level, mean scale]: CAGrad" in out
    assert "  graddrop (leak=0.0, seed=0) [representation level, sum scale]: GradDrop" in out
    assert "  ew [sum scale]: Equal weighting" in out
    assert main(["methods", "mamg", "uw"]) == 0
    doc = capsys.readouterr().out
    assert "aggregator: mtlkit.aggregation.mamg.MAMG" in doc and "weighting: mtlkit.weighting.uw.UW" in doc
    assert "uw (form='regression', init_log_var=0.0) [sum scale]: Uncertainty weighting" in doc
    assert main(["methods", "nope"]) == 2
    assert "valid methods are" in capsys.readouterr().err


def test_cli_stops_quietly_when_its_reader_leaves():
    # `mtlkit methods | true`: the reader is gone before the first write; no traceback, the shell's SIGPIPE status.
    # Both stdout modes: unbuffered (each print writes) and block-buffered (the write is the flush at the end).
    import os
    import subprocess
    import sys

    for unbuffered in ("1", ""):
        env = {**os.environ, "PYTHONUNBUFFERED": unbuffered}
        proc = subprocess.Popen(
            [sys.executable, "-m", "mtlkit.cli", "methods"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
        )
        proc.stdout.close()  # long before the child has imported anything
        err = proc.stderr.read().decode()
        assert proc.wait(timeout=120) == 141, (unbuffered, err)
        assert err == "", err


def test_task_counts_reach_weightings_that_need_them(tmp_path):
    from mtlkit.data import Split
    from mtlkit.tasks import Task
    from mtlkit.train import task_instance_counts

    split = Split(torch.zeros(5, 2), {"p": torch.tensor([1, 0, 1, 1, 0]), "c": torch.tensor([0, 1, 2, 0, 1])})
    assert task_instance_counts([Task("p", "binary"), Task("c", "multiclass", 3)], split) == [3, 5]


def test_cli_data_fetch_rejects_unknown_names(capsys):
    assert main(["data", "fetch", "cifar"]) == 2
    err = capsys.readouterr().err
    assert "unknown dataset(s) ['cifar']" in err and all(n in err for n in ("mnist", "fashion", "yeast", "census"))


def test_finished_run_reuses_only_the_same_config(tmp_path):
    from mtlkit.runs import finished_run

    cfg = _cfg(tmp_path, epochs=1)
    assert finished_run(tmp_path / "run", cfg) is None  # nothing trained yet
    res = Trainer(cfg).fit()
    # progress bars, threads, device and output paths do not change what was learned
    same = cfg.override(["train.progress=true", "train.num_threads=1", "output.dir=elsewhere"])
    assert finished_run(tmp_path / "run", same)["test"] == res.test
    with pytest.raises(ConfigError, match=r"train\.lr: 0\.01 there, 0\.5 requested"):
        finished_run(tmp_path / "run", cfg.override(["train.lr=0.5"]))
    with pytest.raises(ConfigError, match=re.escape("method.name")):
        finished_run(tmp_path / "run", cfg.override(["method.name=mgda"]))
    (tmp_path / "run" / "config.yaml").unlink()
    with pytest.raises(ConfigError, match=re.escape("no config.yaml")):
        finished_run(tmp_path / "run", cfg)


def test_bench_zoo_tabulates_resumes_and_refuses_another_budget(tmp_path, monkeypatch, capsys):
    out = tmp_path / "zoo"
    argv = [
        "bench",
        "zoo",
        "--dataset",
        "_toy",
        "--methods",
        "ew",
        "mgda",
        "--seeds",
        "0",
        "1",
        "--epochs",
        "1",
        "--n-train",
        "96",
        "--n-test",
        "32",
        "--batch-size",
        "32",
        "--out",
        str(out),
        "--set",
        "model.options={encoder: mlp, hidden: [16], head_hidden: 8}",
    ]
    assert main(argv) == 0
    numbers = json.loads((out / "zoo__toy.json").read_text())
    assert list(numbers) == ["stl", "ew", "mgda"] and all(v["seeds"] == 2 for v in numbers.values())
    assert numbers["stl"]["delta_m"] == pytest.approx([-x for x in numbers["stl"]["delta_m"][::-1]])  # vs own mean
    assert (out / "zoo__toy.png").stat().st_size > 0 and not (out / "zoo__toy_partial.md").exists()
    table = (out / "zoo__toy.md").read_text()
    assert table.startswith("Method zoo on _toy (96 train") and "real data" not in table  # a test dataset: no claim
    # the table's cells are the runs' own results.json numbers
    acc = [json.loads((out / f"_toy-ew-s{s}" / "results.json").read_text())["test"]["a/accuracy"] for s in (0, 1)]
    assert f"| ew | 2 | {100 * sum(acc) / 2:.2f} ± " in table
    # --reuse: nothing is trained again, and the table is the same
    monkeypatch.setattr(Trainer, "fit", lambda self, resume=False: pytest.fail("retrained a finished run"))
    assert main(argv + ["--reuse"]) == 0
    assert (out / "zoo__toy.md").read_text() == table
    # --no-train tabulates what has finished and names what has not
    assert (
        main(argv[: argv.index("--seeds") + 1] + ["0", "1", "2"] + argv[argv.index("--seeds") + 3 :] + ["--no-train"])
        == 0
    )
    partial = (out / "zoo__toy.md").read_text()
    assert "partial; seeds [0, 1, 2]" in partial and f"| ew | 2 | {100 * sum(acc) / 2:.2f} ± " in partial
    assert "Not trained yet: stl seed 2, ew seed 2, mgda seed 2." in partial
    # --reuse with another budget is refused, naming the key
    capsys.readouterr()
    two_epochs = argv[: argv.index("--epochs") + 1] + ["2"] + argv[argv.index("--epochs") + 2 :]
    assert main(two_epochs + ["--reuse"]) != 0
    assert "train.epochs: 1 there, 2 requested" in capsys.readouterr().err


def test_zoo_table_shows_a_spread_only_with_two_seeds():
    from mtlkit.bench import zoo_table

    results = {"stl": [{"a/accuracy": 0.90}, {"a/accuracy": 0.80}], "ew": [{"a/accuracy": 0.93}]}
    table, numbers = zoo_table(results, [("a/accuracy", True)])
    assert "| stl | 2 | 85.00 ± 5.00 | +0.00 ± 5.88 |" in table
    # one seed: no ± (a population std of one value would read 0.00); Δm = -(93 - 85)/85 (lower is better)
    assert "| ew | 1 | 93.00 | -9.41 |" in table
    assert numbers["ew"]["seeds"] == 1 and numbers["ew"]["delta_m"] == pytest.approx([-100 * 8 / 85])
    # STL's own Δm mean is zero up to rounding (here -4e-15); it reads +0.00, never -0.00
    table, numbers = zoo_table({"stl": [{"a/accuracy": a} for a in (0.8784, 0.8303, 0.8477)]}, [("a/accuracy", True)])
    assert -1e-12 < np.mean(numbers["stl"]["delta_m"]) < 0
    assert "| stl | 3 | 85.21 ± 1.99 | +0.00 ± 2.33 |" in table


def test_zoo_plot_draws_the_tables_numbers(tmp_path):
    import matplotlib.colors

    from mtlkit.bench import plot_zoo, zoo_table

    results = {
        "stl": [{"a/accuracy": 0.90}, {"a/accuracy": 0.80}],
        "ew": [{"a/accuracy": 0.93}, {"a/accuracy": 0.89}],
        "mgda": [{"a/accuracy": 0.80}, {"a/accuracy": 0.78}],
    }
    _, numbers = zoo_table(results, [("a/accuracy", True)])
    fig = plot_zoo(numbers, ["a/accuracy"], tmp_path / "with.png", "with")
    assert (tmp_path / "with.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    acc, dm = fig.axes
    # accuracy bars: the seed means in %, in the zoo's method order, with the seed std as error bars
    assert [b.get_height() for b in acc.patches] == pytest.approx([85.0, 91.0, 79.0])
    # Δm bars: the mean of the per-seed Δm (against STL's seed mean, 85 %); EW beats STL (green), MGDA loses (red)
    widths = {t.get_text(): b.get_width() for t, b in zip(dm.get_yticklabels(), dm.patches, strict=True)}
    assert widths == pytest.approx({"stl": 0.0, "ew": -100 * 6 / 85, "mgda": 100 * 6 / 85})
    colors = [b.get_facecolor() for b in dm.patches]
    assert colors[1] == pytest.approx(matplotlib.colors.to_rgba("tab:green"))
    assert colors[2] == pytest.approx(matplotlib.colors.to_rgba("tab:red"))
    # no STL in the zoo: no Δm values, so the Δm panel is left empty
    _, numbers = zoo_table({"ew": results["ew"]}, [("a/accuracy", True)])
    fig = plot_zoo(numbers, ["a/accuracy"], tmp_path / "without.png", "without")
    assert (tmp_path / "without.png").is_file() and not fig.axes[1].axison and not fig.axes[1].patches


def test_a_run_shorter_than_dwas_equal_weight_epochs_warns_and_equals_ew(tmp_path):
    with pytest.warns(UserWarning, match="first 2 epochs: with train.epochs=2 it trains exactly as EW"):
        dwa = Trainer(_cfg(tmp_path, epochs=2).override(["method.name=dwa"])).fit()
    ew = Trainer(_cfg(tmp_path, epochs=2).override(["output.overwrite=true"])).fit()
    assert dwa.test == ew.test
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # three epochs: DWA's weights move in the third, no warning
        Trainer(_cfg(tmp_path, epochs=3).override(["method.name=dwa", "output.overwrite=true"]))


def test_bench_zoo_jobs_gives_the_same_table_as_one_process(tmp_path, capsys):
    argv = [
        "bench",
        "zoo",
        "--dataset",
        "_toy",
        "--methods",
        "ew",
        "pcgrad",
        "--seeds",
        "0",
        "1",
        "--epochs",
        "3",
        "--n-train",
        "160",
        "--n-test",
        "64",
        "--batch-size",
        "16",
        "--lr",
        "0.05",
        "--threads",
        "1",
        "--set",
        "model.options={encoder: mlp, hidden: [16], head_hidden: 8}",
    ]
    assert main(argv + ["--out", str(tmp_path / "one")]) == 0
    assert main(argv + ["--out", str(tmp_path / "two"), "--jobs", "2"]) == 0
    one, two = ((tmp_path / d / "zoo__toy.md").read_text() for d in ("one", "two"))
    metrics_table = one.split("\n\nPaired per-seed")[0]  # the first table; the paired one follows it
    rows = [line.split("|")[3:5] for line in metrics_table.splitlines() if line.startswith("| ")][1:]
    assert len({tuple(r) for r in rows}) == 3  # the methods learned different things: the comparison can fail
    assert one == two
    capsys.readouterr()
    assert main(argv + ["--out", str(tmp_path / "bad"), "--jobs", "0"]) != 0
    assert "--jobs must be >= 1" in capsys.readouterr().err
    assert main(argv + ["--out", str(tmp_path / "empty"), "--no-train"]) != 0
    assert "no finished run of this zoo" in capsys.readouterr().err


def test_bench_zoo_reuse_resumes_a_stopped_run_and_refuses_another_budget(tmp_path, monkeypatch, capsys):
    argv = [
        "bench",
        "zoo",
        "--dataset",
        "_toy",
        "--methods",
        "ew",
        "--seeds",
        "0",
        "--epochs",
        "2",
        "--n-train",
        "160",
        "--n-test",
        "32",
        "--batch-size",
        "16",
        "--lr",
        "0.05",
        "--set",
        "model.options={encoder: mlp, hidden: [16], head_hidden: 8}",
    ]
    calls = [0]
    real = Trainer._step

    def counted(self, *args, **kwargs):
        calls[0] += 1
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "_step", counted)
    assert main(argv + ["--out", str(tmp_path / "whole")]) == 0
    monkeypatch.undo()
    stopped = argv + ["--out", str(tmp_path / "stopped"), "--set", "train.checkpoint_minutes=1.0e-9"]
    _stop_at(monkeypatch, calls[0] - 3)  # inside EW's second epoch (STL trains first)
    assert main(stopped) == 130
    assert "run the same command with --reuse to continue" in capsys.readouterr().err
    monkeypatch.undo()
    assert not (tmp_path / "stopped" / "_toy-ew-s0" / "results.json").exists()
    capsys.readouterr()
    assert main(stopped + ["--reuse"]) == 0
    out = capsys.readouterr().out
    assert "ew seed 0: resuming from its checkpoint" in out and "stl seed 0: resuming" not in out
    assert (tmp_path / "stopped" / "zoo__toy.md").read_text() == (tmp_path / "whole" / "zoo__toy.md").read_text()
    # a stopped run of another budget is neither continued nor silently replaced
    for m in ("stl", "ew"):
        (tmp_path / "stopped" / f"_toy-{m}-s0" / "results.json").unlink()
    other = stopped[: stopped.index("--lr") + 1] + ["0.5"] + stopped[stopped.index("--lr") + 2 :]
    assert main(other + ["--reuse"]) != 0
    err = capsys.readouterr().err
    assert "refusing to resume" in err and "train.lr: 0.05 there, 0.5 requested" in err


def test_constructing_a_trainer_changes_no_global_random_state(tmp_path):
    """The model is initialised from train.seed, but the caller's random state is given back (nothing global changes
    when a class is constructed); fit starts from the seeded state, so what the caller drew in between does not
    change the run."""
    import random

    import numpy as np

    def cfg(d):
        return RunConfig.from_dict(
            {
                "dataset": {"name": "_toy"},
                "model": {"name": "hps", "options": {"encoder": "mlp", "hidden": [8]}},
                "method": {"name": "rlw"},
                "train": {"epochs": 1, "progress": False},
                "output": {"dir": str(tmp_path / d), "tensorboard": False},
            }
        )

    torch.manual_seed(123)
    random.seed(5)
    np.random.seed(7)  # noqa: NPY002 - the global state is what is tested
    before = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())  # noqa: NPY002
    first = Trainer(cfg("a"))
    after = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())  # noqa: NPY002
    assert torch.equal(before[0], after[0]) and before[1] == after[1] and (before[2] == after[2]).all()
    res_a = first.fit()
    second = Trainer(cfg("b"))
    torch.rand(1000)  # the caller draws between construction and fit (RLW draws its weights from the global RNG)
    res_b = second.fit()
    assert res_a.test == res_b.test
    for p, q in zip(first.model.parameters(), second.model.parameters(), strict=True):
        assert torch.equal(p, q)


def test_code_provenance_is_the_checkout_commit_or_none(tmp_path, monkeypatch):
    import shutil
    import subprocess
    from pathlib import Path

    import mtlkit
    from mtlkit import runs

    pkg = Path(mtlkit.__file__).resolve().parent
    git = shutil.which("git")
    head = subprocess.run([git, "-C", str(pkg), "rev-parse", "HEAD"], capture_output=True, text=True) if git else None
    code = runs.code_provenance()
    if head is not None and head.returncode == 0:
        assert code["git_commit"] == head.stdout.strip() and isinstance(code["dirty"], bool)
    else:
        assert code["git_commit"] is None and code["dirty"] is None
    # without git on the PATH (or outside a checkout) both are None, not an error
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert runs.code_provenance() == {"version": mtlkit.__version__, "git_commit": None, "dirty": None}
