"""One case through the stages: a read CT in, its lungs, infection and probability out (:class:`CaseSegmentation`).

read CT -> :func:`~covidseg.inference.stages.prepare_ct` (HU, with the infection model's intensity settings) ->
stage 1 lungs -> stage 2 infection probability -> threshold -> infection kept inside the lungs (what fell outside
is reported, in mL). Nothing is written here (:mod:`covidseg.inference.outputs` writes the case folder).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np

from covidseg.inference.sliding_window import Box
from covidseg.inference.stages import Stages, prepare_ct
from covidseg.io.volume import CTImage


@dataclasses.dataclass
class CaseSegmentation:
    """What the stages found in one CT; every array is canonical ``(D, H, W)``.

    Attributes:
        hu: the CT in Hounsfield units (float32; the input of the pictures).
        lungs: uint8 lung labels, 0 background, 1 left, 2 right.
        infection: uint8 0/1 infection, inside the lungs only.
        probability: float32 infection probability in [0, 1] (0 where the model did not run).
        outside_ml: volume (mL) the model called infection outside the lungs (dropped from ``infection``).
        convention: how the input stored its values (``hu`` or ``windowed``).
        box: the region the infection model ran over, ``None`` for the whole volume.
        lung_method: how the lungs were found (``classical`` or ``model PATH``).
        lung_findings: what the lung stage observed beyond the labels.
        timings: seconds per step (``normalize_s``, ``lungs_s``, ``infection_s``; the pipeline adds its own).
    """

    hu: np.ndarray
    lungs: np.ndarray
    infection: np.ndarray
    probability: np.ndarray
    outside_ml: float
    convention: str
    box: Box | None
    lung_method: str
    lung_findings: dict[str, Any] = dataclasses.field(default_factory=dict)
    timings: dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def box_bounds(self) -> list[list[int]] | None:
        """:attr:`box` as ``[[start, stop], ...]`` per axis ``(D, H, W)`` (the report's form)."""
        return [[int(b.start), int(b.stop)] for b in self.box] if self.box is not None else None


def segment_image(image: CTImage, stages: Stages, progress: bool = False) -> CaseSegmentation:
    """Run both stages on a read CT.

    Args:
        image: the CT (:func:`covidseg.io.image.read_image`).
        stages: the run's stages (:func:`covidseg.inference.stages.build_stages`).
        progress: a progress bar over the infection model's windows (stderr).

    Raises:
        InputError: intensities that are neither HU nor windowed; no lung found.
    """
    timings: dict[str, float] = {}
    t = time.perf_counter()
    ct = prepare_ct(image, stages.infection.intensity)
    timings["normalize_s"] = time.perf_counter() - t

    t = time.perf_counter()
    lungs = stages.lungs.run(ct)
    timings["lungs_s"] = time.perf_counter() - t

    t = time.perf_counter()
    found = stages.infection.predict(ct, lungs.labels, progress=progress)
    timings["infection_s"] = time.perf_counter() - t

    lung = lungs.labels > 0
    predicted = found.probability >= stages.infection.threshold
    outside = predicted & ~lung
    return CaseSegmentation(
        hu=ct.hu, lungs=lungs.labels, infection=(predicted & lung).astype(np.uint8), probability=found.probability,
        outside_ml=float(outside.sum()) * ct.voxel_ml, convention=ct.convention, box=found.box,
        lung_method=lungs.method, lung_findings=dict(lungs.findings), timings=timings,
    )
