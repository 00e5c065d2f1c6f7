"""Structures read from a mask file, and how their names map onto covidseg's labels.

A *structure* is one named region of a prediction or a reference: an RTSTRUCT ROI (``LUNG_L``), a DICOM-SEG
segment (``Left lung``), a value of a NIfTI label map (``2``) or one of covidseg's own outputs. Each is mapped
onto one of :data:`LABELS` (or none) by name, case-insensitively, with :func:`default_label`; ``--map NAME=LABEL``
overrides (see :func:`assign_labels`). Structures that map onto nothing are listed, never silently dropped.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from covidseg.errors import ConfigError, InputError

LEFT_LUNG = "left_lung"
RIGHT_LUNG = "right_lung"
LUNGS = "lungs"
INFECTION = "infection"
LABELS = (LEFT_LUNG, RIGHT_LUNG, LUNGS, INFECTION)
"""The labels a structure can be scored as (``lungs`` = both lungs together)."""
NO_LABEL = "none"
"""``--map NAME=none`` leaves a structure out on purpose."""

COVIDSEG_LUNGS = {1: LEFT_LUNG, 2: RIGHT_LUNG}
"""Values of covidseg's ``lungs.nii.gz``."""
COVIDSEG_INFECTION = {1: INFECTION}
"""Values of covidseg's ``infection.nii.gz``."""
COVIDSEG_JOINT = {1: LEFT_LUNG, 2: RIGHT_LUNG, 3: INFECTION}
"""covidseg's joint label map (docs/architecture.md); the default for any other NIfTI label map."""

_SIDES = {"l": LEFT_LUNG, "lt": LEFT_LUNG, "left": LEFT_LUNG, "sin": LEFT_LUNG,
          "r": RIGHT_LUNG, "rt": RIGHT_LUNG, "right": RIGHT_LUNG, "dx": RIGHT_LUNG}
_LUNG_WORDS = {"lung", "lungs", "pulmo"}
_LOBE_WORDS = {"lobe", "upper", "middle", "lower", "superior", "inferior"}
_BOTH_WORDS = {"both", "total", "bilateral", "combined", "whole"}
_INFECTION_WORDS = {"infection", "infections", "infected", "lesion", "lesions", "ggo", "consolidation",
                    "consolidations", "covid", "pneumonia", "opacity", "opacities", "infiltrate", "infiltrates"}


@dataclass
class Structure:
    """One named region of a prediction or reference, loaded onto the evaluation grid on demand.

    Attributes:
        name: the structure's name in its file (ROI name, segment label, or the label value as text).
        origin: where it comes from, for messages (e.g. ``"ROI 2 of rtstruct.dcm"``).
        default: the label it maps onto without ``--map`` (one of :data:`LABELS`), or ``None``.
        load: returns the canonical ``(D, H, W)`` boolean mask on the evaluation grid (rasterising or decoding
            only when the structure is used).
    """

    name: str
    origin: str
    default: str | None
    load: Callable[[], np.ndarray] = field(repr=False)


def _tokens(name: str) -> list[str]:
    spaced = re.sub(r"(?<=[a-z])(?=[A-Z])", " ", name)  # camelCase: LungLeft -> Lung Left
    return re.findall(r"[a-z]+|[0-9]+", spaced.lower())


def default_label(name: str) -> str | None:
    """The label a structure name stands for, or ``None``.

    Lungs: a lung word (``lung``, ``lungs``) with at most one side (``L``/``Lt``/``Left``, ``R``/``Rt``/``Right``)
    and lobe words (``upper``, ``lobe``, ...), in any order and case, separated by anything: ``LUNG_L``,
    ``Lung_L``, ``Left lung``, ``lung_upper_lobe_left`` -> ``left_lung``; without a side (``Lungs``,
    ``Lung total``) -> ``lungs``. Any other word makes it something else (``Lungs-GTV``, ``Lung_CTV`` -> ``None``).
    Infection: any infection or lesion word (``infection``, ``lesion``, ``GGO``, ``consolidation``, ``COVID``,
    ``pneumonia``, ``opacity``) -> ``infection``.
    """
    tokens = _tokens(name)
    words = set(tokens)
    if words & _INFECTION_WORDS:
        return INFECTION
    if not words & _LUNG_WORDS:
        return None
    sides = {_SIDES[t] for t in words if t in _SIDES}
    rest = words - _LUNG_WORDS - _LOBE_WORDS - _BOTH_WORDS - set(_SIDES)
    if rest or len(sides) > 1:
        return None
    if sides:
        return sides.pop()
    return None if words & _LOBE_WORDS else LUNGS  # a lobe without a side is not a whole lung


