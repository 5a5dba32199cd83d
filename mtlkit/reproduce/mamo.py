"""``mtlkit reproduce mamo``: MAMO's claims, on four tasks with paired seeds (and Tables 1-5, Figs. 3-4 in shape).

Tan, Hu & Zhang, "MAMO: Multi-Task Architecture Learning via Multi-Objective and Gradients Mediative Kernel", 27th
European Conference on Artificial Intelligence (ECAI 2024, IOS Press; DOI not checked here). The paper evaluates on
Cityscapes (Table 1, 2 tasks) and NYUv2 (Tables 2-5, 3 tasks). **Neither is obtainable on these machines** (no
internet, not in any registry package). The default here is the 4-task Multi-(Fashion+MNIST) problem
``entangled_images[four_task]`` (:mod:`mtlkit.data.entangled`: "digit >= 5", "item is footwear", "digit is odd",
"upper-body garment" on 36x36 images holding an MNIST digit and a Fashion-MNIST item; the first two agree on 75 % of the
training images and never on the test images, so sharing what one task learns can hurt the other: a setting built for
negative transfer). Two tasks cannot show the claims (a 2-task MAMG/MGDA step is conflict-gated MGDA; a 2-task Win has
two values per metric), so the 2-task MultiMNIST family is still selectable (``--dataset``) but not the default. The
paper's numbers are printed for reference only: they are on other data.

What is run, per seed (every row on the same data split, conv backbone (MTVIB Table I(b)), batch size, learning rate
and total epoch count; the seeds are *paired*: seed s of every row starts from the same HPS initialisation and sees
the same mini-batch order):

every row is a run of the one training loop, :class:`mtlkit.train.Trainer` (``mtlkit train``, the same engine
options, checkpoints and resume for all):

* HPS rows (model ``hps``): ``stl`` (one network per task), ``hps`` (HPS, equal weights: plain HPS), ``hps_mgda``
  (HPS + MGDA, the paper's "MGDA" row); optional ``gradnorm``, ``pcgrad``, ``cagrad``;
* Alg. 1 rows (model ``mamo``, whose search callback :class:`mtlkit.models.mamo_search.ArchitectureSearch` runs Alg. 1 in the
  loop: ``pretrain_epochs + rounds * epochs_per_round`` epochs, the rows' method from the first detection on):
  ``mamo`` (GMKs + MGDA) and ``wo_gmk`` (the w/o-GMK ablation: **CoNAL-faithful** task branches, :class:`mtlkit.models.mamo.MAMO`
  ``module="conal"``, + MGDA); optional ``conal`` (CoNAL-faithful branches + linear scalarisation, the CoNAL
  baseline's architecture), ``wo_mo`` (GMKs + linear scalarisation), ``wo_gmk_fused`` (the earlier mtlkit reading:
  task-exclusive modules fused with the shared output, + MGDA), ``mamo_pcgrad``, ``mamo_cagrad``.

Metrics: per task its accuracy and a second metric, the average precision for binary tasks (threshold-free) or the
test cross-entropy (NLL, lower is better) for multi-class tasks. Model selection (Trainer and Alg. 1 alike) is on the
mean validation accuracy. Δ is MAMO's Eq. 15 (**higher is better**: ``(1/K) Σ_k (−1)^{s_k} (M_k − STL_k)/STL_k × 100``
over all K task metrics) against the *same seed's* STL; Win is the share of metrics on which the row beats that STL.
Paired differences are taken seed by seed; each claim gets a verdict computed from them (:data:`VERDICT_RULE`).

Search-schedule choices, each an option (see :mod:`mtlkit.models.mamo_search`): ``--pretrain-method`` (default ``ew``: Alg. 1
pre-trains plain HPS, so the "0 detections" point of Fig. 4 is plain HPS; ``same`` pre-trains with the rows' own
method, e.g. HPS+MGDA), ``--conflict-window`` / ``--detect-batches`` (where Eq. 11's Q is counted),
``--restore-optimizer`` (roll Adam's state back with the best-validation epoch), ``--scope``, ``--threshold``.

Default budget: ``four_task`` with 1500 training / 500 validation / 2000 test images, 4 epochs for every row (Alg. 1:
2 pre-training + Z = 2 rounds x 1), batch 128, Adam 1e-3, seeds 0 1 2, rows ``stl hps hps_mgda mamo wo_gmk``: about
25-30 minutes on two idle CPU cores (estimated from one-epoch CPU times measured here: HPS ~8 s, HPS+MGDA ~20 s per
epoch; the Alg. 1 rows cost most, as their modules multiply the encoder). ``--seeds 0`` takes about a third of it, and
``--seeds 0 1 2 --reuse`` afterwards trains only the other seeds. ``--full``: the paper's schedule (Z = 5).

Resuming: ``--reuse`` keeps every finished run in ``--out`` whose configuration equals the requested one
(:func:`mtlkit.runs.finished_run`), resumes a stopped one from its checkpoint (an Alg. 1 run mid-search too, bit for
bit) and refuses, naming the keys, one trained with another. Phases of zero epochs (``--pretrain-epochs 0`` or
``--epochs-per-round 0``, which would detect without training) are refused.

Example:
    >>> "mamo" in PAPER and PAPER["mamo"]["table2_nyuv2"]["MAMO"]["delta"] == 3.00
    True
    >>> verdict([0.5, 1.0, 0.2]), verdict([0.5, -1.0, 0.7]), verdict([-0.5, 0.1])
    ('supported', 'mixed', 'not supported')
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mtlkit.reproduce import Reproduction, register_reproduction, train_or_reuse

log = logging.getLogger("mtlkit")

#: The paper's numbers (Tan, Hu & Zhang, ECAI 2024). Δ (Eq. 15, higher is better) and Win in %.
PAPER: dict[str, Any] = {
    "mamo": {
        # Table 1 (Cityscapes, 2 tasks, 4 metrics): Δ and Win.
        "table1_cityscapes": {
            "HPS": {"delta": -1.75, "win": 50},
            "GradNorm": {"delta": -3.49, "win": 25},
            "PCGrad": {"delta": -0.31, "win": 50},
            "CAGrad": {"delta": 0.42, "win": 75},
            "RotoGrad": {"delta": -2.10, "win": 25},
            "MGDA": {"delta": -1.38, "win": 50},
            "MTL-NAS": {"delta": -6.84, "win": 25},
            "CoNAL": {"delta": 2.21, "win": 75},
            "MAMO": {"delta": 2.57, "win": 100},
        },
        # Table 2 (NYUv2, 3 tasks, 9 metrics): Δ and Win.
        "table2_nyuv2": {
            "HPS": {"delta": -2.74, "win": 44},
            "GradNorm": {"delta": -2.00, "win": 44},
            "PCGrad": {"delta": -2.25, "win": 22},
            "CAGrad": {"delta": 0.25, "win": 44},
            "RotoGrad": {"delta": -1.22, "win": 33},
            "MGDA": {"delta": -1.77, "win": 66},
            "MTL-NAS": {"delta": 0.66, "win": 22},
            "CoNAL": {"delta": 2.18, "win": 88},
            "MAMO": {"delta": 3.00, "win": 100},
        },
        # Table 3: GMKs activated at detections 1..5.
        "table3": {"NYUv2": [7, 4, 2, 1, 1], "Cityscapes": [2, 1, 1, 1, 0]},
        # Table 4 (NYUv2): segmentation mIoU, depth Abs Err, normal Mean angle (a subset of its 9 columns).
        "table4_nyuv2": {
            "HPS": {"mIoU": 54.24, "AbsErr": 0.3886, "Mean": 23.34},
            "MAMO": {"mIoU": 54.72, "AbsErr": 0.3801, "Mean": 21.83},
            "w/o MO": {"mIoU": 54.06, "AbsErr": 0.3850, "Mean": 21.99},
            "w/o GMK": {"mIoU": 53.47, "AbsErr": 0.3859, "Mean": 22.52},
        },
        # Table 5 (NYUv2): speed relative to STL and Δ.
        "table5_nyuv2": {
            "STL": {"speed": 1.0, "delta": 0.0},
            "HPS": {"speed": 1.61, "delta": -2.74},
            "CAGrad": {"speed": 0.73, "delta": 0.25},
            "CoNAL": {"speed": 0.60, "delta": 2.18},
            "MAMO": {"speed": 0.56, "delta": 3.00},
        },
    }
}

#: row id -> (label, Trainer method)
TRAINER_ROWS: dict[str, tuple[str, str]] = {
    "stl": ("STL", "stl"),
    "hps": ("HPS", "ew"),
    "hps_mgda": ("HPS+MGDA", "mgda"),
    "gradnorm": ("GradNorm", "gradnorm"),
    "pcgrad": ("PCGrad", "pcgrad"),
    "cagrad": ("CAGrad", "cagrad"),
}
#: row id -> (label, module kind, method) of the Alg. 1 rows
ALG1_ROWS: dict[str, tuple[str, str, str]] = {
    "mamo": ("MAMO", "gmk", "mgda"),
    "wo_gmk": ("w/o GMK (CoNAL-faithful)", "conal", "mgda"),
    "conal": ("CoNAL (branches + LS)", "conal", "ew"),
    "wo_mo": ("w/o MO", "gmk", "ew"),
    "wo_gmk_fused": ("w/o GMK (fused exclusive)", "exclusive", "mgda"),
    "mamo_pcgrad": ("MAMO+PCGrad", "gmk", "pcgrad"),
    "mamo_cagrad": ("MAMO+CAGrad", "gmk", "cagrad"),
}
ROWS = list(TRAINER_ROWS) + list(ALG1_ROWS)
DEFAULT_ROWS = ["stl", "hps", "hps_mgda", "mamo", "wo_gmk"]
#: row id -> the paper's row name (for the reference columns)
PAPER_NAME = {
    "hps": "HPS",
    "hps_mgda": "MGDA",
    "gradnorm": "GradNorm",
    "pcgrad": "PCGrad",
    "cagrad": "CAGrad",
    "conal": "CoNAL",
    "mamo": "MAMO",
    "wo_mo": "w/o MO",
    "wo_gmk": "w/o GMK",
    "stl": "STL",
}

#: --dataset -> (registered dataset, fixed builder options, size options it takes)
DATASETS: dict[str, tuple[str, dict[str, Any], tuple[str, ...]]] = {
    "four_task": ("entangled_images", {"pair": "four_task", "seed": 0}, ("n_train", "n_val", "n_test")),
    "multimnist": ("multimnist", {"seed": 0}, ("n_train", "n_test")),
    "multifashion": ("multifashion", {"seed": 0}, ("n_train", "n_test")),
    "multifashionmnist": ("multifashionmnist", {"seed": 0}, ("n_train", "n_test")),
}
#: the paper's schedule (Z = 5 detections, Table 3) on the datasets' full sizes
FULL: dict[str, dict[str, Any]] = {
    "four_task": {
        "n_train": 8000,
        "n_val": 2000,
        "n_test": 8000,
        "pretrain_epochs": 10,
        "rounds": 5,
        "epochs_per_round": 6,
        "seeds": [0, 1, 2, 3, 4],
    },
    "multi": {
        "n_train": 120_000,
        "n_test": 10_000,
        "pretrain_epochs": 10,
        "rounds": 5,
        "epochs_per_round": 6,
        "seeds": [0, 1, 2, 3, 4],
    },
}
NOT_HERE = (
    "NYUv2 and Cityscapes (the paper's benchmarks) are not obtainable on this machine (no internet; not in any "
    "registry package): the tables are on Multi-(Fashion+MNIST)-family 36x36 images built from MNIST / "
    "Fashion-MNIST. The paper's numbers are printed for reference; they are on other data."
)
VERDICT_RULE = (
    "Verdict rule, per claim, from the seed-by-seed paired differences d_s oriented so that d_s > 0 "
    "favours the claim: **supported** if d_s > 0 on every seed; **not supported** if their mean is <= 0; **mixed** "
    "otherwise (the mean favours the claim, some seed does not). With n seeds, 'every seed' is a one-sided "
    "sign test at p = 0.5^n (0.125 for 3 seeds): weak evidence either way."
)


# ---------------------------------------------------------------------------------------------------------------
# paired statistics (also used by ``reproduce mamg``)
# ---------------------------------------------------------------------------------------------------------------
def paired(a: dict[Any, float], b: dict[Any, float]) -> dict[str, Any]:
    """Seed-by-seed differences ``a[s] - b[s]`` over the seeds both have: diffs, mean, sd, # positive, sign-test p.

    Example:
        >>> d = paired({0: 1.0, 1: 2.0, 2: 0.5}, {0: 0.5, 1: 2.5, 2: 0.0})
        >>> d["diffs"], d["positive"], d["n"]
        ([0.5, -0.5, 0.5], 2, 3)
    """
    seeds = sorted(set(a) & set(b), key=str)
    diffs = [float(a[s]) - float(b[s]) for s in seeds]
    arr = np.asarray(diffs, float)
    pos = int((arr > 0).sum())
    n = len(diffs)
    # one-sided sign test of "d > 0": P(at least `pos` positives of n | p = 1/2)
    from math import comb

    p = sum(comb(n, k) for k in range(pos, n + 1)) / 2**n if n else float("nan")
    return {
        "seeds": seeds,
        "diffs": diffs,
        "mean": float(arr.mean()) if n else float("nan"),
        "sd": float(arr.std(ddof=1)) if n > 1 else 0.0,
        "positive": pos,
        "n": n,
        "sign_p": p,
    }


def verdict(diffs: Sequence[float]) -> str:
    """:data:`VERDICT_RULE` on differences oriented so that > 0 favours the claim."""
    arr = np.asarray(list(diffs), float)
    if arr.size == 0:
        return "not run"
    if bool((arr > 0).all()):
        return "supported"
    return "not supported" if float(arr.mean()) <= 0 else "mixed"


def fmt_pm(vals: Sequence[float], fmt: str = "{:+.2f}") -> str:
    """``mean ± sd`` (sample sd) of ``vals``; ``—`` when empty."""
    if not len(vals):
        return "—"
    a = np.asarray(vals, float)
    return fmt.format(a.mean()) + (" ± " + fmt.format(a.std(ddof=1)).lstrip("+") if len(a) > 1 else "")


def fmt_paired(d: dict[str, Any], fmt: str = "{:+.2f}") -> str:
    """One cell: mean ± sd of the paired differences, how many seeds were > 0, and the per-seed values."""
    if not d["n"]:
        return "—"
    per = ", ".join(fmt.format(x) for x in d["diffs"])
    return f"{fmt_pm(d['diffs'], fmt)} ({d['positive']}/{d['n']} > 0; {per})"


def config_differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted keys where two JSON-like configurations differ.

    Example:
        >>> config_differences({"a": 1, "b": {"c": 2}}, {"a": 1, "b": {"c": 3}, "d": 0})
        ['b.c', 'd']
    """
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for k in sorted(set(a) | set(b), key=str):
            out += config_differences(a.get(k), b.get(k), f"{prefix}{k}.") if k in a and k in b else [f"{prefix}{k}"]
        return out
    return [] if a == b else [prefix.rstrip(".")]


