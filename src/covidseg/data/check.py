"""``covidseg data check``: read every case of a dataset folder and report what is there and what is wrong.

For each case: canonical shape ``(D, H, W)``, spacing in mm, the intensity convention detected (HU or
windowed [0, 255]), the label values of each mask, left and right lung volume and infection volume in mL
(voxel count x voxel volume). Problems (a missing or unreadable file, a mask drawn on another grid, labels outside
the expected set, a CT that is not CT-like) are collected with the file they concern instead of stopping.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from covidseg.config import IntensityConfig
from covidseg.data.layouts import (
    KAGGLE_MASK_DIRS,
    NNUNET_LABELS,
    ZENODO_MASK_DIRS,
    Case,
    Dataset,
    MaskKind,
    Problem,
    scan_dataset,
)
from covidseg.errors import InputError
from covidseg.intensity import resolve_convention
from covidseg.io.image import label_values, read_image, read_mask
from covidseg.targets import JOINT_INFECTION, LEFT_LUNG, RIGHT_LUNG

EXPECTED_LABELS: dict[str, set[int]] = {
    "lung": {0, 1, 2}, "infection": {0, 1}, "lung_and_infection": {0, 1, 2, 3},
}
"""Label sets of the real dataset (docs/method.md): lungs 1 left / 2 right; infection 0/1; joint 1, 2, 3."""
PIPE_WIDTH = 180
"""Table width (characters) when stdout is not a terminal."""
MASK_DIRS = {"zenodo": ZENODO_MASK_DIRS, "kaggle": KAGGLE_MASK_DIRS,
             "nnunet": {kind: NNUNET_LABELS for kind in ZENODO_MASK_DIRS}}


@dataclass
class CaseReport:
    """What ``data check`` found for one case (``None`` where it could not be measured)."""

    case_id: str
    source: str
    ct: Path
    shape: tuple[int, int, int] | None = None
    spacing: tuple[float, float, float] | None = None
    convention: str | None = None
    labels: dict[str, list[int]] = field(default_factory=dict)
    left_lung_ml: float | None = None
    right_lung_ml: float | None = None
    infection_ml: float | None = None
    problems: list[Problem] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {
            "case_id": self.case_id, "source": self.source, "ct": str(self.ct),
            "shape": list(self.shape) if self.shape else None,
            "spacing_mm": [round(s, 4) for s in self.spacing] if self.spacing else None,
            "convention": self.convention, "labels": self.labels,
            "left_lung_ml": self.left_lung_ml, "right_lung_ml": self.right_lung_ml,
            "infection_ml": self.infection_ml, "problems": [str(p) for p in self.problems],
        }


@dataclass
class CheckReport:
    """The whole check: the layout, one report per case, and layout-level problems."""

    root: Path
    layout: str
    cases: list[CaseReport]
    problems: list[Problem]

    @property
    def ok(self) -> bool:
        return not self.problems and not any(c.problems for c in self.cases)

    def all_problems(self) -> list[Problem]:
        return [*self.problems, *(p for c in self.cases for p in c.problems)]

    def as_dict(self) -> dict:
        return {"root": str(self.root), "layout": self.layout, "ok": self.ok,
                "problems": [str(p) for p in self.problems], "cases": [c.as_dict() for c in self.cases]}


def _ml(mask: np.ndarray, value: int, voxel_ml: float) -> float:
    return round(float(np.count_nonzero(mask == value)) * voxel_ml, 1)


def check_case(case: Case, dataset: Dataset, cfg: IntensityConfig | None = None) -> CaseReport:
    """Read one case's CT and masks and measure them; every problem is recorded, none raised."""
    cfg = cfg or IntensityConfig()
    report = CaseReport(case.case_id, case.source, case.ct)
    try:
        ct = read_image(case.ct)
    except InputError as exc:
        report.problems.append(Problem(case.ct, _strip_path(str(exc), case.ct)))
        return report
    report.shape, report.spacing = ct.shape, ct.spacing
    try:
        report.convention = resolve_convention(ct.array, cfg, path=case.ct)
    except InputError as exc:
        report.problems.append(Problem(case.ct, _strip_path(str(exc), case.ct)))
    voxel_ml = ct.voxel_volume_ml
    masks: dict[str, np.ndarray] = {}
    for kind in dataset.mask_kinds:
        path = case.mask(kind)
        if path is None:
            folder = MASK_DIRS.get(dataset.layout, {}).get(kind, kind)
            report.problems.append(Problem(dataset.root / folder, f"no {kind} mask for case {case.case_id}; add "
                                                                  f"it (named like the other masks there)"))
            continue
        try:
            mask = read_mask(path, like=ct)
        except InputError as exc:
            report.problems.append(Problem(path, _strip_path(str(exc), path)))
            continue
        values = label_values(mask)
        report.labels[kind] = values
        extra = sorted(set(values) - EXPECTED_LABELS[kind])
        if extra:
            report.problems.append(Problem(path, f"unexpected label values {extra} in the {kind} mask (found "
                                                 f"{values}, expected a subset of {sorted(EXPECTED_LABELS[kind])})"))
        masks[kind] = mask
    lungs = masks.get("lung", masks.get("lung_and_infection"))
    if lungs is not None:
        report.left_lung_ml = _ml(lungs, LEFT_LUNG, voxel_ml)
        report.right_lung_ml = _ml(lungs, RIGHT_LUNG, voxel_ml)
    if "infection" in masks:
        report.infection_ml = _ml(masks["infection"], 1, voxel_ml)
    elif "lung_and_infection" in masks:
        report.infection_ml = _ml(masks["lung_and_infection"], JOINT_INFECTION, voxel_ml)
    return report


