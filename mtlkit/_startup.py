"""Ctrl-C while the ``mtlkit`` command imports the package (before :func:`mtlkit.cli.main` can catch it).

The console script (``from mtlkit.cli import main``) and ``python -m mtlkit.cli`` import ``mtlkit`` first, which
imports torch, numpy and scipy for a few seconds. A KeyboardInterrupt raised inside those imports prints a traceback,
and inside a C extension's initialisation it can even surface as an unrelated ImportError. So while the command starts,
SIGINT ends the process at once with one line and status 130 (nothing has been written yet); a library import of
``mtlkit`` is left alone, as is ``MTLKIT_DEBUG=1`` / ``--debug``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Iterator


def _cli_is_starting() -> bool:
    """Whether this import is the start of the ``mtlkit`` command: the console script is ``__main__``, or Python is
    locating the module of ``python -m`` (``sys.argv[0] == "-m"`` only while it does: Python's docs)."""
    main_file = getattr(sys.modules.get("__main__"), "__file__", None) or ""
    debug = os.environ.get("MTLKIT_DEBUG", "") not in ("", "0") or "--debug" in sys.argv
    return not debug and (sys.argv[:1] == ["-m"] or os.path.basename(main_file) in ("mtlkit", "mtlkit.exe"))


def _exit_interrupted(signum, frame) -> None:  # pragma: no cover - runs in the killed process
    os.write(2, b"\nmtlkit: interrupted\n")
    os._exit(130)


@contextlib.contextmanager
def cli_start_guard() -> Iterator[None]:
    """Inside: SIGINT exits quietly with status 130 if the command line is starting; otherwise nothing changes."""
    if not _cli_is_starting() or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    try:
        signal.signal(signal.SIGINT, _exit_interrupted)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
