"""Behaviour snapshot: numbers of tiny runs that a refactoring must not change.

Usage (from the repository root)::

    # the pre-redesign code, from a worktree (PYTHONPATH wins over the editable install for this script):
    git worktree add /tmp/old 63833c5
    PYTHONPATH=/tmp/old python benchmarks/behaviour_snapshot.py --out benchmarks/results/behaviour_before.json
    # the current code:
    python benchmarks/behaviour_snapshot.py --out benchmarks/results/behaviour_after.json
    # every entry that differs (exit 1 if any):
    python benchmarks/behaviour_snapshot.py --compare benchmarks/results/behaviour_before.json \
        benchmarks/results/behaviour_after.json

``--only PATTERN ...`` records only the entries whose name matches one of the fnmatch patterns (e.g.
``'method/*' 'reproduce/mamg'``; ``data/*`` entries come with the Trainer entries that built them). ``--compare``
reports an entry missing on one side as a difference, so compare files recorded with the same ``--only``, or leave
entries out with ``--ignore PATTERN ...``.

What is recorded (``entries`` of the JSON file; ``meta`` holds what may legitimately differ: paths, timings, thread
count, versions, and is not compared, only shown):

* ``data/<dataset>``: sha256 of every split tensor of each dataset built for the Trainer entries.
* ``method/<name>``: for every registered method (``mtlkit.methods.available_methods()``), a tiny
  ``Trainer(cfg, run_dir=tmp).fit()`` of HPS (MLP encoder) on a 600/200 MultiMNIST subset, 2 epochs, batch 64,
  seed 0: ``RunResult.test``/``.val``/``.best_epoch``, the per-epoch history (everything but its ``seconds``), the
  per-epoch train losses, warnings raised, and the sha256 of the model's state_dict after ``fit()`` (the selected
  model, which ``fit`` loads back). A method that fails records its error message instead; those of
  ``FALLBACK_OPTIONS`` are run again with options that work (``method/mtmlan_tdb[grad_at=last_shared_layer]``:
  its default ``grad_at='task_first_layer'`` needs a model exposing ``task_first_layers``, which HPS does not).
* ``method_conv/<name>``: ew, mgda and stl again on HPS with its default (conv, MTVIB Table I(b)) encoder.
* ``paper/*``: MTVIB (model mtvib, method mtvib, MultiMNIST), RRMTDL (entangled_census and entangled_images, MLP
  trunk), MTMLAN (yeast, method mtmlan_tdb, bce and sample_level losses) through the same Trainer.
* ``mamo/learn_mamo``: MAMO's Alg. 1 search, see :func:`mamo_entry` (old API only; the new API is not run yet).
* ``reproduce/<name>``: every ``mtlkit reproduce NAME`` at a tiny budget, run as a subprocess (``python -m
  mtlkit.cli``, cwd = a temporary directory so that the mtlkit of PYTHONPATH / the editable install is the one
  imported); its ``results.json`` with timings (``seconds``, ``train_seconds``, ``speed``, ...) dropped and the
  temporary directory replaced by ``<OUT>``. The exact command is stored in the entry (``command``).
* ``determinism``: ``method/ew`` and ``method/mgda`` run a second time in the same process; whether every recorded
  number agreed bit for bit.

Derived data caches (``multi/``, ``clips/`` of ``~/.cache/mtlkit``) are *not* reused: the script points
``MTLKIT_CACHE_DIR`` at a fresh temporary directory holding symlinks to the source files only (mnist.npz,
fashion.npz, yeast.npz, census.npz, downloads/), so the code under test rebuilds every dataset it reads.

Floats are stored with Python's round-trip ``repr`` (json), so equality is bit equality. Float results can depend on
the number of torch threads (reduction order): ``meta.torch_num_threads`` is recorded, and ``--compare`` warns when
the two files differ in it. The script leaves the thread count at torch's default.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import hashlib
import io
import json
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

SEED = 0
MULTI = {"name": "multimnist", "options": {"n_train": 600, "n_test": 200, "val_fraction": 0.1, "seed": SEED}}
HPS_MLP = {"encoder": "mlp", "hidden": [128, 64], "head_hidden": 32}
TRAIN = {"epochs": 2, "batch_size": 64, "seed": SEED, "progress": False, "device": "cpu"}
#: methods whose default options fail on HPS (recorded with their error) are run again with these options
FALLBACK_OPTIONS: dict[str, dict[str, Any]] = {"mtmlan_tdb": {"grad_at": "last_shared_layer"}}
SOURCE_CACHE_FILES = ("mnist.npz", "fashion.npz", "yeast.npz", "census.npz", "downloads")
#: keys dropped from reproduction outputs and histories (wall-clock time)
TIME_KEYS = {"seconds", "train_seconds", "speed", "wall", "wall_s", "elapsed", "time", "wall_seconds"}
#: the tiny budget of each reproduction (arguments after ``reproduce NAME``; ``--out <OUT>`` is appended)
REPRODUCE_ARGS: dict[str, list[str]] = {
    "mamg": [
        "--datasets",
        "yeast",
        "four_task",
        "--seeds",
        "0",
        "--epochs",
        "1",
        "--n-train",
        "128",
        "--device",
        "cpu",
    ],
    "mamo": [
        "--dataset",
        "four_task",
        "--seeds",
        "0",
        "--n-train",
        "128",
        "--n-val",
        "64",
        "--n-test",
        "128",
        "--pretrain-epochs",
        "1",
        "--rounds",
        "2",
        "--epochs-per-round",
        "1",
        "--batch-size",
        "64",
        "--encoder",
        "mlp",
        "--hidden",
        "32",
        "16",
        "--head-hidden",
        "16",
        "--detect-batches",
        "2",
        "--device",
        "cpu",
    ],
    "mtmlan": ["--dataset", "yeast", "--seeds", "0", "--epochs", "1"],
    "mtvib": [
        "--dataset",
        "multimnist",
        "--n-train",
        "300",
        "--n-test",
        "100",
        "--epochs",
        "1",
        "--seeds",
        "0",
        "--batch-size",
        "64",
        "--gs-grid",
        "0.5",
        "--eta",
        "0",
        "0.1",
        "--attack-batch",
        "100",
    ],
    "rrmtdl": [
        "--dataset",
        "images",
        "census",
        "--pairs",
        "ge5_footwear",
        "bachelor_income",
        "--seeds",
        "0",
        "--epochs",
        "1",
        "--n-train",
        "200",
        "--n-val",
        "100",
        "--n-test",
        "200",
        "--trunk",
        "mlp",
        "--rates",
        "0.5",
        "1.0",
        "--batch-size",
        "64",
        "--device",
        "cpu",
    ],
}
REPRODUCE_TIMEOUT_S = 300


# ---------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------
def state_hashes(module) -> dict[str, Any]:
    """sha256 of the state_dict tensors (keys sorted, raw bytes only), and of the sorted keys with shapes/dtypes."""
    sd = module.state_dict()
    h, hk = hashlib.sha256(), hashlib.sha256()
    numel = 0
    for k in sorted(sd):
        t = sd[k]
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
        hk.update(f"{k}:{tuple(t.shape)}:{t.dtype};".encode())
        numel += t.numel()
    return {
        "state_sha256": h.hexdigest(),
        "state_keys_sha256": hk.hexdigest(),
        "state_tensors": len(sd),
        "state_numel": numel,
    }


def split_hashes(data) -> dict[str, Any]:
    out: dict[str, Any] = {"tasks": [[t.name, t.kind, getattr(t, "num_outputs", None)] for t in data.tasks]}
    for s in ("train", "val", "test"):
        split = getattr(data, s)
        h = hashlib.sha256(split.x.detach().cpu().contiguous().numpy().tobytes())
        for k in sorted(split.y):
            h.update(k.encode())
            h.update(split.y[k].detach().cpu().contiguous().numpy().tobytes())
        out[s] = {
            "n": len(split),
            "x_shape": list(split.x.shape),
            "x_dtype": str(split.x.dtype),
            "sha256": h.hexdigest(),
        }
    return out


def jsonable(v: Any) -> Any:
    """Plain JSON types (tensors -> lists, tuples -> lists, numpy scalars -> Python)."""
    try:
        import numpy as np
        import torch
    except ImportError:  # pragma: no cover
        np = torch = None  # type: ignore[assignment]
    if isinstance(v, dict):
        return {str(k): jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    if torch is not None and isinstance(v, torch.Tensor):
        return jsonable(v.detach().cpu().tolist())
    if np is not None and isinstance(v, np.generic):
        return v.item()
    if np is not None and isinstance(v, np.ndarray):
        return jsonable(v.tolist())
    if isinstance(v, Path):
        return str(v)
    return v


def strip_times(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: strip_times(x) for k, x in v.items() if not (k in TIME_KEYS or k.endswith(("_seconds", "_time")))}
    if isinstance(v, list):
        return [strip_times(x) for x in v]
    return v


def replace_paths(v: Any, roots: list[str]) -> Any:
    if isinstance(v, dict):
        return {replace_paths(k, roots): replace_paths(x, roots) for k, x in v.items()}
    if isinstance(v, list):
        return [replace_paths(x, roots) for x in v]
    if isinstance(v, str):
        for r in roots:
            v = v.replace(r, "<OUT>")
        return v
    return v


def error_text(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


@contextlib.contextmanager
def quiet():
    """Capture stderr/stdout (the Trainer's epoch lines); the text is returned through the yielded list."""
    buf = io.StringIO()
    holder: list[str] = []
    with contextlib.redirect_stderr(buf), contextlib.redirect_stdout(buf):
        try:
            yield holder
        finally:
            holder.append(buf.getvalue())


# ---------------------------------------------------------------------------------------------------------------
# Trainer entries
# ---------------------------------------------------------------------------------------------------------------
class Snapshot:
    def __init__(self, root: Path, only: list[str] | None):
        self.root = root
        self.only = only
        self.entries: dict[str, Any] = {}
        self.seconds: dict[str, float] = {}
        self.data_hashes: dict[str, Any] = {}

    def wanted(self, name: str) -> bool:
        return not self.only or any(fnmatch.fnmatchcase(name, p) for p in self.only)

    def add(self, name: str, fn: Callable[[], Any]) -> None:
        if not self.wanted(name):
            return
        t0 = time.time()
        try:
            value = fn()
        except Exception as e:  # record, never crash
            value = {"error": error_text(e)}
            print(f"  {name}: ERROR {error_text(e)}", file=sys.stderr)
            traceback.print_exc(limit=3, file=sys.stderr)
        dt = time.time() - t0
        if value is None:  # e.g. mamo_entry on the new API
            print(f"  {name}: not recorded ({dt:.1f}s)", file=sys.stderr)
            return
        self.entries[name] = value
        self.seconds[name] = round(dt, 2)
        print(f"  {name}: {dt:.1f}s", file=sys.stderr, flush=True)

    def run_dir(self, tag: str) -> Path:
        return Path(tempfile.mkdtemp(prefix=tag.replace("/", "_") + "-", dir=self.root))

    def trainer_entry(
        self, dataset: dict[str, Any], model: dict[str, Any], method: dict[str, Any], train: dict[str, Any], tag: str
    ) -> dict[str, Any]:
        from mtlkit.config import RunConfig
        from mtlkit.train import Trainer

        d = {"dataset": dataset, "model": model, "method": method, "train": train, "output": {"tensorboard": False}}
        cfg = RunConfig.from_dict(json.loads(json.dumps(d)))
        with warnings.catch_warnings(record=True) as caught, quiet():
            warnings.simplefilter("always")
            trainer = Trainer(cfg, run_dir=self.run_dir(tag))
            res = trainer.fit()
        key = json.dumps(dataset, sort_keys=True)
        if key not in self.data_hashes:
            self.data_hashes[key] = (dataset["name"], split_hashes(trainer.data))
        history = [strip_times(jsonable(r)) for r in res.history]
        train_losses = [{k: v for k, v in r.items() if k.startswith("train/")} for r in history]
        out = {
            "config": d,
            "test": jsonable(res.test),
            "val": jsonable(res.val),
            "best_epoch": jsonable(res.best_epoch),
            "train_losses": train_losses,
            "history": history,
            "parameters": sum(p.numel() for p in trainer.model.parameters()),
            "warnings": sorted({f"{w.category.__name__}: {w.message}" for w in caught}),
            **state_hashes(trainer.model),
        }
        return out

    def data_entries(self) -> None:
        for _key, (name, h) in sorted(self.data_hashes.items()):
            n, i = f"data/{name}", 2
            while n in self.entries:
                n, i = f"data/{name}#{i}", i + 1
            self.entries[n] = {"options": json.loads(_key)["options"], **h}


def method_cfg(name: str) -> dict[str, Any]:
    return {"name": name}


def paper_entries(s: Snapshot) -> None:
    s.add(
        "paper/mtvib",
        lambda: s.trainer_entry(
            MULTI,
            {
                "name": "mtvib",
                "options": {
                    "hidden": 128,
                    "latent": 32,
                    "depth": 2,
                    "channels": 16,
                    "decoder_widths": [64, 32],
                    "num_samples": 4,
                },
            },
            {"name": "mtvib"},
            {**TRAIN, "epochs": 1},
            "paper-mtvib",
        ),
    )
    ent = {"n_train": 300, "n_val": 100, "n_test": 200, "seed": SEED}
    rr_model = {
        "name": "rrmtdl",
        "options": {"encoder": "mlp", "hidden": [64, 32], "branch_width": 32, "proj_width": 16},
    }
    s.add(
        "paper/rrmtdl_census",
        lambda: s.trainer_entry(
            {"name": "entangled_census", "options": {"pair": "bachelor_income", **ent}},
            rr_model,
            {"name": "ew"},
            {**TRAIN, "epochs": 2},
            "paper-rrmtdl-census",
        ),
    )
    s.add(
        "paper/rrmtdl_images",
        lambda: s.trainer_entry(
            {"name": "entangled_images", "options": {"pair": "ge5_footwear", **ent}},
            rr_model,
            {"name": "ew"},
            {**TRAIN, "epochs": 2},
            "paper-rrmtdl-images",
        ),
    )
    for loss in ("bce", "sample_level"):
        s.add(
            f"paper/mtmlan_yeast_{loss}",
            lambda loss=loss: s.trainer_entry(
                {"name": "yeast", "options": {"seed": SEED, "loss": loss}},
                {
                    "name": "mtmlan",
                    "options": {"mlp_hidden": [64], "head_hidden": 16, "hidden": 16, "attention_dim": 16},
                },
                {"name": "mtmlan_tdb", "options": {"grad_at": "task_first_layer", "optimizer": "sgd", "lr": 0.01}},
                {**TRAIN, "epochs": 2},
                f"paper-mtmlan-{loss}",
            ),
        )


# ---------------------------------------------------------------------------------------------------------------
# MAMO (Alg. 1)
# ---------------------------------------------------------------------------------------------------------------
MAMO_DATA = {"n_train": 600, "n_test": 200, "val_fraction": 0.1, "seed": SEED}
MAMO_MODEL = {"encoder": "mlp", "hidden": [128, 64], "head_hidden": 32, "module": "gmk"}
MAMO_SEARCH = {
    "method": "mgda",
    "rounds": 2,
    "pretrain_epochs": 1,
    "epochs_per_round": 1,
    "detect_batches": 2,
    "batch_size": 64,
    "seed": SEED,
    "device": "cpu",
}


def mamo_entry() -> dict[str, Any] | None:
    """MAMO's search (Alg. 1) on a 600/200 MultiMNIST subset, MLP backbone, method mgda, 2 rounds.

    How the OLD code (63833c5, ``mtlkit.models.mamo_search.learn_mamo``; as ``mtlkit reproduce mamo``'s ``_alg1_run`` calls it)
    seeds and builds, in this order -- the new Trainer-based code must do the same to give the same bits:

    1. ``data = build_dataset("multimnist", n_train=600, n_test=200, val_fraction=0.1, seed=0)``: the builder's own
       seed (numpy, local); it does not touch the global RNGs' use below.
    2. ``seed_everything(0)`` (``random.seed``, ``np.random.seed``, ``torch.manual_seed``), THEN
       ``build_mamo(data, encoder=..., hidden=..., head_hidden=..., module="gmk")``: it calls ``build_hps`` (encoder
       first, then one head per task in ``data.tasks`` order; all init draws come from the global torch RNG), then
       ``mamo_from(hps.encoder, dict(hps.heads), module)`` splits the encoder into layers (``split_layers``) and adds
       the fusion logits ``beta`` (zeros: no RNG). So with the same seed MAMO starts from HPS's initialisation.
       (This is the Trainer's order too: ``Trainer.__init__`` builds the method and the dataset, then
       ``seed_everything(train.seed)``, then the model.)
    3. ``learn_mamo(model, data, cfg)``: ``cfg.validate()``, task-name check, then ``seed_everything(cfg.seed)``
       AGAIN (after the model is built: the global RNGs are reset before training), ``model.to(device)``,
       ``build_method(cfg.method, **cfg.method_options)`` (and the pre-training method if different),
       ``weighting.setup(T)`` / ``.to(device)``; ONE ``torch.optim.Adam([{"params": model.parameters()}] (+ a group
       of the weightings' trainable parameters, weight_decay 0), lr=cfg.lr, weight_decay=cfg.weight_decay)`` for the
       whole search.
    4. Mini-batch order: every epoch draws ``torch.randperm(n, generator=torch.Generator().manual_seed(seed *
       1_000_003 + epoch))`` where ``epoch`` counts ALL epochs of the search (pre-training then each round; it does
       not restart at 0 per phase); batches are ``perm[b*B:(b+1)*B]`` (last one short).
    5. Step: ``z = model.encode(x)``, ``out = model.decode(z)``, ``stack_losses``, ``method.weighting(losses, ctx)``,
       ``zero_grad(set_to_none=True)``, engine ``backward(weighted, model.shared_parameters(), aggregator,
       representation=z only if the aggregator needs per-task grads and no single-task module exists,
       level=method.level, keep_jacobian=detecting)``, ``opt.step()``. Q (Eq. 11) is accumulated on the last
       ``detect_batches`` mini-batches of each phase's last epoch (from the engine's Jacobian when the aggregator
       computes per-task gradients at parameter level, else from ``per_task_grads``, before the backward).
    6. After each epoch: ``weighting.on_epoch_end(mean losses)``, val evaluation, best-val state kept
       (``copy.deepcopy(model.state_dict())``; Adam state not rolled back); at the phase end the best state is
       loaded. Then a RoundRecord (val and test of that model). Round r: indicator from Q, ``model.grow(layer,
       pair)`` for each conflict (new modules are deep copies of the shared layer: no RNG), their parameters added
       to the SAME Adam as a new param group, Q reset, next phase.
    No global-RNG draw happens during training for mgda/ew (batch order uses its own generators), so the global
    torch RNG state after step 3 only matters for methods/models that draw from it (e.g. rlw, dropout).
    """
    try:
        import mtlkit.models.mamo_search as mm
    except ImportError:
        mm = None
    if mm is None:
        print("MAMO: mtlkit.models.mamo_search does not import")
        return None
    from mtlkit.data import build_dataset

    if not hasattr(mm, "learn_mamo"):
        # The new API: the same search as one Trainer run of model mamo (Alg. 1 is its search callback) with method
        # MAMO_SEARCH["method"] and train.epochs = pretrain_epochs + rounds * epochs_per_round. The Trainer seeds,
        # then builds the model (step 2); it does not seed again before training (step 3), which changes nothing for
        # mgda: its training draws nothing from the global RNGs. The same fields are recorded, read from
        # results.json's "mamo" entry and from the selected model the Trainer leaves loaded.
        from mtlkit.config import RunConfig
        from mtlkit.train import Trainer

        data = build_dataset("multimnist", **MAMO_DATA)
        search = dict(MAMO_SEARCH)
        epochs = search["pretrain_epochs"] + search["rounds"] * search["epochs_per_round"]
        options = {**MAMO_MODEL, **{k: search[k] for k in ("rounds", "epochs_per_round", "detect_batches")}}
        with tempfile.TemporaryDirectory(prefix="mamo-") as tmp:
            cfg = RunConfig.from_dict(
                {
                    "dataset": {"name": "multimnist", "options": MAMO_DATA},
                    "model": {"name": "mamo", "options": options},
                    "method": {"name": search["method"]},
                    "train": {
                        "epochs": epochs,
                        "batch_size": search["batch_size"],
                        "seed": search["seed"],
                        "progress": False,
                        "device": search["device"],
                    },
                    "output": {"dir": tmp, "tensorboard": False, "overwrite": True},
                }
            )
            trainer = Trainer(cfg, data=data, run_dir=tmp)
            with quiet():
                fit = trainer.fit()
            found = json.loads((Path(tmp) / "results.json").read_text())["mamo"]
        keys = ("round", "method", "activated", "parameters", "val", "test", "Q", "q_batches")
        return {
            "config": {"data": MAMO_DATA, "model": MAMO_MODEL, "search": MAMO_SEARCH},
            "rounds": [{k: jsonable(r[k]) for k in keys} for r in found["rounds"]],
            "architecture": jsonable(found["architecture"]),
            "num_parameters": trainer.model.num_parameters(),
            "test": jsonable(fit.test),
            "val": jsonable(fit.val),
            **state_hashes(trainer.model),
        }
    from mtlkit.models.mamo import build_mamo
    from mtlkit.train import seed_everything

    data = build_dataset("multimnist", **MAMO_DATA)
    seed_everything(SEED)
    opts = dict(MAMO_MODEL)
    model = build_mamo(data, **opts)
    cfg = mm.MAMOConfig(**MAMO_SEARCH)
    with quiet():
        res = mm.learn_mamo(model, data, cfg)
    rounds = [
        {
            "round": r.round,
            "method": r.method,
            "activated": jsonable(r.activated),
            "parameters": r.parameters,
            "val": jsonable(r.val),
            "test": jsonable(r.test),
            "Q": jsonable(r.Q),
            "q_batches": r.q_batches,
        }
        for r in res.rounds
    ]
    return {
        "config": {"data": MAMO_DATA, "model": MAMO_MODEL, "search": MAMO_SEARCH},
        "rounds": rounds,
        "architecture": jsonable(res.model.architecture()),
        "num_parameters": res.model.num_parameters(),
        "test": jsonable(res.test),
        "val": jsonable(res.val),
        **state_hashes(res.model),
    }


# ---------------------------------------------------------------------------------------------------------------
# reproductions
# ---------------------------------------------------------------------------------------------------------------
def reproduce_entry(s: Snapshot, name: str, env: dict[str, str]) -> dict[str, Any]:
    if name not in REPRODUCE_ARGS:
        return {"skipped": f"no tiny budget known to this script for reproduction {name!r}"}
    out = s.run_dir(f"reproduce-{name}")
    args = ["reproduce", name, *REPRODUCE_ARGS[name], "--out", str(out)]
    cmd = [sys.executable, "-m", "mtlkit.cli", *args]
    shown = "python -m mtlkit.cli " + " ".join(shlex.quote(a) for a in args).replace(str(out), "<OUT>")
    try:
        p = subprocess.run(cmd, cwd=str(s.root), env=env, capture_output=True, text=True, timeout=REPRODUCE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {"command": shown, "skipped": f"took more than {REPRODUCE_TIMEOUT_S}s at the tiniest budget"}
    roots = [str(out), str(out.resolve()), str(s.root), str(s.root.resolve())]
    entry: dict[str, Any] = {"command": shown, "returncode": p.returncode}
    res = out / "results.json"
    if res.is_file():
        entry["results"] = replace_paths(strip_times(json.loads(res.read_text())), roots)
        entry["files"] = sorted(str(f.relative_to(out)) for f in out.rglob("*") if f.is_file() and f.parent == out)
    else:
        entry["stdout"] = replace_paths(p.stdout, roots)
    if p.returncode != 0:
        entry["error"] = replace_paths(p.stderr.strip().splitlines()[-1] if p.stderr.strip() else "", roots)
        print(p.stderr[-3000:], file=sys.stderr)
    return entry


# ---------------------------------------------------------------------------------------------------------------
# main: record
# ---------------------------------------------------------------------------------------------------------------
def fresh_cache(root: Path) -> tuple[Path, str]:
    """A cache directory with symlinks to the user's source files only (derived caches are rebuilt)."""
    from mtlkit.data.sources import cache_dir

    user = cache_dir().resolve()
    mine = root / "cache"
    mine.mkdir()
    for name in SOURCE_CACHE_FILES:
        for suffix in ("", ".sha256"):
            src = user / (name + suffix)
            if src.exists():
                (mine / (name + suffix)).symlink_to(src)
    return mine, str(user)


def record(out_path: Path, only: list[str] | None, keep: bool) -> int:
    import torch

    import mtlkit

    t_all = time.time()
    root = Path(tempfile.mkdtemp(prefix="behaviour-snapshot-"))
    cache, user_cache = fresh_cache(root)
    os.environ["MTLKIT_CACHE_DIR"] = str(cache)
    env = dict(os.environ)
    print(f"mtlkit from {mtlkit.__file__}; temp root {root}; torch threads {torch.get_num_threads()}", file=sys.stderr)
    child = subprocess.run(
        [sys.executable, "-c", "import mtlkit; print(mtlkit.__file__)"],
        cwd=str(root),
        env=env,
        capture_output=True,
        text=True,
    ).stdout.strip()
    if Path(child).resolve() != Path(mtlkit.__file__).resolve():
        print(f"error: a subprocess imports mtlkit from {child}, this process from {mtlkit.__file__}", file=sys.stderr)
        return 2
    s = Snapshot(root, only)
    try:
        from mtlkit.methods import available_methods

        methods = available_methods()
        for m in methods:
            s.add(
                f"method/{m}",
                lambda m=m: s.trainer_entry(
                    MULTI, {"name": "hps", "options": HPS_MLP}, method_cfg(m), TRAIN, f"method-{m}"
                ),
            )
        for m, opts in FALLBACK_OPTIONS.items():  # methods whose defaults cannot train HPS: also with options
            if m in methods:
                tag = ",".join(f"{k}={v}" for k, v in opts.items())
                s.add(
                    f"method/{m}[{tag}]",
                    lambda m=m, opts=opts: s.trainer_entry(
                        MULTI,
                        {"name": "hps", "options": HPS_MLP},
                        {"name": m, "options": opts},
                        TRAIN,
                        f"method-{m}-opt",
                    ),
                )
        for m in ("ew", "mgda", "stl"):
            s.add(
                f"method_conv/{m}",
                lambda m=m: s.trainer_entry(MULTI, {"name": "hps"}, method_cfg(m), TRAIN, f"method-conv-{m}"),
            )
        paper_entries(s)
        s.add("mamo/learn_mamo", mamo_entry)
        from mtlkit.reproduce import load_all

        for name in sorted(load_all()):
            s.add(f"reproduce/{name}", lambda name=name: reproduce_entry(s, name, env))
        # determinism: the same entries again, in this process
        if s.wanted("determinism"):
            det: dict[str, Any] = {}
            for m in ("ew", "mgda"):
                first = s.entries.get(f"method/{m}")
                if first is None:
                    first = s.trainer_entry(
                        MULTI, {"name": "hps", "options": HPS_MLP}, method_cfg(m), TRAIN, f"det-a-{m}"
                    )
                again = s.trainer_entry(MULTI, {"name": "hps", "options": HPS_MLP}, method_cfg(m), TRAIN, f"det-b-{m}")
                diff = [p for p, _a, _b in diff_values(first, again)]
                det[f"method/{m}"] = {"repeat_identical": not diff, "differing": diff}
                print(f"  determinism method/{m}: {'identical' if not diff else diff}", file=sys.stderr)
            s.entries["determinism"] = det
        s.data_entries()
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
    meta = {
        "mtlkit_file": mtlkit.__file__,
        "torch_version": torch.__version__,
        "torch_num_threads": torch.get_num_threads(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "user_cache": user_cache,
        "command": " ".join(shlex.quote(a) for a in sys.argv),
        "pythonpath": os.environ.get("PYTHONPATH", ""),
        "only": only,
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "total_seconds": round(time.time() - t_all, 1),
        "entry_seconds": s.seconds,
    }
    snap = {"format": 1, "meta": meta, "entries": jsonable(s.entries)}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(snap, indent=1, sort_keys=True) + "\n")
    errors = sorted(k for k, v in s.entries.items() if isinstance(v, dict) and ("error" in v or "skipped" in v))
    print(
        f"wrote {out_path} ({len(s.entries)} entries, {meta['total_seconds']:.0f}s); errors/skips: {errors or 'none'}",
        file=sys.stderr,
    )
    return 0


# ---------------------------------------------------------------------------------------------------------------
# compare
# ---------------------------------------------------------------------------------------------------------------
_MISSING = object()


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return (type(a) is type(b) and a == b) or (
        isinstance(a, (int, float))
        and isinstance(b, (int, float))
        and not isinstance(a, bool)
        and not isinstance(b, bool)
        and a == b
    )


def diff_values(a: Any, b: Any, path: str = "") -> list[tuple[str, Any, Any]]:
    """Leaf paths where ``a`` and ``b`` differ (a missing side is ``_MISSING``)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            out += diff_values(a.get(k, _MISSING), b.get(k, _MISSING), f"{path}.{k}" if path else str(k))
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        out = []
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            out += diff_values(x, y, f"{path}[{i}]")
        return out
    return [] if _same(a, b) else [(path, a, b)]


def _show(v: Any, width: int = 60) -> str:
    if v is _MISSING:
        return "(missing)"
    s = json.dumps(v) if not isinstance(v, str) else v
    return s if len(s) <= width else s[: width - 3] + "..."


def compare(old_path: Path, new_path: Path, ignore: list[str]) -> int:
    old, new = json.loads(old_path.read_text()), json.loads(new_path.read_text())
    om, nm = old.get("meta", {}), new.get("meta", {})
    for k in ("torch_num_threads", "torch_version", "python"):
        if om.get(k) != nm.get(k):
            print(
                f"warning: meta.{k} differs ({om.get(k)} vs {nm.get(k)}): float results may differ for that "
                f"reason alone"
            )
    oe, ne = old.get("entries", {}), new.get("entries", {})
    rows: list[tuple[str, str, str, str]] = []
    for name in sorted(set(oe) | set(ne)):
        if any(fnmatch.fnmatchcase(name, p) for p in ignore):
            continue
        a, b = oe.get(name, _MISSING), ne.get(name, _MISSING)
        if a is _MISSING or b is _MISSING:
            rows.append(
                (
                    name,
                    "(whole entry)",
                    _show(a if a is _MISSING else "present"),
                    _show(b if b is _MISSING else "present"),
                )
            )
            continue
        for p, x, y in diff_values(a, b):
            rows.append((name, p, _show(x), _show(y)))
    if not rows:
        print(f"no differences: {len(set(oe) & set(ne))} entries identical ({old_path} vs {new_path})")
        return 0
    w = [max(len(r[i]) for r in rows + [("entry", "key", "old", "new")]) for i in range(4)]
    print(" | ".join(h.ljust(w[i]) for i, h in enumerate(("entry", "key", "old", "new"))))
    print("-+-".join("-" * x for x in w))
    for r in rows:
        print(" | ".join(c.ljust(w[i]) for i, c in enumerate(r)))
    print(f"\n{len(rows)} differing value(s) in {len({r[0] for r in rows})} entr(y/ies)")
    return 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--out", type=Path, help="record a snapshot into this JSON file")
    g.add_argument(
        "--compare",
        nargs=2,
        type=Path,
        metavar=("OLD", "NEW"),
        help="print every entry that differs; exit 1 if any does",
    )
    p.add_argument(
        "--only",
        nargs="+",
        default=None,
        metavar="PATTERN",
        help="record only entries matching these fnmatch patterns (e.g. 'method/*')",
    )
    p.add_argument(
        "--ignore",
        nargs="+",
        default=[],
        metavar="PATTERN",
        help="with --compare: leave entries matching these patterns out",
    )
    p.add_argument("--keep-temp", action="store_true", help="keep the temporary run directories")
    a = p.parse_args(argv)
    if a.compare:
        return compare(a.compare[0], a.compare[1], a.ignore)
    return record(a.out, a.only, a.keep_temp)


if __name__ == "__main__":
    sys.exit(main())
