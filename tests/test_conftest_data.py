"""The real-data policy of tests/conftest.py, run on a probe suite in a subprocess (no network: the dataset is made
unobtainable by pointing ``MTLKIT_MNIST_DIR`` at an empty folder, which the fetcher tries before any registry)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import require_data

PROBE = """
import pytest


@pytest.mark.data("mnist")
def test_needs_mnist():
    pass


@pytest.mark.data("mnist")
def test_needs_mnist_too():
    pass


def test_plain():
    pass
"""


def _run_probe(tmp_path: Path, **env_vars: str) -> tuple[int, str]:
    suite = tmp_path / "suite"
    suite.mkdir()
    shutil.copy(Path(__file__).with_name("conftest.py"), suite / "conftest.py")
    (suite / "test_probe.py").write_text(PROBE)
    (suite / "pytest.ini").write_text("[pytest]\nmarkers =\n    data(*names): probe\n")
    (tmp_path / "empty").mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "MTLKIT_REQUIRE_DATA", "PYTEST_ADDOPTS")}
    env.update(MTLKIT_CACHE_DIR=str(tmp_path / "cache"), MTLKIT_MNIST_DIR=str(tmp_path / "empty"), **env_vars)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", str(suite)],
        cwd=suite,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return proc.returncode, proc.stdout + proc.stderr


def test_missing_data_is_a_loud_skip_named_in_the_summary(tmp_path):
    rc, out = _run_probe(tmp_path)
    assert rc == 0, out
    assert "1 passed, 2 skipped" in out, out
    assert "MISSING DATA: 2 test(s) SKIPPED without their real datasets" in out, out
    assert "SKIPPED test_probe.py::test_needs_mnist (needs mnist)" in out, out
    assert "mnist: " in out and "train-images-idx3-ubyte.gz is missing" in out, out  # the fetcher's own error
    assert out.count("mnist is not cached") == 1, out  # fetched (tried) once per session, not once per test


def test_missing_data_fails_the_run_under_ci(tmp_path):
    rc, out = _run_probe(tmp_path, CI="true")
    assert rc == 1, out
    assert "1 passed, 2 errors" in out, out
    assert "MISSING DATA: 2 test(s) FAILED without their real datasets" in out, out


@pytest.mark.parametrize(
    "env, expected",
    [
        ({}, False),
        ({"CI": "true"}, True),
        ({"MTLKIT_REQUIRE_DATA": "1"}, True),
        ({"CI": "true", "MTLKIT_REQUIRE_DATA": "0"}, False),
    ],
)
def test_require_data_follows_ci_unless_told_otherwise(monkeypatch, env, expected):
    for k in ("CI", "MTLKIT_REQUIRE_DATA"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert require_data() is expected
