"""Interleaved A/B step timing: mtlkit, EW and (where importable) LibMTL or torchjd on one model, in one process.

``step_time.py`` runs every configuration in its own process, which is right for peak memory but lets a busy machine
move one configuration and not the next. This script alternates the implementations step by step on the same model
and batch, so that whatever else runs on the machine slows them alike, and prints the median ms per step and the
ratios. Use it for "how much faster than X" on a machine that is not quiet.

Usage:
    PYTHONPATH=/path/to/LibMTL python benchmarks/ab_step.py --workload mlp --tasks 40 --method mgda --against libmtl
    python benchmarks/ab_step.py --workload conv --tasks 10 --method upgrad --against torchjd --threads 2
    python benchmarks/ab_step.py --workload mlp --tasks 40 --method mgda --against jacobian   # J-free vs J
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import step_time  # (the same model, data and LibMTL glue as the per-process benchmark)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", choices=["conv", "mlp"], default="mlp")
    p.add_argument("--tasks", type=int, default=40)
    p.add_argument("--method", default="mgda")
    p.add_argument("--level", choices=["parameter", "representation"], default="parameter")
    p.add_argument(
        "--against",
        choices=["libmtl", "torchjd", "jacobian", "none"],
        default="libmtl",
        help="jacobian: mtlkit forming the T x P matrix J (keep_jacobian=True) instead of the Gramian only",
    )
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--tune-malloc",
        action="store_true",
        help="raise glibc's malloc thresholds first, as mtlkit commands do (mtlkit.malloc)",
    )
    args = p.parse_args()
    if args.tune_malloc:
        step_time.tune_malloc()

    import torch

    from mtlkit.data import build_dataset
    from mtlkit.engine.autodiff import backward, stack
    from mtlkit.methods import build_method
    from mtlkit.models import HPS, ConvEncoder, MLPEncoder, head

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    T = args.tasks
    data = build_dataset("multimnist", n_train=max(2 * args.batch, 1000), n_test=100)
    x = data.train.x[: args.batch]
    ys = [data.train.y["left" if t % 2 == 0 else "right"][: args.batch] for t in range(T)]
    enc = ConvEncoder((1, 36, 36)) if args.workload == "conv" else MLPEncoder((1, 36, 36), (1024, 1024, 1024))
    model = HPS(enc, {f"t{t}": head(enc.out_features, 10) for t in range(T)})
    names = [f"t{t}" for t in range(T)]
    ce = torch.nn.functional.cross_entropy
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    method = build_method(args.method, level=args.level)
    shared = model.shared_parameters()

    def losses(z):
        out = model.decode(z)
        return stack([ce(out[n], ys[t]) for t, n in enumerate(names)]), [ce(out[n], ys[t]) for t, n in enumerate(names)]

    def ew() -> None:
        opt.zero_grad(set_to_none=True)
        losses(model.encode(x))[0].sum().backward()
        opt.step()

    def ours() -> None:
        z = model.encode(x)
        opt.zero_grad(set_to_none=True)
        backward(losses(z)[0], shared, method.aggregator, representation=z, level=method.level)
        opt.step()

    steps = {"ew": ew, "mtlkit": ours}
    if args.against == "jacobian":

        def theirs() -> None:
            z = model.encode(x)
            opt.zero_grad(set_to_none=True)
            backward(losses(z)[0], shared, method.aggregator, representation=z, level=method.level, keep_jacobian=True)
            opt.step()

        steps["jacobian"] = theirs
    elif args.against == "libmtl":
        lib = step_time._libmtl_weighting(args.method, args.level, model, names)
        if isinstance(lib, dict):
            raise SystemExit(f"LibMTL: {lib['skipped']}")

        def theirs() -> None:
            step_time._libmtl_step(lib, model, model.encode(x), x, ys, names, ce, opt)
            opt.step()

        steps["libmtl"] = theirs
    elif args.against == "torchjd":
        from torchjd import aggregation as A
        from torchjd import autojac

        agg = {"mgda": A.MGDA, "upgrad": A.UPGrad, "pcgrad": A.PCGrad, "dualproj": A.DualProj, "imtl_g": A.IMTLG}
        if args.method not in agg:
            raise SystemExit(f"no torchjd counterpart wired for {args.method}")
        tj_agg = agg[args.method]()

        def theirs() -> None:
            z = model.encode(x)
            opt.zero_grad(set_to_none=True)
            autojac.mtl_backward(losses(z)[1], features=z, shared_params=shared)
            autojac.jac_to_grad(shared, tj_agg)
            opt.step()

        steps["torchjd"] = theirs

    for f in steps.values():  # warm-up
        f()
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(args.steps):
        for k, f in steps.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    med = {k: 1000 * statistics.median(v) for k, v in times.items()}
    print(f"{args.workload} T={T} {args.method} {args.level}, {args.threads} thread(s), median of {args.steps}:")
    for k, v in med.items():
        print(f"  {k:8s} {v:9.1f} ms  x{v / med['ew']:6.2f} EW")
    if len(med) == 3:
        other = next(k for k in med if k not in ("ew", "mtlkit"))
        print(f"  {other} / mtlkit = {med[other] / med['mtlkit']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
