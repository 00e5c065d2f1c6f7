"""What ``segment`` writes for one case, and how: the report, the case folder, published only when complete.

Outputs of one case (written to a hidden temporary folder beside the destination and renamed into place only
when all are complete, so an interrupted run never leaves a folder that looks finished):

- ``lungs.nii.gz`` (uint8, 1 left, 2 right), ``infection.nii.gz`` (uint8 0/1), optionally ``probability.nii.gz``
  (float32 infection probability), all with exactly the input's geometry;
- ``segmentation.seg.nrrd``: the same masks as a 3D Slicer segmentation with named, coloured segments (left lung,
  right lung, infection; :func:`covidseg.io.slicer.write_slicer_segmentation`);
- ``segmentation.dcm`` for a DICOM series: the same masks as a DICOM-SEG referencing the series
  (:func:`covidseg.io.dicom_seg.write_dicom_seg`);
- ``rtstruct.dcm`` for a DICOM series when asked for: the same masks as an RT Structure Set referencing the
  series (:func:`covidseg.io.rtstruct.write_rtstruct`);
- for an NRRD or MetaImage input, ``lungs`` and ``infection`` also in the input's own format
  (``lungs.nrrd``, ...; :func:`covidseg.io.itk.write_itk_mask`);
- ``report.json`` and ``report.csv`` (volumes in mL, percentages, severity, spacing, model, versions, timings);
- ``overview.png`` and optionally ``report.html`` (self-contained).

``report.json`` is written last: a folder holding it is complete. :func:`check_output` refuses, before any
computation, an output that would hold or replace the input or that cannot be written.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import os
import shutil
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from covidseg.errors import InputError, OutputExistsError, UserError
from covidseg.inference.case import CaseSegmentation
from covidseg.inference.stages import StageDescription
from covidseg.io.atomic import atomic_write_text, host_tag, pid_alive
from covidseg.io.dicom_seg import SEG_FILE, write_dicom_seg
from covidseg.io.image import write_mask, write_volume
from covidseg.io.itk import mask_path, write_itk_mask
from covidseg.io.rtstruct import RTSTRUCT_FILE, write_rtstruct
from covidseg.io.slicer import write_slicer_segmentation
from covidseg.io.volume import CTImage
from covidseg.report import SEVERITY_SOURCE, involvement

SLICER_FILE = "segmentation.seg.nrrd"
"""The 3D Slicer segmentation of a case (docs/interop.md)."""
OUTPUT_FILES = ("lungs.nii.gz", "infection.nii.gz", SLICER_FILE, "report.json", "report.csv", "overview.png")
"""Files every case folder holds (``probability.nii.gz`` and ``report.html`` when asked for, ``segmentation.dcm``
for a DICOM series, ``rtstruct.dcm`` for a DICOM series when asked for, the masks in the input's format for NRRD
and MetaImage inputs)."""
REPORT_FILE = "report.json"
"""The report; written last, so its presence marks a complete case folder."""
log = logging.getLogger("covidseg")

PARTIAL_MODE = 0o700
"""Permissions of the hidden work folder (those of ``tempfile.mkdtemp``), kept by the published case folder."""


# --------------------------------------------------------------------------------------------- the report


def versions() -> dict[str, str]:
    """Versions of covidseg and the libraries that shape its answer."""
    import nibabel
    import scipy
    import torch

    from covidseg import __version__

    out = {"covidseg": __version__, "torch": torch.__version__, "numpy": np.__version__,
           "scipy": scipy.__version__, "nibabel": nibabel.__version__}
    with contextlib.suppress(ImportError):
        import SimpleITK

        out["SimpleITK"] = SimpleITK.Version_VersionString()
    return out


def build_report(image: CTImage, name: str, seg: CaseSegmentation, stage: StageDescription,
                 run_time_s: float) -> dict[str, Any]:
    """The ``report.json`` content of a case.

    Args:
        image: the CT as read.
        name: the case name.
        seg: what the stages found.
        stage: the infection stage's description (:meth:`~covidseg.inference.stages.InfectionStage.describe`).
        run_time_s: seconds from the start of the case.
    """
    summary = involvement(seg.lungs, seg.infection, image.spacing)
    report: dict[str, Any] = {
        "case": name,
        "input": str(image.path),
        "shape": list(image.shape),
        "original_shape": [int(s) for s in image.original_shape],
        "spacing_mm": [float(s) for s in image.spacing],
        "voxel_volume_ml": summary["voxel_volume_ml"],
        "intensity_convention": seg.convention,
        "lungs": {k: summary[k] for k in ("left", "right", "both")},
        "severity": {"score": summary["both"]["severity_score"], "category": summary["both"]["severity"],
                     "band": summary["both"]["severity_band"]},
        "severity_source": SEVERITY_SOURCE,
        "infection_outside_lungs_ml": seg.outside_ml,
        "lung_method": seg.lung_method,
    }
    if seg.lung_findings:
        report["lung_findings"] = seg.lung_findings
    report.update({
        "model": stage["model"],
        "inference": {**stage["inference"], "box": seg.box_bounds},
        "versions": versions(),
        "timings_s": {k: round(v, 3) for k, v in seg.timings.items()},
        "run_time_s": run_time_s,
    })
    return report


def report_csv(report: dict[str, Any]) -> str:
    """One row per lung (left, right, both) with the case, volumes, percentage and severity."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["case", "lung", "lung_ml", "infection_ml", "percent", "severity_score", "severity",
                     "severity_band", "infection_outside_lungs_ml", "spacing_mm", "model", "run_time_s"])
    for name in ("left", "right", "both"):
        e = report["lungs"][name]
        writer.writerow([report["case"], name, f"{e['lung_ml']:.3f}", f"{e['infection_ml']:.3f}",
                         f"{e['percent']:.4f}", e["severity_score"], e["severity"], e["severity_band"],
                         f"{report['infection_outside_lungs_ml']:.3f}",
                         "x".join(f"{s:.4g}" for s in report["spacing_mm"]), report["model"]["name"],
                         f"{report['run_time_s']:.2f}"])
    return buf.getvalue()


