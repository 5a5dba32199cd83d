"""``mtlkit reproduce mtvib``: Tables III/IV and Fig. 5 of Qian, Chen & Lin, "Multi-task variational information
bottleneck" (MTVIB) on the 36x36 MultiMNIST / MultiFashion we build from real MNIST / Fashion-MNIST.

Models (Table I): STL (a) = ``--model hps --method stl``; GS (b) = HPS with constant weights ``(w, 1-w)``
grid-searched on validation (method ``constant``); UWL (b) = HPS with uncertainty weighting, classification form
(method ``uw``, ``form=classification``, Eq. 22); STVIB (c) = ``--model stvib --method stl``; MTVIB (d) = ``--model
mtvib --method mtvib`` (Eq. 23). Each trained model (selected on validation) is attacked with FGSM (Eq. 25) on the
summed task loss for every η, on the test split; per-task accuracy (Tables III/IV) and joint accuracy (Fig. 5).

Choices: the GS grid search runs on the first seed only and the chosen weights are reused for the other seeds
(the paper does not say how often it searched; one search keeps the cost at grid + seeds - 1 runs). Model selection
is the trainer's (best mean validation accuracy over epochs). The paper trains on 120,000 images and tests on
10,000, 200 epochs, Adam lr 1e-4, batch 200 (Sec. VI): ``--full`` sets exactly that; the default is a small CPU
budget, printed with every table. The paper does not say whether its 120,000 include a validation split: we hold
out ``val_fraction`` (10 %) of them for model selection and GS.

Example:
    >>> PAPER["multimnist"]["MTVIB"]["left"][0.0]
    94.9
    >>> sorted(PAPER)
    ['multifashion', 'multimnist']
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from mtlkit.reproduce import Reproduction, register_reproduction

log = logging.getLogger("mtlkit")

ETAS = (0.0, 0.05, 0.10, 0.15, 0.20, 0.25, 0.30)
MODELS = ("STL", "STVIB", "GS", "UWL", "MTVIB")
MTL_MODELS = ("GS", "UWL", "MTVIB")


def _rows(*cols: list[float]) -> dict[str, dict[float, float]]:
    return {m: dict(zip(ETAS, c, strict=True)) for m, c in zip(MODELS, cols, strict=True)}


def _paper_table(t1: list[list[float]], t2: list[list[float]]) -> dict[str, dict[str, dict[float, float]]]:
    """Rows of the paper (one per η, columns STL STVIB GS UWL MTVIB) -> {model: {task: {η: accuracy %}}}."""
    out: dict[str, dict[str, dict[float, float]]] = {m: {} for m in MODELS}
    for task, rows in (("left", t1), ("right", t2)):
        for j, m in enumerate(MODELS):
            out[m][task] = {eta: row[j] for eta, row in zip(ETAS, rows, strict=True)}
    return out


#: Test accuracy (%) under FGSM of strength η, from the MTVIB paper: Table III (MultiMNIST) and Table IV
#: (MultiFashion); "task 1" and "task 2" of the paper are our "left" and "right" objects.
PAPER: dict[str, dict[str, dict[str, dict[float, float]]]] = {
    "multimnist": _paper_table(  # Table III
        [
            [94.8, 94.9, 94.7, 95.0, 94.9],
            [86.1, 86.5, 85.3, 85.6, 86.0],
            [85.4, 85.2, 84.7, 76.3, 84.7],
            [84.0, 83.2, 83.2, 66.9, 83.4],
            [82.5, 81.1, 81.4, 57.6, 81.6],
            [80.2, 78.5, 79.3, 48.2, 79.1],
            [77.1, 75.5, 76.4, 38.9, 76.8],
        ],
        [
            [93.6, 93.7, 93.7, 93.7, 93.7],
            [81.9, 82.9, 80.1, 81.1, 81.5],
            [80.3, 81.5, 79.3, 80.2, 80.5],
            [79.0, 80.0, 77.3, 78.8, 79.0],
            [76.6, 78.0, 75.1, 77.1, 77.3],
            [73.7, 75.9, 72.6, 74.2, 74.7],
            [70.0, 73.0, 69.0, 71.0, 72.2],
        ],
    ),
    "multifashion": _paper_table(  # Table IV
        [
            [87.1, 86.7, 86.8, 86.7, 86.2],
            [59.1, 60.1, 57.1, 57.5, 58.2],
            [57.3, 57.7, 54.8, 54.9, 56.3],
            [54.9, 55.0, 51.9, 51.6, 53.7],
            [51.7, 52.4, 48.6, 48.3, 51.0],
            [48.4, 49.7, 45.4, 44.7, 48.4],
            [44.9, 46.7, 41.9, 40.5, 45.2],
        ],
        [
            [86.0, 85.3, 85.6, 85.3, 84.4],
            [60.8, 60.1, 57.2, 56.3, 56.4],
            [59.2, 57.6, 55.9, 54.5, 55.0],
            [56.5, 54.7, 53.5, 52.5, 52.8],
            [53.2, 51.9, 50.6, 49.7, 50.9],
            [50.3, 49.2, 48.3, 46.0, 49.0],
            [46.1, 46.4, 45.8, 43.6, 46.4],
        ],
    ),
}

FULL = {"n_train": 120_000, "n_test": 10_000, "epochs": 200, "lr": 1e-4, "batch_size": 200}


def spec(model: str, gs_weights: tuple[float, float] | None = None) -> dict[str, Any]:
    """Config sections (model + method) of one of the paper's models.

    Example:
        >>> spec("MTVIB")
        {'model': {'name': 'mtvib', 'options': {}}, 'method': {'name': 'mtvib', 'options': {}}}
    """
    table = {
        "STL": ("hps", "stl", {}),
        "STVIB": ("stvib", "stl", {}),
        "GS": ("hps", "constant", {"weights": list(gs_weights or (0.5, 0.5))}),
        "UWL": ("hps", "uw", {"form": "classification"}),
        "MTVIB": ("mtvib", "mtvib", {}),
    }
    if model not in table:
        raise ValueError(f"unknown MTVIB-paper model {model!r}; valid: {', '.join(table)}")
    name, method, options = table[model]
    return {"model": {"name": name, "options": {}}, "method": {"name": method, "options": options}}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", choices=["multimnist", "multifashion"], default="multimnist")
    p.add_argument(
        "--full",
        action="store_true",
        help="the paper's budget: 120000 train / 10000 test images, 200 epochs, Adam lr 1e-4, batch 200",
    )
    p.add_argument("--n-train", type=int, default=6000, help="train+val images (paper: 120000)")
    p.add_argument("--n-test", type=int, default=2000, help="test images (paper: 10000)")
    p.add_argument("--epochs", type=int, default=3, help="epochs (paper: 200)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (paper: 1e-4)")
    p.add_argument("--batch-size", type=int, default=200)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument(
        "--gs-grid",
        type=float,
        nargs="+",
        default=[0.25, 0.5, 0.75],
        help="candidate weights w of the first task for GS (second task: 1 - w)",
    )
    p.add_argument("--eta", type=float, nargs="+", default=list(ETAS), help="FGSM strengths (pixels in [0, 1])")
    p.add_argument("--attack-batch", type=int, default=500)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--out", default=None, help="output directory (default runs/reproduce-mtvib-<dataset>)")
    p.add_argument(
        "--reuse",
        action="store_true",
        help="reuse finished runs in --out instead of retraining; resume stopped ones from their checkpoint",
    )
    p.add_argument(
        "--merge",
        nargs="+",
        metavar="DIR",
        default=None,
        help="train nothing: merge the results.json of these finished output directories (different "
        "models, same dataset, η values and budget) into one table in --out",
    )


def _budget(args: argparse.Namespace) -> dict[str, Any]:
    b = {
        "n_train": args.n_train,
        "n_test": args.n_test,
        "epochs": args.epochs,
        "lr": args.lr,
        "batch_size": args.batch_size,
    }
    if args.full:
        b.update(FULL)
    b["seeds"] = list(args.seeds)
    return b


def _train(
    model: str,
    seed: int,
    data,
    budget: dict[str, Any],
    out: Path,
    reuse: bool,
    threads: int | None,
    gs_weights: tuple[float, float] | None = None,
    tag: str | None = None,
):
    """Train one model with one seed; returns (trained model, results dict)."""
    from mtlkit.config import RunConfig
    from mtlkit.train import train_or_reuse

    run_dir = out / "runs" / f"{tag or model}-s{seed}"
    cfg = RunConfig.from_dict(
        {
            "dataset": {"name": data.name, "options": {"n_train": budget["n_train"], "n_test": budget["n_test"]}},
            **spec(model, gs_weights),
            "train": {
                "epochs": budget["epochs"],
                "lr": budget["lr"],
                "batch_size": budget["batch_size"],
                "optimizer": "adam",
                "seed": seed,
                "device": "cpu",
                "num_threads": threads,
                "progress": False,
            },
            "output": {"dir": str(run_dir), "tensorboard": False, "overwrite": True},
        }
    )
    t0 = time.time()
    results, net, trained = train_or_reuse(cfg, data, run_dir, reuse)  # a stopped run continues from its checkpoint
    if trained:
        log.info(
            f"[mtvib] {tag or model} seed {seed}: val {_acc(results['val'])} test {_acc(results['test'])} "
            f"({time.time() - t0:.0f}s)"
        )
    return net, results


def _curve(net, data, etas: list[float], args: argparse.Namespace, run_dir: Path) -> dict[str, dict[str, float]]:
    """FGSM curve of one trained model on the test split, cached in its run directory as ``fgsm_curve.json``.

    With ``--reuse`` a cached curve is read back when it was made for the same η values, test size and attack;
    otherwise it is computed (and the cache rewritten), so a resumed reproduction does not attack a model twice.
    """
    from mtlkit.evaluation import robustness_curve

    key = {"etas": etas, "n_test": len(data.test), "attack": "fgsm", "target": "sum"}
    cache = run_dir / "fgsm_curve.json"
    if args.reuse and cache.is_file():
        saved = json.loads(cache.read_text())
        if saved.get("key") == key:
            return saved["curve"]
    t0 = time.time()
    curve = robustness_curve(net, data.tasks, data.test, etas, "fgsm", batch_size=args.attack_batch)
    log.info(f"[mtvib] FGSM sweep of {run_dir.name}: {time.time() - t0:.0f}s")
    cache.write_text(json.dumps({"key": key, "curve": curve}, indent=1))
    return curve


def _acc(m: dict[str, float]) -> str:
    return " ".join(f"{k.split('/')[0]}={v:.4f}" for k, v in m.items() if k.endswith("/accuracy"))


def run(args: argparse.Namespace) -> int:
    if args.merge:
        if not args.out:
            raise SystemExit("--merge needs --out (the directory that receives the merged table)")
        print(merge(args.merge, args.out))
        return 0
    from mtlkit.data import build_dataset

    budget = _budget(args)
    out = Path(args.out or f"runs/reproduce-mtvib-{args.dataset}")
    out.mkdir(parents=True, exist_ok=True)
    data = build_dataset(args.dataset, n_train=budget["n_train"], n_test=budget["n_test"])
    names = [t.name for t in data.tasks]
    etas = [float(e) for e in args.eta]
    curves: dict[str, list[dict[str, dict[str, float]]]] = {m: [] for m in args.models}
    extra: dict[str, Any] = {}
    t_start = time.time()
    gs_weights: tuple[float, float] | None = None
    if "GS" in args.models:
        # Grid search on the first seed: one HPS per candidate (w, 1 - w), keep the best validation score.
        scores = {}
        nets = {}
        for w in args.gs_grid:
            if not 0.0 <= w <= 1.0:
                raise SystemExit(f"--gs-grid values must lie in [0, 1], got {w}")
            wts = (float(w), float(1.0 - w))
            net, res = _train("GS", args.seeds[0], data, budget, out, args.reuse, args.threads, wts, tag=f"GS-w{w:g}")
            scores[w] = float(np.mean([res["val"][f"{n}/accuracy"] for n in names]))
            nets[w] = net
        best_w = max(scores, key=lambda k: scores[k])
        gs_weights = (float(best_w), float(1.0 - best_w))
        extra["gs"] = {
            "grid": list(args.gs_grid),
            "val_score": {str(k): v for k, v in scores.items()},
            "chosen": list(gs_weights),
            "searched_on_seed": args.seeds[0],
        }
        curves["GS"].append(_curve(nets[best_w], data, etas, args, out / "runs" / f"GS-w{best_w:g}-s{args.seeds[0]}"))
    for seed in args.seeds:
        for m in args.models:
            if m == "GS" and seed == args.seeds[0]:
                continue
            gs_tag = None
            if m == "GS":
                if gs_weights is None:  # chosen by the grid search above whenever GS is among the models
                    raise RuntimeError("GS weights were not chosen before training GS")
                gs_tag = f"GS-w{gs_weights[0]:g}"
            net, _ = _train(m, seed, data, budget, out, args.reuse, args.threads, gs_weights, tag=gs_tag)
            tag = gs_tag if gs_tag is not None else m
            curves[m].append(_curve(net, data, etas, args, out / "runs" / f"{tag}-s{seed}"))
            # partial results after every model, so that an interrupted run still leaves its numbers
            (out / "curves_partial.json").write_text(json.dumps({"budget": budget, "curves": curves, **extra}))
    elapsed = time.time() - t_start
    md = report(args.dataset, curves, etas, names, budget, extra, elapsed)
    print(md)
    (out / "table.md").write_text(md)
    (out / "results.json").write_text(
        json.dumps(
            {
                "dataset": args.dataset,
                "budget": budget,
                "etas": etas,
                "curves": curves,
                "paper": _paper_json(args.dataset),
                "seconds": elapsed,
                **extra,
            },
            indent=1,
        )
    )
    plot(curves, etas, names, out, args.dataset)
    log.info(
        f"wrote {out / 'table.md'}, {out / 'results.json'}, {out / 'accuracy_vs_eta.png'}, "
        f"{out / 'joint_accuracy_vs_eta.png'}"
    )
    return 0


def rebuild(out: str | Path) -> str:
    """Re-write ``table.md`` and the PNGs of a finished ``reproduce mtvib`` output directory from its results.json."""
    out = Path(out)
    res = json.loads((out / "results.json").read_text())
    first = next(iter(next(cs for cs in res["curves"].values() if cs)[0].values()))
    names = [k.split("/")[0] for k in first if k.endswith("/accuracy")]
    extra = {"gs": res["gs"]} if "gs" in res else {}
    md = report(res["dataset"], res["curves"], res["etas"], names, res["budget"], extra, res["seconds"])
    (out / "table.md").write_text(md)
    plot(res["curves"], res["etas"], names, out, res["dataset"])
    return md


def merge(dirs: list[str | Path], out: str | Path) -> str:
    """One table from several finished ``reproduce mtvib`` output directories that trained different models.

    The directories must share the dataset, the η values and the budget (the seeds may differ: each model keeps its
    own, and the table gives n per column). A model found in two directories is an error, not a silent choice.
    Writes ``results.json``, ``table.md`` and the PNGs into ``out`` and returns the markdown.

    Raises:
        ConfigError: a directory without results.json, or results that cannot be put side by side.
    """
    from mtlkit.errors import ConfigError

    loaded = []
    for d in dirs:
        f = Path(d) / "results.json"
        if not f.is_file():
            raise ConfigError(f"{d} has no results.json (not a finished `reproduce mtvib` output directory)")
        loaded.append((str(d), json.loads(f.read_text())))
    first_dir, first = loaded[0]
    same = lambda b: {k: v for k, v in b.items() if k != "seeds"}  # noqa: E731
    curves: dict[str, list] = {}
    seeds: dict[str, list] = {}
    merged = {
        "dataset": first["dataset"],
        "budget": same(first["budget"]),
        "etas": first["etas"],
        "paper": first.get("paper"),
        "seconds": 0.0,
        "sources": [d for d, _ in loaded],
    }
    for d, res in loaded:
        for key, mine, theirs in (
            ("dataset", res["dataset"], first["dataset"]),
            ("etas", res["etas"], first["etas"]),
            ("budget", same(res["budget"]), same(first["budget"])),
        ):
            if mine != theirs:
                raise ConfigError(f"cannot merge {d} with {first_dir}: {key} differs ({mine} vs {theirs})")
        for m, cs in res["curves"].items():
            if not cs:
                continue
            if m in curves:
                raise ConfigError(
                    f"model {m} is in more than one of the merged directories ({d} and another); keep it in one"
                )
            curves[m] = cs
            seeds[m] = res["budget"].get("seeds", [])[: len(cs)]
        merged["seconds"] += float(res.get("seconds", 0.0))
        if "gs" in res and "GS" in res["curves"] and res["curves"]["GS"]:
            merged["gs"] = res["gs"]
    merged["curves"] = curves
    merged["budget"]["seeds"] = seeds
    out = Path(out)
    if any(out.resolve() == Path(d).resolve() for d, _ in loaded):
        raise ConfigError(f"--out {out} is one of the merged directories; write the merge somewhere else")
    if (out / "results.json").is_file() and "sources" not in json.loads((out / "results.json").read_text()):
        raise ConfigError(f"{out} holds the results of a reproduction, not of a merge; refusing to overwrite them")
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(merged, indent=1))
    return rebuild(out)


def _paper_json(dataset: str) -> dict[str, Any]:
    return {m: {t: {str(e): v for e, v in d.items()} for t, d in tasks.items()} for m, tasks in PAPER[dataset].items()}


def _pm(mu: float, sd: float, n: int) -> str:
    """``mean ± std`` over n seeds; a bare mean for one seed (a ± 0.0 would claim a spread nobody measured)."""
    return f"{mu:.1f} ± {sd:.1f}" if n > 1 else f"{mu:.1f}"


def _stats(curves: list[dict[str, dict[str, float]]], eta: float, key: str) -> tuple[float, float]:
    vals = [100.0 * c[str(eta)][key] for c in curves]
    return float(np.mean(vals)), float(np.std(vals))


def report(
    dataset: str,
    curves: dict[str, list[dict[str, dict[str, float]]]],
    etas: list[float],
    names: list[str],
    budget: dict[str, Any],
    extra: dict[str, Any],
    seconds: float,
) -> str:
    """Tables III/IV shape: one row per (task, η), one column per model, ``ours mean ± std (paper)`` in %.

    Example:
        >>> c = {"MTVIB": [{"0.0": {"left/accuracy": 0.9, "right/accuracy": 0.8, "joint_accuracy": 0.7}}]}
        >>> "| 90.0 (94.9) |" in report("multimnist", c, [0.0], ["left", "right"], {}, {}, 1.0)  # one seed: no ±
        True
        >>> two = {"MTVIB": c["MTVIB"] * 2}  # two equal seeds
        >>> "90.0 ± 0.0 (94.9)" in report("multimnist", two, [0.0], ["left", "right"], {}, {}, 1.0)
        True
    """
    table_no = {"multimnist": "III", "multifashion": "IV"}[dataset]
    models = [m for m in MODELS if curves.get(m)]
    paper = PAPER[dataset]
    lines = [
        f"## MTVIB Table {table_no} ({dataset}): test accuracy % under FGSM, ours mean ± std over seeds "
        f"(paper's number in parentheses)",
        "",
        "Budget: "
        + ", ".join(f"{k}={v}" for k, v in budget.items())
        + f"; wall time {seconds / 60:.1f} min. Paper: 120000/10000 images, 200 epochs, Adam 1e-4, batch 200.",
        "",
    ]
    if "gs" in extra:
        lines += [
            f"GS weights (left, right) chosen on validation: {extra['gs']['chosen']} from grid "
            f"{extra['gs']['grid']} (searched on seed {extra['gs']['searched_on_seed']}).",
            "",
        ]
    heads = [f"{m} (n={len(curves[m])})" for m in models]  # seeds per model
    lines += ["| task | η | " + " | ".join(heads) + " |", "|---|---|" + "---|" * len(models)]
    for i, n in enumerate(names):
        for eta in etas:
            cells = []
            for m in models:
                mu, sd = _stats(curves[m], eta, f"{n}/accuracy")
                p = paper.get(m, {}).get(n, {}).get(round(eta, 2))
                cells.append(_pm(mu, sd, len(curves[m])) + (f" ({p:.1f})" if p is not None else ""))
            lines.append(f"| {i + 1} ({n}) | {eta:.2f} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "### Joint accuracy % (both tasks right; MTVIB Fig. 5), mean ± std",
        "",
        "| η | " + " | ".join(heads) + " |",
        "|---|" + "---|" * len(models),
    ]
    for eta in etas:
        cells = [_pm(*_stats(curves[m], eta, "joint_accuracy"), len(curves[m])) for m in models]
        lines.append(f"| {eta:.2f} | " + " | ".join(cells) + " |")
    lines += ["", "### Decay from the smallest to the largest η (mean of the task accuracies), mean ± std", ""]
    if len(etas) > 1:
        lo, hi = min(etas), max(etas)
        for m in models:
            drops = [
                100 * np.mean([c[str(lo)][f"{n}/accuracy"] - c[str(hi)][f"{n}/accuracy"] for n in names])
                for c in curves[m]
            ]
            kept = [
                100
                * np.mean([c[str(hi)][f"{n}/accuracy"] for n in names])
                / max(1e-12, float(np.mean([c[str(lo)][f"{n}/accuracy"] for n in names])))
                for c in curves[m]
            ]
            n_seeds = len(drops)
            lines.append(
                f"- {m}: {_pm(np.mean(drops), np.std(drops), n_seeds)} points lost; "
                f"{_pm(np.mean(kept), np.std(kept), n_seeds)} % of the clean accuracy kept "
                f"(η {lo:g} → {hi:g}, {n_seeds} seed(s))"
            )
    return "\n".join(lines) + "\n"


def plot(
    curves: dict[str, list[dict[str, dict[str, float]]]], etas: list[float], names: list[str], out: Path, dataset: str
) -> None:
    """``accuracy_vs_eta.png`` (one panel per task) and ``joint_accuracy_vs_eta.png`` (Fig. 5), mean ± std bands."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [m for m in MODELS if curves.get(m)]

    def draw(ax, key: str, title: str) -> None:
        for m in models:
            st = np.array([_stats(curves[m], e, key) for e in etas])
            ax.plot(etas, st[:, 0], marker="o", label=m)
            ax.fill_between(etas, st[:, 0] - st[:, 1], st[:, 0] + st[:, 1], alpha=0.2)
        ax.set_xlabel("FGSM η")
        ax.set_ylabel("test accuracy %")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()

    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 4), squeeze=False)
    for ax, n in zip(axes[0], names, strict=True):  # one panel per task
        draw(ax, f"{n}/accuracy", f"{dataset}: task {n}")
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_eta.png", dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(5, 4))
    draw(ax, "joint_accuracy", f"{dataset}: joint accuracy (Fig. 5)")
    fig.tight_layout()
    fig.savefig(out / "joint_accuracy_vs_eta.png", dpi=120)
    plt.close(fig)


register_reproduction(
    Reproduction(
        name="mtvib",
        help="MTVIB paper, Tables III/IV + Fig. 5: STL, STVIB, GS, UWL, MTVIB under FGSM on MultiMNIST/MultiFashion",
        add_arguments=add_arguments,
        run=run,
    )
)
