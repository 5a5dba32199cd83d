"""``mtlkit reproduce mamg``: does MAMG beat PCGrad with three or more tasks? (paired seeds, both MAMG readings).

Chai et al., "A Model-Agnostic Approach to Mitigate Gradient Interference for Multi-Task Learning", IEEE Transactions
on Cybernetics 53(12), 2023, doi 10.1109/TCYB.2022.3223377, claim MAMG beats PCGrad (Yu et al., "Gradient Surgery for
Multi-Task Learning", NeurIPS 2020). With two tasks both MAMG readings equal twice MGDA's min-norm point under
conflict (:class:`mtlkit.aggregation.mamg.MAMG`), so a 2-task comparison tests conflict-gated MGDA; the readings differ,
and MAMG differs from MGDA, only for T ≥ 3. This runs T ≥ 3:

* ``four_task``: ``entangled_images[four_task]``, 4 binary tasks on 36x36 Multi-(Fashion+MNIST) images, HPS with the
  conv encoder (MTVIB Table I(b)); metrics per task: accuracy and average precision;
* ``yeast``: yeast's 14 labels as 14 binary tasks (:mod:`mtlkit.data.yeast`, the fixed seed-0 60/20/20 split),
  HPS with an MLP encoder; metrics per task: average precision and accuracy at 0.5 (``label_accuracy``).
  (QM9's 11 targets are not obtainable on this machine.)

Methods (``--methods``, ``name`` or ``name:key=value,...``; defaults ``ew mgda pcgrad mamg mamg:rule=grow``): every
method trains the same HPS model from the same seed-s initialisation on the same mini-batch order (paired seeds), for
the same epochs, batch size and learning rate; model selection on the mean validation primary metric.

Per seed the **score** of a run is the mean over every task metric (all of them lie in [0, 1] and are higher-better
here); a claim "A beats B" rests on the seed-by-seed differences score(A) − score(B), with the verdict rule of
:data:`mtlkit.reproduce.mamo.VERDICT_RULE`. Also reported: Eq. 15's Δ of A against B (relative, in %, over the metrics
whose B value is not 0).

Default budget: ``four_task`` 1500 / 500 / 2000 images, 4 epochs, batch 128; ``yeast`` 6 epochs, batch 64; seeds
0 1 2; the five default methods: about 20 minutes on two idle CPU cores (four_task's Gramian methods cost ~20 s an
epoch, yeast's runs a few seconds). ``--datasets yeast`` alone takes a few minutes.

Resuming: ``--reuse`` keeps finished runs of the same configuration (:func:`mtlkit.runs.finished_run`) and resumes
stopped ones from their checkpoint.

Example:
    >>> parse_method("mamg:rule=grow,seed=3")
    ('mamg', {'rule': 'grow', 'seed': 3})
    >>> run_id("mamg", {"rule": "grow"})
    'mamg_rule-grow'
"""

from __future__ import annotations

import argparse
import json
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mtlkit.reproduce import Reproduction, register_reproduction, train_or_reuse
from mtlkit.reproduce.mamo import VERDICT_RULE, command_line, fmt_paired, fmt_pm, paired, verdict, with_second_metric

log = logging.getLogger("mtlkit")

