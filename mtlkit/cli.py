"""The ``mtlkit`` command line: train, eval, data, methods, reproduce, bench, report, sweep.

Example:
    >>> build_parser().parse_args(["train", "--method", "mgda"]).method
    'mgda'
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from mtlkit.errors import ConfigError, MTLKitError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mtlkit", description="Multi-task learning: methods, architectures, benchmarks.")
    p.add_argument("--cache-dir", help="dataset cache directory (sets MTLKIT_CACHE_DIR)")
    p.add_argument(
        "--debug", action="store_true", help="show the traceback of any error instead of one line (also MTLKIT_DEBUG=1)"
    )
    p.add_argument(
        "--import",
        dest="imports",
        action="append",
        default=[],
        type=_import_module,
        metavar="MODULE",
        help="import this Python module (on sys.path, e.g. PYTHONPATH=.) before the command runs, so that "
        "the methods, models, datasets and metrics it registers can be used (repeatable)",
    )
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser(
        "train",
        help="train a model (no arguments: the embedded default on a reduced MultiMNIST)",
        description="Train with a YAML config; flags override it. With no config the embedded default "
        "(MultiMNIST, 20k images, HPS + EW, 3 epochs) is used.",
    )
    t.add_argument("--config", help="YAML run config (see configs/)")
    t.add_argument("--method", help="method name (see `mtlkit methods`)")
    t.add_argument(
        "--dataset",
        help="dataset name (`mtlkit methods` lists them); each brings its own defaults "
        "(options, model, batch size, epochs: mtlkit/configs/datasets.yaml) beneath "
        "--config and the other flags",
    )
    t.add_argument("--model", help="model name")
    t.add_argument("--seed", type=int)
    t.add_argument("--epochs", type=int)
    t.add_argument("--lr", type=float)
    t.add_argument("--batch-size", type=int)
    t.add_argument("--device", help="auto, cpu, cuda, cuda:N")
    t.add_argument(
        "--precision",
        choices=["fp32", "bf16", "fp16"],
        help="bf16, fp16: the training forward pass under autocast (train.precision; weights and aggregation stay "
        "fp32); fp16 adds a gradient scaler and is meant for CUDA (on CPU: for testing)",
    )
    t.add_argument("--level", choices=["parameter", "representation"], help="where aggregators work")
    t.add_argument(
        "--nproc",
        type=int,
        help="data parallel: train in N local processes (torch.distributed.run; gloo on CPU, nccl on CUDA), with "
        "the same result as one process on the same global batch; several machines: torchrun --nnodes ... -m "
        "mtlkit train ...",
    )
    t.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any config key, e.g. --set method.options.c=0.4 (repeatable)",
    )
    t.add_argument("--run-dir", help="output directory (default runs/<dataset>-<method>-s<seed>)")
    t.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    t.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its last checkpoint")
    t.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bar (without it: a bar on a terminal, a plain line every 30 s otherwise)",
    )

    from mtlkit.robustness import DEFAULT_EPS

    grid = " ".join(f"{v:g}" for v in DEFAULT_EPS)
    e = sub.add_parser(
        "eval",
        help="evaluate a saved run on its test split (optionally under attack)",
        description="Evaluate a saved run's validation-selected model, clean or under FGSM/PGD. The "
        "results are printed and written to RUN_DIR/eval_<split>_<attack>.json "
        "(_<task> added with --target-task); an existing file is kept unless --overwrite.",
    )
    e.add_argument("run_dir", help="a finished run directory (mtlkit train --run-dir)")
    e.add_argument("--split", default="test", choices=["train", "val", "test"])
    e.add_argument("--attack", choices=["none", "fgsm", "pgd"], default="none")
    e.add_argument(
        "--eps",
        type=_attack_strength,
        nargs="+",
        default=None,
        metavar="ETA",
        help=f"attack strengths on [0,1] pixels, finite and >= 0 (fgsm/pgd only; default {grid}: the grid "
        f"of MTVIB's Tables III/IV, η = 0 being the clean input)",
    )
    e.add_argument("--target-task", help="attack one task's loss instead of the summed loss (fgsm/pgd only)")
    e.add_argument(
        "--pgd-steps",
        type=_positive_int,
        default=None,
        metavar="N",
        help="signed-gradient steps of PGD, >= 1 (--attack pgd only; default 10)",
    )
    e.add_argument("--overwrite", action="store_true", help="replace an existing results file of the same evaluation")
    e.add_argument("--device", default="cpu", help="auto, cpu, cuda, cuda:N (where the model is evaluated)")

    d = sub.add_parser("data", help="fetch and inspect the cached datasets")
    dsub = d.add_subparsers(dest="data_command", required=True)
    f = dsub.add_parser("fetch", help="fetch, verify and cache a source dataset")
    f.add_argument("names", nargs="*", help="mnist, fashion, yeast, census, qm9 (default: mnist and fashion)")
    f.add_argument("--force", action="store_true", help="rebuild the cached arrays")
    dsub.add_parser("list", help="list cached files")

    m = sub.add_parser(
        "methods",
        help="list the methods (options, defaults, summary), models and datasets; or document the named methods",
    )
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

    sw = sub.add_parser(
        "sweep",
        help="tune a method's options and learning rate on validation (Optuna), then test the best with 3 seeds",
        description="Search a method's options and the learning rate on the validation split (TPE, median "
        "pruning, SQLite study in --out: the same command resumes), then train the best configuration with "
        "each --seeds and report test. Writes best.yaml (for `mtlkit train --config`), trials.csv and "
        "Optuna's plots. Needs optuna (pip install -e '.[sweep]').",
    )
    from mtlkit.sweep import add_sweep_arguments

    add_sweep_arguments(sw)

    rp = sub.add_parser(
        "report",
        help="one self-contained HTML page of runs: curves, task weights, gradient conflicts, Pareto scatter",
        description="Write one HTML page (plots embedded, no web access needed to view it) of the run "
        "directories: loss and metric curves, and from each run's monitor.jsonl the task-weight trajectories, "
        "the conflict heatmap and the per-task gradient norms; for several runs a Pareto scatter of the "
        "per-task test metrics. Runs still training are read as they stand.",
    )
    rp.add_argument("runs", nargs="+", metavar="RUN", help="run directories (mtlkit train --run-dir)")
    rp.add_argument("--out", default="report.html", help="the HTML file to write (default: report.html)")
    rp.add_argument("--overwrite", action="store_true", help="replace --out even if it is not an earlier mtlkit report")
    return p


def _import_module(name: str) -> str:
    """argparse type of ``--import``: import the module ``name`` now (while the command line is parsed, before the
    command runs); an import that fails is a usage error naming the module."""
    import importlib

    try:
        importlib.import_module(name)
    except Exception as e:  # the user's module: any error it raises is reported as the import's failure
        raise argparse.ArgumentTypeError(f"cannot import {name!r}: {type(e).__name__}: {e}") from None
    return name


def _train(args: argparse.Namespace) -> int:
    from mtlkit.config import RunConfig
    from mtlkit.train import Trainer, check_run_dir, format_results

    if args.resume and not args.run_dir:
        raise MTLKitError("--resume needs --run-dir (the run to continue)")
    if args.nproc is not None:
        if args.nproc < 1:
            raise MTLKitError(f"--nproc must be >= 1, got {args.nproc}")
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise MTLKitError("--nproc inside a torchrun launch: pass one of them (torchrun already started the ranks)")
        if args.nproc > 1:
            from mtlkit.distributed import launch_local

            return launch_local(args.nproc, _without_nproc(args.argv))
    rank = int(os.environ.get("RANK", "0"))
    if args.resume and args.overwrite:
        raise MTLKitError(
            "--resume and --overwrite contradict each other: --resume continues the run in --run-dir, "
            "--overwrite deletes it and trains afresh; pass one of them"
        )
    sets = list(args.set)
    for flag, key in (
        ("method", "method.name"),
        ("dataset", "dataset.name"),
        ("model", "model.name"),
        ("seed", "train.seed"),
        ("epochs", "train.epochs"),
        ("lr", "train.lr"),
        ("batch_size", "train.batch_size"),
        ("device", "train.device"),
        ("precision", "train.precision"),
        ("level", "method.level"),
    ):
        v = getattr(args, flag)
        if v is not None:
            sets.append(f"{key}={v}")
    if args.no_progress:
        sets.append("train.progress=false")
    if args.overwrite:
        sets.append("output.overwrite=true")
    if args.run_dir:
        sets.append(f"output.dir={args.run_dir}")
    # Layered and checked before any data is loaded (RunConfig.resolve): the chosen dataset's defaults beneath
    # --config and the flags; a run's own config.yaml is complete, so a resume gets no dataset defaults beneath it.
    resuming = args.resume and not args.config
    cfg = RunConfig.resolve(
        Path(args.run_dir) / "config.yaml" if resuming else args.config, sets, dataset_defaults=not resuming
    )
    if rank == 0:  # rank 0 owns the run directory (the others would find it locked)
        check_run_dir(cfg, resume=args.resume)  # run-directory errors before the (maybe long) dataset build
    trainer = Trainer(cfg)
    if trainer.dp.active and rank == 0:
        print(f"mtlkit: data parallel, {trainer.dp.world_size} processes", file=sys.stderr)
    if rank == 0:
        print(
            f"mtlkit: {cfg.dataset.name} ({len(trainer.data.train)} train / {len(trainer.data.val)} val / "
            f"{len(trainer.data.test)} test), model {cfg.model.name}, method {cfg.method.name}, device {trainer.device}, "
            f"run dir {trainer.run_dir}",
            file=sys.stderr,
        )
    try:
        res = trainer.fit(resume=args.resume)
    except KeyboardInterrupt:  # Ctrl-C: say what was kept and how to go on, instead of a traceback
        from mtlkit.runs import checkpoint_meta
        from mtlkit.train import resume_command

        ck = trainer.run_dir / "checkpoint.pt"
        done = checkpoint_meta(ck)  # what the (verified) checkpoint holds: {"epoch": finished, "batch": or None}
        if done:
            at = (
                f"batch {done['batch']} of epoch {done['epoch'] + 1}"
                if done.get("batch")
                else f"the end of epoch {done['epoch']}"
            )
            print(
                f"\nmtlkit: interrupted; {ck} holds the run as of {at}. Continue it with:\n"
                f"  {resume_command(trainer.run_dir, cfg)}",
                file=sys.stderr,
            )
        else:
            print(
                f"\nmtlkit: interrupted before the first checkpoint; nothing to resume in {trainer.run_dir}",
                file=sys.stderr,
            )
        return 130
    if rank != 0:  # rank 0 reports for every rank
        return 0
    per_task = " per task" if isinstance(res.best_epoch, dict) else ""
    print(
        f"\nTest results ({cfg.dataset.name}, {cfg.method.name}, seed {cfg.train.seed}, {cfg.train.epochs} epochs; "
        f"model selected on validation{per_task}; {res.seconds:.0f}s):"
    )
    print(format_results(trainer.tasks, res.test, res.best_epoch))
    print(f"\nrun directory: {res.run_dir}")
    return 0


def _attack_strength(text: str) -> float:
    """argparse type of ``eval --eps``: a finite number >= 0 (checked before anything is loaded)."""
    import math

    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(v) and v >= 0):
        raise argparse.ArgumentTypeError(f"attack strength {text} must be a finite number >= 0 (pixels lie in [0, 1])")
    return v


def _positive_int(text: str) -> int:
    """argparse type of counts such as ``eval --pgd-steps``: an integer >= 1."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def _eval(args: argparse.Namespace) -> int:
    from mtlkit.evaluation import check_run_dir, eval_result_path, evaluate_run
    from mtlkit.robustness import DEFAULT_EPS
    from mtlkit.runs import atomic_write_text

    # Flags the chosen attack would ignore are errors, not silently dropped (e.g. --eps 0.1 with no attack would
    # report clean accuracy under the key "0.1").
    ignored = {"--eps": args.eps, "--target-task": args.target_task, "--pgd-steps": args.pgd_steps}
    applies = {"none": (), "fgsm": ("--eps", "--target-task"), "pgd": ("--eps", "--target-task", "--pgd-steps")}
    bad = [f for f, v in ignored.items() if v is not None and f not in applies[args.attack]]
    if bad:
        raise ConfigError(
            f"{' and '.join(bad)} {'does' if len(bad) == 1 else 'do'} not apply to --attack "
            f"{args.attack}"
            + (" (the inputs are clean)" if args.attack == "none" else "")
            + "; "
            + ("choose --attack fgsm or pgd" if args.attack == "none" else "use --attack pgd")
        )
    eps = list(dict.fromkeys(args.eps)) if args.eps else [0.0] if args.attack == "none" else list(DEFAULT_EPS)
    run = check_run_dir(args.run_dir)
    path = eval_result_path(run, args.split, args.attack, args.target_task)
    if path.exists() and not args.overwrite:
        raise ConfigError(
            f"{path} exists (an earlier mtlkit eval of this split and attack); pass --overwrite to replace it"
        )
    out = evaluate_run(
        run,
        split=args.split,
        attack=args.attack,
        eps=eps,
        target_task=args.target_task,
        pgd_steps=args.pgd_steps or 10,
        device=args.device,
    )
    text = json.dumps(out, indent=2)
    atomic_write_text(path, text + "\n")  # written whole, then renamed: never a half-written results file
    print(text)
    print(f"mtlkit: results written to {path}", file=sys.stderr)
    return 0


