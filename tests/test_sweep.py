"""``mtlkit sweep`` (mtlkit/sweep.py): the derived search space, a tiny 3-trial sweep on the synthetic ``_toy`` data
(resume, Ctrl-C, the best YAML trains, the test split is never read while searching) and bad input."""

from __future__ import annotations

import csv
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

optuna = pytest.importorskip("optuna")

from mtlkit import sweep  # noqa: E402
from mtlkit._registry import METHODS  # noqa: E402
from mtlkit.cli import main  # noqa: E402
from mtlkit.config import RunConfig  # noqa: E402
from mtlkit.errors import ConfigError, DataError  # noqa: E402
from mtlkit.sweep import ParamSpec, SealedSplit, SweepArgs, run_sweep, search_space  # noqa: E402

TOY = [
    "model.name=hps",
    "model.options.encoder=mlp",
    "model.options.hidden=[16]",
    "model.options.head_hidden=8",
    "train.batch_size=32",
]


def _args(out: Path, **kw) -> SweepArgs:
    base = {"method": "ew", "dataset": "_toy", "sets": TOY, "trials": 3, "epochs": 2, "out": str(out), "final": False}
    return SweepArgs(**{**base, **kw})


def _study(out: Path):
    return optuna.load_study(study_name=sweep.STUDY, storage=sweep._storage_url(out))


def _rows(out: Path) -> list[dict[str, str]]:
    with open(out / "trials.csv") as fh:
        return list(csv.DictReader(fh))


# -- the search space ---------------------------------------------------------------------------------------------


def test_range_table_names_real_options_and_excluded_options_are_never_searched():
    # a RANGES key whose method or option was renamed would silently stop applying
    for key in sweep.RANGES:
        method, option = key.split(".")
        assert option in METHODS.get(method).options, key
    for name in METHODS.names():
        for key in search_space(name):
            if key.startswith("method.options."):
                option = key.removeprefix("method.options.")
                assert option not in sweep.NOT_SEARCHED and f"{name}.{option}" not in sweep.NOT_SEARCHED


@pytest.mark.parametrize("method", ["cagrad", "constant", "dwa", "gradnorm", "nash_mtl", "pcgrad", "uw"])
def test_both_ends_of_every_derived_range_are_valid_runs(method):
    base = RunConfig.resolve(None, ["dataset.name=_toy", f"method.name={method}", *TOY]).to_dict()
    sweep.check_space(base, search_space(method), num_tasks=2)


def test_the_type_rule_spans_a_decade_around_a_positive_float_default():
    space = search_space("excess_mtl", override={"method.options.step_size": None})
    assert "method.options.step_size" not in space
    lr = search_space("ew", base_lr=2e-3)["train.lr"]
    assert lr.log and math.isclose(lr.low, 2e-4) and math.isclose(lr.high, 2e-2)
    # nash_mtl.normalize is a bool: both values
    assert search_space("nash_mtl")["method.options.normalize"].choices == (False, True)


def test_task_weights_keep_their_ratios_and_sum_to_the_task_count():
    w = sweep.normalised_weights([0.2, 0.6, 1.2])
    assert math.isclose(sum(w), 3.0, rel_tol=1e-12)
    assert math.isclose(w[1] / w[0], 3.0, rel_tol=1e-12) and math.isclose(w[2] / w[0], 6.0, rel_tol=1e-12)


@pytest.mark.parametrize(
    "spec, match",
    [
        ({"type": "uniform", "low": 0, "high": 1}, "type must be one of"),
        ({"type": "float", "low": 1, "high": 1}, "finite low < high"),
        ({"type": "float", "low": 0, "high": 1, "log": True}, "low > 0"),
        ({"type": "int", "low": 0.5, "high": 3}, "integer low and high"),
        ({"type": "categorical", "choices": []}, "non-empty list"),
        ({"type": "float", "lo": 0, "high": 1}, "unknown key"),
        ("0.1..1", "must be a mapping"),
    ],
)
def test_bad_space_entries_are_config_errors_naming_the_key(spec, match):
    with pytest.raises(ConfigError, match=match) as e:
        ParamSpec.from_dict("method.options.c", spec)
    assert "method.options.c" in str(e.value)


