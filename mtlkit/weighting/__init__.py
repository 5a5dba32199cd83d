"""Loss-space multi-task methods: each turns the T per-task losses into T weighted losses."""
from mtlkit.weighting._base import EW, StepContext, Weighting

__all__ = ["EW", "StepContext", "Weighting"]
