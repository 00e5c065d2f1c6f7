"""The real dataset's folder layouts, each CT paired with its masks by one canonical case id.

Recognised layouts of the COVID-19 CT Lung and Infection Segmentation Dataset (Ma et al., Zenodo record 3757476;
docs/method.md):

- **zenodo**: the four unpacked archives ``COVID-19-CT-Seg_20cases/`` (CTs named ``coronacases_org_001.nii.gz``,
  ``radiopaedia_org_covid-19-pneumonia-10_85902_1-dcm.nii.gz``), ``Lung_Mask/``, ``Infection_Mask/`` and
  ``Lung_and_Infection_Mask/`` (masks named ``coronacases_001.nii.gz``, ``radiopaedia_10_85902_1.nii.gz``).
  Synthetic cohorts of ``covidseg phantom`` use this layout too.
- **kaggle**: the Kaggle copy "COVID-19 CT scans": ``metadata.csv`` (columns ``ct_scan, lung_mask,
  infection_mask, lung_and_infection_mask``, holding Kaggle paths such as ``../input/covid19-ct-scans/ct_scans/
  coronacases_org_001.nii``; files are found by name under the folder), ``.nii`` files in ``ct_scans/``,
  ``lung_mask/``, ``infection_mask/``, ``lung_and_infection_mask/``, and odd names (``coronacases_org_case007.nii``,
  ``coronacases_org_case010.nii``, ``case009.nii``) mapped to the canonical ids.
- **nnunet**: ``imagesTr/<id>_0000.nii.gz`` and ``labelsTr/<id>.nii.gz``; what the labels hold is read from
  ``dataset.json`` (1 foreground label: infection, 2: lungs, 3: lungs and infection; infection without it).

Canonical case ids: ``coronacases_001`` ... and ``radiopaedia_10_85902_1`` ...; other names keep their stem.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from covidseg.errors import InputError
from covidseg.io.formats import is_nifti, strip_image_suffix

Source = Literal["coronacases", "radiopaedia", "other"]
MaskKind = Literal["lung", "infection", "lung_and_infection"]
MASK_KINDS: tuple[MaskKind, ...] = ("lung", "infection", "lung_and_infection")

ZENODO_CT_DIR = "COVID-19-CT-Seg_20cases"
ZENODO_MASK_DIRS: dict[MaskKind, str] = {
    "lung": "Lung_Mask", "infection": "Infection_Mask", "lung_and_infection": "Lung_and_Infection_Mask",
}
KAGGLE_METADATA = "metadata.csv"
KAGGLE_CT_DIR = "ct_scans"
KAGGLE_COLUMNS: dict[str, MaskKind | Literal["ct"]] = {
    "ct_scan": "ct", "lung_mask": "lung", "infection_mask": "infection",
    "lung_and_infection_mask": "lung_and_infection",
}
KAGGLE_MASK_DIRS: dict[MaskKind, str] = {
    "lung": "lung_mask", "infection": "infection_mask", "lung_and_infection": "lung_and_infection_mask",
}
NNUNET_IMAGES, NNUNET_LABELS, NNUNET_CHANNEL = "imagesTr", "labelsTr", "_0000"
NNUNET_KIND_BY_LABEL_COUNT: dict[int, MaskKind] = {1: "infection", 2: "lung", 3: "lung_and_infection"}

REAL_CASE_IDS: tuple[str, ...] = (
    *(f"coronacases_{i:03d}" for i in range(1, 11)),
    "radiopaedia_4_85506_1", "radiopaedia_7_85703_0", "radiopaedia_10_85902_1", "radiopaedia_10_85902_3",
    "radiopaedia_14_85914_0", "radiopaedia_27_86410_0", "radiopaedia_29_86490_1", "radiopaedia_29_86491_1",
    "radiopaedia_36_86526_0", "radiopaedia_40_86625_0",
)
"""The 20 cases of Zenodo record 3757476 (docs/method.md)."""

_CORONACASES = re.compile(r"^(?:coronacases_(?:org_)?)?(?:case)?(\d+)$", re.IGNORECASE)
_RADIOPAEDIA = re.compile(r"^radiopaedia_(?:org_covid-19-pneumonia-)?(\d+_\d+_\d+)(?:-dcm)?$", re.IGNORECASE)


@dataclass
class Case:
    """One CT and its masks (``None`` where the layout has none for this case)."""

    case_id: str
    ct: Path
    lung: Path | None = None
    infection: Path | None = None
    lung_and_infection: Path | None = None
    source: Source = "other"
    layout: str = "zenodo"

    def mask(self, kind: MaskKind) -> Path | None:
        """The mask file of ``kind`` (``lung``, ``infection``, ``lung_and_infection``)."""
        return getattr(self, kind)


@dataclass
class Problem:
    """Something missing or inconsistent, with the file it concerns."""

    path: Path
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


@dataclass
class Dataset:
    """A scanned dataset folder: its layout, cases, which mask kinds it provides, and layout-level problems."""

    root: Path
    layout: str
    cases: list[Case]
    mask_kinds: tuple[MaskKind, ...]
    problems: list[Problem] = field(default_factory=list)


def canonical_case_id(name: str) -> str:
    """Canonical case id of a CT or mask file name (any of the layouts' spellings).

    >>> canonical_case_id("radiopaedia_org_covid-19-pneumonia-10_85902_1-dcm.nii.gz")
    'radiopaedia_10_85902_1'
    >>> canonical_case_id("coronacases_org_case007.nii"), canonical_case_id("case009.nii")
    ('coronacases_007', 'coronacases_009')
    """
    stem = strip_image_suffix(Path(name).name)
    if stem.endswith(NNUNET_CHANNEL):
        stem = stem[: -len(NNUNET_CHANNEL)]
    m = _RADIOPAEDIA.match(stem)
    if m:
        return f"radiopaedia_{m.group(1)}"
    m = _CORONACASES.match(stem)
    if m and (stem.lower().startswith(("coronacases", "case"))):
        return f"coronacases_{int(m.group(1)):03d}"
    return stem


def source_of(case_id: str) -> Source:
    """``coronacases`` / ``radiopaedia`` from the id's prefix, else ``other``."""
    if case_id.startswith("coronacases"):
        return "coronacases"
    if case_id.startswith("radiopaedia"):
        return "radiopaedia"
    return "other"


def natural_key(text: str) -> tuple:
    """Sort key that orders embedded numbers numerically (radiopaedia_4 before radiopaedia_10)."""
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text))


