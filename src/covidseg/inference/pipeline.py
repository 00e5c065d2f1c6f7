"""The two-stage ``segment`` pipeline, end to end: inputs -> models -> each case -> its folder (-> the cohort).

:func:`segment` takes what ``covidseg segment`` was given: one input (a NIfTI file or a DICOM folder) is one case
written to ``OUT``; a folder or a list of inputs is a cohort (:func:`segment_cohort`), run through
:func:`covidseg.inference.cohort.run_cohort`, so several processes (``torchrun``, a SLURM array) share it, a case
already done is skipped, each case has a status file and ``OUT/summary.csv`` sums it up.

Each case: :func:`~covidseg.inference.inputs.find_inputs` and :func:`~covidseg.inference.inputs.case_name` (the
inputs), :func:`~covidseg.io.image.read_image`, :func:`~covidseg.inference.case.segment_image` (the stages of
:mod:`covidseg.inference.stages`), :func:`~covidseg.inference.outputs.write_case_folder` (the folder, published
only when complete). Run settings come from the config: ``inference`` (device, TTA, window, threads...) and
``lungs``; :class:`SegmentOptions` holds what is not a setting (which models, which extra outputs, ``--force``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from covidseg.checkpoint import resolve_checkpoint
from covidseg.config import Config
from covidseg.errors import InputError
from covidseg.inference.backends import load_model, model_device
from covidseg.inference.case import segment_image
from covidseg.inference.inputs import case_name, find_inputs
from covidseg.inference.outputs import case_scalars, check_output, read_report, write_case_folder
from covidseg.inference.stages import Stages, build_stages
from covidseg.io.image import read_image
from covidseg.io.rtstruct import require_rt_utils


@dataclass
class SegmentOptions:
    """What ``covidseg segment`` was asked for besides the config (whose ``inference`` section holds the device,
    TTA and the other run settings).

    Attributes:
        checkpoint: the infection model (``covidseg train`` / ``covidseg demo`` / ``covidseg semiseg train`` write
            one); ``None`` or ``default`` = the shipped 2D model (:func:`covidseg.checkpoint.default_checkpoint`).
        lungs: ``"classic"`` or the path of a lung-model checkpoint (target ``lung``).
        probability: also write ``probability.nii.gz``.
        html: also write ``report.html``.
        force: replace an existing output folder.
        backend: ``torch`` (a checkpoint ``.pt`` or a TorchScript export) or ``onnxruntime`` (an ``.onnx`` export,
            or a checkpoint exported in memory); see :func:`covidseg.inference.backends.load_model`. ONNX Runtime
            runs on the CPU.
        series: Series Instance UID to read from a DICOM folder (``None``: the CT series is chosen).
        rtstruct: also write ``rtstruct.dcm`` (DICOM inputs only; needs rt-utils, checked by :func:`segment`
            before any work).
    """

    checkpoint: Path | None = None
    lungs: str = "classic"
    probability: bool = False
    html: bool = False
    force: bool = False
    backend: str = "torch"
    series: str | None = None
    rtstruct: bool = False


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


# ------------------------------------------------------------------------------------------------ models


def load_stages(options: SegmentOptions, config: Config, device: str) -> Stages:
    """Load the infection model (and the lung model when ``options.lungs`` is a file) and build the stages.

    Args:
        options: checkpoint paths and the backend (:func:`covidseg.inference.backends.load_model`: a ``.pt``
            checkpoint, a TorchScript or an ``.onnx`` export).
        config: the run's settings (``runtime.threads`` are also ONNX Runtime's intra-op threads, 0 = all cores).
        device: torch device of the models (ONNX Runtime models run on the CPU whatever it says).

    Raises:
        InputError: a missing or unreadable file, or a lung model given as the infection model.
    """
    threads = config.runtime.threads
    model = load_model(resolve_checkpoint(options.checkpoint), options.backend, device=device, threads=threads)
    if model.out_channels == 2 or model.meta.get("target") == "lung":
        raise InputError(
            f"{options.checkpoint}: this is a lung model (2 output channels: left, right); give it as "
            "--lungs CKPT and an infection model (target infection or joint) as --checkpoint"
        )
    lung_model = None
    if options.lungs != "classic":
        lung_model = load_model(Path(options.lungs), options.backend, device=device, threads=threads)
    return build_stages(model, lung_model, config, device)


# ------------------------------------------------------------------------------------------------ one case


def segment_case(input_path: Path, out_dir: Path, stages: Stages, options: SegmentOptions,
                 progress: bool = False) -> CaseResult:
    """Segment one CT and write its folder (:mod:`covidseg.inference.outputs`). Raises on failure."""
    start = time.perf_counter()
    check_output(out_dir, options.force, (Path(input_path),))
    name = case_name(Path(input_path), options.series)
    t = time.perf_counter()
    image = read_image(input_path, series=options.series)
    read_s = time.perf_counter() - t
    seg = segment_image(image, stages, progress=progress)
    seg.timings = {"read_s": read_s, **seg.timings}
    report = write_case_folder(out_dir, image, name, seg, stages.infection.describe(), start,
                               probability=options.probability, html=options.html, rtstruct=options.rtstruct)
    return CaseResult(name, Path(input_path), out_dir, report=report, timings=seg.timings)


# ------------------------------------------------------------------------------------------------ runs


def check_rtstruct_inputs(cases: list[Path]) -> None:
    """Refuse ``--rtstruct`` when an input is not a DICOM series (a folder), as TotalSegmentator refuses its DICOM
    outputs for a NIfTI input: before any work, rather than a cohort that writes the file for some cases only.

    Raises:
        InputError: naming the first input that is not a DICOM folder.
    """
    other = [case for case in cases if not Path(case).is_dir()]
    if other:
        count = f" ({len(other)} of the {len(cases)} inputs are not)" if len(cases) > 1 else ""
        raise InputError(f"{other[0]}: --rtstruct writes an RT Structure Set for DICOM series only, and this is "
                         f"not one{count}; give DICOM folders, or leave out --rtstruct")


def segment(input_path: Path, out: Path, options: SegmentOptions, config: Config,
            log: Callable[[str], None] | None = None, progress: bool = True) -> list[CaseResult]:
    """Segment one input, or a cohort (a folder or a list of inputs: :func:`segment_cohort`); ``progress``
    shows a bar over the infection model's windows of a single input (stderr; plain lines when not a terminal).

    Returns:
        One :class:`CaseResult` per case this process handled (for a cohort: this rank's share), in input order.
    """
    if options.rtstruct:
        require_rt_utils()
    cases, batch = find_inputs(input_path)
    if options.rtstruct:
        check_rtstruct_inputs(cases)
    if batch:
        return segment_cohort(cases, out, options, config, log=log)
    device = model_device(options.backend, config.runtime.device, local_rank=0)
    check_output(out, options.force, tuple(cases))
    stages = load_stages(options, config, device)
    return [segment_case(cases[0], out, stages, options, progress=progress)]


def segment_cohort(cases: list[Path], out: Path, options: SegmentOptions, config: Config,
                   log: Callable[[str], None] | None = None) -> list[CaseResult]:
    """Segment a cohort with :func:`covidseg.inference.cohort.run_cohort`: case ``c`` -> ``out/c/``.

    Each process (rank, from torchrun's ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``, else 0 of 1) takes its share;
    cases whose status says ``done`` are skipped (a rerun does no work and loads no model), failed ones are tried
    again and may overwrite their own folder; the models are loaded once per process, on ``cuda:LOCAL_RANK`` with
    ``--device cuda``. Rank 0 writes ``out/summary.csv`` when every rank has finished.

    Returns:
        One :class:`CaseResult` per case of this rank's share (``skipped`` for those done before).
    """
    from covidseg.inference.cohort import case_ids, read_status, resolve_rank, run_cohort, status_path

    ids = case_ids(cases)
    check_output(out, True, tuple(cases))  # --force or not: a cohort folder never holds or replaces an input
    me = resolve_rank()
    device = model_device(options.backend, config.runtime.device, local_rank=me.local_rank)
    case_options = replace(options, force=True)  # a retried case replaces its own partial outputs only
    loaded: list[Stages] = []

    def process_case(src: Path, dst: Path) -> dict[str, Any]:
        if not loaded:
            loaded.append(load_stages(options, config, device))
        result = segment_case(src, dst, loaded[0], case_options)
        assert result.report is not None
        return case_scalars(result.report)

    cohort = run_cohort(cases, out, process_case, me.rank, me.world_size)
    results = []
    for cid in cohort.assigned:
        status = read_status(status_path(out, cid)) or {}
        result = CaseResult(cid, ids[cid], out / cid, skipped=cid in cohort.skipped)
        if status.get("status") == "done":
            result.report = read_report(out / cid)
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
