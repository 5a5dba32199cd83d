"""Run directories: an exclusive lock per directory, atomic writes, checkpoints that carry their own hash.

**Lock.** :func:`open_run_dir` prepares a run directory and takes an exclusive ``fcntl.flock`` on its
``.mtlkit-lock`` file for as long as the run writes there (the OS drops it when the process dies, however it dies).
The file also holds a JSON holder record (pid, host, start time, command), so a second process is refused with a
message naming the holder, and a record left by a holder that died is recognised as stale. On a filesystem without
``flock`` the record alone is the lock, and a record whose pid is dead on this host is stale and taken over.
Distributed runs (torchrun): only the primary process (rank 0) locks and writes; the others pass ``primary=False``.

**Atomic writes.** :func:`atomic_write_bytes` writes a temporary file in the same directory, fsyncs it and renames it
over the target, so a reader sees the old file or the new one, never a mix; on any failure (disk full, read-only,
Ctrl-C) the temporary file is removed and :class:`RunDirError` names the path and the cause.

**Verified checkpoints.** :func:`save_checkpoint` writes ``torch.save``'s zip archive with one more entry, a record
holding the sha256 of every other entry (names and bytes), so the hash is inside the file and is written by the
same rename. ``torch.load`` reads such a file as usual; :func:`load_checkpoint` recomputes the hash first and raises
:class:`CheckpointError` on any difference, truncation or foreign file instead of loading it. Files written before
the record existed load without the check.

**Test hook.** ``MTLKIT_FAULT_WRITE=ERRNO[:NAME[:N]]`` makes the writes of this module fail with that errno
(``ENOSPC``, ``EROFS``, ``EACCES``, ``EIO``...) for files named ``NAME`` (any file if omitted or ``*``), from the
``N``-th such write of the process on (default 1), after half of the data was written to the temporary file. It
exists for the fault-injection tests (a full disk or a read-only directory, also when running as root); never set it
otherwise.

Example:
    >>> import tempfile, torch
    >>> d = Path(tempfile.mkdtemp())
    >>> save_checkpoint({"w": torch.ones(2)}, d / "c.pt", meta={"epoch": 3})
    >>> load_checkpoint(d / "c.pt")["w"].tolist(), checkpoint_meta(d / "c.pt")
    ([1.0, 1.0], {'epoch': 3})
"""

from __future__ import annotations

import datetime
import errno
import hashlib
import io
import json
import os
import random
import re
import shutil
import socket
import sys
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from mtlkit.errors import ConfigError, MTLKitError

MARKER = ".mtlkit-run"
LOCK = ".mtlkit-lock"
RECORD = ".mtlkit_record.json"  # the zip entry holding a checkpoint's hash (beside torch's own entries)
FAULT_ENV = "MTLKIT_FAULT_WRITE"


class RunDirError(MTLKitError, OSError):
    """A run directory (or a file in it) cannot be created, written or read; the message names the path (``errno``,
    ``strerror`` and ``filename`` are those of the OSError behind it, if any)."""

    def __str__(self) -> str:  # the message, not OSError's "[Errno N] ..." form
        return str(self.args[0]) if self.args else ""


class RunLockedError(RunDirError):
    """Another process holds the run directory's lock."""


class CheckpointError(ConfigError):
    """A checkpoint or best.pt is truncated, corrupted or not an mtlkit file; it was not loaded (a ConfigError, as
    mtlkit raised for an unreadable checkpoint before)."""


# --- errors and the test hook -----------------------------------------------------------------------------------

_NEEDS = {
    errno.ENOSPC: "free some disk space there",
    errno.EDQUOT: "free some of your disk quota",
    errno.EROFS: "mtlkit needs a writable directory there",
    errno.EACCES: "mtlkit needs write permission there",
    errno.EPERM: "mtlkit needs write permission there",
    errno.ENOTDIR: "a component of that path is a file, not a directory",
}


