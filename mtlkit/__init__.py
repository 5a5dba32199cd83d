"""mtlkit: multi-task deep learning methods, architectures and benchmarks on real data."""

from mtlkit._startup import cli_start_guard
from mtlkit._version import __version__

with cli_start_guard():  # Ctrl-C while the `mtlkit` command imports torch: one line, status 130 (mtlkit/_startup.py)
    from mtlkit import aggregation, weighting
    from mtlkit.engine.autodiff import BackwardInfo, backward, per_task_grads, stack

__all__ = ["BackwardInfo", "__version__", "aggregation", "backward", "per_task_grads", "stack", "weighting"]
