"""Data-parallel training on this machine: throughput of 1 process x 2 threads against 2 processes x 1 thread on the
default job, and the numbers all-reduced per step at parameter level vs representation level for T = 2, 10, 40.

Run it alone on the machine (timings):

    python benchmarks/ddp_throughput.py --out benchmarks/results/ddp_throughput

* Throughput: ``mtlkit train`` on the default job (MultiMNIST, HPS conv encoder; EW and MGDA), ``--n-train`` images,
  one epoch, in 1 process with ``train.num_threads=2`` and with ``--nproc 2`` (one thread each); samples/s from the
  run's training time (results.json ``train_seconds``, which excludes start-up and evaluation).
* Volume: 2 processes (torchrun, gloo) train a few steps of the default model with T heads (T = 2, 10, 40: task t
  predicts the left digit for even t, the right one for odd t) for MGDA at parameter and at representation level
  and EW; a callback reads
  :attr:`mtlkit.distributed.DataParallel.traffic` after each step (numbers all-reduced / all-gathered per step and
  rank), beside the analytic count: parameter level ``T·K_shared + K_task`` (J, then the heads), representation level
  ``T² + K`` (the Gramian, then every gradient), EW ``K`` (plain DDP).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()


def _train(args: argparse.Namespace, method: str, nproc: int, run: Path) -> dict:
    cmd = [sys.executable, "-m", "mtlkit", "train", "--method", method, "--epochs", "1", "--run-dir", str(run)]
    cmd += ["--set", f"dataset.options.n_train={args.n_train}", "--set", "dataset.options.n_test=1000"]
    cmd += ["--set", "train.log_every=0", "--set", "output.tensorboard=false", "--no-progress", "--overwrite"]
    env = dict(os.environ)
    if nproc > 1:
        cmd += ["--nproc", str(nproc)]
        env["OMP_NUM_THREADS"] = "1"
    else:
        cmd += ["--set", "train.num_threads=2"]
    t0 = time.time()
    subprocess.run(cmd, check=True, env=env, capture_output=True, text=True)
    res = json.loads((run / "results.json").read_text())
    n = int(res["n_train"])
    return {
        "method": method,
        "processes": nproc,
        "threads_each": 2 if nproc == 1 else 1,
        "train_seconds": res["train_seconds"],
        "wall_seconds": time.time() - t0,
        "samples_per_s": n / res["train_seconds"],
        "test": res["test"],
    }


def _volume_worker(out: Path) -> None:
    """One rank of the volume measurement (launched by torchrun)."""
    import torch

    from mtlkit.callbacks import Callback
    from mtlkit.config import RunConfig
    from mtlkit.data import build_dataset
    from mtlkit.distributed import DataParallel
    from mtlkit.tasks import Task
    from mtlkit.train import Trainer

    torch.set_num_threads(1)
    dp = DataParallel.from_env("cpu")
    base = build_dataset("multimnist", n_train=600, n_test=100)

    class Meter(Callback):
        name = "traffic_meter"

        def __init__(self) -> None:
            self.rows: list[tuple[int, int]] = []
            self.last = (0, 0)

        def on_batch_end(self, trainer, step) -> None:
            t = trainer.dp.traffic
            self.rows.append((t.all_reduce - self.last[0], t.all_gather - self.last[1]))
            self.last = (t.all_reduce, t.all_gather)

    rows = []
    for T in (2, 10, 40):
        # T tasks on the MultiMNIST images: task t predicts the left digit for even t, the right one for odd t
        data = copy.copy(base)
        data.tasks = [Task(f"t{t}", "multiclass", 10, target="left" if t % 2 == 0 else "right") for t in range(T)]
        for method, level in (("ew", None), ("mgda", "parameter"), ("mgda", "representation")):
            cfg = RunConfig.from_dict(
                {
                    "dataset": {"name": "multimnist"},
                    "model": {"name": "hps", "options": {"encoder": "conv"}},
                    "method": {"name": method, "level": level},
                    "train": {"epochs": 1, "batch_size": 128, "log_every": 0, "progress": False},
                    "output": {"tensorboard": False},
                }
            )
            meter = Meter()
            with tempfile.TemporaryDirectory() as d:
                run = Path(dp.broadcast_object(d))  # type: ignore[arg-type]
                tr = Trainer(cfg, data=data, run_dir=run / "r", callbacks=[meter], parallel=dp)
                dp.traffic.reset()
                tr.fit()
            shared = sum(p.numel() for p in tr.model.shared_parameters())
            total = sum(p.numel() for p in tr.model.parameters())
            T_real = len(tr.train_tasks)
            analytic = {
                "ew": total,
                "parameter": T_real * shared + (total - shared),
                "representation": T_real**2 + total,
            }
            key = "ew" if method == "ew" else str(level)
            reduce_per_step, gather_per_step = meter.rows[1]  # the second step: no first-step set-up
            rows.append(
                {
                    "T": T_real,
                    "method": method,
                    "level": level or "-",
                    "all_reduce_numbers": reduce_per_step,
                    "all_gather_numbers": gather_per_step,
                    "analytic": analytic[key],
                    "shared_parameters": shared,
                    "parameters": total,
                }
            )
    if dp.is_main:
        (out / "volume.json").write_text(json.dumps(rows, indent=2))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/ddp_throughput"))
    p.add_argument("--n-train", type=int, default=6000, help="MultiMNIST images (train + validation) per run")
    p.add_argument("--methods", nargs="+", default=["ew", "mgda"])
    p.add_argument("--volume-worker", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--volume-only", action="store_true", help="only the all-reduce volume (no timings)")
    args = p.parse_args()
    if args.volume_worker:
        _volume_worker(args.volume_worker)
        return
    out: Path = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    speed = []
    if args.volume_only and out.with_suffix(".json").exists():
        speed = json.loads(out.with_suffix(".json").read_text())["throughput"]  # the timings measured before
    with tempfile.TemporaryDirectory() as d:
        for m in [] if args.volume_only else args.methods:
            for nproc in (1, 2):
                row = _train(args, m, nproc, Path(d) / f"{m}-{nproc}")
                print(json.dumps(row), flush=True)
                speed.append(row)
        vol_dir = Path(d)
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(HERE)]
            + ["--volume-worker", str(vol_dir)],
            check=True,
            env=env,
        )
        volume = json.loads((vol_dir / "volume.json").read_text())
    result = {"n_train": args.n_train, "throughput": speed, "volume": volume}
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    lines = [
        f"Data parallel on this machine (2 cores, no GPU; run alone): the default job (MultiMNIST, HPS conv encoder), "
        f"{args.n_train} images (90 % train), 1 epoch, batch 256 (global), Adam 1e-3. Samples/s from each run's "
        f"training time (results.json train_seconds). Command: `python benchmarks/ddp_throughput.py`.",
        "",
        "| method | processes x threads | train s | samples/s | test left/right accuracy |",
        "|---|---|---|---|---|",
    ]
    for r in speed:
        acc = f"{r['test']['left/accuracy']:.4f} / {r['test']['right/accuracy']:.4f}"
        lines.append(
            f"| {r['method']} | {r['processes']} x {r['threads_each']} | {r['train_seconds']:.1f} | "
            f"{r['samples_per_s']:.0f} | {acc} |"
        )
    lines += [
        "",
        "Numbers sent per step and rank (float32), 2 processes, measured by DataParallel.traffic on the second step "
        "of a run, beside the analytic count (parameter level: T·K_shared + K_heads; representation level: "
        "T² + K; EW: K, plain DDP). T tasks: task t predicts the left digit for even t, the right one for odd t (T heads on the default model).",
        "",
        "| T | method | level | all-reduce | all-gather | analytic | K_shared | K |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in volume:
        lines.append(
            f"| {r['T']} | {r['method']} | {r['level']} | {r['all_reduce_numbers']:,} | {r['all_gather_numbers']:,} "
            f"| {r['analytic']:,} | {r['shared_parameters']:,} | {r['parameters']:,} |"
        )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
