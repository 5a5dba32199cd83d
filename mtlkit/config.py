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
from typing import TYPE_CHECKING, Any, Literal

import yaml

from mtlkit.errors import ConfigError

if TYPE_CHECKING:  # for the annotations only (importing them would load torch)
    from mtlkit.aggregation._base import Level
    from mtlkit.engine.autodiff import Mode
    from mtlkit.methods import ScaleChoice

#: ``train.precision`` values (mtlkit.train: autocast of the training forward pass; fp16 with a loss scaler).
Precision = Literal["fp32", "bf16", "fp16"]
PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "fp16")


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
    level: Level | None = None
    scale: ScaleChoice = "native"  # native (the method's own output scale) | sum (mean/convex/affine updates x T)
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 256
    optimizer: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9
    scheduler: str = "none"  # none | step | cosine | plateau
    step_size: int = 10
    gamma: float = 0.5
    # plateau: ReduceLROnPlateau after each epoch's validation (the QM9 papers': factor 0.7, patience 5, min_lr 1e-5)
    plateau_factor: float = 0.7
    plateau_patience: int = 5
    min_lr: float = 1e-5
    # what plateau watches (lower is better): score (minus the selection score) | delta_m_reference (validation Δm
    # against the dataset's published STL values, MTLData.info["reference_stl"]: the papers' signal on QM9)
    plateau_metric: str = "score"
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # fp32 | bf16 | fp16: the training forward pass and losses under torch.autocast (weights, gradients, the
    # engine's aggregation and the optimizer stay float32; validation and test run in float32). fp16 adds a
    # torch.amp.GradScaler (meant for CUDA; on CPU for testing): per-task gradients are unscaled before aggregation
    precision: Precision = "fp32"
    seed: int = 0
    num_threads: int | None = None
    engine_mode: Mode = "auto"  # per-task gradients: auto | loop | batched
    chunk_size: int | None = None
    eval_batch_size: int = 1024
    progress: bool = True
    checkpoint_minutes: float = 10.0  # also save checkpoint.pt inside an epoch at most this often (0: epoch ends only)
    # mtlkit.monitor: log losses, weights, gradient norms and conflicts at the first step and every log_every-th step
    # (0: off) to monitor.jsonl and TensorBoard
    log_every: int = 10
    monitor_gradients: bool = False  # loss-space methods and EW: T extra backward passes per logged step for them
    # data parallel (mtlkit.distributed): BatchNorm statistics of the global batch (CUDA only; SyncBatchNorm)
    sync_batchnorm: bool = False
    # training batches (mtlkit.data.loading): auto | memory (index in-memory tensors) | dataloader (torch DataLoader)
    loader: str = "auto"
    num_workers: int = 0  # DataLoader worker processes (loader dataloader/auto)


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
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        return _build(cls, d, "")

    @classmethod
    def from_yaml(cls, path: str | Path) -> RunConfig:
        return cls.from_dict(_read_yaml(Path(path)))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def override(self, assignments: list[str]) -> RunConfig:
        """Apply ``section.key=value`` strings (values parsed as YAML); returns a new config."""
        d = self.to_dict()
        for a in assignments:
            _assign(d, a)
        return RunConfig.from_dict(d)

    @classmethod
    def resolve(
        cls,
        config: str | Path | None = None,
        assignments: list[str] | tuple[str, ...] = (),
        dataset_defaults: bool = True,
    ) -> RunConfig:
        """The config of ``mtlkit train``: layers from the lowest to the highest, then :func:`check_run_config`.

        1. the dataclass defaults, then ``configs/default.yaml`` (dataset-independent defaults);
        2. the chosen dataset's entry in ``configs/datasets.yaml`` (its options, model, model options, batch size,
           epochs; see :func:`dataset_defaults_for`), unless ``dataset_defaults`` is False (a saved run's config);
        3. the user's YAML ``config``, then ``assignments`` (``--set`` and the flags), which always win.

        Sections merge key by key, and so do ``options`` mappings; the dataset's model options are those listed for
        the model that is finally chosen. An option the user set that the chosen dataset, model or method does not
        take is an error naming where it was set.

        Example:
            >>> RunConfig.resolve(None, ["dataset.name=yeast"]).model.name
            'mtmlan'
            >>> RunConfig.resolve(None, ["dataset.name=yeast", "model.name=hps"]).model.options["encoder"]
            'mlp'
        """
        user: dict[str, Any] = _read_yaml(Path(config)) if config is not None else {}
        origins = dict.fromkeys(_leaf_keys(user), f"in {config}")
        for a in assignments:
            key = _assign(user, a)
            origins.update({k: f"by --set {a}" for k in _leaf_keys(user) if k == key or k.startswith(key + ".")})
        layers = [_read_yaml(_CONFIG_DIR / "default.yaml")]
        if dataset_defaults:
            name = (
                (user.get("dataset") or {}).get("name")
                or (layers[0].get("dataset") or {}).get("name")
                or DatasetConfig.name
            )
            ds = dataset_defaults_for(name)
            models = ds.pop("models", {}) or {}
            model = (
                (user.get("model") or {}).get("name")
                or (ds.get("model") or {}).get("name")
                or (layers[0].get("model") or {}).get("name")
                or ModelConfig.name
            )
            ds.setdefault("model", {})["options"] = dict(models.get(model) or {})
            layers.append(ds)
        merged: dict[str, Any] = {}
        for layer in [*layers, user]:
            _merge(merged, layer)
        cfg = cls.from_dict(merged)
        check_run_config(cfg, origins)
        return cfg


