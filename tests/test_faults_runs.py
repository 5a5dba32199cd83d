"""Fault injection on run directories, through the command line in subprocesses (one per CLI invocation).

Every test asserts the exit status, a message naming the problem, no traceback, and that the files present before
the fault are unchanged (sha256 of every file, dotfiles included). Faults: a second process (two real processes and
the OS lock), flipped and truncated checkpoint bytes, a full disk and a read-only directory through the save path's
test hook (``MTLKIT_FAULT_WRITE``, :mod:`mtlkit.runs`; tests run as root, which ignores permissions), a read-only
directory for real where the test can make one (permissions when not root; a read-only tmpfs when root may mount),
a diverging run, SIGINT during start-up.

Runs are tiny (the ``_toy`` dataset of conftest.py, registered by a wrapper that then calls ``mtlkit.cli.main``; one
thread); the start-up test runs ``python -m mtlkit.cli`` itself.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from mtlkit import runs

TESTS = Path(__file__).resolve().parent
TOY = [
    "--dataset",
    "_toy",
    "--set",
    "model.options={encoder: mlp, hidden: [16], head_hidden: 8}",
    "--set",
    "output.tensorboard=false",
    "--set",
    "train.num_threads=1",
    "--batch-size",
    "32",
    "--lr",
    "0.01",
]
WRAPPER = f"""import sys
sys.path.insert(0, {str(TESTS)!r})
import conftest  # noqa: F401  (registers the _toy dataset: tests only)
from mtlkit.cli import main
sys.exit(main())
"""


@dataclass
class Result:
    rc: int
    out: str
    err: str

    def failed_cleanly(self, *needles: str) -> None:
        """Exit status 2, one `mtlkit: error:` line naming every needle, no traceback."""
        assert self.rc == 2, (self.rc, self.err)
        assert "Traceback" not in self.err, self.err
        lines = [ln for ln in self.err.splitlines() if ln.startswith("mtlkit: error:")]
        assert len(lines) == 1, self.err
        for n in needles:
            assert n in lines[0], (n, lines[0])


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in (runs.FAULT_ENV, "MTLKIT_DEBUG")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return env


@pytest.fixture(scope="module")
def wrapper(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cli") / "mtlkit_cli.py"
    path.write_text(WRAPPER)
    return path


def _popen(wrapper: Path, args: list[str], cwd: Path, **env: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(wrapper), *args],
        cwd=cwd,
        env=_env(**env),
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def _wait(p: subprocess.Popen, timeout: float = 300) -> Result:
    out, err = p.communicate(timeout=timeout)
    return Result(p.returncode, out, err)


def cli(wrapper: Path, *commands: list[str] | tuple[list[str], dict[str, str]], cwd: Path, **env: str) -> list[Result]:
    """Run the commands concurrently (each its own process; a command may come with its own extra environment)
    and return their results in order."""
    procs = [
        _popen(wrapper, c[0], cwd, **env, **c[1]) if isinstance(c, tuple) else _popen(wrapper, c, cwd, **env)
        for c in commands
    ]
    return [_wait(p) for p in procs]


def snapshot(d: Path) -> dict[str, str]:
    return {
        str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*")) if p.is_file()
    }


def leftovers(d: Path) -> list[str]:
    return [p.name for p in d.iterdir() if p.name.endswith(".tmp") or "probe" in p.name]


def epochs_logged(d: Path) -> tuple[list[int], list[int]]:
    jsonl = [json.loads(line)["epoch"] for line in (d / "metrics.jsonl").read_text().splitlines()]
    csv_rows = [int(line.split(",")[0]) for line in (d / "metrics.csv").read_text().splitlines()[1:]]
    return jsonl, csv_rows


UW_DIVERGING = ["--method", "uw", *TOY, "--lr", "1e4"]  # epoch 1 trains; epoch 2 diverges at its first step


@pytest.fixture(scope="module")
def trained(wrapper, tmp_path_factory) -> dict[str, tuple[Path, Result]]:
    """Runs several tests start from, trained once and concurrently: a finished 2-epoch EW run (progress on, stderr a
    pipe), the same with STL, and one epoch of the diverging UW run. Tests copy them."""
    root = tmp_path_factory.mktemp("trained")
    commands = {
        "ew": ["--epochs", "2", *TOY],
        "stl": ["--epochs", "2", "--method", "stl", *TOY],
        "uw": ["--epochs", "1", *UW_DIVERGING],
    }
    results = cli(wrapper, *[["train", "--run-dir", name, *c] for name, c in commands.items()], cwd=root)
    for r in results:
        assert r.rc == 0, r.err
    return {name: (root / name, r) for name, r in zip(commands, results, strict=True)}


@pytest.fixture(scope="module")
def finished(trained) -> tuple[Path, Result]:
    return trained["ew"]


def copy_of(finished, tmp_path: Path, name: str = "run") -> Path:
    dst = tmp_path / name
    shutil.copytree(finished[0], dst)
    return dst


def _table(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("|")]


# --- rows of the issue -----------------------------------------------------------------------------------------


def test_piped_output_is_plain_lines_and_epochs_count_from_1(finished):
    run, res = finished
    assert "\r" not in res.err and max(len(line) for line in res.err.splitlines()) < 300, res.err
    assert [ln.split(" |")[0] for ln in res.err.splitlines() if ln.startswith("epoch")] == ["epoch 1", "epoch 2"]
    assert epochs_logged(run) == ([1, 2], [1, 2])
    best = json.loads((run / "results.json").read_text())["best_epoch"]
    assert best in (1, 2)
    table = _table(res.out)
    assert table[0] == "| task | metric | test | selected epoch |"
    assert all(row.endswith(f" {best} |") for row in table[2:]), table


def test_stl_prints_the_same_table_as_every_method(trained):
    run, res = trained["stl"]
    stl, ew = _table(res.out), _table(trained["ew"][1].out)
    assert [r.split("|")[1:3] for r in stl] == [r.split("|")[1:3] for r in ew]  # same rows and columns
    best = json.loads((run / "results.json").read_text())["best_epoch"]
    assert set(best) == {"a", "b"} and set(best.values()) <= {1, 2}
    for row in stl[2:4]:
        task = row.split("|")[1].strip()
        assert row.endswith(f" {best[task]} |"), row
    assert stl[-1].endswith(" per task |") and "{" not in res.out


def test_a_second_process_is_refused_while_a_run_trains(wrapper, tmp_path):
    run = tmp_path / "run"
    with open(tmp_path / "a.log", "w") as log:  # a file, not a pipe: thousands of epoch lines must not block it
        a = subprocess.Popen(
            [sys.executable, str(wrapper), "train", "--run-dir", "run", "--epochs", "100000", *TOY],
            cwd=tmp_path,
            env=_env(),
            stdout=log,
            stderr=log,
        )
        try:
            deadline = time.time() + 240
            while not (run / "metrics.jsonl").is_file():
                assert a.poll() is None and time.time() < deadline, "the first run did not start training"
                time.sleep(0.1)
            a.send_signal(signal.SIGSTOP)  # frozen while holding the lock: its files cannot change under the others
            holder = json.loads((run / runs.LOCK).read_text())
            assert holder["pid"] == a.pid and holder["host"] and holder["since"]
            before = snapshot(run)
            over, res = cli(
                wrapper,
                ["train", "--run-dir", "run", "--overwrite", *TOY],
                ["train", "--run-dir", "run", "--resume"],
                cwd=tmp_path,
            )
            for r in (over, res):
                r.failed_cleanly(
                    f"run directory run is in use: locked by pid {a.pid} on {holder['host']} since {holder['since']}"
                )
            assert snapshot(run) == before
        finally:
            a.send_signal(signal.SIGKILL)  # a kill: the OS drops the lock; the holder record stays behind
            a.wait()
    done = runs.checkpoint_meta(run / "checkpoint.pt")
    (resumed,) = cli(
        wrapper, ["train", "--run-dir", "run", "--resume", "--epochs", str(done["epoch"] + 1)], cwd=tmp_path
    )
    assert resumed.rc == 0, resumed.err
    assert f"last locked by pid {a.pid}" in resumed.err and "stopped without releasing it" in resumed.err
    n = done["epoch"] + 1
    assert epochs_logged(run) == (list(range(1, n + 1)), list(range(1, n + 1)))  # each epoch once
    assert leftovers(run) == [] and (run / runs.LOCK).read_text() == ""


def test_a_checkpoint_with_flipped_bytes_is_not_resumed(wrapper, finished, tmp_path):
    run = copy_of(finished, tmp_path)
    data = bytearray((run / "checkpoint.pt").read_bytes())
    mid = len(data) // 2
    data[mid : mid + 64] = bytes(b ^ 0xFF for b in data[mid : mid + 64])  # same size, 64 bytes changed
    (run / "checkpoint.pt").write_bytes(bytes(data))
    before = snapshot(run)
    (res,) = cli(wrapper, ["train", "--run-dir", "run", "--resume", "--epochs", "3"], cwd=tmp_path)
    res.failed_cleanly("cannot read run/checkpoint.pt", "corrupted", "it was not used")
    assert snapshot(run) == before


def test_eval_of_a_truncated_best_pt_is_a_clear_error(wrapper, finished, tmp_path):
    run = copy_of(finished, tmp_path)
    data = (run / "best.pt").read_bytes()
    (run / "best.pt").write_bytes(data[: len(data) // 2])
    before = snapshot(run)
    (res,) = cli(wrapper, ["eval", "run"], cwd=tmp_path)
    res.failed_cleanly("cannot read run/best.pt", "truncated", "it was not used")
    assert snapshot(run) == before


def test_resume_with_overwrite_is_refused_and_debug_shows_the_traceback(wrapper, finished, tmp_path):
    run = copy_of(finished, tmp_path)
    before = snapshot(run)
    argv = ["train", "--run-dir", "run", "--resume", "--overwrite"]
    res, debug = cli(wrapper, argv, (argv, {"MTLKIT_DEBUG": "1"}), cwd=tmp_path)
    res.failed_cleanly("--resume and --overwrite contradict each other")
    assert debug.rc == 1 and "Traceback" in debug.err and "MTLKitError: --resume and --overwrite" in debug.err
    assert snapshot(run) == before


def test_resume_to_fewer_epochs_is_refused_and_to_as_many_is_a_no_op(wrapper, finished, tmp_path):
    run = copy_of(finished, tmp_path)
    before = snapshot(run)
    fewer, same = cli(
        wrapper,
        ["train", "--run-dir", "run", "--resume", "--epochs", "1"],
        ["train", "--run-dir", "run", "--resume"],
        cwd=tmp_path,
    )
    fewer.failed_cleanly("cannot resume run with train.epochs=1: it has already trained 2 epochs", "--epochs 2 or more")
    assert same.rc == 0 and "already finished its 2 epochs; nothing to train" in same.err, same.err
    assert _table(same.out) == _table(finished[1].out)
    assert snapshot(run) == before  # config.yaml (epochs: 2) and everything else byte for byte


def test_disk_full_while_saving_keeps_the_run_and_logs_each_epoch_once(wrapper, finished, tmp_path):
    run = copy_of(finished, tmp_path)
    before = snapshot(run)
    argv = ["train", "--run-dir", "run", "--resume", "--epochs", "4"]
    (full,) = cli(wrapper, argv, cwd=tmp_path, MTLKIT_FAULT_WRITE="ENOSPC:checkpoint.pt")  # end of epoch 3
    full.failed_cleanly(
        "cannot write run/checkpoint.pt: No space left on device",
        "[ENOSPC]",
        "still holds the run as of the end of epoch 2",
        "mtlkit train --run-dir run --resume --epochs 4",
    )
    assert snapshot(run) == before and leftovers(run) == []
    # full again, after the checkpoint of epoch 3 was written: a log write fails
    (logs,) = cli(wrapper, argv, cwd=tmp_path, MTLKIT_FAULT_WRITE="ENOSPC:metrics.csv")
    logs.failed_cleanly("cannot write run/metrics.csv", "[ENOSPC]", "as of the end of epoch 3")
    assert leftovers(run) == [] and not (run / "results.json").exists()  # no longer a finished 2-epoch run
    (ok,) = cli(wrapper, ["train", "--run-dir", "run", "--resume"], cwd=tmp_path)
    assert ok.rc == 0, ok.err
    assert epochs_logged(run) == ([1, 2, 3, 4], [1, 2, 3, 4])
    assert "epochs: 4" in (run / "config.yaml").read_text() and leftovers(run) == []


def test_read_only_run_dir_and_a_file_as_run_dir_through_the_hook(wrapper, finished, tmp_path):
    copy_of(finished, tmp_path)
    (tmp_path / "a_file").write_text("not a directory\n")
    before = snapshot(tmp_path)
    resume, fresh, is_file = cli(
        wrapper,
        ["train", "--run-dir", "run", "--resume", "--epochs", "3"],
        ["train", "--run-dir", "run/new", *TOY],
        ["train", "--run-dir", "a_file", *TOY],
        cwd=tmp_path,
        MTLKIT_FAULT_WRITE="EROFS",
    )
    resume.failed_cleanly(
        "cannot write to the run directory run: Read-only file system", "[EROFS]", "mtlkit needs a writable directory"
    )
    fresh.failed_cleanly("cannot create the run directory run/new in run", "[EROFS]")
    is_file.failed_cleanly("run directory a_file is a file, not a directory")
    assert snapshot(tmp_path) == before


@contextlib.contextmanager
def really_read_only(path: Path, populate):
    """``path`` populated, then read-only for real: by permissions when not root, else a read-only tmpfs (skips
    where root may not mount one, e.g. an unprivileged container)."""
    path.mkdir()
    if os.geteuid() != 0:
        populate(path)
        dirs = [path, *[p for p in path.rglob("*") if p.is_dir()]]
        for d in dirs:
            d.chmod(0o555)
        try:
            yield
        finally:
            for d in dirs:
                d.chmod(0o755)
        return
    if (
        shutil.which("mount") is None
        or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=96m", "tmpfs", str(path)], capture_output=True, check=False
        ).returncode
        != 0
    ):
        pytest.skip("running as root (permissions do not apply) and cannot mount a tmpfs: the hook test covers it")
    try:
        populate(path)
        subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True, capture_output=True)
        yield
    finally:
        subprocess.run(["umount", str(path)], capture_output=True, check=False)


def test_read_only_run_dir_for_real(wrapper, finished, tmp_path):
    ro = tmp_path / "ro"
    with really_read_only(ro, lambda d: shutil.copytree(finished[0], d / "run")):
        before = snapshot(ro)
        resume, fresh = cli(
            wrapper,
            ["train", "--run-dir", "ro/run", "--resume", "--epochs", "3"],
            ["train", "--run-dir", "ro/new", *TOY],
            cwd=tmp_path,
        )
        code = "[EROFS]" if os.geteuid() == 0 else "[EACCES]"
        resume.failed_cleanly("ro/run", code)
        fresh.failed_cleanly("cannot create the run directory ro/new in ro", code)
        assert snapshot(ro) == before


def test_read_only_dataset_cache_for_real(tmp_path):
    from mtlkit.data.sources import cache_dir

    if not (cache_dir() / "mnist.npz").is_file():
        pytest.skip("needs the cached MNIST (mtlkit data fetch)")
    cache = tmp_path / "cache"

    def populate(d: Path) -> None:
        for name in ("mnist.npz", "mnist.npz.sha256"):
            shutil.copy(cache_dir() / name, d / name)

    with really_read_only(cache, populate):
        before = snapshot(cache)
        p = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mtlkit.cli",
                "--cache-dir",
                str(cache),
                "train",
                "--run-dir",
                "run",
                "--set",
                "dataset.options={n_train: 120, n_test: 20}",
                "--epochs",
                "1",
            ],
            cwd=tmp_path,
            env=_env(),
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        res = _wait(p)  # the reduced MultiMNIST must be built and cached, in a cache that cannot be written
        res.failed_cleanly(f"{cache}", "[EROFS]" if os.geteuid() == 0 else "[EACCES]", "dataset cache", "--cache-dir")
        assert snapshot(cache) == before and not (tmp_path / "run").exists()


def test_a_diverging_run_stops_with_epoch_step_task_and_keeps_its_last_checkpoint(wrapper, trained, tmp_path):
    run = copy_of(trained["uw"], tmp_path)  # UW at lr 1e4, its first epoch trained
    before = snapshot(run)
    (res,) = cli(wrapper, ["train", "--run-dir", "run", "--resume", "--epochs", "3"], cwd=tmp_path)
    res.failed_cleanly(
        "training diverged at epoch 2, step 1 of 3",
        "method uw",
        "task(s) a, b",
        "lower the learning rate (train.lr is 10000; try --lr 1000)",
        "run/checkpoint.pt still holds the run as of the end of epoch 1",
    )
    assert snapshot(run) == before
    ck = runs.load_checkpoint(run / "checkpoint.pt")
    assert ck["epoch"] == 0 and all(bool(torch.isfinite(v).all()) for v in ck["model"].values())


def test_sigint_during_start_up_exits_quietly(tmp_path):
    p = subprocess.Popen(
        [sys.executable, "-m", "mtlkit.cli", "train", "--run-dir", "run", "--epochs", "1"],
        cwd=tmp_path,
        env=_env(),
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    time.sleep(0.8)  # inside the imports of torch and the methods (seconds), long after Python's own start
    p.send_signal(signal.SIGINT)
    res = _wait(p, timeout=120)
    assert res.rc == 130 and res.err.strip() == "mtlkit: interrupted" and res.out == "", res
    assert not (tmp_path / "run").exists()


# --- the machinery, in process ---------------------------------------------------------------------------------


def test_checkpoints_carry_their_hash_and_stay_torch_loadable(tmp_path):
    path = tmp_path / "c.pt"
    runs.save_checkpoint({"w": torch.arange(1000.0)}, path, meta={"epoch": 1})
    assert torch.load(path, weights_only=True)["w"].sum() == 499500  # still an ordinary torch file
    assert runs.load_checkpoint(path)["w"].sum() == 499500 and runs.checkpoint_meta(path) == {"epoch": 1}
    torch.save({"w": torch.ones(2)}, tmp_path / "old.pt")  # written before the record existed: loads unchecked
    assert runs.load_checkpoint(tmp_path / "old.pt")["w"].tolist() == [1.0, 1.0]
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0x01  # one bit
    path.write_bytes(bytes(data))
    with pytest.raises(runs.CheckpointError, match=r"c\.pt .*it was not used"):
        runs.load_checkpoint(path)
    assert runs.checkpoint_meta(path) is None


def test_atomic_write_leaves_nothing_and_the_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "f.txt"
    runs.atomic_write_text(path, "old")
    monkeypatch.setenv(runs.FAULT_ENV, "ENOSPC:f.txt")
    with pytest.raises(runs.RunDirError, match=r"cannot write .*f.txt: No space left on device .*\[ENOSPC\]") as e:
        runs.atomic_write_text(path, "new" * 1000)
    assert e.value.errno == 28 and e.value.filename == str(path)
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["f.txt"]


def test_lock_record_and_stale_holders_without_flock(tmp_path, monkeypatch):
    import fcntl
    import socket

    run = tmp_path / "run"
    lock = runs.open_run_dir(run)
    with pytest.raises(runs.RunLockedError, match=f"locked by pid {os.getpid()} on {socket.gethostname()}"):
        runs.open_run_dir(run, resume=False, overwrite=True)
    lock.release()
    assert (run / runs.LOCK).read_text() == ""
    # a filesystem without flock: the holder record alone is the lock; a dead holder on this host is stale
    real = fcntl.flock

    def no_flock(fd, op):
        if op & fcntl.LOCK_EX:
            raise OSError(37, "No locks available")  # ENOLCK
        return real(fd, op)

    monkeypatch.setattr(fcntl, "flock", no_flock)
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # its pid is now dead
    host = socket.gethostname()
    (run / runs.LOCK).write_text(json.dumps({"pid": os.getppid(), "host": host, "since": "t0", "command": "x"}))
    with pytest.raises(runs.RunLockedError, match=f"pid {os.getppid()} on {host} since t0"):
        runs.RunLock(run).acquire()
    (run / runs.LOCK).write_text(json.dumps({"pid": child.pid, "host": host, "since": "t1", "command": "x"}))
    taken = runs.RunLock(run).acquire()
    assert taken.stale["pid"] == child.pid and json.loads((run / runs.LOCK).read_text())["pid"] == os.getpid()
    taken.release()
    assert runs.RunLock(run, primary=False).acquire().held  # the hook for torchrun's other ranks: no lock taken


def test_progress_is_a_bar_only_on_a_terminal(monkeypatch, capsys):
    from mtlkit import train

    class Tty:
        def isatty(self):
            return True

    monkeypatch.setattr(train.sys, "stderr", Tty())
    assert train._Progress("e", 0, 3, True).mode == "bar"
    monkeypatch.undo()
    assert train._Progress("e", 0, 3, True).mode == "lines" and train._Progress("e", 0, 3, False).mode == "none"
    bar = train._Progress("epoch 1/2", 0, 3, True, every=0.0)
    for _ in bar:  # (conftest prints mtlkit's log records on stderr, as the command line does)
        bar.loss(1.5)
    assert capsys.readouterr().err.splitlines() == [f"epoch 1/2: step {b}/3, loss 1.5000, 0s" for b in (1, 2, 3)]


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
def test_no_checkpoint_is_written_from_diverged_parameters(tmp_path, monkeypatch):
    """A finite loss can still give an overflowing update: the commit checks the parameters first."""
    from mtlkit.config import RunConfig
    from mtlkit.errors import NonFiniteLossError
    from mtlkit.train import Trainer

    cfg = RunConfig.from_dict(
        {
            "dataset": {"name": "_toy"},
            "model": {"name": "hps", "options": {"encoder": "mlp", "hidden": [16], "head_hidden": 8}},
            "train": {"epochs": 2, "batch_size": 32, "progress": False},
            "output": {"dir": str(tmp_path / "run"), "tensorboard": False},
        }
    )
    t = Trainer(cfg)
    real, calls = t.optimizer.step, [0]

    def step(*a, **k):  # the epoch's last step (3 of 3) overflows a weight
        out = real(*a, **k)
        calls[0] += 1
        if calls[0] == 3:
            with torch.no_grad():
                next(t.model.parameters()).fill_(float("inf"))
        return out

    monkeypatch.setattr(t.optimizer, "step", step)
    with pytest.raises(
        NonFiniteLossError,
        match=r"diverged in epoch 1: parameters became NaN or infinite .*"
        r"Nothing was saved",
    ):
        t.fit()
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
