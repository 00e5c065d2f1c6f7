"""How many windows, and how many FLOPs, a sliding window over a CT costs.

Counts the windows of covidseg's default (MONAI's grid over the whole volume, kept where they meet the lungs'
box + margin and touch a lung voxel) and of MONAI's whole-volume reference, and multiplies their voxels by the
model's measured FLOPs per voxel (``covidseg model info``: 225 kFLOP/voxel for the default full model).

Run: ``python benchmarks/window_flops.py CT LUNGS [--window 8 128 128] [--overlap 0.25] [--kflop 225]``, e.g. with
the CT and ``lungs.nii.gz`` kept by ``benchmarks/inference.py --keep K``.
"""

from __future__ import annotations

import argparse
import itertools

import numpy as np

from covidseg.inference.sliding_window import mask_box, scan_starts
from covidseg.io.image import read_image, read_mask


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ct")
    p.add_argument("lungs")
    p.add_argument("--window", type=int, nargs=3, default=[8, 128, 128])
    p.add_argument("--overlap", type=float, default=0.25)
    p.add_argument("--margin-mm", type=float, default=10.0)
    p.add_argument("--kflop", type=float, default=225.0, help="model cost, kFLOP per voxel")
    args = p.parse_args(argv)
    image = read_image(args.ct)
    lung = np.asarray(read_mask(args.lungs, image)) > 0
    win = tuple(args.window)
    margin = tuple(int(np.ceil(args.margin_mm / s)) for s in image.spacing)
    box = mask_box(lung, margin)
    assert box is not None, "no lung voxel"
    grid = [scan_starts(n, w, args.overlap) for n, w in zip(lung.shape, win, strict=True)]
    in_box = [[s for s in g if s < b.stop and s + w > b.start] for g, w, b in zip(grid, win, box, strict=True)]
    ours = [q for q in itertools.product(*in_box)
            if lung[q[0]:q[0] + win[0], q[1]:q[1] + win[1], q[2]:q[2] + win[2]].any()]
    voxels = int(np.prod(win))
    reference = int(np.prod([len(g) for g in grid]))
    for name, n in (("covidseg (lungs' windows)", len(ours)), ("reference (whole volume)", reference)):
        print(f"{name}: {n} windows of {'x'.join(map(str, win))}, {n * voxels * args.kflop * 1e3 / 1e12:.1f} TFLOP")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
