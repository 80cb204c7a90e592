"""``lora-onnx merge``: fold LoRA branches into the base weights."""

from __future__ import annotations

import argparse

from lora_onnx.cli.options import add_run_arguments, dims_from_args
from lora_onnx.cli.render import info, print_validation, warn
from lora_onnx.errors import EXIT_MISMATCH
from lora_onnx.merging import merge


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "merge",
        help="fold LoRA branches into the base weights (a plain model as fast as the base)",
        description="Fold every branch (or those of --adapter) into its base weight: W' = W + s * delta, "
        "computed in float32 in the weight's own layout, one weight at a time.",
    )
    parser.add_argument("model", help="a model rewritten by lora-onnx (never modified)")
    parser.add_argument("-o", "--output", required=True, help="output .onnx path")
    parser.add_argument(
        "--adapter", nargs="+", action="extend", metavar="NAME", help="fold only these adapters"
    )
    parser.add_argument(
        "--partial",
        action="store_true",
        help="keep branches that cannot be folded (with a warning) instead of failing",
    )
    parser.add_argument(
        "--dequantize",
        action="store_true",
        help="also fold branches on quantized weights (QDQ, MatMulNBits) by writing those weights in float "
        "(DequantizeLinear removed, MatMulNBits becomes MatMul); without it such branches are refused",
    )
    parser.add_argument(
        "--validate", action="store_true", help="compare merged and input in onnxruntime first"
    )
    add_run_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    result = merge(
        args.model, output=args.output, adapters=args.adapter, partial=args.partial,
        dequantize=args.dequantize, validate=args.validate,
        providers=args.providers, dims=dims_from_args(args),
    )  # fmt: skip
    for kept in result.kept:
        warn(f"kept the branch at node {kept.branch.site!r} ({kept.branch.module_path}): {kept.reason}")
    info(f"Folded {len(result.folded)} branch(es); {len(result.kept)} kept.")
    if result.validation is not None:
        print_validation(result.validation, "Merged vs input")
        if not result.validation.ok:
            warn("validation failed; nothing was written")
            return EXIT_MISMATCH
    info(f"Wrote {result.output}")
    return 0
