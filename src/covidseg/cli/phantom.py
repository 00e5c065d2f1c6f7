"""`covidseg phantom OUT_DIR`: write a synthetic chest-CT cohort in the real dataset's Zenodo layout."""

from __future__ import annotations

import argparse

_DESCRIPTION = """\
Generate synthetic chest-CT phantoms with lung and infection masks, written exactly like the
COVID-19-CT-Seg Zenodo record (docs/method.md), so that every covidseg command reads them as it reads the
real data:

  OUT_DIR/COVID-19-CT-Seg_20cases/coronacases_org_001.nii.gz   (CT)
  OUT_DIR/Lung_Mask/coronacases_001.nii.gz                     (1 left lung, 2 right lung)
  OUT_DIR/Infection_Mask/coronacases_001.nii.gz                (0/1)
  OUT_DIR/Lung_and_Infection_Mask/coronacases_001.nii.gz       (1 left, 2 right, 3 infection)

Styles: coronacases (about 512x512x200-300, ~0.7 mm pixels, ~1 mm slices, Hounsfield units),
radiopaedia (about 630x630x40-110, thick slices, windowed to [-1250, 250] HU and stored as [0, 255]),
mixed (alternating). The same --seed gives the same cohort. Phantoms are not patient data (docs/phantoms.md).
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("phantom", help="write a synthetic chest-CT cohort in the Zenodo layout",
                       description=_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir", metavar="OUT_DIR", help="folder to write the cohort into (created if missing)")
    p.add_argument("--cases", type=int, default=4, help="number of cases (default: 4)")
    p.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same cohort (default: 0)")
    p.add_argument("--style", choices=["coronacases", "radiopaedia", "mixed"], default="mixed",
                   help="geometry and intensity convention of the cases (default: mixed)")
    p.add_argument("--scale", type=float, default=1.0,
                   help="multiplies the in-plane size and slice count, spacing grows so the anatomy keeps its size "
                        "in mm; 0.25 gives about 128x128x60 (default: 1.0)")
    p.add_argument("--force", action="store_true", help="overwrite case files that already exist")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from covidseg.errors import UserError
    from covidseg.phantom import write_cohort

    if not 0.02 <= args.scale <= 4.0:
        raise UserError(f"--scale {args.scale} is out of range; use a value in [0.02, 4] (1 = full size)")
    written = write_cohort(args.out_dir, args.cases, args.seed, args.style, scale=args.scale, force=args.force,
                           progress=not args.quiet)
    print(f"wrote {len(written)} phantom case(s) to {args.out_dir}: "
          + ", ".join(f.case_id for f in written))
    return 0
