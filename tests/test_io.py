"""CT input/output: canonical orientation, exact round trips, DICOM = NIfTI twin, and every bad input's error."""

from __future__ import annotations

import gzip
import logging
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from covidseg.errors import InputError
from covidseg.io.dicom import itk_to_ras_affine
from covidseg.io.image import label_values, read_image, read_mask, write_mask, write_volume
from covidseg.io.volume import MAX_VOXELS_ENV, make_ct_image
from dicom_series import write_dicom_series

SHAPE = (12, 10, 6)  # file grid (X, Y, Z), tiny on purpose


def oblique_affine(flip: bool = True) -> np.ndarray:
    """A rotated (about z and x), flipped, permuted, anisotropic RAS affine."""
    a, b = 0.3, 0.2
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    affine = np.eye(4)
    affine[:3, :3] = rz @ rx @ np.diag([-0.7 if flip else 0.7, 0.8, -2.5])
    affine[:3, 3] = [101.5, -20.25, 33.0]
    return affine


def ct_volume(shape=SHAPE, seed: int = 0) -> np.ndarray:
    """HU-like volume (air, tissue) with no symmetry, so any axis error shows."""
    rng = np.random.default_rng(seed)
    vol = rng.integers(-1024, 400, size=shape).astype(np.int16)
    return vol


def save_nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


# --------------------------------------------------------------------------------------------- orientation


def test_canonical_axes_from_ras_identity():
    """RAS identity: file x goes Right, y Anterior; canonical w goes Left, h Posterior, d Superior."""
    data = np.arange(np.prod(SHAPE), dtype=np.float32).reshape(SHAPE)
    ct = make_ct_image(data, np.diag([1.0, 2.0, 3.0, 1.0]), Path("x.nii"))
    X, Y, _ = SHAPE
    assert ct.shape == (SHAPE[2], SHAPE[1], SHAPE[0])
    assert ct.spacing == (3.0, 2.0, 1.0)
    for d, h, w in [(0, 0, 0), (1, 2, 3), (5, 9, 11)]:
        assert ct.array[d, h, w] == data[X - 1 - w, Y - 1 - h, d]


def test_canonical_axes_from_lps_identity_is_a_plain_transpose():
    data = np.arange(np.prod(SHAPE), dtype=np.float32).reshape(SHAPE)
    ct = make_ct_image(data, np.diag([-1.0, -1.0, 1.0, 1.0]), Path("x.nii"))
    np.testing.assert_array_equal(ct.array, data.transpose(2, 1, 0))


def test_canonical_affine_maps_canonical_indices_to_the_same_mm_as_the_file():
    data = np.arange(np.prod(SHAPE), dtype=np.float32).reshape(SHAPE)
    affine = oblique_affine()
    ct = make_ct_image(data, affine, Path("x.nii"))
    for idx in [(0, 0, 0), (1, 2, 3), (5, 9, 11), (3, 0, 7)]:
        file_idx = np.argwhere(data == ct.array[idx])[0]
        np.testing.assert_allclose(ct.canonical_affine @ [*idx, 1], affine @ [*file_idx, 1], atol=1e-9)
    # canonical axes point Superior (d), Posterior (h), Left (w) in RAS
    ca = ct.canonical_affine[:3, :3]
    assert ca[2, 0] > 0 and ca[1, 1] < 0 and ca[0, 2] < 0


@settings(max_examples=30, deadline=None)
@given(perm=st.permutations([0, 1, 2]), flips=st.tuples(*[st.sampled_from([-1.0, 1.0])] * 3),
       zooms=st.tuples(*[st.floats(0.3, 5.0)] * 3))
def test_to_original_inverts_from_original_for_every_axis_order(perm, flips, zooms):
    affine = np.eye(4)
    affine[:3, :3] = np.eye(3)[:, list(perm)] @ np.diag(np.array(flips) * np.array(zooms))
    data = np.arange(np.prod(SHAPE), dtype=np.float32).reshape(SHAPE)
    ct = make_ct_image(data, affine, Path("x.nii"))
    np.testing.assert_array_equal(ct.to_original(ct.array), data)
    np.testing.assert_array_equal(ct.from_original(data), ct.array)
    assert sorted(ct.spacing) == pytest.approx(sorted(zooms))
    probs = np.stack([ct.array, -ct.array])
    np.testing.assert_array_equal(ct.to_original(probs), np.stack([data, -data], axis=-1))


