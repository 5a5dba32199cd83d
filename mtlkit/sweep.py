"""``mtlkit sweep``: tune a method's options and the learning rate on the validation split (Optuna), then train the
best configuration with several seeds and report test.

Why: a table of methods at one untuned learning rate says little; well-tuned fixed task weights (the registered
``constant`` weighting, whose weights are searched here) or plain EW compete with most gradient-manipulation methods
once every method gets the same tuning budget (Kurin, De Palma, Kostrikov, Whiteson, Kumar, "In Defense of the
Unitary Scalarization for Deep Multi-Task Learning", NeurIPS 2022, arXiv:2201.04122; Xin, Ghorbani, Gilmer, Garg,
Firat, "Do Current Multi-Task Optimization Methods in Deep Learning Even Help?", NeurIPS 2022, arXiv:2209.11379).

The search (Akiba, Sano, Yanase, Ohta, Koyama, "Optuna: A Next-generation Hyperparameter Optimization Framework",
KDD 2019, doi:10.1145/3292500.3330701):

* **Sampler**: multivariate TPE (Bergstra, Bardenet, Bengio, Kégl, "Algorithms for Hyper-Parameter Optimization",
  NeurIPS 2011, no DOI; Sec. 4: the densities l(x) of the best γ-quantile and g(x) of the rest, next point
  maximising l(x)/g(x), which maximises expected improvement, Eq. 2–3). The first ``min(10, max(2, trials // 3))``
  trials are drawn at random (TPE needs points to fit its densities). The sampler is seeded with
  ``search_seed + 7919 * (trials already in the study) + worker``: a resumed sweep or a second worker never redraws
  the random start-up points of the first.
* **Pruner**: median stopping rule (Golovin, Solnik, Moitra, Kochanski, Karro, Sculley, "Google Vizier: A Service
  for Black-Box Optimization", KDD 2017, doi:10.1145/3097983.3098043, Sec. 3.2.1): after epoch e a trial stops if
  its best validation score so far is below the median of the earlier trials' scores at epoch e; never within the
  first ``prune_warmup`` epochs, nor before ``prune_startup`` trials have finished.
* **Objective**: the score the trainer selects on, :func:`mtlkit.metrics.selection_score` (mean over tasks of the
  first metric, sign-flipped where lower is better) on the **validation** split, of the epoch the trainer selected
  (per selection group for one-model-per-task methods); maximised. It is reported after every epoch (for pruning)
  by :class:`SweepCallback`, a :class:`mtlkit.callbacks.Callback`: each trial is an ordinary
  :class:`mtlkit.train.Trainer` run.
* **Test is never read during the search**: each trial's data has its test split replaced by a :class:`SealedSplit`,
  whose tensors raise :class:`~mtlkit.errors.DataError` when touched, and the callback ends the trial at
  ``on_train_end``, before the trainer would evaluate on test. Only the final runs read test.
* **Diverged trials** (:class:`~mtlkit.errors.NonFiniteLossError`, e.g. at the top of the learning-rate range) are
  recorded as failed (TPE ignores them) with the error; they count towards ``--trials``, so a range where everything
  diverges ends.

Persistence and resume: the study lives in ``OUT/study.db`` (SQLite). ``--trials N`` is the number of *finished*
trials (complete, pruned or diverged) the study should hold: the same command after a stop continues to N, a larger
N adds trials. A trial stopped by Ctrl-C (SIGINT) is marked failed with ``interrupted``, and a trial left running by
a killed process is marked so at the next start (only one sweep may hold ``OUT`` at a time: a lock); neither is
counted, and each interrupted configuration is queued to be run again, from scratch, as a new trial. The sweep's
base config and search space are stored in the study: resuming with another one is refused.

Output in ``OUT`` (default ``runs/sweeps/<dataset>-<method>``): ``trials/NNNN/`` (each trial's run directory, no
test results), ``trials.csv``, ``best.yaml`` (the best trial's full config, which ``mtlkit train --config`` accepts),
``optimization_history.png``, ``param_importances.png`` (Optuna's matplotlib plots; importances by PED-ANOVA, Optuna's
default), ``final/trialN-sS/`` (the best config trained with each final seed, test evaluated), ``final.json`` and
``final.md``. The final seeds (default 1 2 3) differ from the search seed (0): the winner was chosen partly for its
seed-0 luck on validation, which a test score of that same model would carry.

Search space (:func:`search_space`): ``train.lr`` log-uniform over one decade either side of the base learning rate,
plus the method's options read from the method registry (its signature), each given a range by this rule:

1. a range of :data:`RANGES` for ``method.option`` (ranges the papers searched or discuss, see the table's comments);
2. else, never searched: the options of :data:`NOT_SEARCHED` (seeds, solver tolerances and iteration caps, numerical
   guards, variants that change what the method is, sizes that depend on the budget); they keep their defaults;
3. else by type of the default: a float > 0 log-uniform over one decade either side of it; a bool both values;
   anything else (0.0, strings, sequences) keeps its default, since the default alone says nothing about a range.

``--space FILE.yaml`` overrides it: a mapping from dotted config keys (``train.lr``, ``method.options.c``,
``train.weight_decay``...) to ``{type: float, low:, high:, log:}``, ``{type: int, low:, high:, log:}``,
``{type: categorical, choices: [...]}``, ``{type: task_weights, low:, high:}`` or ``null`` (not searched).

Example:
    >>> space = search_space("cagrad", base_lr=1e-3)
    >>> sorted(space), space["method.options.c"].low, space["train.lr"].high
    (['method.options.c', 'method.options.rescale', 'train.lr'], 0.1, 0.01)
    >>> sorted(search_space("pcgrad"))   # its only option is a seed
    ['train.lr']
"""

from __future__ import annotations

import copy
import csv
import io
import json
import logging
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml

from mtlkit.callbacks import Callback
from mtlkit.config import RunConfig, check_run_config
from mtlkit.data import MTLData, Split
from mtlkit.errors import ConfigError, DataError, MTLKitError, NonFiniteLossError

