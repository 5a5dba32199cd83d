"""Logging: mtlkit reports progress through the standard :mod:`logging` module, under the logger ``"mtlkit"``.

The library never configures logging itself (a program that uses it decides where messages go: e.g.
``logging.basicConfig(level=logging.INFO)`` shows the training loop's epoch lines). The ``mtlkit`` command calls
:func:`log_to_stderr`, which prints every message of level INFO and above on standard error as it is, one per line.

Example:
    >>> import logging
    >>> handler = log_to_stderr()
    >>> log_to_stderr() is handler   # installing it twice is harmless
    True
    >>> logging.getLogger("mtlkit").removeHandler(handler)
"""

from __future__ import annotations

import logging
import sys

LOGGER = "mtlkit"


class _CurrentStderr(logging.Handler):
    """Writes each record to whatever ``sys.stderr`` is at that moment (a test's captured stream, a redirected
    one), not the stream that was current when the handler was made."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
            sys.stderr.flush()
        except Exception:  # logging must never raise into the caller (logging.Handler's contract)
            self.handleError(record)


def log_to_stderr(level: int = logging.INFO) -> logging.Handler:
    """Print mtlkit's messages of ``level`` and above on standard error (the command line's setting); returns the
    handler (the same one if already installed)."""
    logger = logging.getLogger(LOGGER)
    for h in logger.handlers:
        if isinstance(h, _CurrentStderr):
            return h
    handler = _CurrentStderr()
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False  # printed once, even when the program also configured the root logger
    return handler
