"""Training throughput of the full model vs MONAI's DynUNet on one GPU (or a CPU smoke test), plus a short real run.

Part 1 (synthetic batches, no data loading): the report's final model (``unet-fv-paspp-ds``, default width) and
an nnU-Net-style MONAI DynUNet (32-256 filters, as in docs/method.md) each train for ``--steps`` steps at the
report's settings: patch 128x128x8 (``(D, H, W) = (8, 128, 128)``), batch 5, Adam 1e-4, ``0.5 BCE + Dice`` with
deep supervision, bf16 autocast, ``channels_last_3d`` and fused Adam on CUDA. Printed: ms/step, patches/s, peak GPU
memory. ``--compile none reduce-overhead`` adds the full model under ``torch.compile`` (CUDA graphs against the
launch overhead of its many small kernels at this batch).

Part 2 (``--real-epochs N``, optional): writes a small phantom cohort, trains the full model with
``covidseg.training.train`` for N epochs and reports the held-out infection Dice of ``best.pt`` on the split's
test cases. Phantoms check the pipeline; the Dice is not a result on patients.

Usage::

    python benchmarks/gpu_train.py --out bench-out                     # GPU, ~2 min
    python benchmarks/gpu_train.py --steps 2 --device cpu --out /tmp/b --width 4   # CPU smoke test

Writes ``OUT/gpu_train.json`` and ``OUT/gpu_train.md``.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path
from typing import Any

import torch
from _stamp import stamp, stamp_line, write_results

PATCH = (8, 128, 128)
"""The report's 128x128x8 patch as ``(D, H, W)``."""
BATCH = 5
"""The report's batch size."""
LR = 1e-4
"""The report's Adam learning rate."""
WARMUP_STEPS = 3
"""Steps run before timing (cuDNN autotuning, allocator warm-up)."""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def dynunet() -> torch.nn.Module:
    """MONAI DynUNet, nnU-Net style for 128x128x8 patches (filters 32..256, 5.4 M parameters; docs/method.md)."""
    from monai.networks.nets import DynUNet

    kernels = [[1, 3, 3], [1, 3, 3], [3, 3, 3], [3, 3, 3]]
    strides = [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]]
    return DynUNet(3, 1, 1, kernels, strides, strides[1:], filters=[32, 64, 128, 256],
                   norm_name="instance", deep_supervision=True, deep_supr_num=2, res_block=False)


def bench_model(name: str, model: torch.nn.Module, device: torch.device, steps: int, amp: bool,
                compile_mode: str = "none") -> dict[str, Any]:
    """Train ``model`` on random batches; time ``steps`` steps after warm-up.

    ``compile_mode``: ``none`` (eager), or a ``torch.compile`` mode (``default``, ``reduce-overhead`` = CUDA
    graphs, ``max-autotune``); the forward is compiled, the compile time is spent in the warm-up and reported."""
    from covidseg.losses import DeepSupervisionLoss, SegmentationLoss

    model = model.to(device).train()
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last_3d)
    params = list(model.parameters())
    opt = torch.optim.Adam(params, lr=LR, fused=device.type == "cuda")
    forward = model if compile_mode == "none" else torch.compile(model, mode=compile_mode)
    crit = DeepSupervisionLoss(SegmentationLoss())
    g = torch.Generator().manual_seed(0)
    x = torch.rand((BATCH, 1, *PATCH), generator=g).to(device)
    y = (torch.rand((BATCH, 1, *PATCH), generator=g) > 0.9).float().to(device)
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last_3d)
        torch.cuda.reset_peak_memory_stats(device)
    dtype = torch.bfloat16

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype, enabled=amp):
            out = forward(x)
        if isinstance(out, torch.Tensor) and out.ndim == x.ndim + 1:  # DynUNet stacks heads on dim 1
            out = list(torch.unbind(out, dim=1))
        loss = crit(out, y)
        loss.backward()
        opt.step()
        return float(loss.detach())

    t_warm = time.perf_counter()
    for _ in range(min(WARMUP_STEPS, steps)):
        step()
    _sync(device)
    warmup_s = time.perf_counter() - t_warm
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    _sync(device)
    dt = (time.perf_counter() - t0) / steps
    mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    n_params = sum(p.numel() for p in params)
    return {"model": name if compile_mode == "none" else f"{name}, torch.compile {compile_mode}",
            "params_M": n_params / 1e6, "ms_per_step": dt * 1e3, "patches_per_s": BATCH / dt,
            "peak_gpu_mem_GiB": mem, "last_loss": loss, "compile": compile_mode, "warmup_s": warmup_s}


