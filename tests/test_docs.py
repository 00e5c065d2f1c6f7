"""README.md and docs/*.md read as reference: their links resolve, they cite no file outside the repo, no diary words,
and every results file they rest on is stamped with its commit, machine, config and date."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


DIARY = re.compile(
    r"\b(later|earlier|previous|first|second|third|next) (session|pass)\b|\bsession\b|\bissue [0-9]+\b", re.IGNORECASE
)
"""Words that tell history instead of what is true now (the check the project is held to)."""
OUTSIDE = re.compile(r"METHOD\.md")
"""The project's method notes, which are not part of the repository (case-sensitive: ``docs/method.md`` is)."""
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
RESULTS_CITED = re.compile(r"(?<![\w/.-])(?:docs/)?results/([\w.-]+\.(?:json|md|csv|log))")
FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)


def _name(page: Path) -> str:
    return page.relative_to(ROOT).as_posix()


def _params() -> list[object]:
    return [pytest.param(page, id=_name(page)) for page in PAGES]


def slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every heading anchor of ``page`` (repeated headings get GitHub's ``-1``, ``-2`` suffixes)."""
    seen: dict[str, int] = {}
    out = set()
    for line in FENCE.sub("", page.read_text(encoding="utf-8")).splitlines():
        match = re.match(r"#{1,6} (.+)", line)
        if not match:
            continue
        base = slug(match.group(1))
        count = seen.get(base, 0)
        seen[base] = count + 1
        out.add(base if count == 0 else f"{base}-{count}")
    return out


def broken_links(page: Path) -> list[str]:
    """The relative links of ``page`` whose file (or heading anchor) does not exist."""
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    broken = []
    for target in LINK.findall(text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...
            continue
        path_part, _, anchor = target.partition("#")
        resolved = (page.parent / path_part).resolve() if path_part else page
        if not resolved.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{target} (no such heading)")
    return broken


@pytest.mark.parametrize("page", _params())
def test_links_resolve(page: Path) -> None:
    assert broken_links(page) == [], f"{_name(page)}: broken links"


@pytest.mark.parametrize("page", _params())
def test_no_diary_words_and_no_file_outside_the_repo(page: Path) -> None:
    hits = [f"{n}: {line.strip()}" for n, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1)
            if DIARY.search(line) or OUTSIDE.search(line)]
    assert hits == [], f"{_name(page)} reads as a diary or cites a file not in the repo"


@pytest.mark.parametrize("page", _params())
def test_cited_results_files_exist(page: Path) -> None:
    missing = sorted({name for name in RESULTS_CITED.findall(page.read_text(encoding="utf-8"))
                      if not (RESULTS / name).exists()})
    assert missing == [], f"{_name(page)} cites results files that are not in docs/results"


def _results_files() -> list[object]:
    return [pytest.param(p, id=p.name) for p in sorted(RESULTS.iterdir()) if p.is_file()]


@pytest.mark.parametrize("path", _results_files())
def test_results_file_is_stamped(path: Path) -> None:
    """Commit (the full hash), machine, config and date, as a JSON key, a CSV column or a header line."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        data = json.loads(text)
        assert re.fullmatch(r"[0-9a-f]{40}", str(data.get("commit", ""))), f"{path.name}: no full commit hash"
        for key in ("machine", "config", "date"):
            assert data.get(key), f"{path.name}: no {key!r}"
    elif path.suffix == ".csv":
        rows = list(csv.DictReader(text.splitlines()))
        assert rows, f"{path.name}: empty"
        for row in rows:
            assert re.fullmatch(r"[0-9a-f]{40}", row.get("commit") or ""), f"{path.name}: row without commit"
            assert row.get("machine") and row.get("date"), f"{path.name}: row without machine or date"
    else:
        head = "\n".join(text.splitlines()[:5])
        assert re.search(r"measured at the code of `?[0-9a-f]{7}", head, re.IGNORECASE), f"{path.name}: no stamp"
        assert re.search(r"\b[0-9a-f]{40}\b", head), f"{path.name}: no full commit hash in its header"
        assert re.search(r"\b20\d\d-\d\d-\d\d\b", head), f"{path.name}: no date in its header"


def test_slug_follows_github() -> None:
    assert slug("Per window (`benchmarks/window_speed.py`)") == "per-window-benchmarkswindow_speedpy"
    assert slug("Dataset layouts (`covidseg.data.layouts`)") == "dataset-layouts-covidsegdatalayouts"
    assert slug("5. Training on several GPUs and nodes") == "5-training-on-several-gpus-and-nodes"


def test_a_broken_link_and_a_diary_word_are_caught(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("# Title\n\nSee [here](missing.md), [there](page.md#title) and [gone](page.md#nowhere).\n"
                    "In the second pass we read METHOD.md.\n", encoding="utf-8")
    assert broken_links(page) == ["missing.md (no such file)", "page.md#nowhere (no such heading)"]
    assert DIARY.search("In the second pass") and DIARY.search("issue 7") and OUTSIDE.search("see METHOD.md")
    assert not DIARY.search("ort_session.run(...)") and not OUTSIDE.search("[method.md](method.md)")
