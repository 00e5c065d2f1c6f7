"""Synthetic chest-CT phantoms: determinism, geometry per style and scale, tissues, lesions, masks, files, CLI."""

from __future__ import annotations

from typing import Any

import nibabel as nib
import numpy as np
import pytest
from nibabel import orientations
from scipy import ndimage

from covidseg.phantom import Phantom, case_files, cohort_plan, file_affine, make_phantom, write_cohort
from covidseg.phantom.cohort import RADIOPAEDIA_IDS
from covidseg.phantom.core import CANONICAL_AXCODES
from covidseg.phantom.lesions import upsample_linear

SCALE = 0.25
LESION_SEED = 3  # a mild case at SCALE: GGO foci plus one pleural consolidation
CORONA_SEVERE_SEED = 1


@pytest.fixture(scope="module")
def corona() -> Phantom:
    return make_phantom("coronacases", LESION_SEED, scale=SCALE)


@pytest.fixture(scope="module")
def severe() -> Phantom:
    return make_phantom("coronacases", CORONA_SEVERE_SEED, scale=SCALE)


@pytest.fixture(scope="module")
def radio() -> Phantom:
    return make_phantom("radiopaedia", 2, scale=SCALE)


def test_same_seed_same_arrays_other_seed_differs() -> None:
    a = make_phantom("radiopaedia", 11, scale=0.125)
    b = make_phantom("radiopaedia", 11, scale=0.125)
    c = make_phantom("radiopaedia", 12, scale=0.125)
    assert np.array_equal(a.ct, b.ct) and np.array_equal(a.lungs, b.lungs)
    assert np.array_equal(a.infection, b.infection) and np.array_equal(a.affine, b.affine)
    assert a.ct.shape != c.ct.shape or not np.array_equal(a.ct, c.ct)


@pytest.mark.parametrize("scale", [0.125, 0.25])
def test_geometry_per_style_and_scale(scale: float, corona: Phantom, radio: Phantom) -> None:
    for style, size, pixel, slices, thick in (
        ("coronacases", 512, (0.6, 0.82), (200, 300), (0.8, 1.25)),
        ("radiopaedia", 630, (0.55, 0.7), (40, 110), (2.4, 8.0)),
    ):
        ph = (corona if style == "coronacases" else radio) if scale == SCALE else make_phantom(style, 2, scale)
        d, h, w = ph.ct.shape
        assert h == w == round(size * scale)
        assert max(16, round(slices[0] * scale)) <= d <= max(16, round(slices[1] * scale))
        dz, dy, dx = ph.spacing
        assert dy == dx and pixel[0] / scale * 0.99 <= dx <= pixel[1] / scale * 1.01
        if d > 16:
            assert thick[0] / scale * 0.99 <= dz <= thick[1] / scale * 1.01
        assert ph.lungs.shape == ph.infection.shape == ph.ct.shape
        assert ph.ct.dtype == np.float32 and ph.lungs.dtype == np.uint8


def test_anatomy_keeps_its_size_in_mm_across_scales() -> None:
    small = make_phantom("coronacases", 4, scale=0.125)
    large = make_phantom("coronacases", 4, scale=0.25)
    vol = [(p.lungs > 0).sum() * float(np.prod(p.spacing)) / 1000.0 for p in (small, large)]
    assert 1800.0 < vol[1] < 9000.0  # both lungs of an adult, mL
    assert vol[0] == pytest.approx(vol[1], rel=0.1)


def test_tissue_values(corona: Phantom) -> None:
    ct, lungs, inf = corona.ct, corona.lungs, corona.infection
    assert np.median(ct[:, :4, :4]) == pytest.approx(-1000.0, abs=30.0)  # air in the corner
    clean_lung = (lungs > 0) & (inf == 0) & ~ndimage.binary_dilation(inf > 0, iterations=2)
    assert -900.0 < np.median(ct[clean_lung]) < -760.0
    body = ct > -500.0
    vals = ct[body]
    assert (np.abs(vals + 100.0) < 30.0).mean() > 0.03  # fat
    assert (np.abs(vals - 45.0) < 30.0).mean() > 0.10  # muscle, heart, blood, liver
    assert (vals > 600.0).sum() > 50  # cortical bone of ribs, spine and sternum
    an = corona.anatomy
    assert an is not None
    k, i, j = corona.index_of((0.5 * (an.heart_z0 + an.heart_z1), an.heart_xy[1], an.heart_xy[0]))
    assert -20.0 < np.median(ct[k - 1:k + 2, i - 2:i + 3, j - 2:j + 3]) < 100.0  # heart
    assert ct.min() >= -1024.0 and ct.max() <= 3071.0