def case_scalars(report: dict[str, Any]) -> dict[str, Any]:
    """The figures of a ``report.json`` that go into the cohort's ``summary.csv``."""
    row: dict[str, Any] = {}
    for side in ("left", "right", "both"):
        e = report["lungs"][side]
        row.update({f"{side}_lung_ml": round(e["lung_ml"], 3), f"{side}_infection_ml": round(e["infection_ml"], 3),
                    f"{side}_percent": round(e["percent"], 4)})
    row.update({"severity_score": report["severity"]["score"], "severity": report["severity"]["category"],
                "infection_outside_lungs_ml": round(report["infection_outside_lungs_ml"], 3),
                "run_time_s": report["run_time_s"]})
    return row


def read_report(out_dir: Path) -> dict[str, Any] | None:
    """The ``report.json`` of a case folder, ``None`` when it is missing or unreadable."""
    with contextlib.suppress(OSError, ValueError):
        return dict(json.loads((Path(out_dir) / REPORT_FILE).read_text(encoding="utf-8")))
    return None


# --------------------------------------------------------------------------------------------- the folder


def check_output(out_dir: Path, force: bool, inputs: tuple[Path, ...] = ()) -> None:
    """Refuse an output folder that already holds something unless ``force``, and always one that is, or holds,
    or lies inside (for a DICOM folder) one of ``inputs``: ``--force`` replaces outputs, never the user's data."""
    target = Path(out_dir).resolve()
    for item in inputs:
        src = Path(item).resolve()
        if target == src or target in src.parents or (src.is_dir() and src in target.parents):
            raise InputError(f"{out_dir}: the output folder would hold or replace the input {item}; choose an -o "
                             "folder outside the input (covidseg never overwrites its input, even with --force)")
    existing = target  # fail before the computation, not after it, when OUT cannot be made
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing != target and not existing.is_dir():
        raise UserError(f"{out_dir}: {existing} is a file, not a folder; a file stands where a folder is needed; "
                        "choose another output path")
    if not os.access(existing if existing != target else target.parent, os.W_OK):
        raise UserError(f"{out_dir}: no permission to write in {existing if existing != target else target.parent}; "
                        "choose an output folder you can write to (-o/--out)")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not force:
        raise OutputExistsError(f"{out_dir}: already exists and is not empty; choose another -o folder or add "
                                "--force to replace it")


