"""Data parallelism (mtlkit.distributed): 2 gloo processes train exactly as 1 process on the same global batch, for
every registered method, including a resume from the 2-process run's checkpoint; a 2-machine launch simulated on
127.0.0.1; and the collectives' arithmetic in one process.

The worker (tests/ddp_worker.py) trains a BatchNorm-free HPS MLP in float64 with SGD (its update is linear in the
gradient, so the two computations differ by rounding only) on batches of 15 split 8/7 between the ranks: unequal
shares, which global_losses must weight. Tolerance: the dtype's, 2^-52 relative, times a margin of 2^10 for the ~100
operations a parameter goes through; methods with an iterative solver (Nash-MTL, FairGrad) are compared at their
solver tolerance (1e-9, the default ``tol``) instead.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mtlkit.distributed import DataParallel, global_losses, global_value

HERE = Path(__file__).parent
WORKER = HERE / "ddp_worker.py"
EPS64 = torch.finfo(torch.float64).eps
TOL = 2**10 * EPS64
ITERATIVE = {"nash_mtl": 1e-9, "fairgrad": 1e-9}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update({"OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent), **extra})
    return env


def _run(cmd: list[str], env: dict[str, str], timeout: float = 600) -> None:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"


def _last_weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=False)["model"]


def _compare(one: Path, two: Path, cases: list[str]) -> None:
    bad = []
    for case in cases:
        a, b = _last_weights(one / case), _last_weights(two / case)
        assert a.keys() == b.keys()
        diff = max(float((a[k] - b[k]).abs().max()) for k in a if a[k].is_floating_point())
        tol = ITERATIVE.get(case.split("@")[0].split("%")[0], TOL)
        if not diff <= tol:
            bad.append(f"{case}: max |Δθ| {diff:.2e} > {tol:.1e}")
    assert not bad, "2 processes differ from 1 process:\n" + "\n".join(bad)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp")
    _run([sys.executable, str(WORKER), str(out)], _env())
    return out


def _case_names() -> list[str]:
    sys.path.insert(0, str(HERE))
    try:
        import ddp_worker
    finally:
        sys.path.remove(str(HERE))
    cases = [ddp_worker.case_name(m, lv) for m, lv, _ in ddp_worker.cases()]
    return cases + [f"{m}%partial" for m in ddp_worker.PARTIAL]


def test_two_processes_equal_one_for_every_method_with_resume(one_process: Path) -> None:
    """torchrun --nproc_per_node 2: every registered method (and representation-level variants, and a few with half
    of one task's labels removed), each trained 1 epoch, then resumed by a new trainer from the 2-process checkpoint
    to 2 epochs, equals 2 epochs in 1 process."""
    out = one_process
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    _run([*cmd, str(WORKER), str(out), "--resume-split"], _env())
    cases = _case_names()
    from mtlkit._registry import METHODS

    assert set(METHODS.names()) <= {c.split("@")[0] for c in cases}  # every registered method is checked
    _compare(out / "1", out / "2", cases)


def test_two_machines_simulated_on_localhost(one_process: Path, tmp_path: Path) -> None:
    """Two launchers, --nnodes 2 with one process each, rendezvous on 127.0.0.1 (what two machines run)."""
    port = _free_port()
    cases = "ew,mgda@representation,pcgrad,gradnorm"
    env = _env(MTLKIT_DDP_CASES=cases)
    base = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1"]
    base += ["--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "mtlkit-test"]
    procs = [
        subprocess.Popen(
            [*base, "--node_rank", str(r), str(WORKER), str(tmp_path)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(2)
    ]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for p, o in zip(procs, outputs, strict=True):
        assert p.returncode == 0, o[-4000:]
    _compare(one_process / "1", tmp_path / "2", cases.split(","))


def test_single_process_collectives_are_the_identity() -> None:
    dp = DataParallel.single()
    t = torch.tensor([1.0, 2.0])
    assert dp.sum(t) is t and dp.mean(t) is t
    full, mine = dp.gather(torch.ones(2, 3), dim=1)
    assert full.shape == (2, 3) and mine == slice(0, 3)
    L, N = global_losses(dp, t, torch.tensor([3, 3]))
    assert L is t and N.tolist() == [3, 3]
    assert global_value(dp, t, torch.tensor([3, 3])) is t
    assert dp.all_agree(True) and not dp.all_agree(False)


def test_global_losses_value_and_gradient_weight_unequal_shares() -> None:
    """The arithmetic of global_losses for a fake 2-rank all-reduce: value Σ n_r L_r / N, gradient scale R n_r / N,
    a task without labels anywhere: value 0 and no gradient."""

    class Fake(DataParallel):
        other: torch.Tensor  # the other rank's [n L, n]

        def sum(self, t: torch.Tensor) -> torch.Tensor:
            return t.detach() + self.other

    dp = Fake(rank=0, world_size=2)
    w = torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64, requires_grad=True)
    local = w * torch.tensor([2.0, 3.0, 0.0], dtype=torch.float64)  # this rank's per-task losses
    counts = torch.tensor([8, 1, 0])
    # the other rank: task losses 5, 7 and 0 over 7, 3 and 0 labelled samples
    dp.other = torch.tensor([7 * 5.0, 3 * 7.0, 0.0, 7.0, 3.0, 0.0], dtype=torch.float64)
    L, N = global_losses(dp, local, counts)
    assert N.tolist() == [15, 4, 0]
    torch.testing.assert_close(L.detach(), torch.tensor([(16 + 35) / 15, (3 + 21) / 4, 0.0], dtype=torch.float64))
    (g,) = torch.autograd.grad(L.sum(), w)
    # d/dw_t of (R n_t / N_t) w_t c_t = R n_t c_t / N_t
    torch.testing.assert_close(g, torch.tensor([2 * 8 * 2.0 / 15, 2 * 1 * 3.0 / 4, 0.0], dtype=torch.float64))


def test_launch_refuses_bad_process_counts(tmp_path: Path) -> None:
    from mtlkit.cli import main

    assert main(["train", "--nproc", "0", "--run-dir", str(tmp_path / "r")]) == 2
    env_rank = {"WORLD_SIZE": "2"}
    old = {k: os.environ.get(k) for k in env_rank}
    os.environ.update(env_rank)
    try:
        assert main(["train", "--nproc", "2", "--run-dir", str(tmp_path / "r")]) == 2
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_the_run_lock_of_a_data_parallel_run_names_its_ranks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rank 0 holds the run directory's lock for all ranks; the holder record (what a refused second run is told)
    says so."""
    import json

    from mtlkit import runs

    monkeypatch.setenv("WORLD_SIZE", "4")
    lock = runs.open_run_dir(tmp_path / "run", overwrite=False, resume=False)
    assert lock is not None
    try:
        rec = json.loads((tmp_path / "run" / runs.LOCK).read_text())
        assert rec["ranks"] == 4
        assert "rank 0 of 4 data-parallel processes" in runs._describe_holder(rec)
    finally:
        lock.release()
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert "rank" not in runs._describe_holder({"pid": 1, "host": "h", "since": "s", "command": "c"})
