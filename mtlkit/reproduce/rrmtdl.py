"""``mtlkit reproduce rrmtdl``: the entangled-label experiments of RRMTDL on the data we have, with the controls
that isolate its adversary.

Fang, Cai, Cao, Li, Zhang, "Adversarial Learning Guided Task Relatedness Refinement for Multi-Task Deep Learning",
IEEE Transactions on Multimedia 25 (2023) 6946–6957, doi:10.1109/TMM.2022.3216460. The paper's CelebA pairs are not
obtainable here; we rebuild the protocol (:mod:`mtlkit.data.entangled`) on attribute pairs of Multi-(Fashion+MNIST)
(``--dataset images``, conv trunk by default) and of census-income (``--dataset census``, MLP trunk).

The claim tested: RRMTDL beats hard parameter sharing (HPS) on the reversed-correlation test set. Rows (``--methods``;
default the four needed for the claim and its controls):

- ``HPS+EW``: HPS, equal weights; ``RRMTDL``: the paper's model, DANN λ schedule;
- ``RRMTDL-lambda0`` (shown as "RRMTDL (λ=0)"): the same network, adversarial heads trained on their own loss, but
  the gradient-reversal layer passes zero gradient into the branch (``lambda_schedule="zero"``). Same seed, same
  initial weights, same batches: ``RRMTDL − RRMTDL (λ=0)`` is what the adversary contributes, separated from the
  private branches and the extra heads;
- ``RRMTDL-lambda1const`` ("RRMTDL (λ=1 const)"): λ = 1 from the first step (``lambda_schedule="constant"``),
  reported to be what the released code effectively ran (an operator-precedence slip in its schedule);
- optional: ``STL``, ``HPS+MGDA``, ``HPS+PCGrad``, ``HPS+MAMG`` (the zoo's aggregators, by name).

Per pair: per-task accuracy on the reversed-correlation test set (and the two validation sets) over seeds, mean ± the
sample standard deviation (n − 1); model selection on the training-like validation set only. Seed ``s`` draws the
entangled split with seed ``s`` and initialises and orders the batches with seed ``s``, identically for every row,
so rows are compared per seed: the paired differences ``RRMTDL − HPS+EW`` and ``RRMTDL − RRMTDL (λ=0)`` (and, for the
released-code control, ``RRMTDL (λ=1 const) − HPS+EW`` and ``− RRMTDL (λ=0)``) of the mean test accuracy are given
as mean ± std and per seed, with a verdict computed from them by :func:`verdict`. Then, for HPS+EW, RRMTDL and
RRMTDL (λ=0), test accuracy against the training agreement rate (``--rates``, default 50/75/90/100 %) with the same
paired differences per rate, as a table and a PNG.

Budget: the defaults are the small CPU budget (sizes, epochs, seeds, trunk, device) printed above every table and
chosen so that the whole default command (both datasets: 114 runs, 63 of them conv-trunk image runs of about 20 s
each, 51 census MLP runs of a few seconds) takes about 25 minutes on 2 otherwise idle CPU cores;
``--full`` switches to the paper's protocol sizes (8000 train / 2000 val / 8000 test where the pool allows it) and
30 epochs, meant for an accelerator (``--device cuda``). ``--reuse`` reads back finished runs whose saved config is
the requested one (and resumes stopped ones from their checkpoint), so a stopped reproduction continues where it was.

Example:
    >>> from mtlkit.reproduce import load_all
    >>> "rrmtdl" in load_all()
    True
    >>> verdict([0.012, 0.020, 0.009])[0], verdict([0.01, -0.02, 0.0])[0], verdict([0.03, -0.001, 0.02])[0]
    ('reproduced', 'not reproduced', 'inconclusive at this budget')
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import textwrap
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mtlkit.config import RunConfig
from mtlkit.data import MTLData, build_dataset
from mtlkit.data.entangled import CENSUS_PAIRS, IMAGE_PAIRS
from mtlkit.reproduce import Reproduction, register_reproduction

log = logging.getLogger("mtlkit")

#: The paper's numbers. None are public (only the abstract of Fang et al., IEEE TMM 2023, is available), so there is
#: nothing to print beside ours.
PAPER: dict[str, Any] = {}

#: CLI key -> (row label, model registry name, method registry name, extra model options)
METHODS: dict[str, tuple[str, str, str, dict[str, Any]]] = {
    "STL": ("STL", "stl", "stl", {}),
    "HPS+EW": ("HPS+EW", "hps", "ew", {}),
    "HPS+MGDA": ("HPS+MGDA", "hps", "mgda", {}),
    "HPS+PCGrad": ("HPS+PCGrad", "hps", "pcgrad", {}),
    "HPS+MAMG": ("HPS+MAMG", "hps", "mamg", {}),
    "RRMTDL": ("RRMTDL", "rrmtdl", "ew", {}),
    "RRMTDL-lambda0": ("RRMTDL (λ=0)", "rrmtdl", "ew", {"lambda_schedule": "zero"}),
    "RRMTDL-lambda1const": ("RRMTDL (λ=1 const)", "rrmtdl", "ew", {"lambda_schedule": "constant"}),
}
DEFAULT_METHODS = ["HPS+EW", "RRMTDL", "RRMTDL-lambda0", "RRMTDL-lambda1const"]
#: the rows of the agreement sweep (those of them that --methods selects)
SWEEP_METHODS = ("HPS+EW", "RRMTDL", "RRMTDL-lambda0")
#: RRMTDL's private-branch and projection widths in every budget
RRMTDL_WIDTHS = {"branch_width": 128, "proj_width": 64}

#: (minuend, subtrahend, what a positive difference means, kind): the paired comparisons, in report order
COMPARISONS: list[tuple[str, str, str, str]] = [
    ("RRMTDL", "HPS+EW", "RRMTDL beats HPS on the reversed-correlation test set", "claim"),
    ("RRMTDL", "RRMTDL-lambda0", "the gain is the adversary's (RRMTDL beats the same model with λ = 0)", "claim"),
    ("RRMTDL-lambda1const", "HPS+EW", "the released code's constant λ = 1 beats HPS", "control"),
    ("RRMTDL-lambda1const", "RRMTDL-lambda0", "constant λ = 1 beats λ = 0", "control"),
]
SWEEP_COMPARISONS = COMPARISONS[:2]

VERDICT_RULE = (
    "Verdict rule, per paired difference d_s = A_s − B_s of the mean test accuracy over the seeds s: "
    "**reproduced** if d_s > 0 for every seed and mean(d) > std(d); **not reproduced** if mean(d) <= 0; "
    "**inconclusive at this budget** otherwise; **not testable at this budget** with fewer than 2 paired "
    "seeds. std: sample standard deviation over seeds (n − 1), here and in every ± of this report."
)

#: per dataset: registry name, pairs, sizes (small / full), pair limits, trunks (per budget), default trunk
SETUPS: dict[str, dict[str, Any]] = {
    "images": {
        "dataset": "entangled_images",
        "pairs": list(IMAGE_PAIRS),
        "small": {"n_train": 1500, "n_val": 500, "n_test": 2000},
        "full": {"n_train": 8000, "n_val": 2000, "n_test": 8000},
        "trunks": {
            "conv": {"small": {"encoder": "conv", "width": 384}, "full": {"encoder": "conv", "width": 384}},
            "mlp": {
                "small": {"encoder": "mlp", "hidden": [256, 128]},
                "full": {"encoder": "mlp", "hidden": [512, 256]},
            },
        },
        "trunk": "conv",
    },
    "census": {
        "dataset": "entangled_census",
        "pairs": list(CENSUS_PAIRS),
        # income>50k & never married is rare (1117 of 199,523 training rows): its counts are pool-limited
        "small": {"n_train": 2000, "n_val": 500, "n_test": 2000},
        "full": {"n_train": 8000, "n_val": 1000, "n_test": 4000},
        "pair_limits": {"income_never_married": {"n_train": 1200, "n_val": 300}},
        "trunks": {
            "mlp": {"small": {"encoder": "mlp", "hidden": [256, 128]}, "full": {"encoder": "mlp", "hidden": [512, 256]}}
        },
        "trunk": "mlp",
    },
}
DEFAULT_DATASETS = ["images", "census"]
SMALL_EPOCHS, FULL_EPOCHS = 4, 30
MAIN_RATE = 0.75  # the paper's training agreement


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dataset",
        nargs="+",
        choices=sorted(SETUPS),
        default=list(DEFAULT_DATASETS),
        help="datasets, each with its own tables (default: images census)",
    )
    p.add_argument(
        "--pairs",
        nargs="+",
        default=None,
        help="attribute pairs (default: all of each dataset; with several datasets, pairs of the others are skipped)",
    )
    p.add_argument(
        "--methods",
        nargs="+",
        default=list(DEFAULT_METHODS),
        choices=list(METHODS),
        help=f"rows (default: {' '.join(DEFAULT_METHODS)})",
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (default 0 1 2; >= 3 advised)")
    p.add_argument("--epochs", type=int, default=None, help=f"default {SMALL_EPOCHS} (small) / {FULL_EPOCHS} (--full)")
    p.add_argument("--n-train", type=int, default=None, help="override the budget's training-set size")
    p.add_argument("--n-val", type=int, default=None, help="override the budget's size of each validation set")
    p.add_argument("--n-test", type=int, default=None, help="override the budget's test-set size")
    p.add_argument(
        "--rates",
        type=float,
        nargs="+",
        default=[0.5, 0.75, 0.9, 1.0],
        help="training agreement rates of the sweep (default 0.5 0.75 0.9 1.0)",
    )
    p.add_argument(
        "--sweep-pairs",
        nargs="+",
        default=None,
        help="pairs of the agreement sweep (default: the first pair of each dataset; 'none': no sweep)",
    )
    p.add_argument(
        "--trunk",
        choices=["conv", "mlp"],
        default=None,
        help="shared trunk of the image pairs (default conv: MTVIB Table I(b), as HPS's); census always "
        "uses the MLP trunk",
    )
    p.add_argument(
        "--full",
        action="store_true",
        help=f"the paper's protocol sizes and {FULL_EPOCHS} epochs (for an accelerator: add --device cuda)",
    )
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:N")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", default=None, help="output directory (default runs/reproduce-rrmtdl)")
    p.add_argument(
        "--reuse",
        action="store_true",
        help="read back finished runs in --out trained with the same config (and resume stopped ones "
        "from their checkpoint) instead of retraining: continues a stopped reproduction",
    )


# --- statistics -------------------------------------------------------------------------------------------------


def _std(vals: Sequence[float]) -> float:
    return float(np.std(vals, ddof=1)) if len(vals) > 1 else float("nan")


def _fmt(vals: Sequence[float]) -> str:
    """``mean ± std`` in percent (sample std; '—' with one value)."""
    if len(vals) == 0:
        return "—"
    s = _std(vals)
    return f"{100 * np.mean(vals):.2f} ± {100 * s:.2f}" if np.isfinite(s) else f"{100 * np.mean(vals):.2f} ± —"


def verdict(diffs: Sequence[float]) -> tuple[str, str]:
    """The verdict on "A beats B" from the per-seed paired differences ``d_s = A_s − B_s``, and why.

    ``reproduced``: every ``d_s > 0`` and ``mean(d) > std(d)`` (sample std); ``not reproduced``: ``mean(d) <= 0``;
    ``inconclusive at this budget``: otherwise; ``not testable at this budget``: fewer than 2 paired seeds.

    Example:
        >>> verdict([0.01])
        ('not testable at this budget', '1 paired seed(s): a spread needs at least 2')
        >>> verdict([0.02, 0.03, 0.01])[1]
        'positive in 3 of 3 seeds and mean +2.00 > std 1.00 (pp)'
    """
    d = [float(x) for x in diffs]
    n = len(d)
    if n < 2:
        return "not testable at this budget", f"{n} paired seed(s): a spread needs at least 2"
    m, s = float(np.mean(d)), _std(d)
    pos = sum(x > 0 for x in d)
    if m <= 0:
        return "not reproduced", f"mean {100 * m:+.2f} <= 0 (pp); positive in {pos} of {n} seeds"
    if pos == n and m > s:
        return "reproduced", f"positive in {pos} of {n} seeds and mean {100 * m:+.2f} > std {100 * s:.2f} (pp)"
    why = [f"positive in only {pos} of {n} seeds"] if pos < n else []
    if m <= s:
        why.append(f"mean {100 * m:+.2f} <= std {100 * s:.2f} (pp)")
    return "inconclusive at this budget", "; ".join(why)


def paired_differences(
    a: Mapping[int, Mapping[str, float]], b: Mapping[int, Mapping[str, float]], metric: str = "test/mean_accuracy"
) -> dict[int, float]:
    """``{seed: a[seed][metric] − b[seed][metric]}`` over the seeds both have, in seed order.

    Example:
        >>> paired_differences({0: {"m": 0.7}, 1: {"m": 0.6}}, {1: {"m": 0.5}, 2: {"m": 0.1}}, "m")
        {1: 0.09999999999999998}
    """
    return {s: float(a[s][metric]) - float(b[s][metric]) for s in sorted(set(a) & set(b))}


# --- budget and runs --------------------------------------------------------------------------------------------


def _sizes(setup: dict[str, Any], pair: str, args: argparse.Namespace) -> dict[str, int]:
    sizes = dict(setup["full" if args.full else "small"])
    for k in ("n_train", "n_val", "n_test"):
        if getattr(args, k) is not None:
            sizes[k] = int(getattr(args, k))
    for k, v in setup.get("pair_limits", {}).get(pair, {}).items():
        sizes[k] = min(sizes[k], v)
    return sizes


def _trunk(setup: dict[str, Any], args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """The trunk's name and model options: ``--trunk`` where the dataset has it (images), else its own (census)."""
    trunk = args.trunk if args.trunk in setup["trunks"] else setup["trunk"]
    return trunk, dict(setup["trunks"][trunk]["full" if args.full else "small"])


