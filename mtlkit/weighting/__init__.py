"""Loss-space multi-task methods: each turns the T per-task losses into T weighted losses.

Importing this package registers every method below with :mod:`mtlkit.methods` (one file per method).

Import cycle note: ``mtlkit.methods`` imports ``mtlkit.weighting._base`` at module level, and the method files here
import ``mtlkit.methods``. When ``mtlkit.methods`` is the module being imported (it is half-initialised and has no
``register`` yet), the method files cannot be imported; they are then imported on first access to one of their
names (``mtlkit.weighting.UW``, ``from mtlkit.weighting import UW``), or by :func:`_import_methods`.
"""
from __future__ import annotations

import importlib
import sys
from typing import Any

from mtlkit.weighting._base import EW, StepContext, Weighting

_LAZY = {
    "DBMTLAggregator": "dbmtl", "LogLoss": "dbmtl", "DWA": "dwa", "FAMO": "famo", "GLS": "gls",
    "GradNorm": "gradnorm", "IMTLL": "imtl_l", "MTMLANTDB": "mtmlan_tdb", "RLW": "rlw", "UW": "uw",
}

__all__ = ["DBMTLAggregator", "DWA", "EW", "FAMO", "GLS", "GradNorm", "IMTLL", "LogLoss", "MTMLANTDB", "RLW",
           "StepContext", "UW", "Weighting"]


def _methods_ready() -> bool:
    m = sys.modules.get("mtlkit.methods")
    return m is None or hasattr(m, "register")


def _import_methods() -> None:
    """Import every method file (runs their ``@register``) and bind the class names here."""
    g = globals()
    for name, module in _LAZY.items():
        g[name] = getattr(importlib.import_module(f"mtlkit.weighting.{module}"), name)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        _import_methods()
        return globals()[name]
    raise AttributeError(f"module 'mtlkit.weighting' has no attribute {name!r}")


if _methods_ready():
    _import_methods()