def command_line(name: str, add_arguments, args: argparse.Namespace, skip: Sequence[str] = ("reuse",)) -> str:
    """``mtlkit reproduce NAME`` with every option of the reproduction spelled out from ``args`` (``--reuse`` left
    out: it changes no number).

    Example:
        >>> def add(p):
        ...     p.add_argument("--seeds", type=int, nargs="+", default=[0]); p.add_argument("--full", action="store_true")
        >>> command_line("x", add, argparse.Namespace(seeds=[0, 1], full=True))
        'mtlkit reproduce x --seeds 0 1 --full'
    """
    import shlex

    p = argparse.ArgumentParser(add_help=False)
    add_arguments(p)
    parts: list[str] = []
    for a in p._actions:
        if not a.option_strings or a.dest in skip:
            continue
        v = getattr(args, a.dest, None)
        flag = a.option_strings[0]
        if isinstance(a, argparse._StoreTrueAction):
            parts += [flag] if v else []
        elif isinstance(v, (list, tuple)):
            parts += [flag, *map(str, v)]
        elif v is not None:
            parts += [flag, str(v)]
    return " ".join([f"mtlkit reproduce {name}"] + [shlex.quote(x) for x in parts])


def with_second_metric(data):
    """The tasks with a second metric each: average precision for binary tasks, NLL (``loss``) for the others (the
    Trainer's ``evaluate`` reports ``task/loss`` for every task). Returns the metric keys ``[(key, higher)]``."""
    import mtlkit.metrics.multilabel  # noqa: F401  (registers average_precision)

    tasks, keys = [], []
    for t in data.tasks:
        if t.kind == "binary" and "average_precision" not in t.metrics:
            t = dataclasses.replace(t, metrics=tuple(t.metrics) + ("average_precision",), higher_is_better=())
        tasks.append(t)
        keys += [(f"{t.name}/{m}", bool(h)) for m, h in zip(t.metrics, t.higher_is_better, strict=True)]
        if t.kind != "binary" and "loss" not in t.metrics:
            keys.append((f"{t.name}/loss", False))
    data.tasks = tasks
    return keys


