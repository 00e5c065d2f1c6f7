"""DICOM Segmentation objects (``segmentation.dcm``) of a DICOM series' lungs and infection, made with highdicom.

One binary SEG instance with three segments: 1 left lung, 2 right lung, 3 infection (the layers of
:mod:`covidseg.io.slicer`: the lung segments keep their infected voxels). Each frame is one slice of the source
series, taken from the file grid (:meth:`~covidseg.io.volume.CTImage.to_original`, no resampling): frame ``k`` of
segment ``s`` holds slice ``k`` of the series (:attr:`~covidseg.io.volume.CTImage.series_files`), and highdicom
copies that slice's Image Position/Orientation (Patient) into the frame and references its SOP Instance UID, so
a viewer overlays each frame on its own slice. Frames that hold nothing are omitted (highdicom's default), so a
segment with no voxel at all (no infection found) is described in the Segment Sequence and has no frame: a
valid object, which highdicom reads back as an all-zero segment.

Codes (SNOMED CT, from pydicom's ``codedict``; docs/interop.md says why these): lungs are category
*Anatomical Structure* (91723000, CID 7150), type *Lung* (39607008) with the laterality modifier *Left*
(7771000) or *Right* (24028007), as 3D Slicer's terminology and :mod:`covidseg.io.slicer` code them; the
infection is category *Morphologically Abnormal Structure* (49755003), type *Lesion* (52988006), anatomic
region *Lung*. The algorithm is identified per segment (name ``covidseg``, family *Artificial Intelligence*
(DCM 123110), the package version, the model as a parameter).
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from covidseg.errors import InputError
from covidseg.io.atomic import atomic_path
from covidseg.io.dicom import series_headers
from covidseg.io.volume import CTImage

log = logging.getLogger("covidseg")

SEG_FILE = "segmentation.dcm"
"""The DICOM-SEG of a case folder."""
SEG_SERIES_NUMBER = 901
"""Series Number of the written SEG (a number clear of the scanner's series numbers, as SEG writers commonly use)."""
MANUFACTURER = "covidseg"


@dataclass(frozen=True)
class SegSegment:
    """One segment of the SEG: its label, display colour (RGB in [0, 1]) and codes (pydicom codedict keywords)."""

    label: str
    color: tuple[float, float, float]
    category: str
    kind: str
    modifier: str | None = None
    region: str | None = None


SEGMENTS: tuple[SegSegment, ...] = (
    SegSegment("Left lung", (0.502, 0.682, 0.878), "AnatomicalStructure", "Lung", modifier="Left"),
    SegSegment("Right lung", (0.502, 0.800, 0.502), "AnatomicalStructure", "Lung", modifier="Right"),
    SegSegment("Infection", (0.902, 0.235, 0.157), "MorphologicallyAbnormalStructure", "Lesion", region="Lung"),
)
"""Segments 1, 2, 3 in this order (the colours of the 3D Slicer file)."""


def _descriptions(model: str, version: str) -> list[Any]:
    import highdicom as hd
    from pydicom.sr.codedict import codes

    algorithm = hd.AlgorithmIdentificationSequence(name=MANUFACTURER, family=codes.cid7162.ArtificialIntelligence,
                                                   version=version, parameters={"model": model})
    out = []
    for number, seg in enumerate(SEGMENTS, start=1):
        desc = hd.seg.SegmentDescription(
            segment_number=number, segment_label=seg.label, segmented_property_category=getattr(codes.cid7150,
                                                                                                seg.category),
            segmented_property_type=getattr(codes.SCT, seg.kind), algorithm_type="AUTOMATIC",
            algorithm_identification=algorithm,
            anatomic_regions=[getattr(codes.SCT, seg.region)] if seg.region else None,
            display_color=hd.color.CIELabColor.from_rgb(*(int(round(255 * c)) for c in seg.color)))
        if seg.modifier:  # laterality, inside the type's item (PS3.3 C.8.20.2: SegmentedPropertyTypeModifier)
            modifier = hd.sr.CodedConcept.from_code(getattr(codes.SCT, seg.modifier))
            desc.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [modifier]
        out.append(desc)
    return out


def segment_frames(lungs: np.ndarray, infection: np.ndarray, image: CTImage) -> np.ndarray:
    """The SEG's pixel array: ``(slices, rows, columns, 3)`` bool in the series' file order.

    Args:
        lungs: canonical ``(D, H, W)`` labels (1 left, 2 right).
        infection: canonical ``(D, H, W)`` 0/1.
        image: the DICOM series the masks belong to.

    Returns:
        Stacked segments; ``[k, j, i, s]`` is segment ``s + 1`` at row ``j``, column ``i`` of slice file ``k``.
    """
    file_lungs = image.to_original(np.asarray(lungs))  # (columns i, rows j, slices k), ITK's index order
    file_infection = image.to_original(np.asarray(infection))
    stacked = np.stack([file_lungs == 1, file_lungs == 2, file_infection > 0], axis=-1)
    return np.ascontiguousarray(stacked.transpose(2, 1, 0, 3))


def _source_headers(image: CTImage) -> list[Any]:
    """The series' headers (no pixels), evened out in memory where highdicom is stricter than the reader.

    Slice Thickness may be empty (type 2), Spacing Between Slices may be wrong (SimpleITK writes 1 mm for any
    series) and Image Orientation (Patient) may differ between slices by rounding (the reader allows 1e-4);
    highdicom needs the first, copies the second into the SEG and compares the third exactly. So the copies get
    the slice gap that was read, as thickness where there is none and as spacing, and the first slice's
    orientation. The files are not touched.
    """
    headers = series_headers(image, "the DICOM-SEG")
    gap = float(np.sqrt((np.asarray(image.affine)[:3, 2] ** 2).sum()))
    orientation = headers[0].get("ImageOrientationPatient") if headers else None
    for header in headers:
        if header.get("SliceThickness") in (None, ""):
            header.SliceThickness = f"{gap:.6g}"
        if "SpacingBetweenSlices" in header:
            header.SpacingBetweenSlices = f"{gap:.6g}"
        if orientation is not None:
            header.ImageOrientationPatient = orientation
    return headers


def write_dicom_seg(lungs: np.ndarray, infection: np.ndarray, image: CTImage, path: str | Path, model: str,
                    version: str | None = None) -> Path:
    """Write the lungs and infection of a DICOM series as a binary DICOM-SEG referencing that series (atomic).

    Args:
        lungs: canonical ``(D, H, W)`` uint8 labels (1 left lung, 2 right lung).
        infection: canonical ``(D, H, W)`` 0/1 infection.
        image: the series as :func:`covidseg.io.dicom.read_dicom_series` read it (its ``series_files``).
        path: the ``.dcm`` file to write.
        model: the infection model's name (the algorithm's ``model`` parameter).
        version: the algorithm version (default: covidseg's).

    Raises:
        ValueError: ``image`` is not a DICOM series, or the masks are not on its canonical grid.
        InputError: the series' files cannot be read again, or highdicom refuses their headers.
    """
    import highdicom as hd

    from covidseg import __version__

    if not image.series_files:
        raise ValueError(f"{image.path}: a DICOM-SEG needs a DICOM series as input (source {image.source!r})")
    for name, mask in (("lungs", lungs), ("infection", infection)):
        if tuple(np.shape(mask)) != image.shape:
            raise ValueError(f"{name} of shape {np.shape(mask)} does not match the canonical CT shape {image.shape}")
    version = version or __version__
    headers = _source_headers(image)
    pixels = segment_frames(lungs, infection, image).astype(np.uint8)
    empty = [s for s in range(pixels.shape[-1]) if not pixels[..., s].any()]
    try:
        with warnings.catch_warnings():
            # a one-component PatientName (common in anonymised series) is valid DICOM; highdicom warns about it
            warnings.filterwarnings("ignore", message=".*intended person name", category=UserWarning)
            seg = hd.seg.Segmentation(
                source_images=headers, pixel_array=pixels, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
                segment_descriptions=_descriptions(model, version), series_instance_uid=hd.UID(),
                series_number=SEG_SERIES_NUMBER, sop_instance_uid=hd.UID(), instance_number=1,
                manufacturer=MANUFACTURER, manufacturer_model_name=model, software_versions=version,
                device_serial_number="0", series_description="covidseg lungs and infection",
                content_label="COVIDSEG", content_description="lungs and COVID-19 infection (covidseg)",
                content_creator_name="covidseg^")
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise InputError(f"{image.path}: highdicom cannot build a DICOM-SEG on this series ({type(exc).__name__}: "
                         f"{exc}); the NIfTI and .seg.nrrd outputs hold the same masks") from None
    if empty:
        log.info("%s: segment(s) %s empty: described, no frame", path, [SEGMENTS[s].label for s in empty])
    path = Path(path)
    with atomic_path(path) as tmp:
        seg.save_as(str(tmp), enforce_file_format=True)
    return path