# --------------------------------------------------------------------------------------------- NIfTI


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
def test_nifti_round_trip_with_oblique_flipped_affine_is_exact(tmp_path, suffix):
    data = ct_volume()
    affine = oblique_affine()
    src = save_nifti(tmp_path / f"ct{suffix}", data, affine)
    source_img = nib.load(str(src))
    ct = read_image(src)
    assert ct.array.dtype == np.float32 and ct.array.flags.c_contiguous
    assert ct.original_shape == SHAPE
    np.testing.assert_array_equal(ct.affine, source_img.affine)

    mask = (ct.array > 0).astype(np.uint8) + (ct.array > 200)
    out = write_mask(mask, ct, tmp_path / f"mask{suffix}")
    written = nib.load(str(out))
    assert written.shape == SHAPE
    np.testing.assert_array_equal(written.affine, source_img.affine)  # exactly, not approximately
    assert written.get_data_dtype() == np.uint8
    for code in ("qform_code", "sform_code"):
        assert written.header[code] == source_img.header[code]
    np.testing.assert_array_equal(written.header.get_qform(), source_img.header.get_qform())
    np.testing.assert_array_equal(np.asarray(written.dataobj), (data > 0).astype(np.uint8) + (data > 200))
    np.testing.assert_array_equal(read_mask(out, like=ct, labels={0, 1, 2}), mask)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([src.name, out.name])  # no temporaries left


def test_write_volume_keeps_grid_and_puts_channels_last(tmp_path):
    ct = read_image(save_nifti(tmp_path / "ct.nii.gz", ct_volume(), oblique_affine()))
    probs = np.stack([ct.array / 1000, ct.array / 2000]).astype(np.float32)
    out = nib.load(str(write_volume(probs, ct, tmp_path / "p.nii.gz")))
    assert out.shape == (*SHAPE, 2)
    np.testing.assert_allclose(out.get_fdata()[..., 1], ct_volume() / 2000, rtol=1e-6)


def test_write_mask_refuses_to_overwrite_the_input(tmp_path):
    src = save_nifti(tmp_path / "ct.nii.gz", ct_volume(), np.eye(4))
    before = src.read_bytes()
    ct = read_image(src)
    with pytest.raises(InputError, match="overwrite the input"):
        write_mask(np.zeros(ct.shape, np.uint8), ct, src)
    assert src.read_bytes() == before


def test_dicom_derived_mask_gets_scanner_qform_and_sform(tmp_path):
    ct = make_ct_image(ct_volume(), oblique_affine(), tmp_path / "series", source="dicom")
    out = nib.load(str(write_mask(np.ones(ct.shape, np.uint8), ct, tmp_path / "m.nii.gz")))
    assert out.header["qform_code"] == 1 and out.header["sform_code"] == 1
    np.testing.assert_allclose(out.affine, oblique_affine(), atol=1e-4)
    np.testing.assert_allclose(out.header.get_qform(), oblique_affine(), atol=1e-4)  # Slicer reads the qform


def test_single_trailing_axis_is_squeezed(tmp_path):
    ct = read_image(save_nifti(tmp_path / "ct.nii.gz", ct_volume()[..., None], np.eye(4)))
    assert ct.original_shape == SHAPE


@pytest.mark.parametrize("slope, inter", [(None, None), (1.0, 0.0), (2.0, -1024.0), (0.5, 3.25)])
def test_stored_values_read_as_nibabel_scales_them(tmp_path, slope, inter):
    rng = np.random.default_rng(0)
    raw = rng.integers(-1024, 2000, size=(9, 8, 7)).astype(np.int16)
    img = nib.Nifti1Image(raw, np.eye(4))
    if slope is not None:
        img.header.set_slope_inter(slope, inter)
    path = tmp_path / "ct.nii.gz"
    nib.save(img, str(path))
    ref = nib.load(str(path)).get_fdata(dtype=np.float32)  # the reference: nibabel's own scaling
    ct = read_image(path)
    assert ct.array.dtype == np.float32
    np.testing.assert_array_equal(ct.to_original(ct.array), ref)


# --------------------------------------------------------------------------------------------- bad NIfTI


def test_truncated_nii_gz_names_the_file(tmp_path):
    src = save_nifti(tmp_path / "ct.nii.gz", ct_volume((40, 40, 20)), np.eye(4))
    raw = src.read_bytes()
    src.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(InputError, match=r"ct\.nii\.gz: .*truncated or corrupt"):
        read_image(src)


