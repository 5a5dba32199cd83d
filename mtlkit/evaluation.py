"""Evaluate a saved run (``mtlkit eval``), clean or under attack.

Example:
    >>> callable(evaluate_run)
    True
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from mtlkit.config import RunConfig
from mtlkit.data import MTLData, Split, build_dataset
from mtlkit.errors import ConfigError
from mtlkit.methods import build_method
from mtlkit.metrics import evaluate_outputs
from mtlkit.models import MTLModel, SingleTaskModels
from mtlkit.robustness import fgsm, pgd
from mtlkit.tasks import Task
from mtlkit.train import build_for, resolve_device


def load_run(run_dir: str | Path, device: str = "cpu") -> tuple[RunConfig, MTLData, MTLModel]:
    """Rebuild a run's data and model and load its validation-selected weights (``best.pt``)."""
    run = Path(run_dir)
    if not (run / "config.yaml").is_file() or not (run / "best.pt").is_file():
        raise ConfigError(f"{run} is not a finished mtlkit run (needs config.yaml and best.pt)")
    cfg = RunConfig.from_yaml(run / "config.yaml")
    data = build_dataset(cfg.dataset.name, **cfg.dataset.options)
    method = build_method(cfg.method.name, level=cfg.method.level, **cfg.method.options)
    dev = resolve_device(device)
    model = build_for(cfg, data, method).to(dev)
    states = torch.load(run / "best.pt", map_location=dev, weights_only=False)
    if isinstance(model, SingleTaskModels):
        for name, st in states.items():
            model.members[name].load_state_dict(st)
    else:
        model.load_state_dict(states)
    model.eval()
    return cfg, data, model


def robust_metrics(model: MTLModel, tasks: list[Task], split: Split, attack: str, eps: float,
                   target_task: str | None = None, batch_size: int = 500, pgd_steps: int = 10,
                   device: torch.device | str = "cpu", seed: int = 0) -> dict[str, float]:
    """Task metrics and joint accuracy on adversarial versions of ``split`` (attack ``none``/``fgsm``/``pgd``)."""
    device = torch.device(device)
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    outs: dict[str, list[torch.Tensor]] = {}
    for s in range(0, len(split), batch_size):
        x = split.x[s:s + batch_size].to(device)
        y = {k: v[s:s + batch_size].to(device) for k, v in split.y.items()}
        if attack == "fgsm":
            x = fgsm(model, tasks, x, y, eps, target_task)
        elif attack == "pgd":
            x = pgd(model, tasks, x, y, eps, steps=pgd_steps, target_task=target_task, generator=gen)
        elif attack != "none":
            raise ConfigError(f"unknown attack {attack!r}; valid attacks are: none, fgsm, pgd")
        with torch.no_grad():
            for k, v in model(x).items():
                outs.setdefault(k, []).append(v.cpu())
    return evaluate_outputs(tasks, {k: torch.cat(v) for k, v in outs.items()}, split.y)


def evaluate_run(run_dir: str | Path, split: str = "test", attack: str = "none", eps: Sequence[float] = (0.0,),
                 target_task: str | None = None, pgd_steps: int = 10, device: str = "cpu") -> dict[str, Any]:
    """``{eps: metrics}`` of a saved run for each attack strength."""
    cfg, data, model = load_run(run_dir, device)
    sp = {"train": data.train, "val": data.val, "test": data.test}[split]
    return {"run": str(run_dir), "split": split, "attack": attack, "target_task": target_task,
            "results": {str(e): robust_metrics(model, data.tasks, sp, attack, e, target_task, pgd_steps=pgd_steps,
                                               device=device) for e in eps}}
