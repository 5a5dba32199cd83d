"""The registries (mtlkit._registry): options read from signatures, errors that list the valid names and options,
duplicates, positional arguments, lazy loading; the method registry built on it (classes, composites, factories,
the sum scale); and "adding a method is one file", trained through the command line."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from mtlkit._registry import DATASETS, METHODS, METRICS, MODELS, REPRODUCTIONS, REQUIRED, Option, Registry
from mtlkit.aggregation import MGDA, CAGrad, NashMTL, Sum, UPGrad
from mtlkit.aggregation._base import Aggregator
from mtlkit.config import RunConfig, check_run_config
from mtlkit.errors import ConfigError
from mtlkit.methods import (
    COMPOSITES,
    Composite,
    Method,
    available_methods,
    build_method,
    describe_method,
    method_options,
    method_parts,
    method_scale,
    register_method,
    zoo_methods,
)
from mtlkit.weighting import DBMTLAggregator, LogLoss, Weighting
from mtlkit.weighting.uw import UW


# ------------------------------------------------------------------------------------------------ Registry itself
def _widgets() -> Registry:
    reg: Registry = Registry("widget", positional=("data",))

    @reg.register("knob", colour="red")
    class Knob:
        """A knob.

        More text that is not the summary."""

        def __init__(self, data, size: float = 1.0, label: str = "k", *extra, **more) -> None:
            self.data, self.size, self.label = data, size, label

    @reg.register("dial")
    def dial(data, radius: float, ticks: int = 12) -> tuple:
        """A dial (a function)."""
        return data, radius, ticks

    return reg


def test_options_come_from_the_signature_without_positional_args_and_star_args():
    reg = _widgets()
    knob, dial = reg.get("knob"), reg.get("dial")
    assert list(knob.options) == ["size", "label"] and knob.open_ended  # **more: any option passes check
    assert knob.options["size"] == Option("size", 1.0, float)  # annotation evaluated
    assert list(dial.options) == ["radius", "ticks"] and not dial.open_ended
    assert dial.options["radius"].default is REQUIRED and dial.options["radius"].required
    assert knob.summary == "A knob." and dial.summary == "A dial (a function)."
    assert knob.module == __name__ and dict(knob.meta) == {"colour": "red"}
    with pytest.raises(TypeError):
        knob.meta["colour"] = "blue"  # type: ignore[index]                   # read-only
    assert reg.names() == ["dial", "knob"] and "dial" in reg and "lever" not in reg and len(reg) == 2
    assert [e.name for e in reg] == ["dial", "knob"] == [e.name for e in reg.entries()]
    assert reg["dial"] is dial.obj


def test_build_passes_positional_args_and_checks_options():
    reg = _widgets()
    assert reg.build("dial", "D", radius=2.0) == ("D", 2.0, 12)
    assert reg.build("knob", "D", size=3.0, anything=1).size == 3.0  # open-ended: not checked
    with pytest.raises(
        ConfigError,
        match=r"widget 'dial' has no option\(s\) \['ticcks'\]; its options are: "
        r"radius, ticks",
    ):
        reg.build("dial", "D", radius=1.0, ticcks=3)
    with pytest.raises(ConfigError, match=r"has no option\(s\) \['data'\]"):  # positional: not a user option
        reg.check("dial", {"data": 1})


def test_unknown_names_are_config_errors_listing_the_valid_ones():
    reg = _widgets()
    for call in (
        lambda: reg.get("lever"),
        lambda: reg.build("lever"),
        lambda: reg.check("lever", {}),
        lambda: reg["lever"],
    ):
        with pytest.raises(ConfigError, match=r"unknown widget 'lever'; valid widgets are: dial, knob"):
            call()
    assert issubclass(ConfigError, ValueError)


def test_a_name_registered_twice_with_another_object_is_a_programming_error():
    reg: Registry = Registry("widget")
    f = reg.register("f", len)
    assert f is len and reg.register("f", len) is len  # the same object again: fine
    with pytest.raises(ValueError, match="widget 'f' is registered twice"):
        reg.register("f", max)
    with pytest.raises(ValueError, match="non-empty string"):
        reg.register("", max)
    assert not isinstance(ValueError("x"), ConfigError)


def test_packages_are_imported_on_first_read_only(tmp_path, monkeypatch):
    pkg = tmp_path / "regpkg_lazy"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(
        "from mtlkit._registry import Registry\nREG = Registry('gizmo', packages=['regpkg_lazy'], skip=['skipped'])\n"
    )
    for mod in ("alpha", "_private", "skipped"):
        (pkg / f"{mod}.py").write_text(f"from regpkg_lazy import REG\nREG.register({mod!r}, object())\n")
    (tmp_path / "regmod_plain.py").write_text("from regpkg_lazy import REG\nREG.register('plain', object())\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        import regpkg_lazy

        reg = regpkg_lazy.REG
        reg.packages = ("regpkg_lazy", "regmod_plain")  # a package and a plain module
        reg.register("early", object())  # writing does not load
        assert "regpkg_lazy.alpha" not in sys.modules
        assert reg.names() == ["alpha", "early", "plain"]  # _private and skip: not imported
        assert "regpkg_lazy.alpha" in sys.modules and "regpkg_lazy.skipped" not in sys.modules
    finally:
        for m in [m for m in sys.modules if m.startswith(("regpkg_lazy", "regmod_plain"))]:
            del sys.modules[m]


def test_the_registries_of_the_package():
    assert {"multimnist", "yeast", "clips"} <= set(DATASETS.names())
    assert {"hps", "stl", "mtmlan", "mtvib"} <= set(MODELS.names())
    assert "data" not in MODELS.get("hps").options  # positional
    assert {"accuracy", "mae", "mse", "average_precision", "label_accuracy"} <= set(METRICS.names())
    assert METRICS.get("average_precision").meta["higher_is_better"] is True
    assert METRICS.get("mae").meta["higher_is_better"] is False
    assert {"mtvib", "mamo", "rrmtdl", "mtmlan", "mamg"} <= set(REPRODUCTIONS.names())
    assert REPRODUCTIONS.get("mtvib").summary == REPRODUCTIONS["mtvib"].help
    from mtlkit.reproduce import load_all

    assert load_all() == {e.name: e.obj for e in REPRODUCTIONS}


# ------------------------------------------------------------------------------------------------ method registry
def _init_options(cls: type) -> dict[str, object]:
    """``cls.__init__``'s keyword options with their defaults (REQUIRED where none), read independently of the
    registry (which reads them through inspect.signature(cls))."""
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]  # without self
    return {
        p.name: (REQUIRED if p.default is p.empty else p.default)
        for p in params
        if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    }


def test_every_method_s_options_are_its_constructors_options():
    """A class's options are its ``__init__``'s; a composite's are both constructors' minus the fixed ones: what
    ``mtlkit methods`` shows and ``build_method`` accepts cannot drift from the code."""
    for entry in METHODS:
        obj = entry.obj
        got = {k: o.default for k, o in entry.options.items()}
        if isinstance(obj, type):
            assert issubclass(obj, (Aggregator, Weighting)), entry.name
            assert got == _init_options(obj), entry.name
        elif isinstance(obj, Composite):
            want = {
                **{k: v for k, v in _init_options(obj.weighting).items() if k not in obj.weighting_fixed},
                **{k: v for k, v in _init_options(obj.aggregator).items() if k not in obj.aggregator_fixed},
            }
            assert got == want, entry.name
        got_plain = method_options(entry.name)
        assert got_plain == {k: (None if v is REQUIRED else v) for k, v in got.items()}, entry.name


def test_methods_that_exposed_only_some_options_expose_all():
    assert list(method_options("famo")) == ["lr", "weight_decay", "min_losses", "eps", "betas"]
    assert list(method_options("gradnorm")) == ["alpha", "lr", "optimizer", "betas", "eps", "min_weight"]
    assert build_method("famo", eps=1e-6, betas=(0.5, 0.9)).weighting.betas == (0.5, 0.9)
    assert build_method("gradnorm", min_weight=0.01).weighting.min_weight == 0.01


def test_defaults_are_those_of_the_former_factories():
    """The values the per-method factories passed before the classes registered themselves (issue 17)."""
    assert method_options("rlw") == {"seed": None, "total": "one"}
    assert method_options("gradvac") == {"beta": 0.01, "seed": 0}
    assert method_options("mgda") == {"max_iter": 250, "tol": 1e-7, "solver": "exact"}
    assert method_options("cagrad") == {"c": 0.4, "rescale": 1}
    assert method_options("nash_mtl") == {
        "update_weights_every": 1,
        "max_norm": 0.0,
        "normalize": False,
        "max_iter": 100,
        "tol": 1e-9,
    }
    assert build_method("graddrop").level == "representation" and build_method("mgda").level == "parameter"
    assert build_method("stl").single_task and not build_method("ew").single_task


def test_classes_build_the_method_they_stand_for():
    m = build_method("CAGrad", c=0.5)  # names are case-insensitive
    assert m.name == "cagrad" and type(m.weighting).__name__ == "EW" and isinstance(m.aggregator, CAGrad)
    assert m.aggregator.c == 0.5
    m = build_method("uw", form="classification")
    assert isinstance(m.weighting, UW) and type(m.aggregator) is Sum and m.weighting.form == "classification"
    with pytest.raises(ConfigError, match=r"method 'cagrad' has no option\(s\) \['cc'\]; its options are: c, rescale"):
        build_method("cagrad", cc=0.5)
    with pytest.raises(ConfigError, match=r"unknown method 'nosuch'; valid methods are: .*cagrad"):
        build_method("nosuch")
    with pytest.raises(ConfigError, match="unknown level"):
        build_method("mgda", level="encoder")


def test_composites_route_each_option_to_its_constructor():
    m = build_method("dbmtl", beta=0.5, beta_sigma=0.1, eps=1e-6)
    assert isinstance(m.weighting, LogLoss) and isinstance(m.aggregator, DBMTLAggregator)
    assert (m.aggregator.beta, m.aggregator.beta_sigma, m.aggregator.eps) == (0.5, 0.1, 1e-6)
    assert m.weighting.eps == 1e-8  # fixed
    m = build_method("mtvib", init_log_var=0.3)
    assert isinstance(m.weighting, UW) and m.weighting.form == "classification" and m.weighting.init_log_var == 0.3
    with pytest.raises(ConfigError, match=r"no option\(s\) \['form'\]"):  # fixed: not an option
        build_method("mtvib", form="regression")
    assert type(build_method("mean").aggregator).__name__ == "Mean"
    assert set(COMPOSITES) == {"ew", "stl", "mean", "mtvib", "dbmtl"}


def test_a_composite_s_signature_and_its_refusals():
    c = Composite(weighting=UW, aggregator=CAGrad, weighting_fixed={"form": "classification"}, summary="UW + CAGrad.")
    sig = inspect.signature(c)
    assert list(sig.parameters) == ["init_log_var", "c", "rescale"]
    assert all(p.kind is p.KEYWORD_ONLY for p in sig.parameters.values())
    m = c(c=0.1, init_log_var=2.0)
    assert m.aggregator.c == 0.1 and m.weighting.init_log_var == 2.0 and m.weighting.form == "classification"
    assert inspect.getdoc(c) == "UW + CAGrad." and c.__module__ == __name__
    with pytest.raises(ValueError, match=r"\['eps'\] are taken by both LogLoss and DBMTLAggregator"):
        Composite(weighting=LogLoss, aggregator=DBMTLAggregator)
    with pytest.raises(ValueError, match=r"UW has no option\(s\) \['colour'\] to fix"):
        Composite(weighting=UW, weighting_fixed={"colour": "red"})


def test_a_user_factory_registers_and_builds(capsys):
    @register_method("_test_factory", zoo=False, zoo_reason="a test's own method")
    def factory(k: int = 2) -> Method:
        """A user's factory: UPGrad after EW."""
        from mtlkit.weighting import EW

        return Method(EW(), UPGrad(), level="representation")

    m = build_method("_test_factory")
    assert isinstance(m.aggregator, UPGrad) and m.level == "representation" and m.name == "_test_factory"
    assert method_options("_test_factory") == {"k": 2} and method_parts("_test_factory") == (None, None, False)
    assert method_scale("_test_factory") == "mean" and "_test_factory" not in zoo_methods()
    assert describe_method("_test_factory").startswith("_test_factory (k=2) [parameter level, mean scale]")
    with pytest.raises(ValueError, match="lower case"):
        register_method("Bad")