def test_lesion_types_and_pleural_consolidation(corona: Phantom, severe: Phantom) -> None:
    for ph in (corona, severe):
        assert ph.severity != "none" and ph.infection.any()
        kinds = {les.kind for les in ph.lesions}
        assert kinds == {"ggo", "consolidation"}
        hu = ndimage.uniform_filter(ph.ct, size=(1, 3, 3))[ph.infection > 0]
        assert ((hu > -700.0) & (hu < -300.0)).mean() > 0.1  # ground glass
        assert ((hu > -100.0) & (hu < 50.0)).mean() > 0.02  # consolidation
        # a dense infected voxel of the lung mask touches the chest wall (not air, not lung): the extraction trap
        dense = (ndimage.uniform_filter(ph.ct, size=(1, 3, 3)) > -150.0) & (ph.infection > 0)
        wall = (ph.lungs == 0) & (ph.ct > -500.0)
        touching = dense & ndimage.binary_dilation(wall, structure=ndimage.generate_binary_structure(3, 1))
        assert touching.sum() > 0
        assert any(les.kind == "consolidation" and les.subpleural for les in ph.lesions)


def test_masks_include_lesions_and_exclude_trachea(corona: Phantom) -> None:
    assert set(np.unique(corona.lungs)) <= {0, 1, 2} and set(np.unique(corona.infection)) <= {0, 1}
    assert not ((corona.infection > 0) & (corona.lungs == 0)).any()
    dense_in_lung = (corona.lungs > 0) & (ndimage.uniform_filter(corona.ct, size=(1, 3, 3)) > -150.0)
    assert dense_in_lung.sum() > 20  # consolidations are lung in the mask
    an = corona.anatomy
    assert an is not None
    k, i, j = corona.index_of((an.z_carina + 25.0, an.trachea_y, an.x_mid))
    assert corona.lungs[k, i, j] == 0 and corona.ct[k, i - 1:i + 2, j - 1:j + 2].mean() < -850.0


def test_left_lung_is_label_1_at_higher_columns(corona: Phantom, radio: Phantom) -> None:
    for ph in (corona, radio):
        cols = np.arange(ph.lungs.shape[2])[None, None, :]
        left = np.broadcast_to(cols, ph.lungs.shape)[ph.lungs == 1]
        right = np.broadcast_to(cols, ph.lungs.shape)[ph.lungs == 2]
        assert left.size and right.size and right.max() < left.min()
        # the heart bulges into the left lung: it is the smaller one
        assert (ph.lungs == 1).sum() < (ph.lungs == 2).sum() * 1.05


def test_affine_encodes_the_canonical_orientation() -> None:
    for codes in (("L", "P", "S"), ("R", "A", "S"), ("A", "R", "I")):
        aff = file_affine((10, 20, 30), (3.0, 0.7, 0.7), codes, (0.0, 0.0, 0.0))
        assert orientations.aff2axcodes(aff) == codes
    aff = file_affine((10, 20, 30), (3.0, 0.7, 0.7), ("L", "P", "S"), (0.0, 0.0, 0.0))
    assert np.allclose(np.diag(aff)[:3], [-0.7, -0.7, 3.0])


def _to_canonical(img: Any) -> np.ndarray:
    ornt = orientations.ornt_transform(orientations.io_orientation(img.affine),
                                       orientations.axcodes2ornt(CANONICAL_AXCODES))
    return orientations.apply_orientation(np.asarray(img.dataobj), ornt)


