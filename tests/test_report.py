"""mtlkit report: axis ranges, the Pareto front, a self-contained page, errors, and the page in a real browser."""

import base64
import re
import shutil
import subprocess

import pytest

from mtlkit.cli import main
from mtlkit.config import RunConfig
from mtlkit.errors import ConfigError
from mtlkit.report import GENERATOR, axis_range, pareto_front, write_report
from mtlkit.train import Trainer


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    paths = []
    for method in ("mgda", "ew"):
        cfg = RunConfig.from_dict(
            {
                "dataset": {"name": "_toy"},
                "method": {"name": method},
                "model": {"name": "hps", "options": {"encoder": "mlp", "hidden": [16], "head_hidden": 8}},
                "train": {"epochs": 2, "batch_size": 32, "lr": 0.01, "progress": False, "log_every": 1},
                "output": {"dir": str(root / method), "tensorboard": False},
            }
        )
        Trainer(cfg).fit()
        paths.append(root / method)
    return paths


def test_axes_start_where_the_quantity_does():
    assert axis_range("accuracy", [0.47, 0.98]) == (0.0, 1.0)  # never a 47 % floor
    assert axis_range("average_precision", [0.9]) == (0.0, 1.0)
    lo, hi = axis_range("loss", [0.2, 1.3])
    assert lo == 0.0 and hi == pytest.approx(1.3 + 0.05 * 1.3)
    assert axis_range("mae", [-1.0, 3.0])[0] == -1.0  # a negative value stays in view


def test_pareto_front_follows_each_metrics_direction():
    pts = [(0.9, 0.5), (0.8, 0.8), (0.7, 0.4), (0.9, 0.5)]
    assert pareto_front(pts, [True, True]) == [True, True, False, True]  # ties dominate nobody
    assert pareto_front(pts, [False, False]) == [False, False, True, False]  # lower is better: (0.7, 0.4) wins
    assert pareto_front([(1.0, 2.0)], [True, False]) == [True]


def test_the_page_is_self_contained_and_has_every_plot(two_runs, tmp_path):
    out = write_report(two_runs, tmp_path / "r.html")
    page = out.read_text()
    assert GENERATOR in page
    assert not re.search(r"""(src|href)\s*=\s*['"]?(https?:|//)""", page)  # nothing fetched when viewed
    images = re.findall(r"src='data:image/png;base64,([^']+)'", page)
    assert len(images) == 4  # curves, one monitoring figure per run, the Pareto scatter
    assert all(base64.b64decode(i)[:8] == b"\x89PNG\r\n\x1a\n" for i in images)
    for text in ("Pareto scatter", "Monitoring: mgda s0", "Monitoring: ew s0", "Seeds: mgda: seed 0"):
        assert text in page
    assert "No per-task gradients" in page  # EW: said, not drawn as zeros
    assert "from the Gramian the engine formed (no extra backward)" in page
    write_report(two_runs[:1], out)  # an earlier report is replaced without --overwrite


def test_bad_input_is_a_one_line_error(two_runs, tmp_path, capsys):
    with pytest.raises(ConfigError, match="does not exist"):
        write_report([tmp_path / "nope"], tmp_path / "r.html")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="not an mtlkit run"):
        write_report([tmp_path / "empty"], tmp_path / "r.html")
    mine = tmp_path / "notes.html"
    mine.write_text("<html>my notes</html>")
    assert main(["report", str(two_runs[0]), "--out", str(mine)]) == 2
    assert "is not an mtlkit report; pass --overwrite" in capsys.readouterr().err
    assert mine.read_text() == "<html>my notes</html>"
    assert main(["report", str(two_runs[0]), "--out", str(mine), "--overwrite"]) == 0
    assert GENERATOR in mine.read_text()


@pytest.mark.skipif(shutil.which("chromium") is None, reason="no chromium on this machine to render the page")
def test_the_page_renders_in_a_headless_browser(two_runs, tmp_path):
    np = pytest.importorskip("numpy")
    image = pytest.importorskip("PIL.Image")
    out = write_report(two_runs, tmp_path / "r.html")
    shot = tmp_path / "shot.png"
    subprocess.run(
        [
            "chromium",
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            f"--screenshot={shot}",
            "--window-size=1280,3000",
            out.as_uri(),
        ],
        capture_output=True,
        timeout=120,
        check=True,
    )
    px = np.asarray(image.open(shot).convert("RGB")).astype(int)
    assert px.shape[:2] == (3000, 1280)
    # the plots were decoded and drawn: coloured pixels (lines, heatmap), which text and table borders have none of
    saturation = px.max(axis=2) - px.min(axis=2)
    assert (saturation > 80).mean() > 0.002
    assert (px.sum(axis=2) < 600).mean() > 0.01  # and it is not a blank page
