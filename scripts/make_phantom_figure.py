"""Draw one phantom of each style for the docs: docs/images/phantom_coronacases.png and phantom_radiopaedia.png.

Each picture shows an axial slice in the lung window (plain, then with the masks outlined: left lung, right lung,
infection) and a coronal view with the same outlines, at the scan's own spacing. The stored values are shown as a
reader sees them (radiopaedia-style files are converted back from [0, 255] to HU for display).

Usage::

    python scripts/make_phantom_figure.py [--seed 1] [--scale 1.0] [--out docs/images]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

LUNG_WINDOW = (-1350.0, 150.0)
"""Display window (HU): level -600, width 1500."""
COLOURS = {"left lung": "#3fa7ff", "right lung": "#ffd23f", "infection": "#ff3b3b"}


def draw(style: str, seed: int, scale: float, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from covidseg.phantom import make_phantom
    from covidseg.phantom.core import WINDOW_HU

    t0 = time.perf_counter()
    ph = make_phantom(style, seed, scale=scale)
    elapsed = time.perf_counter() - t0
    ct, lungs, inf = ph.ct, ph.lungs, ph.infection
    dz, dy, dx = ph.spacing
    if ph.convention == "windowed":  # display what the file holds ([0, 255]), back in HU
        lo, hi = WINDOW_HU
        ct = np.rint(np.clip((ct - lo) * (255.0 / (hi - lo)), 0, 255)) * ((hi - lo) / 255.0) + lo
    per_slice = inf.reshape(inf.shape[0], -1).sum(axis=1)
    lung_slices = np.flatnonzero(lungs.reshape(lungs.shape[0], -1).any(axis=1))
    k = int(np.argmax(per_slice)) if per_slice.max() > 0 else int(lung_slices[len(lung_slices) * 2 // 5])
    rows_any = np.flatnonzero((inf if per_slice.max() else lungs).any(axis=(0, 2)))
    row = int(np.median(rows_any)) if len(rows_any) else ct.shape[1] // 2

    fig, axes = plt.subplots(1, 3, figsize=(16, 5.8), gridspec_kw={"width_ratios": [1, 1, 1.05]})
    kw = {"cmap": "gray", "vmin": LUNG_WINDOW[0], "vmax": LUNG_WINDOW[1], "interpolation": "nearest"}
    axial_extent = (0, ct.shape[2] * dx, ct.shape[1] * dy, 0)
    axes[0].imshow(ct[k], extent=axial_extent, **kw)
    axes[0].set_title(f"axial slice {k} (lung window L-600 W1500)")
    axes[1].imshow(ct[k], extent=axial_extent, **kw)
    _outline(axes[1], lungs[k], inf[k], axial_extent)
    axes[1].set_title("masks: left lung, right lung, infection")
    coronal = ct[:, row, :]
    cor_extent = (0, ct.shape[2] * dx, 0, ct.shape[0] * dz)
    axes[2].imshow(coronal, extent=cor_extent, origin="lower", **kw)
    _outline(axes[2], lungs[:, row, :], inf[:, row, :], cor_extent, origin_lower=True)
    axes[2].axhline((k + 0.5) * dz, color="white", lw=0.6, ls="--")
    axes[2].set_title(f"coronal, row {row} (dashed: the axial slice)")
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in axes[:2]:
        ax.text(4, ct.shape[1] * dy - 6, "R", color="white", fontsize=12)
        ax.text(ct.shape[2] * dx - 14, ct.shape[1] * dy - 6, "L", color="white", fontsize=12)
    handles = [plt.Line2D([], [], color=c, lw=2, label=n) for n, c in COLOURS.items()]
    fig.legend(handles=handles, loc="lower center", ncol=3, frameon=False)
    shape = "x".join(str(s) for s in ph.to_file(ph.lungs).shape)
    fig.suptitle(
        f"synthetic phantom, style {style} (seed {seed}, scale {scale}): file {shape} voxels, spacing "
        f"{dx:.2f} x {dy:.2f} x {dz:.2f} mm, stored as {ph.convention}, orientation {''.join(ph.axcodes)}; "
        f"involvement {ph.severity}; made in {elapsed:.1f} s", fontsize=10)
    fig.tight_layout(rect=(0, 0.05, 1, 0.95))
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"phantom_{style}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _outline(ax: object, lungs: np.ndarray, inf: np.ndarray, extent: tuple[float, ...],
             origin_lower: bool = False) -> None:
    h, w = lungs.shape
    x = np.linspace(extent[0], extent[1], w, endpoint=False) + (extent[1] - extent[0]) / (2 * w)
    if origin_lower:
        y = np.linspace(extent[2], extent[3], h, endpoint=False) + (extent[3] - extent[2]) / (2 * h)
    else:
        y = np.linspace(extent[3], extent[2], h, endpoint=False) + (extent[2] - extent[3]) / (2 * h)
    for mask, colour in ((lungs == 1, COLOURS["left lung"]), (lungs == 2, COLOURS["right lung"]),
                         (inf > 0, COLOURS["infection"])):
        if mask.any():
            ax.contour(x, y, mask.astype(float), levels=[0.5], colors=[colour], linewidths=1.0)  # type: ignore[attr-defined]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=1, help="phantom seed (the same for both styles)")
    p.add_argument("--scale", type=float, default=1.0, help="size multiplier (1 = full size)")
    p.add_argument("--out", type=Path, default=Path("docs/images"), help="output folder")
    p.add_argument("--style", choices=["coronacases", "radiopaedia", "both"], default="both")
    args = p.parse_args()
    styles = ["coronacases", "radiopaedia"] if args.style == "both" else [args.style]
    for style in styles:
        print(draw(style, args.seed, args.scale, args.out))


if __name__ == "__main__":
    main()