def partial_folder(out_dir: Path) -> Path:
    """The hidden folder a case is written into before it becomes ``out_dir``: ``.NAME.partial-HOST-PID-UUID``."""
    return out_dir.parent / f".{out_dir.name}.partial-{host_tag()}-{os.getpid()}-{uuid.uuid4().hex}"


def remove_stale_partials(out_dir: Path) -> list[Path]:
    """Clean up after killed runs of this machine for ``out_dir``; returns the hidden folders removed.

    A hidden ``partial_folder`` (an unfinished output) is deleted. A hidden ``old_folder`` (the previous output,
    moved aside by :func:`publish` just before the new one took its place) is put back as ``out_dir`` when the
    kill came between the two renames and ``out_dir`` is missing (nothing is lost), and deleted otherwise. Only
    names that carry this host's tag and the PID of a process that no longer exists are touched: a run still
    writing (this one or another), another machine's (a shared disk) and any other name are left. Nothing is
    touched off POSIX (no way to ask whether a PID is alive without touching it).
    """
    if os.name != "posix" or not out_dir.parent.is_dir():
        return []
    import re

    # the names partial_folder and old_folder give: host tag, PID (and a partial folder's uuid)
    pattern = re.compile(rf"\.{re.escape(out_dir.name)}\.(?P<kind>partial|old)-(?P<host>[0-9a-f]{{8}})-(?P<pid>\d+)"
                         rf"(?P<uuid>-[0-9a-f]{{32}})?")
    host, removed = host_tag(), []
    for path in sorted(out_dir.parent.iterdir()):  # ".OUT.old-" before ".OUT.partial-": put back, then clean
        m = pattern.fullmatch(path.name)
        if m is None or (m["kind"] == "partial") != bool(m["uuid"]) or m["host"] != host:
            continue
        if not path.is_dir() or path.is_symlink():
            continue
        pid = int(m["pid"])
        if pid == os.getpid() or pid_alive(pid):
            continue
        if m["kind"] == "old" and not out_dir.exists():
            os.replace(path, out_dir)  # killed between publish's two renames: the previous output comes back
            log.warning("%s: the previous output, moved aside by a run killed while replacing it, is back", out_dir)
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def old_folder(out_dir: Path) -> Path:
    """Where :func:`publish` moves the previous ``out_dir`` for the moment of the swap (host tag and PID named)."""
    return out_dir.parent / f".{out_dir.name}.old-{host_tag()}-{os.getpid()}"


def publish(tmp: Path, out_dir: Path) -> None:
    """Move the finished temporary folder onto ``out_dir`` (replacing an old one only now)."""
    if out_dir.exists():
        old = old_folder(out_dir)
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)


def _write_dicom_seg(tmp: Path, image: CTImage, seg: CaseSegmentation, model: str) -> dict[str, Any]:
    """``segmentation.dcm`` for a DICOM series; a series highdicom refuses (e.g. no Frame of Reference UID) gets
    the other outputs and a warning, and the report says why the SEG is missing."""
    try:
        write_dicom_seg(seg.lungs, seg.infection, image, tmp / SEG_FILE, model=model)
    except InputError as exc:
        log.warning("%s: no %s: %s", image.path, SEG_FILE, exc)
        return {"file": None, "reason": str(exc)}
    return {"file": SEG_FILE, "series_instance_uid": image.series_uid}


def _write_rtstruct(tmp: Path, image: CTImage, seg: CaseSegmentation, model: str) -> dict[str, Any]:
    """``rtstruct.dcm`` for a DICOM series; as for the SEG, a series rt-utils refuses (or any other input) gets the
    other outputs and a warning, and the report says why the RTSTRUCT is missing."""
    if not image.series_files:
        reason = f"{image.path}: not a DICOM series; an RTSTRUCT references the slices of a DICOM series"
        log.warning("no %s: %s", RTSTRUCT_FILE, reason)
        return {"file": None, "reason": reason}
    try:
        result = write_rtstruct(seg.lungs, seg.infection, image, tmp / RTSTRUCT_FILE, model=model)
    except InputError as exc:
        log.warning("%s: no %s: %s", image.path, RTSTRUCT_FILE, exc)
        return {"file": None, "reason": str(exc)}
    return {"file": RTSTRUCT_FILE, "series_instance_uid": image.series_uid,
            "contours": dict(zip(("left_lung", "right_lung", "infection"), result.contours, strict=True)),
            "empty_rois": list(result.empty_rois)}