def label_map_defaults(stem: str, values: Sequence[int]) -> dict[int, str]:
    """Default labels of the values of a NIfTI label map called ``stem`` (file name without ``.nii[.gz]``).

    covidseg's own files first (``lungs``: 1 left, 2 right; ``infection``: 1); a binary mask (values 0/1) whose
    file name is a structure name (``lesions.nii.gz``, ``left_lung.nii.gz``): 1 is that structure; any other
    label map: covidseg's joint convention (1 left lung, 2 right lung, 3 infection).
    """
    name = stem.lower()
    if name == "lungs":
        return dict(COVIDSEG_LUNGS)
    if name == "infection":
        return dict(COVIDSEG_INFECTION)
    named = default_label(stem)
    if named is not None and set(values) <= {1}:
        return {1: named}
    return dict(COVIDSEG_JOINT)


def normalise_label(text: str, what: str) -> str:
    """``Left-Lung`` / ``left lung`` / ``LEFT_LUNG`` -> ``left_lung``; ``none``; anything else -> ConfigError."""
    key = "_".join(_tokens(text))
    if key in LABELS or key == NO_LABEL:
        return key
    raise ConfigError(f"{what}: unknown label {text!r}; use one of {', '.join(LABELS)} or {NO_LABEL} "
                      f"(to leave the structure out)")


def parse_map(items: Iterable[str], option: str = "--map") -> dict[str, str]:
    """``["LUNG_L=left_lung", "2=right_lung"]`` -> ``{"lung_l": "left_lung", "2": "right_lung"}``.

    Names are compared case-insensitively (keys are case-folded); the last ``=`` separates name and label.

    Raises:
        ConfigError: an item without ``=``, an empty name, an unknown label, or one name given twice.
    """
    out: dict[str, str] = {}
    for item in items:
        name, sep, label = item.rpartition("=")
        if not sep or not name.strip():
            raise ConfigError(f"{option} {item!r}: expected NAME=LABEL, e.g. {option} LUNG_L=left_lung")
        key = name.strip().casefold()
        if key in out:
            raise ConfigError(f"{option} {item!r}: {name.strip()!r} is mapped twice; give each name once")
        out[key] = normalise_label(label.strip(), f"{option} {item!r}")
    return out


@dataclass
class Assignment:
    """Which structures make up each label, and which were left out.

    Attributes:
        labels: label -> the structures whose union it is.
        how: structure origin -> ``"default"`` or ``"--map"`` (how it got its label).
        unmapped: structures that map onto no label (by default or by ``--map NAME=none``).
    """

    labels: dict[str, list[Structure]]
    how: dict[str, str]
    unmapped: list[Structure]


def assign_labels(structures: Sequence[Structure], overrides: Mapping[str, str] | None, path: object,
                  option: str = "--map") -> Assignment:
    """Map ``structures`` onto :data:`LABELS`: ``overrides`` (from :func:`parse_map`) first, then the defaults.

    A label given explicitly in ``overrides`` takes only the structures mapped onto it there: the defaults of
    other structures for that label are dropped (so ``--map 2=left_lung`` on a label map makes label 2, and only
    label 2, the left lung).

    Raises:
        InputError: an override names a structure that ``path`` does not hold.
    """
    overrides = dict(overrides or {})
    names = {s.name.casefold() for s in structures}
    missing = [n for n in overrides if n not in names]
    if missing:
        found = ", ".join(s.name for s in structures) or "none"
        raise InputError(f"{path}: {option} names {', '.join(repr(m) for m in missing)}, which it does not hold "
                         f"(structures: {found}); check the spelling")
    explicit = set(overrides.values())
    labels: dict[str, list[Structure]] = {}
    how: dict[str, str] = {}
    unmapped: list[Structure] = []
    for s in structures:
        key = s.name.casefold()
        if key in overrides:
            label: str | None = overrides[key]
            how[s.origin] = option
        else:
            label = s.default if s.default not in explicit else None
            how[s.origin] = "default"
        if label is None or label == NO_LABEL:
            unmapped.append(s)
        else:
            labels.setdefault(label, []).append(s)
    return Assignment(labels=labels, how=how, unmapped=unmapped)
