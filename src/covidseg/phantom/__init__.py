"""Synthetic chest-CT phantoms with lung and infection masks, written in the real dataset's Zenodo layout.

``make_phantom(style, seed, scale)`` builds one case in the canonical ``(D, H, W)`` order; ``write_cohort`` writes
a cohort as ``COVID-19-CT-Seg_20cases/``, ``Lung_Mask/``, ``Infection_Mask/``, ``Lung_and_Infection_Mask/``
with the real file names (docs/method.md). See ``docs/phantoms.md``. Phantoms are not patient data: numbers
measured on them say nothing about patients.
"""

from covidseg.phantom.cohort import CaseFiles, case_files, case_seed, cohort_plan, write_case, write_cohort
from covidseg.phantom.core import STYLES, Phantom, file_affine, make_phantom

__all__ = [
    "STYLES", "CaseFiles", "Phantom", "case_files", "case_seed", "cohort_plan", "file_affine", "make_phantom",
    "write_case", "write_cohort",
]
