"""3D Slicer ``.seg.nrrd``: labels, segment fields, and geometry identical to the CT's (read back with pynrrd
and, independently, with SimpleITK, the ITK reader 3D Slicer itself uses)."""

from __future__ import annotations

import nibabel as nib
import nrrd
import numpy as np
import pytest
import SimpleITK as sitk

from covidseg.errors import InputError
from covidseg.io.image import read_image
from covidseg.io.slicer import RAS_TO_LPS, write_slicer_segmentation

SHAPE = (20, 24, 12)  # file voxel grid (i, j, k)

AFFINES = {
    # the usual radiological NIfTI: x flipped (LAS-like), thick slices, offset origin
    "flipped": np.array([[-0.7, 0.0, 0.0, 120.0], [0.0, 0.8, 0.0, -60.5], [0.0, 0.0, 2.5, -300.0], [0, 0, 0, 1]]),
    # axes permuted (file axis 0 runs along z) and a small in-plane rotation
    "permuted-oblique": np.array([
        [0.0, 0.8 * np.cos(0.1), -0.75 * np.sin(0.1), 10.0],
        [0.0, 0.8 * np.sin(0.1), 0.75 * np.cos(0.1), -20.0],
        [-2.0, 0.0, 0.0, 35.0],
        [0, 0, 0, 1],
    ]),
}


def make_ct(tmp_path, affine):
    path = tmp_path / "ct.nii.gz"
    data = np.random.default_rng(0).integers(-1000, 200, SHAPE).astype(np.int16)
    nib.save(nib.Nifti1Image(data, affine), path)
    return read_image(path), path


def joint_labels(shape):
    labels = np.zeros(shape, np.uint8)  # canonical (D, H, W)
    labels[2:6, 3:12, 2:5] = 1
    labels[7:10, 5:9, 7:11] = 2
    labels[3:5, 4:7, 3:4] = 3
    return labels


def header_of(path):
    return nrrd.read_header(str(path))