def _write_masks(tmp: Path, image: CTImage, seg: CaseSegmentation, probability: bool, model: str,
                 rtstruct: bool = False) -> tuple[float, dict[str, Any]]:
    t = time.perf_counter()
    write_mask(seg.lungs, image, tmp / "lungs.nii.gz")
    write_mask(seg.infection, image, tmp / "infection.nii.gz")
    write_slicer_segmentation(seg.lungs, image, tmp / SLICER_FILE, infection=seg.infection)
    notes: dict[str, Any] = {}
    if image.series_files:
        notes["dicom_seg"] = _write_dicom_seg(tmp, image, seg, model)
    if rtstruct:
        notes["rtstruct"] = _write_rtstruct(tmp, image, seg, model)
    if image.source == "itk":  # NRRD/MetaImage in: the masks also in that format
        write_itk_mask(seg.lungs, image, mask_path(image, "lungs", tmp))
        write_itk_mask(seg.infection, image, mask_path(image, "infection", tmp))
    if probability:
        write_volume(seg.probability.astype(np.float32), image, tmp / "probability.nii.gz", np.float32)
    return time.perf_counter() - t, notes


def write_case_folder(out_dir: Path, image: CTImage, name: str, seg: CaseSegmentation, stage: StageDescription,
                      start: float, probability: bool = False, html: bool = False,
                      rtstruct: bool = False) -> dict[str, Any]:
    """Write the case folder (see the module docstring) and return its report.

    Args:
        out_dir: the case folder; replaced only once the new one is complete.
        image: the CT as read (its geometry is the masks').
        name: the case name.
        seg: what the stages found; its ``timings`` gain the output steps.
        stage: the infection stage's description for the report.
        start: ``time.perf_counter()`` at the start of the case (for ``run_time_s``).
        probability: also write ``probability.nii.gz``.
        html: also write ``report.html``.
        rtstruct: also write ``rtstruct.dcm`` (a DICOM series; needs rt-utils).
    """
    from covidseg.report.html import render_html
    from covidseg.report.overview import render_overview

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    for stale in remove_stale_partials(out_dir):
        log.info("removed %s, the unfinished output of a killed run", stale)
    # named before it is made, so that an interruption at any moment after the mkdir (even inside it) removes it
    tmp = partial_folder(out_dir)
    try:
        # the masks are written (mostly gzip, which runs without the GIL) while the picture is drawn. The writer's
        # thread is started before the folder exists: an interrupt between a thread's start and the pool's record
        # of it would leave a writer the pool does not wait for, writing into the folder after its removal.
        # Leaving the pool waits for its one thread, so on any error the folder is removed after the writer stopped.
        t_out = time.perf_counter()
        with ThreadPoolExecutor(max_workers=1) as pool:
            pool.submit(int).result()  # max_workers=1: this is the only thread the pool will ever start
            tmp.mkdir(mode=PARTIAL_MODE)
            writing = pool.submit(_write_masks, tmp, image, seg, probability, str(stage["model"].get("name", "")),
                                  rtstruct)
            t = time.perf_counter()
            report = build_report(image, name, seg, stage, 0.0)
            render_overview(seg.hu, seg.lungs, seg.infection, image.spacing, report["lungs"], tmp / "overview.png",
                            title=name)
            seg.timings["pictures_s"] = time.perf_counter() - t
            seg.timings["write_masks_s"], notes = writing.result()
        report.update(notes)
        seg.timings["outputs_s"] = time.perf_counter() - t_out  # both of the above, side by side
        report["timings_s"] = {k: round(v, 3) for k, v in seg.timings.items()}
        report["run_time_s"] = round(time.perf_counter() - start, 3)
        if html:
            render_html(report, tmp / "overview.png", tmp / "report.html")
        atomic_write_text(tmp / "report.csv", report_csv(report))
        atomic_write_text(tmp / REPORT_FILE, json.dumps(report, indent=2) + "\n")  # last: marks completion
        publish(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report
