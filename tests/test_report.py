"""Report pieces: severity bands, volumes, the picture and the HTML page."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from covidseg.report import involvement, severity
from covidseg.report.html import render_html
from covidseg.report.overview import AXIAL_TILES, INFECTION_COLOUR, LUNG_COLOURS, pick_slices, render_overview

COLOUR_TOLERANCE = 60
"""Largest summed |RGB| difference of a pixel from an outline colour (anti-aliasing blends the line's edges)."""


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


def _outlines(png: Path, colour: str) -> list[tuple[slice, slice]]:
    """Bounding boxes ``(rows, columns)`` of the connected strokes of ``colour`` in the picture."""
    from PIL import Image
    from scipy import ndimage

    image = np.asarray(Image.open(png).convert("RGB")).astype(int)
    rgb = np.array([int(colour[i : i + 2], 16) for i in (1, 3, 5)])
    strokes = np.abs(image - rgb).sum(axis=-1) < COLOUR_TOLERANCE
    labels, _ = ndimage.label(ndimage.binary_dilation(strokes))  # one stroke despite anti-aliasing gaps
    return [box for box in ndimage.find_objects(labels) if box is not None]


def _inside(inner: tuple[slice, slice], outer: tuple[slice, slice]) -> bool:
    return all(o.start <= i.start and i.stop <= o.stop for i, o in zip(inner, outer, strict=True))


def test_picture_shows_each_mask_where_it_is(tmp_path: Path) -> None:
    """Every axial tile and the coronal view outline the right lung (green, the image's left) beside the left lung
    (blue), and the infection (red) inside the left lung's outline on the slices that have it, and nowhere when
    there is none."""
    from PIL import Image

    lungs, inf = _masks()
    hu = np.where(lungs > 0, -850.0, 40.0).astype(np.float32)
    summary = involvement(lungs, inf, (2.0, 0.5, 0.5))
    png = render_overview(hu, lungs, inf, (2.0, 0.5, 0.5), summary, tmp_path / "overview.png", title="t")
    width, height = Image.open(png).size
    assert width > 1000 and 2.0 < width / height < 3.5  # 4 tile columns and the coronal view, 2 tile rows
    slices = pick_slices(lungs, inf, AXIAL_TILES)
    left, right, red = (_outlines(png, c) for c in (LUNG_COLOURS[1], LUNG_COLOURS[2], INFECTION_COLOUR))
    assert len(left) == len(right) == len(slices) + 1  # one per axial tile and one in the coronal view
    for blue, green in zip(sorted(left, key=lambda b: b[1].start), sorted(right, key=lambda b: b[1].start),
                           strict=True):
        assert green[1].stop < blue[1].start  # the right lung on the image's left
        assert abs(green[0].start - blue[0].start) <= 2 and abs(green[0].stop - blue[0].stop) <= 2
    infected = [k for k in slices if inf[k].any()]
    assert infected and len(red) == len(infected)  # the coronal view's row (the lungs' widest) has none
    assert all(any(_inside(r, blue) for blue in left) for r in red)
    none = render_overview(hu, lungs, np.zeros_like(inf), (2.0, 0.5, 0.5), involvement(lungs, 0 * inf, (2, 0.5, 0.5)),
                           tmp_path / "clear.png")
    assert _outlines(none, INFECTION_COLOUR) == [] and len(_outlines(none, LUNG_COLOURS[1])) == len(left)


def test_picture_and_html(tmp_path: Path) -> None:
    lungs, inf = _masks()
    hu = np.where(lungs > 0, -850.0, 40.0).astype(np.float32)
    summary = involvement(lungs, inf, (2.0, 0.5, 0.5))
    png = render_overview(hu, lungs, inf, (2.0, 0.5, 0.5), summary, tmp_path / "overview.png", title="t")
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