def real_run(out: Path, epochs: int, cases: int, scale: float, device: str, width: int) -> dict[str, Any]:
    """Phantom cohort -> train the full model -> held-out infection Dice of best.pt (a pipeline check)."""
    from covidseg.config import load_config
    from covidseg.phantom import write_cohort
    from covidseg.training.experiments import evaluate_run
    from covidseg.training.trainer import cache_cases, find_dataset, resolve_split, train

    data = out / "phantom-cohort"
    if not data.exists():
        write_cohort(data, cases, seed=0, style="mixed", scale=scale)
    cfg = load_config(None, [f"train.epochs={epochs}", f"runtime.device={device}", f"model.base_width={width}",
                             f"runtime.cache_dir={out / 'cache'}"])
    t0 = time.perf_counter()
    run = out / "run-full"
    resume = (run / "config.yaml").is_file()
    result = train(run, config=None if resume else cfg, data=data, resume=resume, progress=True)
    seconds = time.perf_counter() - t0
    ds = find_dataset(data)
    lists = resolve_split(sorted(ds), "report", cfg.train.val_cases)
    test = cache_cases(cfg, [ds[c] for c in lists["test"]], progress=False)
    per_case = evaluate_run(run, test, ds, progress=False, runtime=cfg.runtime)
    dice = [v["dice"] for v in per_case.values()]
    return {"epochs": epochs, "cases": cases, "scale": scale, "train_seconds": seconds,
            "best_val_dice": result.best_dice, "test_dice_per_case": {k: v["dice"] for k, v in per_case.items()},
            "test_dice_mean": sum(dice) / max(len(dice), 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=30, help="timed training steps per model")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--width", type=int, default=16, help="base width of the full model (16 = default)")
    ap.add_argument("--no-dynunet", action="store_true")
    ap.add_argument("--compile", nargs="+", default=["none"], metavar="MODE",
                    help="variants of the full model: none (eager) and/or torch.compile modes (default, "
                         "reduce-overhead = CUDA graphs, max-autotune); the DynUNet runs eager, as MONAI users run it")
    ap.add_argument("--real-epochs", type=int, default=0, help="also train on phantoms for N epochs (0 = skip)")
    ap.add_argument("--real-cases", type=int, default=10)
    ap.add_argument("--real-scale", type=float, default=0.5)
    args = ap.parse_args()
    device = torch.device(args.device)
    amp = device.type == "cuda"
    from covidseg.models import create_model, variant_config

    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    results = [bench_model("unet-fv-paspp-ds", create_model(variant_config("unet-fv-paspp-ds", base_width=args.width)),
                           device, args.steps, amp, mode) for mode in args.compile]
    if not args.no_dynunet:
        results.append(bench_model("MONAI DynUNet (nnU-Net style)", dynunet(), device, args.steps, amp))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    log: dict[str, Any] = {"device": name, "torch": torch.__version__, "patch_DHW": PATCH, "batch": BATCH,
                           "amp": "bf16" if amp else "off", "channels_last_3d": amp, "steps": args.steps,
                           "results": results}
    if args.real_epochs > 0:
        log["real_run"] = real_run(args.out, args.real_epochs, args.real_cases, args.real_scale, args.device,
                                   args.width)
    config = {"benchmark": "benchmarks/gpu_train.py", "steps": args.steps, "width": args.width,
              "compile": args.compile, "dynunet": not args.no_dynunet, "real_epochs": args.real_epochs,
              "real_cases": args.real_cases, "real_scale": args.real_scale, "device": args.device}
    stamped = stamp(config, args.device)
    lines = [f"# Training throughput on {name}", "", stamp_line(stamped), "",
             f"patch {PATCH[2]}x{PATCH[1]}x{PATCH[0]} (W x H x D), batch {BATCH}, Adam {LR}, "
             f"{'bf16 autocast + channels_last_3d' if amp else 'float32'}, {args.steps} timed steps, torch "
             f"{torch.__version__}", "",
             "| model | params (M) | ms/step | patches/s | peak GPU memory (GiB) | warm-up (s) |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['params_M']:.2f} | {r['ms_per_step']:.1f} | {r['patches_per_s']:.1f} | "
              f"{r['peak_gpu_mem_GiB']:.2f} | {r['warmup_s']:.1f} |" for r in results]
    if "real_run" in log:
        rr = log["real_run"]
        lines += ["", f"Phantom run (pipeline check, not a result on patients): {rr['epochs']} epochs on "
                      f"{rr['cases']} phantoms (scale {rr['scale']}), {rr['train_seconds']:.0f} s; best validation "
                      f"Dice {rr['best_val_dice']:.3f}; held-out infection Dice {rr['test_dice_mean']:.3f}"]
    text = "\n".join(lines) + "\n"
    (args.out / "gpu_train.md").write_text(text)
    write_results(args.out / "gpu_train.json", log, config, args.device)
    print(text)


if __name__ == "__main__":
    main()
