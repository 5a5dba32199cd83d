"""Multi-task architectures (registry: :func:`build_model`)."""

from mtlkit.models.base import MTLModel, available_models, build_model, register_model
from mtlkit.models.hps import HPS, ConvEncoder, MLPEncoder, head
from mtlkit.models.stl import SingleTaskModels, build_for

__all__ = [
    "HPS",
    "ConvEncoder",
    "MLPEncoder",
    "MTLModel",
    "SingleTaskModels",
    "available_models",
    "build_for",
    "build_model",
    "head",
    "register_model",
]