_FREE = {"options"}  # free-form mappings, checked by the builder that consumes them


def _build(cls: type, d: Any, where: str) -> Any:
    if not isinstance(d, dict):
        raise ConfigError(f"config section {where or '(top)'} must be a mapping, got {type(d).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in d if k not in fields]
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {[f'{where}{k}' for k in unknown]}; valid keys in "
            f"{where.rstrip('.') or 'the top level'} are: {', '.join(fields)}"
        )
    kwargs = {}
    for k, v in d.items():
        f = fields[k]
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
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


# -- layered resolution (RunConfig.resolve) ---------------------------------------------------------------------

_CONFIG_DIR = Path(__file__).parent / "configs"


def _read_yaml(p: Path) -> dict[str, Any]:
    """A YAML config file as a mapping (empty file: ``{}``); every failure is a ConfigError naming the file."""
    if not p.is_file():
        raise ConfigError(
            f"config file {p} is a directory, not a file" if p.is_dir() else f"config file {p} does not exist"
        )
    try:
        d = yaml.safe_load(p.read_text()) or {}
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file {p}: {e}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {p} is not valid YAML: {e}") from e
    if not isinstance(d, dict):
        raise ConfigError(f"config file {p} must hold a mapping at top level, got {type(d).__name__}")
    return d


def _leaf_keys(d: Any, prefix: str = "") -> list[str]:
    """Dotted keys of the leaves of a nested mapping, e.g. ``["dataset.options.n_train", "train.epochs"]``."""
    if not isinstance(d, dict) or (prefix and not d):
        return [prefix.rstrip(".")] if prefix else []
    return [k for key, v in d.items() for k in _leaf_keys(v, f"{prefix}{key}.")]


def _assign(d: dict[str, Any], assignment: str) -> str:
    """Apply one ``a.b.c=value`` (value parsed as YAML) to the nested mapping ``d``, creating missing levels; returns
    the dotted key. Unknown keys are left to :meth:`RunConfig.from_dict`, which lists the valid ones."""
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r} must look like section.key=value")
    key, raw = assignment.split("=", 1)
    parts = [p.strip() for p in key.strip().split(".")]
    if len(parts) < 2 or not all(parts):
        raise ConfigError(f"override {assignment!r} must look like section.key=value (e.g. train.epochs=3)")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(
            f"override {assignment!r}: the value is not valid YAML ({problem}); quote a string value, "
            f"e.g. key='\"text\"'"
        ) from None
    cur = d
    for i, p in enumerate(parts[:-1]):
        if cur.get(p) is None:
            cur[p] = {}
        if not isinstance(cur[p], dict):
            raise ConfigError(f"override {assignment!r}: {'.'.join(parts[: i + 1])} is a value, not a section")
        cur = cur[p]
    cur[parts[-1]] = value
    return ".".join(parts)


