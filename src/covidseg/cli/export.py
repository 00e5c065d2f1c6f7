"""``covidseg export``: a checkpoint as an ONNX or TorchScript file for other runtimes (see docs/interop.md)."""

from __future__ import annotations

import argparse

DESCRIPTION = """\
Export a trained checkpoint to ONNX (for ONNX Runtime, TensorRT, OpenVINO, hospital pipelines) or TorchScript.

The exported graph takes 'ct' (B, 1, D, H, W) float32, the normalised CT in [0, 1] (lung-only input as in
training), and returns 'logits' (B, K, D, H, W); batch and spatial sizes are dynamic (multiples of the model's
size divisor). Deep supervision is switched off. The file carries the variant, covidseg version, target and
channel names, size divisor, window and full config as metadata, so that

    covidseg segment CT.nii.gz -o OUT --checkpoint model.onnx --backend onnxruntime

runs without the checkpoint. The written file is checked once against the PyTorch model before the command ends.

examples:
  covidseg export runs/final/best.pt --format onnx -o model.onnx
  covidseg export runs/final/best.pt --format torchscript -o model.ts --window 8 128 128
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a checkpoint to ONNX or TorchScript",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", metavar="CKPT", help="checkpoint .pt written by 'covidseg train'")
    p.add_argument("--format", dest="fmt", choices=("onnx", "torchscript"), default="onnx",
                   help="output format (default: onnx)")
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="file to write (e.g. model.onnx)")
    p.add_argument("--window", type=int, nargs="+", default=None, metavar="N",
                   help="tracing window D H W (H W for a 2D model), a multiple of the size divisor; default: the "
                        "checkpoint's inference.window. Other sizes still work: axes are dynamic")
    p.add_argument("--opset", type=int, default=None, metavar="N",
                   help="ONNX opset (default: 17, read by every ONNX Runtime since 1.11)")
    p.add_argument("--force", action="store_true", help="replace FILE if it exists")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import sys

    from covidseg.export import ONNX_OPSET, export_model

    report = export_model(args.checkpoint, args.fmt, args.output, window=args.window, force=args.force,
                          opset=args.opset or ONNX_OPSET)
    shapes = ", ".join("x".join(map(str, s)) for s in report.checked_shapes)
    opset = f", opset {report.opset}" if report.opset else ""
    sys.stdout.write(
        f"wrote {report.path} ({report.format}{opset}, {report.size_bytes / 1e6:.1f} MB): variant {report.variant}, "
        f"target {report.target}, window {'x'.join(map(str, report.window))}\n"
        f"checked against PyTorch at {shapes}: max |logit difference| {report.max_abs_diff:.2e} "
        f"({report.seconds:.1f} s)\n"
    )
    return 0
