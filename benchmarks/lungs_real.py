"""Classical lungs on the three real CTs of ``../shared/data/real-ct`` and on perturbed versions of them.

For each CT and each perturbation (``covidseg.phantom.perturb``: padding outside the field of view, a prone
scan's couch, a couch pressed against the back, thick slices, crops to the abdomen, the bases or the apices, solid
lesions against the pleura (spheres up to about 160 mL at three heights, and patches flattened along the chest
wall), bullae at the bases, lower-lobe emphysema, a colon full of gas): ``covidseg.inference.lungs.find_lungs``,
the lungs' volumes and flags, the Dice per lung against the expert contours (``pancreas-ct-cb-001``; scored by
``tests/real_ct.py``, the one home of the scoring), the share of the LIDC consensus nodule inside the lungs, the Dice against the
unperturbed CT's lungs (the others), the share of an inserted lesion kept in its lung, and the time. Then the
lung stage's time on ``lidc-idri-0314`` (512 x 512 x 275) with 1 and with 2 cores (the process's CPU affinity;
median of ``--repeats``).

Run: ``python benchmarks/lungs_real.py --json docs/results/lungs_real.json`` (about 10 minutes on 2 cores).
Timings on a machine shared with other jobs are noisy: the JSON records the load average and the CPU time.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the real CTs' paths, readers and scoring live in tests/real_ct.py

from scipy import ndimage  # noqa: E402

from covidseg.config import LungConfig  # noqa: E402
from covidseg.inference.lung_air import body_mask  # noqa: E402
from covidseg.inference.lungs import LEFT, RIGHT, LungResult, find_lungs  # noqa: E402
from covidseg.phantom import perturb  # noqa: E402
from real_ct import (  # noqa: E402
    CASES,
    lidc_nodule,
    load_case,
    lung_dice,
    missing_reason,
    pancreas_reference,
)

Spacing = tuple[float, float, float]
LARGE_LESION_MM = 34.0
"""Radius of the large spheres (about 160 mL), a tumour of that size against the chest wall."""
LARGE_LESION_HEIGHTS = (0.4, 0.6, 0.8)
"""Shares of the lung's height the large spheres are centred at."""


def _body(hu: np.ndarray, spacing: Spacing) -> np.ndarray:
    coarse, step = body_mask(hu, spacing, LungConfig())
    body = np.repeat(np.repeat(coarse, step, axis=1), step, axis=2)[:, : hu.shape[1], : hu.shape[2]]
    return ndimage.binary_dilation(body, structure=np.ones((1, 5, 5), dtype=bool))


def _thick_labels(labels: np.ndarray, spacing: Spacing, mm: float) -> np.ndarray:
    out = None
    for label in (LEFT, RIGHT):
        share, _ = perturb.thick_slices((labels == label).astype(np.float32), spacing, mm)
        out = np.zeros(share.shape, dtype=np.uint8) if out is None else out
        out[share >= 0.5] = label
    assert out is not None
    return out


def timed(hu: np.ndarray, spacing: Spacing, cfg: LungConfig) -> tuple[LungResult, float, float]:
    """``find_lungs`` with its wall-clock and CPU seconds."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = find_lungs(hu, spacing, cfg)
    return result, time.perf_counter() - wall, time.process_time() - cpu


def row(case: str, name: str, hu: np.ndarray, spacing: Spacing, ref: np.ndarray | None, cfg: LungConfig,
        lesion: tuple[np.ndarray, int] | None = None) -> dict[str, Any]:
    """One CT's lungs: the result's summary, Dice against ``ref``, a lesion's share kept, the time."""
    result, wall, cpu = timed(hu, spacing, cfg)
    out: dict[str, Any] = {"case": case, "variant": name, "shape": list(hu.shape),
                           "spacing_mm": [round(s, 4) for s in spacing], **result.summary(),
                           "seconds": round(wall, 2), "cpu_seconds": round(cpu, 2)}
    if ref is not None:
        out["dice"] = {k: round(v, 4) for k, v in lung_dice(result.labels, ref).items()}
    if lesion is not None:
        mask, label = lesion
        out["lesion_ml"] = round(float(mask.sum()) * float(np.prod(spacing)) / 1000.0, 1)
        out["lesion_kept"] = round(float((result.labels[mask] == label).mean()), 3)
    if case == "lidc-idri-0314" and hu.shape == load_case(case)[0].shape and name != "thick":
        out["nodule_inside"] = round(float((result.labels[lidc_nodule()] > 0).mean()), 4)
    print(f"{case:20s} {name:30s} L {out['left']['volume_ml']:7.0f} R {out['right']['volume_ml']:7.0f} mL  "
          f"cut apex/base {int(result.cut_at_apex)}/{int(result.cut_at_base)}  "
          f"dice {out.get('dice', '-')}  lesion kept {out.get('lesion_kept', '-')}  "
          f"nodule {out.get('nodule_inside', '-')}  {wall:5.1f} s  {result.reason or ''}", flush=True)
    return out


