"""`covidseg segment`: lungs and infection of chest CTs, with a report and pictures."""

from __future__ import annotations

import argparse
import sys

from covidseg.cli._common import add_config_args, formatter

DESCRIPTION = """\
Segment the lungs (1 left, 2 right) and the COVID-19 infection of chest CTs and report how much of each lung is
involved. Stage 1 finds the lungs (classically, or with a trained lung model); stage 2 runs the infection model
on the lungs only: a checkpoint of 'covidseg train' in sliding windows over the lungs' box, a 2D model of
'covidseg semiseg train' slice by slice through it.

Without --checkpoint (or with --checkpoint default) stage 2 is the shipped 2D model (covidseg/weights/
semiseg-2d.pt, unet-fv-paspp-ds-2d): trained on 50 expert-labelled slices of one source (MedSeg) and 1,600
machine-labelled slices of 20 CTs; cross-validated mean Dice 0.732 on those slices. It is not a 3D model, it is
not validated on other scanners or on chests without COVID-19, and it is not a medical device.

INPUT is a .nii/.nii.gz, .nrrd/.nhdr or .mha/.mhd file, a DICOM folder, a folder of them, or a text file
listing them (one a line).
For one input, OUT is its folder. Several inputs are a cohort: OUT/<case>/ per case, a status file per case in
OUT/cohort_status/, OUT/summary.csv at the end; cases already done are skipped, so running the same command
again only does what is left. Under torchrun the processes share the cohort:

  torchrun --nproc_per_node 4 -m covidseg segment cases.txt -o OUT --checkpoint CKPT --device cuda

Each folder gets lungs.nii.gz, infection.nii.gz (same grid and affine as the input), segmentation.seg.nrrd (3D
Slicer: named, coloured segments), report.json, report.csv and overview.png (+ probability.nii.gz, report.html on
request); a DICOM input also gets segmentation.dcm (DICOM-SEG) and, with --rtstruct, rtstruct.dcm (RT Structure
Set: left lung, right lung, infection), an NRRD/MetaImage input lungs and infection in its own format. Not for
diagnosis.
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("segment", help="segment lungs and infection of CTs; write masks, a report and pictures",
                       description=DESCRIPTION, formatter_class=formatter())
    p.add_argument("input", metavar="INPUT", help="NIfTI/NRRD/MetaImage file, DICOM folder, folder of them, or a list file")
    p.add_argument("-o", "--out", required=True, metavar="OUT", help="output folder")
    p.add_argument("--checkpoint", metavar="CKPT", default=None,
                   help="infection model: 'default' (the default: the shipped 2D model), a checkpoint .pt "
                        "written by 'covidseg train', 'covidseg demo' or 'covidseg semiseg train', or a file "
                        "written by 'covidseg export' (TorchScript; .onnx with --backend onnxruntime)")
    p.add_argument("--backend", choices=("torch", "onnxruntime"), default="torch",
                   help="what runs the networks: PyTorch, or ONNX Runtime (on the CPU; an .onnx export, or a "
                        "checkpoint exported in memory)")
    p.add_argument("--lungs", default="classic", metavar="classic|CKPT",
                   help="stage 1: 'classic' (no weights) or a lung-model checkpoint (trained with target lung)")
    p.add_argument("--device", default=None, metavar="cpu|cuda",
                   help="where the networks run (default: runtime.device = auto, a GPU when there is one, else the "
                        "CPU); under torchrun 'cuda' means cuda:LOCAL_RANK")
    p.add_argument("--tta", action="store_true", help="average over flips (slower: 8 passes; a 2D slice model always "
                        "averages with its mirror)")
    p.add_argument("--probability", action="store_true", help="also write probability.nii.gz")
    p.add_argument("--html", action="store_true", help="also write a self-contained report.html")
    p.add_argument("--rtstruct", action="store_true",
                   help="also write rtstruct.dcm, an RT Structure Set of the lungs and infection referencing the "
                        "series (RT planning systems, 3D Slicer with SlicerRT). DICOM inputs only: an input that "
                        "is not a DICOM folder, or a cohort that holds one, stops before any work with an error "
                        "(exit 2). Needs rt-utils: pip install 'covidseg[rtstruct]'")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--series", metavar="UID", default=None,
                   help="DICOM folder with several series: the Series Instance UID to segment (default: the CT "
                        "series, chosen by modality, image type and slice count)")
    p.add_argument("--force", action="store_true",
                   help="replace an existing output folder (one input; a cohort skips the cases already done)")
    add_config_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from covidseg.config import load_config
    from covidseg.errors import EXIT_USER, UserError
    from covidseg.inference.pipeline import SegmentOptions, segment

    config = load_config(Path(args.config) if args.config else None, args.overrides)
    if args.threads is not None:
        if args.threads < 1:
            raise UserError(f"--threads {args.threads}: expected a positive number of threads")
        config.runtime.threads = args.threads
    if args.device:
        config.runtime.device = args.device
    if args.tta:
        config.inference.tta = True
    checkpoint = Path(args.checkpoint) if args.checkpoint else None
    options = SegmentOptions(checkpoint=checkpoint, lungs=args.lungs, probability=args.probability,
                             html=args.html, force=args.force, backend=args.backend, series=args.series,
                             rtstruct=args.rtstruct)

    def log(message: str) -> None:
        sys.stderr.write(message + "\n")

    results = segment(Path(args.input), Path(args.out), options, config, log=log)
    failed = [r for r in results if r.error]
    skipped = [r for r in results if r.skipped]
    for r in results:
        if r.report is None or r.skipped:
            continue
        both = r.report["lungs"]["both"]
        left, right = r.report["lungs"]["left"], r.report["lungs"]["right"]
        print(f"{r.name}: left {left['percent']:.1f} %, right {right['percent']:.1f} %, both {both['percent']:.1f} % "
              f"({both['severity']}, score {both['severity_score']}) in {r.report['run_time_s']:.1f} s -> {r.out_dir}")
    if len(results) > 1 or failed or skipped:
        done = len(results) - len(failed) - len(skipped)
        print(f"{done} of {len(results)} case(s) segmented; {len(failed)} failed"
              + (f"; {len(skipped)} already done (skipped)" if skipped else ""))
        for r in failed:
            print(f"  failed: {r.input}: {r.error}")
    return EXIT_USER if failed else 0
