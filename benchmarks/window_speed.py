"""Benchmark: seconds per 8x128x128 window of the report's full model, for each way of running it (issue 7).

The settings compared, interleaved in one run (each repeat runs every setting once, so that the load of a shared
machine spreads over all of them; the median over repeats is reported):

- ``autocast``: the training module (batch norm separate, float32 weights) under bfloat16 autocast, input in
  ``channels_last_3d``: what ``segment`` did before ``covidseg.models.deploy``;
- ``deploy bf16``: :func:`covidseg.models.deploy.deploy_copy` in bfloat16 (batch norm folded, FV gates folded,
  weights bf16 and channels-last): what ``segment`` does where the CPU has native bf16;
- ``bf16 no gate fold``: batch norm folded only: the inference form before the FV gate folding;
- ``float32``: the training module in float32, contiguous input;
- ``deploy float32``: :func:`~covidseg.models.deploy.deploy_copy` in float32, channels-last: ``segment`` with
  ``runtime.bf16=off`` or on a CPU without native bf16;
- ``fp32 plain convs``: ``deploy float32`` by plain torch convolutions instead of oneDNN's fused operators (the
  per-sample ones take torch's slow path for a float32 batch of one);
- ``fp32 no gate fold``: batch norm folded only, plain convolutions, float32: the float32 inference form before the
  gates were folded in float32 too;

each with a batch of 1 and of 2 windows (seconds per window); with ``--extra`` also the model run by ONNX
Runtime (float32; ``segment --backend onnxruntime``) and a frozen TorchScript of the inference form (oneDNN
convolution + ReLU fusion), each with the seconds it takes to prepare. In float32 torch sends a batch of 1 with few channels
through its im2col path rather than oneDNN (``ConvParams::use_mkldnn`` in ATen's Convolution.cpp: a batch of 1 with
``N * C * D * H`` at most 20480 stays native), which is why ``runtime.batch_windows`` defaults to 2.

Run: ``python benchmarks/window_speed.py --threads 2 --json out.json``. Random weights (the speed does not depend
on them); the GFLOP per window are counted by :func:`covidseg.models.flops.count_flops`; the last column is the
largest |logit| difference of each setting from the float32 training module on the same random window (its
batch norm at the initial statistics, so folding it is nearly the identity; tests/test_deploy.py checks folds of
random statistics).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import torch
from torch import nn

from covidseg.models import deploy
from covidseg.models.deploy import deploy_copy
from covidseg.models.registry import create_model, variant_config
from covidseg.runtime import native_bf16_cpu
from covidseg.training.trainer import cpu_model

WINDOW = (8, 128, 128)
"""The report's training patch (D, H, W): segment's default window."""


class OrtWindow(nn.Module):
    """The model exported to ONNX (covidseg's exporter) and run by ONNX Runtime on the CPU, float32."""

    def __init__(self, model: nn.Module, threads: int) -> None:
        super().__init__()
        import onnxruntime as ort

        from covidseg.exchange import INPUT_NAME, onnx_bytes

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        self.session = ort.InferenceSession(onnx_bytes(model, torch.rand(1, 1, *WINDOW), {}), sess_options=options,
                                            providers=["CPUExecutionProvider"])
        self.input_name = INPUT_NAME

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 1, D, H, W)`` -> logits."""
        return torch.from_numpy(self.session.run(None, {self.input_name: x.contiguous().numpy()})[0])


class PlainConvs(nn.Module):
    """Runs an inference copy with plain torch convolutions instead of oneDNN's fused operators."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The copy's logits."""
        with mock.patch.object(deploy, "_fused", lambda t: False):
            return self.module(x)


def bn_folded(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """The inference form before the FV gate folding: batch norm folded, weights in ``dtype`` and channels-last."""
    out = deploy.fuse_relu(deploy.fold_batch_norm(copy.deepcopy(model).eval()))
    return out.to(dtype=dtype).to(memory_format=torch.channels_last_3d)  # type: ignore[call-overload, no-any-return]


def frozen_torchscript(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """The inference form traced, frozen and optimised by TorchScript (oneDNN fusions of convolution + ReLU)."""
    deployed = deploy_copy(model, dtype, channels_last=True)
    x = torch.rand(1, 1, *WINDOW).to(dtype).contiguous(memory_format=torch.channels_last_3d)
    with torch.no_grad():
        traced = torch.jit.trace(deployed, x, check_trace=False)
        return torch.jit.optimize_for_inference(torch.jit.freeze(traced.eval()))


def settings(model: nn.Module, threads: int, extra: bool) -> tuple[dict[str, tuple[nn.Module, torch.dtype, bool, bool]],
                                                                   dict[str, float]]:
    """name -> (module, input dtype, channels-last input, autocast), and name -> seconds spent preparing it."""
    native_bf16 = native_bf16_cpu()
    out: dict[str, tuple[nn.Module, torch.dtype, bool, bool]] = {}
    prep: dict[str, float] = {}

    def add(name: str, make: Callable[[], nn.Module], dtype: torch.dtype, channels_last: bool, autocast: bool) -> None:
        t = time.perf_counter()
        out[name] = (make(), dtype, channels_last, autocast)
        prep[name] = time.perf_counter() - t

    add("float32", lambda: model, torch.float32, False, False)
    add("deploy float32", lambda: deploy_copy(model, torch.float32, channels_last=True), torch.float32, True, False)
    add("fp32 plain convs", lambda: PlainConvs(deploy_copy(model, torch.float32, channels_last=True)),
        torch.float32, True, False)
    add("fp32 no gate fold", lambda: PlainConvs(bn_folded(model, torch.float32)), torch.float32, True, False)
    if native_bf16:
        add("autocast", lambda: model, torch.float32, True, True)
        add("deploy bf16", lambda: deploy_copy(model, torch.bfloat16, channels_last=True), torch.bfloat16, True, False)
        add("bf16 no gate fold", lambda: bn_folded(model, torch.bfloat16), torch.bfloat16, True, False)
    if extra:
        add("onnxruntime fp32", lambda: OrtWindow(model, threads), torch.float32, False, False)
        dtype = torch.bfloat16 if native_bf16 else torch.float32
        add("torchscript " + ("bf16" if native_bf16 else "fp32"), lambda: frozen_torchscript(model, dtype), dtype,
            True, False)
    return out, prep


def profile(model: nn.Module) -> int:
    """Print torch.profiler's table of segment's inference form (bf16 where the CPU has it) over 3 calls."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    dtype = torch.bfloat16 if native_bf16_cpu() else torch.float32
    deployed = deploy_copy(model, dtype, channels_last=True)
    x = torch.rand(2, 1, *WINDOW).to(dtype).contiguous(memory_format=torch.channels_last_3d)
    with torch.inference_mode():
        for _ in range(2):
            deployed(x)
        with torch_profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            for _ in range(3):
                deployed(x)
    print(f"{cpu_model()}, {torch.get_num_threads()} threads, {dtype}, 3 calls of a batch of 2 windows {WINDOW}")
    print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=30,
                                                             max_name_column_width=34, max_shapes_column_width=70))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats of every setting (median reported)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 2], help="windows per call")
    p.add_argument("--json", type=Path, default=None, help="write the table as JSON")
    p.add_argument("--extra", action="store_true",
                   help="also ONNX Runtime (float32) and a frozen TorchScript of the inference form (with the time "
                        "each takes to prepare: they pay only if that is won back over a CT's windows)")
    p.add_argument("--profile", action="store_true",
                   help="only profile segment's inference form (torch.profiler, a batch of 2 windows, 3 calls) and "
                        "print its operators by time, with their input shapes")
    args = p.parse_args(argv)

    from covidseg.models.flops import count_flops

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = create_model(variant_config("unet-fv-paspp-ds")).eval().set_deep_supervision(False)
    if args.profile:
        return profile(model)
    gflop = count_flops(model, (1, 1, *WINDOW)) / 1e9
    runs, prep = settings(model, args.threads, args.extra)
    times: dict[tuple[str, int], list[float]] = {(name, b): [] for name in runs for b in args.batches}
    inputs = {b: torch.rand(b, 1, *WINDOW) for b in args.batches}

    def call(name: str, batch: int) -> Callable[[], object]:
        module, dtype, channels_last, autocast = runs[name]
        x = inputs[batch].to(dtype)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        ctx = torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast)

        def run() -> object:
            with ctx:
                return module(x)
        return run

    diffs: dict[str, float] = {}
    with torch.inference_mode():
        for key in times:  # warm-up (oneDNN primitive creation)
            call(*key)()
        reference = model(inputs[args.batches[0]])  # float32, the training module: what each setting approximates
        for name in runs:
            diffs[name] = float((torch.as_tensor(call(name, args.batches[0])()).float() - reference).abs().max())
        for _ in range(args.repeats):
            for key in times:
                fn = call(*key)
                t = time.perf_counter()
                fn()
                times[key].append((time.perf_counter() - t) / key[1])
    rows = []
    print(f"{cpu_model()}, {args.threads} threads, torch {torch.__version__}; window {WINDOW}, {gflop:.1f} GFLOP")
    print(f"{'setting':<18} {'batch':>5} {'s/window':>9} {'GFLOP/s':>8} {'prepare s':>9} {'max |logit diff|':>16}")
    for (name, batch), values in times.items():
        s = statistics.median(values)
        rows.append({"setting": name, "batch": batch, "s_per_window": s, "gflop_per_s": gflop / s,
                     "prepare_s": prep[name], "max_abs_logit_diff_vs_float32": diffs[name], "all_s": values})
        print(f"{name:<18} {batch:>5} {s:>9.4f} {gflop / s:>8.0f} {prep[name]:>9.2f} {diffs[name]:>16.2e}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"cpu": cpu_model(), "threads": args.threads, "torch": torch.__version__,
                                         "window": list(WINDOW), "gflop_per_window": gflop, "rows": rows,
                                         "date": time.strftime("%Y-%m-%d")}, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
