"""3D Slicer segmentation files (``.seg.nrrd``): named, coloured segments on the CT's own voxel grid.

A ``.seg.nrrd`` is a NRRD labelmap whose header carries, per segment ``N``, the key/value fields 3D Slicer's
Segmentations module writes and reads (``SegmentN_Name``, ``SegmentN_Color``, ``SegmentN_LabelValue``,
``SegmentN_Layer``, ``SegmentN_Extent``, ``SegmentN_ID``, ``SegmentN_Tags``...; Slicer source
``Libs/MRML/Core/vtkMRMLSegmentationStorageNode.cxx``). Dropping the file onto Slicer opens it as a segmentation
node with the names and colours below, no import dialog, no colour table.

Geometry: the labels are written in the input file's own voxel order, with ``space: left-posterior-superior``,
``space directions`` and ``space origin`` taken from the CT's RAS affine (``CTImage.affine``) with the x and y rows
negated (RAS -> LPS). The segmentation therefore has exactly the CT's grid and overlays it without resampling.

Two layouts:

- one layer (default): a joint label map, 1 left lung, 2 right lung, 3 infection (the dataset's
  ``Lung_and_Infection_Mask`` convention); an infected voxel belongs to the infection segment only;
- two layers (``infection=`` given): layer 0 holds the lungs (1 left, 2 right), layer 1 the infection (1), so
  the lung segments keep their infected parts (segment statistics then give whole-lung volumes, as the report).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from covidseg.errors import InputError
from covidseg.io.atomic import atomic_path

SEG_SUFFIX = ".seg.nrrd"
"""Suffix Slicer associates with segmentations."""
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])
"""Flips x and y: RAS (nibabel) <-> LPS (DICOM, ITK, NRRD ``left-posterior-superior``)."""
GZIP_LEVEL = 1
"""gzip level of the labelmap: labels compress ~100x even at level 1, which is ~10x faster than 9 on a CT."""
EMPTY_EXTENT = (0, -1, 0, -1, 0, -1)
"""``SegmentN_Extent`` of an empty segment (Slicer's convention: max < min)."""
ANATOMY_CONTEXT = "Segmentation category and type - 3D Slicer General Anatomy list"
"""Terminology context of Slicer's built-in anatomy list (DICOM / SNOMED CT codes)."""
REGION_CONTEXT = "Anatomic codes - DICOM master list"


def _terminology(category: str, kind: str, modifier: str = "^^", region: str = "^^") -> str:
    """A ``TerminologyEntry`` tag: ``context~category~type~type modifier~region context~region~region modifier``."""
    return f"TerminologyEntry:{ANATOMY_CONTEXT}~{category}~{kind}~{modifier}~{REGION_CONTEXT}~{region}~^^"


_ANATOMY = "SCT^123037004^Anatomical Structure"
_LUNG = "SCT^39607008^Lung"
_ALTERED = "SCT^49755003^Morphologically Altered Structure"
_LESION = "SCT^52988006^Lesion"


@dataclasses.dataclass(frozen=True)
class SlicerSegment:
    """One segment: its name, colour (RGB in [0, 1]), label value within its layer, and DICOM/SNOMED terminology."""

    segment_id: str
    name: str
    color: tuple[float, float, float]
    label: int
    layer: int = 0
    terminology: str = ""


LEFT_LUNG = SlicerSegment("left_lung", "left lung", (0.502, 0.682, 0.878), 1, 0,
                          _terminology(_ANATOMY, _LUNG, "SCT^7771000^Left"))
RIGHT_LUNG = SlicerSegment("right_lung", "right lung", (0.502, 0.800, 0.502), 2, 0,
                           _terminology(_ANATOMY, _LUNG, "SCT^24028007^Right"))
INFECTION = SlicerSegment("infection", "infection", (0.902, 0.235, 0.157), 3, 0,
                          _terminology(_ALTERED, _LESION, region=_LUNG))
JOINT_SEGMENTS: tuple[SlicerSegment, ...] = (LEFT_LUNG, RIGHT_LUNG, INFECTION)
"""One layer, the joint labels 1 left, 2 right, 3 infection."""
LAYERED_SEGMENTS: tuple[SlicerSegment, ...] = (
    LEFT_LUNG, RIGHT_LUNG, dataclasses.replace(INFECTION, label=1, layer=1),
)
"""Two layers: lungs (1 left, 2 right) in layer 0, infection (1) in layer 1."""


class ImageGeometry(Protocol):
    """What the writer needs from a :class:`~covidseg.io.image.CTImage`."""

    affine: np.ndarray
    original_shape: tuple[int, int, int]

    def to_original(self, canonical_array: np.ndarray) -> np.ndarray: ...


def lps_geometry(affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """NRRD ``space directions`` (one row per voxel axis, mm, LPS) and ``space origin`` from a RAS affine."""
    affine = np.asarray(affine, dtype=np.float64)
    lps = RAS_TO_LPS @ affine[:3, :]
    return lps[:, :3].T.copy(), lps[:, 3].copy()


def _extent(mask: np.ndarray) -> tuple[int, ...]:
    """Inclusive voxel bounding box ``imin imax jmin jmax kmin kmax`` of a 3D boolean array."""
    if not mask.any():
        return EMPTY_EXTENT
    out: list[int] = []
    for axis in range(3):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        out += [int(hit[0]), int(hit[-1])]
    return tuple(out)


def _fmt(values: Sequence[float]) -> str:
    return " ".join(f"{v:.6g}" for v in values)


def _check_labels(array: np.ndarray, allowed: Sequence[int], what: str) -> np.ndarray:
    array = np.asarray(array)
    if array.dtype.kind == "b":
        return array.astype(np.uint8)
    if array.dtype.kind not in "iu":
        raise ValueError(f"{what}: expected integer labels, got dtype {array.dtype}")
    valid = {0, *allowed}
    lo, hi = (int(array.min()), int(array.max())) if array.size else (0, 0)
    if hi - lo < len(valid) and set(range(lo, hi + 1)) <= valid:
        return array.astype(np.uint8, copy=False)  # the range alone proves it (np.unique sorts the whole volume)
    found = np.unique(array)
    bad = sorted(set(found.tolist()) - valid)
    if bad:
        raise ValueError(f"{what}: labels {bad} not among 0, {', '.join(map(str, allowed))}")
    return array.astype(np.uint8)


def write_slicer_segmentation(labels_canonical: np.ndarray, like: ImageGeometry, path: Path | str,
                              infection: np.ndarray | None = None) -> Path:
    """Write a 3D Slicer ``.seg.nrrd`` on ``like``'s voxel grid, atomically.

    Args:
        labels_canonical: canonical ``(D, H, W)`` labels: the joint map (1 left lung, 2 right lung, 3 infection)
            when ``infection`` is ``None``, else the lung labels (1 left, 2 right).
        like: the CT it was computed from (:class:`~covidseg.io.image.CTImage`: ``affine``, ``original_shape``,
            ``to_original``).
        path: destination, ending in ``.seg.nrrd`` (its folder is created).
        infection: optional canonical ``(D, H, W)`` binary infection mask; then two layers are written and the lung
            segments keep their infected voxels.

    Returns:
        ``path`` as a Path.

    Raises:
        InputError: a name that does not end in ``.seg.nrrd``.
        ValueError: arrays of another shape than ``like``'s canonical grid, or unexpected labels.
    """
    import nrrd

    path = Path(path)
    if not path.name.lower().endswith(SEG_SUFFIX):
        raise InputError(f"{path}: a 3D Slicer segmentation must end in {SEG_SUFFIX}; e.g. segmentation.seg.nrrd")
    if infection is None:
        segments = JOINT_SEGMENTS
        layers = [_check_labels(labels_canonical, [s.label for s in segments], "segmentation labels")]
    else:
        segments = LAYERED_SEGMENTS
        layers = [
            _check_labels(labels_canonical, [LEFT_LUNG.label, RIGHT_LUNG.label], "lung labels"),
            (np.asarray(infection) > 0).astype(np.uint8),
        ]
        if layers[0].shape != layers[1].shape:
            raise ValueError(f"lung labels {layers[0].shape} and infection {layers[1].shape} differ in shape")
    originals = [np.asarray(like.to_original(layer), dtype=np.uint8) for layer in layers]  # (X, Y, Z) each
    directions, origin = lps_geometry(like.affine)

    header: dict[str, object] = {
        "space": "left-posterior-superior",
        "space origin": origin,
        "encoding": "gzip",
    }
    if len(originals) == 1:
        data = originals[0]
        header["space directions"] = directions
        header["kinds"] = ["domain", "domain", "domain"]
    else:
        # (L, X, Y, Z): the layer axis first, as Slicer writes it; built in Fortran order, the order pynrrd writes,
        # so that its tobytes is a plain copy (3x faster than from np.stack's C order on a full CT)
        data = np.empty((len(originals), *originals[0].shape), dtype=np.uint8, order="F")
        for k, layer in enumerate(originals):
            data[k] = layer
        header["space directions"] = np.vstack([np.full((1, 3), np.nan), directions])
        header["kinds"] = ["list", "domain", "domain", "domain"]
    header.update({
        "Segmentation_MasterRepresentation": "Binary labelmap",
        "Segmentation_SourceRepresentation": "Binary labelmap",
        "Segmentation_ContainedRepresentationNames": "Binary labelmap|",
        "Segmentation_ReferenceImageExtentOffset": "0 0 0",
    })
    for n, seg in enumerate(segments):
        extent = _extent(originals[seg.layer] == seg.label)
        header.update({
            f"Segment{n}_ID": seg.segment_id,
            f"Segment{n}_Name": seg.name,
            f"Segment{n}_NameAutoGenerated": "0",
            f"Segment{n}_Color": _fmt(seg.color),
            f"Segment{n}_ColorAutoGenerated": "0",
            f"Segment{n}_LabelValue": str(seg.label),
            f"Segment{n}_Layer": str(seg.layer),
            f"Segment{n}_Extent": " ".join(map(str, extent)),
            f"Segment{n}_Tags": f"Segmentation.Status:completed|{seg.terminology}|" if seg.terminology
            else "Segmentation.Status:completed|",
        })
    with atomic_path(path) as tmp:
        nrrd.write(str(tmp), data, header, compression_level=GZIP_LEVEL, index_order="F")
    return path