def budget_line(
    name: str,
    args: argparse.Namespace,
    sizes: Mapping[str, Mapping[str, int]],
    trunk: str,
    trunk_opts: Mapping[str, Any],
    device: str,
) -> str:
    """One line stating everything the numbers depend on (printed above every table)."""
    uniq = {json.dumps(dict(s), sort_keys=True) for s in sizes.values()}
    if len(uniq) == 1:
        s = next(iter(sizes.values()))
        size_txt = f"train {s['n_train']} / val {s['n_val']} (+{s['n_val']} reversed) / test {s['n_test']}"
    else:
        size_txt = "; ".join(
            f"{p}: train {s['n_train']} / val {s['n_val']} (+{s['n_val']} reversed) / test {s['n_test']}"
            for p, s in sizes.items()
        )
    topts = ", ".join(f"{k} {v}" for k, v in trunk_opts.items() if k != "encoder")
    threads = args.threads or torch.get_num_threads()
    kind = "full: the paper protocol sizes" if args.full else "small CPU budget" if device == "cpu" else "small budget"
    epochs = f"{args.epochs} epoch{'s' if args.epochs != 1 else ''}"
    return (
        f"Budget ({kind}; {name}): {size_txt}; {epochs}, batch {args.batch_size}, Adam lr {args.lr:g}; seeds "
        f"{' '.join(map(str, args.seeds))}; trunk {trunk} ({topts}); RRMTDL branch "
        f"{RRMTDL_WIDTHS['branch_width']}, projection {RRMTDL_WIDTHS['proj_width']}; device {device}"
        f"{f' ({threads} threads)' if device == 'cpu' else ''}; selection on the training-like validation set."
    )


