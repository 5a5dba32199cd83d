"""Paper reproductions, run by ``mtlkit reproduce NAME``: each module registers a runner here.

A runner is ``fn(args: argparse.Namespace) -> int`` plus a function that adds its own CLI options.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Reproduction:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


REPRODUCTIONS: dict[str, Reproduction] = {}


def register_reproduction(rep: Reproduction) -> Reproduction:
    REPRODUCTIONS[rep.name] = rep
    return rep


def load_all() -> dict[str, Reproduction]:
    """Import every reproduction module (each registers itself) and return the registry."""
    from mtlkit._registry import import_submodules

    import_submodules(__name__, __path__)
    return REPRODUCTIONS


def train_or_reuse(cfg, data, run_dir, reuse: bool) -> tuple[dict, bool]:
    """Train the run ``cfg`` into ``run_dir``; return its ``results.json`` and whether it trained now. With
    ``reuse``, a finished run of the same config is read back instead and a stopped one continues from its checkpoint
    (a run of another config is an error, :func:`mtlkit.runs.finished_run`)."""
    import json

    import torch

    from mtlkit.runs import finished_run, resumable_run
    from mtlkit.train import Trainer

    done = finished_run(run_dir, cfg) if reuse else None
    if done is None:
        Trainer(cfg, data=data, run_dir=run_dir).fit(resume=reuse and resumable_run(run_dir, cfg))
        torch.set_grad_enabled(True)
        return json.loads((run_dir / "results.json").read_text()), True
    return done, False
