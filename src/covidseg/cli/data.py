"""``covidseg data``: check a dataset folder, download the Zenodo dataset, print a split."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from covidseg.cli._common import add_config_args, formatter

_DESCRIPTION = """\
The real 3D dataset (Ma et al., Zenodo record 3757476; docs/data.md) and synthetic cohorts in its layout.

  check DIR                 read every case (Zenodo layout, the Kaggle copy, or nnU-Net imagesTr/labelsTr) and
                            print shape, spacing, intensity convention, label values and lung/infection volumes
                            in mL; name the file and the problem for anything missing or mismatched.
                            Exit code 0 when every case is fine, 2 when any has a problem.
  download zenodo DIR       fetch the four archives of record 3757476 (resumable, size and md5 checked against
                            the record's files API) and unpack them into DIR in the Zenodo layout.
  split DIR --split NAME    print the cases of a split: report (14/2/4), benchmark-fold-0..4 (the benchmark's
                            published folds), few-shot (4/16); stratified by source on other cohorts.
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="check a dataset folder, download the Zenodo dataset, print splits",
                       description=_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    dsub = p.add_subparsers(dest="data_command", metavar="ACTION")

    check = dsub.add_parser(
        "check", help="check every case of a dataset folder", formatter_class=formatter(),
        description="Read every CT and mask of DIR (Zenodo layout, Kaggle copy or nnU-Net folder), print a table "
                    "per case (shape D×H×W, spacing mm, intensity convention, label values, left/right lung and "
                    "infection volume in mL) and every problem with its file. Exit code 2 if any case has a "
                    "problem, 0 otherwise.",
    )
    check.add_argument("dir", metavar="DIR", help="dataset folder")
    check.add_argument("--json", metavar="FILE", default=None, help="also write the results as JSON (atomic)")
    check.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    add_config_args(check)
    check.set_defaults(func=run_check)

    download = dsub.add_parser("download", help="download a dataset", formatter_class=formatter(),
                               description="Download a dataset. Sources: zenodo (record 3757476).")
    source = download.add_subparsers(dest="source", metavar="SOURCE")
    zenodo = source.add_parser(
        "zenodo", help="the four archives of Zenodo record 3757476", formatter_class=formatter(),
        description="Fetch COVID-19-CT-Seg_20cases.zip, Lung_Mask.zip, Infection_Mask.zip and "
                    "Lung_and_Infection_Mask.zip from Zenodo record 3757476 (CC BY 4.0; cite Ma et al. 2020, "
                    "doi:10.5281/zenodo.3757476). Interrupted downloads resume (HTTP Range, DIR/*.zip.part); "
                    "size and md5 are checked against the record's files API; archives already unpacked and "
                    "verified are skipped.",
    )
    zenodo.add_argument("dir", metavar="DIR", help="destination folder (becomes the Zenodo layout)")
    zenodo.add_argument("--api-url", default="https://zenodo.org/api", metavar="URL",
                        help="base URL of the Zenodo API (a mirror, or a local test server)")
    zenodo.add_argument("--keep-archives", action="store_true", help="keep the .zip files after unpacking")
    zenodo.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    zenodo.set_defaults(func=run_download)
    download.set_defaults(func=_usage(download))

    split = dsub.add_parser(
        "split", help="print the cases of a named split", formatter_class=formatter(),
        description="Print the train/val/test case ids of a split of DIR's cases as JSON: report (14/2/4 seeded, "
                    "both sources in each part), benchmark-fold-K (K=0..4; the published benchmark folds on "
                    "the real 20 cases, a seeded stratified 5-fold otherwise), few-shot (4 train / 16 test).",
    )
    split.add_argument("dir", metavar="DIR", help="dataset folder")
    split.add_argument("--split", required=True, metavar="NAME",
                       help="report | benchmark-fold-0 .. benchmark-fold-4 | few-shot")
    split.add_argument("--seed", type=int, default=0, help="shuffling seed")
    split.add_argument("--json", metavar="FILE", default=None, help="write the split to FILE (atomic)")
    split.set_defaults(func=run_split)
    p.set_defaults(func=_usage(p))


def _usage(p: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    def show(args: argparse.Namespace) -> int:
        p.print_help()
        return 2

    return show


def run_check(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from covidseg.config import load_config
    from covidseg.data.check import check_dataset, render
    from covidseg.errors import EXIT_OK, EXIT_USER
    from covidseg.io.atomic import atomic_write_text

    config = load_config(Path(args.config) if args.config else None, args.overrides)
    report = check_dataset(args.dir, config.intensity, progress=not args.no_progress)
    render(report)
    if args.json:
        atomic_write_text(Path(args.json), json.dumps(report.as_dict(), indent=2) + "\n")
    return EXIT_OK if report.ok else EXIT_USER


def run_download(args: argparse.Namespace) -> int:
    from covidseg.data.download import download_zenodo

    folders = download_zenodo(args.dir, api_url=args.api_url, keep_archives=args.keep_archives,
                              progress=not args.no_progress)
    print(f"{args.dir}: {len(folders)} archives ready; check them with `covidseg data check {args.dir}`")
    return 0


def run_split(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from covidseg.data.layouts import find_cases
    from covidseg.data.splits import make_split
    from covidseg.io.atomic import atomic_write_text

    cases = find_cases(args.dir)
    split = make_split([c.case_id for c in cases], args.split, seed=args.seed)
    text = json.dumps({"split": args.split, "seed": args.seed, **split}, indent=2) + "\n"
    if args.json:
        atomic_write_text(Path(args.json), text)
    print(text, end="")
    return 0
