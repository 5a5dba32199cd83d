"""Step time of EW, a plain loop of T backward passes and the exact aggregators on the QM9 MPNN (T = 11).

Workload: Gilmer's MPNN as the QM9 papers run it (:mod:`mtlkit.models.mpnn`: edge network Linear(5, 128) - ReLU -
Linear(128, hidden²), 3 tied NNConv + GRU steps, Set2Set, Linear(2·hidden, hidden); one Linear(hidden, 1) head per
target) on one fixed batch of ``--batch`` QM9 molecules (complete graphs with distances, collated once and moved to
the device before timing: the collation is not in the step), the 11 targets standardised, MSE losses, Adam.

Rows (``impl``):

* ``ew`` / ``sum``: one backward of the summed loss (the floor);
* ``loop``: the same update as EW computed as 11 backward passes, task t's through its own head and the encoder
  (``retain_graph``): the time floor of any exact parameter-level method that back-propagates each task;
* ``mgda``, ``upgrad``, ``nash_mtl``, ``cagrad``, ``pcgrad`` at parameter level and ``mgda``, ``upgrad`` at
  representation level, through :func:`mtlkit.engine.backward` exactly as :class:`mtlkit.train.Trainer` calls it
  (``representation=z``, the method's level, ``--mode``).

Each step is forward, losses, backward and the optimizer step (``torch.cuda.synchronize`` before each clock reading
on a GPU); ``--warmup`` steps are dropped, then the median of ``--steps`` steps is reported, with the peak GPU memory
of the timed steps (``torch.cuda.max_memory_allocated``, reset per row; not measured on CPU). Every row starts from
the same initial weights (seed 0) in the one process.

**What the Gramian path covers here.** At parameter level, a Gramian-based method (all five above) does not hold the
11 x P matrix J: :class:`mtlkit.engine.gramian.EncoderGramian` forms ``G = J Jᵀ`` from the per-task output gradients
Δ_t and the input X of every *recognised* linear layer (an ``addmm``/``mm`` node on a shared weight whose input has
fewer rows than columns, B < in), and gives every other shared parameter explicit rows of J. In the MPNN only the
final ``Linear(2·hidden, hidden)`` (``encoder.lin1``, input: one row per molecule, 120 < 128) qualifies: 8,256 of
the 616,960 shared parameters at hidden 64 (1.3 %). The rest gets explicit rows:

* the edge network's two linear layers read one row per *edge* (about 37,000 for 120 molecules, far more than their
  5 and 128 inputs): ``X Xᵀ`` would be E x E, so they are not sites (Linear(128, 4096) alone is 524,288 parameters,
  85 % of the encoder);
* ``lin0`` and NNConv's root weight ``conv.lin`` read one row per atom (about 2,100 > 11 or 64 inputs): not sites;
* the GRU and Set2Set's LSTM are fused recurrent kernels (no ``addmm`` node in the autograd graph) and NNConv's bias
  is a plain addition: explicit rows.

So on this model the Gramian path should cost about what the plain loop costs (by construction, not a
measurement: one backward of the encoder per task, weight gradients included, since 98.7 % of the parameters need
them) plus a T x 608,704 buffer of explicit rows (25.5 MiB in float32 at T = 11) and the T x T product
``J_e J_eᵀ``; the update ``wᵀ J`` needs no further backward pass. It saves holding lin1's rows only.
Representation level (MGDA-UB) aggregates the 11 gradients w.r.t. z (120 x hidden each) and back-propagates the
encoder once: expected near EW's cost whatever T.

The table also reports the numbers behind this paragraph for the model actually timed (sites found, parameters
covered), computed with :func:`mtlkit.engine.gramian.linear_sites` on the timed batch.

Usage (the dataset subset is built with RDKit from the cached ``qm9.npz``: ``mtlkit data fetch qm9`` first):
    python benchmarks/step_time_gnn.py --device cuda                 # hidden 64, batch 120, 10 timed steps
    python benchmarks/step_time_gnn.py --device cuda --mode loop     # on a GPU, auto means batched (vmap over tasks)
    python benchmarks/step_time_gnn.py --steps 2 --warmup 1 --hidden 8 --batch 16 --device cpu   # smoke test
Writes ``benchmarks/results/step_time_gnn.json`` and ``.md`` (``--out`` to change the stem).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Literal

Level = Literal["parameter", "representation"]

#: (method, level): the rows timed after EW and the loop floor.
AGGREGATORS: tuple[tuple[str, Level], ...] = (
    ("mgda", "parameter"),
    ("upgrad", "parameter"),
    ("nash_mtl", "parameter"),
    ("cagrad", "parameter"),
    ("pcgrad", "parameter"),
    ("mgda", "representation"),
    ("upgrad", "representation"),
)


def _device(name: str) -> Any:
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: CUDA is not available here")
    return dev


def build_batch(batch: int, seed: int) -> tuple[Any, Any, dict[str, Any]]:
    """A QM9 subset just large enough for one training batch of ``batch`` molecules (built with RDKit, a few
    seconds), the first ``batch`` training molecules as inputs, and their standardised targets."""
    import torch

    from mtlkit.data import build_dataset

    # a handful of spare molecules: a few of any random subset are dropped (geometry that does not match the SMILES)
    data = build_dataset("qm9", n_molecules=batch + 40, n_val=10, n_test=10, seed=seed)
    if len(data.train) < batch:
        raise SystemExit(f"only {len(data.train)} training molecules in the subset; lower --batch")
    idx = torch.arange(batch)
    return data, data.train.x[idx], {t.name: data.train.y[t.name][idx] for t in data.tasks}


def gramian_coverage(model: Any, x: Any) -> dict[str, Any]:
    """Which shared parameters the parameter-level Gramian path covers without explicit rows (its linear sites)."""
    from mtlkit.engine.gramian import linear_sites

    shared = model.shared_parameters()
    names = {id(p): n for n, p in model.encoder.named_parameters()}
    z = model.encode(x)
    sites = linear_sites(z, shared)
    covered = [p for s in sites for p in (s.weight, s.bias) if p is not None]
    total = sum(p.numel() for p in shared)
    n_cov = sum(p.numel() for p in covered)
    in_site = {id(p) for p in covered}
    explicit = [names[id(p)].rsplit(".", 1)[0] if "." in names[id(p)] else names[id(p)] for p in shared]
    return {
        "sites": [f"encoder.{names[id(s.weight)].rsplit('.', 1)[0]} (input {tuple(s.x.shape)})" for s in sites],
        "explicit_modules": list(
            dict.fromkeys(f"encoder.{m}" for m, p in zip(explicit, shared, strict=True) if id(p) not in in_site)
        ),
        "shared_parameters": total,
        "covered_parameters": n_cov,
        "explicit_parameters": total - n_cov,
        "explicit_rows_mib_float32": 4 * (total - n_cov) * len(model.heads) / 2**20,
    }


def time_one(
    method: str,
    level: Level,
    impl: str,
    data: Any,
    x: Any,
    ys: dict[str, Any],
    hidden: int,
    steps: int,
    warmup: int,
    mode: str,
    device: Any,
) -> dict[str, Any]:
    """Median ms per training step (and peak GPU memory) of one (method, level, impl) row."""
    import torch
    import torch.nn.functional as F

    from mtlkit.engine.autodiff import backward, stack
    from mtlkit.methods import build_method
    from mtlkit.models import build_model
    from mtlkit.weighting import StepContext

    torch.manual_seed(0)
    model = build_model("mpnn", data, dim=hidden).to(device)
    m = build_method(method, level=level)
    names = [t.name for t in data.tasks]
    T = len(names)
    m.weighting.setup(T)
    opt = torch.optim.Adam(list(model.parameters()) + list(m.weighting.parameters()), lr=1e-3)
    shared = model.shared_parameters()
    cuda = device.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    times: list[float] = []
    for i in range(warmup + steps):
        if cuda and i == warmup:
            torch.cuda.reset_peak_memory_stats(device)
        sync()
        t0 = time.perf_counter()
        z = model.encode(x)
        out = model.decode(z)
        loss_list = [F.mse_loss(out[n].reshape(ys[n].shape), ys[n]) for n in names]
        opt.zero_grad(set_to_none=True)
        if impl == "loop":  # T backward passes, task t's through its head and the encoder
            for t, loss in enumerate(loss_list):
                loss.backward(retain_graph=t < T - 1)
        else:
            ctx = StepContext(
                step=i, epoch=0, shared_params=shared, last_shared_layer=model.last_shared_layer(), task_names=names
            )
            weighted = m.weighting(stack(loss_list), ctx)
            need_z = m.aggregator.needs_per_task_grads
            backward(
                weighted,
                shared,
                m.aggregator,
                representation=z if need_z else None,
                level=m.level,
                mode=mode,  # type: ignore[arg-type]
                task_names=names,
            )
        opt.step()
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    row: dict[str, Any] = {"ms": 1000 * statistics.median(times), "ms_min": 1000 * min(times)}
    if cuda:
        row["peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return row


def to_markdown(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    cov = meta["gramian_coverage"]
    peak = any("peak_mb" in r for r in rows)
    lines = [
        f"# Step time on the QM9 MPNN, T = {meta['tasks']}",
        "",
        f"Device {meta['device']}, torch {meta['torch']}, engine mode {meta['mode']}; MPNN hidden {meta['hidden']} "
        f"({cov['shared_parameters']:,} shared parameters), one batch of {meta['batch']} molecules "
        f"({meta['nodes']:,} atoms, {meta['edges']:,} directed edges of the complete graphs); median of "
        f"{meta['steps']} steps after {meta['warmup']} warm-up steps (forward, losses, backward, Adam step).",
        "",
        "| method | level | impl | ms/step | × EW | min ms |" + (" peak GPU MB |" if peak else ""),
        "|---|---|---|---|---|---|" + ("---|" if peak else ""),
    ]
    for r in rows:
        if "ms" not in r:
            lines.append(f"| {r['method']} | {r['level']} | {r['impl']} | {r['error']} | | |" + (" |" if peak else ""))
            continue
        lines.append(
            f"| {r['method']} | {r['level']} | {r['impl']} | {r['ms']:.1f} | {r.get('ratio', 1.0):.2f} | "
            f"{r['ms_min']:.1f} |" + (f" {r['peak_mb']:.0f} |" if peak else "")
        )
    lines += [
        "",
        f"Gramian path at parameter level: linear sites {', '.join(cov['sites']) or 'none'}, covering "
        f"{cov['covered_parameters']:,} of {cov['shared_parameters']:,} shared parameters "
        f"({100 * cov['covered_parameters'] / cov['shared_parameters']:.1f} %); the other "
        f"{cov['explicit_parameters']:,} ({', '.join(cov['explicit_modules'])}) get "
        f"explicit rows of J ({cov['explicit_rows_mib_float32']:.1f} MiB in float32), so each task still runs a full "
        f"backward of the encoder with its weight gradients (compare the parameter-level rows with the loop "
        f"row; representation level back-propagates the encoder once). See the docstring of "
        f"benchmarks/step_time_gnn.py.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=10, help="timed steps per row (the median is reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before them")
    p.add_argument("--hidden", type=int, default=64, help="MPNN width (the papers': 64)")
    p.add_argument("--batch", type=int, default=120, help="molecules per batch (the papers': 120)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--mode", default="auto", choices=["auto", "loop", "batched"], help="engine per-task mode")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0, help="seed of the QM9 subset")
    p.add_argument("--out", default="benchmarks/results/step_time_gnn", help="output stem (.json and .md)")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.hidden < 1 or args.batch < 1:
        raise SystemExit("--steps, --hidden and --batch must be >= 1 and --warmup >= 0")

    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = _device(args.device)
    data, x_cpu, ys_cpu = build_batch(args.batch, args.seed)
    x = x_cpu.to(device)
    ys = {k: v.to(device) for k, v in ys_cpu.items()}
    from mtlkit.models import build_model

    torch.manual_seed(0)
    coverage = gramian_coverage(build_model("mpnn", data, dim=args.hidden).to(device), x)
    meta = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "mode": args.mode,
        "hidden": args.hidden,
        "batch": args.batch,
        "tasks": len(data.tasks),
        "nodes": int(x.x.shape[0]),
        "edges": int(x.edge_index.shape[1]),
        "steps": args.steps,
        "warmup": args.warmup,
        "gramian_coverage": coverage,
    }
    plan: list[tuple[str, Level, str]] = [("ew", "parameter", "sum"), ("ew", "parameter", "loop")]
    plan += [(m, lv, "engine") for m, lv in AGGREGATORS]
    rows: list[dict[str, Any]] = []
    base: float | None = None
    for method, level, impl in plan:
        spec = {"method": method, "level": level, "impl": impl}
        try:
            res = time_one(method, level, impl, data, x, ys, args.hidden, args.steps, args.warmup, args.mode, device)
        except Exception as e:  # one failing row is reported in the table, the others still run
            res = {"error": f"{type(e).__name__}: {e}".splitlines()[0][:200]}
        if impl == "sum" and "ms" in res:
            base = res["ms"]
        if base and "ms" in res:
            res["ratio"] = res["ms"] / base
        rows.append({**spec, **res})
        print(
            f"{method:9s} {level:14s} {impl:6s} "
            + (f"{res['ms']:9.1f} ms  x{res.get('ratio', 1.0):5.2f}" if "ms" in res else res["error"]),
            flush=True,
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    text = to_markdown(meta, rows)
    out.with_suffix(".md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