if TYPE_CHECKING:
    import optuna
    from torch import Tensor

    from mtlkit.train import Trainer

log = logging.getLogger("mtlkit")

Kind = Literal["float", "int", "categorical", "task_weights"]
KINDS: tuple[str, ...] = ("float", "int", "categorical", "task_weights")
STUDY = "sweep"
FINISHED_STATES = ("COMPLETE", "PRUNED")


@dataclass(frozen=True)
class ParamSpec:
    """The range of one searched config key.

    Attributes:
        kind: ``float``/``int`` (``low``..``high``, log scale when ``log``), ``categorical`` (``choices``), or
            ``task_weights``: one weight per task, each log-uniform on ``low``..``high``, then rescaled to sum to T
            (the number of tasks), so that EW is the all-ones point and the overall loss scale, which the learning
            rate already sets, is not searched twice.

    Example:
        >>> ParamSpec.from_dict("train.lr", {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}).log
        True
        >>> ParamSpec.from_dict("train.lr", {"type": "float", "low": 1, "high": 0})
        Traceback (most recent call last):
        ...
        mtlkit.errors.ConfigError: search space train.lr: needs finite low < high (low 1.0, high 0.0)
    """

    kind: Kind
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple[Any, ...] = ()

    @classmethod
    def from_dict(cls, key: str, d: Any) -> ParamSpec:
        """Read one entry of a ``--space`` file (checked: every problem is a ConfigError naming ``key``)."""
        where = f"search space {key}"
        if not isinstance(d, Mapping):
            raise ConfigError(f"{where}: must be a mapping like {{type: float, low: 0.1, high: 1}} or null")
        unknown = sorted(set(d) - {"type", "low", "high", "log", "choices"})
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {unknown}; valid keys are: type, low, high, log, choices")
        kind = d.get("type")
        if kind not in KINDS:
            raise ConfigError(f"{where}: type must be one of {', '.join(KINDS)}, got {kind!r}")
        log_ = d.get("log", False)
        if not isinstance(log_, bool):
            raise ConfigError(f"{where}: log must be true or false, got {log_!r}")
        if kind == "categorical":
            choices = d.get("choices")
            if not isinstance(choices, list) or not choices:
                raise ConfigError(f"{where}: categorical needs a non-empty list `choices`")
            if not all(c is None or isinstance(c, (bool, int, float, str)) for c in choices):
                raise ConfigError(f"{where}: choices must be numbers, strings, booleans or null, got {choices}")
            return cls("categorical", choices=tuple(choices))
        try:
            low, high = float(d["low"]), float(d["high"])
        except KeyError:
            raise ConfigError(f"{where}: {kind} needs `low` and `high`") from None
        except (TypeError, ValueError):
            raise ConfigError(
                f"{where}: low and high must be numbers, got {d.get('low')!r}, {d.get('high')!r}"
            ) from None
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            raise ConfigError(f"{where}: needs finite low < high (low {low}, high {high})")
        if (log_ or kind == "task_weights") and low <= 0:
            raise ConfigError(f"{where}: a log-scale range needs low > 0, got {low}")
        if kind == "int" and (low != int(low) or high != int(high)):
            raise ConfigError(f"{where}: int needs integer low and high, got {low}, {high}")
        return cls(kind, low, high, log_ or kind == "task_weights")

    def to_dict(self) -> dict[str, Any]:
        """The ``--space`` form of this spec (what :meth:`from_dict` reads back)."""
        if self.kind == "categorical":
            return {"type": "categorical", "choices": list(self.choices)}
        low, high = self.low, self.high
        if self.kind == "int":
            return {"type": "int", "low": int(low or 0), "high": int(high or 0), "log": self.log}
        return {"type": self.kind, "low": low, "high": high, "log": self.log}

    def suggest(self, trial: optuna.Trial, key: str, task_names: Sequence[str]) -> Any:
        """Draw this key's value for ``trial`` (Optuna's parameter name is ``key``, ``key[task]`` per task)."""
        if self.kind == "categorical":
            return trial.suggest_categorical(key, list(self.choices))
        low, high = float(self.low or 0.0), float(self.high or 0.0)
        if self.kind == "int":
            return trial.suggest_int(key, int(low), int(high), log=self.log)
        if self.kind == "float":
            return trial.suggest_float(key, low, high, log=self.log)
        raw = [trial.suggest_float(f"{key}[{t}]", low, high, log=True) for t in task_names]
        return normalised_weights(raw)


def normalised_weights(raw: Sequence[float]) -> list[float]:
    """``raw`` rescaled to sum to its length (T): EW's total weight, so the learning rate keeps its meaning.

    Example:
        >>> normalised_weights([1.0, 3.0])
        [0.5, 1.5]
    """
    total = float(sum(raw))
    if not (math.isfinite(total) and total > 0):
        raise ConfigError(f"task weights must be finite and sum to > 0, got {list(raw)}")
    return [len(raw) * float(w) / total for w in raw]


def _f(low: float, high: float, log: bool = False) -> ParamSpec:
    return ParamSpec("float", low, high, log)


def _c(*choices: Any) -> ParamSpec:
    return ParamSpec("categorical", choices=tuple(choices))


