"""Multi-process training through PyTorch's own engine (DDP), started by ``torchrun``.

``torchrun --nproc_per_node N -m covidseg train ...`` sets ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE``;
:func:`init_distributed` then joins the process group (``nccl`` on GPUs, ``gloo`` on CPUs); the ranks and the device
``cuda:LOCAL_RANK`` come from :mod:`covidseg.runtime`. Multi-node runs use torchrun's ``--nnodes`` /
``--rdzv-endpoint`` as usual. A plain ``covidseg train`` runs one process and touches no process group.

Rank 0 alone writes the run folder (config, metrics, checkpoints) and validates; the other ranks wait at a
barrier. The patch stream is sharded by :class:`~covidseg.training.sampler.StepBatchSampler`.
"""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist

from covidseg.errors import ConfigError
from covidseg.runtime import DistInfo

TIMEOUT_MINUTES = 60
"""Process-group timeout: rank 0 validating or building the cache must not make the others give up."""


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
