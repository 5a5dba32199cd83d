"""Paper reproductions, run by ``mtlkit reproduce NAME``: each module registers a runner here.

A runner is ``fn(args: argparse.Namespace) -> int`` plus a function that adds its own CLI options.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

from mtlkit._registry import REPRODUCTIONS


@dataclass(frozen=True)
class Reproduction:
    """A paper reproduction: ``mtlkit reproduce NAME`` adds its options with ``add_arguments`` and calls ``run``.

    Example:
        >>> rep = Reproduction("demo", "a demo", lambda p: None, lambda args: 0)
        >>> rep.run(argparse.Namespace())
        0
    """

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def register_reproduction(rep: Reproduction) -> Reproduction:
    """Register ``rep`` in :data:`mtlkit._registry.REPRODUCTIONS` under ``rep.name`` (its ``help`` is the entry's
    summary); returns it."""
    return REPRODUCTIONS.register(rep.name, rep, summary=rep.help)


def load_all() -> dict[str, Reproduction]:
    """Import every reproduction module (each registers itself) and return the reproductions by name.

    Example:
        >>> "mtvib" in load_all()
        True
    """
    return {e.name: e.obj for e in REPRODUCTIONS}


def train_or_reuse(cfg, data, run_dir, reuse: bool) -> tuple[dict, bool]:
    """:func:`mtlkit.train.train_or_reuse` without the model: the run's ``results.json`` and whether it trained now."""
    from mtlkit.train import train_or_reuse as train

    results, _, trained = train(cfg, data, run_dir, reuse)
    return results, trained
