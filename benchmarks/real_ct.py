"""``covidseg segment`` with the default model (no ``--checkpoint``) on the three real CTs of ``../shared/data/real-ct``.

Per CT: the whole ``segment`` run as the command runs it (``covidseg.inference.pipeline.segment``: the shipped 2D
model loaded, the CT read, the lungs, the infection, the case folder written), its wall-clock time and the
report's step timings; the lung volumes and what the lung stage found; the lungs scored against the expert
contours with ``covidseg.evaluation`` (``read_reference`` + ``score``: the RTSTRUCT of ``pancreas-ct-cb-001``);
the share of the LIDC readers' consensus nodule inside the lungs and inside the infection mask
(``lidc-idri-0314``); the infection share of each lung. None of the three CTs shows COVID-19: every infection
voxel is a false positive. Each case's ``overview.png`` (``covidseg.report``) is copied to
``docs/images/real_<case>.png``.

Run: ``python benchmarks/real_ct.py --json docs/results/real_ct.json --images docs/images`` (about 2 minutes on
2 cores). ``--noise-hu SIGMA`` segments copies with white noise added (``covidseg.phantom.perturb.add_noise``),
``--sharpen AMOUNT`` copies as a sharper kernel gives them (``covidseg.phantom.perturb.sharpen``).
Timings on a machine shared with other jobs are noisy: the JSON records the load average before and after each
case and the process's CPU time.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the real CTs' paths and readers live in tests/real_ct.py

from _stamp import write_results  # noqa: E402

from covidseg.config import Config  # noqa: E402
from covidseg.evaluation import read_reference, score  # noqa: E402
from covidseg.inference.pipeline import SegmentOptions, segment  # noqa: E402
from covidseg.io.image import read_mask, write_volume  # noqa: E402
from covidseg.phantom import perturb  # noqa: E402
from real_ct import CASES, REAL_CT, lidc_nodule, load_image, missing_reason  # noqa: E402

REFERENCES = {"pancreas-ct-cb-001": "rtstruct.dcm"}
"""Case -> its expert lung contours (the others have none)."""


def altered_ct(case: str, noise_hu: float, sharpen: float) -> np.ndarray:
    """The CT of ``case`` sharpened by ``sharpen`` (``covidseg.phantom.perturb.sharpen``, 1 px), then with white
    noise of ``noise_hu`` (``covidseg.phantom.perturb.add_noise``, seed 0); the CT itself when both are 0."""
    hu = load_image(case).array
    hu = perturb.sharpen(hu, sharpen) if sharpen else hu
    return perturb.add_noise(hu, noise_hu) if noise_hu else hu


def run_case(case: str, out: Path, noise_hu: float = 0.0, sharpen: float = 0.0,
             checkpoint: Path | None = None) -> tuple[dict[str, Any], np.ndarray]:
    """Segment one CT with the default model (or ``checkpoint``) into ``out``; the report's figures and the
    canonical lung labels. With ``noise_hu`` or ``sharpen``, the altered copy of :func:`altered_ct` (written next
    to ``out``) is segmented."""
    hu = altered_ct(case, noise_hu, sharpen)
    source = REAL_CT / case / CASES[case]
    if noise_hu or sharpen:
        source = write_volume(hu, load_image(case), out.parent / f"{case}_noise{noise_hu:g}_sharpen{sharpen:g}.nii.gz")
    load = os.getloadavg()[0]
    wall, cpu = time.perf_counter(), time.process_time()
    result = segment(source, out, SegmentOptions(checkpoint=checkpoint, force=True), Config())[0]
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    report = result.report
    assert report is not None
    image = load_image(case)
    lungs = read_mask(out / "lungs.nii.gz", like=image)
    row: dict[str, Any] = {
        "case": case, "name": report["case"], "shape": report["shape"], "spacing_mm": report["spacing_mm"],
        "seconds": round(wall, 2), "cpu_seconds": round(cpu, 2), "report_run_time_s": report["run_time_s"],
        "timings_s": report["timings_s"], "load_average": [round(load, 2), round(os.getloadavg()[0], 2)],
        "lung_findings": report.get("lung_findings"), "slices_run": report["inference"].get("slices_run"),
        "infection": {side: {"lung_ml": round(v["lung_ml"], 1), "infection_ml": round(v["infection_ml"], 2),
                             "percent": round(v["percent"], 3)} for side, v in report["lungs"].items()},
        "infection_outside_lungs_ml": round(report["infection_outside_lungs_ml"], 2),
        "partial_volume_removed_ml": report["inference"].get("partial_volume_removed_ml"),
        "model": report["model"]["checkpoint"],
        "soft_tissue_noise_hu": round(perturb.soft_tissue_noise_hu(hu), 1),
    }
    return row, lungs


def score_case(case: str, lungs: np.ndarray, out: Path) -> dict[str, Any]:
    """Lung Dice against the case's expert contours; the LIDC nodule inside the lungs and the infection."""
    image = load_image(case)
    extra: dict[str, Any] = {}
    if case in REFERENCES:
        ref = read_reference(REAL_CT / case / REFERENCES[case], like=image)
        scores = score({"left_lung": lungs == 1, "right_lung": lungs == 2}, ref, image.spacing)
        extra["lungs_vs_expert"] = {label: {"dice": round(s.dice, 4), "nsd": round(s.nsd, 4),
                                            "hd95_mm": round(s.hd95_mm, 2), "pred_ml": round(s.pred_ml, 1),
                                            "ref_ml": round(s.ref_ml, 1)} for label, s in scores.items()}
        extra["reference"] = f"{case}/{REFERENCES[case]}"
    if case == "lidc-idri-0314":
        nodule = lidc_nodule()
        infection = read_mask(out / "infection.nii.gz", like=image) > 0
        extra["nodule"] = {"ml": round(float(nodule.sum()) * float(np.prod(image.spacing)) / 1000.0, 2),
                           "inside_lungs": round(float((lungs[nodule] > 0).mean()), 4),
                           "called_infection": round(float(infection[nodule].mean()), 4)}
    return extra


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.add_argument("--images", type=Path, default=None, help="copy each overview here as real_<case>.png")
    p.add_argument("--cases", nargs="+", default=list(CASES))
    p.add_argument("--noise-hu", type=float, default=0.0, metavar="SIGMA",
                   help="segment copies of the CTs with white Gaussian noise of SIGMA HU added (a noisier scan: a "
                        "lower dose); 0 = the CTs as they are")
    p.add_argument("--sharpen", type=float, default=0.0, metavar="AMOUNT",
                   help="segment copies of the CTs sharpened as by a sharper reconstruction kernel (an unsharp "
                        "mask of AMOUNT at 1 px, before any --noise-hu); 0 = the CTs as they are")
    p.add_argument("--checkpoint", default=None,
                   help="the infection model to run (default: the shipped one), e.g. a candidate before shipping")
    args = p.parse_args(argv)
    reason = missing_reason()
    if reason:
        print(reason, file=sys.stderr)
        return 2
    from covidseg.training.trainer import code_version, machine_description

    rows = []
    with tempfile.TemporaryDirectory(prefix="real_ct_") as tmp:
        for case in args.cases:
            out = Path(tmp) / case
            row, lungs = run_case(case, out, args.noise_hu, args.sharpen,
                                   Path(args.checkpoint) if args.checkpoint else None)
            row.update(score_case(case, lungs, out))
            rows.append(row)
            inf = row["infection"]
            print(f"{case:20s} {row['seconds']:6.1f} s  lungs L {inf['left']['lung_ml']:.0f} R "
                  f"{inf['right']['lung_ml']:.0f} mL  infection L {inf['left']['percent']:.2f} % R "
                  f"{inf['right']['percent']:.2f} % both {inf['both']['percent']:.2f} %  "
                  f"{row.get('lungs_vs_expert', '')} {row.get('nodule', '')}", flush=True)
            if args.images:
                args.images.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(out / "overview.png", args.images / f"real_{case}.png")
    result = {
        "benchmark": "real_ct", "version": code_version(), "machine_description": machine_description(),
        "cores": len(os.sched_getaffinity(0)), "noise_hu": args.noise_hu, "sharpen": args.sharpen,
        "cases": rows,
        "note": "no CT shows COVID-19: every infection voxel is a false positive; lungs scored against the "
                "expert RTSTRUCT of pancreas-ct-cb-001 only (the others have no lung contours)",
    }
    if args.json:
        write_results(args.json, result, {
            "segment": f"covidseg segment CT -o OUT --checkpoint {args.checkpoint} (default Config)" if args.checkpoint
            else "covidseg segment CT -o OUT (no --checkpoint: the shipped 2D model; default Config)"})
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