def code_provenance() -> dict[str, Any]:
    """Which code trained a run (``results.json``'s ``code``): mtlkit's version and, when the package lies in a git
    checkout, its commit and whether tracked files differ from that commit (``dirty``); both None otherwise (an
    installed wheel, or no ``git`` on the PATH). Recorded so that a table built from runs can say which code made
    each of them, including runs started from a working tree that was being edited.

    Example:
        >>> sorted(code_provenance())
        ['dirty', 'git_commit', 'version']
    """
    import subprocess

    from mtlkit._version import __version__

    here = Path(__file__).resolve().parent
    commit: str | None = None
    dirty: bool | None = None
    git = shutil.which("git")
    if git is not None:
        try:
            head = subprocess.run(
                [git, "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
            )
            status = subprocess.run(
                [git, "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                capture_output=True,
                text=True,
                timeout=10,
                check=True,
            )
            commit, dirty = head.stdout.strip() or None, bool(status.stdout.strip())
        except (OSError, subprocess.SubprocessError):
            commit, dirty = None, None  # not a checkout (e.g. site-packages): the version alone says what ran
    return {"version": __version__, "git_commit": commit, "dirty": dirty}


def describe_os_error(e: OSError, action: str = "write") -> str:
    """One line: ``cannot <action> <path>: <strerror> [ERRNO]; <what is needed>``."""
    code = errno.errorcode.get(e.errno or 0, "")
    path = e.filename if e.filename is not None else "?"
    need = _NEEDS.get(e.errno or 0)
    return f"cannot {action} {path}: {e.strerror or e} [{code}]" + (f"; {need}" if need else "")


def _os_error(e: OSError, path: Path, action: str = "write") -> RunDirError:
    if e.filename is None:
        e = OSError(e.errno, e.strerror, str(path))
    err = RunDirError(describe_os_error(e, action))
    err.errno, err.strerror, err.filename = e.errno, e.strerror, e.filename
    return err


_fault_counts: dict[str, int] = {}


def _fault(path: Path) -> None:
    """The test hook (module docstring): raise the configured OSError for this write, if it is one it targets."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    parts = spec.split(":")
    name = parts[1] if len(parts) > 1 and parts[1] else "*"
    if name != "*" and Path(path).name != name:
        return
    code = getattr(errno, parts[0].upper(), None)
    if not isinstance(code, int):
        raise ConfigError(f"{FAULT_ENV}={spec!r}: {parts[0]!r} is not an errno name (e.g. ENOSPC, EROFS)")
    _fault_counts[name] = _fault_counts.get(name, 0) + 1
    if _fault_counts[name] >= (int(parts[2]) if len(parts) > 2 and parts[2] else 1):
        raise OSError(code, os.strerror(code) + f" (injected by {FAULT_ENV})", str(path))


# --- atomic writes ----------------------------------------------------------------------------------------------


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some filesystems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Replace ``path`` by ``data`` atomically (temporary file in the same directory, fsync, rename).

    Raises:
        RunDirError: the write failed (the message names the path and the cause); nothing is left behind and the
            previous file, if any, is unchanged.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            half = len(data) // 2
            f.write(data[:half])
            _fault(path)
            f.write(data[half:])
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:  # disk full, read-only, Ctrl-C...: never leave a temporary file
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise _os_error(e, path) from e
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def write_if_changed(path: str | Path, data: bytes | str) -> bool:
    """:func:`atomic_write_bytes` unless ``path`` already holds ``data``; whether it wrote."""
    path = Path(path)
    data = data.encode() if isinstance(data, str) else data
    try:
        if path.read_bytes() == data:
            return False
    except OSError:
        pass
    atomic_write_bytes(path, data)
    return True


# --- verified checkpoints ---------------------------------------------------------------------------------------


def _entries_digest(z: zipfile.ZipFile) -> str:
    h = hashlib.sha256()
    for info in z.infolist():
        if info.filename.endswith("/" + RECORD):
            continue
        data = z.read(info)  # zipfile also checks each entry's CRC-32
        name = info.filename.encode()
        h.update(len(name).to_bytes(8, "little") + name + len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def checkpoint_bytes(obj: Any, meta: dict[str, Any] | None = None) -> bytes:
    """``torch.save(obj)``'s bytes plus the hash record (and ``meta``, a small JSON-able dict)."""
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    with zipfile.ZipFile(buf) as z:
        prefix = z.infolist()[0].filename.split("/", 1)[0]
        digest = _entries_digest(z)
    with zipfile.ZipFile(buf, "a") as z:
        z.writestr(f"{prefix}/{RECORD}", json.dumps({"sha256": digest, "meta": meta or {}}))
    return buf.getvalue()


def save_checkpoint(obj: Any, path: str | Path, meta: dict[str, Any] | None = None) -> None:
    """Save ``obj`` with ``torch.save``'s format and its hash record, atomically (see the module docstring)."""
    atomic_write_bytes(path, checkpoint_bytes(obj, meta))


def _read_verified(path: Path, hint: str) -> tuple[bytes, dict[str, Any] | None]:
    """The file's bytes and its record (None for a file written before records existed), after the hash check."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise _os_error(e, path, "read") from e
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            names = [i.filename for i in z.infolist()]
            rec_name = next((n for n in names if n.endswith("/" + RECORD)), None)
            digest = _entries_digest(z)
            record = json.loads(z.read(rec_name)) if rec_name else None
    except Exception as e:  # truncated, bytes changed in a header or a CRC-checked entry, not a zip at all
        raise CheckpointError(
            f"cannot read {path} (truncated, corrupted or not an mtlkit checkpoint: "
            f"{type(e).__name__}: {e}); it was not used: {hint}"
        ) from e
    if record is not None and record.get("sha256") != digest:
        raise CheckpointError(
            f"cannot read {path} (corrupted: its content has sha256 {digest[:16]}..., the "
            f"record written with it says {str(record.get('sha256'))[:16]}...); it was not used: "
            f"{hint}"
        )
    return data, record


def verify_checkpoint(
    path: str | Path, hint: str = "restore the file or delete that run and train it again"
) -> dict[str, Any] | None:
    """Raise :class:`CheckpointError` (or :class:`RunDirError`) unless ``path`` reads and matches its hash record;
    returns the ``meta`` saved with it (None for a file without record)."""
    _, record = _read_verified(Path(path), hint)
    return None if record is None else record.get("meta", {})


def load_checkpoint(
    path: str | Path, map_location: Any = "cpu", hint: str = "restore the file or delete that run and train it again"
) -> Any:
    """Load a file written by :func:`save_checkpoint` after checking its hash.

    Raises:
        CheckpointError: the file is truncated, corrupted or not a checkpoint (``hint`` says what to do).
        RunDirError: it cannot be read (missing, permissions).
    """
    import torch

    path = Path(path)
    data, _ = _read_verified(path, hint)
    try:
        return torch.load(io.BytesIO(data), map_location=map_location, weights_only=False)
    except Exception as e:  # hash matched (or a file without record) but torch failed: report, never guess
        raise CheckpointError(f"cannot read {path} ({type(e).__name__}: {e}); it was not used: {hint}") from e


def checkpoint_meta(path: str | Path) -> dict[str, Any] | None:
    """The ``meta`` saved with a checkpoint; None if the file is missing, unverifiable or has no record."""
    try:
        _, record = _read_verified(Path(path), "")
    except (CheckpointError, RunDirError):
        return None
    return None if record is None else record.get("meta", {})


# --- the lock ---------------------------------------------------------------------------------------------------


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _describe_holder(rec: dict[str, Any]) -> str:
    ranks = f", rank 0 of {rec['ranks']} data-parallel processes" if rec.get("ranks") else ""
    return f"pid {rec.get('pid')} on {rec.get('host')}{ranks} since {rec.get('since')} ({rec.get('command', '?')})"


class RunLock:
    """An exclusive lock on a run directory (module docstring). Use :func:`open_run_dir`, or as a context manager.

    Attributes:
        stale: the holder record left by a previous holder that died without releasing it (None if none).
    """

    def __init__(self, run_dir: str | Path, primary: bool = True):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK
        self.primary = primary
        self.stale: dict[str, Any] | None = None
        self._fd: int | None = None
        self._flock = True

    def _record(self) -> dict[str, Any]:
        since = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        command = " ".join([Path(sys.argv[0]).name] + sys.argv[1:]) if sys.argv and sys.argv[0] else "python"
        rec: dict[str, Any] = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": since,
            "command": command[:300],
        }
        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        if world > 1:  # data parallel (torchrun): rank 0 holds the lock for every rank of the run
            rec["ranks"] = world
        return rec

    def _read(self, fd: int) -> dict[str, Any] | None:
        try:
            raw = os.pread(fd, 65536, 0)
            rec = json.loads(raw) if raw.strip() else None
        except (OSError, ValueError):
            return None
        return rec if isinstance(rec, dict) else None

    def _refuse(self, rec: dict[str, Any] | None, why: str = "") -> RunLockedError:
        if rec is None:
            holder = "another process (it has not written its holder record yet)"
        else:
            holder = _describe_holder(rec)
            if (
                rec.get("host") == socket.gethostname()
                and isinstance(rec.get("pid"), int)
                and not _pid_alive(rec["pid"])
            ):
                holder += (
                    "; that process has exited, but a process it started still holds the lock: stop it, then retry"
                )
        return RunLockedError(
            f"run directory {self.run_dir} is in use: locked by {holder}{why}. Wait for that run "
            f"to finish or stop it, or use another --run-dir"
        )

    def check(self) -> None:
        """Raise :class:`RunLockedError` if another process holds the lock now; writes nothing, keeps nothing."""
        if not self.primary:
            return
        import fcntl

        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:  # no lock file: nobody locks it (or acquire() will say why it cannot)
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise self._refuse(self._read(fd)) from None
        except OSError:  # no flock on this filesystem: acquire() decides from the record
            pass
        finally:
            os.close(fd)  # also drops the flock just taken

    def acquire(self) -> RunLock:
        """Take the lock or raise :class:`RunLockedError` naming the holder (never waits)."""
        if not self.primary or self._fd is not None:
            return self
        import fcntl

        try:
            _fault(self.path)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise _os_error(e, self.path, "write the lock file") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            rec = self._read(fd)
            os.close(fd)
            raise self._refuse(rec) from None
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL, errno.ENOSYS):
                os.close(fd)
                raise _os_error(e, self.path, "lock") from e
            self._flock = False  # no flock on this filesystem: the record alone is the lock
        prev = self._read(fd)
        if prev is not None and prev.get("pid") != os.getpid():
            if not self._flock and (
                prev.get("host") != socket.gethostname()
                or not isinstance(prev.get("pid"), int)
                or _pid_alive(prev["pid"])
            ):
                os.close(fd)
                raise self._refuse(prev, f" (this filesystem has no flock; if that holder is gone, delete {self.path})")
            self.stale = prev  # its holder died without releasing: taken over
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(self._record()).encode(), 0)
            os.fsync(fd)
        except OSError as e:
            os.close(fd)
            raise _os_error(e, self.path, "write the lock file") from e
        self._fd = fd
        return self

    def release(self) -> None:
        """Clear the holder record and drop the lock (idempotent)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            os.ftruncate(fd, 0)
        except OSError:
            pass
        os.close(fd)  # closing the last descriptor drops the flock

    @property
    def held(self) -> bool:
        return self._fd is not None or not self.primary

    def __enter__(self) -> RunLock:  # acquire() returns self
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _entries(path: Path) -> list[Path]:
    return [p for p in path.iterdir() if p.name != LOCK]


def open_run_dir(
    path: str | Path, overwrite: bool = False, resume: bool = False, primary: bool = True, check_only: bool = False
) -> RunLock | None:
    """Create (or, with ``overwrite``, empty) a run directory, or check it can be resumed, and lock it.

    Never overwrites an existing non-empty directory unless ``overwrite``, and only an mtlkit run directory (with its
    marker file). The lock is taken before anything is deleted or written, so a directory in use by another run is
    left untouched. ``resume`` wins over ``overwrite`` (the caller refuses both together where it must).
    ``primary=False`` (the non-zero ranks of a distributed run) only checks and neither locks nor writes.
    ``check_only``: the same checks, writing nothing and holding no lock (returns None), so that a command can fail
    before it spends minutes building a dataset; the real call still checks again.

    Returns:
        the held :class:`RunLock`; release it when the run stops writing.

    Raises:
        ConfigError: the directory cannot be used as asked (exists without ``overwrite``, foreign, nothing to
            resume).
        RunLockedError: another process holds its lock.
        RunDirError: it is a file, or cannot be created or written.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise RunDirError(
            f"run directory {path} is a file, not a directory: give --run-dir a directory path (new or an mtlkit run)"
        )
    existing = path.is_dir() and bool(_entries(path))
    if resume:
        if not (path / "checkpoint.pt").is_file():
            raise ConfigError(f"cannot resume: {path / 'checkpoint.pt'} does not exist")
    elif existing:
        ours = (path / MARKER).is_file() or (path / LOCK).is_file()
        if not overwrite:
            if ours:  # report a run in progress as such, not as "exists"
                RunLock(path, primary).check()
            raise ConfigError(f"run directory {path} exists; pass --overwrite to replace it or --resume to continue it")
        if not ours:
            raise ConfigError(f"refusing to overwrite {path}: it is not an mtlkit run directory (no {MARKER} file)")
    if check_only or not primary:
        RunLock(path, primary).check()
        if primary:
            _check_can_write(path)
        return None if check_only else RunLock(path, primary)
    if not path.is_dir():
        try:
            _fault(path)
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise _os_error(e, path, "create the run directory") from e
    lock = RunLock(path, primary).acquire()
    _check_writable(path, lock)
    _remove_leftovers(path)
    if resume:
        return lock
    try:
        if existing:  # --overwrite: empty it, keeping the lock file we hold
            for p in _entries(path):
                _fault(p)
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                else:
                    p.unlink()
        atomic_write_text(path / MARKER, "created by mtlkit train\n")
    except BaseException as e:
        lock.release()
        if isinstance(e, OSError) and not isinstance(e, RunDirError):
            raise _os_error(e, Path(e.filename or path), "delete") from e
        raise
    return lock


def _check_can_write(path: Path) -> None:
    """Without writing: whether ``path`` (or, if it does not exist yet, the directory it would be created in) is a
    writable directory. Root passes permission checks; a read-only filesystem is still seen."""
    target = path
    while not target.exists() and target != target.parent:
        target = target.parent
    action = "write to the run directory" if target == path else f"create the run directory {path} in"
    if not target.is_dir():
        raise _os_error(OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(target)), target, action)
    try:
        _fault(target)
    except OSError as e:
        raise _os_error(e, target, action) from e
    if not os.access(target, os.W_OK | os.X_OK):
        code = errno.EROFS if os.statvfs(target).f_flag & os.ST_RDONLY else errno.EACCES
        raise _os_error(OSError(code, os.strerror(code), str(target)), target, action)


_TMP = re.compile(r"^\..+\.[0-9]+\.tmp$|^\.mtlkit-write-probe\.[0-9]+$")  # atomic_write_bytes's and the probe's


def _remove_leftovers(path: Path) -> None:
    """Temporary files of a writer that was killed (SIGKILL, power loss) before it could remove them; only called
    with the lock held, so no other process is writing them."""
    for p in path.iterdir():
        if _TMP.match(p.name) and p.is_file():
            try:
                p.unlink()
            except OSError:
                pass


def _check_writable(path: Path, lock: RunLock) -> None:
    """Create and remove a file in ``path`` (the lock file may be writable in a directory that is not); on failure
    release ``lock`` and raise :class:`RunDirError` before anything is trained or deleted."""
    probe = path / f".mtlkit-write-probe.{os.getpid()}"
    try:
        _fault(probe)
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        lock.release()
        raise _os_error(OSError(e.errno, e.strerror, str(path)), path, "write to the run directory") from e


# -- seeding and RNG state ---------------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (the loop draws its batch order from its own)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- reusing finished runs, resuming stopped ones -------------------------------------------------------------
# Keys that do not change what a run learns (or change it only by float reduction order), so a finished run may be
# reused, or a stopped one resumed, by a request that differs in them.
REUSE_IGNORED = {
    "train.progress",
    "train.num_threads",
    "train.device",
    "train.eval_batch_size",
    "train.checkpoint_minutes",
    "train.log_every",  # monitoring (mtlkit.monitor) only observes
    "train.monitor_gradients",
}


def finished_run(run_dir: str | Path, cfg: Any) -> dict[str, Any] | None:
    """The ``results.json`` of a finished run in ``run_dir`` trained with ``cfg``; None if it has not finished.

    Benchmarks that resume (``bench zoo --reuse``, ``reproduce mtvib --reuse``) call this instead of trusting a file
    name: a finished run whose ``config.yaml`` differs from the request (other than in output paths, progress bars,
    threads, device or evaluation batch size) raises ConfigError naming the keys, rather than being silently mixed
    into a table of another budget.

    Example:
        >>> from mtlkit.config import RunConfig
        >>> finished_run("/nonexistent-run-dir", RunConfig()) is None
        True
    """
    run_dir = Path(run_dir)
    if not (run_dir / "results.json").is_file():
        return None
    saved_path = run_dir / "config.yaml"
    if not saved_path.is_file():
        raise ConfigError(f"{run_dir} has results.json but no config.yaml: cannot tell what it was trained with")
    _refuse_other_config(run_dir, saved_path, cfg, "refusing to reuse {run_dir}: it was trained with")
    return json.loads((run_dir / "results.json").read_text())


def resumable_run(run_dir: str | Path, cfg: Any) -> bool:
    """Whether ``run_dir`` holds a stopped run of ``cfg`` that :meth:`Trainer.fit` can resume (``resume=True``).

    False when there is no ``checkpoint.pt`` (nothing to resume: train afresh). Raises ConfigError naming the keys
    when the checkpoint was written by another config, so that ``bench zoo --reuse`` never continues, or silently
    replaces, a run of another budget.

    Example:
        >>> from mtlkit.config import RunConfig
        >>> resumable_run("/nonexistent-run-dir", RunConfig())
        False
    """
    run_dir = Path(run_dir)
    if not (run_dir / "checkpoint.pt").is_file():
        return False
    # config.yaml is what the checkpoint's config was written from (fit writes both from the same cfg): reading it
    # spares loading the whole checkpoint here, which fit then loads (and checks) again.
    saved_path = run_dir / "config.yaml"
    if not saved_path.is_file():
        raise ConfigError(f"{run_dir} has checkpoint.pt but no config.yaml: cannot tell what it was started with")
    _refuse_other_config(run_dir, saved_path, cfg, "refusing to resume {run_dir}: it was started with")
    return True


def _refuse_other_config(run_dir: Path, saved_path: Path, cfg: Any, refusal: str) -> None:
    """Raise ConfigError (``refusal`` + the differing keys, theirs and requested) when the config saved at
    ``saved_path`` differs from ``cfg`` in a key that changes what a run learns (``train.epochs`` included: the
    budget must be the same)."""
    saved = yaml.safe_load(saved_path.read_text()) or {}
    requested = cfg.to_dict()
    diff = config_differences(saved, requested, allowed=REUSE_IGNORED)
    if diff:
        detail = ", ".join(f"{k}: {_lookup(saved, k)!r} there, {_lookup(requested, k)!r} requested" for k in diff)
        raise ConfigError(
            f"{refusal.format(run_dir=run_dir)} another config ({detail}); use another output "
            f"directory or delete that run"
        )


def _lookup(d: dict[str, Any], dotted: str) -> Any:
    section, key = dotted.split(".", 1)
    return (d.get(section) or {}).get(key)


def _with_defaults(d: dict[str, Any]) -> dict[str, Any]:
    """``d`` with every key it lacks at its default (a run saved before a key existed trained with its default), or
    ``d`` itself if it is not a valid config."""
    from mtlkit.config import RunConfig

    try:
        full = RunConfig.from_dict(d).to_dict()
    except Exception:  # an old or damaged config is compared as it is
        return d
    return {
        s: {**full.get(s, {}), **(d.get(s) or {})} if isinstance(d.get(s, {}), dict) else d[s]
        for s in full.keys() | d.keys()
    }


def config_differences(old: dict[str, Any], new: dict[str, Any], allowed: set[str]) -> list[str]:
    """Dotted keys (``section.key``) whose values differ between two config dicts, except ``allowed`` and
    ``output.*``."""
    old, new = _with_defaults(old), _with_defaults(new)
    out = []
    for section in old.keys() | new.keys():
        if section == "output":
            continue
        a, b = old.get(section, {}), new.get(section, {})
        for k in a.keys() | b.keys():
            if f"{section}.{k}" not in allowed and a.get(k) != b.get(k):
                out.append(f"{section}.{k}")
    return sorted(out)