#: Ranges by ``method.option`` where the default alone says nothing (rule 1 of the module docstring). The ranges
#: span the values the method's paper used or discussed, widened to a decade where it fixed one value.
RANGES: dict[str, ParamSpec] = {
    "cagrad.c": _f(0.1, 0.9),  # CAGrad (NeurIPS 2021): c in [0, 1), 0.4-0.5 in its experiments; 0 = GD
    "cagrad.rescale": _c(0, 1, 2),  # the three rescalings of its released code
    "dbmtl.beta": _f(0.1, 0.99),  # DB-MTL's EMA coefficient of the gradient magnitudes, in (0, 1)
    "dbmtl.beta_sigma": _f(0.0, 1.0),  # β_k = β / k^σ decay exponent
    "dwa.temperature": _f(0.5, 10.0, log=True),  # DWA (MTAN, CVPR 2019): T = 2; large T -> EW
    "fairgrad.alpha": _f(0.1, 10.0, log=True),  # α-fairness: 1 proportional, 2 min potential delay, -> inf max-min
    "famo.lr": _f(1e-3, 0.1, log=True),  # FAMO's weight-logit step size (0.025 in its paper)
    "famo.weight_decay": _f(1e-6, 1e-3, log=True),
    "gradnorm.alpha": _f(0.0, 3.0),  # GradNorm (ICML 2018): asymmetry α, 0..3 in its experiments
    "gradnorm.lr": _f(1e-3, 0.1, log=True),
    "gradvac.beta": _f(1e-3, 0.1, log=True),  # GradVac's EMA rate of the target cosine
    "graddrop.leak": _f(0.0, 1.0),  # GradDrop's leak: 0 = pure sign dropout, 1 = no dropout
    "moco.beta": _f(0.1, 0.99),
    "moco.beta_sigma": _f(0.0, 1.0),
    "moco.gamma": _f(1e-3, 1.0, log=True),
    "moco.gamma_sigma": _f(0.0, 1.0),
    "nash_mtl.update_weights_every": _c(1, 5, 25),  # solving the bargaining game every k steps
    "sdmgrad.lamda": _f(0.05, 1.0),  # SDMGrad's regularisation λ (0.3 default)
    "stch.mu": _f(0.01, 10.0, log=True),  # smoothing μ of the Tchebycheff scalarisation
    "excess_mtl.step_size": _f(1e-3, 0.1, log=True),
    "constant.weights": ParamSpec("task_weights", 0.1, 10.0, True),  # the "fixed weights" baseline: ratios 1:100..100:1
}

#: Options never searched (rule 2): seeds, solver tolerances and caps, numerical guards, variants that change what
#: the method is, and budget-dependent sizes. ``method.option`` entries apply to one method only.
NOT_SEARCHED: frozenset[str] = frozenset(
    {
        "seed",
        "eps",
        "tol",
        "max_iter",
        "niter",
        "solver",
        "norm_eps",
        "reg_eps",
        "min_weight",
        "optimizer",
        "betas",
        "grad_at",
        "form",
        "init",
        "rule",
        "counts",
        "num_samples",
        "min_losses",
        "preference",
        "nadir",
        "warmup_epochs",
        "baseline_steps",
        "max_norm",
        "init_log_var",
        "init_log_scale",
        "rho",
        "total",
        "sdmgrad.lr",  # the inner solver's step (used by solver='sgd' only), not a training rate
        "sdmgrad.momentum",
    }
)


def search_space(method: str, base_lr: float = 1e-3, override: Mapping[str, Any] | None = None) -> dict[str, ParamSpec]:
    """The searched config keys of ``method`` and their ranges (module docstring: the rule), with ``override`` (a
    parsed ``--space`` file: key -> spec mapping or None to drop) applied last.

    Example:
        >>> sorted(search_space("ew", override={"train.weight_decay": {"type": "float", "low": 1e-6,
        ...                                     "high": 1e-3, "log": True}}))
        ['train.lr', 'train.weight_decay']
        >>> search_space("constant")["method.options.weights"].kind
        'task_weights'
    """
    from mtlkit._registry import METHODS, REQUIRED

    if not (math.isfinite(base_lr) and base_lr > 0):
        raise ConfigError(f"train.lr must be a finite number > 0, got {base_lr}")
    space: dict[str, ParamSpec] = {"train.lr": _f(base_lr / 10, base_lr * 10, log=True)}
    for name, opt in METHODS.get(method).options.items():
        key = f"method.options.{name}"
        qualified = f"{method}.{name}"
        if qualified in RANGES:
            space[key] = RANGES[qualified]
        elif name in NOT_SEARCHED or qualified in NOT_SEARCHED or opt.default is REQUIRED:
            continue
        elif isinstance(opt.default, bool):
            space[key] = _c(False, True)
        elif isinstance(opt.default, float) and opt.default > 0:
            space[key] = _f(opt.default / 10, opt.default * 10, log=True)
    for key, d in (override or {}).items():
        if not isinstance(key, str) or key.count(".") < 1:
            raise ConfigError(f"search space key {key!r} must be a dotted config key such as train.lr")
        if d is None:
            space.pop(key, None)
        else:
            space[key] = ParamSpec.from_dict(key, d)
    return space


