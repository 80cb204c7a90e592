"""``lora-onnx merge``: fold LoRA branches into the base weights."""

from __future__ import annotations

import argparse

from lora_onnx.cli.folders import folder_input, run_merge_folder
from lora_onnx.cli.options import (
    ListAction,
    add_inputs_argument,
    add_run_arguments,
    dims_from_args,
    inputs_from_args,
)
from lora_onnx.cli.render import info, report_written, warn
from lora_onnx.errors import LoraOnnxError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "merge",
        help="fold LoRA branches into the base weights (a plain model as fast as the base)",
        description="Fold every branch (or those of --adapter) into its base weight: W' = W + s * delta, "
        "computed in float32 in the weight's own layout, one weight at a time.",
    )
    parser.add_argument(
        "model",
        help="a model rewritten by lora-onnx (never modified); also a folder of model files or several "
        "model files (those with branches are merged, all are written to the folder -o with the side files)",
    )  # fmt: skip
    parser.add_argument("more_models", nargs="*", metavar="MODEL", help="more model files (a folder run)")
    parser.add_argument(
        "-o", "--output", required=True, help="output .onnx path (a folder for folder inputs)"
    )
    parser.add_argument(
        "--json", metavar="REPORT", help="for a folder input: write a machine-readable report"
    )
    parser.add_argument(
        "--adapter",
        action=ListAction,
        metavar="NAME",
        help="fold only these adapters (repeatable, or comma separated)",
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
    parser.add_argument(
        "--adapter-file", metavar="FILE",
        help="for a model with LoRA slots: fold this adapter file (the other slots, off, are removed)",
    )  # fmt: skip
    parser.add_argument(
        "--adapter-index", type=int, metavar="I",
        help="for a model with mixed-batch branches (inject --mixed): fold the adapter at position I of the "
        "stacks (the rest of the mixed form is removed)",
    )  # fmt: skip
    parser.add_argument(
        "--strength",
        type=float,
        help="with --adapter-file: fold at this strength (default: the model's, 1.0)",
    )
    add_run_arguments(parser)
    add_inputs_argument(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    folder = folder_input([args.model, *args.more_models])
    if folder is not None:
        return run_merge_folder(args, folder)
    if args.json:
        raise LoraOnnxError("--json reports a folder merge; a one-model merge prints its result")
    from lora_onnx.commands.merge import merge

    result = merge(
        args.model, output=args.output, adapters=args.adapter, partial=args.partial, validate=args.validate,
        providers=args.providers, dims=dims_from_args(args), adapter_file=args.adapter_file,
        strength=args.strength, adapter_index=args.adapter_index,
        dequantize=args.dequantize, allow_nonfinite=args.allow_nonfinite, inputs=inputs_from_args(args),
    )  # fmt: skip
    if result.slots_removed:
        info(f"Removed {len(result.slots_removed)} LoRA slot(s) the adapter file leaves off.")
    for kept in result.kept:
        warn(f"kept the branch at node {kept.branch.site!r} ({kept.branch.module_path}): {kept.reason}")
    for note in result.notes:
        info(f"note: {note}")
    info(f"Folded {len(result.folded)} branch(es); {len(result.kept)} kept.")
    title = "Merged vs input with the adapter file active" if args.adapter_file else "Merged vs input"
    if args.adapter_index is not None:
        title = f"Merged vs input with adapter {args.adapter_index} on every row"
    return report_written(result.validation, title, result.output)