def variants(case: str, hu: np.ndarray, spacing: Spacing, labels: np.ndarray
             ) -> list[tuple[str, Callable[[], tuple[np.ndarray, Spacing, np.ndarray | None, Any]]]]:
    """``(name, make)``: ``make()`` returns the perturbed CT, its spacing, the labels to score it against and a
    lesion ``(mask, label)`` or ``None``."""
    d = hu.shape[0]
    thick_mm = 6.0 if spacing[0] >= 1.5 else 5.0
    first = int(np.flatnonzero(labels.any(axis=(1, 2)))[0])
    out: list[tuple[str, Callable[[], tuple[np.ndarray, Spacing, np.ndarray | None, Any]]]] = [
        ("padding -3024 HU", lambda: (perturb.pad_outside_fov(hu, -3024.0), spacing, labels, None)),
        ("padding -2048 HU", lambda: (perturb.pad_outside_fov(hu, -2048.0), spacing, labels, None)),
        ("prone couch", lambda: (perturb.mirror_couch(hu, _body(hu, spacing)), spacing, labels, None)),
        ("couch 30 mm up, against the back",
         lambda: (perturb.move_couch(hu, _body(hu, spacing), -int(round(30.0 / spacing[1]))), spacing, labels, None)),
        (f"thick {thick_mm:.0f} mm", lambda: (*perturb.thick_slices(hu, spacing, thick_mm),
                                              _thick_labels(labels, spacing, thick_mm), None)),
        ("lower third", lambda: (hu[: d // 3], spacing, labels[: d // 3], None)),
        ("upper third", lambda: (hu[2 * d // 3 :], spacing, labels[2 * d // 3 :], None)),
    ]
    if case == "pancreas-ct-cb-001":
        top = first + int(round(60.0 / spacing[0]))
        out += [("abdomen below the lungs", lambda: (hu[: first - 1], spacing, None, None)),
                ("abdomen + 300 mL colon gas", lambda: (_colon_gas(hu[: first - 1], spacing), spacing, None, None)),
                ("60 mm of lung bases", lambda: (hu[:top], spacing, labels[:top], None))]
    for side in ("lateral", "posterior"):
        for radius in (15.0, 30.0):
            for label in (LEFT, RIGHT):
                name = f"lesion {side} r{radius:.0f} mm {'left' if label == LEFT else 'right'}"
                out.append((name, _lesion_maker(hu, spacing, labels, side, radius, label)))
        for fraction in LARGE_LESION_HEIGHTS:
            for label in (LEFT, RIGHT):
                name = (f"lesion {side} r{LARGE_LESION_MM:.0f} mm at {100 * fraction:.0f} % "
                        f"{'left' if label == LEFT else 'right'}")
                out.append((name, _lesion_maker(hu, spacing, labels, side, LARGE_LESION_MM, label, fraction=fraction)))
        for label in (LEFT, RIGHT):
            name = f"sub-pleural patch {side} {'left' if label == LEFT else 'right'}"
            out.append((name, _lesion_maker(hu, spacing, labels, side, 0.0, label, patch=True)))
            name = f"bulla {side} r20 mm at 25 % {'left' if label == LEFT else 'right'}"
            out.append((name, _bulla_maker(hu, spacing, labels, side, label)))
    for label in (LEFT, RIGHT):
        name = f"bulla central r20 mm at 25 % {'left' if label == LEFT else 'right'}"
        out.append((name, _bulla_maker(hu, spacing, labels, "central", label)))
    out.append(("lower-lobe emphysema (-120 HU)",
                lambda: (perturb.emphysema(hu, labels > 0), spacing, labels, None)))
    return out


def _bulla_maker(hu: np.ndarray, spacing: Spacing, labels: np.ndarray, side: str, label: int
                 ) -> Callable[[], tuple[np.ndarray, Spacing, np.ndarray | None, Any]]:
    """A 20 mm-radius bulla (-990 HU) at a quarter of the lung's height (pure air at the base), against the pleura
    (``side`` lateral or posterior) or around the centre of the lung's slice (``"central"``)."""
    def make() -> tuple[np.ndarray, Spacing, np.ndarray | None, Any]:
        lung = labels == label
        mask = perturb.bulla(lung, spacing, side, z=perturb.height_slice(lung, 0.25))
        return perturb.add_blob(hu, mask, -990.0, noise_hu=10.0), spacing, None, (mask, label)
    return make


def _lesion_maker(hu: np.ndarray, spacing: Spacing, labels: np.ndarray, side: str, radius: float, label: int,
                  patch: bool = False, fraction: float = 0.6
                  ) -> Callable[[], tuple[np.ndarray, Spacing, np.ndarray | None, Any]]:
    """A solid lesion (40 HU) against the pleura, centred in the slice at ``fraction`` of the lung's height (0.6:
    above the diaphragm's dome, lung above and below it): a sphere of ``radius`` mm or a sub-pleural patch."""
    def make() -> tuple[np.ndarray, Spacing, np.ndarray | None, Any]:
        lung = labels == label
        z = perturb.height_slice(lung, fraction)
        if patch:
            mask = perturb.subpleural_patch(lung, spacing, side, z=z)
        else:
            mask = perturb.pleural_lesion(lung, spacing, radius, side, z=z)
        return perturb.add_blob(hu, mask, perturb.TISSUE_HU), spacing, None, (mask, label)
    return make


def _colon_gas(hu: np.ndarray, spacing: Spacing) -> np.ndarray:
    centre = (hu.shape[0] * 0.6, hu.shape[1] * 0.4, hu.shape[2] * 0.5)
    return perturb.add_blob(hu, perturb.ellipsoid(hu.shape, spacing, centre, (30.0, 30.0, 80.0)), perturb.GAS_HU)


def thread_timings(repeats: int, cfg: LungConfig) -> dict[str, Any]:
    """The lung stage on lidc-idri-0314 with the process pinned to 1 core, then to 2 (median seconds)."""
    hu, spacing = load_case("lidc-idri-0314")
    allowed = sorted(os.sched_getaffinity(0))
    out: dict[str, Any] = {"case": "lidc-idri-0314", "shape": list(hu.shape), "repeats": repeats}
    try:
        for cores in (1, 2):
            if len(allowed) < cores:
                continue
            os.sched_setaffinity(0, allowed[:cores])
            walls, cpus = [], []
            for _ in range(repeats):
                _, wall, cpu = timed(hu, spacing, cfg)
                walls.append(wall)
                cpus.append(cpu)
            out[f"{cores}_core"] = {"seconds": round(statistics.median(walls), 2),
                                    "cpu_seconds": round(statistics.median(cpus), 2),
                                    "all_seconds": [round(w, 2) for w in walls]}
            print(f"lidc-idri-0314 lung stage, {cores} core(s): {statistics.median(walls):.2f} s "
                  f"(CPU {statistics.median(cpus):.2f} s; runs {', '.join(f'{w:.2f}' for w in walls)})", flush=True)
    finally:
        os.sched_setaffinity(0, allowed)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.add_argument("--cases", nargs="+", default=list(CASES))
    p.add_argument("--no-variants", action="store_true", help="the original CTs only")
    p.add_argument("--repeats", type=int, default=3, help="repeats of the 1- and 2-core timing (0: skip)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="a LungConfig field for this run, e.g. gas_max_air_around=1.0 (repeatable)")
    p.add_argument("--only", default=None, metavar="TEXT[,TEXT]",
                   help="the variants whose name contains one of these comma-separated texts only")
    args = p.parse_args(argv)
    changes: dict[str, Any] = {}
    fields = {f.name: f.type for f in dataclasses.fields(LungConfig)}
    for item in args.set:
        key, _, value = item.partition("=")
        if key not in fields or not value:
            p.error(f"--set {item!r}: use FIELD=VALUE with a LungConfig field ({', '.join(sorted(fields))})")
        default = getattr(LungConfig(), key)
        changes[key] = value.lower() in ("1", "true", "on") if isinstance(default, bool) else type(default)(value)
    cfg = dataclasses.replace(LungConfig(), **changes)
    reason = missing_reason()
    if reason:
        print(reason, file=sys.stderr)
        return 2
    import covidseg.inference.sliding_window  # noqa: F401  (torch, imported by the lung stage's box helper)
    from covidseg.training.trainer import code_version, machine_description

    rows = []
    for case in args.cases:
        hu, spacing = load_case(case)
        ref = pancreas_reference() if case == "pancreas-ct-cb-001" else None
        base = row(case, "original", hu, spacing, ref, cfg)
        rows.append(base)
        labels = ref if ref is not None else find_lungs(hu, spacing, cfg).labels
        if args.no_variants:
            continue
        for name, make in variants(case, hu, spacing, labels):
            if args.only is not None and not any(text in name for text in args.only.split(",")):
                continue
            v_hu, v_spacing, v_ref, lesion = make()
            rows.append(row(case, name, v_hu, v_spacing, v_ref, cfg, lesion))
    timing = thread_timings(args.repeats, cfg) if args.repeats > 0 else None
    from _stamp import write_results

    result = {"benchmark": "lungs_real", "version": code_version(), "machine_description": machine_description(),
              "load_average": os.getloadavg(), "runs": rows, "timing": timing,
              "scoring": "pancreas-ct-cb-001: reference_labels.nii.gz (its RTSTRUCT on the CT grid); others: Dice "
                         "against the unperturbed CT's lungs (thick slices: majority of each slab)"}
    if args.json:
        write_results(args.json, result, {"lungs": dataclasses.asdict(cfg)})
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