#: --datasets -> registered dataset, its options, the HPS options, epochs, batch size (the default budget)
SETUPS: dict[str, dict[str, Any]] = {
    "four_task": {
        "dataset": "entangled_images",
        "options": {"pair": "four_task", "seed": 0, "n_train": 1500, "n_val": 500, "n_test": 2000},
        "model": {"encoder": "conv", "width": 384, "head_hidden": 192},
        "epochs": 4,
        "batch_size": 128,
    },
    "yeast": {
        "dataset": "yeast",
        "options": {"seed": 0, "loss": "bce"},
        "model": {"encoder": "mlp", "hidden": [256], "head_hidden": 64},
        "epochs": 6,
        "batch_size": 64,
    },
}
#: --full: the four-task images at the entangled protocol's full sizes; longer schedules; five seeds
FULL: dict[str, Any] = {  # per dataset its overrides, and "seeds"
    "four_task": {"options": {"n_train": 8000, "n_val": 2000, "n_test": 8000}, "epochs": 20},
    "yeast": {"epochs": 30},
    "seeds": [0, 1, 2, 3, 4],
}
DEFAULT_METHODS = ["ew", "mgda", "pcgrad", "mamg", "mamg:rule=grow"]
#: (A, B): the claims and context comparisons, "A beats B"
COMPARISONS = [
    ("mamg", "pcgrad", True),
    ("mamg:rule=grow", "pcgrad", True),
    ("mamg", "mgda", False),
    ("mamg:rule=grow", "mgda", False),
    ("pcgrad", "ew", False),
    ("mamg", "ew", False),
]


def parse_method(spec: str) -> tuple[str, dict[str, Any]]:
    """``"name"`` or ``"name:key=value,key=value"`` (values read as YAML scalars) -> (name, options)."""
    import yaml

    name, _, rest = spec.partition(":")
    opts: dict[str, Any] = {}
    for part in filter(None, rest.split(",")):
        k, eq, v = part.partition("=")
        if not eq or not k:
            from mtlkit.errors import ConfigError

            raise ConfigError(f"method spec {spec!r}: expected name:key=value[,key=value], got {part!r}")
        opts[k.strip()] = yaml.safe_load(v)
    return name.strip(), opts


def run_id(name: str, opts: dict[str, Any]) -> str:
    """A directory-safe id of a method and its options."""
    tail = "_".join(f"{k}-{v}" for k, v in sorted(opts.items()))
    return re.sub(r"[^A-Za-z0-9_.=-]", "-", name + (f"_{tail}" if tail else ""))


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--datasets", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    p.add_argument(
        "--methods",
        nargs="+",
        default=DEFAULT_METHODS,
        help="method specs, name or name:key=value,... (default: %(default)s)",
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=None, help="override every dataset's epochs")
    p.add_argument("--n-train", type=int, default=None, help="four_task: override n_train")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--full", action="store_true", help=f"the longer budget: {FULL}")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument(
        "--reuse",
        action="store_true",
        help="keep finished runs in --out trained with the same configuration (resume stopped ones)",
    )
    p.add_argument("--out", default="runs/reproduce-mamg")


def _setup(name: str, args: argparse.Namespace) -> dict[str, Any]:
    s = json.loads(json.dumps(SETUPS[name]))
    if args.full:
        f = FULL.get(name, {})
        s["options"].update(f.get("options", {}))
        s["epochs"] = f.get("epochs", s["epochs"])
    if args.epochs is not None:
        s["epochs"] = args.epochs
    if args.n_train is not None and "n_train" in s["options"]:
        s["options"]["n_train"] = args.n_train
    return s


def _budget(name: str, s: dict[str, Any], data, args: argparse.Namespace) -> str:
    sizes = f"{len(data.train)} train / {len(data.val)} val / {len(data.test)} test"
    return (
        f"{name} ({s['dataset']} {s['options']}; {len(data.tasks)} tasks; {sizes}), HPS {s['model']}, "
        f"{s['epochs']} epochs, batch {s['batch_size']}, Adam lr {args.lr}, seeds {list(args.seeds)} (paired), "
        f"device {args.device}"
    )


