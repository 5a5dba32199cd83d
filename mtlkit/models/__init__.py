"""Multi-task architectures (registry: :func:`build_model`)."""
from mtlkit.models.base import MTLModel, available_models, build_model, register_model
from mtlkit.models.hps import HPS, ConvEncoder, MLPEncoder, SingleTaskModels, head

__all__ = ["HPS", "ConvEncoder", "MLPEncoder", "MTLModel", "SingleTaskModels", "available_models", "build_model",
           "head", "register_model"]