def _nifti_files(folder: Path) -> list[Path]:
    return sorted((p for p in folder.rglob("*") if p.is_file() and is_nifti(p.name)
                   and not p.name.startswith(".")), key=lambda p: natural_key(str(p)))


def _index_by_id(files: list[Path], problems: list[Problem]) -> dict[str, Path]:
    index: dict[str, Path] = {}
    for path in files:
        cid = canonical_case_id(path.name)
        if cid in index:
            problems.append(Problem(path, f"a second file for case {cid} (first: {index[cid].name}); keep one"))
            continue
        index[cid] = path
    return index


def _pair(root: Path, layout: str, cts: dict[str, Path], masks: dict[MaskKind, dict[str, Path]],
          problems: list[Problem]) -> list[Case]:
    cases = []
    for cid in sorted(cts, key=natural_key):
        kinds = {kind: index.get(cid) for kind, index in masks.items()}
        cases.append(Case(case_id=cid, ct=cts[cid], source=source_of(cid), layout=layout, **kinds))
    for kind, index in masks.items():
        for cid, path in sorted(index.items()):
            if cid not in cts:
                problems.append(Problem(path, f"{kind} mask of case {cid} has no CT; add the CT or remove the mask"))
    return cases


def _scan_zenodo(root: Path) -> Dataset:
    problems: list[Problem] = []
    cts = _index_by_id(_nifti_files(root / ZENODO_CT_DIR), problems)
    masks = {kind: _index_by_id(_nifti_files(root / name), problems)
             for kind, name in ZENODO_MASK_DIRS.items() if (root / name).is_dir()}
    return Dataset(root, "zenodo", _pair(root, "zenodo", cts, masks, problems), tuple(masks), problems)