def _run_config(
    setup: dict[str, Any],
    key: str,
    pair: str,
    rate: float,
    seed: int,
    sizes: Mapping[str, int],
    trunk_opts: Mapping[str, Any],
    groups: Any,
    args: argparse.Namespace,
    run_dir: Path,
) -> RunConfig:
    """The full config of one run: the dataset (pair, agreement, split seed, sizes) is part of it, so that ``--reuse``
    never reads back a run of another budget (:func:`mtlkit.runs.finished_run` compares the saved config)."""
    _, model, method, extra = METHODS[key]
    opts: dict[str, Any] = dict(trunk_opts)
    if model == "rrmtdl":
        opts.update(RRMTDL_WIDTHS)
        opts["groups"] = groups
        opts.update(extra)
    return RunConfig.from_dict(
        {
            "dataset": {
                "name": setup["dataset"],
                "options": {"pair": pair, "agreement": float(rate), "seed": seed, **sizes},
            },
            "model": {"name": model, "options": opts},
            "method": {"name": method},
            "train": {
                "epochs": args.epochs,
                "batch_size": args.batch_size,
                "optimizer": "adam",
                "lr": args.lr,
                "seed": seed,
                "device": args.device,
                "progress": False,
                "num_threads": args.threads,
            },
            "output": {"dir": str(run_dir), "tensorboard": False, "overwrite": True},
        }
    )


