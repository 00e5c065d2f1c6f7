"""A cohort of phantoms written in exactly the Zenodo layout of the real dataset (docs/method.md).

::

    OUT_DIR/COVID-19-CT-Seg_20cases/coronacases_org_001.nii.gz
    OUT_DIR/COVID-19-CT-Seg_20cases/radiopaedia_org_covid-19-pneumonia-4_85506_1-dcm.nii.gz
    OUT_DIR/Lung_Mask/coronacases_001.nii.gz               (1 left lung, 2 right lung)
    OUT_DIR/Infection_Mask/coronacases_001.nii.gz          (0/1)
    OUT_DIR/Lung_and_Infection_Mask/coronacases_001.nii.gz (1 left, 2 right, 3 infection)

The first ten cases of each style take the real case ids in order; further ones get new ids of the same form.
Case ``i`` of a cohort depends only on ``(seed, i)``, so a larger cohort starts with the same cases.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from covidseg.errors import OutputExistsError, UserError
from covidseg.io.atomic import atomic_path
from covidseg.phantom.core import STYLES, Phantom, make_phantom

CT_DIR = "COVID-19-CT-Seg_20cases"
LUNG_DIR = "Lung_Mask"
INFECTION_DIR = "Infection_Mask"
JOINT_DIR = "Lung_and_Infection_Mask"
COHORT_STYLES = ("coronacases", "radiopaedia", "mixed")

RADIOPAEDIA_IDS = (
    "4_85506_1", "7_85703_0", "10_85902_1", "10_85902_3", "14_85914_0",
    "27_86410_0", "29_86490_1", "29_86491_1", "36_86526_0", "40_86625_0",
)
"""The ten real radiopaedia case ids (docs/method.md), in order."""


@dataclass(frozen=True)
class CaseFiles:
    """Where one case lives in the Zenodo layout."""

    case_id: str
    style: str
    ct: Path
    lung: Path
    infection: Path
    lung_and_infection: Path

    def all(self) -> tuple[Path, Path, Path, Path]:
        return self.ct, self.lung, self.infection, self.lung_and_infection


def radiopaedia_id(index: int) -> str:
    """Id (``N_NNNNN_K``) of the ``index``-th radiopaedia case (0-based): the real ids, then invented ones."""
    if index < len(RADIOPAEDIA_IDS):
        return RADIOPAEDIA_IDS[index]
    j = index - len(RADIOPAEDIA_IDS)
    return f"{41 + j}_{86700 + 37 * j}_{j % 2}"


def case_files(root: Path, style: str, index: int) -> CaseFiles:
    """File names of the ``index``-th (0-based) case of ``style`` under ``root`` (Zenodo names)."""
    root = Path(root)
    if style == "coronacases":
        num = f"{index + 1:03d}"
        case_id, ct_name = f"coronacases_{num}", f"coronacases_org_{num}.nii.gz"
    elif style == "radiopaedia":
        rid = radiopaedia_id(index)
        case_id, ct_name = f"radiopaedia_{rid}", f"radiopaedia_org_covid-19-pneumonia-{rid}-dcm.nii.gz"
    else:
        raise UserError(f"phantom style {style!r} does not exist; use coronacases or radiopaedia")
    mask = f"{case_id}.nii.gz"
    return CaseFiles(case_id, style, root / CT_DIR / ct_name, root / LUNG_DIR / mask,
                     root / INFECTION_DIR / mask, root / JOINT_DIR / mask)


def cohort_plan(out_dir: Path, cases: int, style: str) -> list[CaseFiles]:
    """The files of a cohort of ``cases`` cases; ``mixed`` alternates coronacases and radiopaedia."""
    if style not in COHORT_STYLES:
        raise UserError(f"--style {style!r} does not exist; use one of {', '.join(COHORT_STYLES)}")
    if cases < 1:
        raise UserError(f"--cases {cases}: a cohort needs at least 1 case")
    counts = {"coronacases": 0, "radiopaedia": 0}
    plan = []
    for i in range(cases):
        s = style if style != "mixed" else ("coronacases", "radiopaedia")[i % 2]
        plan.append(case_files(out_dir, s, counts[s]))
        counts[s] += 1
    return plan


def case_seed(seed: int, index: int) -> int:
    """Seed of case ``index`` of a cohort drawn with ``seed`` (independent streams per case)."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def write_case(phantom: Phantom, files: CaseFiles) -> None:
    """Write the CT and the three masks of one phantom (atomically, file order and affine of the style)."""
    import nibabel as nib

    def save(arr: np.ndarray, path: Path) -> None:
        img = nib.Nifti1Image(arr, phantom.affine)
        img.header.set_xyzt_units("mm")
        img.header.set_qform(phantom.affine, code=1)
        img.header.set_sform(phantom.affine, code=1)
        with atomic_path(path) as tmp:
            nib.save(img, tmp)

    save(phantom.stored_ct(), files.ct)
    save(phantom.to_file(phantom.lungs), files.lung)
    save(phantom.to_file(phantom.infection), files.infection)
    save(phantom.to_file(phantom.lung_and_infection()), files.lung_and_infection)


def write_cohort(out_dir: Path | str, cases: int, seed: int, style: str, scale: float = 1.0,
                 force: bool = False, progress: bool = True) -> list[CaseFiles]:
    """Generate and write a phantom cohort in the Zenodo layout.

    Args:
        out_dir: folder to write into (created if missing).
        cases: number of cases.
        seed: cohort seed; case ``i`` uses :func:`case_seed` ``(seed, i)``.
        style: ``coronacases``, ``radiopaedia`` or ``mixed`` (alternating, coronacases first).
        scale: in-plane size and slice count multiplier (see :func:`~covidseg.phantom.make_phantom`).
        force: overwrite existing case files.
        progress: show a progress bar over the cases (stderr).

    Returns:
        The files written, one :class:`CaseFiles` per case.

    Raises:
        OutputExistsError: a case file already exists and ``force`` is false (nothing is written).
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file; give a folder for the phantom cohort")
    plan = cohort_plan(out, cases, style)
    if not force:
        existing = [p for f in plan for p in f.all() if p.exists()]
        if existing:
            raise OutputExistsError(
                f"{existing[0]} already exists ({len(existing)} case file(s) of this cohort do); "
                "use --force to overwrite them or choose another OUT_DIR")
    from covidseg.progress import progress_bar

    bar = progress_bar(plan, desc="phantoms", unit="case", disable=not progress)
    for i, files in enumerate(bar):
        bar.set_postfix_str(files.case_id)
        assert files.style in STYLES
        phantom = make_phantom(files.style, case_seed(seed, i), scale=scale, case_id=files.case_id)
        write_case(phantom, files)
    return plan
