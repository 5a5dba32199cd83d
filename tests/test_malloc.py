"""glibc malloc tuning: freed large blocks stay in the process, the user's own settings win, bad values are named."""

import os
import platform
import subprocess
import sys

import pytest

from mtlkit.cli import main
from mtlkit.malloc import USER_SETTINGS, tune_cpu_allocator

_libc, _version = platform.libc_ver()
glibc = pytest.mark.skipif(
    _libc != "glibc" or tuple(int(v) for v in _version.split(".")[:2]) < (2, 33),
    reason="mallopt and mallinfo2 are glibc's (2.33 or later)",
)

# Allocates, fills and frees a 64 MB tensor: 5 rounds of warm-up (the heap grows to its steady size), then prints the
# minor page faults of 20 more rounds, and the bytes glibc holds in mmapped blocks while one such tensor is alive.
_PROBE = """
import ctypes, resource, sys, torch
from mtlkit.malloc import tune_cpu_allocator
class Info(ctypes.Structure):  # glibc's struct mallinfo2
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                                                "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
print(tune_cpu_allocator() if sys.argv[1] == "tuned" else None)
def once():
    x = torch.empty(16 << 20)
    x.fill_(1.0)
    del x
for _ in range(5):
    once()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    once()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
x = torch.empty(16 << 20)
print(libc.mallinfo2().hblkhd)
"""


def _probe(mode: str, **env: str) -> tuple[str, int, int]:
    clean = {k: v for k, v in os.environ.items() if k not in USER_SETTINGS}
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True, env={**clean, **env}
    ).stdout.split()
    return out[0], int(out[1]), int(out[2])


@glibc
def test_tuned_process_reuses_freed_large_blocks_without_page_probe():
    applied, tuned, tuned_mapped = _probe("tuned")
    _, default, default_mapped = _probe("default")
    assert applied == "True"
    # where the 64 MB block lives: its own mapping by default, the heap when tuned
    assert default_mapped >= 64 << 20 and tuned_mapped < 64 << 20
    # glibc's default maps each block afresh, faulting all its pages in every round (16,384 4-KiB pages per round
    # here); tuned, the heap keeps them: 0 to 3 late growths of the heap by one block in the 20 rounds, over 45 runs
    assert tuned * 3 < default


@glibc
def test_users_own_malloc_settings_win():
    applied, _, mapped = _probe("tuned", MALLOC_TRIM_THRESHOLD_="131072")
    assert applied == "False" and mapped >= 64 << 20  # nothing changed: the 64 MB block still gets its own mapping


@pytest.mark.parametrize("bad", [0, -1, 2**31, 1.5, True, "1G"])
def test_bad_threshold_is_named(bad):
    with pytest.raises(ValueError, match="threshold_bytes"):
        tune_cpu_allocator(bad)


def test_cli_tunes_unless_told_not_to(monkeypatch, capsys):
    import mtlkit.malloc

    calls = []
    monkeypatch.setattr(mtlkit.malloc, "tune_cpu_allocator", lambda: calls.append(1) or True)
    assert main(["methods"]) == 0 and calls == [1]
    monkeypatch.setenv("MTLKIT_MALLOC_TUNING", "0")
    assert main(["methods"]) == 0 and calls == [1]
    monkeypatch.setenv("MTLKIT_MALLOC_TUNING", "yes")
    assert main(["methods"]) == 2 and calls == [1]
    assert "MTLKIT_MALLOC_TUNING must be 0" in capsys.readouterr().err