def relative(test: dict[str, float], stl: dict[str, float], keys: list[tuple[str, bool]]) -> dict[str, float]:
    """Per-metric relative change vs STL in %, signed so that + means better (Tables 1-2)."""
    out = {}
    for k, hib in keys:
        r = 100.0 * (test[k] - stl[k]) / stl[k]
        out[k] = r if hib else -r
    return out


# ---------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------
def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dataset",
        default="four_task",
        choices=list(DATASETS),
        help="four_task: entangled_images[four_task] (4 binary tasks, default); the others: 2 tasks",
    )
    p.add_argument("--full", action="store_true", help=f"the paper's schedule on the full sizes: {FULL}")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--n-train", type=int, default=1500)
    p.add_argument("--n-val", type=int, default=500, help="four_task only (the others hold out 10%% of n_train)")
    p.add_argument("--n-test", type=int, default=2000)
    p.add_argument("--pretrain-epochs", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2, help="Z, the number of conflict detections")
    p.add_argument("--epochs-per-round", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--encoder", default="conv", choices=["conv", "mlp"])
    p.add_argument("--width", type=int, default=384)
    p.add_argument("--hidden", type=int, nargs="+", default=[512, 256])
    p.add_argument("--head-hidden", type=int, default=192)
    p.add_argument("--threshold", default="average", choices=["average", "topk"])
    p.add_argument("--k", type=int, default=1)
    p.add_argument("--scope", default="all_layers", choices=["all_layers", "per_layer"])
    p.add_argument("--conflict-window", default="last_batches", choices=["last_batches", "phase"])
    p.add_argument("--detect-batches", type=int, default=20)
    p.add_argument(
        "--pretrain-method",
        default="ew",
        choices=["ew", "same"],
        help="Alg. 1 line 1: ew = plain HPS (default; Fig. 4's 0 = HPS), same = the row's own method",
    )
    p.add_argument(
        "--restore-optimizer",
        action="store_true",
        help="roll Adam's state back with the best-validation epoch of each Alg. 1 phase",
    )
    p.add_argument(
        "--rows",
        "--methods",
        dest="rows",
        nargs="+",
        default=None,
        choices=ROWS,
        metavar="ROW",
        help=f"rows to run, of {ROWS} (default {DEFAULT_ROWS}; STL is always run)",
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument(
        "--reuse",
        action="store_true",
        help="keep finished runs in --out trained with the same configuration (resume stopped Trainer runs)",
    )
    p.add_argument("--out", default="runs/reproduce-mamo")


def _apply_full(args: argparse.Namespace) -> None:
    if args.full:
        for k, v in FULL["four_task" if args.dataset == "four_task" else "multi"].items():
            setattr(args, k, v)


def _data_options(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    name, fixed, sizes = DATASETS[args.dataset]
    return name, {**fixed, **{s: getattr(args, s) for s in sizes}}


def _budget(args: argparse.Namespace, n_steps: int) -> str:
    name, opts = _data_options(args)
    epochs = args.pretrain_epochs + args.rounds * args.epochs_per_round
    sizes = ", ".join(f"{k} {v}" for k, v in opts.items() if k.startswith("n_"))
    return (
        f"{name}{'[four_task]' if args.dataset == 'four_task' else ''} ({sizes}"
        + ("" if args.dataset == "four_task" else "; 10% of n_train held out for validation")
        + f"), seeds {args.seeds} (paired), {epochs} epochs for every row (Alg. 1: {args.pretrain_epochs} "
        f"pre-training ({'plain HPS' if args.pretrain_method == 'ew' else 'the row method'}) + Z={args.rounds} "
        f"rounds x {args.epochs_per_round}), batch {args.batch_size} ({n_steps} steps/epoch), Adam lr {args.lr}, "
        f"encoder {args.encoder}"
        + (f" (width {args.width})" if args.encoder == "conv" else f" {args.hidden}")
        + f", indicator {args.threshold}"
        + (f" k={args.k}" if args.threshold == "topk" else "")
        + f" ({args.scope}), Q over "
        + (
            f"the last {min(args.detect_batches, n_steps)} mini-batches"
            if args.conflict_window == "last_batches"
            else "every mini-batch of the phase"
        )
        + f" before each detection, Adam state {'rolled back' if args.restore_optimizer else 'kept'} at the "
        f"best-validation rollback, device {args.device}"
    )


def _run_config(
    args,
    dataset: str,
    data_opts: dict[str, Any],
    model: str,
    model_opts: dict[str, Any],
    method: str,
    epochs: int,
    seed: int,
    run_dir: Path,
) -> Any:
    """The full config of one row's run (Trainer rows and Alg. 1 rows share everything but the model)."""
    from mtlkit.config import RunConfig

    return RunConfig.from_dict(
        {
            "dataset": {"name": dataset, "options": data_opts},
            "model": {"name": model, "options": model_opts},
            "method": {"name": method},
            "train": {
                "epochs": epochs,
                "batch_size": args.batch_size,
                "lr": args.lr,
                "seed": seed,
                "progress": False,
                "device": args.device,
                "num_threads": args.threads,
            },
            "output": {"dir": str(run_dir), "tensorboard": False, "overwrite": True},
        }
    )


def _trainer_run(rid: str, seed: int, data, args, out: Path, model_opts: dict[str, Any], epochs: int) -> dict:

    label, method = TRAINER_ROWS[rid]
    name, opts = _data_options(args)
    run_dir = out / "runs" / f"{rid}-s{seed}"
    cfg = _run_config(args, name, opts, "hps", model_opts, method, epochs, seed, run_dir)
    done, trained = train_or_reuse(cfg, data, run_dir, args.reuse)
    if trained:
        log.info(f"[mamo] seed {seed} {label}: {done['train_seconds']:.0f}s")
    return {
        "test": done["test"],
        "val": done["val"],
        "seconds": float(done["train_seconds"]),
        "parameters": int(done["parameters"]),
    }


def _alg1_run(rid: str, seed: int, data, args, out: Path, model_opts: dict[str, Any], epochs: int) -> dict:
    """One Alg. 1 row: the Trainer on model ``mamo`` (its search callback grows the model), seed ``seed``."""

    label, module, method = ALG1_ROWS[rid]
    name, opts = _data_options(args)
    run_dir = out / "runs" / f"{rid}-s{seed}"
    search = {
        "module": module,
        "rounds": args.rounds,
        "epochs_per_round": args.epochs_per_round,
        "threshold": args.threshold,
        "k": args.k,
        "scope": args.scope,
        "conflict_window": args.conflict_window,
        "detect_batches": args.detect_batches,
        "pretrain_method": "ew" if args.pretrain_method == "ew" else None,
        "restore_optimizer": bool(args.restore_optimizer),
    }
    cfg = _run_config(args, name, opts, "mamo", {**model_opts, **search}, method, epochs, seed, run_dir)
    done, trained = train_or_reuse(cfg, data, run_dir, args.reuse)
    search_out = done["mamo"]
    result = {
        "test": done["test"],
        "val": done["val"],
        "seconds": float(done["train_seconds"]),
        "parameters": int(done["parameters"]),
        "rounds": [
            {k: rr[k] for k in ("round", "method", "activated", "parameters", "test", "Q", "q_batches")}
            for rr in search_out["rounds"]
        ],
        "architecture": search_out["architecture"],
    }
    if trained:
        log.info(f"[mamo] seed {seed} {label}: modules {len(result['architecture'])} ({result['seconds']:.0f}s)")
    return result


def _run(args: argparse.Namespace) -> int:
    from mtlkit.data import build_dataset
    from mtlkit.metrics import delta_m, win_rate

    _apply_full(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = ["stl"] + [r for r in (args.rows or DEFAULT_ROWS) if r != "stl"]
    if any(r in ALG1_ROWS for r in rows) and (args.pretrain_epochs < 1 or args.epochs_per_round < 1 or args.rounds < 0):
        from mtlkit.errors import ConfigError

        raise ConfigError(
            f"Alg. 1 needs --pretrain-epochs >= 1, --epochs-per-round >= 1 and --rounds >= 0 (got "
            f"{args.pretrain_epochs}, {args.epochs_per_round}, {args.rounds}): phases of zero epochs "
            f"(detection without training) are not supported"
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    epochs = args.pretrain_epochs + args.rounds * args.epochs_per_round
    name, opts = _data_options(args)
    data = build_dataset(name, **opts)
    keys = with_second_metric(data)
    n_steps = -(-len(data.train) // args.batch_size)
    budget = _budget(args, n_steps)
    log.info(f"[mamo] budget: {budget}")
    model_opts = {
        "encoder": args.encoder,
        "width": args.width,
        "hidden": list(args.hidden),
        "head_hidden": args.head_hidden,
    }
    results: dict[str, dict[int, dict[str, Any]]] = {}
    for seed in args.seeds:
        for rid in rows:
            if rid in TRAINER_ROWS:
                results.setdefault(rid, {})[seed] = _trainer_run(rid, seed, data, args, out, model_opts, epochs)
            else:
                results.setdefault(rid, {})[seed] = _alg1_run(rid, seed, data, args, out, model_opts, epochs)
    hib = [h for _, h in keys]
    for _rid, per_seed in results.items():
        for seed, r in per_seed.items():
            stl = results["stl"][seed]["test"]
            ref = [stl[k] for k, _ in keys]
            r["rel"] = relative(r["test"], stl, keys)
            r["delta"] = delta_m([r["test"][k] for k, _ in keys], ref, hib, convention="higher_is_better")
            r["win"] = win_rate([r["test"][k] for k, _ in keys], ref, hib)
            r["speed"] = results["stl"][seed]["seconds"] / r["seconds"]
            for rr in r.get("rounds", []):
                rr["delta"] = delta_m([rr["test"][k] for k, _ in keys], ref, hib, convention="higher_is_better")
    claims = claim_verdicts(results)
    (out / "results.json").write_text(
        json.dumps(
            {
                "budget": budget,
                "args": vars(args),
                "metrics": keys,
                "verdict_rule": VERDICT_RULE,
                "claims": claims,
                "results": {n: {str(s): v for s, v in ps.items()} for n, ps in results.items()},
            },
            indent=1,
            default=str,
        )
    )
    md = markdown(args, budget, results, keys, claims)
    (out / "report.md").write_text(md)
    _plot(results, out / "delta_vs_size.png", budget)
    print(md)
    log.info(f"[mamo] wrote {out / 'report.md'}, {out / 'results.json'}, {out / 'delta_vs_size.png'}")
    return 0


# ---------------------------------------------------------------------------------------------------------------
# claims and tables
# ---------------------------------------------------------------------------------------------------------------
def _field(results, rid: str, f: str) -> dict[int, float]:
    return {s: r[f] for s, r in results.get(rid, {}).items()}


def claim_verdicts(results: dict[str, dict[int, dict[str, Any]]]) -> list[dict[str, Any]]:
    """One entry per claim: the claim, the paired differences it rests on (oriented: > 0 favours it), the verdict."""
    out: list[dict[str, Any]] = []

    def add(claim: str, basis: str, d: dict[str, Any] | None, v: str | None = None) -> None:
        out.append(
            {
                "claim": claim,
                "basis": basis,
                "paired": d,
                "verdict": v if v is not None else verdict(d["diffs"] if d else []),
            }
        )

    delta = {rid: _field(results, rid, "delta") for rid in results}
    if "mamo" in results:
        others = [r for r in results if r not in ("mamo", "stl")]
        ds = {r: paired(delta["mamo"], delta[r]) for r in others}
        if ds:
            vs = [verdict(d["diffs"]) for d in ds.values()]
            v = (
                "supported"
                if all(x == "supported" for x in vs)
                else "not supported"
                if any(x == "not supported" for x in vs)
                else "mixed"
            )
            worst = min(ds, key=lambda r: ds[r]["mean"])
            add(
                "MAMO has the best Δm of the rows run",
                f"Δm(MAMO) − Δm(R) for every other row R; the closest is {_label(worst)}",
                ds[worst],
                v,
            )
        wins = _field(results, "mamo", "win")
        n100 = sum(1 for w in wins.values() if w == 100)
        add(
            "MAMO wins on 100 % of the metrics against STL",
            "Win(MAMO) per seed: " + ", ".join(f"{w:.0f}" for w in wins.values()),
            None,
            "supported" if wins and n100 == len(wins) else f"not supported ({n100}/{len(wins)} seeds at 100 %)",
        )
        add("MAMO beats STL (Δm > 0)", "Δm(MAMO) per seed", paired(delta["mamo"], dict.fromkeys(delta["mamo"], 0.0)))
        for rid, claim in (
            ("hps", "MAMO beats HPS"),
            ("hps_mgda", "MAMO beats HPS+MGDA (the architecture adds to MGDA)"),
            ("wo_gmk", "GMKs beat CoNAL-faithful task branches (MAMO vs w/o GMK)"),
            ("conal", "MAMO beats the CoNAL baseline (branches + LS)"),
            ("wo_mo", "MO beats LS within MAMO (MAMO vs w/o MO)"),
        ):
            if rid in results:
                add(claim, f"Δm(MAMO) − Δm({_label(rid)})", paired(delta["mamo"], delta[rid]))
    if "hps" in results:
        add(
            "HPS shows negative transfer (Δm(HPS) < 0)",
            "−Δm(HPS) per seed",
            paired(dict.fromkeys(delta["hps"], 0.0), delta["hps"]),
        )
    return out


def _num(v: Any, unit: str = "") -> str:
    return "—" if v is None else f"{v}{unit}"


def _where(architecture: list, module: str) -> str:
    """Where the modules are: ``layer: tasks`` per module; CoNAL branches as ``task from layer`` (branch point)."""
    if not architecture:
        return "none"
    if module != "conal":
        return "; ".join(f"{layer}: {'+'.join(g)}" for layer, g in architecture)
    start: dict[str, int] = {}
    for layer, g in architecture:
        start[g[0]] = min(layer, start.get(g[0], layer))
    return "; ".join(f"{t} from layer {layer}" for t, layer in start.items())


def _label(rid: str) -> str:
    return TRAINER_ROWS[rid][0] if rid in TRAINER_ROWS else ALG1_ROWS[rid][0]


def markdown(args, budget: str, results, keys, claims) -> str:
    P = PAPER["mamo"]
    short = (
        f"_Budget: {args.dataset}, n_train {args.n_train}, seeds {list(args.seeds)}, "
        f"{args.pretrain_epochs + args.rounds * args.epochs_per_round} epochs (Alg. 1: {args.pretrain_epochs} + "
        f"{args.rounds} x {args.epochs_per_round}), batch {args.batch_size}, {args.encoder} backbone; full "
        f"budget: `--full`._"
    )
    names = [k for k, _ in keys]
    rows = [r for r in results if r != "stl"]
    seeds = sorted(results["stl"])
    L = [
        f"# MAMO claims on {args.dataset}",
        "",
        f"**Budget**: {budget}. The paper's schedule: `--full` "
        f"({FULL['four_task' if args.dataset == 'four_task' else 'multi']}).",
        "",
        f"**Data**: {NOT_HERE}",
        "",
        "**Δ convention**: MAMO's Eq. 15, *higher is better* (+ = better than STL), over every task metric "
        f"({', '.join(names)}); Win = % of metrics better than the same seed's STL. Mean ± sd over seeds.",
        "",
        f"Command: `{command_line('mamo', _add_arguments, args)}`",
        "",
        "## Verdicts",
        "",
        short,
        "",
        VERDICT_RULE,
        "",
        "| Claim | basis | paired differences (mean ± sd; per seed) | sign-test p | verdict |",
        "|---|---|---|---|---|",
    ]
    for c in claims:
        d = c["paired"]
        L.append(
            f"| {c['claim']} | {c['basis']} | {fmt_paired(d) if d else '—'} | "
            f"{'' if not d else format(d['sign_p'], '.3f')} | **{c['verdict']}** |"
        )
    L += [
        "",
        "## Tables 1-2 shape: relative change vs STL (%)",
        "",
        short,
        "",
        "| Row | " + " | ".join(names) + " | Δ ↑ | Win ↑ | params | paper Δ (Cityscapes / NYUv2) |",
        "|" + "---|" * (len(names) + 5),
    ]
    stl = results["stl"]
    L.append(
        "| STL (absolute) | "
        + " | ".join(fmt_pm([r["test"][k] for r in stl.values()], "{:.4f}") for k in names)
        + f" | 0 | 0 | {int(np.mean(list(_field(results, 'stl', 'parameters').values())))} | 0 / 0 |"
    )
    for rid in rows:
        rs = list(results[rid].values())
        pn = PAPER_NAME.get(rid)
        pa = [_num(P[t].get(pn, {}).get("delta")) for t in ("table1_cityscapes", "table2_nyuv2")]
        L.append(
            f"| {_label(rid)} | "
            + " | ".join(fmt_pm([r["rel"][k] for r in rs]) for k in names)
            + f" | {fmt_pm([r['delta'] for r in rs])} | {fmt_pm([r['win'] for r in rs], '{:.0f}')} | "
            f"{int(np.mean([r['parameters'] for r in rs]))} | {pa[0]} / {pa[1]} |"
        )
    L += [
        "",
        "## Per seed: Δ and Win against that seed's STL",
        "",
        short,
        "",
        "| Row | " + " | ".join(f"seed {s} Δ / Win" for s in seeds) + " |",
        "|" + "---|" * (len(seeds) + 1),
    ]
    for rid in rows:
        L.append(
            f"| {_label(rid)} | "
            + " | ".join(
                f"{results[rid][s]['delta']:+.2f} / {results[rid][s]['win']:.0f}" if s in results[rid] else "—"
                for s in seeds
            )
            + " |"
        )
    for ref in ("hps", "stl"):
        if "mamo" not in results or ref not in results:
            continue
        L += [
            "",
            f"## Paired differences MAMO − {_label(ref)} (absolute, per metric)",
            "",
            short,
            "",
            "| metric | better when | MAMO − " + _label(ref) + " (mean ± sd; per seed) | seeds MAMO better |",
            "|---|---|---|---|",
        ]
        for k, h in keys:
            d = paired(
                {s: r["test"][k] for s, r in results["mamo"].items()},
                {s: r["test"][k] for s, r in results[ref].items()},
            )
            better = sum(1 for x in d["diffs"] if (x > 0 if h else x < 0))
            L.append(f"| {k} | {'higher' if h else 'lower'} | {fmt_paired(d, '{:+.4f}')} | {better}/{d['n']} |")
        dd = paired(_field(results, "mamo", "delta"), _field(results, ref, "delta"))
        L.append(f"| **Δm** | higher | {fmt_paired(dd)} | {dd['positive']}/{dd['n']} |")
    alg1 = [r for r in rows if r in ALG1_ROWS]
    if alg1:
        Z = args.rounds
        L += [
            "",
            "## Table 3: modules generated per detection round",
            "",
            short,
            "",
            "| Row | seed | " + " | ".join(f"round {z}" for z in range(1, Z + 1)) + " | total | where |",
            "|" + "---|" * (Z + 4),
        ]
        for rid in alg1:
            for seed, r in results[rid].items():
                counts = [len(rr["activated"]) for rr in r["rounds"][1:]]
                where = _where(r["architecture"], ALG1_ROWS[rid][1])
                L.append(
                    f"| {_label(rid)} | {seed} | " + " | ".join(map(str, counts)) + f" | {sum(counts)} | {where} |"
                )
        L += [
            "",
            f"Paper (GMKs at detections 1-5): NYUv2 {P['table3']['NYUv2']}, Cityscapes "
            f"{P['table3']['Cityscapes']}. Where: `layer: tasks` per module (0-based layers). A module has the size of the layer it copies; a CoNAL-faithful branch point at layer ℓ counts one "
            "module per layer ℓ..L it copies, for each of the two tasks of the conflict.",
            "",
            "## Fig. 4: Δ after each detection round",
            "",
            short,
            "",
            "Round 0 is the pre-trained model: "
            + ("plain HPS (equal weights)" if args.pretrain_method == "ew" else "HPS trained with the row's own method")
            + f" after {args.pretrain_epochs} epochs; round z has had {args.pretrain_epochs} + z x "
            f"{args.epochs_per_round} epochs, so only the last has every row's epoch count.",
            "",
            "| Row | " + " | ".join(f"round {z}" for z in range(Z + 1)) + " |",
            "|" + "---|" * (Z + 2),
        ]
        for rid in alg1:
            runs = list(results[rid].values())
            L.append(
                f"| {_label(rid)} | "
                + " | ".join(fmt_pm([r["rounds"][z]["delta"] for r in runs]) for z in range(len(runs[0]["rounds"])))
                + " |"
            )
    L += [
        "",
        "## Table 5: speed relative to STL (training wall time incl. validation) and Δ",
        "",
        short,
        "",
        "| Row | speed ↑ | Δ ↑ | seconds | paper speed / Δ (NYUv2) |",
        "|---|---|---|---|---|",
    ]
    for rid in ["stl"] + rows:
        rs = list(results[rid].values())
        pp = P["table5_nyuv2"].get(PAPER_NAME.get(rid, ""), {})
        L.append(
            f"| {_label(rid)} | {fmt_pm([r['speed'] for r in rs], '{:.2f}')}x | "
            f"{fmt_pm([r.get('delta', 0.0) for r in rs])} | {fmt_pm([r['seconds'] for r in rs], '{:.0f}')} | "
            f"{_num(pp.get('speed'), 'x')} / {_num(pp.get('delta'))} |"
        )
    L += ["", "Fig. 3 analogue: `delta_vs_size.png` (Δ vs parameters; MAMO-z = after round z)."]
    return "\n".join(L) + "\n"


def _plot(results, path: Path, budget: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.8))
    for i, (rid, rs) in enumerate(results.items()):
        if rid == "stl" or not rs:
            continue
        x = np.mean([r["parameters"] for r in rs.values()]) / 1e6
        y = np.mean([r["delta"] for r in rs.values()])
        ax.scatter([x], [y], label=_label(rid), color=plt.cm.tab20(i % 20), marker="os^Dv<>p"[i % 8])
    for rid, style in (("mamo", "k--"), ("wo_gmk", "k:")):
        if rid in results:
            runs = list(results[rid].values())
            n = len(runs[0]["rounds"])
            xs = [np.mean([r["rounds"][z]["parameters"] for r in runs]) / 1e6 for z in range(n)]
            ys = [np.mean([r["rounds"][z]["delta"] for r in runs]) for z in range(n)]
            ax.plot(xs, ys, style, lw=0.8, marker="x", label=f"{_label(rid)} after round z")
    stl = results.get("stl", {})
    if stl:
        ax.scatter(
            [np.mean([r["parameters"] for r in stl.values()]) / 1e6], [0.0], marker="*", s=120, c="k", label="STL"
        )
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xlabel("parameters (millions)")
    ax.set_ylabel("Δ vs STL (%, Eq. 15, higher is better)")
    ax.set_title("MAMO Fig. 3 analogue", fontsize=10)
    fig.text(0.01, 0.005, budget[:180] + ("..." if len(budget) > 180 else ""), fontsize=5)
    ax.legend(fontsize=7)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


register_reproduction(
    Reproduction(
        name="mamo",
        help="MAMO (ECAI 2024): claims with paired seeds on 4-task Multi-(Fashion+MNIST) (Tables 1-5, Figs. 3-4)",
        add_arguments=_add_arguments,
        run=_run,
    )
)