def _data(args: argparse.Namespace) -> int:
    from mtlkit.data import sources

    if args.data_command == "list":
        print(sources.describe_cache())
        return 0
    valid = sources.source_names()
    unknown = [n for n in args.names if n not in valid]
    if unknown:  # every name is checked before anything is fetched
        raise MTLKitError(f"unknown dataset(s) {unknown}; `mtlkit data fetch` knows: {', '.join(valid)}")
    for n in args.names or sorted(sources.IMAGE_SOURCES):
        path = sources.fetch(n, force=args.force)
        print(f"{n}: {path}")
    return 0


def _methods(args: argparse.Namespace) -> int:
    from mtlkit._registry import DATASETS, METHODS, MODELS
    from mtlkit.methods import describe_method

    if args.names:
        print("\n\n".join(describe_method(n, detail=True) for n in args.names))
        return 0
    print(
        "methods (name (options with defaults) [level, output scale]: summary; `mtlkit methods NAME` documents one; "
        "set options with --set method.options.KEY=VALUE; scale: sum = like EW's sum of the task gradients, "
        "mean/convex/affine = like one gradient (--set method.scale=sum multiplies them by T), fixed_norm = a norm "
        "set by T):"
    )
    for n in METHODS.names():
        print("  " + describe_method(n))
    print("models: " + ", ".join(MODELS.names()))
    print("datasets: " + ", ".join(DATASETS.names()))
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
            print(
                f"\nmtlkit: interrupted; the finished runs and the stopped runs' checkpoints are kept in "
                f"{args.out}: run the same command with --reuse to continue",
                file=sys.stderr,
            )
            return 130
    if args.command == "sweep":
        from mtlkit.sweep import cli_sweep

        return cli_sweep(args)
    if args.command == "report":
        from mtlkit.report import write_report

        write_report(args.runs, args.out, overwrite=args.overwrite)  # logs where it wrote
        return 0
    handlers = {"train": _train, "eval": _eval, "data": _data, "methods": _methods}
    return handlers[args.command](args)


