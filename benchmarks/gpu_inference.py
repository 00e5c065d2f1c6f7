"""Time the infection stage of `segment` on a whole 512 x 512 x 300 CT on a GPU (or CPU smoke test).

Makes a coronacases-style phantom, extracts the lungs classically (CPU, timed separately), normalises and builds
the "lung only" input, then runs `predict_volume` with the report's full model (random weights, fixed seed: the
speed does not depend on the weights) over the lungs' box, float32 and bf16 autocast, and prints a table::

    python benchmarks/gpu_inference.py --out out/ --device cuda
    python benchmarks/gpu_inference.py --out /tmp/g --device cpu --slices 16 --size 128   # smoke test
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402
from _stamp import write_results  # noqa: E402

from covidseg.config import Config, IntensityConfig, LungConfig, RuntimeConfig  # noqa: E402
from covidseg.inference.lungs import classical_lungs  # noqa: E402
from covidseg.inference.sliding_window import mask_box, predict_volume  # noqa: E402
from covidseg.intensity import lung_only, normalize  # noqa: E402
from covidseg.models import create_model, set_heads  # noqa: E402
from covidseg.phantom import make_phantom  # noqa: E402

WHOLE_CHEST_SLICES = 120
"""``--slices`` from which the phantom is made with exactly that many slices; below it (a smoke test) the central
``--slices`` of a phantom of its natural length are used (fewer slices would not hold the lungs)."""


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--size", type=int, default=512, help="in-plane size of the phantom (512 = coronacases)")
    ap.add_argument("--windows", default="8x128x128,16x256x256", help="comma-separated D x H x W windows")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    whole = args.slices >= WHOLE_CHEST_SLICES  # a whole chest of exactly this many slices; fewer: a central slab
    ph = make_phantom("coronacases", seed=0, scale=args.size / 512, slices=args.slices if whole else None)
    lo = max((ph.ct.shape[0] - args.slices) // 2, 0)
    ct = ph.ct if whole else ph.ct[lo : lo + args.slices]
    t_phantom = time.perf_counter() - t0
    t0 = time.perf_counter()
    lungs = classical_lungs(ct, ph.spacing, LungConfig())
    t_lungs = time.perf_counter() - t0
    x = lung_only(normalize(ct, IntensityConfig(), convention="hu"), lungs > 0, IntensityConfig())
    box = mask_box(lungs > 0, margin=(2, 8, 8))
    torch.manual_seed(0)
    cfg = Config()
    model = create_model(cfg.model).to(args.device).eval()
    set_heads(model, False)

    rows = []
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    for window_text in args.windows.split(","):
        window = tuple(int(v) for v in window_text.split("x"))
        for bf16 in ("off", "on"):
            icfg = dataclasses.replace(cfg.inference, window=window)
            rt = RuntimeConfig(device=args.device, bf16=bf16, batch_windows=8 if args.device.startswith("cuda") else 2)
            predict_volume(model, x, icfg, box=box, mask=lungs > 0, runtime=rt)  # warm-up (cuDNN autotune, allocator)
            _sync(args.device)
            t0 = time.perf_counter()
            prob = predict_volume(model, x, icfg, box=box, mask=lungs > 0, runtime=rt)
            _sync(args.device)
            dt = time.perf_counter() - t0
            rows.append({"window": window_text, "bf16": bf16, "infection_stage_s": round(dt, 3),
                         "positive_voxels": int((prob[0] > 0.5).sum())})
            print(rows[-1], flush=True)
    peak = torch.cuda.max_memory_allocated() / 2**30 if args.device.startswith("cuda") else None
    result = {"device": name, "shape": list(ct.shape), "lung_box": [[s.start, s.stop] for s in box],
              "phantom_s": round(t_phantom, 2), "classical_lungs_cpu_s": round(t_lungs, 2),
              "torch": torch.__version__, "peak_gpu_gb": peak, "rows": rows}
    config = {"benchmark": "benchmarks/gpu_inference.py", "slices": args.slices, "size": args.size,
              "windows": args.windows, "device": args.device, "model": "unet-fv-paspp-ds, base width 16, random "
              "weights (torch.manual_seed(0))", "inference": dataclasses.asdict(cfg.inference)}
    write_results(args.out / "gpu_inference.json", result, config, args.device)
    print(f"\n| window | bf16 | infection stage (s) |   device: {name}, volume {ct.shape}, "
          f"classical lungs on CPU {t_lungs:.1f} s")
    print("|---|---|---|")
    for r in rows:
        print(f"| {r['window']} | {r['bf16']} | {r['infection_stage_s']} |")


if __name__ == "__main__":
    main()
