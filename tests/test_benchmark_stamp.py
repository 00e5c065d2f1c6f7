"""benchmarks/_stamp.py: every benchmark's results file carries the stamp tests/test_docs.py asks of docs/results."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def stamp_module():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("_stamp", ROOT / "benchmarks" / "_stamp.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_results_file_is_stamped_with_commit_config_machine_and_date(stamp_module, tmp_path, monkeypatch) -> None:
    commit, _ = stamp_module.git_commit()
    if commit is None:
        pytest.skip("not a git checkout: the stamp's commit is 'unknown'")
    monkeypatch.setattr(sys, "argv", [str(ROOT / "benchmarks" / "window_speed.py"), "--threads", "2"])
    path = stamp_module.write_results(tmp_path / "r" / "out.json", {"rows": [1]}, {"benchmark": "b", "threads": 2})
    data = json.loads(path.read_text(encoding="utf-8"))
    assert re.fullmatch(r"[0-9a-f]{40}", data["commit"]) and data["commit"] == commit
    assert isinstance(data["commit_dirty"], bool)
    assert data["config"] == {"command": "python benchmarks/window_speed.py --threads 2", "benchmark": "b",
                              "threads": 2}
    assert re.fullmatch(r"20\d\d-\d\d-\d\d", data["date"])
    assert data["machine"]["cpu"] and data["machine"]["torch"]
    assert set(data["machine"]["cpu_flags"]) == set(stamp_module.CPU_FLAGS)
    assert data["rows"] == [1]
    line = stamp_module.stamp_line(data)
    assert f"`{commit[:7]}`" in line and commit in line and data["date"] in line


def test_cpu_flags_read_from_cpuinfo(stamp_module, tmp_path, monkeypatch) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor : 0\nflags : fpu sse2 avx2 fma\n", encoding="utf-8")
    real = stamp_module.Path

    def fake(p: str | Path) -> Path:
        return cpuinfo if str(p) == "/proc/cpuinfo" else real(p)

    monkeypatch.setattr(stamp_module, "Path", fake)
    assert stamp_module.cpu_flags() == {"avx2": True, "avx512f": False, "avx512_bf16": False, "amx_bf16": False}


def test_only_a_change_to_the_code_makes_the_stamp_dirty(stamp_module, tmp_path) -> None:
    import shutil
    import subprocess

    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    repo = tmp_path / "repo"
    for name in ("src/covidseg/a.py", "docs/results/r.json", "docs/images/p.png"):
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_text("0\n", encoding="utf-8")

    def git(*args: str) -> None:
        subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)

    git("init", "-q")
    git("add", "-A")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "c")
    assert stamp_module.git_commit(repo)[1] is False
    # a benchmark rewriting its results and pictures: still the code of the commit
    (repo / "docs/results/r.json").write_text("1\n", encoding="utf-8")
    (repo / "docs/images/p.png").write_text("1\n", encoding="utf-8")
    assert stamp_module.git_commit(repo)[1] is False
    (repo / "src/covidseg/a.py").write_text("1\n", encoding="utf-8")
    assert stamp_module.git_commit(repo)[1] is True


def test_a_code_export_stamps_unknown_and_says_so(stamp_module, tmp_path, capsys) -> None:
    """Outside a git checkout (a `git archive` export) the commit is 'unknown', and stderr says how to avoid it."""
    export = tmp_path / "export"
    export.mkdir()
    assert stamp_module.commit_or_unknown(export) == ("unknown", False)
    err = capsys.readouterr().err
    assert "not a git checkout" in err and str(export) in err and "git worktree" in err
    commit, _ = stamp_module.git_commit()
    if commit is not None:  # this checkout: its commit and no warning
        assert stamp_module.commit_or_unknown()[0] == commit
        assert capsys.readouterr().err == ""
