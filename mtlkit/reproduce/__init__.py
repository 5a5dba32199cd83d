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
