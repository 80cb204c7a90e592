"""``lora-onnx inject --peft DIR [--merge]``: apply a trained PEFT adapter (options and the run)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from lora_onnx.cli.options import (
    AdapterSourceAction,
    adapter_sources,
    add_recipe_arguments,
    dims_from_args,
    inputs_from_args,
)
from lora_onnx.cli.render import info, report_written, warn, write_json
from lora_onnx.common.constants import DEFAULT_ADAPTER
from lora_onnx.errors import AdapterError, LoraOnnxError

if TYPE_CHECKING:
    from lora_onnx import PeftResult
    from lora_onnx.adapters.formats.source import PeftRef

#: Recipe options that a PEFT adapter's own config decides (--name still names the adapter).
_RECIPE_FLAGS = {
    "rank": "--rank", "alpha": "--alpha", "rslora": "--rslora", "target": "--target",
    "target_regex": "--target-regex", "exclude": "--exclude", "exclude_regex": "--exclude-regex",
    "rank_pattern": "--rank-pattern", "alpha_pattern": "--alpha-pattern", "ops": "--ops", "init": "--init",
    "seed": "--seed",
}  # fmt: skip


def add_peft_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("trained PEFT adapter")
    group.add_argument(
        "--peft", metavar="ADAPTER[:STRENGTH]", action=AdapterSourceAction, kind="peft",
        help="apply this trained LoRA with PEFT's numerics instead of a fresh recipe: a PEFT adapter folder "
        "(adapter_config.json + adapter_model.safetensors) or a single-file LoRA (.safetensors: diffusers "
        "or kohya); ':STRENGTH' (a number >= 0) scales it. Repeatable: each is its own adapter, named "
        "after its file (with --mixed: one per adapter index)",
    )  # fmt: skip
    group.add_argument(
        "--component", metavar="NAME",
        help="with a single-file LoRA: the part of it for this model (unet, text_encoder, text_encoder_2...; "
        "default: the one whose modules match the model)",
    )  # fmt: skip
    group.add_argument(
        "--merge", action="store_true",
        help="with --peft: fold the adapter into the weights in the same step (PEFT's merge_and_unload)",
    )  # fmt: skip
    add_base_weights_argument(group)
    group.add_argument(
        "--module-map", metavar="REGEX=REPL", nargs="+", action="extend", default=[],
        help="with --peft: rename adapter module paths the graph does not have (re.sub, in order; "
        "onnxruntime-genai's self_attn -> attn is built in)",
    )  # fmt: skip
    group.add_argument(
        "--skip-unmatched", action="store_true",
        help="with --peft: skip adapter keys whose module the graph does not have (the export left it "
        "out: a pooler, a head not exported) instead of refusing; they are listed in a warning and --json",
    )  # fmt: skip


def add_base_weights_argument(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    parser.add_argument(
        "--base-weights", metavar="FILE",
        help="with --peft: the base model's original parameters as .safetensors "
        "(safetensors.torch.save_file(model.state_dict(), FILE)); needed where the exporter folded a "
        "BatchNorm into an adapted weight (read lazily: only the adapted modules' weights)",
    )  # fmt: skip


def peft_ref(value: str, component: str | None = None) -> PeftRef:
    """``--peft PATH[:STRENGTH]`` (and ``--component``) as a :class:`~lora_onnx.adapters.formats.PeftRef`; a
    missing path is named here, with the strength rule when the value has a ':'."""
    from lora_onnx.adapters.formats.source import PeftRef, parse_adapter_spec

    path, strength = parse_adapter_spec(value)
    if not Path(path).exists():
        hint = " (a ':' suffix is a strength only when it is a number >= 0)" if ":" in value else ""
        raise AdapterError(f"--peft {value}: no such adapter folder or LoRA file{hint}")
    return PeftRef(Path(path), strength, component)


def _recipe_defaults() -> argparse.Namespace:
    parser = argparse.ArgumentParser(add_help=False)
    add_recipe_arguments(parser)
    return parser.parse_args([])


def run_peft(args: argparse.Namespace) -> int:
    if args.base_weights and not args.peft:
        raise LoraOnnxError("--base-weights applies with --peft (the base of a trained PEFT adapter)")
    if not args.peft:
        raise LoraOnnxError("--merge applies with --peft (to fold a fresh adapter, run lora-onnx merge)")
    refuse_recipe_flags(args)
    if args.json:
        from lora_onnx.model.save import check_report_paths

        check_report_paths([args.json], [args.model, args.output, args.peft])
    from lora_onnx import apply_peft
    from lora_onnx.commands.apply_peft import default_adapter_names
    from lora_onnx.kinds import kind_of

    values = [value for _, value in adapter_sources(args, "peft")] or [args.peft]
    refs = [peft_ref(value) for value in values]
    specs = [(ref.path, ref.strength) for ref in refs]
    if len(specs) > 1 and args.name != DEFAULT_ADAPTER:
        raise LoraOnnxError(
            "--name names one adapter; several --peft adapters are named after their files "
            f"({', '.join(default_adapter_names([path for path, _ in specs]))})"
        )

    result = apply_peft(
        args.model, specs, output=args.output, component=args.component, merge=args.merge,
        validate=args.validate, adapter_name=args.name, providers=args.providers, dims=dims_from_args(args),
        allow_nonfinite=args.allow_nonfinite,
        base_weights=args.base_weights,
        link_data=args.link_data, inputs=inputs_from_args(args), skip_unmatched=args.skip_unmatched,
        module_map=args.module_map,
    )  # fmt: skip
    for message in result.warnings:
        warn(message)
    branches = result.branches
    for (path, strength), name, plan in zip(specs, result.adapters, result.plans, strict=True):
        mine = [b for b in branches if b.adapter == name]
        modules = len({b.peft_path for b in mine})
        kinds = {
            "DoRA": sum(1 for b in mine if b.magnitude),
            "lora_bias": sum(1 for b in mine if b.lora_bias),
            "embedding": sum(1 for b in mine if kind_of(b.op).peft_role == "embedding"),
        }
        detail = ", ".join(f"{kind} {count}" for kind, count in kinds.items() if count)
        named = f" as {name!r}" if len(specs) > 1 else ""
        at = f" at strength {strength:g}" if strength != 1.0 else ""
        info(
            f"Applied PEFT adapter {path}{named}{at}: {modules} module(s) on {len(mine)} node(s)"
            f"{f' ({detail})' if detail else ''}, {plan.plan.lora_params:,} LoRA parameters."
        )
        if plan.saved:
            saved = ", ".join(dict.fromkeys(tensor.module for tensor in plan.saved))
            info(f"modules_to_save: {len(plan.saved)} tensor(s) of {saved} replace the base's.")
    for note in result.fold_notes:
        info(f"note: {note}")
    if args.merge:
        info(f"Merged: folded {len(result.folded)} branch(es) into the weights.")
    title = "Merged vs unmerged in onnxruntime" if args.merge else "Proof in onnxruntime (vs its own fold)"
    code = report_written(result.validation, title, result.output)
    if args.json:
        write_json(args.json, _json(args, result, len({b.peft_path for b in branches})))
    return code


def _json(args: argparse.Namespace, result: PeftResult, modules: int) -> dict[str, object]:
    return {
        "command": "inject --peft" + (" --merge" if args.merge else ""),
        "model": str(args.model),
        "output": str(result.output) if result.output is not None else None,
        "adapter": [str(value) for _, value in adapter_sources(args, "peft")] or str(args.peft),
        "modules": sorted({b.peft_path for b in result.branches}),
        "module_count": modules,
        "branches": len(result.branches),
        "folded": len(result.folded),
        "skipped_keys": list(result.peft.skipped_keys),
        "validation": result.validation.to_json() if result.validation is not None else None,
        "warnings": list(result.warnings),
    }


def refuse_recipe_flags(args: argparse.Namespace) -> None:
    """A PEFT adapter's config sets ranks, alphas and targets: a recipe flag beside it is refused."""
    defaults = _recipe_defaults()
    given = [flag for key, flag in _RECIPE_FLAGS.items() if getattr(args, key) != getattr(defaults, key)]
    if given:
        raise LoraOnnxError(
            f"--peft takes ranks, alphas and targets from the adapter's adapter_config.json; drop {given[0]}"
        )
