"""The ``mtlkit`` command line: train, eval, data, methods, reproduce, bench.

Example:
    >>> build_parser().parse_args(["train", "--method", "mgda"]).method
    'mgda'
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from importlib import resources
from pathlib import Path

from mtlkit.errors import ConfigError, MTLKitError


def _default_config_path() -> Path:
    return Path(str(resources.files("mtlkit") / "configs" / "default.yaml"))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mtlkit", description="Multi-task learning: methods, architectures, benchmarks.")
    p.add_argument("--cache-dir", help="dataset cache directory (sets MTLKIT_CACHE_DIR)")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model (no arguments: the embedded default on a reduced MultiMNIST)",
                       description="Train with a YAML config; flags override it. With no config the embedded default "
                                   "(MultiMNIST, 20k images, HPS + EW, 3 epochs) is used.")
    t.add_argument("--config", help="YAML run config (see configs/)")
    t.add_argument("--method", help="method name (see `mtlkit methods`)")
    t.add_argument("--dataset", help="dataset name")
    t.add_argument("--model", help="model name")
    t.add_argument("--seed", type=int)
    t.add_argument("--epochs", type=int)
    t.add_argument("--lr", type=float)
    t.add_argument("--batch-size", type=int)
    t.add_argument("--device", help="auto, cpu, cuda, cuda:N")
    t.add_argument("--level", choices=["parameter", "representation"], help="where aggregators work")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, e.g. --set method.options.c=0.4 (repeatable)")
    t.add_argument("--run-dir", help="output directory (default runs/<dataset>-<method>-s<seed>)")
    t.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    t.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its last checkpoint")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")

    e = sub.add_parser("eval", help="evaluate a saved run on its test split (optionally under attack)")
    e.add_argument("run_dir")
    e.add_argument("--split", default="test", choices=["train", "val", "test"])
    e.add_argument("--attack", choices=["none", "fgsm", "pgd"], default="none")
    e.add_argument("--eps", type=float, nargs="+", default=[0.0], help="attack strengths on [0,1] pixels")
    e.add_argument("--target-task", help="attack one task's loss instead of the summed loss")
    e.add_argument("--pgd-steps", type=int, default=10)

    d = sub.add_parser("data", help="fetch and inspect the cached datasets")
    dsub = d.add_subparsers(dest="data_command", required=True)
    f = dsub.add_parser("fetch", help="fetch, verify and cache a source dataset")
    f.add_argument("names", nargs="*", help="mnist, fashion, yeast, census (default: mnist and fashion)")
    f.add_argument("--force", action="store_true", help="rebuild the cached arrays")
    dsub.add_parser("list", help="list cached files")

    m = sub.add_parser("methods", help="list the methods (options, defaults, summary), models and datasets; or "
                                       "document the named methods")
    m.add_argument("names", nargs="*", help="methods to document in full (paper, equations, choices, options)")

    r = sub.add_parser("reproduce", help="re-run a paper's experiments on the data we have")
    from mtlkit.reproduce import load_all

    rsub = r.add_subparsers(dest="paper", required=True)
    for name, rep in sorted(load_all().items()):
        rp = rsub.add_parser(name, help=rep.help, description=rep.help)
        rep.add_arguments(rp)

    b = sub.add_parser("bench", help="benchmarks (method zoo tables)")
    bsub = b.add_subparsers(dest="bench_command", required=True)
    z = bsub.add_parser("zoo", help="train the method zoo and tabulate per-task accuracy and Δm vs STL")
    from mtlkit.bench import add_zoo_arguments

    add_zoo_arguments(z)
    return p


def _train(args: argparse.Namespace) -> int:
    from mtlkit.config import RunConfig
    from mtlkit.train import Trainer, format_results

    if args.resume and not args.run_dir:
        raise MTLKitError("--resume needs --run-dir (the run to continue)")
    if args.resume and not args.config:
        cfg = RunConfig.from_yaml(Path(args.run_dir) / "config.yaml")
    else:
        cfg = RunConfig.from_yaml(args.config or _default_config_path())
    sets = list(args.set)
    for flag, key in (("method", "method.name"), ("dataset", "dataset.name"), ("model", "model.name"),
                      ("seed", "train.seed"), ("epochs", "train.epochs"), ("lr", "train.lr"),
                      ("batch_size", "train.batch_size"), ("device", "train.device"), ("level", "method.level")):
        v = getattr(args, flag)
        if v is not None:
            sets.append(f"{key}={v}")
    if args.no_progress:
        sets.append("train.progress=false")
    if args.overwrite:
        sets.append("output.overwrite=true")
    if args.run_dir:
        sets.append(f"output.dir={args.run_dir}")
    cfg = cfg.override(sets)
    trainer = Trainer(cfg)
    print(f"mtlkit: {cfg.dataset.name} ({len(trainer.data.train)} train / {len(trainer.data.val)} val / "
          f"{len(trainer.data.test)} test), model {cfg.model.name}, method {cfg.method.name}, device {trainer.device}, "
          f"run dir {trainer.run_dir}", file=sys.stderr)
    try:
        res = trainer.fit(resume=args.resume)
    except KeyboardInterrupt:  # Ctrl-C: say what was kept and how to go on, instead of a traceback
        ck = trainer.run_dir / "checkpoint.pt"
        if ck.is_file():
            import torch

            st = torch.load(ck, map_location="cpu", weights_only=False)
            at = (f"batch {st['in_epoch']['batch']} of epoch {st['epoch'] + 2}" if st.get("in_epoch")
                  else f"the end of epoch {st['epoch'] + 1}")
            print(f"\nmtlkit: interrupted; {ck} holds the run as of {at}. Continue it with:\n"
                  f"  mtlkit train --run-dir {trainer.run_dir} --resume", file=sys.stderr)
        else:
            print(f"\nmtlkit: interrupted before the first checkpoint; nothing to resume in {trainer.run_dir}",
                  file=sys.stderr)
        return 130
    print(f"\nTest results ({cfg.dataset.name}, {cfg.method.name}, seed {cfg.train.seed}; model selected on "
          f"validation, best epoch {res.best_epoch}; {res.seconds:.0f}s):")
    print(format_results(trainer.tasks, res.test))
    print(f"\nrun directory: {res.run_dir}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from mtlkit.evaluation import evaluate_run

    out = evaluate_run(args.run_dir, split=args.split, attack=args.attack, eps=args.eps,
                       target_task=args.target_task, pgd_steps=args.pgd_steps)
    print(json.dumps(out, indent=2))
    return 0


def _data(args: argparse.Namespace) -> int:
    from mtlkit.data import sources

    if args.data_command == "list":
        print(sources.describe_cache())
        return 0
    from mtlkit.data.entangled import load_census
    from mtlkit.data.yeast import load_yeast

    tabular = {"yeast": load_yeast, "census": load_census}  # cached .npz files named after the dataset
    valid = sorted(sources.IMAGE_SOURCES) + sorted(tabular)
    unknown = [n for n in args.names if n not in valid]
    if unknown:
        raise MTLKitError(f"unknown dataset(s) {unknown}; `mtlkit data fetch` knows: {', '.join(valid)}")
    for n in args.names or sorted(sources.IMAGE_SOURCES):
        if n in tabular:
            cached = sources.cache_dir() / f"{n}.npz"
            if args.force:
                for p in (cached, cached.with_suffix(".npz.sha256")):
                    p.unlink(missing_ok=True)
            tabular[n]()
            path = cached
        else:
            path = sources.fetch(n, force=args.force)
        print(f"{n}: {path}")
    return 0


def _methods(args: argparse.Namespace) -> int:
    from mtlkit.data import available_datasets
    from mtlkit.methods import available_methods, describe_method
    from mtlkit.models import available_models

    if args.names:
        print("\n\n".join(describe_method(n, detail=True) for n in args.names))
        return 0
    print("methods (name (options with defaults): summary; `mtlkit methods NAME` documents one; set options with "
          "--set method.options.KEY=VALUE):")
    for n in available_methods():
        print("  " + describe_method(n))
    print("models: " + ", ".join(available_models()))
    print("datasets: " + ", ".join(available_datasets()))
    return 0


def _run_command(args: argparse.Namespace) -> int:
    if args.command == "reproduce":
        from mtlkit.reproduce import REPRODUCTIONS

        return REPRODUCTIONS[args.paper].run(args)
    if args.command == "bench":
        from mtlkit.bench import run_zoo

        try:
            return run_zoo(args)
        except KeyboardInterrupt:  # finished runs and checkpoints stay; say how to go on
            print(f"\nmtlkit: interrupted; the finished runs and the stopped runs' checkpoints are kept in "
                  f"{args.out}: run the same command with --reuse to continue", file=sys.stderr)
            return 130
    handlers = {"train": _train, "eval": _eval, "data": _data, "methods": _methods}
    return handlers[args.command](args)


def _tune_allocator() -> None:
    """The CLI owns its process: keep freed CPU memory for reuse (mtlkit.malloc) unless MTLKIT_MALLOC_TUNING=0."""
    setting = os.environ.get("MTLKIT_MALLOC_TUNING", "1")
    if setting not in ("0", "1"):
        raise ConfigError(f"MTLKIT_MALLOC_TUNING must be 0 (glibc's defaults) or 1 (tuned, the default), "
                          f"got {setting!r}")
    if setting == "1":
        from mtlkit.malloc import tune_cpu_allocator

        tune_cpu_allocator()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.cache_dir:
        os.environ["MTLKIT_CACHE_DIR"] = args.cache_dir
    try:
        _tune_allocator()
        rc = _run_command(args)
        sys.stdout.flush()  # inside the try: a reader that left is seen here, not in Python's flush at exit
        return rc
    except MTLKitError as e:
        print(f"mtlkit: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `mtlkit methods | head`: the reader left; stop quietly, as Unix tools do
        # Point stdout at devnull so Python's flush at exit does not raise a second time (Python docs, "SIGPIPE").
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a tool killed by the broken pipe


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
