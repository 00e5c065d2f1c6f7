"""Benchmark: ``covidseg segment`` end to end against MONAI's sliding-window inference.

In one run, on a coronacases-style phantom (512 x 512 x 300 by default; ``--slices N`` for a thinner slab):

(a) ``covidseg segment`` end to end (read, lungs, infection, write) in a subprocess;
(b) the reference in a subprocess: the same read, lungs and "lung only" input, then MONAI
    ``sliding_window_inference`` over the *whole* volume with the same network and weights, roi = the training
    patch, overlap 0.25, Gaussian blending, float32, then the same threshold.

Prints both wall times, their ratio, the peak RSS of each process, and the Dice between the two infection masks
inside the lungs (speed must not change the answer: >= 0.99). ``--json FILE`` writes the figures with the keys
``covidseg_s``, ``reference_s``, ``ratio``, ``covidseg_peak_rss_gb``, ``reference_peak_rss_gb``, ``dice_agreement``,
``shape``, ``threads``, ``cpu`` (and a few more).

The model: ``--checkpoint CKPT`` when given, else the report's full model at its default width with random
weights (seed 0) and a bias on the output head so that some voxels pass the threshold (an all-empty mask would
make the agreement trivial); the infected share of each mask is printed so that this can be checked.

Run: ``python benchmarks/inference.py [--slices 300] [--threads 2] [--json out.json]``. The 2 shared cores of
the development machine make timings noisy when others run; compare the ratio measured in one run.

On a GPU: ``python benchmarks/inference.py --device cuda --no-reference --json gpu.json`` times ``segment`` with
``--device cuda`` (the JSON also holds ``covidseg_infection_s``, the infection stage alone, and the other steps);
without ``--no-reference`` the reference runs on the same GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _stamp import write_results

TARGET_SHARE = 0.3
"""Share of lung voxels the random model's biased head lets pass the threshold (not trivially empty or full)."""
PHANTOM_SEEDS = range(40)
"""Seeds tried to find a phantom with at least the asked number of slices."""


