"""glibc malloc tuning: freed large blocks stay in the process, the user's own settings win, bad values are named."""
import os
import subprocess
import sys

import pytest

from mtlkit.cli import main
from mtlkit.malloc import USER_SETTINGS, tune_cpu_allocator

glibc = pytest.mark.skipif(not sys.platform.startswith("linux") or os.confstr("CS_GNU_LIBC_VERSION") is None,
                           reason="mallopt is glibc's")

# Allocates, fills and frees a 64 MB tensor: 5 rounds of warm-up (the heap grows to its steady size), then prints the
# minor page faults of 20 more rounds.
_FAULTS = """
import resource, sys, torch
from mtlkit.malloc import tune_cpu_allocator
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
"""


def _faults(mode: str, **env: str) -> tuple[str, int]:
    clean = {k: v for k, v in os.environ.items() if k not in USER_SETTINGS}
    out = subprocess.run([sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True, check=True,
                         env={**clean, **env}).stdout.split()
    return out[0], int(out[1])


@glibc
def test_tuned_process_reuses_freed_large_blocks_without_page_faults():
    import resource

    block = (64 << 20) // resource.getpagesize()  # pages of one 64 MB block: 16,384 with 4-KiB pages
    applied, tuned = _faults("tuned")
    _, default = _faults("default")
    assert applied == "True"
    # glibc's default maps each block afresh, faulting all its pages in every round; tuned, the heap keeps them
    # (late growths of the heap by one block each: 0 to 3 of the 20 rounds, over 45 runs)
    assert default > 18 * block and tuned < 8 * block


@glibc
def test_users_own_malloc_settings_win():
    import resource

    applied, faults = _faults("tuned", MALLOC_TRIM_THRESHOLD_="131072")
    # nothing changed: glibc's default behaviour, faults included
    assert applied == "False" and faults > 18 * (64 << 20) // resource.getpagesize()


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