def test_zoo_lists_come_from_the_registry():
    zoo = zoo_methods()
    assert zoo[:2] == ["stl", "ew"]
    assert set(zoo) == {e.name for e in METHODS if e.meta.get("zoo", True)}
    for name in ("mtmlan_tdb", "constant"):
        assert name not in zoo and METHODS.get(name).meta["zoo_reason"]
    from mtlkit import bench

    assert bench.DEFAULT_ZOO == zoo and "nash_mtl" not in bench.default_zoo("sum")


# ---------------------------------------------------------------------------------------------------- the scale
def test_build_method_scale_sum():
    for name in ("ew", "uw", "pcgrad", "aligned_mtl"):  # already on the sum scale: unchanged
        assert type(build_method(name, scale="sum").aggregator) is type(build_method(name).aggregator)
    J = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    for name in ("mean", "mgda", "upgrad", "dualproj", "cagrad", "imtl_g"):
        native, summed = build_method(name).aggregator, build_method(name, scale="sum").aggregator
        assert summed.scale == "sum" and summed.gramian_based == native.gramian_based, name
        torch.testing.assert_close(summed(J), 3 * native(J), msg=name)
    with pytest.raises(ConfigError, match=r"method 'nash_mtl' \(NashMTL\) cannot be put on the sum scale"):
        build_method("nash_mtl", scale="sum")
    with pytest.raises(ConfigError, match="unknown method scale 'double'; valid scales are: native, sum"):
        build_method("mgda", scale="double")  # type: ignore[arg-type]
    assert method_scale("mgda") == "convex" and method_scale("nash_mtl") == "fixed_norm"
    assert method_scale("dbmtl") == "sum" and method_scale("imtl_g") == "affine"


