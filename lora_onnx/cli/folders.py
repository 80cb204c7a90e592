"""Folder inputs of ``inject --peft`` (also ``--merge``, ``--as-inputs``, ``--mixed``), ``merge`` and
``export-adapter``: a folder of model files (or several model files) in, a folder out; the table says
which file took which modules.

``inject`` and ``merge`` hand a run to :func:`run_inject_folder` / :func:`run_merge_folder` when their
input is a folder or more than one file (``inject --mixed`` goes on to :func:`run_mixed_folder`);
``export-adapter`` to :func:`run_export_folder` when MODEL or ``--for`` is a folder.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from lora_onnx.cli.options import adapter_sources, dims_from_args, inputs_from_args
from lora_onnx.cli.render import (
    VERBOSE,
    final,
    info,
    new_table,
    print_table,
    print_validation,
    verbosity,
    warn,
    write_json,
)
from lora_onnx.common.constants import ADAPTER_INDEX as INDEX_INPUT
from lora_onnx.errors import EXIT_MISMATCH, LoraOnnxError

if TYPE_CHECKING:
    from lora_onnx.commands.folders import FolderResult


def folder_input(models: list[str]) -> str | list[str] | None:
    """The folder run's input (a folder holding model files, or several files), or None for a one-model
    run (a folder without any .onnx file is refused there, as "a folder, not an .onnx file")."""
    if len(models) > 1:
        return models
    folder = Path(models[0])
    if folder.is_dir() and next(folder.rglob("*.onnx"), None) is not None:
        return models[0]
    return None


def run_inject_folder(args: argparse.Namespace, source: str | list[str]) -> int:
    from lora_onnx.cli.inject_mixed import wants_mixed
    from lora_onnx.cli.peft import refuse_recipe_flags

    if wants_mixed(args):
        return run_mixed_folder(args, source)
    if not args.peft:
        raise LoraOnnxError(
            "a folder (or several model files) takes a trained adapter, --peft ADAPTER_DIR; for a recipe "
            "over many models use lora-onnx batch"
        )
    if len(adapter_sources(args, "peft")) > 1:
        raise LoraOnnxError("--peft is given more than once: a folder run applies one adapter")
    if args.base_weights:
        raise LoraOnnxError("--base-weights takes one model's parameters: apply such models one by one")
    if getattr(args, "component", None):
        raise LoraOnnxError(
            "--component picks one model's part of a LoRA file; a folder run gives each sub-folder "
            "(unet/, text_encoder/, ...) the part of its name"
        )
    refuse_recipe_flags(args)
    from lora_onnx.cli.peft import peft_ref
    from lora_onnx.commands.folders import apply_peft_folder

    adapter = peft_ref(args.peft)  # ADAPTER[:STRENGTH]
    _check_json(args, [*([source] if isinstance(source, str) else source), adapter.path])
    result = apply_peft_folder(
        source, adapter, args.output, merge=args.merge, as_inputs=args.as_inputs,
        strength_input=args.strength_input, adapter_output=args.adapter_out, validate=args.validate,
        adapter_name=args.name, providers=args.providers, dims=dims_from_args(args),
        allow_nonfinite=args.allow_nonfinite, skip_unmatched=args.skip_unmatched, link_data=args.link_data,
        inputs=inputs_from_args(args),
    )  # fmt: skip
    return _finish(args, result, "adapter modules")


def run_mixed_folder(args: argparse.Namespace, source: str | list[str]) -> int:
    """``inject FOLDER --mixed --peft A --peft B -o OUT_DIR``: one index, the same adapters, every file."""
    from lora_onnx.cli.peft import peft_ref

    if not args.mixed:
        flag = (
            "--stacks-as-inputs" if args.stacks_as_inputs else "--slots" if args.slots else "--adapter-file"
        )
        raise LoraOnnxError(f"{flag} needs --mixed")
    if adapter_sources(args, "file") or args.slots:
        raise LoraOnnxError(
            "a folder run of --mixed takes PEFT adapters (--peft, once per adapter); adapter files name one "
            "model's slots: build that model's mixed model alone"
        )
    for flag, given in (
        ("--as-inputs", args.as_inputs),
        ("--strength-input", args.strength_input),
        ("--adapter-out", args.adapter_out),
        ("--merge", args.merge),
    ):
        if given:
            raise LoraOnnxError(
                f"{flag} does not apply to --mixed (for run-time stacks use --stacks-as-inputs)"
            )
    for flag, given in (
        ("--base-weights", args.base_weights),
        ("--component", getattr(args, "component", None)),
        ("--inputs", getattr(args, "inputs", None)),
    ):
        if given:
            raise LoraOnnxError(f"{flag} belongs to one model: build such mixed models one by one")
    adapters = [peft_ref(value) for _, value in adapter_sources(args, "peft")]
    if not adapters:
        raise LoraOnnxError("--mixed needs adapters: --peft ADAPTER, once per adapter")
    if args.target or args.target_regex or args.exclude or args.exclude_regex or args.rank_pattern:
        warn("recipe options (--target, --rank...) do not apply to --mixed: the adapters define the sites")
    from lora_onnx.commands.folder_mixed import inject_mixed_folder

    _check_json(args, [*([source] if isinstance(source, str) else source), *(a.path for a in adapters)])
    result = inject_mixed_folder(
        source, adapters, args.output, stacks_as_inputs=args.stacks_as_inputs, validate=args.validate,
        providers=args.providers, dims=dims_from_args(args), allow_nonfinite=args.allow_nonfinite,
        skip_unmatched=args.skip_unmatched, link_data=args.link_data,
    )  # fmt: skip
    listing = ", ".join(f"{i}: {a.path}" for i, a in enumerate(adapters))
    info(
        f"Adapters by index ({listing}); input {INDEX_INPUT!r} in every changed file: int64, one entry "
        "per batch row, -1 = base model."
    )
    return _finish(args, result, "adapter modules")


def run_export_folder(args: argparse.Namespace) -> int:
    """``export-adapter`` with a folder: one adapter file per model file, or one PEFT folder."""
    if args.base_weights:
        raise LoraOnnxError("--base-weights takes one model's parameters: export such models one by one")
    if args.component:
        raise LoraOnnxError(
            "--component picks one model's part of a LoRA file; a folder run gives each sub-folder "
            "(unet/, text_encoder/, ...) the part of its name"
        )
    from lora_onnx.cli.peft import peft_ref
    from lora_onnx.commands.folder_exports import export_adapter_folder

    peft = peft_ref(args.peft) if args.peft else None
    _check_json(args, [p for p in (args.model, args.for_model, peft and str(peft)) if p])
    result = export_adapter_folder(
        args.model, args.output, peft=peft, for_folder=args.for_model, adapter=args.name, format=args.format,
        adapter_version=args.adapter_version, model_version=args.model_version,
        skip_unmatched=args.skip_unmatched,
    )  # fmt: skip
    for message in result.warnings:
        warn(message)
    table = new_table(f"Model files of {result.folder} ({len(result.files)})")
    for column in ("model file", "adapter modules", "tensors", "written"):
        table.add_column(column, overflow="fold")
    for file in result.files:
        modules = _modules(file.modules) if file.modules else "-"
        if file.output is None:
            written = "-"
        elif result.format == "peft":
            written = "into the PEFT folder" + (f" ({file.note})" if file.note else "")
        else:
            written = Path(file.output).relative_to(result.output).as_posix()
        table.add_row(file.model, modules, str(file.tensors), written)
    print_table(table)
    if result.skipped_keys:
        info(f"Skipped keys ({len(result.skipped_keys)}, --skip-unmatched): {', '.join(result.skipped_keys)}")
    if getattr(args, "json", None):
        write_json(args.json, result.to_json())
    if result.format == "peft":
        final(f"Wrote PEFT adapter folder {result.output}")
    else:
        count = sum(1 for file in result.files if file.output is not None)
        final(f"Wrote {count} adapter file(s) ({result.format}) to {result.output}")
    return 0


def run_merge_folder(args: argparse.Namespace, source: str | list[str]) -> int:
    for flag, given in (("--adapter-file", args.adapter_file), ("--adapter-index", args.adapter_index)):
        if given is not None:
            raise LoraOnnxError(f"{flag} belongs to one model: merge such model files one by one")
    if args.strength is not None:
        raise LoraOnnxError("--strength goes with --adapter-file: merge such model files one by one")
    from lora_onnx.commands.folders import merge_folder

    _check_json(args, [source] if isinstance(source, str) else source)
    result = merge_folder(
        source, args.output, adapters=args.adapter, partial=args.partial, dequantize=args.dequantize,
        validate=args.validate, providers=args.providers, dims=dims_from_args(args),
        allow_nonfinite=args.allow_nonfinite,
    )  # fmt: skip
    return _finish(args, result, "folded modules")


def _check_json(args: argparse.Namespace, reads: list[str]) -> None:
    """Refuse, before any work, a --json report that would replace an input (a model file, an adapter)."""
    if getattr(args, "json", None):
        from lora_onnx.model.save import check_report_paths

        check_report_paths([args.json], reads)


def _finish(args: argparse.Namespace, result: FolderResult, what: str) -> int:
    for message in result.warnings:
        warn(message)
    for note in result.notes:
        info(f"note: {note}")
    print_table(_table(result, what))
    for file in result.files:
        for title, report in file.validations:
            print_validation(report, f"{file.model}: {title}")
    if result.skipped_keys:
        info(f"Skipped keys ({len(result.skipped_keys)}, --skip-unmatched): {', '.join(result.skipped_keys)}")
    if getattr(args, "json", None):
        write_json(args.json, result.to_json())
    if not result.ok:
        warn("validation failed; nothing was written", always=True)
        return EXIT_MISMATCH
    changed = sum(1 for file in result.files if file.result is not None)
    info(f"{changed} of {len(result.files)} model file(s) changed, {len(result.copied)} side file(s) copied.")
    final(f"Wrote {result.output}")
    return 0


def _table(result: FolderResult, what: str):  # type: ignore[no-untyped-def]
    table = new_table(f"Model files of {result.folder} ({len(result.files)})")
    for column in ("model file", what, "nodes", "written"):
        table.add_column(column, overflow="fold")
    for file in result.files:
        modules = _modules(file.modules) if file.modules else "-"
        written = "changed" if file.result is not None else "unchanged"
        if file.adapter_output is not None:
            written += f", adapter {Path(file.adapter_output).name}"
        table.add_row(file.model, modules, str(file.branches), written)
    return table


def _modules(paths: tuple[str, ...]) -> str:
    """Every module with --verbose (--json has them all too), else the count and the first three."""
    if verbosity() >= VERBOSE:
        return ", ".join(paths)
    shown = ", ".join(paths[:3])
    return f"{len(paths)}: {shown}" + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")
