"""Typed run configuration, loaded from YAML with checked keys and ``a.b=value`` overrides.

Example:
    >>> cfg = RunConfig.from_dict({"method": {"name": "mgda"}, "train": {"epochs": 3}})
    >>> cfg.method.name, cfg.train.epochs, cfg.dataset.name
    ('mgda', 3, 'multimnist')
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mtlkit.errors import ConfigError


@dataclass
class DatasetConfig:
    name: str = "multimnist"
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class ModelConfig:
    name: str = "hps"
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class MethodConfig:
    name: str = "ew"
    level: str | None = None
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 256
    optimizer: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9
    scheduler: str = "none"  # none | step | cosine
    step_size: int = 10
    gamma: float = 0.5
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    seed: int = 0
    num_threads: int | None = None
    engine_mode: str = "auto"  # per-task gradients: auto | loop | batched
    chunk_size: int | None = None
    eval_batch_size: int = 1024
    progress: bool = True
    checkpoint_minutes: float = 10.0  # also save checkpoint.pt inside an epoch at most this often (0: epoch ends only)


@dataclass
class OutputConfig:
    dir: str | None = None  # default: runs/<dataset>-<method>-s<seed>
    tensorboard: bool = True
    overwrite: bool = False


@dataclass
class RunConfig:
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunConfig":
        return _build(cls, d, "")

    @classmethod
    def from_yaml(cls, path: str | Path) -> "RunConfig":
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        try:
            d = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {p} is not valid YAML: {e}") from e
        if not isinstance(d, dict):
            raise ConfigError(f"config file {p} must hold a mapping at top level, got {type(d).__name__}")
        return cls.from_dict(d)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def override(self, assignments: list[str]) -> "RunConfig":
        """Apply ``section.key=value`` strings (values parsed as YAML); returns a new config."""
        d = self.to_dict()
        for a in assignments:
            if "=" not in a:
                raise ConfigError(f"override {a!r} must look like section.key=value")
            key, raw = a.split("=", 1)
            parts = key.strip().split(".")
            cur = d
            for p in parts[:-1]:
                if not isinstance(cur, dict) or p not in cur:
                    raise ConfigError(f"override {a!r}: unknown section {p!r}")
                if cur[p] is None:
                    cur[p] = {}
                cur = cur[p]
            cur[parts[-1]] = yaml.safe_load(raw)
        return RunConfig.from_dict(d)


_FREE = {"options"}  # free-form mappings, checked by the builder that consumes them


def _build(cls: type, d: Any, where: str) -> Any:
    if not isinstance(d, dict):
        raise ConfigError(f"config section {where or '(top)'} must be a mapping, got {type(d).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in d if k not in fields]
    if unknown:
        raise ConfigError(f"unknown config key(s) {[f'{where}{k}' for k in unknown]}; valid keys in "
                          f"{where.rstrip('.') or 'the top level'} are: {', '.join(fields)}")
    kwargs = {}
    for k, v in d.items():
        f = fields[k]
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default  # type: ignore
        if dataclasses.is_dataclass(default):
            kwargs[k] = _build(type(default), v, f"{where}{k}.")
        elif k in _FREE:
            if v is not None and not isinstance(v, dict):
                raise ConfigError(f"{where}{k} must be a mapping")
            kwargs[k] = dict(v or {})
        else:
            kwargs[k] = _coerce(v, default, f"{where}{k}")
    return cls(**kwargs)


def _coerce(v: Any, default: Any, name: str) -> Any:
    if v is None or default is None:
        return v
    if isinstance(default, bool):
        if not isinstance(v, bool):
            raise ConfigError(f"{name} must be true or false, got {v!r}")
        return v
    if isinstance(default, int) and not isinstance(default, bool):
        if isinstance(v, bool) or not isinstance(v, int):
            raise ConfigError(f"{name} must be an integer, got {v!r}")
        return v
    if isinstance(default, float):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ConfigError(f"{name} must be a number, got {v!r}")
        return float(v)
    if isinstance(default, str) and not isinstance(v, str):
        raise ConfigError(f"{name} must be a string, got {v!r}")
    return v
