"""Multi-process training through PyTorch's own engine (DDP), started by ``torchrun``.

``torchrun --nproc_per_node N -m covidseg train ...`` sets ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE``;
:func:`init_distributed` then joins the process group (``nccl`` on GPUs, ``gloo`` on CPUs) and picks the device
``cuda:LOCAL_RANK``. Multi-node runs use torchrun's ``--nnodes`` / ``--rdzv-endpoint`` as usual. A plain
``covidseg train`` runs one process and touches no process group.

Rank 0 alone writes the run folder (config, metrics, checkpoints) and validates; the other ranks wait at a
barrier. The patch stream is sharded by :class:`~covidseg.training.sampler.StepBatchSampler`.
"""

from __future__ import annotations

import dataclasses
import datetime
import os

import torch
import torch.distributed as dist

from covidseg.errors import ConfigError

TIMEOUT_MINUTES = 60
"""Process-group timeout: rank 0 validating or building the cache must not make the others give up."""


@dataclasses.dataclass(frozen=True)
class DistInfo:
    """Where this process stands in a (possibly one-process) run."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Whether this process writes files and shows progress."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        """Whether a process group is in use."""
        return self.world_size > 1


def env_info() -> DistInfo:
    """Rank, local rank and world size from torchrun's environment (one process without it)."""
    return DistInfo(
        rank=int(os.environ.get("RANK", 0)),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        world_size=int(os.environ.get("WORLD_SIZE", 1)),
    )


def resolve_device(requested: str, info: DistInfo) -> torch.device:
    """``auto`` -> ``cuda:LOCAL_RANK`` when a GPU is there, else ``cpu``; ``cuda`` gets the local rank's GPU."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"runtime.device={requested!r} but no CUDA GPU is visible; use --device cpu")
        if requested == "cuda":
            requested = f"cuda:{info.local_rank}"
        device = torch.device(requested)
        torch.cuda.set_device(device)
        return device
    if requested != "cpu":
        raise ConfigError(f"runtime.device: expected auto, cpu, cuda or cuda:N, got {requested!r}")
    return torch.device("cpu")


def init_distributed(device: torch.device, info: DistInfo) -> None:
    """Join the process group when torchrun started several processes (no-op for one)."""
    if not info.enabled or (dist.is_available() and dist.is_initialized()):
        return
    if not dist.is_available():
        raise ConfigError("this torch build has no torch.distributed; run one process")
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=TIMEOUT_MINUTES))


def barrier(info: DistInfo) -> None:
    """Wait for every rank (no-op for one process)."""
    if info.enabled and dist.is_initialized():
        dist.barrier()


def broadcast_flag(value: bool, info: DistInfo, device: torch.device) -> bool:
    """Rank 0's ``value`` on every rank."""
    if not (info.enabled and dist.is_initialized()):
        return value
    t = torch.tensor([1 if value else 0], device=device)
    dist.broadcast(t, src=0)
    return bool(t.item())


def cleanup(info: DistInfo) -> None:
    """Leave the process group."""
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
