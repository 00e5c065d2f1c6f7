"""Device, rank, precision and thread policy (covidseg.runtime), on the CPU with the CUDA checks monkeypatched."""

from __future__ import annotations

import platform

import pytest
import torch

from covidseg import runtime
from covidseg.errors import ConfigError, UserError
from covidseg.runtime import (
    autocast_dtype,
    bf16_enabled,
    native_bf16_cpu,
    process_rank,
    resolve_device,
    torch_threads,
)


@pytest.fixture
def gpus(monkeypatch: pytest.MonkeyPatch):
    """Pretend torch sees ``n`` GPUs (``bf16`` = whether they compute bfloat16); records ``set_device`` calls."""
    bound: list[torch.device] = []

    def fake(n: int, bf16: bool = True) -> list[torch.device]:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
        monkeypatch.setattr(torch.cuda, "set_device", lambda d: bound.append(torch.device(d)))
        return bound

    return fake


def test_process_rank_from_torchrun_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    alone = process_rank()
    assert (alone.rank, alone.local_rank, alone.world_size, alone.is_main, alone.enabled) == (0, 0, 1, True, False)
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "8")
    me = process_rank()
    assert (me.rank, me.local_rank, me.world_size, me.is_main, me.enabled) == (5, 1, 8, False, True)


@pytest.mark.parametrize("request_, expected", [(None, "cpu"), ("", "cpu"), ("cpu", "cpu"), ("auto", "cpu"),
                                               (torch.device("cpu"), "cpu")])
def test_cpu_requests_without_a_gpu(gpus, request_, expected: str) -> None:
    gpus(0)
    assert resolve_device(request_) == torch.device(expected)


@pytest.mark.parametrize("request_", ["gpu", "cuda:x", "mps", "tpu:0"])
def test_unknown_device_is_a_config_error_naming_the_setting(gpus, request_: str) -> None:
    gpus(1)
    with pytest.raises(ConfigError, match=r"train\.device=.*expected auto, cpu, cuda or cuda:N"):
        resolve_device(request_, setting="train.device")


@pytest.mark.parametrize("request_", ["cuda", "cuda:0", "auto"])
def test_cuda_without_a_gpu(gpus, request_: str) -> None:
    gpus(0)
    if request_ == "auto":
        assert resolve_device(request_).type == "cpu"
        return
    with pytest.raises(UserError, match=f"--device {request_}: no CUDA GPU"):
        resolve_device(request_)
    with pytest.raises(UserError, match=f"train.device='{request_}': no CUDA GPU.*--device cpu"):
        resolve_device(request_, setting="train.device")


def test_bare_cuda_takes_the_local_rank_gpu(gpus) -> None:
    bound = gpus(4)
    assert resolve_device("cuda") == torch.device("cuda")  # no rank: torch's current GPU
    assert resolve_device("cuda", local_rank=2) == torch.device("cuda", 2)
    assert resolve_device("auto", local_rank=3) == torch.device("cuda", 3)
    assert resolve_device("cuda:1", local_rank=3) == torch.device("cuda", 1)  # an explicit index wins
    assert bound == []
    assert resolve_device("cuda", local_rank=1, bind=True) == torch.device("cuda", 1)
    assert bound == [torch.device("cuda", 1)]


def test_gpu_index_beyond_the_gpus_there_are(gpus) -> None:
    gpus(2)
    with pytest.raises(UserError, match="GPU 2 asked for but 2 visible"):
        resolve_device("cuda", local_rank=2)
    with pytest.raises(UserError, match="cuda:5"):
        resolve_device("cuda:5")


@pytest.mark.parametrize("amp, bf16_gpu, expected", [
    ("auto", True, torch.bfloat16), ("auto", False, torch.float16), ("bf16", False, torch.bfloat16),
    ("fp16", True, torch.float16), ("off", True, None),
])
def test_autocast_on_a_gpu(gpus, amp: str, bf16_gpu: bool, expected: torch.dtype | None) -> None:
    gpus(1, bf16=bf16_gpu)
    assert autocast_dtype(amp, torch.device("cuda", 0)) is expected


def test_autocast_on_the_cpu() -> None:
    cpu = torch.device("cpu")
    assert autocast_dtype("auto", cpu) is None
    assert autocast_dtype("off", cpu) is None
    assert autocast_dtype("bf16", cpu) is torch.bfloat16
    with pytest.raises(ConfigError, match="--amp fp16 needs a CUDA GPU"):
        autocast_dtype("fp16", cpu, setting="--amp")
    with pytest.raises(ConfigError, match="expected one of auto, bf16, fp16, off"):
        autocast_dtype("half", cpu)


@pytest.mark.parametrize("machine, avx512_bf16, amx, expected", [
    ("x86_64", True, False, True), ("x86_64", False, True, True), ("x86_64", False, False, False),
    ("aarch64", False, False, True),  # Arm: oneDNN's own check (the BF16 extension) decides
])
def test_auto_bf16_only_where_the_cpu_has_it_natively(monkeypatch: pytest.MonkeyPatch, machine: str,
                                                       avx512_bf16: bool, amx: bool, expected: bool) -> None:
    monkeypatch.setattr(platform, "machine", lambda: machine)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)  # any AVX-512 says yes here
    cpu = torch.device("cpu")
    assert native_bf16_cpu() is expected
    assert bf16_enabled("auto", cpu) is expected
    assert bf16_enabled("on", cpu) is True
    assert bf16_enabled("off", cpu) is False


def test_auto_bf16_on_a_gpu_follows_the_gpu(gpus) -> None:
    gpus(1, bf16=False)
    assert bf16_enabled("auto", torch.device("cuda", 0)) is False
    gpus(1, bf16=True)
    assert bf16_enabled("auto", torch.device("cuda", 0)) is True


def test_missing_private_probe_means_no_native_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")
    assert native_bf16_cpu() is False


def test_thread_count_is_restored() -> None:
    before = torch.get_num_threads()
    target = 1 if before != 1 else 2
    with torch_threads(target):
        assert torch.get_num_threads() == target
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError), torch_threads(target):
        raise RuntimeError("restored on errors too")
    assert torch.get_num_threads() == before
    with torch_threads(0):  # 0: torch's own setting, untouched
        assert torch.get_num_threads() == before


def test_every_device_request_goes_through_runtime() -> None:
    """The device, the rank and the precision policy have one home: no other module defines them."""
    import ast
    from pathlib import Path

    src = Path(runtime.__file__).parent
    owned = {"resolve_device", "autocast_dtype", "amp_dtype", "bf16_enabled", "native_bf16_cpu", "env_info",
             "process_rank", "run_device"}
    found = []
    for path in src.rglob("*.py"):
        if path.name == "runtime.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name in owned | {"DistInfo"}:
                found.append(f"{path.relative_to(src)}:{node.lineno} {node.name}")
    assert not found, f"defined outside covidseg/runtime.py: {found}"
