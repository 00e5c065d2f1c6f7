"""Report pieces: severity bands, volumes, the picture and the HTML page."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from covidseg.report import involvement, severity
from covidseg.report.html import render_html
from covidseg.report.overview import render_overview


@pytest.mark.parametrize("percent, score", [(0.0, 0), (0.01, 1), (4.99, 1), (5.0, 2), (25.0, 2), (25.01, 3),
                                            (50.0, 3), (60.0, 4), (75.0, 4), (75.5, 5), (100.0, 5)])
def test_severity_bands(percent: float, score: int) -> None:
    assert severity(percent).score == score


def _masks() -> tuple[np.ndarray, np.ndarray]:
    lungs = np.zeros((6, 20, 30), np.uint8)
    lungs[1:5, 4:16, 2:12] = 2  # right lung: low columns
    lungs[1:5, 4:16, 18:28] = 1  # left lung: 480 voxels each
    inf = np.zeros_like(lungs)
    inf[2:4, 5:11, 20:26] = 1  # 72 voxels in the left lung
    return lungs, inf


def test_involvement_volumes() -> None:
    lungs, inf = _masks()
    out = involvement(lungs, inf, (2.0, 0.5, 0.5))
    voxel_ml = 0.5 / 1000.0
    assert out["left"]["lung_ml"] == pytest.approx(480 * voxel_ml)
    assert out["left"]["infection_ml"] == pytest.approx(72 * voxel_ml)
    assert out["left"]["percent"] == pytest.approx(15.0)
    assert out["right"]["percent"] == 0.0 and out["right"]["severity_score"] == 0
    assert out["both"]["percent"] == pytest.approx(7.5) and out["both"]["severity_score"] == 2


def test_picture_and_html(tmp_path: Path) -> None:
    lungs, inf = _masks()
    hu = np.where(lungs > 0, -850.0, 40.0).astype(np.float32)
    summary = involvement(lungs, inf, (2.0, 0.5, 0.5))
    png = render_overview(hu, lungs, inf, (2.0, 0.5, 0.5), summary, tmp_path / "overview.png", title="t")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = {"case": "t<1>", "input": "x.nii.gz", "spacing_mm": [2.0, 0.5, 0.5], "shape": [6, 20, 30],
              "lungs": {k: summary[k] for k in ("left", "right", "both")}, "severity_source": "Pan et al.",
              "model": {"name": "m", "checkpoint": "c.pt"}, "lung_method": "classical",
              "infection_outside_lungs_ml": 0.0, "run_time_s": 1.0, "versions": {"covidseg": "0"}}
    page = render_html(report, png, tmp_path / "report.html").read_text(encoding="utf-8")
    assert "data:image/png;base64," in page and "t&lt;1&gt;" in page and "15.00" in page


def test_coronal_view_cuts_through_the_lungs_not_the_couch() -> None:
    from covidseg.report.overview import coronal_row

    hu = np.full((10, 60, 40), -1000.0, np.float32)
    hu[:, 5:40, 5:35] = 40.0  # the body
    hu[:, 50:52, :] = 200.0  # a couch below it
    lungs = np.zeros(hu.shape, np.uint8)
    lungs[2:8, 12:30, 8:18] = 2
    lungs[2:8, 15:25, 22:32] = 1
    row = coronal_row(hu, lungs)
    assert lungs[:, row].any() and 15 <= row < 25
    assert 5 <= coronal_row(hu, np.zeros_like(lungs)) < 40  # no lungs: through the body