def test_a_space_key_the_method_does_not_take_is_refused_before_training(tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text("method.options.nosuch: {type: float, low: 0.1, high: 1.0}\n")
    with pytest.raises(ConfigError, match="nosuch"):
        run_sweep(_args(tmp_path / "sw", space=str(space)))
    assert not (tmp_path / "sw").exists()


def test_a_sealed_split_cannot_be_read():
    s = SealedSplit(7)
    assert len(s) == 7
    with pytest.raises(DataError, match="test split was read"):
        _ = s.x
    with pytest.raises(DataError, match="test split was read"):
        _ = s.y


# -- a tiny sweep -------------------------------------------------------------------------------------------------


def test_sweep_resumes_reads_no_test_and_its_best_yaml_trains(tmp_path, monkeypatch):
    import mtlkit.train

    seen: list[str] = []
    real = mtlkit.train.evaluate

    def recording(model, split, *args, **kw):
        seen.append(type(split).__name__)
        return real(model, split, *args, **kw)

    monkeypatch.setattr(mtlkit.train, "evaluate", recording)
    out = tmp_path / "sw"
    run_sweep(_args(out, method="constant"))
    # the search evaluates validation once per epoch and trial, and nothing else: no test, no results.json
    assert seen == ["Split"] * (3 * 2)
    assert not list(out.glob("trials/*/results.json"))
    study = _study(out)
    first = [(t.number, t.value, t.params) for t in study.trials]
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3
    assert {"train.lr", "method.options.weights[a]", "method.options.weights[b]"} == set(study.trials[0].params)
    for f in ("best.yaml", "trials.csv", "optimization_history.png", "param_importances.png"):
        assert (out / f).stat().st_size > 0, f
    assert len(_rows(out)) == 3

    # the same command with a larger --trials adds to the same study; earlier trials are untouched
    run_sweep(_args(out, method="constant", trials=4))
    study = _study(out)
    assert len(study.trials) == 4 and [(t.number, t.value, t.params) for t in study.trials[:3]] == first
    assert len(_rows(out)) == 4
    # the best YAML is the best trial's config, with normalised weights, and `mtlkit train --config` accepts it
    best = yaml.safe_load((out / "best.yaml").read_text())
    assert best["train"]["lr"] == study.best_trial.params["train.lr"]
    w = best["method"]["options"]["weights"]
    raw = [study.best_trial.params[f"method.options.weights[{t}]"] for t in ("a", "b")]
    assert math.isclose(sum(w), 2.0, rel_tol=1e-12) and math.isclose(w[0] / w[1], raw[0] / raw[1], rel_tol=1e-12)
    rc = main(["train", "--config", str(out / "best.yaml"), "--run-dir", str(tmp_path / "again"), "--no-progress"])
    assert rc == 0 and (tmp_path / "again" / "results.json").is_file()
    # a resume with another base config is refused, naming the key
    with pytest.raises(ConfigError, match=r"train\.batch_size"):
        run_sweep(_args(out, method="constant", sets=[*TOY, "train.batch_size=16"]))


def test_final_runs_use_the_best_config_with_each_seed(tmp_path):
    out = tmp_path / "sw"
    final = run_sweep(_args(out, trials=2, final=True, seeds=[1, 2]))
    assert final["seeds"] == [1, 2] and set(final["test"]) == {"1", "2"}
    best = _study(out).best_trial
    for s in (1, 2):
        cfg = yaml.safe_load((out / "final" / f"trial{best.number}-s{s}" / "config.yaml").read_text())
        assert cfg["train"]["seed"] == s and cfg["train"]["lr"] == best.params["train.lr"]
    mean, std = final["summary"]["a/accuracy"]
    vals = [final["test"][s]["a/accuracy"] for s in ("1", "2")]
    assert math.isclose(mean, sum(vals) / 2) and math.isclose(std, abs(vals[0] - vals[1]) / 2)
    assert "| a/accuracy |" in (out / "final.md").read_text()


def test_an_interrupted_trial_is_not_counted_and_is_run_again(tmp_path, monkeypatch):
    out = tmp_path / "sw"
    real = sweep.SweepCallback.on_epoch_end

    def interrupt_second_trial(self, trainer, epoch, row):
        if self.trial.number == 1:
            raise KeyboardInterrupt
        real(self, trainer, epoch, row)

    monkeypatch.setattr(sweep.SweepCallback, "on_epoch_end", interrupt_second_trial)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(_args(out))
    study = _study(out)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "FAIL"]
    assert study.trials[1].user_attrs["interrupted"] and study.trials[1].value is None
    # a trial left RUNNING by a process that died (no tell) is also taken as interrupted
    stale = study.ask()
    stale.suggest_float("train.lr", 1e-4, 1e-2, log=True)
    monkeypatch.setattr(sweep.SweepCallback, "on_epoch_end", real)
    run_sweep(_args(out))
    study = _study(out)
    states = [t.state.name for t in study.trials]
    assert states[:3] == ["COMPLETE", "FAIL", "FAIL"] and states.count("COMPLETE") == 3
    reruns = {t.user_attrs["rerun_of"]: t for t in study.trials if "rerun_of" in t.user_attrs}
    assert set(reruns) == {1, 2}
    for n, t in reruns.items():
        assert t.params == study.trials[n].params and t.state.name == "COMPLETE"


