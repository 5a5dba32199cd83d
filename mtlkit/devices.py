"""Devices: where a run trains (``train.device``).

Example:
    >>> resolve_device("cpu")
    device(type='cpu')
"""

from __future__ import annotations

import torch

from mtlkit.errors import ConfigError


def resolve_device(spec: str) -> torch.device:
    """``auto`` -> cuda if available else cpu; otherwise the named device (checked)."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except RuntimeError as e:
        raise ConfigError(f"train.device {spec!r} is not a device (use auto, cpu, cuda or cuda:N)") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device is {spec!r} but CUDA is not available on this machine")
    return dev
