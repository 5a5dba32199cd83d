"""``mtlkit reproduce mamo``: MAMO's Tables 1-5 and Fig. 3, on the image benchmarks obtainable here.

Tan, Hu & Zhang, "MAMO: Multi-Task Architecture Learning via Multi-Objective and Gradients Mediative Kernel"
(ECAI 2024). The paper evaluates on Cityscapes (Table 1) and NYUv2 (Tables 2-5). **Neither is obtainable on these
machines** (see /work/shared/DATA.md): we run the same protocol on MultiMNIST, MultiFashion and Multi-(Fashion+MNIST)
(36x36, two classification tasks, accuracy per task), and print the paper's numbers beside ours for reference only —
they are on other datasets and are not comparable value by value. The model code (:mod:`mtlkit.models.mamo`) does
not depend on the dataset: a dense-prediction encoder/decoder can be plugged in as layers and heads.

What is run, per seed (every method on the same data, backbone and epochs):

* Trainer runs (:class:`mtlkit.train.Trainer`, HPS backbone): STL, HPS (EW), GradNorm, PCGrad, CAGrad, MGDA;
* Alg. 1 runs (:func:`mtlkit.mamo.learn_mamo`, ``pretrain_epochs + rounds * epochs_per_round`` epochs in total, the
  baselines' epoch count): MAMO (GMKs + MGDA), CoNAL-style (task-exclusive modules + linear scalarisation), w/o MO
  (GMKs + linear scalarisation), w/o GMK (task-exclusive modules + MGDA), MAMO+PCGrad, MAMO+CAGrad.

Δ is MAMO's Eq. 15 (**higher is better**: ``(1/K) Σ_k (−1)^{s_k} (M_k − STL_k)/STL_k × 100``, s_k = 1 for
lower-is-better metrics), over every task metric, against the *same seed's* STL; Win is the share of metrics on which
the method beats STL. Speed (Table 5) is STL's training wall time divided by the method's (both include the
per-epoch validation), on this shared CPU — indicative only.

Example:
    >>> "mamo" in PAPER and PAPER["mamo"]["table2_nyuv2"]["MAMO"]["delta"] == 3.00
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

from mtlkit.reproduce import Reproduction, register_reproduction

#: The paper's numbers (Tan, Hu & Zhang, ECAI 2024). Δ (Eq. 15, higher is better) and Win in %.
PAPER: dict[str, Any] = {"mamo": {
    # Table 1 (Cityscapes, 2 tasks, 4 metrics): Δ and Win.
    "table1_cityscapes": {
        "HPS": {"delta": -1.75, "win": 50}, "GradNorm": {"delta": -3.49, "win": 25},
        "PCGrad": {"delta": -0.31, "win": 50}, "CAGrad": {"delta": 0.42, "win": 75},
        "RotoGrad": {"delta": -2.10, "win": 25}, "MGDA": {"delta": -1.38, "win": 50},
        "MTL-NAS": {"delta": -6.84, "win": 25}, "CoNAL": {"delta": 2.21, "win": 75},
        "MAMO": {"delta": 2.57, "win": 100}},
    # Table 2 (NYUv2, 3 tasks, 9 metrics): Δ and Win.
    "table2_nyuv2": {
        "HPS": {"delta": -2.74, "win": 44}, "GradNorm": {"delta": -2.00, "win": 44},
        "PCGrad": {"delta": -2.25, "win": 22}, "CAGrad": {"delta": 0.25, "win": 44},
        "RotoGrad": {"delta": -1.22, "win": 33}, "MGDA": {"delta": -1.77, "win": 66},
        "MTL-NAS": {"delta": 0.66, "win": 22}, "CoNAL": {"delta": 2.18, "win": 88},
        "MAMO": {"delta": 3.00, "win": 100}},
    # Table 3: GMKs activated at detections 1..5.
    "table3": {"NYUv2": [7, 4, 2, 1, 1], "Cityscapes": [2, 1, 1, 1, 0]},
    # Table 4 (NYUv2): segmentation mIoU, depth Abs Err, normal Mean angle (a subset of its 9 columns).
    "table4_nyuv2": {"HPS": {"mIoU": 54.24, "AbsErr": 0.3886, "Mean": 23.34},
                     "MAMO": {"mIoU": 54.72, "AbsErr": 0.3801, "Mean": 21.83},
                     "w/o MO": {"mIoU": 54.06, "AbsErr": 0.3850, "Mean": 21.99},
                     "w/o GMK": {"mIoU": 53.47, "AbsErr": 0.3859, "Mean": 22.52}},
    # Table 5 (NYUv2): speed relative to STL and Δ.
    "table5_nyuv2": {"STL": {"speed": 1.0, "delta": 0.0}, "HPS": {"speed": 1.61, "delta": -2.74},
                     "CAGrad": {"speed": 0.73, "delta": 0.25}, "CoNAL": {"speed": 0.60, "delta": 2.18},
                     "MAMO": {"speed": 0.56, "delta": 3.00}},
}}

TRAINER_METHODS = {"STL": "stl", "HPS": "ew", "GradNorm": "gradnorm", "PCGrad": "pcgrad", "CAGrad": "cagrad",
                   "MGDA": "mgda"}
#: name -> (module kind, method) for Alg. 1 runs.
MAMO_VARIANTS = {"MAMO": ("gmk", "mgda"), "CoNAL-style": ("exclusive", "ew"), "w/o MO": ("gmk", "ew"),
                 "w/o GMK": ("exclusive", "mgda"), "MAMO+PCGrad": ("gmk", "pcgrad"), "MAMO+CAGrad": ("gmk", "cagrad")}
MAIN_ROWS = ["HPS", "GradNorm", "PCGrad", "CAGrad", "MGDA", "CoNAL-style", "MAMO"]
NOT_HERE = ("NYUv2 and Cityscapes (the paper's benchmarks) are not obtainable on this machine (no internet; not in "
            "any registry package): the tables below are on the 36x36 MultiMNIST-family images built from MNIST / "
            "Fashion-MNIST. The paper's numbers are printed for reference; they are on other data.")

FULL = {"n_train": 120_000, "n_test": 10_000, "pretrain_epochs": 10, "rounds": 5, "epochs_per_round": 6,
        "seeds": [0, 1, 2]}


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="multimnist", choices=["multimnist", "multifashion", "multifashionmnist"])
    p.add_argument("--full", action="store_true", help=f"the full budget: {FULL}")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--n-train", type=int, default=6000)
    p.add_argument("--n-test", type=int, default=2000)
    p.add_argument("--pretrain-epochs", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2, help="Z, the number of conflict detections")
    p.add_argument("--epochs-per-round", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--encoder", default="conv", choices=["conv", "mlp"])
    p.add_argument("--width", type=int, default=384)
    p.add_argument("--hidden", type=int, nargs="+", default=[512, 256])
    p.add_argument("--head-hidden", type=int, default=192)
    p.add_argument("--threshold", default="average", choices=["average", "topk"])
    p.add_argument("--k", type=int, default=1)
    p.add_argument("--scope", default="all_layers", choices=["all_layers", "per_layer"])
    p.add_argument("--detect-batches", type=int, default=20)
    p.add_argument("--methods", nargs="+", default=None,
                   help=f"subset of {list(TRAINER_METHODS) + list(MAMO_VARIANTS)} (STL is always run)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default="runs/reproduce-mamo")


def _metric_keys(tasks) -> list[tuple[str, bool]]:
    return [(f"{t.name}/{m}", bool(h)) for t in tasks for m, h in zip(t.metrics, t.higher_is_better)]


def relative(test: dict[str, float], stl: dict[str, float], keys: list[tuple[str, bool]]) -> dict[str, float]:
    """Per-metric relative change vs STL in %, signed so that + means better (Tables 1-2)."""
    out = {}
    for k, hib in keys:
        r = 100.0 * (test[k] - stl[k]) / stl[k]
        out[k] = r if hib else -r
    return out


def _pm(vals: list[float], fmt: str = "{:+.2f}") -> str:
    if not vals:
        return "—"
    a = np.asarray(vals, float)
    return (fmt.format(a.mean()) + (" ± " + fmt.format(a.std()).lstrip("+") if len(a) > 1 else ""))


def _run(args: argparse.Namespace) -> int:
    from mtlkit.config import RunConfig
    from mtlkit.data import build_dataset
    from mtlkit.mamo import MAMOConfig, learn_mamo
    from mtlkit.metrics import delta_m, win_rate
    from mtlkit.models.mamo import build_mamo
    from mtlkit.train import Trainer

    if args.full:
        for k, v in FULL.items():
            setattr(args, k, v)
    if args.threads:
        torch.set_num_threads(args.threads)
    wanted = set(args.methods or (list(TRAINER_METHODS) + list(MAMO_VARIANTS))) | {"STL"}
    unknown = wanted - set(TRAINER_METHODS) - set(MAMO_VARIANTS)
    if unknown:
        from mtlkit.errors import unknown_name

        raise unknown_name("method", sorted(unknown)[0], list(TRAINER_METHODS) + list(MAMO_VARIANTS))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    epochs = args.pretrain_epochs + args.rounds * args.epochs_per_round
    budget = (f"dataset {args.dataset}, n_train {args.n_train} (10% of it held out for validation), n_test "
              f"{args.n_test}, seeds {args.seeds}, {epochs} epochs for every method (MAMO: {args.pretrain_epochs} "
              f"pre-training + Z={args.rounds} rounds x {args.epochs_per_round}), batch {args.batch_size}, Adam lr "
              f"{args.lr}, encoder {args.encoder}"
              + (f" (width {args.width})" if args.encoder == "conv" else f" (hidden {args.hidden})")
              + f", indicator {args.threshold}" + (f" k={args.k}" if args.threshold == "topk" else "")
              + f", scope {args.scope}, Q over the last {args.detect_batches} mini-batches before each detection")
    print(f"[mamo] budget: {budget}", file=sys.stderr)
    print(f"[mamo] {NOT_HERE}", file=sys.stderr)
    data = build_dataset(args.dataset, n_train=args.n_train, n_test=args.n_test)
    keys = _metric_keys(data.tasks)
    model_opts = {"encoder": args.encoder, "width": args.width, "hidden": list(args.hidden),
                  "head_hidden": args.head_hidden}
    results: dict[str, dict[int, dict[str, Any]]] = {}
    for seed in args.seeds:
        for name, method in TRAINER_METHODS.items():
            if name not in wanted:
                continue
            cfg = RunConfig.from_dict({
                "dataset": {"name": args.dataset, "options": {"n_train": args.n_train, "n_test": args.n_test}},
                "model": {"name": "hps", "options": model_opts}, "method": {"name": method},
                "train": {"epochs": epochs, "batch_size": args.batch_size, "lr": args.lr, "seed": seed,
                          "progress": False, "device": "cpu"},
                "output": {"dir": str(out / "runs" / f"{name}-s{seed}"), "tensorboard": False, "overwrite": True}})
            t0 = time.time()
            r = Trainer(cfg, data=data).fit()
            params = json.loads((r.run_dir / "results.json").read_text())["parameters"]
            results.setdefault(name, {})[seed] = {"test": r.test, "seconds": r.seconds or time.time() - t0,
                                                  "parameters": params}
            print(f"[mamo] seed {seed} {name}: " + ", ".join(f"{k} {r.test[k]:.4f}" for k, _ in keys)
                  + f" ({r.seconds:.0f}s)", file=sys.stderr)
        for name, (module, method) in MAMO_VARIANTS.items():
            if name not in wanted:
                continue
            torch.manual_seed(seed)
            model = build_mamo(data, module=module, **model_opts)
            res = learn_mamo(model, data, MAMOConfig(
                method=method, rounds=args.rounds, pretrain_epochs=args.pretrain_epochs,
                epochs_per_round=args.epochs_per_round, threshold=args.threshold, k=args.k, scope=args.scope,
                detect_batches=args.detect_batches, batch_size=args.batch_size, lr=args.lr, seed=seed))
            results.setdefault(name, {})[seed] = {
                "test": res.test, "seconds": res.seconds, "parameters": res.rounds[-1].parameters,
                "rounds": [{"round": rr.round, "activated": [[l, list(g)] for l, g in rr.activated],
                            "parameters": rr.parameters, "test": rr.test, "Q": rr.Q} for rr in res.rounds],
                "architecture": [[l, list(g)] for l, g in model.architecture()]}
            print(f"[mamo] seed {seed} {name}: " + ", ".join(f"{k} {res.test[k]:.4f}" for k, _ in keys)
                  + f", modules {len(model.active)} ({res.seconds:.0f}s)", file=sys.stderr)
    # ---- derived numbers ----------------------------------------------------------------------------------------
    hib = [h for _, h in keys]
    for name, per_seed in results.items():
        for seed, r in per_seed.items():
            stl = results["STL"][seed]
            r["rel"] = relative(r["test"], stl["test"], keys)
            r["delta"] = delta_m([r["test"][k] for k, _ in keys], [stl["test"][k] for k, _ in keys], hib,
                                 convention="higher_is_better")
            r["win"] = win_rate([r["test"][k] for k, _ in keys], [stl["test"][k] for k, _ in keys], hib)
            r["speed"] = stl["seconds"] / r["seconds"]
            for rr in r.get("rounds", []):
                rr["delta"] = delta_m([rr["test"][k] for k, _ in keys], [stl["test"][k] for k, _ in keys], hib,
                                      convention="higher_is_better")
    (out / "results.json").write_text(json.dumps({"budget": budget, "args": vars(args), "results": {
        n: {str(s): v for s, v in ps.items()} for n, ps in results.items()}}, indent=1, default=str))
    md = _markdown(args, budget, results, keys)
    (out / "report.md").write_text(md)
    _plot(results, out / "delta_vs_size.png", args.dataset)
    print(md)
    print(f"[mamo] wrote {out / 'report.md'}, {out / 'results.json'}, {out / 'delta_vs_size.png'}", file=sys.stderr)
    return 0


def _col(results, name, field):
    return [r[field] for r in results.get(name, {}).values()]


def _markdown(args, budget: str, results, keys) -> str:
    P = PAPER["mamo"]
    L = [f"# MAMO reproduction on {args.dataset}", "", f"**Budget**: {budget}. Full budget: `--full` ({FULL}).", "",
         f"**Data**: {NOT_HERE}", "",
         "**Δ convention**: MAMO's Eq. 15, *higher is better* (+ = better than STL), over every task metric; Win = % "
         "of metrics better than STL. Mean ± std over seeds; each seed is compared with the same seed's STL.", ""]
    names = [k for k, _ in keys]
    L += ["## Tables 1-2 shape: relative change vs STL (%)", "",
          "| Method | " + " | ".join(names) + " | Δ ↑ | Win ↑ | params | paper Δ (Cityscapes / NYUv2) |",
          "|" + "---|" * (len(names) + 5)]
    stl = results["STL"]
    L.append("| STL (absolute) | " + " | ".join(_pm([r["test"][k] for r in stl.values()], "{:.4f}") for k in names)
             + f" | 0 | 0 | {int(np.mean(_col(results, 'STL', 'parameters')))} | 0 / 0 |")
    paper_name = {"CoNAL-style": "CoNAL"}
    for name in MAIN_ROWS:
        if name not in results:
            continue
        rs = results[name].values()
        pn = paper_name.get(name, name)
        pa = P["table1_cityscapes"].get(pn, {}).get("delta"), P["table2_nyuv2"].get(pn, {}).get("delta")
        L.append(f"| {name} | " + " | ".join(_pm([r["rel"][k] for r in rs]) for k in names)
                 + f" | {_pm([r['delta'] for r in rs])} | {_pm([r['win'] for r in rs], '{:.0f}')} | "
                 f"{int(np.mean([r['parameters'] for r in rs]))} | {pa[0]} / {pa[1]} |")
    if "MAMO" in results:
        best = max((n for n in MAIN_ROWS if n in results), key=lambda n: np.mean(_col(results, n, "delta")))
        wins = _col(results, "MAMO", "win")
        L += ["", f"Measured: best mean Δ: **{best}**; MAMO's win rate {_pm(wins, '{:.0f}')} % "
              f"({'100 % on every seed' if all(w == 100 for w in wins) else 'not 100 % on every seed'}).", ""]
    if "MAMO" in results or "w/o GMK" in results:
        L += ["## Table 3: modules activated per detection round", "",
              "| Method | seed | " + " | ".join(f"round {z}" for z in range(1, args.rounds + 1))
              + " | total | where (layer: tasks) |", "|" + "---|" * (args.rounds + 4)]
        for name in ("MAMO", "w/o MO", "w/o GMK", "CoNAL-style"):
            for seed, r in results.get(name, {}).items():
                counts = [len(rr["activated"]) for rr in r["rounds"][1:]]
                where = "; ".join(f"{l}: {'+'.join(g)}" for l, g in r["architecture"]) or "none"
                L.append(f"| {name} | {seed} | " + " | ".join(map(str, counts)) + f" | {sum(counts)} | {where} |")
        L += ["", f"Paper (GMKs at detections 1-5): NYUv2 {P['table3']['NYUv2']}, Cityscapes "
              f"{P['table3']['Cityscapes']}. GMK size = the mirrored layer's; w/o-GMK rows count two task-exclusive "
              "modules per conflicting pair.", "",
              "Δ after each round (MAMO-z, Fig. 4; round z has had pre-training + z rounds of epochs, so only the "
              "last round has the baselines' epoch count): " + ", ".join(
                  f"round {z} ({args.pretrain_epochs + z * args.epochs_per_round} ep): "
                  f"{_pm([r['rounds'][z]['delta'] for r in results['MAMO'].values()])}"
                  for z in range(args.rounds + 1)) if "MAMO" in results else "", ""]
    L += ["## Table 4: impact of MO and GMK", "",
          "| Method | " + " | ".join(names) + " | Δ ↑ | Win ↑ | paper (NYUv2) mIoU / AbsErr / Mean |",
          "|" + "---|" * (len(names) + 4)]
    for name in ("HPS", "MAMO", "w/o MO", "w/o GMK"):
        if name in results:
            rs = results[name].values()
            pp = P["table4_nyuv2"].get(name, {})
            L.append(f"| {name} | " + " | ".join(_pm([r["test"][k] for r in rs], "{:.4f}") for k in names)
                     + f" | {_pm([r['delta'] for r in rs])} | {_pm([r['win'] for r in rs], '{:.0f}')} | "
                     f"{pp.get('mIoU')} / {pp.get('AbsErr')} / {pp.get('Mean')} |")
    L += ["", "## Table 5: speed relative to STL (wall time of training incl. validation; shared CPU) and Δ", "",
          "| Method | speed ↑ | Δ ↑ | seconds | paper speed / Δ (NYUv2) |", "|---|---|---|---|---|"]
    for name in ["STL", "HPS", "CAGrad", "CoNAL-style", "MAMO"]:
        if name in results:
            rs = results[name].values()
            pp = P["table5_nyuv2"].get(paper_name.get(name, name), {})
            L.append(f"| {name} | {_pm([r['speed'] for r in rs], '{:.2f}')}x | {_pm([r['delta'] for r in rs])} | "
                     f"{_pm([r['seconds'] for r in rs], '{:.0f}')} | {pp.get('speed')}x / {pp.get('delta')} |")
    extra = [(a, b) for a, b in (("PCGrad", "MAMO+PCGrad"), ("CAGrad", "MAMO+CAGrad")) if a in results and b in results]
    if extra:
        L += ["", "## Sec. 4.4.3: MAMO integrated with PCGrad / CAGrad", "",
              "| Method | Δ ↑ | Win ↑ |", "|---|---|---|"]
        for a, b in extra:
            for n in (a, b):
                rs = results[n].values()
                L.append(f"| {n} | {_pm([r['delta'] for r in rs])} | {_pm([r['win'] for r in rs], '{:.0f}')} |")
    L += ["", "Fig. 3 analogue: `delta_vs_size.png` (Δ vs parameters; MAMO-z = after round z)."]
    return "\n".join(L) + "\n"


def _plot(results, path: Path, dataset: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for i, (name, rs) in enumerate(results.items()):
        if name == "STL" or not rs:
            continue
        x = np.mean([r["parameters"] for r in rs.values()]) / 1e6
        y = np.mean([r["delta"] for r in rs.values()])
        ax.scatter([x], [y], label=name, color=plt.cm.tab20(i % 20), marker="os^Dv<>p"[i % 8])
        ax.annotate(name, (x, y), fontsize=7)
    if "MAMO" in results:
        runs = list(results["MAMO"].values())
        rounds = runs[0]["rounds"]
        xs = [np.mean([r["rounds"][z]["parameters"] for r in runs]) / 1e6 for z in range(len(rounds))]
        ys = [np.mean([r["rounds"][z]["delta"] for r in runs]) for z in range(len(rounds))]
        ax.plot(xs, ys, "k--", lw=0.8, marker="x", label="MAMO-z (after round z)")
    stl = results.get("STL", {})
    if stl:
        ax.scatter([np.mean([r["parameters"] for r in stl.values()]) / 1e6], [0.0], marker="*", s=120, c="k",
                   label="STL")
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xlabel("parameters (millions)")
    ax.set_ylabel("Δ vs STL (%, Eq. 15, higher is better)")
    ax.set_title(f"MAMO Fig. 3 analogue on {dataset}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


register_reproduction(Reproduction(
    name="mamo", help="MAMO (ECAI 2024) Tables 1-5 and Fig. 3 on MultiMNIST / MultiFashion / Multi-(Fashion+MNIST)",
    add_arguments=_add_arguments, run=_run))
