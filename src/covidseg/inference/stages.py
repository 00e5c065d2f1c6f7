"""The stages of ``segment``: the CT made ready, the lungs (stage 1), the infection inside them (stage 2).

- :func:`prepare_ct` maps the stored values to HU with the infection model's own intensity settings (as in
  training) and keeps each normalised form it is asked for, so that two stages wanting the same one share it.
- :class:`LungStage` gives the lung labels (1 left, 2 right) and what it found (:class:`LungResult`): the classical
  method (:func:`covidseg.inference.lungs.classical_lungs`) or a trained lung model
  (:func:`covidseg.inference.lungs.model_lungs`). It is the only caller of either.
- An :class:`InfectionStage` turns the CT and the lung labels into an infection probability volume and says how for
  the report. :class:`SlidingWindowInfection` is the report's 3D network in sliding windows over the lungs' box;
  another model (a 2D one run slice by slice, say) is another class with the same two methods.

:func:`build_stages` puts them together from the loaded models and the run's config.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from covidseg.config import Config, InferenceConfig, IntensityConfig, LungConfig, RuntimeConfig
from covidseg.errors import InputError
from covidseg.inference.backends import LoadedModel
from covidseg.inference.lungs import classical_lungs, model_lungs
from covidseg.inference.sliding_window import Box, mask_box, predict_volume
from covidseg.intensity import lung_only, resolve_convention, to_hu, window_hu
from covidseg.io.volume import CTImage
from covidseg.runtime import bf16_enabled, resolve_device
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
            labels = classical_lungs(ct.hu, ct.spacing, self.lungs)
        else:  # the lung model sees the whole CT normalised as its own training normalised it
            labels = model_lungs(self.model.module, ct.windowed(self.model.config.intensity), self.inference,
                                 device=self.device, runtime=self.runtime)
        if not labels.any():
            raise InputError(
                f"{ct.path}: no lung found (no air region of at least {self.lungs.min_lung_volume_ml:g} mL inside "
                "the body); is this a chest CT? Check its intensities (--set intensity.convention=hu|windowed) or "
                "give a trained lung model with --lungs CKPT"
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


# --------------------------------------------------------------------------------------------- both


@dataclasses.dataclass(frozen=True)
class Stages:
    """The two stages of a run, built once and used for every case."""

    lungs: LungStage
    infection: InfectionStage


def build_stages(infection: LoadedModel, lung_model: LoadedModel | None, config: Config, device: str) -> Stages:
    """The stages of a run: the classical lungs (or ``lung_model``) and the sliding-window infection model.

    Args:
        infection: the infection model.
        lung_model: a lung model, or ``None`` for the classical method.
        config: the run's settings (``lungs`` and ``inference`` sections).
        device: where the networks run.
    """
    return Stages(lungs=LungStage(config.lungs, config.inference, device, lung_model, config.runtime),
                  infection=SlidingWindowInfection(infection, config.inference, device, config.runtime))
