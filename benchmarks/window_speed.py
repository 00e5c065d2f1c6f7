"""Benchmark: seconds per 8x128x128 window of the report's full model, for each form of running it.

The forms compared, interleaved in one run (each repeat runs every form and batch once, in an order rotated from
repeat to repeat, so that the load of a shared machine spreads over all of them; medians over the repeats and the
median of the per-repeat time ratios are reported):

- ``plain float32``: the training module (``UNet`` in ``eval`` mode) in float32, contiguous input: the reference;
- ``public float32``: :func:`covidseg.models.deploy.deploy_copy` (batch norm folded, weights channels-last) in
  float32: what ``segment`` runs on a CPU without native bfloat16 or with ``runtime.bf16=off``;
- ``public float32 contiguous``: the same without channels-last (``runtime.channels_last=false``);
- ``onednn float32``: ``deploy_copy(kernels="onednn")`` (oneDNN's fused operators, the FV gates folded;
  ``runtime.cpu_kernels=onednn``);
- with ``--bf16`` (and by default where the CPU has native bfloat16): ``public bf16`` and ``onednn bf16``
  (``runtime.bf16=on``; on a CPU without native bfloat16 oneDNN emulates it, slowly);
- with ``--compile``: ``public float32 compiled``, ``torch.compile`` of the public form (inductor; minutes of
  compilation the first time: its ``prepare_s`` is the compile and first calls, to weigh against the windows of a
  CT, ``break_even_windows``);
- with ``--extra``: ONNX Runtime in float32 (``segment --backend onnxruntime``) and a frozen, optimised
  TorchScript trace of the public form;

each with a batch of 1 and of 2 windows (seconds per window). ``prepare_s`` is the time to make a form and run its
first call of each batch (oneDNN primitive creation, compilation). In float32 torch sends a batch of 1 with few
channels through its im2col path rather than oneDNN (``ConvParams::use_mkldnn`` in ATen's Convolution.cpp: a batch
of 1 with ``N * C * D * H`` at most 20480 stays native), which is why ``runtime.batch_windows`` defaults to 2.

Run: ``python benchmarks/window_speed.py --threads 2 --json out.json``. Random weights (the speed does not depend
on them); the GFLOP per window are counted by :func:`covidseg.models.flops.count_flops`; ``max_abs_logit_diff`` is
the largest |logit| difference of each form from the plain float32 model on the same random batch of windows
(batch norm at its initial statistics; tests/test_deploy.py checks folds of random statistics).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from _stamp import write_results
from torch import nn

from covidseg.models.deploy import deploy_copy
from covidseg.models.registry import create_model, variant_config
from covidseg.runtime import native_bf16_cpu
from covidseg.training.trainer import cpu_model

WINDOW = (8, 128, 128)
"""The report's training patch (D, H, W): segment's default window."""
VARIANT = "unet-fv-paspp-ds"
REFERENCE = "plain float32"
PUBLIC = "public float32"

Form = tuple[nn.Module, torch.dtype, bool]
"""A module, its input dtype and whether its input is channels-last."""


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


def frozen_torchscript(model: nn.Module) -> nn.Module:
    """The public float32 form traced, frozen and optimised by TorchScript (oneDNN fusions of convolution + ReLU)."""
    deployed = deploy_copy(model, torch.float32, channels_last=True)
    x = torch.rand(1, 1, *WINDOW).contiguous(memory_format=torch.channels_last_3d)
    with torch.no_grad():
        traced = torch.jit.trace(deployed, x, check_trace=False)
        return torch.jit.optimize_for_inference(torch.jit.freeze(traced.eval()))


def makers(model: nn.Module, args: argparse.Namespace) -> dict[str, tuple[Callable[[], nn.Module], torch.dtype, bool]]:
    """name -> (how to make the form, input dtype, channels-last input)."""
    f32, bf16 = torch.float32, torch.bfloat16
    out: dict[str, tuple[Callable[[], nn.Module], torch.dtype, bool]] = {
        REFERENCE: (lambda: model, f32, False),
        PUBLIC: (lambda: deploy_copy(model, f32, channels_last=True), f32, True),
        "public float32 contiguous": (lambda: deploy_copy(model, f32), f32, False),
        "onednn float32": (lambda: deploy_copy(model, f32, channels_last=True, kernels="onednn"), f32, True),
    }
    if args.bf16 or native_bf16_cpu():
        out["public bf16"] = (lambda: deploy_copy(model, bf16, channels_last=True), bf16, True)
        out["onednn bf16"] = (lambda: deploy_copy(model, bf16, channels_last=True, kernels="onednn"), bf16, True)
    if args.compile:
        out["public float32 compiled"] = (
            lambda: torch.compile(deploy_copy(model, f32, channels_last=True), dynamic=False), f32, True)
    if args.extra:
        out["onnxruntime float32"] = (lambda: OrtWindow(model, args.threads), f32, False)
        out["torchscript float32"] = (lambda: frozen_torchscript(model), f32, True)
    return out


def _input(x: torch.Tensor, dtype: torch.dtype, channels_last: bool) -> torch.Tensor:
    x = x.to(dtype)
    return x.contiguous(memory_format=torch.channels_last_3d) if channels_last else x


def prepare(model: nn.Module, args: argparse.Namespace, inputs: dict[int, torch.Tensor]
            ) -> tuple[dict[str, Form], dict[str, float]]:
    """Every form, and the seconds to make it and run its first call of each batch size."""
    forms: dict[str, Form] = {}
    prep: dict[str, float] = {}
    for name, (make, dtype, channels_last) in makers(model, args).items():
        t = time.perf_counter()
        module = make()
        with torch.inference_mode():
            for x in inputs.values():
                module(_input(x, dtype, channels_last))
        prep[name] = time.perf_counter() - t
        forms[name] = (module, dtype, channels_last)
        print(f"prepared {name} in {prep[name]:.1f} s", flush=True)
    return forms, prep


def time_forms(forms: dict[str, Form], inputs: dict[int, torch.Tensor], repeats: int
               ) -> dict[tuple[str, int], list[float]]:
    """Seconds per window of every (form, batch), ``repeats`` times each, interleaved in rotated order."""
    keys = [(name, b) for name in forms for b in inputs]
    times: dict[tuple[str, int], list[float]] = {key: [] for key in keys}
    with torch.inference_mode():
        for r in range(repeats):
            for name, b in keys[r % len(keys):] + keys[: r % len(keys)]:
                module, dtype, channels_last = forms[name]
                x = _input(inputs[b], dtype, channels_last)
                t = time.perf_counter()
                module(x)
                times[(name, b)].append((time.perf_counter() - t) / b)
    return times


def logit_diffs(forms: dict[str, Form], x: torch.Tensor) -> dict[str, float]:
    """The largest |logit| difference of each form from the plain float32 model on ``x``."""
    with torch.inference_mode():
        reference = forms[REFERENCE][0](x).float()
        return {name: float((torch.as_tensor(module(_input(x, dtype, cl))).float() - reference).abs().max())
                for name, (module, dtype, cl) in forms.items()}


def rows_of(times: dict[tuple[str, int], list[float]], prep: dict[str, float], diffs: dict[str, float],
            gflop: float) -> list[dict[str, object]]:
    """One row per (form, batch): medians, the median per-repeat ratios to the public and plain forms, and for a
    form that takes longer to prepare than the public one, the windows after which it has paid that back."""
    rows = []
    for (name, batch), values in times.items():
        s = statistics.median(values)
        vs_public = statistics.median(v / p for v, p in zip(values, times[(PUBLIC, batch)], strict=True))
        vs_plain = statistics.median(v / p for v, p in zip(values, times[(REFERENCE, batch)], strict=True))
        row: dict[str, object] = {
            "form": name, "batch": batch, "s_per_window": s, "gflop_per_s": gflop / s,
            "time_ratio_vs_public_float32": vs_public, "time_ratio_vs_plain_float32": vs_plain,
            "prepare_s": prep[name], "max_abs_logit_diff_vs_plain_float32": diffs[name], "all_s": values,
        }
        public_s = statistics.median(times[(PUBLIC, batch)])
        extra_prep = prep[name] - prep[PUBLIC]
        if name != PUBLIC and extra_prep > 0:
            row["break_even_windows"] = extra_prep / (public_s - s) if s < public_s else None  # None: never
        rows.append(row)
    return rows


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
    p.add_argument("--repeats", type=int, default=5, help="timed repeats of every form (median reported)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 2], help="windows per call")
    p.add_argument("--json", type=Path, default=None, help="write the table, stamped, as JSON")
    p.add_argument("--bf16", action="store_true", help="also the bfloat16 forms on a CPU without native bfloat16")
    p.add_argument("--compile", action="store_true", help="also torch.compile of the public form (minutes)")
    p.add_argument("--extra", action="store_true",
                   help="also ONNX Runtime (float32) and a frozen TorchScript of the public form")
    p.add_argument("--profile", action="store_true",
                   help="only profile segment's inference form (torch.profiler, a batch of 2 windows, 3 calls) and "
                        "print its operators by time, with their input shapes")
    args = p.parse_args(argv)

    from covidseg.models.flops import count_flops

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = create_model(variant_config(VARIANT)).eval().set_deep_supervision(False)
    if args.profile:
        return profile(model)
    gflop = count_flops(model, (1, 1, *WINDOW)) / 1e9
    inputs = {b: torch.rand(b, 1, *WINDOW) for b in args.batches}
    forms, prep = prepare(model, args, inputs)
    diffs = logit_diffs(forms, inputs[max(args.batches)])
    rows = rows_of(time_forms(forms, inputs, args.repeats), prep, diffs, gflop)
    print(f"{cpu_model()}, {args.threads} threads, torch {torch.__version__}; window {WINDOW}, {gflop:.1f} GFLOP")
    print(f"{'form':<26} {'batch':>5} {'s/window':>9} {'vs public':>9} {'vs plain':>8} {'GFLOP/s':>8} "
          f"{'prepare s':>9} {'max |logit diff|':>16}")
    for r in rows:
        print(f"{r['form']:<26} {r['batch']:>5} {r['s_per_window']:>9.4f} {r['time_ratio_vs_public_float32']:>9.3f} "
              f"{r['time_ratio_vs_plain_float32']:>8.3f} {r['gflop_per_s']:>8.0f} {r['prepare_s']:>9.2f} "
              f"{r['max_abs_logit_diff_vs_plain_float32']:>16.2e}")
    if args.json:
        config = {"benchmark": "benchmarks/window_speed.py", "model": f"{VARIANT}, base width 16, random weights "
                  "(torch.manual_seed(0))", "window": list(WINDOW), "threads": args.threads,
                  "repeats": args.repeats, "batches": args.batches, "bf16_native": native_bf16_cpu()}
        write_results(args.json, {"gflop_per_window": gflop, "rows": rows}, config)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
