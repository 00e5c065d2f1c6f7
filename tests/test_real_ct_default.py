"""The default model's two stages (no --checkpoint) on the three real CTs of ``../shared/data/real-ct``.

Skipped without ``../shared`` (a user's clone). None of the CTs shows COVID-19, so every infection voxel is a false
positive: the target is at most 1 % of the lung volume on the two full chests. Lungs are scored against the
expert RTSTRUCT of ``pancreas-ct-cb-001`` with ``covidseg.evaluation``. The stages run without writing the case
folder (``benchmarks/real_ct.py`` measures the whole command).
"""

from __future__ import annotations

from functools import lru_cache

import pytest

from covidseg.config import Config
from covidseg.inference.backends import load_model
from covidseg.inference.case import CaseSegmentation, segment_image
from covidseg.inference.stages import SliceInfection, Stages, build_stages
from real_ct import REAL_CT, lidc_nodule, load_image, missing_reason

pytestmark = pytest.mark.skipif(missing_reason() is not None, reason=str(missing_reason()))

EXPERT_DICE = 0.95
"""Dice per lung against the expert contours."""
NODULE_INSIDE = 0.95
"""Share of the LIDC consensus nodule inside the lung mask."""
MAX_FALSE_POSITIVE_PERCENT = 1.0
"""Infection share (%) of the lung volume on a CT without COVID-19."""


@lru_cache(maxsize=1)
def _stages() -> Stages:
    from covidseg.checkpoint import default_checkpoint

    return build_stages(load_model(default_checkpoint()), None, Config(), "cpu")


@lru_cache(maxsize=3)
def _segmented(case: str) -> CaseSegmentation:
    return segment_image(load_image(case), _stages())


def _percent(seg: CaseSegmentation) -> float:
    lung = seg.lungs > 0
    return 100.0 * float((seg.infection.astype(bool) & lung).sum()) / float(lung.sum())


def test_default_stage_is_the_slice_model() -> None:
    assert isinstance(_stages().infection, SliceInfection)


def test_pancreas_lungs_against_the_expert_rtstruct() -> None:
    from covidseg.evaluation import read_reference, score

    case = "pancreas-ct-cb-001"
    seg = _segmented(case)
    ref = read_reference(REAL_CT / case / "rtstruct.dcm", like=load_image(case))
    scores = score({"left_lung": seg.lungs == 1, "right_lung": seg.lungs == 2}, ref, load_image(case).spacing)
    assert {"left_lung", "right_lung"} <= scores.keys()
    for label in ("left_lung", "right_lung"):
        assert scores[label].dice >= EXPERT_DICE, f"{label}: Dice {scores[label].dice:.3f}"
    assert seg.lung_findings["cut_at_apex"] is True  # the scan stops inside the chest: the report says so


def test_lidc_nodule_in_the_lungs_and_few_false_positives() -> None:
    seg = _segmented("lidc-idri-0314")
    assert float((seg.lungs[lidc_nodule()] > 0).mean()) >= NODULE_INSIDE
    assert _percent(seg) <= MAX_FALSE_POSITIVE_PERCENT


def test_chest_2mm_few_false_positives() -> None:
    assert _percent(_segmented("chest-2mm-00")) <= MAX_FALSE_POSITIVE_PERCENT


def test_chest_2mm_false_positives_without_the_diaphragm_rule() -> None:
    # the partial-volume band above the diaphragm is what the rule removes: measured 0.90 % of the lung volume
    # without it, 0.59 % with it (17 mL set to 0; docs/results/partial_volume.json)
    stages = _stages()
    assert isinstance(stages.infection, SliceInfection)
    assert stages.infection.partial_volume_mm > 0
    with_rule = _percent(_segmented("chest-2mm-00"))
    ruled = SliceInfection(stages.infection.model, "cpu")  # its own stage: the shared one ran other CTs too
    segment_image(load_image("chest-2mm-00"), Stages(lungs=stages.lungs, infection=ruled))
    plain = SliceInfection(stages.infection.model, "cpu", partial_volume_mm=0.0)
    seg = segment_image(load_image("chest-2mm-00"), Stages(lungs=stages.lungs, infection=plain))
    assert plain.partial_volume_ml == 0.0
    assert ruled.partial_volume_ml >= 10.0
    assert _percent(seg) - with_rule >= 0.2


def test_lidc_sharpened_as_by_a_lung_kernel_few_false_positives() -> None:
    # an unsharp mask of 3 at 1 px (soft-tissue noise 31 -> 86 HU): 0.29 % measured with the shipped model, 3.35 %
    # with the same network trained without the noise and kernel augmentation (docs/real-ct.md)
    import dataclasses

    from covidseg.phantom import perturb

    image = load_image("lidc-idri-0314")
    sharp = dataclasses.replace(image, array=perturb.sharpen(image.array, 3.0))
    seg = segment_image(sharp, _stages())
    assert _percent(seg) <= MAX_FALSE_POSITIVE_PERCENT
    assert float((seg.lungs[lidc_nodule()] > 0).mean()) >= NODULE_INSIDE
