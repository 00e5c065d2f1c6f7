"""`covidseg experiment`: one command per table of the report (Tables 2-5)."""

from __future__ import annotations

import argparse

from covidseg.cli._common import add_config_args

EPILOG = """\
experiments:
  channel        Table 2: UNet+FV with the SE vs the CE channel branch
  ablation       Table 3: unet, unet-fv-se, unet-fv-paspp, unet-fv-paspp-ds
  per-case       Table 4: the final model, one row per test case with its resolution
  preprocessing  Table 5: the final model on the lung-only input vs the original image

Each model trains into OUT/runs/<variant>-<input>-<split>/ (complete runs are reused, interrupted ones resumed;
tables share models). The table (TABLE.md, TABLE.csv) gives dice, iou, sensitivity, precision, nsd (3 mm) and
hd95 (mm) as mean ± sd over the test cases, the lung mask used, the published numbers, and the command and
machine in a footer.

examples:
  covidseg experiment ablation --data COVID-19-CT-Seg --out results/table3
  covidseg experiment per-case --data DIR --out results/table4 --split benchmark-5fold
  covidseg experiment channel --data DIR --out results/quick --epochs 5 --set train.patches_per_epoch=50
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "experiment", help="reproduce a table of the report (channel, ablation, per-case, preprocessing)",
        description="Train and evaluate the models of one of the report's tables and write TABLE.md / TABLE.csv.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("name", choices=("channel", "ablation", "per-case", "preprocessing"), help="which table")
    p.add_argument("--data", type=str, required=True, metavar="DIR", help="dataset folder")
    p.add_argument("--out", type=str, required=True, metavar="DIR", help="output folder (tables and runs)")
    p.add_argument("--split", type=str, default="report",
                   help="report, benchmark-fold-K (K = 0..4) or benchmark-5fold (five models per row, 20 test cases)")
    p.add_argument("--epochs", type=int, default=None, help="train.epochs for every model (default 200)")
    add_config_args(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import sys
    from pathlib import Path

    from covidseg.training.experiments import run_experiment

    md = run_experiment(
        args.name, args.data, args.out, split=args.split, epochs=args.epochs,
        config_file=Path(args.config) if args.config else None, overrides=args.overrides,
        progress=not args.quiet, command=" ".join(["covidseg", *sys.argv[1:]]),
    )
    print(md.read_text(encoding="utf-8"))
    print(f"written: {md} and {md.with_suffix('.csv')}")
    return 0
