"""What the diaphragm partial-volume rule of the 2D stage does: false positives with and without it, and its cost.

The rule (``covidseg.inference.partial_volume.diaphragm_band``, used by ``SliceInfection`` with
``partial_volume_mm``) sets to 0 the infection voxels with soft tissue below and clearly lighter lung above them.
This benchmark measures, with the shipped default model:

1. on the three real CTs of ``../shared/data/real-ct`` (none shows COVID-19: every infection voxel is a false
   positive), the infection share of each lung with the rule off (0 mm), at its default band and at wider bands,
   and what each setting set to 0 (mL);
2. with the rule off, the median HU of the false-positive voxels and of the voxels 1 and 2 slices below and
   above them (the ramp along the body's long axis that the rule looks for);
3. on the phantoms' own lesion masks (``covidseg.phantom``; what the rule would take from lesions a model had
   found perfectly), the share of lesion voxels the rule marks, at the default band and a wider one.

Run: ``python benchmarks/partial_volume.py --json docs/results/partial_volume.json`` (about 3 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the real CTs' paths and readers live in tests/real_ct.py

from _stamp import write_results  # noqa: E402

from covidseg.config import Config  # noqa: E402
from covidseg.inference.backends import load_model  # noqa: E402
from covidseg.inference.case import segment_image  # noqa: E402
from covidseg.inference.partial_volume import PARTIAL_VOLUME_MM, diaphragm_band  # noqa: E402
from covidseg.inference.stages import SliceInfection, Stages, build_stages  # noqa: E402
from real_ct import CASES, load_image, missing_reason  # noqa: E402

BANDS_MM = (0.0, PARTIAL_VOLUME_MM, 6.0, 8.0)
"""Settings of ``partial_volume_mm`` run on each CT (0 = the rule off)."""
OFFSETS = (-2, -1, 0, 1, 2)
"""Slices below (< 0) and above (> 0) the false-positive voxels whose median HU is reported."""
PHANTOMS = (("coronacases", 0), ("coronacases", 2), ("radiopaedia", 1), ("radiopaedia", 3))
"""Phantoms (style, seed) at scale 0.5, as in ``tests/test_partial_volume.py``."""


def shares(infection: np.ndarray, lungs: np.ndarray, voxel_ml: float) -> dict[str, Any]:
    """Infection share (%) and volume (mL) of each lung and of both."""
    out: dict[str, Any] = {}
    for name, sel in (("left", lungs == 1), ("right", lungs == 2), ("both", lungs > 0)):
        n = int(sel.sum())
        k = int((infection & sel).sum())
        out[name] = {"percent": round(100.0 * k / max(n, 1), 3), "infection_ml": round(k * voxel_ml, 2)}
    return out


def hu_profile(hu: np.ndarray, mask: np.ndarray) -> dict[str, float | None]:
    """Median HU of ``mask``'s voxels moved by each of :data:`OFFSETS` slices along D (index 0 inferior)."""
    zs, ys, xs = np.nonzero(mask)
    prof: dict[str, float | None] = {}
    for k in OFFSETS:
        z = zs + k
        ok = (z >= 0) & (z < hu.shape[0])
        prof[str(k)] = round(float(np.median(hu[z[ok], ys[ok], xs[ok]])), 1) if ok.any() else None
    return prof


def run_case(case: str, stages: Stages) -> dict[str, Any]:
    """The case segmented once per band of :data:`BANDS_MM` (lungs shared); shares, removed mL, HU profile."""
    image = load_image(case)
    hu = image.array
    voxel_ml = float(np.prod(image.spacing)) / 1000.0
    row: dict[str, Any] = {"case": case, "spacing_mm": [float(s) for s in image.spacing], "bands": []}
    assert isinstance(stages.infection, SliceInfection)
    for band in BANDS_MM:
        stage = SliceInfection(stages.infection.model, "cpu", partial_volume_mm=band)
        seg = segment_image(image, Stages(lungs=stages.lungs, infection=stage))
        found = seg.infection.astype(bool) & (seg.lungs > 0)
        row["bands"].append({"partial_volume_mm": band, "removed_ml": round(stage.partial_volume_ml, 2),
                             **shares(found, seg.lungs, voxel_ml)})
        if band == 0.0:
            row["false_positive_hu_median_by_offset"] = hu_profile(hu, found) if found.any() else None
    return row


def run_phantoms() -> list[dict[str, Any]]:
    """Share of each phantom's lesion voxels the rule marks, at the default band and at 6 mm."""
    from covidseg.phantom import make_phantom

    rows = []
    for style, seed in PHANTOMS:
        ph = make_phantom(style, seed, scale=0.5)
        lesions = ph.infection > 0
        row: dict[str, Any] = {"style": style, "seed": seed, "slice_mm": round(float(ph.spacing[0]), 2),
                               "lesion_voxels": int(lesions.sum())}
        for band in (PARTIAL_VOLUME_MM, 6.0):
            taken = diaphragm_band(lesions, ph.lungs, ph.ct, ph.spacing[0], band)
            row[f"taken_percent_{band:g}mm"] = round(100.0 * float(taken.sum()) / max(int(lesions.sum()), 1), 2)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.add_argument("--cases", nargs="+", default=list(CASES))
    args = p.parse_args(argv)
    reason = missing_reason()
    if reason:
        print(reason, file=sys.stderr)
        return 2
    from covidseg.checkpoint import default_checkpoint

    stages = build_stages(load_model(default_checkpoint()), None, Config(), "cpu")
    rows = []
    for case in args.cases:
        row = run_case(case, stages)
        rows.append(row)
        cells = "  ".join(f"{b['partial_volume_mm']:g} mm: {b['both']['percent']:.2f} % (-{b['removed_ml']:.1f} mL)"
                          for b in row["bands"])
        print(f"{case:20s} {cells}  HU by slice offset {row['false_positive_hu_median_by_offset']}", flush=True)
    phantoms = run_phantoms()
    for ph in phantoms:
        print(f"phantom {ph['style']} {ph['seed']} ({ph['slice_mm']} mm slices): lesion voxels taken "
              f"{ph[f'taken_percent_{PARTIAL_VOLUME_MM:g}mm']:.2f} % at {PARTIAL_VOLUME_MM:g} mm, "
              f"{ph['taken_percent_6mm']:.2f} % at 6 mm", flush=True)
    result = {
        "benchmark": "partial_volume", "default_partial_volume_mm": PARTIAL_VOLUME_MM, "cases": rows,
        "phantoms": phantoms,
        "note": "no real CT shows COVID-19: every infection voxel is a false positive; percentages of the lung "
                "volume; HU offsets in slices (negative = inferior)",
    }
    if args.json:
        write_results(args.json, result, {
            "command": "python benchmarks/partial_volume.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "model": "the shipped default (covidseg/weights/semiseg-2d.pt)"})
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