def _scan_kaggle(root: Path) -> Dataset:
    problems: list[Problem] = []
    all_files = _nifti_files(root)
    meta = root / KAGGLE_METADATA
    if not meta.is_file():  # the Kaggle folders without the csv: pair by name like the Zenodo layout
        by_id = _index_by_id(_nifti_files(root / KAGGLE_CT_DIR), problems)
        by_kind = {kind: _index_by_id(_nifti_files(root / name), problems)
                   for kind, name in KAGGLE_MASK_DIRS.items() if (root / name).is_dir()}
        return Dataset(root, "kaggle", _pair(root, "kaggle", by_id, by_kind, problems), tuple(by_kind), problems)
    try:
        with open(meta, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"{meta}: cannot read the metadata table ({exc}); re-download the Kaggle copy") from None
    header = set(rows[0]) if rows else set()
    missing_cols = [c for c in KAGGLE_COLUMNS if c not in header]
    if missing_cols:
        raise InputError(f"{meta}: columns {missing_cols} missing (found {sorted(header)}); expected "
                         f"{', '.join(KAGGLE_COLUMNS)}")
    cts: dict[str, Path] = {}
    masks: dict[MaskKind, dict[str, Path]] = {kind: {} for kind in MASK_KINDS}
    for line, row in enumerate(rows, start=2):
        ct_name = (row.get("ct_scan") or "").strip()
        if not ct_name:
            problems.append(Problem(meta, f"line {line}: empty ct_scan"))
            continue
        cid = canonical_case_id(ct_name)
        for column, kind in KAGGLE_COLUMNS.items():
            listed = (row.get(column) or "").strip()
            if not listed:
                continue
            found = _resolve_listed(root, listed, all_files)
            if found is None:
                problems.append(Problem(root / Path(listed).name,
                                        f"listed in {KAGGLE_METADATA} line {line} ({column}) but not found under "
                                        f"{root}; download the missing file"))
                continue
            if kind == "ct":
                cts[cid] = found
            else:
                masks[kind][cid] = found
    kinds = tuple(kind for kind in MASK_KINDS if masks[kind])
    return Dataset(root, "kaggle", _pair(root, "kaggle", cts, {k: masks[k] for k in kinds}, problems), kinds,
                   problems)


def _resolve_listed(root: Path, listed: str, files: list[Path]) -> Path | None:
    """A metadata.csv path (often a Kaggle ``../input/...`` path) -> the file under ``root``.

    Tried in order: the path relative to ``root``; a file whose folder and name match the path's last two parts
    (``lung_mask/coronacases_001.nii``: mask folders share file names); a file of that name if it is unique.
    """
    candidate = root / listed
    if candidate.is_file():
        return candidate
    parts = Path(listed.replace("\\", "/")).parts
    tail = parts[-2:]
    by_tail = [p for p in files if p.parts[-len(tail):] == tail]
    if len(by_tail) == 1:
        return by_tail[0]
    by_name = [p for p in files if p.name == parts[-1]]
    return by_name[0] if len(by_name) == 1 else None


