"""``lora-onnx inject --mixed``: one model, a different adapter per batch row (``lora_adapter_index``).

Registered on the ``inject`` command (:func:`add_mixed_arguments`); ``inject`` hands a run with
``--mixed`` (or its options) to :func:`run_mixed`. ``--peft DIR`` and ``--adapter-file FILE`` may be
repeated and mixed; the order they are given in is the stack index.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from lora_onnx.cli.options import AdapterSourceAction, adapter_sources, dims_from_args, inputs_from_args
from lora_onnx.cli.peft import peft_ref
from lora_onnx.cli.render import info, print_skipped, report_written, warn
from lora_onnx.common.constants import ADAPTER_INDEX as INDEX_INPUT
from lora_onnx.errors import AdapterError, LoraOnnxError

if TYPE_CHECKING:
    from lora_onnx.adapters.formats.source import PeftRef


def add_mixed_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("mixed-adapter batches (a different adapter per batch row)")
    group.add_argument(
        "--mixed", action="store_true",
        help=f"stack several adapters at every site; the model takes '{INDEX_INPUT}' (int64, one entry per "
        "batch row: the adapter's position among --peft / --adapter-file, -1 = base model)",
    )  # fmt: skip
    group.add_argument(
        "--adapter-file", action=AdapterSourceAction, kind="file", metavar="FILE",
        help="with --mixed, repeatable: an adapter file (.onnx_adapter, .safetensors, .npz) written by "
        "export-adapter for a slotted model of the same base",
    )  # fmt: skip
    group.add_argument(
        "--slots", metavar="MODEL",
        help="with --adapter-file: the slotted model the files were exported for (default: MODEL, when it "
        "has slots); files map to sites through its slots",
    )  # fmt: skip
    group.add_argument(
        "--stacks-as-inputs", action="store_true",
        help="with --mixed: the stacks are graph inputs too (backed by initializers), so other adapters "
        "can be fed at run time (see lora_onnx.commands.inject_mixed.stack_adapters)",
    )  # fmt: skip


def wants_mixed(args: argparse.Namespace) -> bool:
    return bool(args.mixed or args.stacks_as_inputs or args.slots or _files(args))


def _files(args: argparse.Namespace) -> list[str]:
    return [value for _, value in adapter_sources(args, "file")]


def run_mixed(args: argparse.Namespace) -> int:
    if not args.mixed:
        flag = (
            "--adapter-file" if _files(args) else "--stacks-as-inputs" if args.stacks_as_inputs else "--slots"
        )
        raise AdapterError(f"{flag} needs --mixed")
    for flag, given in (
        ("--as-inputs", getattr(args, "as_inputs", False)),
        ("--strength-input", getattr(args, "strength_input", False)),
        ("--adapter-out", getattr(args, "adapter_out", None)),
    ):
        if given:
            raise LoraOnnxError(
                f"{flag} does not apply to --mixed (for run-time stacks use --stacks-as-inputs)"
            )
    if getattr(args, "skip_unmatched", False):
        raise LoraOnnxError("--skip-unmatched applies to one --peft adapter, not to --mixed")
    if getattr(args, "json", None):
        raise LoraOnnxError("--json reports a --peft run (or a folder run), not --mixed")
    sources = adapter_sources(args)
    if not sources:
        raise AdapterError("--mixed needs adapters: --peft DIR or --adapter-file FILE, once per adapter")
    if args.target or args.target_regex or args.exclude or args.exclude_regex or args.rank_pattern:
        warn("recipe options (--target, --rank...) do not apply to --mixed: the adapters define the sites")
    adapters = []
    for kind, value in sources:
        path: Path | PeftRef = Path(value)
        if kind == "peft":
            path = peft_ref(value, getattr(args, "component", None))  # a folder or a LoRA file
        elif not path.is_file():
            raise AdapterError(f"--adapter-file {value}: no such file")
        adapters.append(path)
    if getattr(args, "base_weights", None) and not any(kind == "peft" for kind, _ in sources):
        raise AdapterError("--base-weights applies with --peft (the base of a trained PEFT adapter)")
    from lora_onnx.commands.inject_mixed import inject_mixed

    result = inject_mixed(
        args.model, adapters, slots=args.slots, stacks_as_inputs=args.stacks_as_inputs, output=args.output,
        validate=args.validate, providers=args.providers, dims=dims_from_args(args), link_data=args.link_data,
        allow_nonfinite=args.allow_nonfinite, base_weights=getattr(args, "base_weights", None),
        inputs=inputs_from_args(args),
    )  # fmt: skip
    for message in result.warnings:
        warn(message)
    print_skipped(result.skipped)
    listing = ", ".join(f"{i}: {label}" for i, label in enumerate(result.adapters))
    info(
        f"Added {len(result.branches)} mixed-batch branch(es) holding {len(result.adapters)} adapter(s) "
        f"({listing}); input {result.index_name!r}: int64, one entry per batch row, -1 = base model."
    )
    size = result.batch_size or len(result.rows) or 1
    batches = [result.rows[i : i + size] for i in range(0, len(result.rows), size)]
    listed = " ".join(f"[{', '.join(map(str, batch))}]" for batch in batches)
    if result.batch_size is None:
        title = f"Mixed batch {listed} vs each row alone with its adapter"
    else:  # a fixed batch: rows cannot run alone
        title = f"Mixed batches {listed} (fixed size {size}) vs each row's adapter on the same batch"
    return report_written(result.validation, title, result.output)
