"""The stamp every benchmark writes into its results file: commit, config, machine and date.

``docs/results/`` holds one current file per benchmark; each says at which code, with which settings and on which
machine its figures were measured, so that a reader can reproduce them (``tests/test_docs.py`` checks the keys).
Benchmarks import it as ``from _stamp import stamp, write_results`` (``python benchmarks/x.py`` puts this folder on
the path).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CODE_PATHS = ("src", "benchmarks", "scripts", "pyproject.toml")
"""What decides a benchmark's figures: ``commit_dirty`` says whether these differ from the commit (a benchmark that
rewrites its own results or pictures under ``docs/`` does not make its stamp dirty)."""
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")
"""CPU flags that decide the CPU's inference path (AVX2 or AVX-512 kernels; native bfloat16 or not)."""


def git_commit(root: Path = ROOT) -> tuple[str | None, bool]:
    """The full commit hash of ``root``'s checkout and whether its tracked code (:data:`CODE_PATHS`) differs from
    it; ``(None, False)`` outside a git checkout."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10, check=False)
        if head.returncode == 0:
            dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no", "--",
                                    *CODE_PATHS],
                                   capture_output=True, text=True, timeout=10, check=False)
            return head.stdout.strip(), bool(dirty.stdout.strip())
    return None, False


def commit_or_unknown(root: Path = ROOT) -> tuple[str, bool]:
    """:func:`git_commit` for a results file: ``"unknown"`` outside a git checkout, with a warning on stderr (a
    results file whose figures cannot be traced to a commit fails ``tests/test_docs.py``; run the benchmark from a
    clone or a ``git worktree`` instead of a code export)."""
    commit, dirty = git_commit(root)
    if commit is None:
        print(f"warning: {root} is not a git checkout, so the results file will say commit 'unknown'; run the "
              "benchmark from a clone or a git worktree to stamp it with its commit", file=sys.stderr)
        return "unknown", False
    return commit, dirty


def cpu_flags() -> dict[str, bool]:
    """Which of :data:`CPU_FLAGS` this CPU has (``/proc/cpuinfo``; all false where it cannot be read)."""
    flags: set[str] = set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    return {name: name in flags for name in CPU_FLAGS}


def machine(device: str = "cpu") -> dict[str, Any]:
    """The machine a benchmark ran on: CPU model and flags, cores, load, OS, python, torch, the GPU if used."""
    import torch

    from covidseg.training.trainer import cpu_model

    out: dict[str, Any] = {
        "cpu": cpu_model(), "cpu_flags": cpu_flags(), "logical_cores": os.cpu_count(),
        "os": f"{platform.system()} {platform.release()}", "python": platform.python_version(),
        "torch": torch.__version__,
    }
    with contextlib.suppress(OSError, AttributeError):
        out["load_average_1min"] = round(os.getloadavg()[0], 2)  # other jobs on a shared machine slow every figure
    if device.startswith("cuda") and torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return out


def stamp(config: dict[str, Any], device: str = "cpu") -> dict[str, Any]:
    """``commit`` (full hash), ``commit_dirty``, ``config`` (the benchmark, its command line and settings),
    ``machine`` and ``date`` (ISO, local) for a results file."""
    commit, dirty = commit_or_unknown()
    script = Path(sys.argv[0]).resolve()
    name = script.relative_to(ROOT).as_posix() if script.is_relative_to(ROOT) else sys.argv[0]
    command = " ".join(["python", name, *sys.argv[1:]])
    return {"commit": commit, "commit_dirty": dirty, "config": {"command": command, **config},
            "machine": machine(device), "date": time.strftime("%Y-%m-%d")}


def write_results(path: Path, result: dict[str, Any], config: dict[str, Any], device: str = "cpu") -> Path:
    """Write ``result`` with its :func:`stamp` as indented JSON to ``path`` (folders made as needed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**stamp(config, device), **result}, indent=2, default=str) + "\n",
                    encoding="utf-8")
    return path


def stamp_line(stamp_: dict[str, Any]) -> str:
    """The stamp as one Markdown line for the head of a results page (``.md``): commit, date, machine, command."""
    commit, m = str(stamp_["commit"]), stamp_["machine"]
    flags = ", ".join(name for name, on in m["cpu_flags"].items() if on) or "none of " + ", ".join(CPU_FLAGS)
    where = f"{m['gpu']}, " if m.get("gpu") else ""
    dirty = " plus uncommitted changes" if stamp_.get("commit_dirty") else ""
    return (f"Measured at the code of `{commit[:7]}` (commit {commit}{dirty}) on {stamp_['date']}: {where}"
            f"{m['cpu']} ({m['logical_cores']} logical cores; {flags}), torch {m['torch']}; "
            f"`{stamp_['config']['command']}`.")
