"""Exceptions raised by mtlkit. Each message names the problem and how to fix it."""


class MTLKitError(Exception):
    """Base class of mtlkit's errors."""


class ConfigError(MTLKitError, ValueError):
    """A configuration value or key is invalid."""


class DataError(MTLKitError, RuntimeError):
    """A dataset is missing, corrupted or cannot be fetched."""


class NonFiniteLossError(MTLKitError, FloatingPointError):
    """A task loss became NaN or infinite during training."""


def unknown_name(kind: str, name: str, valid: list[str] | tuple[str, ...]) -> ConfigError:
    """Build the error for an unknown method/dataset/... name, listing the valid names."""
    return ConfigError(f"unknown {kind} {name!r}; valid {kind}s are: {', '.join(sorted(valid))}")
