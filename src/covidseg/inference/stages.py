"""The stages of ``segment``: the CT made ready, the lungs (stage 1), the infection inside them (stage 2).

- :func:`prepare_ct` maps the stored values to HU with the infection model's own intensity settings (as in
  training) and keeps each normalised form it is asked for, so that two stages wanting the same one share it.
- :class:`LungStage` gives the lung labels (1 left, 2 right) and what it found (:class:`LungResult`): the classical
  method (:func:`covidseg.inference.lungs.find_lungs`, with what it found) or a trained lung model
  (:func:`covidseg.inference.lungs.model_lungs`). It is the only caller of either.
- An :class:`InfectionStage` turns the CT and the lung labels into an infection probability volume and says how for
  the report. :class:`SlidingWindowInfection` runs a network of ``covidseg train`` (the report's 3D network) in
  sliding windows over the lungs' box; :class:`SliceInfection` runs a 2D slice model of ``covidseg semiseg train``
  (the shipped default, ``--checkpoint default``) slice by slice as its training slices were made
  (:mod:`covidseg.inference.slices`).

:func:`build_stages` puts them together from the loaded models and the run's config; :func:`is_slice_model` decides
which infection stage a checkpoint gets.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from scipy import ndimage

from covidseg.checkpoint import SLICE_TASK, default_checkpoint
from covidseg.config import (
    Config,
    InferenceConfig,
    IntensityConfig,
    LungConfig,
    RuntimeConfig,
    flip_tta_name,
)
from covidseg.errors import InputError
from covidseg.inference.backends import LoadedModel
from covidseg.inference.lungs import find_lungs, model_lungs
from covidseg.inference.partial_volume import PARTIAL_VOLUME_MM, band_slices, diaphragm_band
from covidseg.inference.slices import (
    SliceBox,
    SliceConvention,
    predict_slices,
    prepare_slices,
    restore_volume,
)
from covidseg.inference.sliding_window import Box, mask_box, predict_volume
from covidseg.intensity import lung_only, resolve_convention, to_hu, window_hu
from covidseg.io.volume import CTImage
from covidseg.models import UNet
from covidseg.models.deploy import deploy_copy
from covidseg.runtime import bf16_enabled, resolve_device, torch_threads
from covidseg.targets import infection_channel, target_of

Spacing = tuple[float, float, float]
"""Voxel size ``(D, H, W)`` in mm."""
StageDescription = dict[str, dict[str, Any]]
"""What a stage tells the report: ``{"model": {...}, "inference": {...}}`` (plain JSON values)."""


# --------------------------------------------------------------------------------------------- the CT


@dataclasses.dataclass
class PreparedCT:
    """A CT ready for the stages, in canonical ``(D, H, W)`` order.

    Attributes:
        hu: float32 Hounsfield units; stages read it and never write it.
        spacing: voxel size ``(D, H, W)`` in mm.
        path: the file or DICOM folder it was read from (named in errors).
        convention: how the file stored its values (``hu`` or ``windowed``).
    """

    hu: np.ndarray
    spacing: Spacing
    path: Path
    convention: str
    _windowed: list[tuple[tuple[float, float], np.ndarray]] = dataclasses.field(default_factory=list, repr=False)

    @property
    def voxel_ml(self) -> float:
        """Volume of one voxel in mL."""
        return float(np.prod(self.spacing)) / 1000.0

    def windowed(self, intensity: IntensityConfig) -> np.ndarray:
        """The whole CT normalised to [0, 1] over ``intensity.window_hu`` (float32 ``(D, H, W)``), made once per
        window and shared by the stages that ask for it; read-only."""
        key = (float(intensity.window_hu[0]), float(intensity.window_hu[1]))
        for window, volume in self._windowed:
            if window == key:
                return volume
        volume = window_hu(self.hu, intensity)
        self._windowed.append((key, volume))
        return volume


def prepare_ct(image: CTImage, intensity: IntensityConfig) -> PreparedCT:
    """The CT in HU, its stored convention resolved with ``intensity`` (``auto`` detects it).

    Raises:
        InputError: values that are neither HU nor windowed, NaN/Inf, a constant volume.
    """
    convention = resolve_convention(image.array, intensity, None, image.path)
    hu = image.array if convention == "hu" else to_hu(image.array, convention, intensity)
    return PreparedCT(hu=hu, spacing=image.spacing, path=image.path, convention=convention)


# --------------------------------------------------------------------------------------------- stage 1: lungs


@dataclasses.dataclass(frozen=True)
class LungResult:
    """What the lung stage found.

    Attributes:
        labels: ``(D, H, W)`` uint8: 0 background, 1 left lung, 2 right lung.
        method: how (``classical``, or ``model PATH``), as the report names it.
        findings: what the stage observed beyond the labels (plain JSON values; written to the report as
            ``lung_findings`` when there are any).
    """

    labels: np.ndarray
    method: str
    findings: dict[str, Any] = dataclasses.field(default_factory=dict)


class LungStage:
    """Stage 1: the lungs of a CT, by the classical method or a trained lung model (target ``lung``).

    Args:
        lungs: the classical method's settings.
        inference: sliding-window settings of a lung model (its ``threshold`` decides each side).
        device: where a lung model runs.
        model: the lung model; ``None`` = classical.
        runtime: precision, threads and layout of a lung model (default :class:`RuntimeConfig`).
    """

    def __init__(self, lungs: LungConfig, inference: InferenceConfig, device: str,
                 model: LoadedModel | None = None, runtime: RuntimeConfig | None = None) -> None:
        self.lungs = lungs
        self.inference = inference
        self.device = device
        self.model = model
        self.runtime = runtime or RuntimeConfig()

    @property
    def method(self) -> str:
        """``classical`` or ``model PATH`` (the report's ``lung_method``)."""
        return "classical" if self.model is None else f"model {self.model.source}"

    def run(self, ct: PreparedCT) -> LungResult:
        """The lung labels of ``ct``.

        Raises:
            InputError: no lung found (not a chest CT, or intensities read in the wrong convention).
        """
        if self.model is None:
            found = find_lungs(ct.hu, ct.spacing, self.lungs)
            if not found.found:
                raise InputError(
                    f"{ct.path}: {found.reason or 'no lung found'}; is this a chest CT? Check its intensities "
                    "(--set intensity.convention=hu|windowed) or give a trained lung model with --lungs CKPT"
                )
            return LungResult(labels=found.labels, method=self.method, findings=found.summary())
        # the lung model sees the whole CT normalised as its own training normalised it
        labels = model_lungs(self.model.module, ct.windowed(self.model.config.intensity), self.inference,
                             device=self.device, runtime=self.runtime)
        if not labels.any():
            raise InputError(
                f"{ct.path}: the lung model {self.model.source} found no lung; is this a chest CT? Check its "
                "intensities (--set intensity.convention=hu|windowed) or use --lungs classic"
            )
        return LungResult(labels=labels, method=self.method)


# --------------------------------------------------------------------------------------------- stage 2: infection


@dataclasses.dataclass(frozen=True)
class InfectionMap:
    """An infection stage's answer.

    Attributes:
        probability: ``(D, H, W)`` float32 infection probability in [0, 1]; 0 where the model did not run.
        box: the region the model ran over (three slices ``(D, H, W)``), ``None`` for the whole volume.
    """

    probability: np.ndarray
    box: Box | None


class InfectionStage(Protocol):
    """Stage 2: the infection probability of a CT given its lungs."""

    @property
    def intensity(self) -> IntensityConfig:
        """How the model reads stored values (the convention of a file is resolved with it)."""

    @property
    def threshold(self) -> float:
        """Probability at or above which a voxel is infection."""

    def predict(self, ct: PreparedCT, lungs: np.ndarray, *, progress: bool = False) -> InfectionMap:
        """The infection probability of ``ct`` given its lung labels ``lungs`` (``(D, H, W)``, 1 left, 2 right)."""

    def describe(self) -> StageDescription:
        """The report's ``model`` and ``inference`` entries."""


def _scalars(meta: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in meta.items() if isinstance(v, (int, float, str, bool))}


class SlidingWindowInfection:
    """The report's stage 2: a 3D network over the lungs' bounding box (plus ``inference.box_margin_mm``) in
    Gaussian-blended sliding windows (:func:`covidseg.inference.sliding_window.predict_volume`), windows without
    lung skipped.

    The network sees what training fed it: the CT normalised with the checkpoint's ``intensity`` section, and for
    ``train.input = lung_only`` the "lung only" input of :func:`covidseg.intensity.lung_only` made with the lung
    stage's mask (training makes it from the reference masks), over the box only (outside it no voxel is lung).

    Args:
        model: the infection model (target ``infection`` or ``joint``).
        inference: window, overlap, threshold, TTA.
        device: where it runs.
        runtime: precision, threads, memory layout, windows per call (default :class:`RuntimeConfig`).
    """

    def __init__(self, model: LoadedModel, inference: InferenceConfig, device: str,
                 runtime: RuntimeConfig | None = None) -> None:
        self.model = model
        self.inference = inference
        self.device = device
        self.runtime = runtime or RuntimeConfig()
        self.channel = infection_channel(target_of(model.out_channels))

    @property
    def intensity(self) -> IntensityConfig:
        """The checkpoint's intensity settings."""
        return self.model.config.intensity

    @property
    def threshold(self) -> float:
        """``inference.threshold``."""
        return float(self.inference.threshold)

    def network_input(self, ct: PreparedCT, lungs: np.ndarray, box: Box | None) -> np.ndarray:
        """``(D, H, W)`` float32: the normalised CT, or its "lung only" form (made over ``box`` only)."""
        intensity = self.intensity
        if self.model.config.train.input != "lung_only":
            return ct.windowed(intensity)
        out = np.full(ct.hu.shape, np.float32(intensity.outside_lung_value), dtype=np.float32)
        if box is not None:
            out[box] = lung_only(window_hu(ct.hu[box], intensity), lungs[box], intensity)
        return out

    def predict(self, ct: PreparedCT, lungs: np.ndarray, *, progress: bool = False) -> InfectionMap:
        """Infection probability over the lungs' box (0 elsewhere); ``progress`` shows a bar over the windows."""
        lung = lungs > 0
        margin = tuple(int(np.ceil(self.inference.box_margin_mm / s)) for s in ct.spacing)
        box = mask_box(lung, margin)
        probs = predict_volume(self.model.module, self.network_input(ct, lungs, box), self.inference, box=box,
                               device=self.device, mask=lung, progress=progress, runtime=self.runtime)
        return InfectionMap(probability=probs[self.channel], box=box)

    def describe(self) -> StageDescription:
        """The model (name, checkpoint, width, input, target, scalar meta) and the sliding-window settings."""
        cfg, inf, backend = self.model.config, self.inference, self.model.backend
        return {
            "model": {"name": cfg.model.name, "checkpoint": str(self.model.source),
                      "base_width": cfg.model.base_width, "input": cfg.train.input, "target": cfg.train.target,
                      "meta": _scalars(self.model.meta)},
            "inference": {"window": list(inf.window), "overlap": inf.overlap, "threshold": inf.threshold,
                          "tta": inf.tta, "device": self.device, "backend": backend,
                          "bf16": backend == "torch" and bf16_enabled(self.runtime.bf16,
                                                                           resolve_device(self.device))},
        }


SLICE_BATCH = 16
"""Slices per forward pass of a slice model."""
MIN_COMPONENT_ML = 0.1
"""A slice model's infection components (26-connected in 3D, inside the lungs) smaller than this are dropped (mL):
specks of a few voxels are not a lesion the report should count."""


def is_slice_model(model: LoadedModel) -> bool:
    """Whether ``model`` is a 2D slice model of ``covidseg semiseg train`` (``meta["task"]`` is
    :data:`covidseg.checkpoint.SLICE_TASK`); those run in :class:`SliceInfection`, every other checkpoint in
    :class:`SlidingWindowInfection`."""
    return model.meta.get("task") == SLICE_TASK and int(model.config.model.spatial_dims) == 2


def drop_small_components(mask: np.ndarray, min_voxels: int) -> np.ndarray:
    """Bool ``(D, H, W)``: ``mask`` without its 26-connected components of fewer than ``min_voxels`` voxels."""
    if min_voxels <= 1 or not mask.any():
        return mask
    labels, count = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    keep = np.bincount(labels.ravel(), minlength=count + 1) >= min_voxels
    keep[0] = False
    return np.asarray(keep[labels])


def _slices_box(boxes: tuple[SliceBox, ...]) -> Box | None:
    """The union of the slice boxes as ``(D, H, W)`` slices; ``None`` when no slice was run."""
    if not boxes:
        return None
    return (slice(boxes[0].index, boxes[-1].index + 1),
            slice(min(b.rows[0] for b in boxes), max(b.rows[1] for b in boxes)),
            slice(min(b.cols[0] for b in boxes), max(b.cols[1] for b in boxes)))


def _is_shipped(path: Path) -> bool:
    try:
        return path.resolve() == default_checkpoint().resolve()
    except InputError:
        return False


class SliceInfection:
    """Stage 2 by a 2D slice model: each processed axial slice through the lungs' box made into a training slice
    (window, orientation, crop, slice stride: :mod:`covidseg.inference.slices`) and back to the CT grid.

    The probability is the model's (with the mirrors its meta's ``flip_tta`` asks for,
    :data:`covidseg.config.FLIP_TTA`: those its cross-validation averaged) inside each slice's lung box, linearly interpolated between processed slices. Then two rules set it to 0, so that the
    infection mask and ``probability.nii.gz`` agree: voxels of ``probability >= threshold`` inside the lungs on
    the partial-volume ramp above the diaphragm (:func:`~covidseg.inference.partial_volume.diaphragm_band`,
    within ``partial_volume_mm``), then the connected components of what is left smaller than
    ``min_component_ml``.

    Args:
        model: a checkpoint of ``covidseg semiseg train`` (:func:`is_slice_model`).
        device: where it runs.
        threads: torch intra-op threads (0 = torch's setting).
        convention: how a CT becomes slices; ``None`` = the measured convention
            (:class:`~covidseg.inference.slices.SliceConvention`) at the model's ``input_size``.
        min_component_ml: smallest infection component kept (mL); 0 keeps every voxel.
        channels_last: weights and slices in channels-last memory format (``runtime.channels_last``).
        partial_volume_mm: how far below and above a voxel the diaphragm's partial-volume ramp is looked for
            (mm); 0 keeps those voxels.

    Raises:
        InputError: a model that is not a slice model, or whose input is not square.
    """

    def __init__(self, model: LoadedModel, device: str, threads: int = 0, convention: SliceConvention | None = None,
                 min_component_ml: float = MIN_COMPONENT_ML, channels_last: bool = True,
                 partial_volume_mm: float = PARTIAL_VOLUME_MM) -> None:
        if not is_slice_model(model):
            raise InputError(f"{model.source}: not a 2D slice model (meta task {model.meta.get('task')!r}, "
                             f"{model.config.model.spatial_dims}D); give a checkpoint of 'covidseg semiseg train'")
        size = [int(s) for s in model.meta.get("input_size", [SliceConvention().size] * 2)]
        if len(size) != 2 or size[0] != size[1]:
            raise InputError(f"{model.source}: input_size {size}; the slice runner needs a square input")
        self.model = model
        # a covidseg network runs as its inference form (batch norm and gates folded), as in the sliding window
        self.channels_last = bool(channels_last) and isinstance(model.module, UNet)
        self.module = deploy_copy(model.module, channels_last=self.channels_last) if isinstance(model.module, UNet) \
            else model.module
        self.device = device
        self.threads = int(threads)
        self.convention = convention or SliceConvention(size=size[0])
        self.min_component_ml = float(min_component_ml)
        self.partial_volume_mm = float(partial_volume_mm)
        self.partial_volume_ml = 0.0
        self.flip_tta = flip_tta_name(model.meta.get("flip_tta"))
        self.shipped = _is_shipped(model.source)
        self.slices_run = 0

    @property
    def intensity(self) -> IntensityConfig:
        """The checkpoint's intensity settings (how a file's stored values are read as HU)."""
        return self.model.config.intensity

    @property
    def threshold(self) -> float:
        """The checkpoint's ``threshold`` (0.5 when it states none)."""
        return float(self.model.meta.get("threshold", 0.5))

    def predict(self, ct: PreparedCT, lungs: np.ndarray, *, progress: bool = False) -> InfectionMap:
        """Infection probability over the lungs' slices (0 elsewhere); ``progress`` is unused (a few seconds)."""
        prepared = prepare_slices(ct.hu, ct.spacing, lungs, self.convention)
        with torch_threads(self.threads):
            probs = predict_slices(self.module, prepared.images, batch_size=SLICE_BATCH, flip_tta=self.flip_tta,
                                   device=self.device, channels_last=self.channels_last)
        volume = restore_volume(probs, prepared)
        self.slices_run = len(prepared)
        box = _slices_box(prepared.boxes)
        self.partial_volume_ml = 0.0
        if box is not None:  # the model wrote nothing outside the box
            inside = volume[box]
            found = (inside >= self.threshold) & (lungs[box] > 0)
            band = self._diaphragm_band(found, box, ct, lungs)
            self.partial_volume_ml = float(np.count_nonzero(band)) * ct.voxel_ml
            kept = found & ~band
            if self.min_component_ml > 0:
                kept = drop_small_components(kept, int(np.ceil(self.min_component_ml / ct.voxel_ml)))
            inside[found & ~kept] = 0.0
        return InfectionMap(probability=volume, box=box)

    def _diaphragm_band(self, found: np.ndarray, box: Box, ct: PreparedCT, lungs: np.ndarray) -> np.ndarray:
        """:func:`diaphragm_band` of ``found`` (the box's voxels), with the columns followed past the box's ends."""
        steps = band_slices(ct.spacing[0], self.partial_volume_mm)
        if steps == 0 or not found.any():
            return np.zeros_like(found)
        first, stop = box[0].start, box[0].stop
        lo, hi = max(0, first - steps), min(ct.hu.shape[0], stop + steps)
        region = (slice(lo, hi), box[1], box[2])
        grown = np.zeros((hi - lo, *found.shape[1:]), dtype=bool)
        grown[first - lo:stop - lo] = found
        band = diaphragm_band(grown, lungs[region], ct.hu[region], ct.spacing[0], self.partial_volume_mm)
        return band[first - lo:stop - lo]

    def describe(self) -> StageDescription:
        """The model (name, checkpoint, data, input convention, CV) and the slice runner's settings."""
        meta, conv = self.model.meta, self.convention
        checkpoint = f"default (shipped): {self.model.source}" if self.shipped else str(self.model.source)
        model = {"name": self.model.config.model.name, "checkpoint": checkpoint, "kind": "2d slices",
                 "task": SLICE_TASK, "base_width": self.model.config.model.base_width,
                 "input_size": [conv.size, conv.size], "input": meta.get("input"), "data": meta.get("data"),
                 "cv_mean_dice_infnet": (meta.get("cv_mean") or {}).get("mean_dice_infnet"),
                 "cv_sd_dice_infnet": (meta.get("cv_sd") or {}).get("mean_dice_infnet"),
                 "code": meta.get("code"), "use": "research only; not a medical device"}
        inference = {"runner": "slices", "window_hu": list(conv.window_hu), "orientation": conv.orientation,
                     "crop_margin_fraction": conv.margin_fraction, "min_box_fraction": conv.min_box_fraction,
                     "min_slice_spacing_mm": conv.min_slice_spacing_mm, "slices_run": self.slices_run,
                     "flip_tta": self.flip_tta, "threshold": self.threshold,
                     "min_component_ml": self.min_component_ml, "partial_volume_mm": self.partial_volume_mm,
                     "partial_volume_removed_ml": round(self.partial_volume_ml, 2), "device": self.device,
                     "channels_last": self.channels_last,
                     "backend": self.model.backend}
        return {"model": model, "inference": inference}


# --------------------------------------------------------------------------------------------- both


@dataclasses.dataclass(frozen=True)
class Stages:
    """The two stages of a run, built once and used for every case."""

    lungs: LungStage
    infection: InfectionStage


def build_stages(infection: LoadedModel, lung_model: LoadedModel | None, config: Config, device: str) -> Stages:
    """The stages of a run: the classical lungs (or ``lung_model``) and the infection model, in
    :class:`SliceInfection` when it is a 2D slice model (:func:`is_slice_model`), else in
    :class:`SlidingWindowInfection`.

    Args:
        infection: the infection model.
        lung_model: a lung model, or ``None`` for the classical method.
        config: the run's settings (``lungs`` and ``inference`` sections).
        device: where the networks run.
    """
    stage: InfectionStage
    if is_slice_model(infection):
        stage = SliceInfection(infection, device, threads=config.runtime.threads,
                               channels_last=config.runtime.channels_last)
    else:
        stage = SlidingWindowInfection(infection, config.inference, device, config.runtime)
    return Stages(lungs=LungStage(config.lungs, config.inference, device, lung_model,
                                        config.runtime), infection=stage)