def _strip_path(message: str, path: Path) -> str:
    """Messages from the readers start with ``path: ``; the Problem carries the path already."""
    prefix = f"{path}: "
    return message[len(prefix):] if message.startswith(prefix) else message


def check_dataset(root: str | Path, cfg: IntensityConfig | None = None, progress: bool = True) -> CheckReport:
    """Scan ``root`` (Zenodo, Kaggle or nnU-Net layout) and check every case, with a progress bar on stderr.

    Raises:
        InputError: the folder is missing, empty or of no known layout.
    """
    from covidseg.progress import progress_bar

    dataset = scan_dataset(root)
    problems = list(dataset.problems)
    if not dataset.mask_kinds:
        problems.append(Problem(dataset.root, "no mask folders found; add the lung/infection masks (e.g. "
                                              f"{', '.join(d + '/' for d in ZENODO_MASK_DIRS.values())})"))
    reports = []
    bar = progress_bar(dataset.cases, desc="checking cases", unit="case", file=sys.stderr, disable=not progress)
    for case in bar:
        bar.set_postfix_str(case.case_id)
        reports.append(check_case(case, dataset, cfg))
    return CheckReport(dataset.root, dataset.layout, reports, problems)


def render(report: CheckReport, console: object | None = None) -> None:
    """Print the per-case table and the list of problems with rich."""
    from rich.console import Console
    from rich.table import Table

    out = console if isinstance(console, Console) else Console()
    if console is None and not out.is_terminal:
        out = Console(width=PIPE_WIDTH)  # piped/redirected: don't squeeze the table into 80 columns
    table = Table(title=f"{report.root} ({report.layout} layout, {len(report.cases)} cases)")
    for name, justify in [("case", "left"), ("source", "left"), ("shape D×H×W", "right"),
                          ("spacing mm", "right"), ("intensity", "left"), ("labels", "left"),
                          ("left lung mL", "right"), ("right lung mL", "right"), ("infection mL", "right"),
                          ("status", "left")]:
        table.add_column(name, justify=justify, no_wrap=name != "case")  # type: ignore[arg-type]

    def num(v: float | None) -> str:
        return "-" if v is None else f"{v:,.1f}"

    for c in report.cases:
        labels = "; ".join(f"{_short(k)} {','.join(map(str, v))}" for k, v in c.labels.items()) or "-"
        table.add_row(
            c.case_id, c.source, "×".join(map(str, c.shape)) if c.shape else "-",
            "×".join(f"{s:.2f}" for s in c.spacing) if c.spacing else "-",
            {"hu": "HU", "windowed": "windowed 0-255"}.get(c.convention or "", "-"), labels,
            num(c.left_lung_ml), num(c.right_lung_ml), num(c.infection_ml),
            "[green]ok[/green]" if not c.problems else f"[red]{len(c.problems)} problem(s)[/red]",
        )
    out.print(table)
    problems = report.all_problems()
    if problems:
        out.print(f"[red]{len(problems)} problem(s):[/red]")
        for p in problems:
            out.print(f"  {p}", markup=False, highlight=False)
    else:
        out.print("[green]all cases ok[/green]")


def _short(kind: MaskKind | str) -> str:
    return {"lung": "lung", "infection": "inf", "lung_and_infection": "joint"}.get(kind, kind)