def test_written_files_round_trip(tmp_path, radio: Phantom) -> None:
    files = write_cohort(tmp_path, 2, seed=5, style="mixed", scale=0.125, progress=False)
    corona_files, radio_files = files
    ct: Any = nib.load(corona_files.ct)
    assert ct.get_data_dtype() == np.int16 and orientations.aff2axcodes(ct.affine) == ("L", "P", "S")
    rad: Any = nib.load(radio_files.ct)
    assert rad.get_data_dtype() == np.uint8 and orientations.aff2axcodes(rad.affine) == ("R", "A", "S")
    data = np.asarray(rad.dataobj)
    assert data.min() >= 0 and data.max() <= 255 and data.max() > 200
    # reorienting the files gives back the phantom's canonical arrays
    from covidseg.phantom import case_seed

    ph = make_phantom("radiopaedia", case_seed(5, 1), scale=0.125)
    assert np.array_equal(_to_canonical(rad), np.asarray(_to_canonical(nib.Nifti1Image(ph.stored_ct(), ph.affine))))
    lungs = _to_canonical(nib.load(radio_files.lung))
    assert np.array_equal(lungs, ph.lungs)
    joint = _to_canonical(nib.load(radio_files.lung_and_infection))
    assert set(np.unique(joint)) <= {0, 1, 2, 3}
    assert np.array_equal(joint == 3, ph.infection > 0)
    for path in corona_files.all():
        img: Any = nib.load(path)
        assert img.shape == ct.shape and np.array_equal(img.affine, ct.affine)


def test_zenodo_file_names(tmp_path) -> None:
    plan = cohort_plan(tmp_path, 23, "radiopaedia")
    assert [f.case_id for f in plan[:10]] == [f"radiopaedia_{i}" for i in RADIOPAEDIA_IDS]
    first = plan[0]
    assert first.ct == tmp_path / "COVID-19-CT-Seg_20cases" / "radiopaedia_org_covid-19-pneumonia-4_85506_1-dcm.nii.gz"
    assert first.lung == tmp_path / "Lung_Mask" / "radiopaedia_4_85506_1.nii.gz"
    assert first.infection == tmp_path / "Infection_Mask" / "radiopaedia_4_85506_1.nii.gz"
    assert first.lung_and_infection == tmp_path / "Lung_and_Infection_Mask" / "radiopaedia_4_85506_1.nii.gz"
    assert len({f.case_id for f in plan}) == 23
    for f in plan[10:]:
        assert f.ct.name == f"radiopaedia_org_covid-19-pneumonia-{f.case_id[len('radiopaedia_'):]}-dcm.nii.gz"
    c = case_files(tmp_path, "coronacases", 0)
    assert c.ct.name == "coronacases_org_001.nii.gz" and c.lung.name == "coronacases_001.nii.gz"
    mixed = [f.case_id for f in cohort_plan(tmp_path, 4, "mixed")]
    assert mixed == ["coronacases_001", "radiopaedia_4_85506_1", "coronacases_002", "radiopaedia_7_85703_0"]


def test_cli_writes_refuses_overwrite_and_forces(tmp_path, capsys) -> None:
    from covidseg.cli.main import run

    out = tmp_path / "cohort"
    argv = ["phantom", str(out), "--cases", "1", "--seed", "0", "--style", "coronacases", "--scale", "0.125",
            "--quiet"]
    with pytest.raises(SystemExit) as exc:
        run(argv)
    assert exc.value.code == 0
    assert (out / "COVID-19-CT-Seg_20cases" / "coronacases_org_001.nii.gz").is_file()
    before = (out / "Lung_Mask" / "coronacases_001.nii.gz").stat().st_mtime_ns
    with pytest.raises(SystemExit) as exc:
        run(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "already exists" in err and "--force" in err and "Traceback" not in err
    assert (out / "Lung_Mask" / "coronacases_001.nii.gz").stat().st_mtime_ns == before
    with pytest.raises(SystemExit) as exc:
        run([*argv, "--force"])
    assert exc.value.code == 0
    assert not list(out.rglob("*.part*"))
    with pytest.raises(SystemExit) as exc:
        run(["phantom", str(tmp_path / "x"), "--style", "other"])
    assert exc.value.code == 2


def test_fast_upsampling_matches_scipy_zoom() -> None:
    rng = np.random.default_rng(0)
    coarse = rng.standard_normal((5, 5, 5)).astype(np.float32)
    shape = (17, 40, 23)
    ref = ndimage.zoom(coarse, [s / 5 for s in shape], order=1, mode="nearest", grid_mode=True)
    assert ref.shape == shape
    assert np.allclose(upsample_linear(coarse, shape), ref, atol=1e-4)


def test_too_few_slices_for_the_lungs_is_a_clear_error() -> None:
    """``slices`` sets a thin-slice phantom's extent: 16 slices of at most 1.25 mm cannot hold a chest."""
    from covidseg.errors import UserError

    with pytest.raises(UserError, match="too short for the lungs; ask for at least"):
        make_phantom("coronacases", 0, scale=0.25, slices=16)
