"""Where and how computation runs: the process's rank, the device, the precision policy and the thread count.

One home for what every command decides before it computes:

- :func:`process_rank`: rank, local rank and world size from torchrun's (or SLURM's by hand) ``RANK``,
  ``LOCAL_RANK``, ``WORLD_SIZE``; one process of one without them.
- :func:`resolve_device`: a request ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` as a :class:`torch.device`; a bare
  ``cuda`` becomes ``cuda:LOCAL_RANK`` when a local rank is given, so that each process of a node takes its own GPU.
  A missing GPU is a :class:`~covidseg.errors.UserError` naming the setting.
- :func:`autocast_dtype`: the mixed-precision policy of training (``auto``, ``bf16``, ``fp16``, ``off``).
- :func:`bf16_enabled` and :func:`native_bf16_cpu`: whether inference computes in bfloat16 (``auto``, ``on``,
  ``off``).
- :func:`torch_threads`: the intra-op thread count for a block of code, restored afterwards.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import platform
from collections.abc import Iterator

import torch

from covidseg.errors import ConfigError, UserError

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"
"""The device requests :func:`resolve_device` takes, as error messages list them."""
AMP_MODES: tuple[str, ...] = ("auto", "bf16", "fp16", "off")
"""Mixed-precision modes of :func:`autocast_dtype`."""
BF16_MODES: tuple[str, ...] = ("auto", "on", "off")
"""bfloat16 modes of :func:`bf16_enabled`."""
X86_MACHINES = ("x86_64", "amd64", "x86", "i386", "i686")
"""``platform.machine()`` names of x86 CPUs (AVX512-BF16 / AMX decide native bfloat16 there)."""


# --------------------------------------------------------------------------------------------- processes


@dataclasses.dataclass(frozen=True)
class DistInfo:
    """Where this process stands in a (possibly one-process) run."""

    rank: int = 0
    local_rank: int = 0
    """The process's index on its node: its GPU."""
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Whether this process writes files and shows progress."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        """Whether a process group is in use."""
        return self.world_size > 1


def process_rank() -> DistInfo:
    """Rank, local rank and world size from torchrun's environment (one process without it)."""
    return DistInfo(
        rank=int(os.environ.get("RANK", 0)),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        world_size=int(os.environ.get("WORLD_SIZE", 1)),
    )


# --------------------------------------------------------------------------------------------- devices


def _named(setting: str, request: str) -> str:
    """``--device cuda`` for a command-line option, ``train.device='cuda'`` for a config key."""
    return f"{setting} {request}" if setting.startswith("-") else f"{setting}={request!r}"


def resolve_device(request: str | torch.device | None, local_rank: int | None = None, *,
                   setting: str = "--device", bind: bool = False) -> torch.device:
    """The device a request names.

    Args:
        request: ``auto`` (CUDA when a GPU is visible, else the CPU), ``cpu``, ``cuda``, ``cuda:N`` or a
            :class:`torch.device`; ``None`` or ``""`` is the CPU.
        local_rank: the process's index on its node; a bare ``cuda`` becomes ``cuda:local_rank``. ``None`` leaves
            a bare ``cuda`` as torch's current GPU.
        setting: the option or config key the request came from, named in errors (``--device``, ``train.device``).
        bind: make a CUDA device torch's current one (``torch.cuda.set_device``), as DDP wants.

    Raises:
        ConfigError: a request that is not one of :data:`DEVICE_CHOICES`.
        UserError: a CUDA request without a visible GPU, or a GPU index beyond the GPUs there are.
    """
    text = str(request) if request is not None else ""
    if not text:
        return torch.device("cpu")
    if text == "auto":
        text = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise ConfigError(f"{_named(setting, text)}: expected {DEVICE_CHOICES}") from None
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type != "cuda":
        raise ConfigError(f"{_named(setting, text)}: expected {DEVICE_CHOICES}")
    if not torch.cuda.is_available():
        raise UserError(f"{_named(setting, text)}: no CUDA GPU is visible to this torch ({torch.__version__}); "
                        "use --device cpu (or install a CUDA build of torch on a machine with a GPU)")
    if device.index is None and local_rank is not None:
        device = torch.device("cuda", int(local_rank))
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"{_named(setting, text)}: GPU {device.index} asked for but {torch.cuda.device_count()} "
                        f"visible; use cuda:0..cuda:{torch.cuda.device_count() - 1} (or fewer processes per node)")
    if bind:
        torch.cuda.set_device(device)
    return device


# --------------------------------------------------------------------------------------------- precision


def autocast_dtype(amp: str, device: torch.device, setting: str = "train.amp") -> torch.dtype | None:
    """The autocast dtype of mixed-precision training (``None`` = full float32).

    ======  ===========================================  =====================================
    amp     CUDA GPU                                     CPU
    ======  ===========================================  =====================================
    auto    bfloat16 where the GPU has it, else float16  float32
    bf16    bfloat16                                     bfloat16
    fp16    float16 (with a gradient scaler)             ConfigError (no fp16 scaler on CPUs)
    off     float32                                      float32
    ======  ===========================================  =====================================

    Raises:
        ConfigError: an unknown mode, or ``fp16`` on a CPU.
    """
    if amp not in AMP_MODES:
        raise ConfigError(f"{_named(setting, amp)}: expected one of {', '.join(AMP_MODES)}")
    if amp == "off":
        return None
    if device.type == "cuda":
        if amp == "fp16":
            return torch.float16
        if amp == "bf16" or torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float16
    if amp == "bf16":
        return torch.bfloat16
    if amp == "fp16":
        raise ConfigError(f"{_named(setting, amp)} needs a CUDA GPU; on CPUs use bf16 or off")
    return None  # auto on a CPU: float32


def native_bf16_cpu() -> bool:
    """Whether this CPU computes bfloat16 natively: AVX512-BF16 or AMX on x86, the BF16 extension on Arm.

    oneDNN's own check (``torch.ops.mkldnn._is_mkldnn_bf16_supported``) also says yes for any AVX-512 CPU, where
    oneDNN emulates bfloat16 with float32 arithmetic: the answer changes (bf16 rounding) without the native speed-up
    measured in docs/performance.md, so ``auto`` stays in float32 there.
    """
    try:
        if platform.machine().lower() in X86_MACHINES:
            return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def bf16_enabled(mode: str, device: torch.device) -> bool:
    """Whether inference computes in bfloat16: ``on``, ``off``, or ``auto`` = where the hardware computes bfloat16
    natively (:func:`native_bf16_cpu`; CUDA GPUs of compute capability >= 8.0)."""
    if mode == "off":
        return False
    if mode == "on":
        return True
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    if device.type == "cpu":
        return native_bf16_cpu()
    return False


# --------------------------------------------------------------------------------------------- threads


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run a block with ``count`` torch intra-op threads (``0`` = leave torch's setting), restored afterwards, so
    that a library call leaves the process as it found it."""
    before = torch.get_num_threads()
    if count > 0:
        torch.set_num_threads(int(count))
    try:
        yield
    finally:
        torch.set_num_threads(before)
