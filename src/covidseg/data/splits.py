"""Train/validation/test splits of the 20 real cases (and of any cohort, phantoms included).

- ``report``: the seed report's 14 train / 2 validation / 4 test (§2), seeded, both sources (coronacases and
  radiopaedia) in every part. On another cohort size: the same proportions 70/10/20, stratified by source, at
  least one case in validation and test.
- ``benchmark-fold-K`` (K = 0..4): the COVID-19-CT-Seg benchmark's 5-fold split (Ma et al.,
  ``Task1_COVID_82_datasplit``; docs/method.md) with exactly its published test cases when the 20 real ids are
  present; otherwise a seeded 5-fold split stratified by source.
- ``few-shot``: 4 train / 16 test on the real 20 (20 % / 80 %), seeded, stratified by source.

Stratification: each source's ids are shuffled with the seed and interleaved by their relative rank, so taking
the first n of the interleaved list draws the sources in proportion (the 10 + 10 real cases alternate).
"""

from __future__ import annotations

import random
from collections.abc import Collection, Sequence

from covidseg.data.layouts import REAL_CASE_IDS, natural_key, source_of
from covidseg.errors import ConfigError, InputError

BENCHMARK_TEST_FOLDS: tuple[tuple[str, ...], ...] = (
    ("coronacases_007", "coronacases_008", "radiopaedia_36_86526_0", "radiopaedia_4_85506_1"),
    ("coronacases_004", "coronacases_009", "radiopaedia_14_85914_0", "radiopaedia_7_85703_0"),
    ("coronacases_001", "coronacases_010", "radiopaedia_10_85902_1", "radiopaedia_29_86491_1"),
    ("coronacases_003", "coronacases_005", "radiopaedia_27_86410_0", "radiopaedia_40_86625_0"),
    ("coronacases_002", "coronacases_006", "radiopaedia_10_85902_3", "radiopaedia_29_86490_1"),
)
"""Test cases of the benchmark's folds 0..4 (Ma et al., COVID-19-CT-Seg-Benchmark; docs/method.md)."""
N_FOLDS = len(BENCHMARK_TEST_FOLDS)
REPORT_FRACTIONS = (0.7, 0.1, 0.2)
"""train / val / test share of the report's split (14/2/4 of 20)."""
FEW_SHOT_TRAIN_FRACTION = 0.2
"""few-shot: 4 of 20 cases train."""
SPLIT_NAMES = ("report", *(f"benchmark-fold-{k}" for k in range(N_FOLDS)), "few-shot")


def stratified_order(case_ids: Sequence[str], seed: int) -> list[str]:
    """Ids shuffled within each source (seeded) and interleaved by relative rank across sources."""
    groups: dict[str, list[str]] = {}
    for cid in sorted(set(case_ids), key=natural_key):
        groups.setdefault(source_of(cid), []).append(cid)
    rng = random.Random(seed)
    keyed = []
    for source in sorted(groups):
        members = groups[source]
        rng.shuffle(members)
        keyed += [((i + 0.5) / len(members), source, cid) for i, cid in enumerate(members)]
    return [cid for _, _, cid in sorted(keyed)]


def _sorted(ids: Collection[str]) -> list[str]:
    return sorted(ids, key=natural_key)


def _report(case_ids: Sequence[str], seed: int) -> dict[str, list[str]]:
    n = len(case_ids)
    if n < 3:
        raise InputError(f"the report split needs at least 3 cases (train, val, test), got {n}; add cases")
    n_val = max(1, round(REPORT_FRACTIONS[1] * n))
    n_test = max(1, round(REPORT_FRACTIONS[2] * n))
    order = stratified_order(case_ids, seed)
    # test first (it must hold both sources), then validation, then the rest trains
    return {"train": _sorted(order[n_test + n_val:]), "val": _sorted(order[n_test:n_test + n_val]),
            "test": _sorted(order[:n_test])}


def _benchmark(case_ids: Sequence[str], fold: int, seed: int) -> dict[str, list[str]]:
    ids = set(case_ids)
    if set(REAL_CASE_IDS) <= ids:
        test = set(BENCHMARK_TEST_FOLDS[fold])
    else:
        if len(ids) < N_FOLDS:
            raise InputError(f"a {N_FOLDS}-fold split needs at least {N_FOLDS} cases, got {len(ids)}; add cases")
        order = stratified_order(case_ids, seed)
        test = {cid for i, cid in enumerate(order) if i % N_FOLDS == fold}
    return {"train": _sorted(ids - test), "test": _sorted(test)}


def _few_shot(case_ids: Sequence[str], seed: int) -> dict[str, list[str]]:
    n = len(case_ids)
    if n < 2:
        raise InputError(f"the few-shot split needs at least 2 cases, got {n}; add cases")
    n_train = min(n - 1, max(1, round(FEW_SHOT_TRAIN_FRACTION * n)))
    order = stratified_order(case_ids, seed)
    return {"train": _sorted(order[:n_train]), "test": _sorted(order[n_train:])}


def make_split(case_ids: Sequence[str], name: str, seed: int = 0) -> dict[str, list[str]]:
    """Split case ids by the named scheme.

    Args:
        case_ids: canonical ids (e.g. from :func:`covidseg.data.layouts.find_cases`); duplicates are ignored.
        name: ``report`` (train/val/test), ``benchmark-fold-K`` for K in 0..4 (train/test), ``few-shot``
            (train/test).
        seed: shuffling seed (the benchmark folds of the real 20 do not depend on it).

    Returns:
        ``{"train": [...], "val": [...], "test": [...]}`` (``val`` only for ``report``), each sorted.

    Raises:
        ConfigError: an unknown split name.
        InputError: too few cases for the scheme.
    """
    ids = list(dict.fromkeys(case_ids))
    if name == "report":
        return _report(ids, seed)
    if name == "few-shot":
        return _few_shot(ids, seed)
    if name.startswith("benchmark-fold-"):
        suffix = name[len("benchmark-fold-"):]
        if suffix.isdigit() and int(suffix) < N_FOLDS:
            return _benchmark(ids, int(suffix), seed)
    raise ConfigError(f"split {name!r} is not one of {', '.join(SPLIT_NAMES)}")