def read_space_file(path: str | Path) -> dict[str, Any]:
    """A ``--space`` YAML file as a mapping (ConfigError naming the file for anything else)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--space file {p} does not exist")
    try:
        d = yaml.safe_load(p.read_text()) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"--space file {p} cannot be read as YAML: {e}") from None
    if not isinstance(d, dict):
        raise ConfigError(f"--space file {p} must hold a mapping from config keys to ranges")
    return d


def _set_key(d: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    cur = d
    for i, p in enumerate(parts[:-1]):
        nxt = cur.get(p)
        if nxt is None:
            nxt = cur[p] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"search space key {dotted}: {'.'.join(parts[: i + 1])} is a value, not a section")
        cur = nxt
    cur[parts[-1]] = value


def apply_params(base: dict[str, Any], values: Mapping[str, Any]) -> dict[str, Any]:
    """A deep copy of the config dict ``base`` with each dotted key of ``values`` set.

    Example:
        >>> apply_params({"train": {"lr": 1e-3}}, {"train.lr": 0.01, "method.options.c": 0.5})
        {'train': {'lr': 0.01}, 'method': {'options': {'c': 0.5}}}
    """
    out = copy.deepcopy(base)
    for k, v in values.items():
        _set_key(out, k, v)
    return out


def check_space(base: dict[str, Any], space: Mapping[str, ParamSpec], num_tasks: int | None = None) -> None:
    """Check that both ends of every range give a valid run config (names, options, values), before anything trains.

    Raises:
        ConfigError: naming the key and the end of its range that fails.
    """
    for key, spec in space.items():
        if spec.kind == "categorical":
            ends = list(spec.choices)
        elif spec.kind == "task_weights":
            ends = [[1.0] * (num_tasks or 1)]
        elif spec.kind == "int":
            ends = [int(spec.low or 0), int(spec.high or 0)]
        else:
            ends = [spec.low, spec.high]
        for v in ends:
            try:
                check_run_config(RunConfig.from_dict(apply_params(base, {key: v})))
            except ConfigError as e:
                raise ConfigError(f"search space {key} = {v!r} gives an invalid run: {e}") from None


# -- the test split, sealed ---------------------------------------------------------------------------------------


class SealedSplit(Split):
    """A split whose tensors cannot be read: stands in for the test split while a sweep searches.

    Its length is known (the trainer's messages print it); touching ``x`` or ``y`` raises DataError.

    Example:
        >>> s = SealedSplit(5)
        >>> len(s)
        5
        >>> s.x
        Traceback (most recent call last):
        ...
        mtlkit.errors.DataError: the test split was read during a sweep's search (only validation may guide it)
    """

    def __init__(self, n: int) -> None:  # no Split.__init__: nothing to hold
        self._n = n

    @property
    def x(self) -> Tensor:
        raise DataError("the test split was read during a sweep's search (only validation may guide it)")

    @x.setter
    def x(self, value: Tensor) -> None:
        raise DataError("a sealed split cannot be given tensors")

    @property
    def y(self) -> dict[str, Tensor]:
        raise DataError("the test split was read during a sweep's search (only validation may guide it)")

    @y.setter
    def y(self, value: dict[str, Tensor]) -> None:
        raise DataError("a sealed split cannot be given tensors")

    def __len__(self) -> int:
        return self._n

    def __repr__(self) -> str:
        return f"SealedSplit({self._n})"


def sealed(data: MTLData) -> MTLData:
    """``data`` with its test split replaced by a :class:`SealedSplit` (train and validation shared, not copied)."""
    return MTLData(data.name, data.tasks, data.train, data.val, SealedSplit(len(data.test)), dict(data.info))


# -- one trial ----------------------------------------------------------------------------------------------------


class _TrialTrained(Exception):
    """Raised by :class:`SweepCallback` at ``on_train_end``: the trial's value is known and the trainer must not go on
    to evaluate the test split (the search never reads it)."""

    def __init__(self, value: float) -> None:
        super().__init__(value)
        self.value = value


class SweepCallback(Callback):
    """Reports each epoch's validation selection score to the Optuna trial (pruning on it) and ends the trial with
    the score of the epoch(s) the trainer selected.

    Example:
        >>> SweepCallback(trial=None).key()
        'sweep'
    """

    name = "sweep"

    def __init__(self, trial: Any) -> None:
        self.trial = trial
        self.scores: dict[int, dict[str, float]] = {}  # epoch (from 0) -> validation metrics

    def on_epoch_end(self, trainer: Trainer, epoch: int, row: dict[str, float]) -> None:
        import optuna

        from mtlkit.metrics import selection_score

        val = {k[len("val/") :]: v for k, v in row.items() if k.startswith("val/")}
        self.scores[epoch] = val
        score = selection_score(trainer.tasks, val)
        self.trial.report(score, epoch + 1)  # steps are epochs from 1, as users read them
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned after epoch {epoch + 1} (validation score {score:.4f})")

    def on_train_end(self, trainer: Trainer) -> None:
        raise _TrialTrained(self.objective(trainer))

    def objective(self, trainer: Trainer) -> float:
        """The validation selection score of what the trainer selected (per group: each group's task at its epoch)."""
        from mtlkit.metrics import selection_score

        chosen = trainer.selected_epoch()
        if chosen is None:
            raise RuntimeError("the trainer selected no epoch")
        if isinstance(chosen, dict):
            tasks = {t.name: t for t in trainer.tasks}
            return float(
                sum(selection_score([tasks[name]], self.scores[e]) for name, e in chosen.items()) / len(chosen)
            )
        return selection_score(trainer.tasks, self.scores[chosen])


@dataclass
class _Context:
    out: Path
    base: dict[str, Any]
    space: dict[str, ParamSpec]
    trials: int
    threads: int


def _objective(trial: optuna.Trial, ctx: _Context, data: MTLData) -> float:
    from mtlkit.train import Trainer

    names = [t.name for t in data.tasks if not t.auxiliary]
    values = {k: spec.suggest(trial, k, names) for k, spec in ctx.space.items()}
    run_dir = ctx.out / "trials" / f"{trial.number:04d}"
    cfg_dict = apply_params(ctx.base, values)
    cfg_dict["output"] = {"dir": str(run_dir), "overwrite": True, "tensorboard": False}
    cfg = RunConfig.from_dict(cfg_dict)
    check_run_config(cfg)
    trial.set_user_attr("config", cfg.to_dict())
    trial.set_user_attr("run_dir", str(run_dir))
    cb = SweepCallback(trial)
    try:
        Trainer(cfg, data=data, callbacks=[cb]).fit()
    except _TrialTrained as done:
        return done.value
    raise RuntimeError("the sweep's callback did not end the trial")  # pragma: no cover - on_train_end always raises


def _state(name: str) -> Any:
    import optuna

    return optuna.trial.TrialState[name]


def _counted(t: optuna.trial.FrozenTrial) -> bool:
    """Whether a trial counts towards ``--trials``: finished (complete, pruned, diverged) or running now."""
    if t.state.name in (*FINISHED_STATES, "RUNNING"):
        return True
    return t.state.name == "FAIL" and bool(t.user_attrs.get("diverged"))


def _sampler(trials: int, seed: int) -> Any:
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # multivariate TPE
        return optuna.samplers.TPESampler(
            n_startup_trials=min(10, max(2, trials // 3)), multivariate=True, constant_liar=True, seed=seed
        )


def _storage_url(out: Path) -> str:
    return f"sqlite:///{(out / 'study.db').resolve()}"


def _storage(out: Path) -> Any:
    import optuna

    # timeout: parallel workers wait for SQLite's write lock instead of failing with "database is locked"
    return optuna.storages.RDBStorage(_storage_url(out), engine_kwargs={"connect_args": {"timeout": 60}})


def _load_study(out: Path, trials: int, seed: int, prune_startup: int, prune_warmup: int) -> Any:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # mtlkit logs each trial itself
    storage = _storage(out)
    study = optuna.load_study(study_name=STUDY, storage=storage)
    n = len(study.trials)
    return optuna.load_study(
        study_name=STUDY,
        storage=storage,
        sampler=_sampler(trials, seed + 7919 * n),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=prune_startup, n_warmup_steps=prune_warmup + 1),
    )


def work(
    out: str | Path,
    trials: int,
    threads: int = 1,
    worker: int = 0,
    search_seed: int = 0,
    prune_startup: int = 5,
    prune_warmup: int = 1,
) -> int:
    """One worker of a sweep: ask the study for trials and train them until it holds ``trials`` counted ones;
    returns how many it trained. Several may run at once on the same ``out`` (``--jobs``), one thread each.

    Example:
        >>> work  # doctest: +ELLIPSIS
        <function work at ...>
    """
    import fcntl

    import optuna
    import torch

    from mtlkit.bench import _dataset

    out = Path(out)
    torch.set_num_threads(threads)
    study = _load_study(out, trials, search_seed + worker, prune_startup, prune_warmup)
    settings = study.user_attrs["settings"]
    ctx = _Context(
        out, settings["base"], {k: ParamSpec.from_dict(k, v) for k, v in settings["space"].items()}, trials, threads
    )
    base = RunConfig.from_dict(ctx.base)
    data = sealed(_dataset(base.dataset.name, base.dataset.options))
    done = 0
    while True:
        # count and ask under one lock: two workers never both start the trial that reaches --trials
        with open(out / ".ask-lock", "a+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            if sum(_counted(t) for t in study.get_trials(deepcopy=False)) >= trials:
                return done
            trial = study.ask()
        log.info(f"sweep {out}: trial {trial.number} started (worker {worker})")
        try:
            value = _objective(trial, ctx, data)
        except optuna.TrialPruned as e:
            study.tell(trial, state=_state("PRUNED"))
            log.info(f"sweep {out}: trial {trial.number} {e}")
        except NonFiniteLossError as e:
            trial.set_user_attr("diverged", True)
            trial.set_user_attr("error", str(e)[:500])
            study.tell(trial, state=_state("FAIL"))
            log.warning(f"sweep {out}: trial {trial.number} diverged (counted as failed): {e}")
        except KeyboardInterrupt:
            trial.set_user_attr("interrupted", True)
            study.tell(trial, state=_state("FAIL"))
            raise
        except BaseException as e:
            trial.set_user_attr("error", f"{type(e).__name__}: {e}"[:500])
            study.tell(trial, state=_state("FAIL"))
            raise
        else:
            study.tell(trial, value)
            log.info(f"sweep {out}: trial {trial.number} finished, validation score {value:.4f}")
        done += 1


def _worker_main(kwargs: dict[str, Any], modules: list[str], errors: Any) -> None:
    """A spawned worker process: exit 130 on Ctrl-C (its trial is marked interrupted), 2 with a message on an
    error."""
    import sys

    from mtlkit.bench import _import_all
    from mtlkit.logs import log_to_stderr

    log_to_stderr()
    try:
        _import_all(modules)
        work(**kwargs)
    except KeyboardInterrupt:
        sys.exit(130)
    except BaseException as e:
        errors.put(f"worker {kwargs.get('worker')}: {type(e).__name__}: {e}")
        sys.exit(2)


def _run_workers(jobs: int, kwargs: dict[str, Any]) -> None:
    """``jobs`` worker processes on one study; Ctrl-C reaches each (forwarded if only this process got it)."""
    import signal
    from multiprocessing import get_context

    from mtlkit.bench import _registering_modules

    mp = get_context("spawn")
    errors = mp.Queue()
    procs = [
        mp.Process(target=_worker_main, args=({**kwargs, "worker": w}, _registering_modules(), errors), daemon=False)
        for w in range(jobs)
    ]
    for p in procs:
        p.start()
    interrupted = False
    while True:
        try:
            for p in procs:
                p.join()
            break
        except KeyboardInterrupt:
            interrupted = True
            for p in procs:
                if p.is_alive() and p.pid is not None:
                    os.kill(p.pid, signal.SIGINT)
    if interrupted or any(p.exitcode == 130 for p in procs):
        raise KeyboardInterrupt
    msgs = []
    while not errors.empty():
        msgs.append(errors.get())
    bad = [p.exitcode for p in procs if p.exitcode]
    if msgs or bad:
        raise MTLKitError("; ".join(msgs) or f"sweep workers exited with status {bad}")


# -- the whole sweep ----------------------------------------------------------------------------------------------


def _comparable(base: dict[str, Any]) -> dict[str, Any]:
    """The base config without what may change between invocations (threads, progress, device, output)."""
    from mtlkit.runs import REUSE_IGNORED

    d = copy.deepcopy(base)
    d.pop("output", None)
    for key in REUSE_IGNORED:
        section, k = key.split(".", 1)
        (d.get(section) or {}).pop(k, None)
    return d


def _open_study(out: Path, base: dict[str, Any], space: dict[str, ParamSpec]) -> Any:
    """Create the study in ``out`` or load it, refusing one started with another base config or space."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = _storage(out)
    study = optuna.create_study(storage=storage, study_name=STUDY, direction="maximize", load_if_exists=True)
    settings = {"base": base, "space": {k: v.to_dict() for k, v in space.items()}}
    old = study.user_attrs.get("settings")
    if old is None:
        study.set_user_attr("settings", settings)
        return study
    diff = sorted(
        k
        for k in {**_flat(_comparable(old["base"])), **_flat(_comparable(base))}
        if _flat(_comparable(old["base"])).get(k) != _flat(_comparable(base)).get(k)
    )
    if old["space"] != settings["space"]:
        diff.append("the search space")
    if diff:
        raise ConfigError(
            f"sweep {out} was started with another config or search space (differs in {', '.join(diff)}); "
            f"resume it with the same arguments (only --trials, --jobs, --threads and the final seeds may change), "
            f"or use another --out or --overwrite"
        )
    study.set_user_attr("settings", settings)  # the new threads/progress values go to the workers
    return study


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict) or not d:
        return {prefix.rstrip("."): d} if prefix else {}
    return {k: v for key, val in d.items() for k, v in _flat(val, f"{prefix}{key}.").items()}


def _requeue_interrupted(study: Any) -> int:
    """Mark trials left running (their process died) as interrupted failures, and queue every interrupted trial's
    configuration once more; returns how many were queued."""
    from optuna.trial import TrialState

    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study._storage.set_trial_user_attr(t._trial_id, "interrupted", True)
        study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
    queued = set(study.user_attrs.get("requeued", []))
    todo = [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
        if t.user_attrs.get("interrupted") and t.number not in queued
    ]
    for t in todo:
        study.enqueue_trial(dict(t.params), user_attrs={"rerun_of": t.number})
    if todo:
        study.set_user_attr("requeued", sorted(queued | {t.number for t in todo}))
        log.info(f"sweep: {len(todo)} interrupted trial(s) queued to run again ({[t.number for t in todo]})")
    return len(todo)


def write_trials_csv(study: Any, path: Path) -> None:
    """One row per trial: number, state, value (validation score), the parameters, epochs reached, run dir, error."""
    trials = study.get_trials(deepcopy=False)
    params: list[str] = []
    for t in trials:
        params += [p for p in t.params if p not in params]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["number", "state", "value", "epochs", "seconds", *params, "run_dir", "note"])
    for t in trials:
        secs = (
            (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete and t.datetime_start else ""
        )
        state = t.state.name
        note = "interrupted" if t.user_attrs.get("interrupted") else t.user_attrs.get("error", "")
        if t.user_attrs.get("diverged"):
            state = "DIVERGED"
        w.writerow(
            [
                t.number,
                state,
                "" if t.value is None else t.value,
                max(t.intermediate_values, default=""),
                secs,
                *[t.params.get(p, "") for p in params],
                t.user_attrs.get("run_dir", ""),
                note,
            ]
        )
    from mtlkit.runs import atomic_write_text

    atomic_write_text(path, buf.getvalue())


def best_config(study: Any) -> dict[str, Any]:
    """The best complete trial's full run config for ``mtlkit train --config`` (default run directory)."""
    best = study.best_trial
    cfg = copy.deepcopy(best.user_attrs["config"])
    cfg["output"] = {"dir": None, "tensorboard": True, "overwrite": False}
    cfg["train"]["progress"] = True
    return cfg


def write_plots(study: Any, out: Path) -> list[Path]:
    """Optuna's optimisation history and parameter importances as PNGs; a plot Optuna cannot draw yet (e.g.
    importances with fewer than two complete trials) is skipped with a warning."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna.visualization.matplotlib as vis

    written = []
    for name, plot in (
        ("optimization_history", vis.plot_optimization_history),
        ("param_importances", vis.plot_param_importances),
    ):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # optuna's ExperimentalWarning on its matplotlib module
                ax = plot(study)
        except (ValueError, RuntimeError, ZeroDivisionError) as e:
            log.warning(f"sweep {out}: no {name}.png ({e})")
            continue
        fig = ax.get_figure(root=True)
        if fig is None:  # pragma: no cover - optuna's plots always draw into a figure
            continue
        fig.tight_layout()
        path = out / f"{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def _final_runs(out: Path, study: Any, seeds: Sequence[int], threads: int) -> dict[str, Any]:
    """Train the best config with each seed (reusing finished runs, resuming stopped ones); their test metrics."""
    import numpy as np
    import torch

    from mtlkit.bench import _dataset
    from mtlkit.train import train_or_reuse

    best = study.best_trial
    cfg_best = best_config(study)
    runs: dict[str, Any] = {}
    torch.set_num_threads(threads)
    for s in seeds:
        d = apply_params(cfg_best, {"train.seed": int(s), "train.progress": False, "train.num_threads": threads})
        run_dir = out / "final" / f"trial{best.number}-s{s}"
        d["output"] = {"dir": str(run_dir), "overwrite": True, "tensorboard": False}
        cfg = RunConfig.from_dict(d)
        res, _, trained = train_or_reuse(cfg, _dataset(cfg.dataset.name, cfg.dataset.options), run_dir, reuse=True)
        log.info(f"sweep {out}: final seed {s} {'trained' if trained else 'reused'}: test {res['test']}")
        runs[str(s)] = res["test"]
    keys = list(next(iter(runs.values())))
    summary = {
        k: [float(np.mean([r[k] for r in runs.values()])), float(np.std([r[k] for r in runs.values()]))] for k in keys
    }
    data = _dataset(cfg_best["dataset"]["name"], cfg_best["dataset"]["options"])
    primary = {f"{t.name}/{t.metrics[0]}": bool(t.higher_is_better[0]) for t in data.tasks if not t.auxiliary}
    return {
        "primary": primary,
        "method": cfg_best["method"]["name"],
        "dataset": cfg_best["dataset"]["name"],
        "best_trial": best.number,
        "val_score": best.value,
        "params": dict(best.params),
        "config": cfg_best,
        "seeds": [int(s) for s in seeds],
        "test": runs,
        "summary": summary,
        "trials": {
            state: sum(t.state.name == state for t in study.get_trials(deepcopy=False))
            for state in ("COMPLETE", "PRUNED", "FAIL")
        },
    }


def final_markdown(final: Mapping[str, Any]) -> str:
    """The final runs as a small markdown table (test metrics, mean ± std over the final seeds).

    Example:
        >>> print(final_markdown({"method": "ew", "dataset": "d", "best_trial": 3, "val_score": 0.9,
        ...     "params": {"train.lr": 0.002}, "seeds": [1, 2], "summary": {"a/accuracy": [0.9, 0.01]}}))
        Tuned ew on d: best trial 3 (validation score 0.9000), train.lr=0.002; test over seeds [1, 2]:
        <BLANKLINE>
        | metric | test (mean ± std) |
        |---|---|
        | a/accuracy | 0.9000 ± 0.0100 |
    """
    params = ", ".join(f"{k}={_short(v)}" for k, v in final["params"].items())
    lines = [
        f"Tuned {final['method']} on {final['dataset']}: best trial {final['best_trial']} (validation score "
        f"{final['val_score']:.4f}), {params}; test over seeds {list(final['seeds'])}:",
        "",
        "| metric | test (mean ± std) |",
        "|---|---|",
    ]
    lines += [f"| {k} | {m:.4f} ± {s:.4f} |" for k, (m, s) in final["summary"].items()]
    return "\n".join(lines)


def _short(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


@dataclass
class SweepArgs:
    """What ``mtlkit sweep`` was asked (the CLI's flags; see :func:`add_sweep_arguments`)."""

    method: str
    dataset: str | None = None
    config: str | None = None
    sets: Sequence[str] = ()
    trials: int = 20
    epochs: int | None = None
    jobs: int = 1
    threads: int = 1
    out: str | None = None
    space: str | None = None
    seeds: Sequence[int] = (1, 2, 3)
    search_seed: int = 0
    prune_startup: int = 5
    prune_warmup: int = 1
    final: bool = True
    overwrite: bool = False


def run_sweep(a: SweepArgs) -> dict[str, Any]:
    """Run (or resume) a sweep and its final runs (module docstring); returns ``final.json``'s content (``{}`` with
    ``final=False``).

    Example:
        >>> run_sweep(SweepArgs(method="ew", trials=0))
        Traceback (most recent call last):
        ...
        mtlkit.errors.ConfigError: --trials must be >= 1, got 0
    """
    from mtlkit.runs import MARKER, RunLock, atomic_write_text

    for flag, v, low in (
        ("--trials", a.trials, 1),
        ("--jobs", a.jobs, 1),
        ("--threads", a.threads, 1),
        ("--prune-startup", a.prune_startup, 0),
        ("--prune-warmup", a.prune_warmup, 0),
    ):
        if v < low:
            raise ConfigError(f"{flag} must be >= {low}, got {v}")
    try:
        import optuna  # noqa: F401  (an optional dependency: say how to get it before any data is loaded)
    except ImportError:
        raise ConfigError("mtlkit sweep needs optuna: pip install -e '.[sweep]' (or pip install optuna)") from None
    if a.final and len(a.seeds) < 1:
        raise ConfigError("--seeds needs at least one seed (or pass --no-final)")
    if a.search_seed in a.seeds:
        log.warning(f"sweep: final seed {a.search_seed} is also the search seed; its test score is optimistic")
    sets = [f"method.name={a.method}", *([f"dataset.name={a.dataset}"] if a.dataset else [])]
    sets += [*([f"train.epochs={a.epochs}"] if a.epochs is not None else []), *a.sets]
    sets += [f"train.seed={a.search_seed}", f"train.num_threads={a.threads}", "train.progress=false"]
    cfg = RunConfig.resolve(a.config, sets)
    base = cfg.to_dict()
    base["output"] = {"dir": None, "tensorboard": False, "overwrite": False}
    space = search_space(cfg.method.name, cfg.train.lr, read_space_file(a.space) if a.space else None)
    check_space(base, space)
    out = Path(a.out or Path("runs") / "sweeps" / f"{cfg.dataset.name}-{cfg.method.name}")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / "study.db").is_file():
        raise ConfigError(f"refusing to use {out}: it is not empty and holds no sweep (study.db); use another --out")
    if a.overwrite and (out / "study.db").is_file():
        RunLock(out).check()
        import shutil

        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    lock = RunLock(out).acquire()  # one sweep per directory: a trial still RUNNING in the study is then stale
    try:
        (out / MARKER).touch()  # mtlkit's own directory (the run directories inside are its trials)
        study = _open_study(out, base, space)
        _requeue_interrupted(study)
        kw = {
            "out": str(out),
            "trials": a.trials,
            "threads": a.threads,
            "search_seed": a.search_seed,
            "prune_startup": a.prune_startup,
            "prune_warmup": a.prune_warmup,
        }
        counted = sum(_counted(t) for t in study.get_trials(deepcopy=False))
        log.info(
            f"sweep {out}: {cfg.method.name} on {cfg.dataset.name}, {counted}/{a.trials} trials so far, "
            f"searching {', '.join(space)}"
        )
        if counted < a.trials:
            if a.jobs == 1:
                work(worker=0, **kw)  # type: ignore[arg-type]
            else:
                _run_workers(a.jobs, kw)
        study = _open_study(out, base, space)
        write_trials_csv(study, out / "trials.csv")
        complete = study.get_trials(deepcopy=False, states=(_state("COMPLETE"),))
        if not complete:
            raise ConfigError(f"sweep {out}: no trial completed (see {out / 'trials.csv'}); nothing to report")
        atomic_write_text(out / "best.yaml", yaml.safe_dump(best_config(study), sort_keys=False))
        write_plots(study, out)
        if not a.final:
            return {}
        final = _final_runs(out, study, a.seeds, a.threads * a.jobs)
        atomic_write_text(out / "final.json", json.dumps(final, indent=2))
        atomic_write_text(out / "final.md", final_markdown(final) + "\n")
        return final
    finally:
        lock.release()


def tuned_table(root: str | Path, zoo: str | Path | None = None, baseline: str = "stl") -> str:
    """A markdown table of every finished sweep under ``root`` (``*/final.json``, one dataset): per-task test metric
    (mean ± std over the final seeds), Δm % against the tuned ``baseline`` (lower is better), the best learning rate;
    with ``zoo`` (a ``bench zoo`` JSON of the same dataset and budget), the untuned Δm beside it.

    Raises:
        ConfigError: no sweep under ``root``, or sweeps of several datasets.
    """
    from mtlkit.metrics import delta_m

    finals = []
    for p in sorted(Path(root).glob("*/final.json")):
        finals.append(json.loads(p.read_text()))
    if not finals:
        raise ConfigError(f"no finished sweep (*/final.json) under {root}")
    datasets = sorted({f["dataset"] for f in finals})
    if len(datasets) > 1:
        raise ConfigError(f"sweeps of several datasets under {root} ({', '.join(datasets)}): tabulate one at a time")
    directions: dict[str, bool] = finals[0]["primary"]  # each task's first metric -> higher is better
    keys, higher = list(directions), list(directions.values())
    untuned = json.loads(Path(zoo).read_text()) if zoo else {}
    by_method = {f["method"]: f for f in finals}
    base = by_method.get(baseline)
    head = "| method | " + " | ".join(keys) + " | Δm % tuned (↓) | best lr |" + (" Δm % untuned (↓) |" if zoo else "")
    lines = [head, "|---|" + "---|" * (len(keys) + 2 + (1 if zoo else 0))]
    for m, f in by_method.items():
        cells = [f"{100 * f['summary'][k][0]:.2f} ± {100 * f['summary'][k][1]:.2f}" for k in keys]
        if base is not None:
            ref = [base["summary"][k][0] for k in keys]
            dms = [delta_m([r[k] for k in keys], ref, higher) for r in f["test"].values()]
            dm = f"{sum(dms) / len(dms):+.2f}"
        else:
            dm = "n/a"
        lr = f["params"]["train.lr"] if "train.lr" in f["params"] else f["config"]["train"]["lr"]
        row = f"| {m} | " + " | ".join(cells) + f" | {dm} | {lr:.2g} |"
        if zoo:
            u = untuned.get(m, {}).get("delta_m") or []
            row += f" {sum(u) / len(u):+.2f} |" if u else " n/a |"
        lines.append(row)
    return "\n".join(lines)


def add_sweep_arguments(p: Any) -> None:
    """The flags of ``mtlkit sweep`` (an ``argparse`` parser)."""
    p.add_argument("--method", help="the method to tune (`mtlkit methods`; `constant`: fixed task weights, searched)")
    p.add_argument("--dataset", help="dataset name; it brings its defaults (mtlkit/configs/datasets.yaml)")
    p.add_argument("--config", help="base YAML run config (beneath the flags)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="base config overrides, e.g. the subset --set dataset.options.n_train=5000 (repeatable)",
    )
    p.add_argument(
        "--trials", type=int, default=20, help="finished trials the study should hold (a resumed sweep continues to it)"
    )
    p.add_argument("--epochs", type=int, help="epochs of every trial and final run (default: the dataset's)")
    p.add_argument("--jobs", type=int, default=1, help="trials trained at once, each in its own worker process")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker (default 1)")
    p.add_argument("--device", help="device of every trial and final run: auto, cpu, cuda, cuda:N (train.device)")
    p.add_argument("--out", help="sweep directory (default runs/sweeps/<dataset>-<method>)")
    p.add_argument("--space", help="YAML search space that overrides the derived one (see docs/guide/sweeps.md)")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="seeds of the final runs (default 1 2 3)")
    p.add_argument("--search-seed", type=int, default=0, help="training seed of every trial, and the sampler's seed")
    p.add_argument("--prune-startup", type=int, default=5, help="finished trials before the median rule prunes")
    p.add_argument("--prune-warmup", type=int, default=1, help="epochs of each trial never pruned")
    p.add_argument("--no-final", action="store_true", help="search only: no final runs, no test")
    p.add_argument("--overwrite", action="store_true", help="delete the sweep in --out and start afresh")
    p.add_argument(
        "--table",
        metavar="ROOT",
        help="train nothing: tabulate the finished sweeps under ROOT (one dataset) and write ROOT/tuned.md",
    )
    p.add_argument("--zoo", metavar="JSON", help="with --table: a `bench zoo` JSON whose untuned Δm is shown beside")


def cli_sweep(args: Any) -> int:
    """``mtlkit sweep``: run a sweep (or ``--table``); Ctrl-C says how to continue (exit status 130)."""
    import sys

    if args.table:
        text = tuned_table(args.table, args.zoo)
        (Path(args.table) / "tuned.md").write_text(text + "\n")
        print(text)
        return 0
    if args.zoo:
        raise ConfigError("--zoo only goes with --table")
    if not args.method:
        raise ConfigError("mtlkit sweep needs --method (or --table ROOT to tabulate finished sweeps)")
    a = SweepArgs(
        method=args.method,
        dataset=args.dataset,
        config=args.config,
        sets=list(args.set) + ([f"train.device={args.device}"] if getattr(args, "device", None) else []),
        trials=args.trials,
        epochs=args.epochs,
        jobs=args.jobs,
        threads=args.threads,
        out=args.out,
        space=args.space,
        seeds=list(args.seeds),
        search_seed=args.search_seed,
        prune_startup=args.prune_startup,
        prune_warmup=args.prune_warmup,
        final=not args.no_final,
        overwrite=args.overwrite,
    )
    try:
        final = run_sweep(a)
    except KeyboardInterrupt:
        print(
            "\nmtlkit: sweep interrupted; the running trial(s) are marked failed (interrupted) and will be run "
            "again. Continue with the same command.",
            file=sys.stderr,
        )
        return 130
    if final:
        print(final_markdown(final))
    return 0


__all__ = [
    "NOT_SEARCHED",
    "RANGES",
    "ParamSpec",
    "SealedSplit",
    "SweepArgs",
    "SweepCallback",
    "add_sweep_arguments",
    "apply_params",
    "best_config",
    "check_space",
    "cli_sweep",
    "final_markdown",
    "normalised_weights",
    "read_space_file",
    "run_sweep",
    "sealed",
    "search_space",
    "tuned_table",
    "work",
    "write_plots",
    "write_trials_csv",
]