def _row(results: Mapping[str, Any], reversed_: Mapping[str, float], names: list[str]) -> dict[str, float]:
    row = {f"test/{k}": v for k, v in results["test"].items()}
    row.update({f"val/{k}": v for k, v in results["val"].items()})
    row.update({f"val_reversed/{k}": v for k, v in reversed_.items()})
    for split in ("test", "val", "val_reversed"):
        row[f"{split}/mean_accuracy"] = float(np.mean([row[f"{split}/{n}/accuracy"] for n in names]))
    row["train_seconds"] = float(results.get("train_seconds", float("nan")))
    return row


def run_one(data: MTLData, cfg: RunConfig, run_dir: Path, reuse: bool) -> tuple[dict[str, float], bool]:
    """Train one run (or, with ``reuse``, read back a finished one / resume a stopped one); returns its row and
    whether it was read back. The reversed-correlation validation metrics are kept in ``val_reversed.json``."""
    from mtlkit.evaluation import evaluate
    from mtlkit.train import train_or_reuse

    names = [t.name for t in data.tasks]
    rev_path = run_dir / "val_reversed.json"
    results, net, trained = train_or_reuse(cfg, data, run_dir, reuse)
    if trained or not rev_path.is_file():  # (a reused run stopped between results.json and val_reversed.json)
        rev = evaluate(net, data.info["val_reversed"], data.tasks, device=next(net.parameters()).device)
        rev_path.write_text(json.dumps(rev, indent=1))
    else:
        rev = json.loads(rev_path.read_text())
    return _row(results, rev, names), not trained


