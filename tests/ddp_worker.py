"""Worker of tests/test_distributed.py: trains every method on a toy float64 problem, in 1 process or as one rank of a
torchrun launch, and leaves each run's checkpoint in OUT/<world>/<method>/ (not a test module itself).

Usage: ``python tests/ddp_worker.py OUT [--resume-split]``: with ``--resume-split`` each run trains 1 epoch, then a
new trainer resumes it from its checkpoint to 2 epochs (the data-parallel leg); without, 2 epochs straight.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from mtlkit.config import RunConfig
from mtlkit.data import MTLData, Split
from mtlkit.distributed import DataParallel
from mtlkit.tasks import Task
from mtlkit.train import Trainer

#: (method, level or None, options): every registered method is added by cases(); these are the extra variants.
EXTRA = [
    ("mgda", "representation", {}),
    ("upgrad", "representation", {}),
    ("pcgrad", "representation", {}),
    ("graddrop", "parameter", {}),
    ("cagrad", "representation", {}),
]
#: Options that make a method deterministic across processes (a seed drawn from the caller's RNG otherwise).
OPTIONS = {"rlw": {"seed": 0}, "mtmlan_tdb": {"grad_at": "last_shared_layer"}}


def toy_data() -> MTLData:
    g = torch.Generator().manual_seed(0)

    def split(n: int) -> Split:
        x = torch.randn(n, 6, generator=g, dtype=torch.float64)
        y = {"a": (x[:, 0] > 0).long(), "b": x[:, 1] + x[:, 2], "c": (x[:, 3] > 0).double()}
        return Split(x, y)

    tasks = [Task("a", "multiclass", 2), Task("b", "regression"), Task("c", "binary")]
    return MTLData("toy", tasks, split(40), split(12), split(12))


def cases() -> list[tuple[str, str | None, dict]]:
    from mtlkit._registry import METHODS

    return [(m, None, OPTIONS.get(m, {})) for m in METHODS.names()] + EXTRA


#: Cases trained with half of task c's training labels removed (partial labels under data parallelism).
PARTIAL = ["ew", "mgda", "nash_mtl", "gradnorm"]


def partial_data() -> MTLData:
    from mtlkit.data import drop_labels

    data = toy_data()
    data.train = drop_labels(data.train, {"c": 0.5}, seed=0)
    return data


def case_name(method: str, level: str | None) -> str:
    return method if level is None else f"{method}@{level}"


def config(method: str, level: str | None, options: dict, epochs: int) -> RunConfig:
    return RunConfig.from_dict(
        {
            "method": {"name": method, "level": level, "options": options},
            "model": {
                "name": "hps",
                "options": {"encoder": "mlp", "hidden": [8], "head_hidden": 8, "head_batch_norm": False},
            },
            # 40 samples in batches of 15: shares of 8 and 7 samples, then 5 and 5 (unequal shares are weighted)
            # SGD: its update is linear in the gradient, so rounding differences stay at the dtype's scale (Adam's
            # m/√v amplifies them without bound for near-zero gradients)
            "train": {
                "epochs": epochs,
                "batch_size": 15,
                "optimizer": "sgd",
                "lr": 0.05,
                "momentum": 0.9,
                "log_every": 0,
                "progress": False,
                "checkpoint_minutes": 0,
            },
            "output": {"tensorboard": False},
        }
    )


def main(out: Path, resume_split: bool) -> None:
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    dp = DataParallel.from_env("cpu")
    data = toy_data()
    only = os.environ.get("MTLKIT_DDP_CASES")  # comma-separated case names (debugging): the others are skipped
    for method, level, options in cases():
        if only and case_name(method, level) not in only.split(","):
            continue
        run = out / str(dp.world_size) / case_name(method, level)
        _train(method, level, options, data, run, dp, resume_split)
    for method in PARTIAL:
        name = f"{method}%partial"
        if only and name not in only.split(","):
            continue
        _train(method, None, OPTIONS.get(method, {}), partial_data(), out / str(dp.world_size) / name, dp, resume_split)


def _train(
    method: str, level: str | None, options: dict, data: MTLData, run: Path, dp: DataParallel, resume_split: bool
) -> None:
    if resume_split:
        Trainer(config(method, level, options, 1), data=data, run_dir=run, parallel=dp).fit()
        Trainer(config(method, level, options, 2), data=data, run_dir=run, parallel=dp).fit(resume=True)
    else:
        Trainer(config(method, level, options, 2), data=data, run_dir=run, parallel=dp).fit()


if __name__ == "__main__":
    main(Path(sys.argv[1]), "--resume-split" in sys.argv[2:])
