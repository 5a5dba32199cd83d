"""Step time and peak memory of every method against EW (one backward of the summed loss, the floor).

Workloads (batch 256, 2 threads by default):
  * ``conv``: the MultiMNIST HPS model (MTVIB Table I(b) encoder + heads) on real MultiMNIST images, T = 2, 4, 10
    tasks (extra heads; task t predicts the left item for even t, the right item for odd t);
  * ``mlp``: an MLP encoder 3 x 1024 on the flattened images, T = 4 and 40.
Each (workload, T, method, level) runs in a fresh subprocess: median ms per training step (forward, per-task losses,
method, optimizer step) over ``--steps`` steps after ``--warmup`` steps, and peak resident memory (ru_maxrss) minus the
resident memory of the same process after building the model and moving one batch (so the number is the training
step's own memory). torchjd's implementation of the same method is timed beside ours where torchjd is importable.
``--retained-floor`` adds EW with ``retain_graph=True`` (impl ``retained``): a backward that cannot free the forward
graph as it goes, which every per-task pass but the last must do, so its peak is the floor of any exact
parameter-level method that backpropagates the same graph T times (LibMTL's and torchjd's included).
``--loop-floor`` adds EW computed as a plain loop of T backward passes (impl ``loop``), each through one task's head
and the encoder: the time floor that exact parameter-level methods are held to (about 1 + 0.5·T x EW on conv).

Usage:
    python benchmarks/step_time.py                      # everything (long on 2 cores)
    python benchmarks/step_time.py --workloads conv --tasks 2 4 --methods ew mgda pcgrad
    python benchmarks/step_time.py --out benchmarks/results/step_time.md
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

TASKS = {"conv": [2, 4, 10], "mlp": [4, 40]}


def all_methods() -> list[str]:
    """The methods timed without ``--methods``: the registry's benchmark list (:func:`mtlkit.methods.zoo_methods`:
    every registered method but those registered with ``zoo=False``) without STL, which trains one model per task
    (there is no shared step to time)."""
    from mtlkit.methods import method_parts, zoo_methods

    return [m for m in zoo_methods() if not method_parts(m)[2]]


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def run_one(
    workload: str, T: int, method: str, level: str, impl: str, steps: int, warmup: int, batch: int, threads: int
) -> dict:
    import torch

    from mtlkit.data import build_dataset
    from mtlkit.engine.autodiff import backward, stack
    from mtlkit.methods import build_method
    from mtlkit.models import HPS, ConvEncoder, MLPEncoder, head
    from mtlkit.weighting import StepContext

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    data = build_dataset("multimnist", n_train=max(2 * batch, 1000), n_test=100)
    x = data.train.x[:batch]
    ys = [data.train.y["left" if t % 2 == 0 else "right"][:batch] for t in range(T)]
    enc = ConvEncoder((1, 36, 36)) if workload == "conv" else MLPEncoder((1, 36, 36), (1024, 1024, 1024))
    model = HPS(enc, {f"t{t}": head(enc.out_features, 10) for t in range(T)})
    m = build_method(method, level=level)
    m.weighting.setup(T)
    params = list(model.parameters()) + list(m.weighting.parameters())
    opt = torch.optim.Adam(params, lr=1e-3)
    shared = model.shared_parameters()
    ce = torch.nn.functional.cross_entropy
    names = [f"t{t}" for t in range(T)]
    tj = None
    if impl == "torchjd":
        from torchjd import aggregation as A
        from torchjd import autojac

        tj_aggs = {
            "mgda": A.MGDA,
            "upgrad": A.UPGrad,
            "pcgrad": A.PCGrad,
            "dualproj": A.DualProj,
            "imtl_g": A.IMTLG,
            "cagrad": getattr(A, "CAGrad", None),
            "nash_mtl": getattr(A, "NashMTL", None),
            "aligned_mtl": getattr(A, "AlignedMTL", None),
            "graddrop": getattr(A, "GradDrop", None),
            "ew": A.Sum,
        }
        if tj_aggs.get(method) is None:
            return {"skipped": f"torchjd has no {method}"}
        agg = (
            tj_aggs[method](0.5)
            if method == "cagrad"
            else (tj_aggs[method](n_tasks=T) if method == "nash_mtl" else tj_aggs[method]())
        )
        tj = (autojac, agg)
    lib = _libmtl_weighting(method, level, model, names) if impl == "libmtl" else None
    if isinstance(lib, dict):
        return lib
    base_rss = _current_rss_mb()
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        need_rep = m.aggregator.needs_per_task_grads
        z = model.encode(x)
        if lib is not None:  # LibMTL runs its own heads and loss vector
            _libmtl_step(lib, model, z, x, ys, names, ce, opt)
            opt.step()
            if i >= warmup:
                times.append(time.perf_counter() - t0)
            continue
        out = model.decode(z)
        loss_list = [ce(out[n], ys[t]) for t, n in enumerate(names)]
        losses = stack(loss_list)
        opt.zero_grad(set_to_none=True)
        if tj is not None:
            tj[0].mtl_backward(loss_list, features=z, shared_params=shared)
            tj[0].jac_to_grad(shared, tj[1])
        elif impl == "retained":  # EW, but the backward keeps its graph: what any second pass over it must hold
            losses.sum().backward(retain_graph=True)
        elif impl == "loop":  # the plain-loop floor: T backward passes, task t's through its head and the encoder
            for t, loss in enumerate(loss_list):
                loss.backward(retain_graph=t < T - 1)
        else:
            ctx = StepContext(
                step=i, epoch=0, shared_params=shared, last_shared_layer=model.last_shared_layer(), task_names=names
            )
            weighted = m.weighting(losses, ctx)
            backward(weighted, shared, m.aggregator, representation=z if need_rep else None, level=m.level)
        opt.step()
        if m.weighting.needs_loss_after_step and tj is None:
            with torch.no_grad():
                out = model(x)
                m.weighting.after_step(torch.stack([ce(out[n], ys[t]) for t, n in enumerate(names)]))
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return {"ms": 1000 * statistics.median(times), "peak_mb": _rss_mb() - base_rss}


LIBMTL_NAMES = {
    "ew": ("EW", {}),
    "mgda": ("MGDA", {"mgda_gn": "none"}),
    "pcgrad": ("PCGrad", {}),
    "cagrad": ("CAGrad", {"calpha": 0.5, "rescale": 1}),
    "upgrad": ("UPGrad", {}),
}


def _libmtl_weighting(method: str, level: str, model, names: list[str]):
    """LibMTL's own weighting class for ``method``, wired to our model the way its Trainer and AbsArchitecture do.

    Only the glue is ours: the per-task gradients, the aggregation and the write-back are LibMTL's code
    (``AbsWeighting._compute_grad`` etc.). Shared-parameter gradients are zeroed with ``set_to_none=False``, the
    semantics LibMTL was written for (torch < 2 defaults), without which its ``_reset_grad`` fails on torch 2.
    """
    import importlib

    import torch

    if method not in LIBMTL_NAMES:
        return {"skipped": f"no LibMTL counterpart wired for {method}"}
    cls_name, kwargs = LIBMTL_NAMES[method]
    try:
        cls = getattr(importlib.import_module(f"LibMTL.weighting.{cls_name}"), cls_name)
    except Exception as e:  # any failure: report why LibMTL is unusable here
        return {"skipped": f"LibMTL not importable: {type(e).__name__}: {e}"}

    class Adapter(cls):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            super().__init__()
            self.task_num, self.task_name, self.device = len(names), list(names), torch.device("cpu")
            self.rep_grad = level == "representation"
            self.rep_tasks, self.rep = {}, {}
            self.kwargs = kwargs
            self.init_param()

        def get_share_params(self):
            return model.encoder.parameters()

        def zero_grad_share_params(self) -> None:
            model.encoder.zero_grad(set_to_none=False)

    return Adapter()


def _libmtl_step(lib, model, z, x, ys, names, ce, opt) -> None:
    """One LibMTL training step: AbsArchitecture.forward, Trainer._compute_loss, model.backward."""
    import torch

    out = {}
    for name in names:  # AbsArchitecture._prepare_rep: each head reads a detached copy of z when rep_grad
        if lib.rep_grad:
            lib.rep = z
            lib.rep_tasks[name] = z.detach().clone().requires_grad_(True)
            out[name] = model.heads[name](lib.rep_tasks[name])
        else:
            out[name] = model.heads[name](z)
    train_losses = torch.zeros(len(names))  # Trainer._compute_loss builds the loss vector by slice assignment
    for tn, name in enumerate(names):
        train_losses[tn] = ce(out[name], ys[tn])
    opt.zero_grad(set_to_none=False)
    lib.backward(train_losses, **lib.kwargs)


def _aggregates(method: str) -> bool:
    from mtlkit.methods import build_method

    return build_method(method).aggregator.needs_per_task_grads


def tune_malloc() -> None:
    """``--tune-malloc``: glibc's malloc thresholds as ``mtlkit`` commands set them; an error where they cannot be."""
    from mtlkit.malloc import tune_cpu_allocator

    if not tune_cpu_allocator():
        raise SystemExit("--tune-malloc: not applied (not glibc, or MALLOC_* / GLIBC_TUNABLES already set)")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workloads", nargs="+", default=["conv", "mlp"], choices=["conv", "mlp"])
    p.add_argument("--tasks", nargs="+", type=int, help="override the T values of every workload")
    p.add_argument(
        "--methods",
        nargs="+",
        default=None,
        help="method names (default: every registered method a benchmark trains, see all_methods)",
    )
    p.add_argument("--levels", nargs="+", default=["parameter", "representation"])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--torchjd", action="store_true", help="also time torchjd's implementation (if importable)")
    p.add_argument(
        "--libmtl",
        action="store_true",
        help="also time LibMTL's implementation (GitHub version, if importable: put it on PYTHONPATH)",
    )
    p.add_argument(
        "--retained-floor",
        action="store_true",
        help="also measure EW with retain_graph=True: one backward that frees nothing, the memory floor "
        "of any method that runs more than one backward pass over the same forward graph",
    )
    p.add_argument(
        "--loop-floor",
        action="store_true",
        help="also measure EW as a plain loop of T backward passes (impl 'loop'), the time floor that "
        "exact parameter-level methods are held to",
    )
    p.add_argument("--out", help="write the markdown table here (and a .json beside it)")
    p.add_argument(
        "--tune-malloc",
        action="store_true",
        help="raise glibc's malloc thresholds in each subprocess, as mtlkit commands do (mtlkit.malloc)",
    )
    p.add_argument("--_one", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._one:
        spec = json.loads(args._one)
        if spec.pop("tune_malloc", False):
            tune_malloc()
        print(json.dumps(run_one(**spec)))
        return 0
    rows = []
    methods = args.methods or all_methods()
    for wl in args.workloads:
        for T in args.tasks or TASKS[wl]:
            base = None
            for method in ["ew"] + [m for m in methods if m != "ew"]:
                for level in args.levels:
                    impls = ["mtlkit"] + (["torchjd"] if args.torchjd else []) + (["libmtl"] if args.libmtl else [])
                    if method == "ew" and args.retained_floor and level == "parameter":
                        impls.append("retained")
                    if method == "ew" and args.loop_floor and level == "parameter":
                        impls.append("loop")
                    for impl in impls:
                        if level == "representation" and not _aggregates(method):
                            continue  # loss-space methods ignore the level
                        spec = {
                            "workload": wl,
                            "T": T,
                            "method": method,
                            "level": level,
                            "impl": impl,
                            "steps": args.steps,
                            "warmup": args.warmup,
                            "batch": args.batch,
                            "threads": args.threads,
                        }
                        one = {**spec, "tune_malloc": True} if args.tune_malloc else spec
                        proc = subprocess.run(
                            [sys.executable, __file__, "--_one", json.dumps(one)], capture_output=True, text=True
                        )
                        if proc.returncode != 0:
                            res = {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr else "failed"}
                        else:
                            res = json.loads(proc.stdout.strip().splitlines()[-1])
                        if method == "ew" and impl == "mtlkit":
                            base = res
                        row = {**spec, **res}
                        if base and "ms" in res:
                            row["ratio"] = res["ms"] / base["ms"]
                            row["mem_ratio"] = res["peak_mb"] / max(base["peak_mb"], 1.0)
                        rows.append(row)
                        msg = f"{wl} T={T} {method:12s} {level:14s} {impl:8s} " + (
                            f"{res['ms']:8.1f} ms  x{row.get('ratio', 1):5.2f}  peak +{res['peak_mb']:7.1f} MB"
                            if "ms" in res
                            else str(res)
                        )
                        print(msg, flush=True)
    lines = [
        "| workload | T | method | level | impl | ms/step | × EW | peak MB | mem × EW |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "ms" in r:
            lines.append(
                f"| {r['workload']} | {r['T']} | {r['method']} | {r['level']} | {r['impl']} | "
                f"{r['ms']:.1f} | {r.get('ratio', 1):.2f} | {r['peak_mb']:.0f} | "
                f"{r.get('mem_ratio', 1):.2f} |"
            )
        else:
            lines.append(
                f"| {r['workload']} | {r['T']} | {r['method']} | {r['level']} | {r['impl']} | "
                f"{r.get('error') or r.get('skipped')} | | | |"
            )
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(table + "\n")
        Path(args.out).with_suffix(".json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
