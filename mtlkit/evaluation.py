"""Evaluate a saved run (``mtlkit eval``) or a model, clean or under attack (FGSM / PGD, :mod:`mtlkit.robustness`).

``robust_metrics`` gives every task metric and the joint accuracy (MTVIB Fig. 5) on adversarial versions of a split;
``robustness_curve`` does it for a list of attack strengths (MTVIB Tables III/IV: η in {0, 0.05, ..., 0.30}).
At η = 0 the inputs are the clean ones, so the numbers equal :func:`evaluate`'s.

Example:
    >>> import torch
    >>> from mtlkit.data import Split
    >>> from mtlkit.tasks import Task
    >>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    >>> model = lambda x: {"t": net(x)}
    >>> split = Split(torch.rand(6, 1, 2, 2), {"t": torch.tensor([0, 1, 2, 0, 1, 2])})
    >>> sorted(robustness_curve(model, [Task("t", "multiclass", 3)], split, [0.0, 0.1]))
    ['0.0', '0.1']
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mtlkit import runs
from mtlkit.config import RunConfig
from mtlkit.data import MTLData, Split, build_dataset
from mtlkit.data.loading import DatasetSplit, iter_inputs
from mtlkit.devices import resolve_device
from mtlkit.errors import ConfigError
from mtlkit.methods import build_method
from mtlkit.metrics import evaluate_outputs
from mtlkit.models import MTLModel, build_for
from mtlkit.robustness import _check_eps, eval_mode, fgsm, fgsm_step, input_gradient, pgd
from mtlkit.tasks import Task

ATTACK_NAMES = ("none", "fgsm", "pgd")


@torch.no_grad()
def predict(model: nn.Module, split: Split | DatasetSplit, batch_size: int, device: torch.device) -> dict[str, Tensor]:
    """Head outputs (float32) for a whole split, in order, in eval mode, on the CPU: a :class:`~mtlkit.data.Split`
    or a :class:`~mtlkit.data.loading.DatasetSplit` (a user's dataset, read through :func:`iter_inputs`)."""
    model.eval()
    outs: dict[str, list[Tensor]] = {}
    for x in iter_inputs(split, batch_size, device):
        o = model(x)
        for k, v in o.items():
            outs.setdefault(k, []).append(v.float().cpu())
    return {k: torch.cat(v) for k, v in outs.items()}


def evaluate(
    model: nn.Module, split: Split, tasks: list[Task], batch_size: int = 1024, device: torch.device | str = "cpu"
) -> dict[str, float]:
    """Every task metric (``task/metric``), ``joint_accuracy`` and the mean loss per task (``task/loss``)."""
    device = torch.device(device)
    outputs = predict(model, split, batch_size, device)
    res = evaluate_outputs(tasks, outputs, split.y)
    for t in tasks:
        if not t.auxiliary:
            res[f"{t.name}/loss"] = float(t.compute_loss(outputs[t.name], split.y[t.target_key]))
    return res


def load_selected(model: MTLModel, state: Any) -> None:
    """Load a selected state (:meth:`Trainer.selected_state`, best.pt) into ``model``: one state dict, or one per
    selection group (:meth:`mtlkit.models.MTLModel.selection_groups`)."""
    groups = model.selection_groups()
    if groups:
        for name, st in state.items():
            groups[name].load_state_dict(st)
    elif state is not None:
        model.load_state_dict(state)


def check_run_dir(run_dir: str | Path) -> Path:
    """``run_dir`` as a Path if it holds a finished run (``config.yaml`` and ``best.pt``); else a ConfigError that says
    what is missing."""
    run = Path(run_dir)
    if not run.is_dir():
        raise ConfigError(f"run directory {run} does not exist" if not run.exists() else f"{run} is not a directory")
    missing = [n for n in ("config.yaml", "best.pt") if not (run / n).is_file()]
    if missing:
        raise ConfigError(
            f"{run} is not a finished mtlkit run (no {' or '.join(missing)}; `mtlkit train --run-dir "
            f"{run}` writes them)"
        )
    return run


def eval_result_path(run_dir: str | Path, split: str, attack: str, target_task: str | None = None) -> Path:
    """Where ``mtlkit eval`` writes its results: ``RUN_DIR/eval_<split>_<attack>[_<target task>].json``.

    Example:
        >>> eval_result_path("runs/a", "test", "fgsm").as_posix(), eval_result_path("runs/a", "val", "pgd", "left").name
        ('runs/a/eval_test_fgsm.json', 'eval_val_pgd_left.json')
    """
    import re

    suffix = "" if target_task is None else "_" + re.sub(r"[^A-Za-z0-9_.-]", "-", target_task)
    return Path(run_dir) / f"eval_{split}_{attack}{suffix}.json"


def check_attack_args(attack: str, eps: Sequence[float], pgd_steps: int) -> None:
    """ConfigError for an unknown attack, a strength that is not a finite number >= 0, or fewer than 1 PGD step."""
    if attack not in ATTACK_NAMES:
        raise ConfigError(f"unknown attack {attack!r}; valid attacks are: {', '.join(ATTACK_NAMES)}")
    if len(eps) == 0:
        raise ConfigError("at least one attack strength eps is needed")
    for e in eps:
        try:
            _check_eps(e)
        except ValueError as err:
            raise ConfigError(f"attack strength {err}") from None
    if isinstance(pgd_steps, bool) or not isinstance(pgd_steps, int) or pgd_steps < 1:
        raise ConfigError(f"pgd_steps must be an integer >= 1, got {pgd_steps!r}")


def load_run(
    run_dir: str | Path, device: str = "cpu", data: MTLData | None = None
) -> tuple[RunConfig, MTLData, MTLModel]:
    """Rebuild a run's data (unless ``data`` is given) and model and load its validation-selected weights."""
    run = check_run_dir(run_dir)
    cfg = RunConfig.from_yaml(run / "config.yaml")
    dev = resolve_device(device)
    # hash-checked, and before the dataset is built, so a damaged file is reported at once
    states = runs.load_checkpoint(
        run / "best.pt", map_location=dev, hint=f"retrain it (mtlkit train --run-dir {run} --overwrite)"
    )
    if data is None:
        data = build_dataset(cfg.dataset.name, **cfg.dataset.options)
    # cfg.method.level and .scale are not checked when the config loads: build_method checks them (ConfigError)
    method = build_method(
        cfg.method.name,
        level=cfg.method.level,
        scale=cfg.method.scale,
        **cfg.method.options,
    )
    model = build_for(cfg.model.name, data, cfg.model.options, single_task=method.single_task).to(dev)
    load_selected(model, states)
    model.eval()
    return cfg, data, model


def robust_metrics(
    model: MTLModel,
    tasks: list[Task],
    split: Split,
    attack: str,
    eps: float,
    target_task: str | None = None,
    batch_size: int = 500,
    pgd_steps: int = 10,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> dict[str, float]:
    """Task metrics and joint accuracy on adversarial versions of ``split`` (attack ``none``/``fgsm``/``pgd``).

    The model is evaluated in eval mode; its previous train/eval mode is restored afterwards.

    Raises:
        ConfigError: unknown attack, or a negative strength.
    """
    if attack not in ATTACK_NAMES:
        raise ConfigError(f"unknown attack {attack!r}; valid attacks are: {', '.join(ATTACK_NAMES)}")
    if not eps >= 0:
        raise ConfigError(f"attack strength eps must be >= 0, got {eps}")
    device = torch.device(device)
    was = getattr(model, "training", None)
    if isinstance(model, torch.nn.Module):
        model.eval()
    gen = torch.Generator().manual_seed(seed)
    outs: dict[str, list[torch.Tensor]] = {}
    for s in range(0, len(split), batch_size):
        x = split.x[s : s + batch_size].to(device)
        y = {k: v[s : s + batch_size].to(device) for k, v in split.y.items()}
        if attack == "fgsm":
            x = fgsm(model, tasks, x, y, eps, target_task)
        elif attack == "pgd":
            x = pgd(model, tasks, x, y, eps, steps=pgd_steps, target_task=target_task, generator=gen)
        with torch.no_grad():
            for k, v in model(x).items():
                outs.setdefault(k, []).append(v.float().cpu())
    if isinstance(model, torch.nn.Module) and was is not None:
        model.train(was)
    return evaluate_outputs(tasks, {k: torch.cat(v) for k, v in outs.items()}, split.y)


def robustness_curve(
    model: MTLModel,
    tasks: list[Task],
    split: Split,
    eps: Sequence[float],
    attack: str = "fgsm",
    target_task: str | None = None,
    batch_size: int = 500,
    pgd_steps: int = 10,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """``{str(η): robust_metrics(..., η)}`` for every strength in ``eps`` (MTVIB Tables III/IV and Fig. 5).

    FGSM's direction sign(∇_x L) is taken at the clean input, so it is the same for every η (Eq. 25): the curve
    computes it once per batch and then runs one forward pass per η, instead of a gradient per η. The numbers are
    those of :func:`robust_metrics` called once per η (a test checks they are equal).
    """
    if len(eps) == 0:
        raise ConfigError("robustness_curve needs at least one attack strength")
    if attack == "fgsm":
        return _fgsm_curve(model, tasks, split, [float(e) for e in eps], target_task, batch_size, device)
    return {
        str(float(e)): robust_metrics(
            model, tasks, split, attack, float(e), target_task, batch_size, pgd_steps, device, seed
        )
        for e in eps
    }


def _fgsm_curve(
    model: MTLModel,
    tasks: list[Task],
    split: Split,
    eps: list[float],
    target_task: str | None,
    batch_size: int,
    device: torch.device | str,
) -> dict[str, dict[str, float]]:
    """FGSM metrics for every η with one input gradient per batch (see :func:`robustness_curve`)."""
    for e in eps:
        _check_eps(e)
    device = torch.device(device)
    outs: dict[float, dict[str, list[torch.Tensor]]] = {e: {} for e in eps}
    with eval_mode(model):
        for s in range(0, len(split), batch_size):
            x = split.x[s : s + batch_size].to(device)
            y = {k: v[s : s + batch_size].to(device) for k, v in split.y.items()}
            step = input_gradient(model, tasks, x, y, target_task).sign() if any(e > 0 for e in eps) else None
            for e in eps:
                xa = fgsm_step(x, step, e)  # what fgsm() returns, with the direction computed once
                with torch.no_grad():
                    for k, v in model(xa).items():
                        outs[e].setdefault(k, []).append(v.float().cpu())
    return {str(e): evaluate_outputs(tasks, {k: torch.cat(v) for k, v in outs[e].items()}, split.y) for e in eps}


def evaluate_run(
    run_dir: str | Path,
    split: str = "test",
    attack: str = "none",
    eps: Sequence[float] = (0.0,),
    target_task: str | None = None,
    pgd_steps: int = 10,
    device: str = "cpu",
) -> dict[str, Any]:
    """``{eps: metrics}`` of a saved run for each attack strength (every argument checked before anything is loaded)."""
    splits = ("train", "val", "test")
    if split not in splits:
        raise ConfigError(f"unknown split {split!r}; valid splits are: {', '.join(splits)}")
    check_attack_args(attack, eps, pgd_steps)
    device = str(resolve_device(device))  # "auto" -> the device itself, for the attack's tensors too
    _cfg, data, model = load_run(run_dir, device)
    if target_task is not None and target_task not in {t.name for t in data.tasks}:
        raise ConfigError(
            f"unknown target task {target_task!r}; the run's tasks are: {', '.join(t.name for t in data.tasks)}"
        )
    sp = {"train": data.train, "val": data.val, "test": data.test}[split]
    return {
        "run": str(run_dir),
        "split": split,
        "attack": attack,
        "target_task": target_task,
        "eps": [float(e) for e in eps],
        **({"pgd_steps": pgd_steps} if attack == "pgd" else {}),
        "results": robustness_curve(
            model, data.tasks, sp, list(eps), attack, target_task, pgd_steps=pgd_steps, device=device
        ),
    }
