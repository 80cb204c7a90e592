"""``lora-onnx inject``: add fresh LoRA branches to a model."""

from __future__ import annotations

import argparse

from lora_onnx.cli.folders import folder_input, run_inject_folder
from lora_onnx.cli.inject_mixed import add_mixed_arguments, run_mixed, wants_mixed
from lora_onnx.cli.inject_slots import add_slot_arguments, run_slots
from lora_onnx.cli.options import (
    add_data_arguments,
    add_inputs_argument,
    add_recipe_arguments,
    add_run_arguments,
    config_from_args,
    dims_from_args,
    inputs_from_args,
)
from lora_onnx.cli.peft import add_peft_arguments, run_peft
from lora_onnx.cli.render import info, print_skipped, report_written, warn
from lora_onnx.errors import LoraOnnxError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "inject",
        help="add LoRA branches beside Gemm / MatMul / Conv nodes",
        description="Add a LoRA branch y += s * B(A(x)) beside every targeted Gemm, MatMul and Conv node. "
        "Reads tensor shapes only, never weight bytes. With --peft, applies a trained PEFT adapter instead.",
    )
    parser.add_argument(
        "model",
        help="input .onnx model (never modified); with --peft (also --as-inputs, --merge, --mixed) also a "
        "folder of model files (an Optimum, genai or pipeline export) or several model files, written to "
        "the folder -o",
    )  # fmt: skip
    parser.add_argument("more_models", nargs="*", metavar="MODEL", help="more model files (a folder run)")
    parser.add_argument(
        "-o", "--output", required=True, help="output .onnx path (a folder for folder inputs)"
    )
    parser.add_argument(
        "--json", metavar="REPORT",
        help="with --peft: write a machine-readable report (modules per model file, skipped keys)",
    )  # fmt: skip
    add_recipe_arguments(parser)
    add_peft_arguments(parser)
    parser.add_argument(
        "--validate", action="store_true",
        help="prove the output in onnxruntime before writing it (unchanged outputs for B = 0 inits, "
        "otherwise equal to its own fold)",
    )  # fmt: skip
    add_slot_arguments(parser)
    add_mixed_arguments(parser)
    add_data_arguments(parser)
    add_run_arguments(parser)
    add_inputs_argument(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    folder = folder_input([args.model, *args.more_models])
    if folder is not None:
        return run_inject_folder(args, folder)
    if args.json and not args.peft:
        raise LoraOnnxError("--json reports a --peft run (or a folder run)")
    if args.skip_unmatched and not args.peft:
        raise LoraOnnxError("--skip-unmatched applies with --peft (keys of a trained adapter)")
    if wants_mixed(args):
        return run_mixed(args)
    if args.as_inputs or args.strength_input or args.adapter_out:
        return run_slots(args)
    if args.peft or args.merge or args.base_weights:
        return run_peft(args)
    from lora_onnx.commands.inject import inject

    result = inject(
        args.model, config_from_args(args), output=args.output, validate=args.validate,
        providers=args.providers, dims=dims_from_args(args), link_data=args.link_data,
        allow_nonfinite=args.allow_nonfinite, inputs=inputs_from_args(args),
    )  # fmt: skip
    for message in result.warnings:
        warn(message)
    print_skipped((*result.scan.skipped, *result.plan.skipped))
    sites = len(result.branches)
    info(f"Planned {sites} LoRA branch(es), {result.plan.lora_params:,} LoRA parameters.")
    return report_written(result.validation, "Proof in onnxruntime", result.output)
