"""``mtlkit reproduce rrmtdl``: the entangled-label experiments of RRMTDL on the data we have.

Fang et al., "Adversarial Learning Guided Task Relatedness Refinement for Multi-Task Deep Learning", IEEE TMM 25
(2023). The paper's CelebA pairs are not obtainable here; we rebuild the protocol (:mod:`mtlkit.data.entangled`) on
attribute pairs of Multi-(Fashion+MNIST) (``--dataset images``) and of census-income (``--dataset census``).

For each pair: per-task accuracy on the reversed-correlation test set (and on the test-like validation set) of STL,
HPS+EW, HPS+MGDA, HPS+PCGrad, HPS+MAMG (the zoo's aggregators, by name) and RRMTDL, over seeds (mean ± std); model
selection on the training-like validation set only. Then, for HPS+EW and RRMTDL, test accuracy against the training
agreement rate (``--rates``, default 50/75/90 %) as a PNG.

Budget: the defaults are the small CPU budget stated in the output (sizes, epochs, seeds); ``--full`` switches to the
paper's protocol sizes (8000 train / 2000 val / 8000 test where the pool allows it) and ``--epochs 30``.

Example:
    >>> from mtlkit.reproduce import load_all
    >>> "rrmtdl" in load_all()
    True
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mtlkit.config import RunConfig
from mtlkit.data import MTLData, build_dataset
from mtlkit.data.entangled import CENSUS_PAIRS, IMAGE_PAIRS
from mtlkit.reproduce import Reproduction, register_reproduction
from mtlkit.train import Trainer, evaluate

#: The paper's numbers. None are public: only the abstract of Fang et al. (TMM 2023) is available (see
#: shared/papers/rrmtdl-adversarial-task-relatedness-refinement.md), so there is nothing to print beside ours.
PAPER: dict[str, Any] = {}

#: label -> (model registry name, method registry name)
METHODS: dict[str, tuple[str, str]] = {
    "STL": ("stl", "stl"), "HPS+EW": ("hps", "ew"), "HPS+MGDA": ("hps", "mgda"), "HPS+PCGrad": ("hps", "pcgrad"),
    "HPS+MAMG": ("hps", "mamg"), "RRMTDL": ("rrmtdl", "ew"),
}

#: per dataset: registry name, pairs, small sizes, full (paper) sizes, encoder options
SETUPS: dict[str, dict[str, Any]] = {
    "images": {"dataset": "entangled_images", "pairs": list(IMAGE_PAIRS),
               "small": {"n_train": 2000, "n_val": 500, "n_test": 2000},
               "full": {"n_train": 8000, "n_val": 2000, "n_test": 8000},
               "encoder": {"encoder": "mlp", "hidden": [256, 128]},
               "full_encoder": {"encoder": "conv", "width": 384}},
    "census": {"dataset": "entangled_census", "pairs": list(CENSUS_PAIRS),
               # income>50k & never married is rare (1117 of 199,523 training rows): its counts are pool-limited
               "small": {"n_train": 2000, "n_val": 500, "n_test": 2000},
               "full": {"n_train": 8000, "n_val": 1000, "n_test": 4000},
               "pair_limits": {"income_never_married": {"n_train": 1200, "n_val": 300}},
               "encoder": {"encoder": "mlp", "hidden": [256, 128]},
               "full_encoder": {"encoder": "mlp", "hidden": [512, 256]}},
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", choices=sorted(SETUPS), default="census")
    p.add_argument("--pairs", nargs="+", default=None, help="attribute pairs (default: all of the dataset)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=None, help="default 4 (small) / 30 (--full)")
    p.add_argument("--rates", type=float, nargs="+", default=[0.5, 0.75, 0.9], help="training agreement rates")
    p.add_argument("--sweep-pairs", nargs="+", default=None, help="pairs for the agreement sweep (default: first)")
    p.add_argument("--full", action="store_true", help="the paper's protocol sizes, conv trunk for images, 30 epochs")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None, help="output directory (default runs/reproduce-rrmtdl-<dataset>)")


def _sizes(setup: dict[str, Any], pair: str, full: bool) -> dict[str, int]:
    sizes = dict(setup["full" if full else "small"])
    for k, v in setup.get("pair_limits", {}).get(pair, {}).items():
        sizes[k] = min(sizes[k], v)
    return sizes


def _run(data: MTLData, label: str, seed: int, args: argparse.Namespace, enc: dict[str, Any], out: Path,
         groups: Any) -> dict[str, float]:
    model, method = METHODS[label]
    opts = dict(enc)
    if model == "rrmtdl":
        opts.update({"branch_width": 128, "proj_width": 64, "groups": groups})
    cfg = RunConfig.from_dict({
        "model": {"name": model, "options": opts}, "method": {"name": method},
        "train": {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "seed": seed, "device": "cpu",
                  "progress": False, "num_threads": args.threads},
        "output": {"dir": str(out), "tensorboard": False, "overwrite": True}})
    trainer = Trainer(cfg, data)
    res = trainer.fit()
    rev = evaluate(trainer.model, data.info["val_reversed"], data.tasks)
    row = {f"test/{k}": v for k, v in res.test.items()}
    row.update({f"val/{k}": v for k, v in res.val.items()})
    row.update({f"val_reversed/{k}": v for k, v in rev.items()})
    names = [t.name for t in data.tasks]
    for split in ("test", "val", "val_reversed"):
        row[f"{split}/mean_accuracy"] = float(np.mean([row[f"{split}/{n}/accuracy"] for n in names]))
    return row


def _fmt(vals: list[float]) -> str:
    return f"{100 * np.mean(vals):.2f} ± {100 * np.std(vals):.2f}"


def _table(rows: dict[str, list[dict[str, float]]], names: list[str]) -> str:
    cols = [f"test/{n}/accuracy" for n in names] + ["test/mean_accuracy", "val_reversed/mean_accuracy",
                                                     "val/mean_accuracy"]
    heads = [f"{n} (test)" for n in names] + ["mean (test)", "mean (val, test-like)", "mean (val, train-like)"]
    lines = ["| method | " + " | ".join(heads) + " |", "|---|" + "---|" * len(heads)]
    for label, rs in rows.items():
        lines.append(f"| {label} | " + " | ".join(_fmt([r[c] for r in rs]) for c in cols) + " |")
    return "\n".join(lines)


def _plot(sweep: dict[str, dict[str, dict[float, list[float]]]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(sweep), figsize=(5 * len(sweep), 4), squeeze=False)
    for ax, (pair, by_method) in zip(axes[0], sweep.items()):
        for label, by_rate in by_method.items():
            rates = sorted(by_rate)
            m = [100 * np.mean(by_rate[r]) for r in rates]
            s = [100 * np.std(by_rate[r]) for r in rates]
            ax.errorbar([100 * r for r in rates], m, yerr=s, marker="o", capsize=3, label=label)
        ax.set_xlabel("training agreement rate (%)")
        ax.set_ylabel("mean test accuracy, reversed correlation (%)")
        ax.set_title(pair)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    setup = SETUPS[args.dataset]
    if args.epochs is None:
        args.epochs = 30 if args.full else 4
    if args.threads:
        torch.set_num_threads(args.threads)
    pairs = args.pairs or setup["pairs"]
    sweep_pairs = args.sweep_pairs if args.sweep_pairs is not None else pairs[:1]
    valid = setup["pairs"]
    bad = sorted({p for p in pairs + sweep_pairs if p not in valid})
    if bad:
        print(f"error: unknown pair(s) {bad} for --dataset {args.dataset}; valid: {', '.join(valid)}", file=sys.stderr)
        return 2
    enc = setup["full_encoder" if args.full else "encoder"]
    out = Path(args.out or f"runs/reproduce-rrmtdl-{args.dataset}")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    budget = (f"budget: {'full (paper protocol sizes)' if args.full else 'small CPU budget'}; epochs {args.epochs}, "
              f"batch {args.batch_size}, Adam lr {args.lr}, seeds {args.seeds}, trunk {enc}; RRMTDL branch 128, "
              f"projection 64, DANN λ schedule; selection on the training-like validation set")
    report = [f"# RRMTDL entangled-label reproduction — {args.dataset}", "", budget, "",
              "Paper numbers: none public (only the abstract of Fang et al., IEEE TMM 2023, is available), so no "
              "paper column.", ""]
    results: dict[str, Any] = {"budget": budget, "pairs": {}, "sweep": {}}
    main_rate = 0.75
    cached: dict[tuple[str, float], MTLData] = {}

    def data_for(pair: str, rate: float) -> MTLData:
        if (pair, rate) not in cached:
            cached[(pair, rate)] = build_dataset(setup["dataset"], pair=pair, agreement=rate,
                                                 **_sizes(setup, pair, args.full))
        return cached[(pair, rate)]

    for pair in pairs:
        data = data_for(pair, main_rate)
        names = [t.name for t in data.tasks]
        rows: dict[str, list[dict[str, float]]] = {}
        for label in args.methods:
            for seed in args.seeds:
                r = _run(data, label, seed, args, enc, out / pair / f"{label}-s{seed}", data.info.get("groups"))
                rows.setdefault(label, []).append(r)
                print(f"[{time.time() - t0:.0f}s] {pair} {label} seed {seed}: test mean acc "
                      f"{100 * r['test/mean_accuracy']:.2f}", file=sys.stderr, flush=True)
        c = data.info["counts"]
        report += [f"## {pair} (tasks {', '.join(names)}; entangled {data.info['pair'][0]} × {data.info['pair'][1]})",
                   "", f"train {len(data.train)} (cells 11/00/10/01: {c['train']}), agreement "
                   f"{100 * data.info['agreement']['train']:.0f} %; val {len(data.val)} training-like; val_reversed "
                   f"{len(data.info['val_reversed'])}; test {len(data.test)} (agreement 0 %)", "",
                   _table(rows, names), ""]
        results["pairs"][pair] = {"tasks": names, "counts": c, "rows": rows}
    sweep: dict[str, dict[str, dict[float, list[float]]]] = {}
    sweep_methods = [m for m in ("HPS+EW", "RRMTDL") if m in args.methods]
    for pair in sweep_pairs:
        for rate in args.rates:
            data = data_for(pair, rate)
            for label in sweep_methods:
                for seed in args.seeds:
                    if rate == main_rate and pair in results["pairs"]:
                        r = results["pairs"][pair]["rows"][label][args.seeds.index(seed)]
                    else:
                        r = _run(data, label, seed, args, enc, out / f"sweep-{pair}-{rate:g}" / f"{label}-s{seed}",
                                 data.info.get("groups"))
                        print(f"[{time.time() - t0:.0f}s] sweep {pair} rate {rate:g} {label} seed {seed}: "
                              f"{100 * r['test/mean_accuracy']:.2f}", file=sys.stderr, flush=True)
                    sweep.setdefault(pair, {}).setdefault(label, {}).setdefault(rate, []).append(
                        r["test/mean_accuracy"])
    if sweep:
        png = out / f"rrmtdl_{args.dataset}_agreement.png"
        _plot(sweep, png, f"RRMTDL vs HPS on {args.dataset}: accuracy vs training agreement")
        report += ["## Test accuracy (mean of the tasks) against the training agreement rate", "",
                   "| pair | method | " + " | ".join(f"{100 * r:.0f} %" for r in args.rates) + " |",
                   "|---|---|" + "---|" * len(args.rates)]
        for pair, by_m in sweep.items():
            for label, by_rate in by_m.items():
                report.append(f"| {pair} | {label} | " + " | ".join(_fmt(by_rate[r]) for r in args.rates) + " |")
        report += ["", f"![agreement sweep]({png.name})", ""]
        results["sweep"] = {p: {m: {str(r): v for r, v in d.items()} for m, d in bm.items()} for p, bm in sweep.items()}
    report.append(f"Wall time: {time.time() - t0:.0f} s.")
    text = "\n".join(report)
    (out / "report.md").write_text(text + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    print(text)
    return 0


register_reproduction(Reproduction("rrmtdl", "RRMTDL entangled-label protocol: reversed-correlation test accuracy",
                                   add_arguments, run))
