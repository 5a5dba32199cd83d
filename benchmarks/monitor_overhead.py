"""What monitoring costs per training step at T = 10 (mtlkit.monitor; the target is < 5 % of the step).

Workload: the MultiMNIST HPS model of ``benchmarks/step_time.py`` (MTVIB Table I(b) conv encoder, T = 10 heads,
task t predicting the left digit for even t and the right one for odd t) on real MultiMNIST images, batch 256,
Adam. One step = forward, per-task losses, the engine's backward (``mtlkit.backward`` with the representation, as
the trainer calls it), optimizer step. A monitored step adds exactly what :class:`mtlkit.monitor.Monitor` does on a
logged step: the statistics from the engine's Gramian (or Jacobian), one JSON row appended to ``monitor.jsonl``,
the TensorBoard scalars (45 pairwise cosines included at T = 10) and the cosine-matrix image. Every step is logged
here (``log_every = 1``, the worst case; the default of 10 costs a tenth of it per step).

Steps with and without monitoring alternate in blocks (A/B interleaved, so that a slower phase of a shared machine
hits both), after warm-up; printed per method and level: the median step with and without monitoring, their
difference in %, and the monitoring part alone (timed inside the monitored steps) with its share of the unmonitored
step; on a shared machine the last two are the steadier numbers.

Usage (run it alone on the machine; concurrent torch processes distort timings several-fold):
    python benchmarks/monitor_overhead.py       # mgda and upgrad, both levels, 20 A/B blocks of 2 steps each
    python benchmarks/monitor_overhead.py --methods mgda --levels representation --blocks 4 --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from typing import Literal


def measure(
    method: str,
    level: Literal["parameter", "representation"],
    T: int,
    batch: int,
    blocks: int,
    per_block: int,
    warmup: int,
    threads: int,
) -> dict:
    import torch

    from mtlkit.data import build_dataset
    from mtlkit.engine.autodiff import backward, stack
    from mtlkit.methods import build_method
    from mtlkit.models import HPS, ConvEncoder, head
    from mtlkit.monitor import Monitor, gradient_stats
    from mtlkit.weighting import StepContext

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    data = build_dataset("multimnist", n_train=max(2 * batch, 1000), n_test=100)
    x = data.train.x[:batch]
    ys = [data.train.y["left" if t % 2 == 0 else "right"][:batch] for t in range(T)]
    enc = ConvEncoder((1, 36, 36))
    names = [f"t{t}" for t in range(T)]
    model = HPS(enc, {n: head(enc.out_features, 10) for n in names})
    m = build_method(method, level=level)
    m.weighting.setup(T)
    opt = torch.optim.Adam(list(model.parameters()) + list(m.weighting.parameters()), lr=1e-3)
    shared = model.shared_parameters()
    ce = torch.nn.functional.cross_entropy
    tmp = tempfile.TemporaryDirectory()
    monitor = Monitor(every=1, tensorboard=True)
    monitor.start(tmp.name, names)
    count = [0]
    monitor_s: list[float] = []  # the monitoring part alone, on monitored steps

    def step(monitored: bool) -> float:
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        z = model.encode(x)
        out = model.decode(z)
        losses = stack([ce(out[n], y) for n, y in zip(names, ys, strict=True)])
        weighted = m.weighting(losses, StepContext(step=count[0], shared_params=shared, task_names=names))
        info = backward(weighted, shared, m.aggregator, representation=z, level=m.level, task_names=names)
        if monitored:  # what Monitor.on_backward does on a logged step
            t1 = time.perf_counter()
            if info.gramian is not None:
                stats, source = gradient_stats(gramian=info.gramian, weights=info.weights), "gramian"
            else:
                stats, source = gradient_stats(jacobian=info.jacobian, update=info.update), "jacobian"
            monitor.record(
                step=count[0] + 1,
                epoch=1,
                lr=1e-3,
                losses=losses.detach(),
                stats=stats,
                source=source,
                level=m.level,
                agg_weight=info.weights,
            )
            monitor_s.append(time.perf_counter() - t1)
        opt.step()
        count[0] += 1
        return time.perf_counter() - t0

    for i in range(warmup):
        step(i % 2 == 1)
    on: list[float] = []
    off: list[float] = []
    for b in range(blocks):
        for monitored in (b % 2 == 0, b % 2 == 1):  # ABBA order: neither side always goes first
            times = [step(monitored) for _ in range(per_block)]
            (on if monitored else off).extend(times)
    monitor.close()
    tmp.cleanup()
    med_on, med_off = statistics.median(on), statistics.median(off)
    return {
        "method": method,
        "level": level,
        "monitor_ms": 1e3 * statistics.median(monitor_s),
        "off_ms": 1e3 * med_off,
        "on_ms": 1e3 * med_on,
        "overhead_pct": 100 * (med_on - med_off) / med_off,
        "steps": len(on) + len(off),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", default=["mgda", "upgrad"])
    p.add_argument(
        "--levels", nargs="+", default=["parameter", "representation"], choices=["parameter", "representation"]
    )
    p.add_argument("--tasks", type=int, default=10)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--blocks", type=int, default=20, help="A/B block pairs")
    p.add_argument("--per-block", type=int, default=2, help="steps per block")
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    from mtlkit.malloc import tune_cpu_allocator

    tune_cpu_allocator()  # as mtlkit commands do
    print(
        f"| method (T = {args.tasks}) | level | step without monitor (ms) | with (ms) | overhead "
        f"| monitoring alone (ms) | its share of the step |"
    )
    print("|---|---|---|---|---|---|---|")
    for method in args.methods:
        for level in args.levels:
            r = measure(method, level, args.tasks, args.batch, args.blocks, args.per_block, args.warmup, args.threads)
            print(
                f"| {r['method']} | {level} | {r['off_ms']:.1f} | {r['on_ms']:.1f} | {r['overhead_pct']:+.1f} % "
                f"| {r['monitor_ms']:.2f} | {100 * r['monitor_ms'] / r['off_ms']:.2f} % |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
