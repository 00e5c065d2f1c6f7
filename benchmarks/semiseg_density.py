"""How much of the expert-labelled infection each CV fold model finds, by the density of the pixels (in HU).

Each fold model of a finished ``benchmarks/semiseg_cv.py --pseudo`` run (its ``OUT/state/<variant>/fold<k>.state.pt``
and ``fold<k>.json``) predicts its own held-out expert slices with the run's ``--flip-tta``; every pixel is put in a
band of density by its 8-bit level read back to HU through the window of the expert slices
(``covidseg.inference.slices.WINDOW_HU``, docs/slices.md), and per band the script counts:

- **recall**: the share of the expert's infection pixels the model marks (probability >= 0.5);
- **flagged**: the share of the pixels outside the expert's infection the model marks.

Ground glass lies at about -700 to -300 HU, consolidation at about -100 to +100 HU; what is brighter is mostly
vessels, bone and partial volumes. The slices are pooled over folds (each slice is held out once). Writes a
JSON and prints a table::

    python benchmarks/semiseg_density.py --data ../shared/data/covid-semiseg/train --run out/semiseg-aug \\
        --json docs/results/semiseg_density.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

try:
    import covidseg  # noqa: F401
except ImportError:  # a plain checkout: use its src/ folder
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from _stamp import write_results
from semiseg_kernels import add_run_arguments, fold_files, fold_model, run_flip_tta

from covidseg.config import flip_tta_name
from covidseg.inference.slices import WINDOW_HU

BANDS_HU: tuple[float, ...] = (-700.0, -500.0, -300.0, -100.0, 100.0)
"""Inner edges of the density bands (HU): below -700 (aerated lung), ground glass in three, consolidation
(-100 to +100), brighter."""


def band_names(edges: tuple[float, ...] = BANDS_HU) -> list[str]:
    """``"< -700"``, ``"-700 to -500"``, ..., ``">= 100"`` for the bands of ``edges``."""
    names = [f"< {edges[0]:g}"]
    names += [f"{a:g} to {b:g}" for a, b in zip(edges[:-1], edges[1:], strict=True)]
    return [*names, f">= {edges[-1]:g}"]


def to_hu(levels: np.ndarray, window: tuple[float, float] = WINDOW_HU) -> np.ndarray:
    """Image values in [0, 1] (8-bit levels / 255) back to HU through ``window`` (clipped values stay at its ends)."""
    lo, hi = window
    return lo + np.asarray(levels, dtype=np.float64) * (hi - lo)


def count_by_band(probs: list[np.ndarray], images: list[np.ndarray], masks: list[np.ndarray],
                  edges: tuple[float, ...] = BANDS_HU, threshold: float = 0.5) -> dict[str, np.ndarray]:
    """Per density band: expert infection pixels (``gt``), those marked (``tp``), other pixels (``other``) and
    those marked (``flagged``), summed over slices. Each map, image and mask is ``(H, W)`` at one size."""
    n = len(edges) + 1
    out = {k: np.zeros(n, dtype=np.int64) for k in ("gt", "tp", "other", "flagged")}
    for prob, image, mask in zip(probs, images, masks, strict=True):
        band = np.digitize(to_hu(image), edges)  # 0 .. n-1
        gt, marked = np.asarray(mask) > 0, np.asarray(prob) >= threshold
        out["gt"] += np.bincount(band[gt], minlength=n)
        out["tp"] += np.bincount(band[gt & marked], minlength=n)
        out["other"] += np.bincount(band[~gt], minlength=n)
        out["flagged"] += np.bincount(band[~gt & marked], minlength=n)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(p)
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    args = p.parse_args(argv)
    import torch

    from covidseg.semiseg.data import load_folder
    from covidseg.semiseg.train import predict_slices

    work = args.run / "state" / args.variant
    folds = fold_files(work)
    if not folds:
        return 2
    by_name = {s.name: s for s in load_folder(args.data)}
    run_tta = run_flip_tta(args.run)
    probs: list[np.ndarray] = []
    images: list[np.ndarray] = []
    masks: list[np.ndarray] = []
    used: str | None = None
    for fold_file in folds:
        fold = json.loads(fold_file.read_text(encoding="utf-8"))
        model, settings = fold_model(work / f"{fold_file.stem}.state.pt")
        used = run_tta or flip_tta_name(settings["flip_tta"])
        test = [by_name[name] for name in fold["test"]]
        with torch.no_grad():
            probs += predict_slices(model, test, tuple(settings["size"]), torch.device("cpu"), settings["amp"],
                                    flip_tta=used)
        images += [s.image for s in test]
        masks += [s.mask > 0 for s in test]
    counts = count_by_band(probs, images, masks)
    names = band_names()
    rows: dict[str, dict[str, Any]] = {}
    print("| density (HU) | expert infection pixels | recall | other pixels | flagged |")
    print("|---|---|---|---|---|")
    for i, name in enumerate(names):
        gt, tp, other, flagged = (int(counts[k][i]) for k in ("gt", "tp", "other", "flagged"))
        recall = tp / gt if gt else None
        share = flagged / other if other else None
        rows[name] = {"gt_pixels": gt, "recall": recall, "other_pixels": other, "flagged": share}
        print(f"| {name} | {gt} | {'-' if recall is None else f'{recall:.2f}'} | {other} | "
              f"{'-' if share is None else f'{share:.3f}'} |")
    if args.json is not None:
        write_results(args.json, {"benchmark": "semiseg_density", "flip_tta": used, "window_hu": list(WINDOW_HU),
                                  "bands_hu": list(BANDS_HU), "n_slices": len(probs), "threshold": 0.5,
                                  "bands": rows},
                      {"data": str(args.data), "run": str(args.run), "variant": args.variant})
    return 0


if __name__ == "__main__":
    sys.exit(main())
