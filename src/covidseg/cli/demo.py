"""`covidseg demo`: phantom cohort -> brief training of the full model -> evaluation -> one segmented scan."""

from __future__ import annotations

import argparse

DESCRIPTION = """\
The whole job on synthetic data, on the CPU, in a few minutes (about 6 on 2 cores; docs/demo.md):

  1. writes a small cohort of synthetic chest-CT phantoms (10 cases, Zenodo layout) into DIR/phantoms;
  2. trains the report's final model (unet-fv-paspp-ds, at a reduced width, depth and patch) with the code of
     'covidseg train' into DIR/run (best.pt is the model);
  3. evaluates it on the held-out phantoms: Dice, IoU, sensitivity, precision per case and their mean, printed
     and written to DIR/evaluation.csv and DIR/evaluation.json;
  4. segments one held-out phantom CT with the 'covidseg segment' pipeline (classical lungs + the model) into
     DIR/segment/CASE: lungs.nii.gz, infection.nii.gz, report.json, report.csv, overview.png;
  5. prints where they are and how much of each lung is involved.

Run it again and it reuses the cohort and the trained model (seconds); --force starts over.
Phantoms are not patients: the numbers check the pipeline and say nothing about patients.
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="phantoms -> train briefly -> evaluate -> segment one scan (start here)",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="covidseg-demo", metavar="DIR",
                   help="demo folder, created if missing (default: covidseg-demo)")
    p.add_argument("--force", "--retrain", dest="force", action="store_true",
                   help="remove what an earlier demo wrote into DIR and start over (makes the phantoms and trains "
                        "again)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--quick", action="store_true", help=argparse.SUPPRESS)  # tests: 3 tiny phantoms, 2 steps
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from covidseg.demo import QUICK_OVERRIDES, DemoCohort, demo_config, run_demo, summary_text

    out = Path(args.out)
    cohort = DemoCohort.quick() if args.quick else DemoCohort()
    config = demo_config(out, QUICK_OVERRIDES if args.quick else ())
    result = run_demo(out, cohort, config, force=args.force, progress=not args.quiet)
    print(summary_text(result))
    return 0
