"""Dataset layouts (Zenodo, Kaggle, nnU-Net), case ids, and `covidseg data check` on tiny cohorts made here."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from covidseg.cli.main import run as cli
from covidseg.data.check import check_dataset
from covidseg.data.layouts import REAL_CASE_IDS, canonical_case_id, find_cases, scan_dataset, source_of
from covidseg.errors import InputError

SHAPE = (16, 12, 6)  # file grid (X, Y, Z)
SPACING = (0.8, 0.8, 2.5)
VOXEL_ML = 0.8 * 0.8 * 2.5 / 1000


def tiny_case(seed: int, windowed: bool) -> dict[str, np.ndarray]:
    """CT (HU with air, or windowed 0..255) and its masks: left lung 1, right lung 2, infection."""
    rng = np.random.default_rng(seed)
    hu = rng.uniform(-50, 60, size=SHAPE).astype(np.float32)
    hu[:, :2] = -1024
    lung = np.zeros(SHAPE, np.uint8)
    lung[2:7, 3:9, 1:5] = 1
    lung[9:14, 3:9, 1:5] = 2
    hu[lung > 0] = -850
    infection = np.zeros(SHAPE, np.uint8)
    infection[3:5, 4:6, 2:4] = 1
    hu[infection > 0] = -500
    joint = lung.copy()
    joint[infection > 0] = 3
    ct = np.round((np.clip(hu, -1250, 250) + 1250) / 1500 * 255).astype(np.uint8) if windowed \
        else hu.astype(np.int16)
    return {"ct": ct, "lung": lung, "infection": infection, "joint": joint}


def save(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.diag([*SPACING, 1.0]) if affine is None else affine), str(path))
    return path


ZENODO_NAMES = {
    "coronacases_001": "coronacases_org_001",
    "radiopaedia_10_85902_1": "radiopaedia_org_covid-19-pneumonia-10_85902_1-dcm",
}


def make_zenodo(root: Path, ids=("coronacases_001", "radiopaedia_10_85902_1")) -> dict[str, dict]:
    cases = {}
    for i, cid in enumerate(ids):
        case = tiny_case(i, windowed=cid.startswith("radiopaedia"))
        save(root / "COVID-19-CT-Seg_20cases" / f"{ZENODO_NAMES.get(cid, cid)}.nii.gz", case["ct"])
        save(root / "Lung_Mask" / f"{cid}.nii.gz", case["lung"])
        save(root / "Infection_Mask" / f"{cid}.nii.gz", case["infection"])
        save(root / "Lung_and_Infection_Mask" / f"{cid}.nii.gz", case["joint"])
        cases[cid] = case
    return cases


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        cli(argv)
    out, err = capsys.readouterr()
    return int(exc.value.code or 0), out, err


# --------------------------------------------------------------------------------------------- case ids


@pytest.mark.parametrize("name, expected", [
    ("coronacases_org_001.nii.gz", "coronacases_001"),
    ("coronacases_001.nii.gz", "coronacases_001"),
    ("coronacases_org_case007.nii", "coronacases_007"),
    ("coronacases_org_case010.nii", "coronacases_010"),
    ("case009.nii", "coronacases_009"),
    ("radiopaedia_org_covid-19-pneumonia-10_85902_1-dcm.nii.gz", "radiopaedia_10_85902_1"),
    ("radiopaedia_org_covid-19-pneumonia-4_85506_1-dcm.nii", "radiopaedia_4_85506_1"),
    ("radiopaedia_10_85902_1.nii.gz", "radiopaedia_10_85902_1"),
    ("coronacases_001_0000.nii.gz", "coronacases_001"),
    ("patient_17.nii.gz", "patient_17"),
])
def test_canonical_case_ids(name, expected):
    assert canonical_case_id(name) == expected


def test_real_ids_and_sources():
    assert len(REAL_CASE_IDS) == 20 == len(set(REAL_CASE_IDS))
    assert [source_of(c) for c in REAL_CASE_IDS].count("coronacases") == 10
    assert source_of("patient_17") == "other"


# --------------------------------------------------------------------------------------------- layouts


def test_zenodo_layout_pairs_by_case_id(tmp_path):
    make_zenodo(tmp_path)
    cases = find_cases(tmp_path)
    assert [c.case_id for c in cases] == ["coronacases_001", "radiopaedia_10_85902_1"]
    rad = cases[1]
    assert rad.source == "radiopaedia" and rad.layout == "zenodo"
    assert rad.ct.name == "radiopaedia_org_covid-19-pneumonia-10_85902_1-dcm.nii.gz"
    assert rad.lung == tmp_path / "Lung_Mask" / "radiopaedia_10_85902_1.nii.gz"
    assert rad.infection.parent.name == "Infection_Mask"
    assert rad.lung_and_infection.parent.name == "Lung_and_Infection_Mask"


def test_dataset_one_level_down_is_found(tmp_path):
    make_zenodo(tmp_path / "covid")
    assert scan_dataset(tmp_path).root == tmp_path / "covid"


def test_kaggle_layout_with_metadata_and_odd_names(tmp_path):
    names = {"coronacases_007": "coronacases_org_case007", "coronacases_009": "case009",
             "radiopaedia_10_85902_1": "radiopaedia_org_covid-19-pneumonia-10_85902_1-dcm"}
    rows = []
    for i, (cid, ct_name) in enumerate(names.items()):
        case = tiny_case(i, windowed=cid.startswith("radiopaedia"))
        save(tmp_path / "ct_scans" / f"{ct_name}.nii", case["ct"])
        save(tmp_path / "lung_mask" / f"{cid}.nii", case["lung"])
        save(tmp_path / "infection_mask" / f"{cid}.nii", case["infection"])
        save(tmp_path / "lung_and_infection_mask" / f"{cid}.nii", case["joint"])
        kaggle = "../input/covid19-ct-scans"
        rows.append({"ct_scan": f"{kaggle}/ct_scans/{ct_name}.nii", "lung_mask": f"{kaggle}/lung_mask/{cid}.nii",
                     "infection_mask": f"{kaggle}/infection_mask/{cid}.nii",
                     "lung_and_infection_mask": f"{kaggle}/lung_and_infection_mask/{cid}.nii"})
    with open(tmp_path / "metadata.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    dataset = scan_dataset(tmp_path)
    assert dataset.layout == "kaggle" and not dataset.problems
    assert [c.case_id for c in dataset.cases] == ["coronacases_007", "coronacases_009", "radiopaedia_10_85902_1"]
    assert dataset.cases[1].ct.name == "case009.nii"
    assert dataset.cases[1].lung.name == "coronacases_009.nii"
    report = check_dataset(tmp_path, progress=False)
    assert report.ok, report.all_problems()
    assert [c.convention for c in report.cases] == ["hu", "hu", "windowed"]


def test_kaggle_metadata_naming_a_missing_file_is_a_problem(tmp_path):
    case = tiny_case(0, windowed=False)
    save(tmp_path / "ct_scans" / "coronacases_org_001.nii", case["ct"])
    (tmp_path / "metadata.csv").write_text(
        "ct_scan,lung_mask,infection_mask,lung_and_infection_mask\n"
        "x/ct_scans/coronacases_org_001.nii,x/lung_mask/coronacases_001.nii,,\n")
    dataset = scan_dataset(tmp_path)
    assert any("coronacases_001.nii" in str(p) and "not found" in p.message for p in dataset.problems)


def test_nnunet_layout_reads_label_kind_from_dataset_json(tmp_path):
    for i, cid in enumerate(["coronacases_001", "radiopaedia_10_85902_1"]):
        case = tiny_case(i, windowed=cid.startswith("radiopaedia"))
        save(tmp_path / "imagesTr" / f"{cid}_0000.nii.gz", case["ct"])
        save(tmp_path / "labelsTr" / f"{cid}.nii.gz", case["joint"])
    (tmp_path / "dataset.json").write_text(json.dumps(
        {"labels": {"background": 0, "left lung": 1, "right lung": 2, "infection": 3}}))
    dataset = scan_dataset(tmp_path)
    assert dataset.layout == "nnunet" and dataset.mask_kinds == ("lung_and_infection",)
    assert dataset.cases[0].lung_and_infection.name == "coronacases_001.nii.gz"
    report = check_dataset(tmp_path, progress=False)
    assert report.ok, report.all_problems()
    c = report.cases[0]
    assert c.labels == {"lung_and_infection": [0, 1, 2, 3]}
    joint = tiny_case(0, False)["joint"]
    assert c.infection_ml == pytest.approx(round((joint == 3).sum() * VOXEL_ML, 1))


@pytest.mark.parametrize("make", [lambda p: None, lambda p: (p / "notes.txt").write_text("hello")])
def test_empty_or_unrecognised_folder(tmp_path, make, capsys):
    make(tmp_path)
    with pytest.raises(InputError, match="Zenodo layout"):
        find_cases(tmp_path)
    code, _, err = run_cli(["data", "check", str(tmp_path)], capsys)
    assert code == 2 and "Traceback" not in err
    assert err.startswith(f"covidseg: error: {tmp_path}") and err.count("\n") == 1


# --------------------------------------------------------------------------------------------- check


def test_check_reports_shapes_conventions_labels_and_volumes(tmp_path, capsys):
    cases = make_zenodo(tmp_path)
    report = check_dataset(tmp_path, progress=False)
    assert report.ok and report.layout == "zenodo"
    cor, rad = report.cases
    assert cor.convention == "hu" and rad.convention == "windowed"
    assert cor.shape == (SHAPE[2], SHAPE[1], SHAPE[0])
    assert cor.spacing == pytest.approx((2.5, 0.8, 0.8))
    assert cor.labels == {"lung": [0, 1, 2], "infection": [0, 1], "lung_and_infection": [0, 1, 2, 3]}
    lung = cases["coronacases_001"]["lung"]
    assert cor.left_lung_ml == pytest.approx(round((lung == 1).sum() * VOXEL_ML, 1))
    assert cor.right_lung_ml == pytest.approx(round((lung == 2).sum() * VOXEL_ML, 1))
    assert cor.infection_ml == pytest.approx(round(cases["coronacases_001"]["infection"].sum() * VOXEL_ML, 1))

    code, out, err = run_cli(["data", "check", str(tmp_path), "--json", str(tmp_path / "check.json")], capsys)
    assert code == 0, err
    assert "coronacases_001" in out and "radiopaedia_10_85902_1" in out and "windowed" in out
    assert "all cases ok" in out
    saved = json.loads((tmp_path / "check.json").read_text(encoding="utf-8"))
    assert saved["ok"] and saved["cases"][1]["convention"] == "windowed"


def test_check_names_the_file_and_the_problem(tmp_path, capsys):
    make_zenodo(tmp_path, ids=("coronacases_001", "coronacases_002", "radiopaedia_10_85902_1"))
    # 1: a lung mask of another shape; 2: an infection mask with label 7 and a missing joint mask;
    # radiopaedia: a truncated CT; plus a mask without CT
    save(tmp_path / "Lung_Mask" / "coronacases_001.nii.gz", np.zeros((16, 12, 5), np.uint8))
    bad = np.zeros(SHAPE, np.uint8)
    bad[1, 1, 1] = 7
    save(tmp_path / "Infection_Mask" / "coronacases_002.nii.gz", bad)
    (tmp_path / "Lung_and_Infection_Mask" / "coronacases_002.nii.gz").unlink()
    ct = tmp_path / "COVID-19-CT-Seg_20cases" / "radiopaedia_org_covid-19-pneumonia-10_85902_1-dcm.nii.gz"
    ct.write_bytes(ct.read_bytes()[:300])
    save(tmp_path / "Lung_Mask" / "coronacases_099.nii.gz", np.zeros(SHAPE, np.uint8))

    report = check_dataset(tmp_path, progress=False)
    assert not report.ok
    text = "\n".join(str(p) for p in report.all_problems())
    assert "Lung_Mask/coronacases_001.nii.gz: mask shape" in text
    assert "Infection_Mask/coronacases_002.nii.gz: unexpected label values [7]" in text
    assert "no lung_and_infection mask for case coronacases_002" in text
    assert "radiopaedia_org_covid-19-pneumonia-10_85902_1-dcm.nii.gz: " in text
    assert "Lung_Mask/coronacases_099.nii.gz: lung mask of case coronacases_099 has no CT" in text

    code, out, err = run_cli(["data", "check", str(tmp_path), "--no-progress"], capsys)
    assert code == 2 and "Traceback" not in out + err
    assert "5 problem(s)" in out


def test_check_with_forced_convention(tmp_path):
    make_zenodo(tmp_path, ids=("radiopaedia_10_85902_1",))
    from covidseg.config import IntensityConfig

    report = check_dataset(tmp_path, IntensityConfig(convention="hu"), progress=False)
    assert report.cases[0].convention == "hu"


def test_cli_split_prints_and_writes_json(tmp_path, capsys):
    make_zenodo(tmp_path, ids=("coronacases_001", "coronacases_002", "radiopaedia_10_85902_1"))
    code, out, _ = run_cli(["data", "split", str(tmp_path), "--split", "report", "--json",
                            str(tmp_path / "s.json")], capsys)
    assert code == 0
    split = json.loads(out)
    assert json.loads((tmp_path / "s.json").read_text(encoding="utf-8")) == split
    assert sorted(split["train"] + split["val"] + split["test"]) == \
        ["coronacases_001", "coronacases_002", "radiopaedia_10_85902_1"]
    code, _, err = run_cli(["data", "split", str(tmp_path), "--split", "fold-9"], capsys)
    assert code == 2 and "not one of" in err and "Traceback" not in err