# --- report -----------------------------------------------------------------------------------------------------


def _label(key: str) -> str:
    return METHODS[key][0]


def _table(rows: Mapping[str, Mapping[int, Mapping[str, float]]], names: list[str]) -> str:
    cols = [f"test/{n}/accuracy" for n in names] + [
        "test/mean_accuracy",
        "val_reversed/mean_accuracy",
        "val/mean_accuracy",
    ]
    heads = [f"{n} (test)" for n in names] + ["mean (test)", "mean (val, test-like)", "mean (val, train-like)"]
    lines = ["| method | " + " | ".join(heads) + " |", "|---|" + "---|" * len(heads)]
    for key, by_seed in rows.items():
        rs = list(by_seed.values())
        lines.append(f"| {_label(key)} | " + " | ".join(_fmt([r[c] for r in rs]) for c in cols) + " |")
    return "\n".join(lines)


def _comparisons(
    rows: Mapping[str, Mapping[int, Mapping[str, float]]], comparisons: Sequence[tuple[str, str, str, str]]
) -> list[dict[str, Any]]:
    out = []
    for a, b, meaning, kind in comparisons:
        if a not in rows or b not in rows:
            continue
        d = paired_differences(rows[a], rows[b])
        word, why = verdict(list(d.values()))
        out.append(
            {
                "a": a,
                "b": b,
                "meaning": meaning,
                "kind": kind,
                "per_seed": d,
                "mean": float(np.mean(list(d.values()))) if d else float("nan"),
                "std": _std(list(d.values())),
                "verdict": word,
                "why": why,
            }
        )
    return out


def _diff_txt(c: Mapping[str, Any]) -> str:
    """A paired difference as ``+mean ± std`` in percentage points."""
    if not c["per_seed"]:
        return "—"
    spread = f"{100 * c['std']:.2f}" if np.isfinite(c["std"]) else "—"
    return f"{100 * c['mean']:+.2f} ± {spread}"


def _diff_table(comps: list[dict[str, Any]]) -> str:
    lines = ["| paired difference (pp) | kind | mean ± std | per seed | verdict | why |", "|---|---|---|---|---|---|"]
    for c in comps:
        per = ", ".join(f"s{s}: {100 * v:+.2f}" for s, v in c["per_seed"].items())
        lines.append(
            f"| {_label(c['a'])} − {_label(c['b'])} | {c['kind']}: {c['meaning']} | {_diff_txt(c)} | {per} "
            f"| **{c['verdict']}** | {c['why']} |"
        )
    return "\n".join(lines)