def _without_nproc(argv: list[str]) -> list[str]:
    """``argv`` without its ``--nproc N`` (or ``--nproc=N``)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


def _tune_allocator() -> None:
    """The CLI owns its process: keep freed CPU memory for reuse (mtlkit.malloc) unless MTLKIT_MALLOC_TUNING=0."""
    setting = os.environ.get("MTLKIT_MALLOC_TUNING", "1")
    if setting not in ("0", "1"):
        raise ConfigError(
            f"MTLKIT_MALLOC_TUNING must be 0 (glibc's defaults) or 1 (tuned, the default), got {setting!r}"
        )
    if setting == "1":
        from mtlkit.malloc import tune_cpu_allocator

        tune_cpu_allocator()


def main(argv: list[str] | None = None) -> int:
    """Run one command; errors mtlkit can explain (its own, an OSError naming a path, Ctrl-C) end in one line on
    stderr and exit status 2 (130 for Ctrl-C); anything else is a bug and keeps its traceback. ``--debug`` or
    ``MTLKIT_DEBUG=1`` shows the traceback of every error."""
    argv = sys.argv[1:] if argv is None else list(argv)
    # Before parsing: Ctrl-C while the parser imports the methods (torch) is caught as well.
    debug = (
        os.environ.get("MTLKIT_DEBUG", "") not in ("", "0")
        or "--debug" in argv[: argv.index("--") if "--" in argv else None]
    )
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        args.argv = list(argv)  # `train --nproc N` relaunches the same command in N processes
        debug = debug or args.debug
        if args.cache_dir:
            os.environ["MTLKIT_CACHE_DIR"] = args.cache_dir
        from mtlkit.logs import log_to_stderr

        log_to_stderr()  # the library's progress messages (logging) go to stderr, as the command's own lines do
        _tune_allocator()
        rc = _run_command(args)
        sys.stdout.flush()  # inside the try: a reader that left is seen here, not in Python's flush at exit
        return rc
    except MTLKitError as e:
        if debug:
            raise
        print(f"mtlkit: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `mtlkit methods | head`: the reader left; stop quietly, as Unix tools do
        # Point stdout at devnull so Python's flush at exit does not raise a second time (Python docs, "SIGPIPE").
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a tool killed by the broken pipe
    except KeyboardInterrupt:  # Ctrl-C outside training (start-up, data, evaluation): nothing to resume, no trace
        if debug:
            raise
        print("\nmtlkit: interrupted", file=sys.stderr)
        return 130
    except OSError as e:
        if debug or e.filename is None:  # without a path it cannot be explained here: keep the traceback
            raise
        from mtlkit.runs import describe_os_error

        print(f"mtlkit: error: {describe_os_error(e, _os_action(e))}{_cache_hint(e.filename)}", file=sys.stderr)
        return 2


def _cache_hint(filename: str) -> str:
    """For a path inside the dataset cache: how to point mtlkit at another one."""
    from mtlkit.data.sources import cache_dir

    try:
        Path(filename).resolve().relative_to(cache_dir().resolve())
    except (ValueError, OSError):
        return ""
    return f" (it is in the dataset cache {cache_dir()}: pass --cache-dir or set MTLKIT_CACHE_DIR to a writable one)"


def _os_action(e: OSError) -> str:
    """What failed, for :func:`mtlkit.runs.describe_os_error`: read for a missing file, access otherwise."""
    import errno

    if e.errno in (errno.ENOENT,):
        return "read"
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
        return "write"
    return "access"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
