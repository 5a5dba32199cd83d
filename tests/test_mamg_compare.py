"""``mtlkit reproduce mamg`` (MAMG vs PCGrad / MGDA at T >= 3) and the paired statistics it shares with
``reproduce mamo``: method specs, scores, paired differences, verdicts, an end-to-end run with --reuse."""

import argparse
import json

import pytest

from mtlkit.errors import ConfigError
from mtlkit.reproduce import load_all
from mtlkit.reproduce.mamg import SETUPS, _compare, _overall, parse_method, relative_delta, run_id, score
from mtlkit.reproduce.mamo import paired, verdict


def test_method_specs_and_run_ids():
    assert parse_method("pcgrad") == ("pcgrad", {})
    assert parse_method("mamg:rule=grow") == ("mamg", {"rule": "grow"})
    assert parse_method("cagrad:c=0.4,rescale=1") == ("cagrad", {"c": 0.4, "rescale": 1})
    assert run_id("mamg", {"rule": "grow"}) == "mamg_rule-grow" and run_id("mgda", {}) == "mgda"
    with pytest.raises(ConfigError, match="key=value"):
        parse_method("mamg:grow")


def test_paired_differences_sign_test_and_verdicts():
    d = paired({0: 0.7, 1: 0.6, 2: 0.8}, {0: 0.5, 1: 0.5, 2: 0.6})
    assert d["diffs"] == pytest.approx([0.2, 0.1, 0.2]) and d["positive"] == 3 and d["sign_p"] == pytest.approx(0.125)
    assert paired({0: 1.0, 3: 2.0}, {0: 0.0, 1: 5.0})["seeds"] == [0]  # only the seeds both have
    assert verdict([0.1, 0.2, 0.3]) == "supported"
    assert verdict([0.3, 0.2, -0.1]) == "mixed"
    assert verdict([0.1, -0.3, 0.1]) == "not supported"  # mean -0.033
    assert verdict([0.0, 0.0]) == "not supported" and verdict([]) == "not run"


def test_score_and_relative_delta():
    keys = [("a/accuracy", True), ("a/loss", False)]
    assert score({"a/accuracy": 0.8, "a/loss": 0.4}, keys) == pytest.approx(0.2)
    # Eq. 15 of A against B over the metrics whose B value is not 0: (+10 % on accuracy, +50 % on the loss) / 2
    assert relative_delta(
        {"a/accuracy": 0.88, "a/loss": 0.2}, {"a/accuracy": 0.8, "a/loss": 0.4}, keys
    ) == pytest.approx(30.0)
    assert (
        relative_delta({"a/accuracy": 0.5}, {"a/accuracy": 0.0}, keys[:1])
        != relative_delta(  # NaN, not inf
            {"a/accuracy": 0.5}, {"a/accuracy": 0.0}, keys[:1]
        )
    )


def test_comparisons_and_overall_verdicts_from_runs():
    keys = [("t/accuracy", True)]

    def runs(vals):
        return {s: {"test": {"t/accuracy": v}} for s, v in enumerate(vals)}

    table = {
        "pcgrad": runs([0.5, 0.5, 0.5]),
        "mamg": runs([0.6, 0.55, 0.51]),
        "mamg:rule=grow": runs([0.4, 0.6, 0.5]),
        "mgda": runs([0.5, 0.5, 0.5]),
    }
    comps = {(c["a"], c["b"]): c for c in _compare(table, keys)}
    assert comps[("mamg", "pcgrad")]["verdict"] == "supported" and comps[("mamg", "pcgrad")]["claim"]
    assert comps[("mamg:rule=grow", "pcgrad")]["verdict"] == "not supported"  # mean 0, one seed above
    assert ("pcgrad", "ew") not in comps  # a comparison needs both methods
    report = {
        "datasets": {
            "d1": {"comparisons": list(comps.values())},
            "d2": {"comparisons": [dict(comps[("mamg", "pcgrad")], verdict="mixed")]},
        }
    }
    overall = {c["claim"]: c["verdict"] for c in _overall(report)}
    assert overall["mamg beats pcgrad at T >= 3"] == "mixed"  # supported on d1, mixed on d2
    assert overall["mamg:rule=grow beats pcgrad at T >= 3"] == "not supported"


def test_reproduce_mamg_runs_end_to_end_and_reuses(tmp_path, monkeypatch):
    """A tiny run on the synthetic ``_toy`` data: report, results, paired rows; --reuse retrains nothing."""
    monkeypatch.setitem(
        SETUPS,
        "toy",
        {
            "dataset": "_toy",
            "options": {"n_train": 48, "n_val": 16, "n_test": 16},
            "model": {"encoder": "mlp", "hidden": [8], "head_hidden": 4},
            "epochs": 1,
            "batch_size": 16,
        },
    )
    rep = load_all()["mamg"]
    args = argparse.Namespace(
        datasets=["toy"],
        methods=["pcgrad", "mamg", "mamg:rule=grow"],
        seeds=[0, 1],
        epochs=None,
        n_train=None,
        lr=1e-3,
        full=False,
        device="cpu",
        threads=None,
        reuse=False,
        out=str(tmp_path),
    )
    assert rep.run(args) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    claims = {c["claim"]: c for c in res["claims"]}
    assert set(claims) == {"mamg beats pcgrad at T >= 3", "mamg:rule=grow beats pcgrad at T >= 3"}
    comp = res["datasets"]["toy"]["comparisons"][0]
    assert comp["paired"]["n"] == 2 and len(comp["paired"]["diffs"]) == 2
    md = (tmp_path / "report.md").read_text()
    assert "Budget" in md and "mamg − pcgrad" in md and "**" + claims["mamg beats pcgrad at T >= 3"]["verdict"] in md
    stamp = {p: p.stat().st_mtime_ns for p in tmp_path.glob("toy/runs/*/results.json")}
    assert len(stamp) == 6
    args.reuse = True
    assert rep.run(args) == 0
    assert {p: p.stat().st_mtime_ns for p in tmp_path.glob("toy/runs/*/results.json")} == stamp
    assert json.loads((tmp_path / "results.json").read_text())["claims"] == res["claims"]
