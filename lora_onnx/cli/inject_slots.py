"""``lora-onnx inject --as-inputs``: LoRA slots (graph inputs with empty defaults), not constant branches.

Registered on the ``inject`` command (:func:`add_slot_arguments`); ``inject`` hands a run with
``--as-inputs`` to :func:`run_slots`.
"""

from __future__ import annotations

import argparse

from lora_onnx.cli.options import config_from_args, dims_from_args, inputs_from_args
from lora_onnx.cli.render import final, info, print_skipped, print_validation, warn
from lora_onnx.errors import EXIT_MISMATCH, AdapterError, LoraOnnxError


def add_slot_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("run-time adapters (LoRA slots)")
    group.add_argument(
        "--as-inputs", action="store_true",
        help="make every LoRA tensor a graph input with an empty (rank 0) default, so onnxruntime can "
        "activate adapter files per run (LoraAdapter); outputs equal the base's with no adapter active",
    )  # fmt: skip
    group.add_argument(
        "--strength-input", action="store_true",
        help="with --as-inputs: add a per-adapter strength input '<name>.lora_strength' (shape (1,), "
        "default 1.0) that scales the adapter per run",
    )  # fmt: skip
    group.add_argument(
        "--adapter-out", metavar="FILE",
        help="with --as-inputs: also write the adapter the slots were planned from (the fresh init or the "
        "--peft adapter) as .onnx_adapter, .safetensors or .npz",
    )  # fmt: skip


def run_slots(args: argparse.Namespace) -> int:
    if getattr(args, "json", None):
        raise LoraOnnxError("--json reports an inject --peft run with constant branches (or a folder run)")
    for flag, given in (("--strength-input", args.strength_input), ("--adapter-out", args.adapter_out)):
        if given and not args.as_inputs:
            raise AdapterError(f"{flag} needs --as-inputs")
    if args.init != "default" and args.adapter_out is None and getattr(args, "peft", None) is None:
        warn(f"--init {args.init} only shapes an --adapter-out file; the slots themselves stay empty")
    from lora_onnx.cli.peft import peft_ref
    from lora_onnx.commands.swap import inject_slots
    from lora_onnx.stages.slots import strength_name

    config = config_from_args(args)
    peft = getattr(args, "peft", None)
    ref = peft_ref(peft, getattr(args, "component", None)) if peft else None
    result = inject_slots(
        args.model, config, peft=ref, strength_input=args.strength_input,
        output=args.output, adapter_output=args.adapter_out, validate=args.validate,
        providers=args.providers, dims=dims_from_args(args), allow_nonfinite=args.allow_nonfinite,
        base_weights=getattr(args, "base_weights", None), link_data=args.link_data,
        skip_unmatched=getattr(args, "skip_unmatched", False),
        inputs=inputs_from_args(args),
    )  # fmt: skip
    for message in result.source.warnings:
        warn(message)
    print_skipped(result.source.skipped)
    names = {name for branch in result.branches for name in (branch.a, branch.b)}
    extra = f" and strength input {strength_name(config.adapter_name)!r}" if args.strength_input else ""
    info(
        f"Added {len(result.branches)} LoRA slot(s) for adapter {config.adapter_name!r}: {len(names)} graph "
        f"inputs with empty defaults{extra}."
    )
    if result.validation is not None:
        print_validation(result.validation, "No adapter active vs base (must be exact)")
    if result.adapter_validation is not None:
        print_validation(result.adapter_validation, "Adapter active vs the same tensors as constant branches")
    if not result.ok:
        warn("validation failed; nothing was written", always=True)
        return EXIT_MISMATCH
    if result.adapter_output is not None:
        final(f"Wrote adapter {result.adapter_output}")
    final(f"Wrote {result.output}")
    return 0