def _merge(into: dict[str, Any], layer: dict[str, Any]) -> None:
    """Merge a config layer into ``into``: sections key by key, ``options`` mappings key by key too."""
    for section, val in layer.items():
        if isinstance(val, dict) and isinstance(into.get(section), dict):
            for k, v in val.items():
                old = into[section].get(k)
                into[section][k] = {**old, **v} if k in _FREE and isinstance(old, dict) and isinstance(v, dict) else v
        else:
            into[section] = dict(val) if isinstance(val, dict) else val


def dataset_defaults_for(name: str) -> dict[str, Any]:
    """The defaults dataset ``name`` brings to ``mtlkit train`` (its entry in ``configs/datasets.yaml``, a copy):
    ``dataset.options``, ``model.name``, ``models`` (model options per model), ``train`` keys. ``{}`` for a dataset
    without an entry (e.g. one registered by a user).

    Example:
        >>> dataset_defaults_for("yeast")["model"]["name"], dataset_defaults_for("nosuch")
        ('mtmlan', {})
    """
    import copy

    entries = _read_yaml(_CONFIG_DIR / "datasets.yaml")
    entry = entries.get(name) or {}
    if not isinstance(entry, dict):
        raise ConfigError(f"configs/datasets.yaml: the entry of {name!r} must be a mapping")
    return copy.deepcopy(entry)


def _factory_class(factory: Any) -> type | None:
    """The class a registry factory declares it returns (its return annotation), or None if it declares none."""
    import typing

    try:
        ret = typing.get_type_hints(factory).get("return")
    except Exception:  # an annotation that does not resolve: no claim
        return None
    return ret if isinstance(ret, type) else None


def _check_options(registry: Any, name: str, options: dict[str, Any], origins: dict[str, str], section: str) -> None:
    """``registry.check(name, options)`` (:class:`mtlkit._registry.Registry`), naming where each rejected option was
    set."""
    try:
        registry.check(name, options)
    except ConfigError as e:
        takes = registry.get(name).options
        where = sorted(
            {
                origins[f"{section}.options.{k}"]
                for k in options
                if f"{section}.options.{k}" in origins and k not in takes
            }
        )
        if not where:
            raise
        raise ConfigError(f"{e} (set {' and '.join(where)})") from None


def check_precision(precision: str) -> None:
    """ConfigError unless ``precision`` is a ``train.precision`` the loop supports (:data:`PRECISIONS`).

    Example:
        >>> check_precision("fp16")
    """
    from mtlkit.errors import unknown_name

    if precision not in PRECISIONS:
        raise unknown_name("train.precision", precision, list(PRECISIONS))


