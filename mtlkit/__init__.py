"""mtlkit: multi-task deep learning methods, architectures and benchmarks on real data."""
from mtlkit import aggregation, weighting
from mtlkit.autodiff import BackwardInfo, backward, per_task_grads, stack

__version__ = "0.1.0"
__all__ = ["BackwardInfo", "aggregation", "backward", "per_task_grads", "stack", "weighting", "__version__"]
