"""Gradient-space multi-task methods: each turns the T x P matrix of per-task gradients into one update."""
from mtlkit.aggregation._base import Aggregator, Mean, Sum

__all__ = ["Aggregator", "Mean", "Sum"]
