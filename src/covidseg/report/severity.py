"""Severity category of a percentage of lung involvement.

The bands are the per-lobe CT severity score of Pan et al., "Time course of lung changes at chest CT during
recovery from coronavirus disease 2019 (COVID-19)", Radiology 2020;295:715-721 (doi:10.1148/radiol.2020200370):
0 none, 1 < 5 %, 2 5-25 %, 3 26-50 %, 4 51-75 %, 5 > 75 % of the lobe involved (Chung et al., Radiology
2020;295:202-207, used the same idea with four bands). covidseg does not separate lobes, so the score is applied
to each lung and to both lungs together; the words next to the scores are covidseg's, not the paper's.
"""

from __future__ import annotations

from dataclasses import dataclass

SEVERITY_SOURCE = (
    "CT severity score bands of Pan et al., Radiology 2020;295:715-721 (doi:10.1148/radiol.2020200370), "
    "applied per lung instead of per lobe"
)
"""Where the bands come from (written into every report)."""

SEVERITY_BANDS: tuple[tuple[int, float, str], ...] = (
    (1, 5.0, "minimal"),
    (2, 25.0, "mild"),
    (3, 50.0, "moderate"),
    (4, 75.0, "severe"),
    (5, 100.0, "critical"),
)
"""``(score, upper bound in percent (inclusive, except the first: < 5 %), word)``; 0 % is score 0, "none"."""


@dataclass(frozen=True)
class Severity:
    """A severity category.

    Attributes:
        score: 0-5 (Pan et al. 2020 bands).
        label: the word for it.
        band: the band in words, e.g. ``"5-25 %"``.
    """

    score: int
    label: str
    band: str


def severity(percent: float) -> Severity:
    """Category of ``percent`` (0-100) of lung volume involved: 0 none (exactly 0 %), 1 < 5 %, 2 5-25 %,
    3 > 25-50 %, 4 > 50-75 %, 5 > 75 %."""
    if not percent > 0.0:
        return Severity(0, "none", "0 %")
    lower = 0.0
    for score, upper, word in SEVERITY_BANDS:
        if (percent < upper) if score == 1 else (percent <= upper):
            band = "< 5 %" if score == 1 else f"{lower:g}-{upper:g} %"
            return Severity(score, word, band)
        lower = upper
    return Severity(5, "critical", "> 75 %")