def _plot(
    sweep: Mapping[str, Mapping[str, Mapping[float, Mapping[int, Mapping[str, float]]]]], path: Path, title: str
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(sweep), figsize=(5 * len(sweep), 4), squeeze=False)
    for ax, (pair, by_method) in zip(axes[0], sweep.items(), strict=True):
        for key, by_rate in by_method.items():
            rates = sorted(by_rate)
            vals = [[r["test/mean_accuracy"] for r in by_rate[x].values()] for x in rates]
            m = [100 * np.mean(v) for v in vals]
            s = [100 * _std(v) if len(v) > 1 else 0.0 for v in vals]
            ax.errorbar([100 * r for r in rates], m, yerr=s, marker="o", capsize=3, label=_label(key))
        ax.set_xlabel("training agreement rate (%)")
        ax.set_ylabel("mean test accuracy, reversed correlation (%)")
        ax.set_title(pair)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(textwrap.fill(title, 40 + 25 * len(sweep)), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --- the command ------------------------------------------------------------------------------------------------


def _plan(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Per dataset: pairs, sweep pairs and the runs ``{(pair, rate): [method keys]}``, checked."""
    plans: dict[str, dict[str, Any]] = {}
    all_pairs = {p for d in args.dataset for p in SETUPS[d]["pairs"]}
    for flag, given in (("--pairs", args.pairs), ("--sweep-pairs", args.sweep_pairs)):
        bad = sorted(p for p in (given or []) if p not in all_pairs and not (flag == "--sweep-pairs" and p == "none"))
        if bad:
            raise SystemExit(
                f"error: unknown pair(s) {bad} for {flag} with --dataset {' '.join(args.dataset)}; "
                f"valid: {', '.join(sorted(all_pairs))}"
            )
    for name in args.dataset:
        valid = SETUPS[name]["pairs"]
        pairs = [p for p in args.pairs if p in valid] if args.pairs else list(valid)
        if args.sweep_pairs is None:
            sweep_pairs = pairs[:1]
        else:
            sweep_pairs = [p for p in args.sweep_pairs if p in valid]
        sweep_methods = [k for k in SWEEP_METHODS if k in args.methods]
        if not sweep_methods:
            sweep_pairs = []
        jobs: dict[tuple[str, float], list[str]] = {}
        for pair in pairs:
            jobs[(pair, MAIN_RATE)] = list(args.methods)
        for pair in sweep_pairs:
            for rate in args.rates:
                have = jobs.setdefault((pair, float(rate)), [])
                have += [k for k in sweep_methods if k not in have]
        if jobs:
            plans[name] = {"pairs": pairs, "sweep_pairs": sweep_pairs, "sweep_methods": sweep_methods, "jobs": jobs}
    return plans


def command_line(args: argparse.Namespace, out: Path) -> str:
    """The command that reproduces this report, every option spelled out (``--reuse`` left out: it changes no
    number)."""
    parts = ["mtlkit reproduce rrmtdl", "--dataset", *args.dataset]
    if args.pairs:
        parts += ["--pairs", *args.pairs]
    parts += ["--methods", *args.methods, "--seeds", *map(str, args.seeds), "--epochs", str(args.epochs)]
    for flag in ("n_train", "n_val", "n_test"):
        if getattr(args, flag) is not None:
            parts += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    parts += ["--rates", *(f"{r:g}" for r in args.rates)]
    if args.sweep_pairs is not None:
        parts += ["--sweep-pairs", *args.sweep_pairs]
    if args.trunk:
        parts += ["--trunk", args.trunk]
    if args.full:
        parts.append("--full")
    parts += ["--batch-size", str(args.batch_size), "--lr", f"{args.lr:g}", "--device", args.device]
    if args.threads:
        parts += ["--threads", str(args.threads)]
    return " ".join([parts[0], *(shlex.quote(x) for x in parts[1:] + ["--out", str(out)])])


def run(args: argparse.Namespace) -> int:
    from mtlkit.devices import resolve_device

    if args.epochs is None:
        args.epochs = FULL_EPOCHS if args.full else SMALL_EPOCHS
    if args.threads:
        torch.set_num_threads(args.threads)
    for r in args.rates:
        if not 0.0 <= r <= 1.0:
            raise SystemExit(f"error: --rates must lie in [0, 1], got {r}")
    args.seeds = list(dict.fromkeys(args.seeds))
    args.methods = list(dict.fromkeys(args.methods))
    device = str(resolve_device(args.device))
    plans = _plan(args)
    if not plans:
        log.info("error: nothing to run (no pair of the chosen datasets selected)")
        return 2
    out = Path(args.out or "runs/reproduce-rrmtdl")
    out.mkdir(parents=True, exist_ok=True)
    total = sum(len(keys) for p in plans.values() for keys in p["jobs"].values()) * len(args.seeds)
    log.info(
        f"[rrmtdl] {total} runs planned ({', '.join(plans)}; seeds {args.seeds}; device {device}); "
        f"{'--reuse: finished runs are read back' if args.reuse else 'retraining every run'}"
    )
    t0 = time.time()
    done = trained = 0
    train_time = 0.0
    report = [
        "# RRMTDL entangled-label reproduction: does RRMTDL beat HPS on the reversed-correlation test set?",
        "",
        (
            'Fang et al., "Adversarial Learning Guided Task Relatedness Refinement for Multi-Task Deep Learning", '
            "IEEE TMM 25 (2023), doi:10.1109/TMM.2022.3216460. Paper numbers: none public (only the abstract is "
            "available), so no paper column."
        ),
        "",
        (
            "Rows: RRMTDL (the paper's DANN λ schedule); RRMTDL (λ=0): the same network and adversarial heads, no "
            "reversed gradient into the branch; RRMTDL (λ=1 const): the released code's effective schedule. Seed s "
            "draws the split and initialises every row alike, so differences are paired per seed. Test sets have "
            "agreement 0 % (the training correlation reversed)."
        ),
        "",
        f"Command: `{command_line(args, out)}`",
        "",
        VERDICT_RULE,
        "",
    ]
    results: dict[str, Any] = {"verdict_rule": VERDICT_RULE, "datasets": {}}
    verdicts: list[tuple[str, str, dict[str, Any], str]] = []
    for name, plan in plans.items():
        setup = SETUPS[name]
        trunk, trunk_opts = _trunk(setup, args)
        pair_sizes = {p: _sizes(setup, p, args) for p in dict.fromkeys(plan["pairs"] + plan["sweep_pairs"])}
        budget = budget_line(name, args, pair_sizes, trunk, trunk_opts, device)
        # rows[(pair, rate)][key][seed] = row
        rows: dict[tuple[str, float], dict[str, dict[int, dict[str, float]]]] = {}
        info: dict[tuple[str, float], dict[str, Any]] = {}
        for (pair, rate), keys in plan["jobs"].items():
            for seed in args.seeds:
                data = build_dataset(setup["dataset"], pair=pair, agreement=rate, seed=seed, **pair_sizes[pair])
                info.setdefault(
                    (pair, rate),
                    data.info
                    | {
                        "names": [t.name for t in data.tasks],
                        "sizes": (len(data.train), len(data.val), len(data.test)),
                    },
                )
                for key in keys:
                    run_dir = out / name / pair / f"agree{rate:g}" / f"{key}-s{seed}"
                    cfg = _run_config(
                        setup,
                        key,
                        pair,
                        rate,
                        seed,
                        pair_sizes[pair],
                        trunk_opts,
                        data.info.get("groups"),
                        args,
                        run_dir,
                    )
                    t_run = time.time()
                    row, reused = run_one(data, cfg, run_dir, args.reuse)
                    rows.setdefault((pair, rate), {}).setdefault(key, {})[seed] = row
                    done += 1
                    if not reused:
                        trained += 1
                        train_time += time.time() - t_run
                    eta = (train_time / trained) * (total - done) if trained else float("nan")
                    log.info(
                        f"[rrmtdl {time.time() - t0:.0f}s] {done}/{total} {name} {pair} agreement {rate:g} "
                        f"{_label(key)} seed {seed}: test mean acc {100 * row['test/mean_accuracy']:.2f}"
                        f"{' (read back)' if reused else f' ({time.time() - t_run:.0f}s)'}"
                        f"{f'; ~{eta / 60:.0f} min left' if np.isfinite(eta) else ''}"
                    )
                del data
        res_ds: dict[str, Any] = {"budget": budget, "pairs": {}, "sweep": {}}
        report += [f"## {name}", ""]
        for pair in plan["pairs"]:
            meta, r = info[(pair, MAIN_RATE)], rows[(pair, MAIN_RATE)]
            names, c = meta["names"], meta["counts"]
            ntr, nva, nte = meta["sizes"]
            comps = _comparisons(r, COMPARISONS)
            report += [
                f"### {pair} (tasks {', '.join(names)}; entangled {meta['pair'][0]} × {meta['pair'][1]})",
                "",
                (
                    f"train {ntr} (cells 11/00/10/01: {c['train']}), agreement "
                    f"{100 * meta['agreement']['train']:.0f} %; val {nva} training-like; val_reversed "
                    f"{len(meta['val_reversed'])}; test {nte} (agreement 0 %)."
                ),
                "",
                f"Accuracy (%), mean ± std over seeds. {budget}",
                "",
                _table(r, names),
                "",
                f"Paired per-seed differences of the mean test accuracy (percentage points). {budget}",
                "",
                _diff_table(comps),
                "",
            ]
            for cmp in comps:
                verdicts.append((name, pair, cmp, budget))
            res_ds["pairs"][pair] = {
                "tasks": names,
                "counts": c,
                "agreement_rate": MAIN_RATE,
                "rows": {k: {str(s): v for s, v in by.items()} for k, by in r.items()},
                "paired_differences": comps,
            }
        if plan["sweep_pairs"]:
            rates = sorted({float(x) for x in args.rates})
            sweep = {
                p: {k: {x: rows[(p, x)][k] for x in rates} for k in plan["sweep_methods"]} for p in plan["sweep_pairs"]
            }
            png = out / f"rrmtdl_{name}_agreement.png"
            _plot(sweep, png, f"RRMTDL vs HPS on {name}: accuracy vs training agreement. {budget}")
            report += [
                "### Test accuracy (mean of the tasks) against the training agreement rate",
                "",
                (f"Rows: mean ± std over seeds (%); difference rows: paired per seed (pp) with the verdict. {budget}"),
                "",
                "| pair | row | " + " | ".join(f"{100 * x:.0f} %" for x in rates) + " |",
                "|---|---|" + "---|" * len(rates),
            ]
            res_ds["sweep"] = {}
            for pair, by_m in sweep.items():
                for key, by_rate in by_m.items():
                    report.append(
                        f"| {pair} | {_label(key)} | "
                        + " | ".join(_fmt([v["test/mean_accuracy"] for v in by_rate[x].values()]) for x in rates)
                        + " |"
                    )
                per_rate = {x: _comparisons(rows[(pair, x)], SWEEP_COMPARISONS) for x in rates}
                for _i, (a, b, _, _) in enumerate(SWEEP_COMPARISONS):
                    if a not in by_m or b not in by_m:
                        continue
                    cells = []
                    for x in rates:
                        cmp = next(cc for cc in per_rate[x] if cc["a"] == a and cc["b"] == b)
                        cells.append(f"{_diff_txt(cmp)}: {cmp['verdict']}")
                    report.append(f"| {pair} | {_label(a)} − {_label(b)} | " + " | ".join(cells) + " |")
                res_ds["sweep"][pair] = {
                    "rows": {
                        k: {str(x): {str(s): v for s, v in by_rate[x].items()} for x in rates}
                        for k, by_rate in by_m.items()
                    },
                    "paired_differences": {str(x): per_rate[x] for x in rates},
                }
            report += ["", f"![agreement sweep]({png.name})", ""]
        results["datasets"][name] = res_ds
    # verdicts, one line per claim and pair, then a count per claim
    budgets = list(dict.fromkeys(b for _, _, _, b in verdicts))
    report += [
        "## Verdicts",
        "",
        VERDICT_RULE,
        "",
        "  \n".join(budgets),
        "",
        "| comparison | claim | dataset | pair | mean ± std (pp) | verdict | why | budget |",
        "|---|---|---|---|---|---|---|---|",
    ]
    summary: dict[str, dict[str, list[str]]] = {}
    for name, pair, cmp, budget in verdicts:
        label = f"{_label(cmp['a'])} − {_label(cmp['b'])}"
        report.append(
            f"| {label} | {cmp['kind']}: {cmp['meaning']} | {name} | {pair} | {_diff_txt(cmp)} | "
            f"**{cmp['verdict']}** | {cmp['why']} | {budget.split(':', 1)[0]} |"
        )
        summary.setdefault(label, {}).setdefault(cmp["verdict"], []).append(f"{name}/{pair}")
    report.append("")
    for label, by_word in summary.items():
        n = sum(len(v) for v in by_word.values())
        parts = [f"{w} on {len(v)} of {n} ({', '.join(v)})" for w, v in by_word.items()]
        report.append(f"- {label}: " + "; ".join(parts) + ".")
    wall = time.time() - t0
    report += ["", f"Wall time: {wall:.0f} s ({trained} runs trained, {done - trained} read back)."]
    results["summary"] = summary
    results["seconds"] = wall
    text = "\n".join(report)
    (out / "report.md").write_text(text + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    print(text)
    log.info(f"[rrmtdl] wrote {out / 'report.md'} and {out / 'results.json'}")
    return 0


register_reproduction(
    Reproduction(
        "rrmtdl",
        "RRMTDL entangled-label protocol: reversed-correlation test accuracy, with the λ = 0 and constant-λ controls",
        add_arguments,
        run,
    )
)