def test_truncated_uncompressed_nii(tmp_path):
    src = save_nifti(tmp_path / "ct.nii", ct_volume(), np.eye(4))
    src.write_bytes(src.read_bytes()[:1000])
    with pytest.raises(InputError, match=r"ct\.nii: "):
        read_image(src)


def test_garbage_file_is_not_a_nifti(tmp_path):
    bad = tmp_path / "ct.nii.gz"
    bad.write_bytes(gzip.compress(b"not a nifti at all" * 30))
    with pytest.raises(InputError, match=r"ct\.nii\.gz: not a readable NIfTI"):
        read_image(bad)


@pytest.mark.parametrize("shape, word", [((16, 16), "2D"), ((16, 16, 1), "2D"), ((8, 8, 8, 3), "4D")])
def test_2d_and_4d_images_are_refused(tmp_path, shape, word):
    src = save_nifti(tmp_path / "img.nii.gz", np.zeros(shape, np.int16), np.eye(4))
    with pytest.raises(InputError, match=word):
        read_image(src)


def test_missing_file_and_unsupported_suffix(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        read_image(tmp_path / "nope.nii.gz")
    (tmp_path / "x.dcm").write_bytes(b"\0")
    with pytest.raises(InputError, match="folder that holds the series"):
        read_image(tmp_path / "x.dcm")


def test_voxel_guard_acts_on_the_header_before_loading(tmp_path, monkeypatch):
    # a header claiming 4e9 voxels with no data behind it: the guard, not the truncation, must answer
    header = nib.Nifti1Header()
    header.set_data_shape((2000, 2000, 1000))
    header.set_data_dtype(np.int16)
    path = tmp_path / "huge.nii"
    path.write_bytes(header.binaryblock + b"\0" * 4)
    with pytest.raises(InputError, match=r"huge\.nii: .*voxels .*COVIDSEG_MAX_VOXELS"):
        read_image(path)
    small = save_nifti(tmp_path / "ct.nii.gz", ct_volume(), np.eye(4))
    monkeypatch.setenv(MAX_VOXELS_ENV, "100")
    with pytest.raises(InputError, match="more than the 100 allowed"):
        read_image(small)
    monkeypatch.setenv(MAX_VOXELS_ENV, "1e6")
    assert read_image(small).shape == (6, 10, 12)


# --------------------------------------------------------------------------------------------- masks


def test_mask_of_another_shape_or_grid_is_refused(tmp_path):
    ct = read_image(save_nifti(tmp_path / "ct.nii.gz", ct_volume(), oblique_affine()))
    other_shape = save_nifti(tmp_path / "a.nii.gz", np.zeros((12, 10, 5), np.uint8), oblique_affine())
    with pytest.raises(InputError, match=r"a\.nii\.gz: mask shape .* does not match the CT"):
        read_mask(other_shape, like=ct)
    shifted = oblique_affine()
    shifted[:3, 3] += [0, 0, 5.0]
    moved = save_nifti(tmp_path / "b.nii.gz", np.zeros(SHAPE, np.uint8), shifted)
    with pytest.raises(InputError, match=r"b\.nii\.gz: mask geometry .* differs"):
        read_mask(moved, like=ct)


def test_mask_stored_in_another_axis_order_on_the_same_grid_is_accepted(tmp_path):
    data = ct_volume()
    ct = read_image(save_nifti(tmp_path / "ct.nii.gz", data, np.diag([0.7, 0.8, 2.5, 1.0])))
    mask = (data > 0).astype(np.uint8)
    # the same voxels stored with x flipped, and the affine flipped to match
    flipped = np.diag([-0.7, 0.8, 2.5, 1.0])
    flipped[0, 3] = 0.7 * (SHAPE[0] - 1)
    path = save_nifti(tmp_path / "m.nii.gz", mask[::-1].copy(), flipped)
    np.testing.assert_array_equal(read_mask(path, like=ct), ct.from_original(mask).astype(np.uint8))


def test_mask_labels_outside_the_expected_set_and_fractional_values(tmp_path):
    mask = np.zeros(SHAPE, np.uint8)
    mask[2:4, 2:4, 2:4] = 5
    path = save_nifti(tmp_path / "m.nii.gz", mask, np.eye(4))
    with pytest.raises(InputError, match=r"unexpected label values \[5\]"):
        read_mask(path, labels={0, 1, 2})
    assert label_values(read_mask(path)) == [0, 5]
    frac = save_nifti(tmp_path / "f.nii.gz", np.full(SHAPE, 0.5, np.float32), np.eye(4))
    with pytest.raises(InputError, match="fractional"):
        read_mask(frac)
    float_labels = save_nifti(tmp_path / "g.nii.gz", mask.astype(np.float32), np.eye(4))
    assert label_values(read_mask(float_labels)) == [0, 5]


# --------------------------------------------------------------------------------------------- DICOM


def oblique_itk_geometry():
    # A non-identity direction: rotated about z and tilted (gantry-tilt-like rotation about x); orthonormal.
    a, b = 0.25, 0.15
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    return (-120.5, 80.25, -300.0), (0.75, 0.8, 2.0), tuple((rz @ rx).ravel())


def test_dicom_series_reads_like_its_nifti_twin(tmp_path):
    origin, spacing, direction = oblique_itk_geometry()
    volume = ct_volume((7, 10, 12), seed=3).astype(np.int16)  # (z, y, x) as SimpleITK arrays are
    write_dicom_series(tmp_path / "series", volume, origin, spacing, direction, "1.2.3.4.1")
    twin = sitk.GetImageFromArray(volume)
    twin.SetOrigin(origin)
    twin.SetSpacing(spacing)
    twin.SetDirection(direction)
    sitk.WriteImage(twin, str(tmp_path / "twin.nii.gz"))

    from_dicom = read_image(tmp_path / "series")
    from_nifti = read_image(tmp_path / "twin.nii.gz")
    assert from_dicom.source == "dicom"
    assert from_dicom.original_shape == from_nifti.original_shape == (12, 10, 7)
    np.testing.assert_array_equal(from_dicom.array, from_nifti.array)
    np.testing.assert_allclose(from_dicom.affine, from_nifti.affine, atol=1e-4)
    np.testing.assert_allclose(from_dicom.spacing, from_nifti.spacing, rtol=1e-5)
    np.testing.assert_allclose(from_dicom.affine, itk_to_ras_affine(origin, spacing, direction), atol=1e-6)
    # and a mask written for the DICOM input overlays the twin
    out = write_mask((from_dicom.array > 0).astype(np.uint8), from_dicom, tmp_path / "m.nii.gz")
    np.testing.assert_array_equal(read_mask(out, like=from_nifti), (from_nifti.array > 0).astype(np.uint8))


@pytest.mark.parametrize("patient, series, expected", [
    ("Pancreas-CT-CB_001", 201, "Pancreas-CT-CB_001_series201"),
    ("Doe^John (7)/ward", 3, "Doe_John_7_ward_series3"),  # unsafe characters become one _
    (None, 4, "DICOM_series4"),  # no PatientID: the folder's name stands in
    ("P9", None, "P9"),
    (None, None, "DICOM"),
])
def test_dicom_series_is_named_from_its_metadata(tmp_path, patient, series, expected):
    from covidseg.inference.cohort import case_id
    from covidseg.inference.inputs import case_name
    from covidseg.io.dicom import series_name

    folder = tmp_path / "DICOM"
    write_dicom_series(folder, ct_volume((3, 6, 6)), patient_id=patient, series_number=series)
    (folder / "README.txt").write_text("not a slice\n")  # sorted first: skipped, not fatal
    assert series_name(folder) == case_name(folder) == case_id(folder) == expected


def test_a_folder_without_dicom_files_is_named_after_the_folder(tmp_path):
    from covidseg.inference.inputs import case_name
    from covidseg.io.dicom import series_name

    folder = tmp_path / "scan one"
    folder.mkdir()
    (folder / "a.txt").write_text("text")
    assert series_name(folder) == "scan_one" and case_name(folder) == "scan_one"
    assert case_name(tmp_path / "case_7.nii.gz") == "case_7" and case_name(tmp_path / "x.NII") == "x"


def test_dicom_folder_with_two_series_takes_the_larger_and_says_so(tmp_path, caplog):
    origin, spacing, direction = oblique_itk_geometry()
    write_dicom_series(tmp_path / "s", ct_volume((6, 8, 8), 1), origin, spacing, direction, "1.2.3.4.7")
    write_dicom_series(tmp_path / "s", ct_volume((3, 8, 8), 2), origin, spacing, direction, "1.2.3.4.9")
    with caplog.at_level(logging.WARNING, logger="covidseg"):
        ct = read_image(tmp_path / "s")
    assert ct.shape[0] == 6
    assert "2 DICOM series; using 1.2.3.4.7 (6 slices)" in caplog.text


def test_dicom_missing_duplicated_and_uneven_slices(tmp_path):
    origin, spacing, direction = oblique_itk_geometry()
    files = write_dicom_series(tmp_path / "missing", ct_volume((8, 8, 8)), origin, spacing, direction, "1.2.3.5")
    files[4].unlink()
    with pytest.raises(InputError, match=r"missing: 1 missing slice\(s\) between 5_003\.dcm"):
        read_image(tmp_path / "missing")

    files = write_dicom_series(tmp_path / "dup", ct_volume((6, 8, 8)), origin, spacing, direction, "1.2.3.6")
    shutil.copy(files[2], tmp_path / "dup" / "copy_of_slice.dcm")
    with pytest.raises(InputError, match="duplicated slice"):
        read_image(tmp_path / "dup")

    uneven = [0.0, 2.0, 4.0, 7.1, 9.1, 11.1]
    write_dicom_series(tmp_path / "uneven", ct_volume((6, 8, 8)), origin, spacing, direction, "1.2.3.8",
                       positions_z=uneven)
    with pytest.raises(InputError, match="uneven slice spacing .*resample"):
        read_image(tmp_path / "uneven")


def test_empty_folder_single_slice_and_corrupt_dicom(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="empty"):
        read_image(tmp_path / "empty")
    origin, spacing, direction = oblique_itk_geometry()
    write_dicom_series(tmp_path / "one", ct_volume((1, 8, 8)), origin, spacing, direction, "1.2.3.9")
    with pytest.raises(InputError, match="single slice"):
        read_image(tmp_path / "one")
    files = write_dicom_series(tmp_path / "bad", ct_volume((5, 8, 8)), origin, spacing, direction, "1.2.3.10")
    files[2].write_bytes(files[2].read_bytes()[:200])
    with pytest.raises(InputError):
        read_image(tmp_path / "bad")


# --------------------------------------------------------------------------------------------- fuzz


@pytest.fixture(scope="module")
def valid_nifti(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("fuzz") / "ct.nii"
    save_nifti(path, ct_volume((8, 8, 4)), oblique_affine())
    return path.read_bytes()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_nifti_reader_only_ever_raises_input_error(valid_nifti, tmp_path, monkeypatch, data):
    monkeypatch.setenv(MAX_VOXELS_ENV, "1e6")  # a mutated header must not make the test allocate gigabytes
    raw = bytearray(valid_nifti)
    for _ in range(data.draw(st.integers(1, 8))):
        pos = data.draw(st.integers(0, len(raw) - 1))
        raw[pos] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(len(raw) // 3, len(raw)))
    path = tmp_path / "fuzz.nii"
    path.write_bytes(bytes(raw[:cut]))
    try:
        ct = read_image(path)
    except InputError as exc:
        assert "fuzz.nii" in str(exc)
    else:
        assert ct.array.ndim == 3


@pytest.fixture(scope="module")
def valid_dicom_slices(tmp_path_factory) -> list[bytes]:
    origin, spacing, direction = oblique_itk_geometry()
    files = write_dicom_series(tmp_path_factory.mktemp("dcm") / "s", ct_volume((3, 8, 8)), origin, spacing,
                               direction, "1.2.3.11")
    return [f.read_bytes() for f in files]


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_dicom_reader_only_ever_raises_input_error(valid_dicom_slices, tmp_path_factory, monkeypatch, data):
    monkeypatch.setenv(MAX_VOXELS_ENV, "1e6")
    folder = tmp_path_factory.mktemp("fz")
    victim = data.draw(st.integers(0, len(valid_dicom_slices) - 1))
    for k, blob in enumerate(valid_dicom_slices):
        raw = bytearray(blob)
        if k == victim:
            for _ in range(data.draw(st.integers(1, 6))):
                pos = data.draw(st.integers(128, len(raw) - 1))
                raw[pos] = data.draw(st.integers(0, 255))
            raw = raw[: data.draw(st.integers(len(raw) // 2, len(raw)))]
        (folder / f"{k}.dcm").write_bytes(bytes(raw))
    try:
        ct = read_image(folder)
    except InputError:
        pass
    else:
        assert ct.array.ndim == 3