def _train(name: str, s: dict[str, Any], data, spec: str, seed: int, args: argparse.Namespace, out: Path) -> dict:
    from mtlkit.config import RunConfig

    method, opts = parse_method(spec)
    run_dir = out / name / "runs" / f"{run_id(method, opts)}-s{seed}"
    cfg = RunConfig.from_dict(
        {
            "dataset": {"name": s["dataset"], "options": s["options"]},
            "model": {"name": "hps", "options": s["model"]},
            "method": {"name": method, "options": opts},
            "train": {
                "epochs": s["epochs"],
                "batch_size": s["batch_size"],
                "lr": args.lr,
                "seed": seed,
                "progress": False,
                "device": args.device,
                "num_threads": args.threads,
            },
            "output": {"dir": str(run_dir), "tensorboard": False, "overwrite": True},
        }
    )
    done, trained = train_or_reuse(cfg, data, run_dir, args.reuse)
    if trained:
        log.info(f"[mamg] {name} seed {seed} {spec}: {done['train_seconds']:.0f}s")
    return {"test": done["test"], "val": done["val"], "seconds": float(done["train_seconds"])}


def score(test: dict[str, float], keys: list[tuple[str, bool]]) -> float:
    """Mean over the task metrics, lower-is-better ones negated (here every metric is higher-is-better)."""
    return float(np.mean([test[k] if h else -test[k] for k, h in keys]))


def relative_delta(test: dict[str, float], ref: dict[str, float], keys: list[tuple[str, bool]]) -> float:
    """Eq. 15 of ``test`` against ``ref`` (%, higher is better) over the metrics whose reference is not 0."""
    vals = [(1 if h else -1) * (test[k] - ref[k]) / ref[k] for k, h in keys if ref[k] != 0]
    return float(100.0 * np.mean(vals)) if vals else float("nan")


def _run(args: argparse.Namespace) -> int:
    from mtlkit.data import build_dataset

    if args.full:
        args.seeds = FULL["seeds"]
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for spec in args.methods:
        parse_method(spec)  # fail before training on a malformed spec
    report: dict[str, Any] = {"verdict_rule": VERDICT_RULE, "datasets": {}}
    for name in args.datasets:
        s = _setup(name, args)
        data = build_dataset(s["dataset"], **s["options"])
        keys = with_second_metric(data)
        budget = _budget(name, s, data, args)
        log.info(f"[mamg] budget: {budget}")
        runs = {
            spec: {seed: _train(name, s, data, spec, seed, args, out) for seed in args.seeds} for spec in args.methods
        }
        report["datasets"][name] = {
            "budget": budget,
            "metrics": keys,
            "runs": {spec: {str(seed): r for seed, r in per.items()} for spec, per in runs.items()},
            "comparisons": _compare(runs, keys),
        }
    report["claims"] = _overall(report)
    (out / "results.json").write_text(json.dumps(report, indent=1, default=str))
    md = markdown(report, args)
    (out / "report.md").write_text(md)
    print(md)
    log.info(f"[mamg] wrote {out / 'report.md'} and {out / 'results.json'}")
    return 0


def _compare(runs: dict[str, dict[int, dict]], keys: list[tuple[str, bool]]) -> list[dict[str, Any]]:
    out = []
    for a, b, claim in COMPARISONS:
        if a not in runs or b not in runs:
            continue
        d = paired(
            {s: score(r["test"], keys) for s, r in runs[a].items()},
            {s: score(r["test"], keys) for s, r in runs[b].items()},
        )
        rel = {s: relative_delta(runs[a][s]["test"], runs[b][s]["test"], keys) for s in d["seeds"]}
        out.append({"a": a, "b": b, "claim": claim, "paired": d, "delta_vs_b": rel, "verdict": verdict(d["diffs"])})
    return out