def _nnunet_label_kind(root: Path, problems: list[Problem]) -> MaskKind:
    meta = root / "dataset.json"
    if not meta.is_file():
        return "infection"
    try:
        labels = json.loads(meta.read_text(encoding="utf-8")).get("labels", {})
    except (OSError, ValueError, AttributeError) as exc:
        problems.append(Problem(meta, f"not readable JSON ({exc}); labels taken as infection (0/1)"))
        return "infection"
    # nnU-Net v2: {"background": 0, "lesion": 1}; v1: {"0": "background", "1": "lesion"}
    values = list(labels.values()) if all(isinstance(v, int) for v in labels.values()) else list(labels)
    foreground = [v for v in values if str(v) not in ("0",)]
    kind = NNUNET_KIND_BY_LABEL_COUNT.get(len(foreground))
    if kind is None:
        problems.append(Problem(meta, f"{len(foreground)} foreground labels; expected 1 (infection), 2 (lungs) or "
                                      f"3 (lungs and infection) — labels taken as infection"))
        return "infection"
    return kind


def _scan_nnunet(root: Path) -> Dataset:
    problems: list[Problem] = []
    images = [p for p in _nifti_files(root / NNUNET_IMAGES)]
    for extra in [p for p in images if not strip_image_suffix(p.name).endswith(NNUNET_CHANNEL)]:
        problems.append(Problem(extra, f"not a channel-0 image (<id>{NNUNET_CHANNEL}.nii.gz); covidseg uses one "
                                       f"CT channel — remove it"))
    cts = _index_by_id([p for p in images if strip_image_suffix(p.name).endswith(NNUNET_CHANNEL)], problems)
    kind = _nnunet_label_kind(root, problems)
    masks: dict[MaskKind, dict[str, Path]] = {}
    if (root / NNUNET_LABELS).is_dir():
        masks[kind] = _index_by_id(_nifti_files(root / NNUNET_LABELS), problems)
    return Dataset(root, "nnunet", _pair(root, "nnunet", cts, masks, problems), tuple(masks), problems)


def detect_layout(root: Path) -> str | None:
    """``zenodo``, ``kaggle``, ``nnunet`` or ``None`` for the folder itself (no recursion)."""
    if (root / ZENODO_CT_DIR).is_dir():
        return "zenodo"
    if (root / KAGGLE_METADATA).is_file() or (root / KAGGLE_CT_DIR).is_dir():
        return "kaggle"
    if (root / NNUNET_IMAGES).is_dir():
        return "nnunet"
    return None


SCANNERS = {"zenodo": _scan_zenodo, "kaggle": _scan_kaggle, "nnunet": _scan_nnunet}


def scan_dataset(root: str | Path) -> Dataset:
    """Recognise the layout of ``root`` (or of its only recognisable sub-folder) and pair CTs with masks.

    Raises:
        InputError: ``root`` missing, not a folder, of no known layout, or holding no CT.
    """
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{root}: no such folder; give the folder holding the dataset "
                         f"(or fetch it: covidseg data download zenodo {root})")
    layout = detect_layout(root)
    if layout is None:
        subs = [p for p in sorted(root.iterdir()) if p.is_dir() and detect_layout(p)]
        if len(subs) == 1:
            root, layout = subs[0], detect_layout(subs[0])
    if layout is None:
        what = "is empty" if not any(root.iterdir()) else "has no recognised dataset layout"
        raise InputError(
            f"{root}: the folder {what}; expected the Zenodo layout ({ZENODO_CT_DIR}/, "
            f"{', '.join(d + '/' for d in ZENODO_MASK_DIRS.values())}), the Kaggle copy ({KAGGLE_METADATA}, "
            f"{KAGGLE_CT_DIR}/) or nnU-Net ({NNUNET_IMAGES}/, {NNUNET_LABELS}/) — fetch the data with "
            f"`covidseg data download zenodo DIR` or make a cohort with `covidseg phantom DIR`"
        )
    dataset = SCANNERS[layout](root)
    if not dataset.cases:
        raise InputError(f"{root}: {layout} layout but no CT files (.nii/.nii.gz) were found; check that the "
                         f"archives were unpacked completely")
    return dataset


def find_cases(root: str | Path) -> list[Case]:
    """All cases of a dataset folder (Zenodo, Kaggle or nnU-Net layout), sorted by id.

    Raises:
        InputError: an empty or unrecognised folder.
    """
    return scan_dataset(root).cases