def check_run_config(cfg: RunConfig, origins: dict[str, str] | None = None) -> None:
    """Check a run config before any data is loaded or anything trained: every name is registered, every option is
    one its dataset/model/method takes, the numbers are in range and the model, method and level go together.

    ``origins`` maps dotted keys the user set to where they were set (for the messages).

    Raises:
        ConfigError: the first problem, naming the keys involved and what to do.

    Example:
        >>> check_run_config(RunConfig.from_dict({"model": {"name": "stl"}, "method": {"level": "representation"}}))
        Traceback (most recent call last):
        ...
        mtlkit.errors.ConfigError: model 'stl' trains one network per task and has no shared representation, so \
level 'representation' cannot apply; use level 'parameter' (the default) or a model with a shared encoder (e.g. hps)
    """
    import math

    from mtlkit._registry import DATASETS, MODELS
    from mtlkit.errors import unknown_name
    from mtlkit.methods import SCALE_CHOICES, build_method

    origins = origins or {}
    tc = cfg.train
    for key, v, low in (
        ("epochs", tc.epochs, 1),
        ("batch_size", tc.batch_size, 1),
        ("eval_batch_size", tc.eval_batch_size, 1),
        ("step_size", tc.step_size, 1),
    ):
        if v < low:
            raise ConfigError(f"train.{key} must be >= {low}, got {v}")
    if tc.num_threads is not None and tc.num_threads < 1:
        raise ConfigError(f"train.num_threads must be >= 1 (or unset: torch's choice), got {tc.num_threads}")
    if tc.chunk_size is not None and tc.chunk_size < 1:
        raise ConfigError(f"train.chunk_size must be >= 1 (or unset), got {tc.chunk_size}")
    if not (math.isfinite(tc.lr) and tc.lr > 0):
        raise ConfigError(f"train.lr must be a finite number > 0, got {tc.lr}")
    if not (math.isfinite(tc.checkpoint_minutes) and tc.checkpoint_minutes >= 0):
        raise ConfigError(
            f"train.checkpoint_minutes must be a finite number >= 0 (0: only at epoch ends), got "
            f"{tc.checkpoint_minutes}"
        )
    check_precision(tc.precision)
    if tc.log_every < 0:
        raise ConfigError(f"train.log_every must be >= 0 (0: no monitoring), got {tc.log_every}")
    if tc.engine_mode not in ("auto", "loop", "batched"):
        raise unknown_name("train.engine_mode", tc.engine_mode, ["auto", "loop", "batched"])
    _check_options(DATASETS, cfg.dataset.name, cfg.dataset.options, origins, "dataset")
    _check_options(MODELS, cfg.model.name, cfg.model.options, origins, "model")
    model_factory = MODELS.get(cfg.model.name).obj
    level = cfg.method.level
    if level is not None and level not in ("parameter", "representation"):
        raise ConfigError(f"unknown method.level {level!r}; valid levels are: parameter, representation")
    if cfg.method.scale not in SCALE_CHOICES:
        raise ConfigError(
            f"unknown method.scale {cfg.method.scale!r}; valid scales are: {', '.join(SCALE_CHOICES)} "
            f"(sum: mean-, convex- and affine-scale updates multiplied by T)"
        )
    try:
        method = build_method(
            cfg.method.name,
            level=level,
            scale=cfg.method.scale,
            **cfg.method.options,
        )
    except ConfigError as e:
        where = sorted({v for k, v in origins.items() if k.startswith("method.options.")})
        raise ConfigError(
            f"{e}" + (f" (method options set {' and '.join(where)})" if where and "option" in str(e) else "")
        ) from None
    except (TypeError, ValueError) as e:  # a factory rejecting an option's value
        raise ConfigError(f"method {cfg.method.name!r} rejects its options {cfg.method.options}: {e}") from None
    _check_combination(cfg, method, _factory_class(model_factory))


def _check_combination(cfg: RunConfig, method: Any, model_cls: type | None) -> None:
    """Model, method and level that cannot train together (each message names both sides)."""
    from mtlkit.models.base import MTLModel
    from mtlkit.models.stl import SingleTaskModels

    explicit = cfg.method.level is not None
    where = (
        "level 'representation'"
        if explicit
        else f"method {cfg.method.name!r}, which works at level 'representation' by default,"
    )
    fix = "use level 'parameter' (the default)" if explicit else "use --level parameter"
    if method.level == "representation":
        if model_cls is not None and issubclass(model_cls, SingleTaskModels):
            raise ConfigError(
                f"model {cfg.model.name!r} trains one network per task and has no shared "
                f"representation, so {where} cannot apply; {fix} or a model with a shared encoder "
                f"(e.g. hps)"
            )
        if method.single_task:
            raise ConfigError(
                f"method {cfg.method.name!r} trains one model per task and has no shared "
                f"representation, so {where} cannot apply; {fix} or another method"
            )
        if not method.aggregator.needs_per_task_grads:
            raise ConfigError(
                f"method {cfg.method.name!r} aggregates no per-task gradients (it backpropagates one "
                f"weighted loss), so level 'representation' does not apply to it; drop the level or "
                f"use a gradient-aggregation method (e.g. mgda, pcgrad; `mtlkit methods`)"
            )
    if (
        getattr(method.weighting, "grad_at", None) == "task_first_layer"
        and model_cls is not None
        and getattr(model_cls, "task_first_layers", None) in (None, MTLModel.task_first_layers)
    ):
        raise ConfigError(
            f"method {cfg.method.name!r} (grad_at='task_first_layer') takes gradient norms at each "
            f"task's first task-specific layer, which model {cfg.model.name!r} does not expose; use "
            f"model mtmlan or --set method.options.grad_at=last_shared_layer"
        )
