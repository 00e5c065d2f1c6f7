"""Training: the preprocessed-case cache, seeded patch sampling, the trainer (DDP-ready) and the report's experiments.

Heavy modules are imported on first use; see :mod:`covidseg.training.trainer` and
:mod:`covidseg.training.experiments`.
"""

from __future__ import annotations

from typing import Any

__all__ = ["run_experiment", "train"]


def __getattr__(name: str) -> Any:
    if name == "train":
        from covidseg.training.trainer import train

        return train
    if name == "run_experiment":
        from covidseg.training.experiments import run_experiment

        return run_experiment
    raise AttributeError(name)