def test_config_key_method_scale():
    assert RunConfig().method.scale == "native"
    cfg = RunConfig.from_dict({"method": {"name": "mgda", "scale": "sum"}})
    check_run_config(cfg)
    with pytest.raises(ConfigError, match="cannot be put on the sum scale"):
        check_run_config(RunConfig.from_dict({"method": {"name": "nash_mtl", "scale": "sum"}}))
    with pytest.raises(ConfigError, match=r"unknown method\.scale 'twice'; valid scales are: native, sum"):
        check_run_config(RunConfig.from_dict({"method": {"name": "mgda", "scale": "twice"}}))


def test_mtlkit_methods_lists_every_option_and_scale(capsys):
    from mtlkit.cli import main

    assert main(["methods"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.startswith("  ")}
    assert set(available_methods()) <= set(lines)
    for name in available_methods():
        for option in method_options(name):
            assert f"{option}=" in lines[name] or f" {option}," in lines[name] or f"({option}" in lines[name], (
                name,
                option,
                lines[name],
            )
        assert f"{method_scale(name)} scale" in lines[name], lines[name]
    assert main(["methods", "mgda"]) == 0
    out = capsys.readouterr().out
    assert "scale: convex" in out and "mtlkit.aggregation.mgda.MGDA" in out


def test_methods_describe_their_scale_in_detail():
    text = describe_method("nash_mtl", detail=True)
    assert "scale: fixed_norm: the update is of a norm set by T" in text
    assert "[parameter level, fixed_norm scale]" in text.splitlines()[0]
    assert isinstance(build_method("mgda").aggregator, MGDA) and isinstance(NashMTL(), Aggregator)


# ------------------------------------------------------------------------------------ adding a method is one file
USER_METHOD = '''
"""A user's own method: this file is all it takes (no edit of mtlkit)."""
import os

import torch

from mtlkit.methods import register_method
from mtlkit.weighting import Weighting


@register_method("mynew")
class MyNew(Weighting):
    """Every task's loss times ``factor`` (a user's method)."""

    def __init__(self, factor: float = 1.0) -> None:
        super().__init__()
        self.factor = float(factor)

    def forward(self, losses, ctx=None):
        self._prepare(losses)
        if self.training and os.environ.get("MYNEW_LOG"):
            with open(os.environ["MYNEW_LOG"], "a") as f:
                f.write(f"{self.factor}\\n")
        return self.factor * losses

    def weights(self):
        return None if self.num_tasks is None else torch.full((self.num_tasks,), self.factor)
'''


@pytest.mark.data("mnist")
def test_adding_a_method_is_one_file(tmp_path):
    """A module file that registers a new Weighting class, loaded with ``mtlkit --import``, trains through the CLI
    with its option applied (the method's own log shows the value it was built with)."""
    (tmp_path / "mymethod.py").write_text(textwrap.dedent(USER_METHOD))
    run, log = tmp_path / "run", tmp_path / "factor.log"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]),
        "MYNEW_LOG": str(log),
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }
    env.pop("MTLKIT_DEBUG", None)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mtlkit.cli",
            "--import",
            "mymethod",
            "train",
            "--dataset",
            "multimnist",
            "--set",
            "dataset.options.n_train=300",
            "--set",
            "dataset.options.n_test=100",
            "--epochs",
            "1",
            "--batch-size",
            "64",
            "--set",
            "model.options={encoder: mlp, hidden: [16], head_hidden: 8}",
            "--set",
            "output.tensorboard=false",
            "--method",
            "mynew",
            "--set",
            "method.options.factor=0.5",
            "--run-dir",
            str(run),
            "--no-progress",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads((run / "results.json").read_text())
    assert results["test"], results
    seen = log.read_text().split()
    assert seen and set(seen) == {"0.5"}, seen  # every training step: factor 0.5
    # the same module, listed by `mtlkit methods`, with its option and scale
    listing = subprocess.run(
        [sys.executable, "-m", "mtlkit.cli", "--import", "mymethod", "methods"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "  mynew (factor=1.0) [sum scale]: Every task's loss times ``factor``" in listing.stdout, listing.stdout


def test_an_unimportable_user_module_is_a_usage_error(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    (tmp_path / "broken_method.py").write_text("raise RuntimeError('boom')\n")
    proc = subprocess.run(
        [sys.executable, "-m", "mtlkit.cli", "--import", "broken_method", "methods"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and "cannot import 'broken_method': RuntimeError: boom" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert Path(tmp_path / "broken_method.py").exists()
