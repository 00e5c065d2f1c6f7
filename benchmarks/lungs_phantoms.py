"""Classical lung extraction against the phantoms' own lung masks.

For each seed: a coronacases-style phantom at ``--scale`` (1.0 = 512 x 512 x 200-300),
``covidseg.inference.lungs.classical_lungs`` on its HU volume, and the Dice of the left (1) and right (2) lung
against the phantom's truth, the share of the true infection kept inside the lung mask, and the time.

Run: ``python benchmarks/lungs_phantoms.py --scale 1.0 --seeds 1 2 3 4 5 6 7 8 9 10 11 12 [--json out.json]``
(``--json`` writes the rows with the stamp of ``benchmarks/_stamp.py``).
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import numpy as np
from _stamp import write_results

from covidseg.config import LungConfig
from covidseg.inference.lungs import LEFT, RIGHT, classical_lungs, work_factors
from covidseg.phantom import make_phantom


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * float((a & b).sum()) / total


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", type=float, default=1.0)
    p.add_argument("--seeds", type=int, nargs="+", default=list(range(1, 13)))
    p.add_argument("--json", type=Path, default=None, help="write the rows, stamped, as JSON")
    args = p.parse_args(argv)
    rows = []
    print("seed  shape (D, H, W)      spacing (mm)     work grid  Dice left  Dice right  infection kept  infection mL  "
          "lungs s")
    for seed in args.seeds:
        ph = make_phantom("coronacases", seed, scale=args.scale)
        t = time.perf_counter()
        out = classical_lungs(ph.ct, ph.spacing)
        seconds = time.perf_counter() - t
        inf = ph.infection > 0
        kept = f"{float((out[inf] > 0).mean()):.2f}" if inf.any() else "-"
        ml = float(inf.sum()) * float(np.prod(ph.spacing)) / 1000.0
        factors = "x".join(map(str, work_factors(ph.spacing, LungConfig().work_spacing_mm)))
        spacing = "x".join(f"{v:.3f}" for v in ph.spacing)
        rows.append({"seed": seed, "shape": list(ph.ct.shape), "spacing_mm": list(ph.spacing), "work_factors": factors,
                     "dice_left": dice(out == LEFT, ph.lungs == LEFT), "dice_right": dice(out == RIGHT, ph.lungs == RIGHT),
                     "infection_kept": float((out[inf] > 0).mean()) if inf.any() else None, "infection_ml": ml,
                     "lungs_s": seconds})
        print(f"{seed:4d}  {str(ph.ct.shape):19s}  {spacing:15s}  {factors:9s}  {dice(out == LEFT, ph.lungs == LEFT):9.3f}  "
              f"{dice(out == RIGHT, ph.lungs == RIGHT):10.3f}  {kept:>14s}  {ml:12.0f}  {seconds:7.1f}", flush=True)
    if args.json:
        config = {"benchmark": "benchmarks/lungs_phantoms.py", "scale": args.scale, "seeds": args.seeds,
                  "phantom": "coronacases", "lungs": dataclasses.asdict(LungConfig())}
        write_results(args.json, {"rows": rows}, config)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
