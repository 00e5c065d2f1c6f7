"""Writing small CT series as DICOM for the tests (SimpleITK's ImageFileWriter, as in the SimpleITK DICOM example)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import SimpleITK as sitk

IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def write_dicom_series(folder: Path, volume_zyx: np.ndarray, origin=(0.0, 0.0, 0.0), spacing=(1.0, 1.0, 2.0),
                       direction=IDENTITY, series_uid: str = "1.2.826.0.1.3680043.2.1125.77",
                       positions_z: list[float] | None = None, intercept: float = 0.0, drop: int | None = None,
                       duplicate: int | None = None, patient_id: str | None = None,
                       series_number: int | None = None,
                       frame_uid: str | None = "1.2.826.0.1.3680043.2.1125.99") -> list[Path]:
    """Write ``volume_zyx`` (stored values; HU = value + ``intercept``) slice by slice into ``folder``.

    ``positions_z`` puts slice ``k`` at that distance (mm) from ``origin`` along the slice normal (uneven spacing);
    ``drop`` leaves slice ``drop`` out (a missing slice); ``duplicate`` writes slice ``duplicate`` twice;
    ``patient_id`` and ``series_number`` set PatientID and SeriesNumber; ``frame_uid`` the Frame of Reference
    UID (``None``: none, as an incomplete export).
    Returns the written files in slice order.
    """
    folder.mkdir(parents=True, exist_ok=True)
    image = sitk.GetImageFromArray(np.asarray(volume_zyx).astype(np.int16))
    image.SetOrigin(origin)
    image.SetSpacing(spacing)
    image.SetDirection(direction)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    d = np.asarray(direction).reshape(3, 3)
    orientation = "\\".join(f"{v:.10f}" for v in (*d[:, 0], *d[:, 1]))
    paths = []
    for k in range(volume_zyx.shape[0]):
        if k == drop:
            continue
        sl = image[:, :, k]
        position = image.TransformIndexToPhysicalPoint((0, 0, k))
        if positions_z is not None:
            position = tuple(np.asarray(origin) + d[:, 2] * positions_z[k])
        tags = {
            "0008|0060": "CT", "0020|000d": "1.2.826.0.1.3680043.2.1125.1", "0020|000e": series_uid,
            "0020|0037": orientation, "0020|0032": "\\".join(f"{v:.10f}" for v in position),
            "0020|0013": str(k + 1), "0008|0018": f"{series_uid}.{k + 1}", "0008|0016": "1.2.840.10008.5.1.4.1.1.2",
            "0028|1052": f"{intercept:g}", "0028|1053": "1", "0028|1054": "HU",
        }
        if frame_uid is not None:
            tags["0020|0052"] = frame_uid
        if patient_id is not None:
            tags["0010|0020"] = patient_id
        if series_number is not None:
            tags["0020|0011"] = str(series_number)
        for key, value in tags.items():
            sl.SetMetaData(key, value)
        copies = 2 if k == duplicate else 1
        for c in range(copies):
            path = folder / f"{series_uid.split('.')[-1]}_{k:03d}{'_copy' if c else ''}.dcm"
            writer.SetFileName(str(path))
            writer.Execute(sl)
            paths.append(path)
    return paths


def dciodvfy_clean(iod: str, path: Path) -> None:
    """dciodvfy (dicom3tools) finds no error in ``path`` and recognises it as ``iod`` (its name for the IOD, e.g.
    ``Segmentation``, ``RTStructureSet``); skipped where dicom3tools is not installed."""
    import pytest

    tool = shutil.which("dciodvfy")
    if tool is None:
        pytest.skip("dciodvfy not installed (Debian: apt-get install dicom3tools)")
    result = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=120)
    lines = (result.stdout + result.stderr).splitlines()
    errors = [ln for ln in lines if ln.startswith("Error")]
    assert not errors, "\n".join(errors)
    assert iod in lines