def make_ct(folder: Path, slices: int, size: int, direct: bool = False) -> tuple[Path, tuple[int, ...]]:
    """A coronacases-style phantom with ``size`` x ``size`` pixels, cropped to ``slices`` central slices.

    By default the seeds are searched for a phantom of at least ``slices`` slices (the CT of docs/performance.md,
    298 slices at 512 x 512; a few minutes); ``direct`` makes seed 0 with exactly ``slices`` slices at once (37 s on
    the development machine: for a lent GPU's short session)."""
    import nibabel as nib

    from covidseg.phantom import make_phantom

    scale = size / 512.0
    best = None
    for seed in [0] if direct else PHANTOM_SEEDS:
        ph = make_phantom("coronacases", seed, scale=scale, slices=slices if direct else None)
        if best is None or ph.ct.shape[0] > best.ct.shape[0]:
            best = ph
        if ph.ct.shape[0] >= slices:
            break
    assert best is not None
    d = best.ct.shape[0]
    lo = max((d - slices) // 2, 0)
    keep = slice(lo, lo + min(slices, d))
    ct = np.clip(np.rint(best.ct[keep]), -1024, 3071).astype(np.int16)  # canonical (D, H, W), HU
    # canonical (z, y, x) in LPS -> a NIfTI in LPS voxel order (x, y, z) with its RAS affine
    sz, sy, sx = best.spacing
    affine = np.diag([-sx, -sy, sz, 1.0])
    path = folder / "bench_ct.nii.gz"
    nib.save(nib.Nifti1Image(np.ascontiguousarray(ct.transpose(2, 1, 0)), affine), path)
    return path, tuple(int(s) for s in ct.shape)


def make_checkpoint(folder: Path, ct: Path) -> Path:
    """The report's full model at its default width, random weights (seed 0), with the output head's bias set so
    that about :data:`TARGET_SHARE` of the lung voxels of one central window pass the threshold."""
    import torch

    from covidseg.checkpoint import save_checkpoint
    from covidseg.config import Config
    from covidseg.inference.lungs import classical_lungs
    from covidseg.intensity import lung_only, normalize, resolve_convention, to_hu
    from covidseg.io.image import read_image
    from covidseg.models import create_model

    torch.manual_seed(0)
    cfg = Config()
    model = create_model(cfg.model).eval()
    model.set_deep_supervision(False)
    image = read_image(ct)
    conv = resolve_convention(image.array, cfg.intensity, None, ct)
    lungs = classical_lungs(to_hu(image.array, conv, cfg.intensity), image.spacing, cfg.lungs)
    x = lung_only(normalize(image.array, cfg.intensity, conv), lungs, cfg.intensity)
    d, h, w = cfg.train.patch_size
    zc = int(np.flatnonzero(lungs.any(axis=(1, 2))).mean())
    z0 = min(max(zc - d // 2, 0), x.shape[0] - d)
    y0, x0 = (x.shape[1] - h) // 2, (x.shape[2] - w) // 2
    patch = torch.from_numpy(np.ascontiguousarray(x[z0 : z0 + d, y0 : y0 + h, x0 : x0 + w]))[None, None]
    with torch.no_grad():
        logits = model(patch)[0, 0].numpy()  # type: ignore[index]
        inside = lungs[z0 : z0 + d, y0 : y0 + h, x0 : x0 + w] > 0
        values = logits[inside] if inside.any() else logits.ravel()
        bias = model.head.bias
        assert bias is not None
        bias.sub_(float(np.quantile(values, 1.0 - TARGET_SHARE)))
    model.set_deep_supervision(True)
    return save_checkpoint(folder / "bench_model.pt", model, cfg, target="infection", note="benchmark random")


def measured(cmd: list[str], env: dict[str, str]) -> tuple[float, float, str]:
    """Run ``cmd`` under a fresh wrapper process: wall seconds, the child's peak RSS (GB) and its stdout."""
    wrapper = (
        "import resource, subprocess, sys, time\n"
        "t = time.perf_counter()\n"
        "r = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
        "dt = time.perf_counter() - t\n"
        "sys.stderr.write(r.stderr[-4000:])\n"
        "if r.returncode: sys.exit(r.returncode)\n"
        "print(dt, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
        "print(r.stdout)\n"
    )
    r = subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True, env=env)
    if r.returncode:
        raise SystemExit(f"benchmark step failed ({' '.join(cmd[:4])} ...):\n{r.stderr[-3000:]}")
    first, _, rest = r.stdout.partition("\n")
    wall, rss_kb = first.split()
    return float(wall), float(rss_kb) / 1024**2, rest


def reference_worker(ct: Path, checkpoint: Path, out: Path, threads: int, device: str = "cpu",
                     batch: int = 1) -> None:
    """(b): read, classical lungs, lung-only input, MONAI sliding window over the whole volume (float32)."""
    import torch
    from monai.inferers import sliding_window_inference

    from covidseg.checkpoint import load_checkpoint
    from covidseg.config import Config
    from covidseg.inference.lungs import classical_lungs
    from covidseg.intensity import lung_only, normalize, resolve_convention, to_hu
    from covidseg.io.image import read_image, write_mask

    torch.set_num_threads(threads)
    model, mcfg, _ = load_checkpoint(checkpoint, device=device)
    model.set_deep_supervision(False)  # type: ignore[operator]
    run_cfg = Config()
    image = read_image(ct)
    conv = resolve_convention(image.array, mcfg.intensity, None, ct)
    norm = normalize(image.array, mcfg.intensity, conv)
    lungs = classical_lungs(to_hu(image.array, conv, mcfg.intensity), image.spacing, run_cfg.lungs)
    x = lung_only(norm, lungs, mcfg.intensity) if mcfg.train.input == "lung_only" else norm
    with torch.no_grad():
        logits = sliding_window_inference(torch.from_numpy(x)[None, None].to(device), tuple(mcfg.train.patch_size),
                                          batch, model, overlap=0.25, mode="gaussian", sigma_scale=0.125)
    channel = 2 if int(mcfg.model.out_channels) == 3 else 0
    assert isinstance(logits, torch.Tensor)
    logits = logits.cpu()
    infection = (torch.sigmoid(logits[0, channel]).numpy() >= run_cfg.inference.threshold) & (lungs > 0)
    write_mask(infection.astype(np.uint8), image, out)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two boolean masks; 1.0 when both are empty."""
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * float((a & b).sum()) / total


def run_config(args: argparse.Namespace) -> dict[str, object]:
    """The settings of this run, for its results file's stamp."""
    phantom = f"coronacases-style phantom of make_ct (--slices {args.slices} --size {args.size}" + (
        " --direct-phantom)" if args.direct_phantom else ")")
    model = "a checkpoint" if args.checkpoint else (
        "unet-fv-paspp-ds, base width 16, random weights (seed 0), head bias set so that "
        f"{TARGET_SHARE:.0%} of the lung voxels pass the threshold")
    reference = None if args.skip_reference else (
        "MONAI sliding_window_inference, roi = the training patch, overlap 0.25, Gaussian, float32, "
        f"sw_batch_size {args.reference_batch}, whole volume")
    return {"benchmark": "benchmarks/inference.py", "ct": str(args.ct) if args.ct else phantom, "model": model,
            "threads": args.threads, "device": args.device, "overrides": args.overrides, "reference": reference}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--slices", type=int, default=300, help="slices of the phantom (300 = the full CT)")
    p.add_argument("--size", type=int, default=512, help="in-plane pixels")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads of both runs")
    p.add_argument("--checkpoint", type=Path, default=None, help="a trained model instead of the random one")
    p.add_argument("--json", type=Path, default=None, help="write the figures to this JSON file")
    p.add_argument("--skip-reference", "--no-reference", dest="skip_reference", action="store_true",
                   help="time covidseg only (e.g. on a GPU, where the slow CPU reference is not wanted)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N: where both paths run the network")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="passed to covidseg segment, e.g. --set runtime.bf16=off")
    p.add_argument("--keep", type=Path, default=None, help="keep the CT and outputs in this folder")
    p.add_argument("--ct", type=Path, default=None, help="use this CT (e.g. one kept by --keep) instead of a new phantom")
    p.add_argument("--reference-from", type=Path, default=None, metavar="JSON",
                   help="reuse the reference of an earlier run with the same --keep folder, --ct and model: its time "
                        "and RSS from that run's JSON, its mask from KEEP/reference_infection.nii.gz (the "
                        "reference takes about 20 min on 2 cores; use it to compare several settings of ours)")
    p.add_argument("--direct-phantom", action="store_true",
                   help="make seed 0 with exactly --slices slices (37 s here) instead of searching the seeds for the "
                        "documented CT (a few minutes)")
    p.add_argument("--reference-batch", type=int, default=1, metavar="N",
                   help="sw_batch_size of the reference (MONAI's default 1; in float32 on a CPU torch runs batch-1 3D "
                        "convolutions with few channels through a slow path, so 2 is the fairer reference)")
    p.add_argument("--reference-worker", nargs=3, metavar=("CT", "CKPT", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.reference_worker:
        ct, ckpt, out = args.reference_worker
        reference_worker(Path(ct), Path(ckpt), Path(out), args.threads, args.device, args.reference_batch)
        return 0

    import nibabel as nib

    from covidseg.training.trainer import cpu_model

    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    folder = Path(args.keep or tempfile.mkdtemp(prefix="covidseg-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    if args.ct:
        ct = args.ct
        shape = tuple(int(v) for v in nib.load(ct).shape[::-1])  # type: ignore[attr-defined]
    else:
        ct, shape = make_ct(folder, args.slices, args.size, direct=args.direct_phantom)
    ckpt = args.checkpoint or make_checkpoint(folder, ct)
    what = f"CT {args.ct}" if args.ct else "phantom"
    print(f"{what} {shape} (D, H, W) ready in {time.perf_counter() - t:.1f} s; model {ckpt}; "
          f"{args.threads} threads; CPU {cpu_model()}", flush=True)

    out = folder / "covidseg_out"
    cmd = [sys.executable, "-m", "covidseg", "segment", str(ct), "-o", str(out), "--checkpoint", str(ckpt),
           "--threads", str(args.threads), "--device", args.device, "--force"]
    for item in args.overrides:
        cmd += ["--set", item]
    ours_s, ours_rss, ours_stdout = measured(cmd, env)
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    print(f"(a) covidseg segment on {args.device}: {ours_s:.1f} s, peak RSS {ours_rss:.2f} GB; steps "
          f"{report['timings_s']}", flush=True)
    result: dict[str, object] = {
        "covidseg_s": ours_s, "covidseg_peak_rss_gb": ours_rss, "covidseg_steps_s": report["timings_s"],
        "covidseg_infection_s": report["timings_s"].get("infection_s"), "device": args.device,
        "inference": report.get("inference"), "shape": list(shape), "threads": args.threads, "model": str(ckpt),
        "random_model": args.checkpoint is None, "overrides": args.overrides,
    }
    if not args.skip_reference:
        earlier = json.loads(args.reference_from.read_text(encoding="utf-8")) if args.reference_from else {}
        if earlier:  # the reused run's sw_batch_size names its mask
            args.reference_batch = int(earlier.get("reference_batch", 1))
        batch_tag = "" if args.reference_batch == 1 else f"_batch{args.reference_batch}"
        ref_mask = folder / f"reference_infection{batch_tag}.nii.gz"
        if earlier:
            if not ref_mask.is_file():
                print(f"error: --reference-from {args.reference_from}: its mask {ref_mask} is not there; pass the "
                      "--keep folder of that run", file=sys.stderr)
                return 2
            ref_s, ref_rss = float(earlier["reference_s"]), float(earlier["reference_peak_rss_gb"])
            result["reference_reused_from"] = str(args.reference_from)
            result["reference_measured_at_commit"] = earlier.get("reference_measured_at_commit", earlier.get("commit"))
        else:
            cmd = [sys.executable, str(Path(__file__).resolve()), "--threads", str(args.threads),
                   "--device", args.device, "--reference-batch", str(args.reference_batch),
                   "--reference-worker", str(ct), str(ckpt), str(ref_mask)]
            ref_s, ref_rss, _ = measured(cmd, env)
        lungs = np.asarray(nib.load(out / "lungs.nii.gz").dataobj) > 0  # type: ignore[attr-defined]
        ours_inf = (np.asarray(nib.load(out / "infection.nii.gz").dataobj) > 0) & lungs  # type: ignore[attr-defined]
        ref_inf = (np.asarray(nib.load(ref_mask).dataobj) > 0) & lungs  # type: ignore[attr-defined]
        agreement = dice(ours_inf, ref_inf)
        share_ours = float(ours_inf.sum()) / max(int(lungs.sum()), 1)
        share_ref = float(ref_inf.sum()) / max(int(lungs.sum()), 1)
        print(f"(b) reference (MONAI sliding_window_inference, whole volume, float32, {args.device}, "
              f"sw_batch_size {args.reference_batch}): {ref_s:.1f} s, "
              f"peak RSS {ref_rss:.2f} GB", flush=True)
        print(f"ratio {ref_s / ours_s:.1f}x; Dice of the infection masks inside the lungs {agreement:.4f} "
              f"(infected share of the lungs: covidseg {100 * share_ours:.2f} %, reference {100 * share_ref:.2f} %)")
        result.update({"reference_s": ref_s, "reference_batch": args.reference_batch, "ratio": ref_s / ours_s, "reference_peak_rss_gb": ref_rss,
                       "dice_agreement": agreement, "infected_share_covidseg": share_ours,
                       "infected_share_reference": share_ref})
    if args.json:
        write_results(args.json, result, run_config(args), args.device)
        print(f"figures written to {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
