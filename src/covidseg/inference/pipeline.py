"""The two-stage ``segment`` pipeline: lungs, then infection inside them, then the report.

read -> normalise (the checkpoint's own intensity settings) -> stage 1 lungs (classical, or a trained lung model)
-> the "lung only" input made with *that* lung mask by :func:`covidseg.intensity.lung_only`, the function training
uses (training builds it from the reference lung masks; at inference the pipeline's own mask stands in for them)
-> :func:`~covidseg.inference.sliding_window.predict_volume` over the lungs' bounding box (windows without lung
skipped) -> threshold -> infection kept inside the lungs (what fell outside is reported, in mL) -> outputs with
exactly the input's geometry.

Outputs of one case (written to a hidden temporary folder beside the destination and renamed into place only
when all are complete, so an interrupted run never leaves a folder that looks finished):

- ``lungs.nii.gz`` (uint8, 1 left, 2 right), ``infection.nii.gz`` (uint8 0/1), optionally ``probability.nii.gz``
  (float32 infection probability);
- ``segmentation.seg.nrrd``: the same masks as a 3D Slicer segmentation with named, coloured segments (left lung,
  right lung, infection; :func:`covidseg.io.slicer.write_slicer_segmentation`);
- ``report.json`` and ``report.csv`` (volumes in mL, percentages, severity, spacing, model, versions, timings);
- ``overview.png`` and optionally ``report.html`` (self-contained).

A folder or a list of inputs is a cohort (:func:`segment_cohort`): it runs through
:func:`covidseg.inference.cohort.run_cohort`, so several processes (``torchrun``, a SLURM array) share it, a case
already done is skipped, each case has a status file and ``OUT/summary.csv`` sums it up.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from covidseg.config import Config
from covidseg.errors import InputError, OutputExistsError, UserError

SLICER_FILE = "segmentation.seg.nrrd"
"""The 3D Slicer segmentation of a case (docs/interop.md)."""
OUTPUT_FILES = ("lungs.nii.gz", "infection.nii.gz", SLICER_FILE, "report.json", "report.csv", "overview.png")
"""Files every case folder holds (``probability.nii.gz`` and ``report.html`` when asked for)."""
NIFTI_SUFFIXES = (".nii", ".nii.gz")


@dataclass
class SegmentOptions:
    """What ``covidseg segment`` was asked for besides the config.

    Attributes:
        checkpoint: the infection model (``covidseg train`` / ``covidseg demo`` write one).
        lungs: ``"classic"`` or the path of a lung-model checkpoint (target ``lung``).
        device: ``cpu``, ``cuda`` or ``cuda:N`` (overrides ``runtime.device``).
        tta: flip test-time augmentation (overrides ``inference.tta`` when True).
        probability: also write ``probability.nii.gz``.
        html: also write ``report.html``.
        force: replace an existing output folder.
        backend: ``torch`` (a checkpoint ``.pt`` or a TorchScript export) or ``onnxruntime`` (an ``.onnx`` export,
            or a checkpoint exported in memory); see :func:`covidseg.export.load_model`. ONNX Runtime runs on the
            CPU.
    """

    checkpoint: Path
    lungs: str = "classic"
    device: str | None = None
    tta: bool = False
    probability: bool = False
    html: bool = False
    force: bool = False
    backend: str = "torch"


@dataclass
class LoadedModels:
    """The infection model (and the lung model) with their stored configs."""

    model: nn.Module
    config: Config
    meta: dict[str, Any]
    checkpoint: Path
    lung_model: nn.Module | None = None
    lung_config: Config | None = None
    lung_checkpoint: Path | None = None


@dataclass
class CaseResult:
    """Result of one case: its folder and report, or the error that made it fail."""

    name: str
    input: Path
    out_dir: Path
    report: dict[str, Any] | None = None
    error: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
    skipped: bool = False
    """A cohort case found done by an earlier run (nothing recomputed; ``report`` read back from its folder)."""


# ------------------------------------------------------------------------------------------------ inputs


def case_name(path: Path) -> str:
    """``case_001.nii.gz`` -> ``case_001``; a DICOM folder -> its name."""
    name = path.name
    for suffix in (".nii.gz", ".nii"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _is_nifti(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(NIFTI_SUFFIXES)


def find_inputs(input_path: Path) -> tuple[list[Path], bool]:
    """The cases behind ``input_path`` and whether it was a batch (a folder of cases or a list file).

    A NIfTI file or a folder holding files but no NIfTI and no sub-folders (a DICOM series) is one case; a
    folder with NIfTI files and/or sub-folders is a batch (each NIfTI and each sub-folder a case); any other
    file is read as a list, one path a line (``#`` starts a comment; relative paths are relative to the list).

    Raises:
        InputError: missing input, an empty folder or list.
    """
    path = Path(input_path)
    if not path.exists():
        raise InputError(f"{path}: no such file or folder; give a .nii/.nii.gz file, a DICOM folder, a folder of "
                         "them or a text file listing them")
    if path.is_file():
        if path.name.lower().endswith(NIFTI_SUFFIXES):
            return [path], False
        with open(path, "rb") as fh:
            head = fh.read(132)
        if path.suffix.lower() in (".dcm", ".ima") or head[128:132] == b"DICM":
            raise InputError(f"{path}: a single DICOM file; give the folder that holds the series (all its "
                             "slices) instead")
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError) as exc:
            raise InputError(f"{path}: neither a NIfTI file nor a readable text list of inputs ({exc}); give a "
                             ".nii/.nii.gz file, a DICOM folder or a list with one path a line") from None
        if "\x00" in text:
            raise InputError(f"{path}: not a NIfTI file (the name must end in .nii or .nii.gz) and not a text list "
                             "of inputs; rename it or give a .nii/.nii.gz file, a DICOM folder or a list")
        lines = [ln.split("#", 1)[0].strip() for ln in text.splitlines()]
        items = [Path(ln) if Path(ln).is_absolute() else path.parent / ln for ln in lines if ln]
        if not items:
            raise InputError(f"{path}: the list of inputs is empty; write one NIfTI file or DICOM folder a line")
        return items, True
    entries = sorted(path.iterdir())
    niftis = [p for p in entries if _is_nifti(p)]
    folders = [p for p in entries if p.is_dir() and not p.name.startswith(".")]
    files = [p for p in entries if p.is_file() and not p.name.startswith(".")]
    if not niftis and not folders:
        if not files:
            raise InputError(f"{path}: empty folder; give a NIfTI file, a DICOM folder or a folder of them")
        return [path], False  # a DICOM series
    return niftis + folders, True


# ------------------------------------------------------------------------------------------------ models


def load_models(options: SegmentOptions, device: str, threads: int = 0) -> LoadedModels:
    """Load the infection model (and the lung model when ``options.lungs`` is a file) with ``options.backend``.

    Args:
        options: checkpoint paths and the backend (:func:`covidseg.export.load_model`: a ``.pt`` checkpoint, a
            TorchScript or an ``.onnx`` export).
        device: torch device of the models (ONNX Runtime models run on the CPU whatever it says).
        threads: ONNX Runtime intra-op threads (0 = all cores).

    Raises:
        InputError: a missing or unreadable file, or a lung model given as the infection model.
    """
    from covidseg.export import load_model

    model, config, meta = load_model(options.checkpoint, options.backend, device=device, threads=threads)
    k = int(config.model.out_channels)
    if k == 2 or meta.get("target") == "lung":
        raise InputError(
            f"{options.checkpoint}: this is a lung model (2 output channels: left, right); give it as "
            "--lungs CKPT and an infection model (target infection or joint) as --checkpoint"
        )
    loaded = LoadedModels(model, config, meta, Path(options.checkpoint))
    if options.lungs != "classic":
        lung_path = Path(options.lungs)
        lung_model, lung_config, _ = load_model(lung_path, options.backend, device=device, threads=threads)
        loaded.lung_model, loaded.lung_config, loaded.lung_checkpoint = lung_model, lung_config, lung_path
    return loaded


def run_device(options: SegmentOptions, config: Config, local_rank: int = 0) -> str:
    """Where the networks run: ``cpu`` for ONNX Runtime; else ``--device`` (or ``runtime.device``), where a
    bare ``cuda`` becomes ``cuda:LOCAL_RANK`` so that each process of a node takes its own GPU."""
    from covidseg.inference.sliding_window import resolve_device

    if options.backend == "onnxruntime":
        return "cpu"
    device = resolve_device(options.device or config.runtime.device)
    if device.type == "cuda" and device.index is None:
        device = resolve_device(f"cuda:{local_rank}")
    return str(device)


def infection_channel(config: Config) -> int:
    """Which output channel is the infection: 0 for target ``infection``, 2 for ``joint`` (left, right,
    infection)."""
    return 2 if int(config.model.out_channels) == 3 else 0


# ------------------------------------------------------------------------------------------------ one case


def segment_image(image: Any, models: LoadedModels, config: Config, device: str,
                  progress: bool = False) -> dict[str, Any]:
    """Run both stages on a read image.

    Args:
        image: a :class:`covidseg.io.image.CTImage`.
        models: the loaded checkpoints.
        config: run settings; its ``inference`` and ``lungs`` sections are used, the *checkpoint's* ``intensity``
            section normalises the CT (as in training).
        device: torch device name.
        progress: tqdm bar over the windows.

    Returns:
        ``{"hu", "lungs", "infection", "probability", "outside_ml", "timings", "convention", "box"}``; masks are
        canonical ``(D, H, W)`` uint8, ``probability`` float32.
    """
    from covidseg.inference.lungs import classical_lungs, model_lungs
    from covidseg.inference.sliding_window import mask_box, predict_volume
    from covidseg.intensity import lung_only, resolve_convention, to_hu, window_hu

    timings: dict[str, float] = {}
    intensity = models.config.intensity
    lung_only_input = models.config.train.input == "lung_only"
    t = time.perf_counter()
    convention = resolve_convention(image.array, intensity, None, image.path)
    hu = image.array if convention == "hu" else to_hu(image.array, convention, intensity)  # read-only below
    # the whole normalised CT only where a network sees it whole; a lung-only input is made over the box below
    normalized = window_hu(hu, intensity) if models.lung_model is not None or not lung_only_input else None
    timings["normalize_s"] = time.perf_counter() - t

    t = time.perf_counter()
    if models.lung_model is not None:
        assert normalized is not None
        lungs = model_lungs(models.lung_model, normalized, config.inference, device=device, runtime=config.runtime)
    else:
        lungs = classical_lungs(hu, image.spacing, config.lungs)
    timings["lungs_s"] = time.perf_counter() - t
    lung = lungs > 0
    if not lung.any():
        raise InputError(
            f"{image.path}: no lung found (no air region of at least {config.lungs.min_lung_volume_ml:g} mL inside "
            "the body); is this a chest CT? Check its intensities (--set intensity.convention=hu|windowed) or give "
            "a trained lung model with --lungs CKPT"
        )

    t = time.perf_counter()
    margin = tuple(int(np.ceil(config.inference.box_margin_mm / s)) for s in image.spacing)
    box = mask_box(lung, margin)
    if normalized is None:  # lung-only input over the lungs' box; outside it no voxel is lung
        assert box is not None
        net_input = np.full(hu.shape, np.float32(intensity.outside_lung_value), dtype=np.float32)
        net_input[box] = lung_only(window_hu(hu[box], intensity), lungs[box], intensity)
    else:
        net_input = lung_only(normalized, lungs, intensity) if lung_only_input else normalized
    prob_all = predict_volume(models.model, net_input, config.inference, box=box, device=device, mask=lung,
                              progress=progress, runtime=config.runtime)
    prob = prob_all[infection_channel(models.config)]
    del prob_all
    timings["infection_s"] = time.perf_counter() - t
    predicted = prob >= config.inference.threshold
    outside = predicted & ~lung
    voxel_ml = float(np.prod(image.spacing)) / 1000.0
    infection = (predicted & lung).astype(np.uint8)
    return {
        "hu": hu,
        "lungs": lungs,
        "infection": infection,
        "probability": prob,
        "outside_ml": float(outside.sum()) * voxel_ml,
        "timings": timings,
        "convention": convention,
        "box": [[b.start, b.stop] for b in box] if box is not None else None,
    }


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


def build_report(image: Any, name: str, seg: dict[str, Any], models: LoadedModels, config: Config,
                 options: SegmentOptions, device: str, run_time_s: float) -> dict[str, Any]:
    """The ``report.json`` content."""
    from covidseg.inference.sliding_window import bf16_enabled, resolve_device
    from covidseg.report import SEVERITY_SOURCE, involvement

    summary = involvement(seg["lungs"], seg["infection"], image.spacing)
    inf = config.inference
    return {
        "case": name,
        "input": str(image.path),
        "shape": list(image.shape),
        "original_shape": [int(s) for s in image.original_shape],
        "spacing_mm": [float(s) for s in image.spacing],
        "voxel_volume_ml": summary["voxel_volume_ml"],
        "intensity_convention": seg["convention"],
        "lungs": {k: summary[k] for k in ("left", "right", "both")},
        "severity": {"score": summary["both"]["severity_score"], "category": summary["both"]["severity"],
                     "band": summary["both"]["severity_band"]},
        "severity_source": SEVERITY_SOURCE,
        "infection_outside_lungs_ml": seg["outside_ml"],
        "lung_method": "classical" if models.lung_model is None else f"model {models.lung_checkpoint}",
        "model": {"name": models.config.model.name, "checkpoint": str(models.checkpoint),
                  "base_width": models.config.model.base_width, "input": models.config.train.input,
                  "target": models.config.train.target,
                  "meta": {k: v for k, v in models.meta.items() if isinstance(v, (int, float, str, bool))}},
        "inference": {"window": list(inf.window), "overlap": inf.overlap, "threshold": inf.threshold,
                      "tta": inf.tta, "device": device, "backend": options.backend,
                      "bf16": options.backend == "torch" and bf16_enabled(config.runtime, resolve_device(device)),
                      "box": seg["box"]},
        "versions": versions(),
        "timings_s": {k: round(v, 3) for k, v in seg["timings"].items()},
        "run_time_s": run_time_s,
    }


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


def _publish(tmp: Path, out_dir: Path) -> None:
    """Move the finished temporary folder onto ``out_dir`` (replacing an old one only now)."""
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)


def segment_case(input_path: Path, out_dir: Path, models: LoadedModels, config: Config, options: SegmentOptions,
                 device: str, progress: bool = False) -> CaseResult:
    """Segment one CT and write its folder (see the module docstring). Raises on failure."""
    from covidseg.io.atomic import atomic_write_text
    from covidseg.io.image import read_image, write_mask, write_volume
    from covidseg.io.slicer import write_slicer_segmentation
    from covidseg.report.html import render_html
    from covidseg.report.overview import render_overview

    start = time.perf_counter()
    check_output(out_dir, options.force, (Path(input_path),))
    name = case_name(Path(input_path))
    t = time.perf_counter()
    image = read_image(input_path)
    read_s = time.perf_counter() - t
    seg = segment_image(image, models, config, device, progress=progress)
    seg["timings"] = {"read_s": read_s, **seg["timings"]}

    out_dir.parent.mkdir(parents=True, exist_ok=True)

    def write_masks(tmp: Path) -> float:
        t = time.perf_counter()
        write_mask(seg["lungs"], image, tmp / "lungs.nii.gz")
        write_mask(seg["infection"], image, tmp / "infection.nii.gz")
        write_slicer_segmentation(seg["lungs"], image, tmp / SLICER_FILE, infection=seg["infection"])
        if options.probability:
            write_volume(seg["probability"].astype(np.float32), image, tmp / "probability.nii.gz", np.float32)
        return time.perf_counter() - t

    tmp: Path | None = None
    try:  # the partial folder is made inside the try, so an interruption right after it still removes it
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
        # the masks are written (mostly gzip, which runs without the GIL) while the picture is drawn; leaving the
        # pool waits for the writer, so on any error the partial folder is removed only after it has stopped
        t_out = time.perf_counter()
        with ThreadPoolExecutor(max_workers=1) as pool:
            writing = pool.submit(write_masks, tmp)
            t = time.perf_counter()
            report = build_report(image, name, seg, models, config, options, device, 0.0)
            render_overview(seg["hu"], seg["lungs"], seg["infection"], image.spacing,
                            report["lungs"], tmp / "overview.png", title=name)
            seg["timings"]["pictures_s"] = time.perf_counter() - t
            seg["timings"]["write_masks_s"] = writing.result()
        seg["timings"]["outputs_s"] = time.perf_counter() - t_out  # both of the above, side by side
        report["timings_s"] = {k: round(v, 3) for k, v in seg["timings"].items()}
        report["run_time_s"] = round(time.perf_counter() - start, 3)
        if options.html:
            render_html(report, tmp / "overview.png", tmp / "report.html")
        atomic_write_text(tmp / "report.csv", report_csv(report))
        atomic_write_text(tmp / "report.json", json.dumps(report, indent=2) + "\n")  # last: marks completion
        _publish(tmp, out_dir)
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return CaseResult(name, Path(input_path), out_dir, report=report, timings=seg["timings"])


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


def segment(input_path: Path, out: Path, options: SegmentOptions, config: Config,
            log: Callable[[str], None] | None = None) -> list[CaseResult]:
    """Segment one input, or a cohort (a folder or a list of inputs: :func:`segment_cohort`).

    Returns:
        One :class:`CaseResult` per case this process handled (for a cohort: this rank's share), in input order.
    """
    if options.tta:
        config.inference.tta = True
    cases, batch = find_inputs(input_path)
    if batch:
        return segment_cohort(cases, out, options, config, log=log)
    device = run_device(options, config)
    check_output(out, options.force, tuple(cases))
    models = load_models(options, device, threads=config.runtime.threads)
    return [segment_case(cases[0], out, models, config, options, device, progress=True)]


def segment_cohort(cases: list[Path], out: Path, options: SegmentOptions, config: Config,
                   log: Callable[[str], None] | None = None) -> list[CaseResult]:
    """Segment a cohort with :func:`covidseg.inference.cohort.run_cohort`: case ``c`` -> ``out/c/``.

    Each process (rank, from torchrun's ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``, else 0 of 1) takes its share;
    cases whose status says ``done`` are skipped (a rerun does no work and loads no model), failed ones are tried
    again and may overwrite their own folder; the model is loaded once per process, on ``cuda:LOCAL_RANK`` with
    ``--device cuda``. Rank 0 writes ``out/summary.csv`` when every rank has finished.

    Returns:
        One :class:`CaseResult` per case of this rank's share (``skipped`` for those done before).
    """
    from dataclasses import replace

    from covidseg.inference.cohort import case_ids, read_status, resolve_rank, run_cohort, status_path

    ids = case_ids(cases)
    check_output(out, True, tuple(cases))  # --force or not: a cohort folder never holds or replaces an input
    me = resolve_rank()
    device = run_device(options, config, me.local_rank)
    case_options = replace(options, force=True)  # a retried case replaces its own partial outputs only
    loaded: list[LoadedModels] = []

    def process_case(src: Path, dst: Path) -> dict[str, Any]:
        if not loaded:
            loaded.append(load_models(options, device, threads=config.runtime.threads))
        result = segment_case(src, dst, loaded[0], config, case_options, device)
        assert result.report is not None
        return case_scalars(result.report)

    cohort = run_cohort(cases, out, process_case, me.rank, me.world_size)
    results = []
    for cid in cohort.assigned:
        status = read_status(status_path(out, cid)) or {}
        result = CaseResult(cid, ids[cid], out / cid, skipped=cid in cohort.skipped)
        if status.get("status") == "done":
            with contextlib.suppress(OSError, ValueError):
                result.report = json.loads((out / cid / "report.json").read_text(encoding="utf-8"))
            if result.report is None:
                result.error = f"{out / cid}/report.json is missing although the case's status says done"
        else:
            result.error = str(status.get("error") or "not run")
            if log and cid not in cohort.failed:  # failures of this run were printed as they happened
                log(f"{ids[cid]}: failed earlier: {result.error}")
        results.append(result)
    if cohort.summary is not None and log:
        log(f"cohort summary: {cohort.summary}")
    return results