@pytest.mark.parametrize("name", list(AFFINES))
def test_single_layer_labels_segments_and_geometry(tmp_path, name):
    ct, nifti = make_ct(tmp_path, AFFINES[name])
    labels = joint_labels(ct.shape)
    path = write_slicer_segmentation(labels, ct, tmp_path / "out" / "segmentation.seg.nrrd")
    data, header = nrrd.read(str(path))

    # labels: the CT file's own voxel order
    assert data.dtype == np.uint8 and data.shape == SHAPE
    np.testing.assert_array_equal(data, ct.to_original(labels))
    assert header["space"] == "left-posterior-superior" and header["kinds"] == ["domain"] * 3

    # geometry: NRRD (LPS) vs the NIfTI affine (RAS): every voxel lands on the same point
    affine = nib.load(str(nifti)).affine
    np.testing.assert_allclose(header["space directions"], (RAS_TO_LPS @ affine[:3, :3]).T, atol=1e-5)
    np.testing.assert_allclose(header["space origin"], RAS_TO_LPS @ affine[:3, 3], atol=1e-4)
    ijk = np.array([3.0, 7.0, 5.0])
    lps_point = header["space origin"] + ijk @ header["space directions"]
    ras_point = (affine @ np.r_[ijk, 1.0])[:3]
    np.testing.assert_allclose(RAS_TO_LPS @ lps_point, ras_point, atol=1e-4)

    # the same geometry as ITK (3D Slicer's reader) sees for the CT itself
    seg_itk, ct_itk = sitk.ReadImage(str(path)), sitk.ReadImage(str(nifti))
    np.testing.assert_allclose(seg_itk.GetOrigin(), ct_itk.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(seg_itk.GetSpacing(), ct_itk.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(seg_itk.GetDirection(), ct_itk.GetDirection(), atol=1e-5)
    assert seg_itk.GetSize() == ct_itk.GetSize()

    # segment fields as 3D Slicer writes them
    names = [header[f"Segment{n}_Name"] for n in range(3)]
    assert names == ["left lung", "right lung", "infection"]
    assert [header[f"Segment{n}_LabelValue"] for n in range(3)] == ["1", "2", "3"]
    assert {header[f"Segment{n}_Layer"] for n in range(3)} == {"0"}
    assert "Segment3_Name" not in header
    for n in range(3):
        rgb = [float(v) for v in header[f"Segment{n}_Color"].split()]
        assert len(rgb) == 3 and all(0.0 <= v <= 1.0 for v in rgb)
        hit = np.argwhere(data == n + 1)
        expected = " ".join(f"{lo} {hi}" for lo, hi in zip(hit.min(0), hit.max(0), strict=True))
        assert header[f"Segment{n}_Extent"] == expected
    colors = {header[f"Segment{n}_Color"] for n in range(3)}
    assert len(colors) == 3, "each segment has its own colour"
    assert "SCT^39607008^Lung" in header["Segment0_Tags"] and "Left" in header["Segment0_Tags"]
    assert header["Segmentation_MasterRepresentation"] == "Binary labelmap"
    assert header["Segmentation_ReferenceImageExtentOffset"] == "0 0 0"


def test_custom_fields_use_the_key_value_syntax_slicer_reads(tmp_path):
    ct, _ = make_ct(tmp_path, AFFINES["flipped"])
    path = write_slicer_segmentation(joint_labels(ct.shape), ct, tmp_path / "s.seg.nrrd")
    text = path.read_bytes().split(b"\n\n", 1)[0].decode("ascii")
    assert "Segment0_Name:=left lung" in text and "Segment2_LabelValue:=3" in text
    assert "space: left-posterior-superior" in text


def test_two_layers_keep_infection_inside_the_lung_segments(tmp_path):
    ct, _ = make_ct(tmp_path, AFFINES["permuted-oblique"])
    joint = joint_labels(ct.shape)
    lungs = np.where(joint == 3, 1, joint).astype(np.uint8)  # the infected voxels are left lung
    infection = joint == 3
    path = write_slicer_segmentation(lungs, ct, tmp_path / "layers.seg.nrrd", infection=infection)
    data, header = nrrd.read(str(path))
    assert data.shape == (2, *SHAPE) and header["kinds"] == ["list", "domain", "domain", "domain"]
    assert np.isnan(header["space directions"][0]).all()
    np.testing.assert_array_equal(data[0], ct.to_original(lungs))
    np.testing.assert_array_equal(data[1], ct.to_original(infection.astype(np.uint8)))
    assert np.logical_and(data[0] == 1, data[1] == 1).any(), "overlap kept: infection stays part of the lung"
    assert header["Segment2_Name"] == "infection"
    assert (header["Segment2_Layer"], header["Segment2_LabelValue"]) == ("1", "1")
    assert (header["Segment0_Layer"], header["Segment0_LabelValue"]) == ("0", "1")


def test_empty_segment_gets_slicers_empty_extent(tmp_path):
    ct, _ = make_ct(tmp_path, AFFINES["flipped"])
    labels = joint_labels(ct.shape)
    labels[labels == 3] = 0
    header = header_of(write_slicer_segmentation(labels, ct, tmp_path / "e.seg.nrrd"))
    assert header["Segment2_Extent"] == "0 -1 0 -1 0 -1"


def test_bad_requests(tmp_path):
    ct, _ = make_ct(tmp_path, AFFINES["flipped"])
    labels = joint_labels(ct.shape)
    with pytest.raises(InputError, match=r"\.seg\.nrrd"):
        write_slicer_segmentation(labels, ct, tmp_path / "seg.nii.gz")
    bad = labels.copy()
    bad[0, 0, 0] = 7
    with pytest.raises(ValueError, match=r"labels \[7\]"):
        write_slicer_segmentation(bad, ct, tmp_path / "b.seg.nrrd")
    with pytest.raises(ValueError):
        write_slicer_segmentation(labels[:-1], ct, tmp_path / "c.seg.nrrd")
    with pytest.raises(ValueError, match="lung labels"):
        write_slicer_segmentation(labels, ct, tmp_path / "d.seg.nrrd", infection=labels == 3)
    assert not list(tmp_path.glob("*.seg.nrrd")) and not list(tmp_path.glob(".*part*"))
