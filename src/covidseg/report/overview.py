"""``overview.png``: a montage of axial slices and one coronal view with lung and infection outlines.

Axial slices are shown as radiologists read them (patient's right on the image's left, anterior at the top:
``imshow(volume[k])`` of a canonical array); the coronal view has the head at the top and its pixels stretched
by the slice spacing so that it is not squashed. Outlines: left lung blue, right lung green, infection red.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

LUNG_COLOURS: dict[int, str] = {1: "#3b8bff", 2: "#35c759"}
"""Outline colours of the left (1) and right (2) lung."""
INFECTION_COLOUR = "#ff3b30"
"""Outline colour of the infection."""
DISPLAY_WINDOW_HU: tuple[float, float] = (-1250.0, 250.0)
"""Grey-level window of the pictures (HU), the network's window."""
AXIAL_TILES = 8
"""Axial slices in the montage."""
TILE_INCHES = 2.4
"""Size of one tile (inches)."""
DPI = 110
"""Resolution of the PNG."""


def pick_slices(lungs: np.ndarray, infection: np.ndarray, count: int) -> list[int]:
    """``count`` axial slice indices spread evenly over the lungs' extent (the slice with the most infection
    always among them). Falls back to the whole volume when the lung mask is empty."""
    per_slice = lungs.reshape(lungs.shape[0], -1).any(axis=1)
    idx = np.flatnonzero(per_slice)
    lo, hi = (int(idx[0]), int(idx[-1])) if idx.size else (0, lungs.shape[0] - 1)
    picks = {int(round(v)) for v in np.linspace(lo + 0.1 * (hi - lo), hi - 0.1 * (hi - lo), count)}
    inf_slice = infection.reshape(infection.shape[0], -1).sum(axis=1)
    if inf_slice.any():
        best = int(np.argmax(inf_slice))
        if best not in picks:
            nearest = min(picks, key=lambda p: abs(p - best))
            picks.discard(nearest)
            picks.add(best)
    return sorted(picks)[:count]


def coronal_row(hu: np.ndarray, lungs: np.ndarray, tissue_hu: float = -500.0) -> int:
    """Row (anterior-posterior index) of the coronal view: the one crossing most lung voxels, so the view cuts
    through the lungs; without lungs, the middle of the rows holding tissue (above ``tissue_hu``) in most slices,
    the body's rather than the image's middle (a couch or the air under it is not what to show)."""
    rows_area = (lungs > 0).sum(axis=(0, 2))
    if rows_area.any():
        return int(np.argmax(rows_area))
    per_row = (hu > tissue_hu).mean(axis=(0, 2))
    rows = np.flatnonzero(per_row >= 0.5 * per_row.max()) if per_row.any() else np.array([hu.shape[1] // 2])
    return int(round(0.5 * (rows[0] + rows[-1])))


def _outline(ax: Any, mask: np.ndarray, colour: str, width: float = 0.9) -> None:
    if mask.any():
        ax.contour(mask.astype(np.float32), levels=[0.5], colors=[colour], linewidths=width)


def render_overview(
    hu: np.ndarray,
    lungs: np.ndarray,
    infection: np.ndarray,
    spacing: Sequence[float],
    summary: dict[str, Any],
    path: Path | str,
    title: str = "",
) -> Path:
    """Write the overview picture.

    Args:
        hu: canonical ``(D, H, W)`` CT in HU.
        lungs: ``(D, H, W)`` labels 1 left, 2 right.
        infection: ``(D, H, W)`` 0/1.
        spacing: ``(D, H, W)`` mm.
        summary: :func:`covidseg.report.volumes.involvement` output (percentages shown in the titles).
        path: the ``.png`` to write (atomically).
        title: first line of the figure title (e.g. the case name).

    Returns:
        ``path``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from covidseg.io.atomic import atomic_path

    vmin, vmax = DISPLAY_WINDOW_HU
    slices = pick_slices(lungs, infection, AXIAL_TILES)
    cols = 4
    rows = int(np.ceil(len(slices) / cols))
    fig = plt.figure(figsize=(TILE_INCHES * (cols + 2), TILE_INCHES * max(rows, 2) + 0.6), dpi=DPI)
    grid = fig.add_gridspec(max(rows, 2), cols + 2, wspace=0.04, hspace=0.12)
    for i, k in enumerate(slices):
        ax = fig.add_subplot(grid[i // cols, i % cols])
        ax.imshow(hu[k], cmap="gray", vmin=vmin, vmax=vmax, interpolation="bilinear")
        for label, colour in LUNG_COLOURS.items():
            _outline(ax, lungs[k] == label, colour)
        _outline(ax, infection[k] > 0, INFECTION_COLOUR, 1.1)
        ax.set_title(f"axial {k}", fontsize=7, pad=2)
        ax.set_axis_off()
    row = coronal_row(hu, lungs)
    ax = fig.add_subplot(grid[:, cols:])
    aspect = float(spacing[0]) / float(spacing[2])
    ax.imshow(hu[::-1, row, :], cmap="gray", vmin=vmin, vmax=vmax, aspect=aspect, interpolation="bilinear")
    for label, colour in LUNG_COLOURS.items():
        _outline(ax, lungs[::-1, row, :] == label, colour)
    _outline(ax, infection[::-1, row, :] > 0, INFECTION_COLOUR, 1.1)
    ax.set_title(f"coronal (row {row}); R on the left", fontsize=8, pad=2)
    ax.set_axis_off()
    left, right, both = summary["left"], summary["right"], summary["both"]
    text = (f"left lung {left['percent']:.1f} % ({left['infection_ml']:.0f} of {left['lung_ml']:.0f} mL)   "
            f"right lung {right['percent']:.1f} % ({right['infection_ml']:.0f} of {right['lung_ml']:.0f} mL)   "
            f"both {both['percent']:.1f} %: {both['severity']} (score {both['severity_score']})")
    heading = f"{title}\n{text}" if title else text
    fig.suptitle(heading, fontsize=9)
    fig.text(0.01, 0.005, "outlines: blue left lung, green right lung, red infection (not for diagnosis)",
             fontsize=7, color="#444444")
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path