def test_ctrl_c_stops_parallel_workers_and_marks_their_trials_interrupted(tmp_path):
    # the command line as a user runs it: two worker processes on one study; SIGINT to the command (as `kill -INT`
    # does; a terminal's Ctrl-C reaches the workers too) is forwarded to the workers
    out = tmp_path / "sw"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent), "MTLKIT_MALLOC_TUNING": "0"}
    cmd = [sys.executable, "-m", "mtlkit.cli", "--import", "conftest", "sweep", "--method", "ew", "--dataset", "_toy"]
    cmd += [a for s in TOY for a in ("--set", s)] + ["--set", "dataset.options.n_train=2000"]
    cmd += ["--trials", "3", "--epochs", "200", "--jobs", "2", "--out", str(out), "--no-final"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    # both workers are inside a trial that has finished an epoch
    while not all((out / "trials" / n / "metrics.jsonl").exists() for n in ("0000", "0001")):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Continue with the same command" in err and "Traceback" not in err
    trials = _study(out).trials
    assert [t.state.name for t in trials] == ["FAIL", "FAIL"]
    assert all(t.user_attrs["interrupted"] for t in trials)
    assert trials[0].params != trials[1].params  # the workers drew different points (seeded apart)


def test_tuned_table_computes_delta_m_against_the_tuned_baseline(tmp_path):
    import json

    def final(method, accs, lr):
        test = {str(s): {"a/accuracy": a, "b/loss": 1.0} for s, a in enumerate(accs)}
        summary = {"a/accuracy": [sum(accs) / len(accs), 0.0], "b/loss": [1.0, 0.0]}
        d = tmp_path / f"d-{method}"
        d.mkdir()
        primary = {"a/accuracy": True, "b/loss": False}
        doc = {"method": method, "dataset": "d", "primary": primary, "test": test, "summary": summary}
        (d / "final.json").write_text(json.dumps({**doc, "params": {"train.lr": lr}, "config": {}}))

    final("stl", [0.5, 0.5], 1e-3)
    final("ew", [0.6, 0.4], 2e-3)  # Δm per seed: -(0.6/0.5 - 1)/2 and -(0.4/0.5 - 1)/2 -> mean 0
    final("pcgrad", [0.55, 0.55], 3e-3)  # -(0.1)/2 * 100 = -5 %
    rows = {line.split("|")[1].strip(): line for line in sweep.tuned_table(tmp_path).splitlines()[2:]}
    assert rows["pcgrad"].split("|")[4].strip() == "-5.00"
    assert rows["ew"].split("|")[4].strip() in ("+0.00", "-0.00")
    assert rows["stl"].split("|")[4].strip() in ("+0.00", "-0.00")
    with pytest.raises(ConfigError, match="no finished sweep"):
        sweep.tuned_table(tmp_path / "empty")
