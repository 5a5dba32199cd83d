"""Keep the memory of large CPU tensors inside the process from one training step to the next (glibc malloc).

PyTorch's CPU allocator takes every tensor from ``malloc``. glibc serves a block above ``M_MMAP_THRESHOLD`` (by
default adjusted at run time, never above 32 MB) with a fresh ``mmap`` and gives it back to the kernel on free, and
it trims the heap's free top above ``M_TRIM_THRESHOLD``. A training loop allocates and frees the same large
activations and gradients every step, so each step pays again for page faults and for the kernel zeroing those
pages. Raising both thresholds keeps freed blocks in the heap for reuse.

Measured on the project's 2-core CPU machine (``mtlkit train --epochs 1``, the embedded default: conv HPS, EW, 20k
MultiMNIST images; two alternating runs of each setting), seconds of training and the process's peak RSS:

=====================  ============  =============
threshold              training      peak RSS
=====================  ============  =============
glibc's defaults       37.1, 38.3 s  1.27, 1.31 GB
256 MiB (the default)  23.8, 24.6 s  1.67, 1.70 GB
1 GiB                  19.5, 20.1 s  2.47, 2.61 GB
=====================  ============  =============

The test metrics are the same to the last digit. The cost is memory: what PyTorch frees stays with the process
until it exits, and blocks of other sizes do not always fit the holes. 256 MiB takes most of the speed for a third
of 1 GiB's extra memory; blocks above it keep their own mappings. (64 MiB gained nothing: 36.4 s, 1.2 GB.)

``mtlkit`` commands call :func:`tune_cpu_allocator` at start-up; ``MTLKIT_MALLOC_TUNING=0`` keeps glibc's defaults.
In your own training script, call it once at the start, where that memory is affordable.

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


def tune_cpu_allocator(threshold_bytes: int = 256 << 20) -> bool:
    """Raise glibc's mmap and trim thresholds to ``threshold_bytes`` for this process (see the module docstring).

    Args:
        threshold_bytes: blocks up to this size come from (and go back to) the heap instead of their own mapping;
            256 MiB by default (see the module docstring). At most 2**31 - 1 (mallopt takes an int).

    Returns:
        True when applied. False, changing nothing, where the C library is not glibc (macOS, Windows, musl), or
        where the user already chose through ``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_`` or
        ``GLIBC_TUNABLES``.

    Raises:
        ValueError: ``threshold_bytes`` is not an int in [1, 2**31 - 1].
        OSError: glibc refused a setting.
    """
    if (
        isinstance(threshold_bytes, bool)
        or not isinstance(threshold_bytes, int)
        or not 1 <= threshold_bytes <= 2**31 - 1
    ):
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
