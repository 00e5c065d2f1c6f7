"""Scoring masks against a reference: NIfTI, DICOM-SEG or RTSTRUCT, per label Dice, NSD, HD95 and volumes.

Typical use (what ``covidseg evaluate`` runs)::

    from covidseg.evaluation import evaluate, format_table
    result = evaluate("OUT", "rtstruct.dcm", ct="dicom/")
    print(format_table(result))

or, with masks already in memory on a CT's canonical grid::

    from covidseg.evaluation import read_reference, score
    ref = read_reference("rtstruct.dcm", like=ct)          # {"left_lung": mask, "right_lung": mask}
    scores = score({"left_lung": lungs == 1, "right_lung": lungs == 2}, ref, ct.spacing)
    scores["left_lung"].dice

See docs/evaluate.md for the formats, the label names and the metric conventions.
"""

from covidseg.evaluation.geometry import Grid, grid_of
from covidseg.evaluation.labels import LABELS, Structure, default_label, parse_map
from covidseg.evaluation.rtstruct import rasterise_polygons
from covidseg.evaluation.scoring import (
    Evaluation,
    LabelScore,
    evaluate,
    format_table,
    read_reference,
    score,
    write_json,
)
from covidseg.evaluation.structures import evaluation_grid, read_structures

__all__ = [
    "LABELS",
    "Evaluation",
    "Grid",
    "LabelScore",
    "Structure",
    "default_label",
    "evaluate",
    "evaluation_grid",
    "format_table",
    "grid_of",
    "parse_map",
    "rasterise_polygons",
    "read_reference",
    "read_structures",
    "score",
    "write_json",
]