def _overall(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Per claim over the datasets: supported on every dataset -> supported; not supported on some -> not supported;
    else mixed."""
    out = []
    for a, b, claim in COMPARISONS:
        if not claim:
            continue
        per = {
            n: c["verdict"]
            for n, d in report["datasets"].items()
            for c in d["comparisons"]
            if c["a"] == a and c["b"] == b
        }
        if not per:
            continue
        vs = list(per.values())
        v = (
            "supported"
            if all(x == "supported" for x in vs)
            else "not supported"
            if any(x == "not supported" for x in vs)
            else "mixed"
        )
        out.append({"claim": f"{a} beats {b} at T >= 3", "per_dataset": per, "verdict": v})
    return out


def markdown(report: dict[str, Any], args: argparse.Namespace) -> str:
    L = [
        "# MAMG vs PCGrad (and MGDA) with T ≥ 3 tasks",
        "",
        "Claim (Chai et al., IEEE T-Cybernetics 2023): MAMG beats PCGrad. For two tasks both MAMG readings equal "
        "2x MGDA under conflict, so only T ≥ 3 can test it. `mamg` = rule shrink (the method notes' clipping), "
        "`mamg:rule=grow` = the smallest edit of the released line.",
        "",
        f"Command: `{command_line('mamg', _add_arguments, args)}`",
        "",
        VERDICT_RULE,
        "",
        "Score of a run = mean over its task metrics (all in [0, 1], higher is better); paired differences are "
        "score(A) − score(B) per seed. Δ(A vs B) = Eq. 15 of A against the same seed's B, in %.",
        "",
        "## Verdicts",
        "",
        "| Claim | per dataset | verdict |",
        "|---|---|---|",
    ]
    for c in report["claims"]:
        L.append(
            f"| {c['claim']} | "
            + ", ".join(f"{n}: {v}" for n, v in c["per_dataset"].items())
            + f" | **{c['verdict']}** |"
        )
    for name, d in report["datasets"].items():
        keys = [tuple(k) for k in d["metrics"]]
        cols = _columns(keys)
        L += [
            "",
            f"## {name}",
            "",
            f"_Budget: {d['budget']}._",
            "",
            "| Method | score (mean ± sd) | " + " | ".join(c for c, _ in cols) + " | seconds |",
            "|" + "---|" * (len(cols) + 3),
        ]
        for spec, per in d["runs"].items():
            rs = list(per.values())
            L.append(
                f"| {spec} | {fmt_pm([score(r['test'], keys) for r in rs], '{:.4f}')} | "
                + " | ".join(
                    fmt_pm([float(np.mean([r["test"][k] for k in ks])) for r in rs], "{:.4f}") for _, ks in cols
                )
                + f" | {fmt_pm([r['seconds'] for r in rs], '{:.0f}')} |"
            )
        L += [
            "",
            f"_Budget: {d['budget']}._",
            "",
            "| A − B | claim? | score(A) − score(B) (mean ± sd; per seed) | sign-test p | Δ(A vs B) % per seed | "
            "verdict |",
            "|---|---|---|---|---|---|",
        ]
        for c in d["comparisons"]:
            rel = ", ".join(f"{v:+.2f}" for v in c["delta_vs_b"].values())
            L.append(
                f"| {c['a']} − {c['b']} | {'claim' if c['claim'] else 'context'} | "
                f"{fmt_paired(c['paired'], '{:+.4f}')} | {c['paired']['sign_p']:.3f} | {rel} | "
                f"**{c['verdict']}** |"
            )
    return "\n".join(L) + "\n"


def _columns(keys: list[tuple[str, bool]], per_task_up_to: int = 4) -> list[tuple[str, list[str]]]:
    """Table columns: one per task metric for a few tasks; else the mean over tasks of each metric name."""
    tasks = {k.split("/")[0] for k, _ in keys}
    if len(tasks) <= per_task_up_to:
        return [(k, [k]) for k, _ in keys]
    by: dict[str, list[str]] = {}
    for k, _ in keys:
        by.setdefault(k.split("/", 1)[1], []).append(k)
    return [(f"mean {m} ({len(ks)} tasks)", ks) for m, ks in by.items()]


register_reproduction(
    Reproduction(
        name="mamg",
        help="MAMG (T-Cybernetics 2023) vs PCGrad and MGDA at T >= 3: 4-task images and yeast, paired seeds",
        add_arguments=_add_arguments,
        run=_run,
    )
)
