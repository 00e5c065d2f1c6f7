"""Splits: the report's 14/2/4, the benchmark's published 5 folds, few-shot 4/16, and their phantom versions."""

from __future__ import annotations

import pytest

from covidseg.data.layouts import REAL_CASE_IDS, source_of
from covidseg.data.splits import SPLIT_NAMES, make_split
from covidseg.errors import ConfigError, InputError

# docs/method.md (Ma et al., COVID-19-CT-Seg-Benchmark, Task1_COVID_82_datasplit), pinned here on purpose
PUBLISHED_TEST_FOLDS = {
    0: ["coronacases_007", "coronacases_008", "radiopaedia_36_86526_0", "radiopaedia_4_85506_1"],
    1: ["coronacases_004", "coronacases_009", "radiopaedia_14_85914_0", "radiopaedia_7_85703_0"],
    2: ["coronacases_001", "coronacases_010", "radiopaedia_10_85902_1", "radiopaedia_29_86491_1"],
    3: ["coronacases_003", "coronacases_005", "radiopaedia_27_86410_0", "radiopaedia_40_86625_0"],
    4: ["coronacases_002", "coronacases_006", "radiopaedia_10_85902_3", "radiopaedia_29_86490_1"],
}
PHANTOMS = [f"coronacases_{i:03d}" for i in range(1, 7)] + [f"radiopaedia_{i}_1_0" for i in range(1, 7)]


def sources(ids):
    return {source_of(c) for c in ids}


@pytest.mark.parametrize("fold", range(5))
def test_benchmark_folds_are_the_published_ones(fold):
    split = make_split(list(REAL_CASE_IDS), f"benchmark-fold-{fold}", seed=123)
    assert sorted(split["test"]) == sorted(PUBLISHED_TEST_FOLDS[fold])
    assert len(split["train"]) == 16 and not set(split["train"]) & set(split["test"])


def test_published_folds_partition_the_20_cases():
    tests = [c for k in range(5) for c in make_split(REAL_CASE_IDS, f"benchmark-fold-{k}")["test"]]
    assert sorted(tests) == sorted(REAL_CASE_IDS)


def test_real_folds_apply_when_extra_cases_are_present():
    split = make_split([*REAL_CASE_IDS, "patient_1"], "benchmark-fold-2")
    assert sorted(split["test"]) == sorted(PUBLISHED_TEST_FOLDS[2]) and "patient_1" in split["train"]


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_report_split_is_14_2_4_with_both_sources_everywhere(seed):
    split = make_split(REAL_CASE_IDS, "report", seed=seed)
    assert [len(split[k]) for k in ("train", "val", "test")] == [14, 2, 4]
    assert sorted(split["train"] + split["val"] + split["test"]) == sorted(REAL_CASE_IDS)
    for part in split.values():
        assert sources(part) == {"coronacases", "radiopaedia"}


def test_report_split_is_seeded():
    assert make_split(REAL_CASE_IDS, "report", 3) == make_split(list(reversed(REAL_CASE_IDS)), "report", 3)
    assert any(make_split(REAL_CASE_IDS, "report", 0)["test"] != make_split(REAL_CASE_IDS, "report", s)["test"]
               for s in range(1, 5))


def test_few_shot_is_4_train_16_test_stratified():
    split = make_split(REAL_CASE_IDS, "few-shot", seed=0)
    assert len(split["train"]) == 4 and len(split["test"]) == 16
    assert [source_of(c) for c in split["train"]].count("coronacases") == 2
    assert make_split(REAL_CASE_IDS, "few-shot", seed=5) == make_split(REAL_CASE_IDS, "few-shot", seed=5)


def test_phantom_cohort_splits_keep_proportions_and_sources():
    report = make_split(PHANTOMS, "report", seed=0)  # 12 cases: 70/10/20 -> 9/1/2
    assert [len(report[k]) for k in ("train", "val", "test")] == [9, 1, 2]
    assert sources(report["test"]) == sources(report["train"]) == {"coronacases", "radiopaedia"}
    tests = []
    for k in range(5):
        fold = make_split(PHANTOMS, f"benchmark-fold-{k}", seed=0)
        assert set(fold["train"]) | set(fold["test"]) == set(PHANTOMS)
        tests += fold["test"]
    assert sorted(tests) == sorted(PHANTOMS)  # a partition: each case tested exactly once
    few = make_split(PHANTOMS, "few-shot")
    assert len(few["train"]) == 2 and sources(few["train"]) == {"coronacases", "radiopaedia"}


def test_tiny_cohort_still_gets_val_and_test():
    split = make_split(["coronacases_001", "coronacases_002", "radiopaedia_1_1_1", "radiopaedia_2_2_2"], "report")
    assert [len(split[k]) for k in ("train", "val", "test")] == [2, 1, 1]


def test_bad_names_and_too_few_cases():
    with pytest.raises(ConfigError, match="benchmark-fold-4"):
        make_split(REAL_CASE_IDS, "benchmark-fold-5")
    with pytest.raises(ConfigError):
        make_split(REAL_CASE_IDS, "random")
    with pytest.raises(InputError, match="at least 3"):
        make_split(["a", "b"], "report")
    assert "few-shot" in SPLIT_NAMES and "benchmark-fold-0" in SPLIT_NAMES
