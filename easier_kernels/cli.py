"""The `easier-kernels` command line."""

from __future__ import annotations

import argparse
import sys

import torch


def _cmd_backends(args) -> int:
    from . import ops

    print(f"torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}")
    print("available backends:", ", ".join(ops.available_backends()))
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        print(f"default on {device}: {ops.backends.backend_name(torch.device(device))}")
    return 0


def _cmd_bench(args) -> int:
    from .benchmark import SHAPES, kernel_report

    unknown = [s for s in args.shapes if s not in SHAPES]
    if unknown:
        print(f"easier-kernels bench: unknown shape {unknown[0]!r}; choose from {', '.join(SHAPES)}", file=sys.stderr)
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("easier-kernels bench: --device cuda needs a CUDA GPU; use --device cpu", file=sys.stderr)
        return 2
    _cmd_backends(args)
    rows = kernel_report(args.shapes, args.device)
    headers = list(rows[0])
    print("\n| " + " | ".join(headers) + " |")
    print("|" + "---|" * len(headers))
    for row in rows:
        print("| " + " | ".join(f"{v:.2f}" if isinstance(v, float) else str(v) for v in row.values()) + " |")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="easier-kernels", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("backends", help="print the active kernel backends").set_defaults(func=_cmd_backends)
    bench = sub.add_parser("bench", help="a short kernel benchmark (GB/s and ratios against torch)")
    bench.add_argument("--shapes", nargs="+", default=["resnet18-cifar-s1", "vit-b16-mlp"])
    bench.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    bench.set_defaults(func=_cmd_bench)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
