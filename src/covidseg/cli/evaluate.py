"""``covidseg evaluate``: score masks against a reference (NIfTI, DICOM-SEG, RTSTRUCT), per label."""

from __future__ import annotations

import argparse

from covidseg.cli._common import formatter

DESCRIPTION = """\
Score a prediction against a reference, label by label: Dice, NSD (normalised surface Dice) at a tolerance in
mm, HD95 in mm, and the volumes (mL) and voxel counts of both. Prints a table; --json writes every number.

PRED and REF are each a covidseg output folder (lungs.nii.gz: 1 left, 2 right; infection.nii.gz: 1), a NIfTI
label map or binary mask, a DICOM-SEG or an RTSTRUCT. Both are put onto one voxel grid without resampling (axes
may be permuted or flipped, or a mask cropped): the CT series given with --ct, else PRED's NIfTI, else REF's.
A SEG or RTSTRUCT needs that grid; with --ct a DICOM folder, one that references another series is refused.

Structures are matched to the labels left_lung, right_lung, lungs (both) and infection by name, ignoring case:
LUNG_L, Lung_L, Left lung -> left_lung; LUNG_R, Right lung -> right_lung; Lungs -> lungs; names with infection,
lesion, GGO, consolidation, COVID -> infection. A label map's values go by covidseg's convention (lungs.nii.gz
1 left, 2 right; infection.nii.gz 1; other files 1 left, 2 right, 3 infection). --map NAME=LABEL overrides for
REF, --pred-map for PRED (LABEL none leaves a structure out); structures that map onto nothing are listed.

NSD tolerance: 1 mm for the lungs and 3 mm for the infection by default (the COVID-19-CT-Seg benchmark's), or
--tolerance-mm for every label. A reference drawn on part of the scan (or an RTSTRUCT that stops a slice short
of its edge) leaves the prediction beyond its slices as false positives: the table says how much, and
--reference-slices scores only the slices from the reference's first to its last. See docs/evaluate.md.

examples:
  covidseg evaluate OUT rtstruct.dcm --ct dicom/
  covidseg evaluate OUT/lungs.nii.gz expert_lungs.nii.gz --json scores.json
  covidseg evaluate OUT rtstruct.dcm --ct dicom/ --reference-slices
  covidseg evaluate OUT expert.seg.dcm --ct dicom/ --map "GGO and consolidation=infection"
  covidseg evaluate my_labels.nii.gz rtstruct.dcm --ct dicom/ --pred-map 2=left_lung --pred-map 3=right_lung
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="score masks against a reference (NIfTI, DICOM-SEG, RTSTRUCT)",
                       description=DESCRIPTION, formatter_class=formatter())
    p.add_argument("pred", metavar="PRED", help="prediction: covidseg output folder, NIfTI, DICOM-SEG or RTSTRUCT")
    p.add_argument("ref", metavar="REF", help="reference: NIfTI, DICOM-SEG, RTSTRUCT or covidseg output folder")
    p.add_argument("--ct", metavar="DIR", default=None,
                   help="the CT both were drawn on (DICOM folder or NIfTI): the grid, and the series a SEG or "
                        "RTSTRUCT must reference; without it, PRED's grid (or REF's)")
    p.add_argument("--map", dest="ref_map", action="append", default=[], metavar="NAME=LABEL",
                   help="score REF's structure NAME as LABEL (left_lung, right_lung, lungs, infection, none); "
                        "repeatable")
    p.add_argument("--pred-map", dest="pred_map", action="append", default=[], metavar="NAME=LABEL",
                   help="the same for PRED's structures (e.g. label values of a NIfTI: --pred-map 2=left_lung)")
    p.add_argument("--tolerance-mm", type=float, default=None, metavar="X",
                   help="NSD tolerance in mm for every label; without it, 1 for the lungs and 3 for the infection")
    p.add_argument("--reference-slices", action="store_true",
                   help="score each label only on the axial slices from the first to the last its reference "
                        "contours (a reference drawn on part of the scan, or one that stops a slice short of its "
                        "edge); the prediction's volume beyond them is reported either way")
    p.add_argument("--json", metavar="FILE", default=None, help="also write every number to this JSON file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import sys

    from covidseg.evaluation import evaluate, format_table, parse_map, write_json

    result = evaluate(args.pred, args.ref, ct=args.ct, ref_map=parse_map(args.ref_map, "--map"),
                      pred_map=parse_map(args.pred_map, "--pred-map"), tolerance_mm=args.tolerance_mm,
                      reference_slices=args.reference_slices)
    sys.stdout.write(format_table(result))
    if args.json:
        written = write_json(result, args.json, inputs=(args.pred, args.ref, args.ct))
        sys.stdout.write(f"wrote {written}\n")
    return 0
