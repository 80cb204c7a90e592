"""``lora-onnx export-adapter``: write an adapter file for a model's LoRA slots."""

from __future__ import annotations

import argparse

from lora_onnx.cli.folders import folder_input, run_export_folder
from lora_onnx.cli.peft import add_base_weights_argument, peft_ref
from lora_onnx.cli.render import final, warn
from lora_onnx.common.constants import ADAPTER_FORMATS as FORMATS
from lora_onnx.errors import LoraOnnxError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export-adapter",
        help="write an adapter file (.onnx_adapter, .safetensors, .npz) for a model's LoRA slots",
        description="Convert an adapter into the tensors a slotted model (inject --as-inputs) expects: "
        "names, layouts, dtypes, with each site's LoRA scale folded into B. The adapter comes from a PEFT "
        "folder (--peft DIR --for MODEL) or from MODEL's constant branches (renamed for --for's slots if "
        "given). --format peft writes MODEL's constant branches as a PEFT folder instead.",
    )
    parser.add_argument(
        "model", nargs="?",
        help="a model carrying the adapter as constant branches; or a folder of such models (one adapter "
        "file per model file in the folder -o; --format peft: one PEFT folder gathered from every file)",
    )  # fmt: skip
    parser.add_argument(
        "-o", "--output", required=True,
        help="output file (a folder for --format peft, and for folder inputs)",
    )  # fmt: skip
    parser.add_argument(
        "--peft", metavar="ADAPTER[:STRENGTH]",
        help="a PEFT adapter folder or single-file LoRA (.safetensors), ':STRENGTH' scales it (needs --for)",
    )  # fmt: skip
    parser.add_argument("--component", metavar="NAME", help="with a LoRA file: its part for the model")
    add_base_weights_argument(parser)
    parser.add_argument(
        "--skip-unmatched", action="store_true",
        help="with --peft: skip keys of modules the graph does not have (pruned by the export); warns",
    )  # fmt: skip
    parser.add_argument(
        "--for", dest="for_model", metavar="MODEL",
        help="the slotted model the file is for (its slot names); a folder of slotted models (inject "
        "FOLDER --as-inputs) for one adapter file per model file, each with the modules that file carries",
    )  # fmt: skip
    parser.add_argument(
        "--json", metavar="REPORT", help="for a folder input: write a machine-readable report"
    )
    parser.add_argument("--name", help="the adapter (default: the only one the model has)")
    parser.add_argument("--format", choices=(*FORMATS, "peft"), help="default: from the output suffix")
    parser.add_argument("--adapter-version", type=int, default=1, help=".onnx_adapter adapter version (1)")
    parser.add_argument("--model-version", type=int, default=1, help=".onnx_adapter model version (1)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    for flag, version in (
        ("--adapter-version", args.adapter_version),
        ("--model-version", args.model_version),
    ):
        if not 0 <= version < 2**31:
            raise LoraOnnxError(f"{flag} must be a whole number from 0 to {2**31 - 1}, got {version}")
    if any(folder_input([path]) is not None for path in (args.model, args.for_model) if path):
        return run_export_folder(args)
    if args.json:
        raise LoraOnnxError("--json reports a folder export; a one-model export prints its result")
    from lora_onnx.commands.swap import export_adapter

    peft = peft_ref(args.peft, args.component) if args.peft else None
    result = export_adapter(
        args.model, args.output, peft=peft, for_model=args.for_model, adapter=args.name,
        format=args.format, adapter_version=args.adapter_version, model_version=args.model_version,
        base_weights=args.base_weights, skip_unmatched=args.skip_unmatched,
    )  # fmt: skip
    if result.skipped_keys:
        warn(
            f"skipped {len(result.skipped_keys)} adapter key(s) of modules the graph does not have "
            f"(--skip-unmatched): {', '.join(result.skipped_keys)}"
        )
    if result.format == "peft":
        final(f"Wrote PEFT adapter folder {result.output}")
        return 0
    slots = sum(1 for name in result.tensors if name.endswith(".lora_A.weight"))
    empty = f"; {len(result.empty)} left empty (rank 0: those slots stay off)" if result.empty else ""
    final(
        f"Wrote {result.output} ({result.format}): adapter {result.adapter!r} from {result.origin}, "
        f"{len(result.tensors)} tensors for {slots} slot(s){empty}."
    )
    return 0
