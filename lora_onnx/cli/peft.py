"""``lora-onnx inject --peft DIR [--merge]``: apply a trained PEFT adapter (options and the run)."""

from __future__ import annotations

import argparse

from lora_onnx.cli.options import (
    AdapterSourceAction,
    adapter_sources,
    add_recipe_arguments,
    dims_from_args,
    inputs_from_args,
)
from lora_onnx.cli.render import info, report_written, warn
from lora_onnx.errors import LoraOnnxError

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
        "--peft", metavar="ADAPTER_DIR", action=AdapterSourceAction, kind="peft",
        help="apply this PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors) with PEFT's "
        "numerics instead of a fresh recipe (with --mixed: repeatable, one per adapter)",
    )  # fmt: skip
    group.add_argument(
        "--merge", action="store_true",
        help="with --peft: fold the adapter into the weights in the same step (PEFT's merge_and_unload)",
    )  # fmt: skip
    add_base_weights_argument(group)


def add_base_weights_argument(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    parser.add_argument(
        "--base-weights", metavar="FILE",
        help="with --peft: the base model's original parameters as .safetensors "
        "(safetensors.torch.save_file(model.state_dict(), FILE)); needed where the exporter folded a "
        "BatchNorm into an adapted weight (read lazily: only the adapted modules' weights)",
    )  # fmt: skip


def _recipe_defaults() -> argparse.Namespace:
    parser = argparse.ArgumentParser(add_help=False)
    add_recipe_arguments(parser)
    return parser.parse_args([])


def run_peft(args: argparse.Namespace) -> int:
    if args.base_weights and not args.peft:
        raise LoraOnnxError("--base-weights applies with --peft (the base of a trained PEFT adapter)")
    if not args.peft:
        raise LoraOnnxError("--merge applies with --peft (to fold a fresh adapter, run lora-onnx merge)")
    if len(adapter_sources(args, "peft")) > 1:
        raise LoraOnnxError(
            "--peft is given more than once: one model takes one adapter, or several with --mixed"
        )
    defaults = _recipe_defaults()
    given = [flag for key, flag in _RECIPE_FLAGS.items() if getattr(args, key) != getattr(defaults, key)]
    if given:
        raise LoraOnnxError(
            f"--peft takes ranks, alphas and targets from the adapter's adapter_config.json; drop {given[0]}"
        )
    from lora_onnx import apply_peft
    from lora_onnx.kinds import kind_of

    result = apply_peft(
        args.model, args.peft, output=args.output, merge=args.merge, validate=args.validate,
        adapter_name=args.name, providers=args.providers, dims=dims_from_args(args),
        allow_nonfinite=args.allow_nonfinite,
        base_weights=args.base_weights,
        link_data=args.link_data, inputs=inputs_from_args(args),
    )  # fmt: skip
    for message in result.warnings:
        warn(message)
    branches = result.branches
    modules = len({b.peft_path for b in branches})
    kinds = {
        "DoRA": sum(1 for b in branches if b.magnitude),
        "lora_bias": sum(1 for b in branches if b.lora_bias),
        "embedding": sum(1 for b in branches if kind_of(b.op).peft_role == "embedding"),
    }
    detail = ", ".join(f"{name} {count}" for name, count in kinds.items() if count)
    info(
        f"Applied PEFT adapter {args.peft}: {modules} module(s) on {len(branches)} node(s)"
        f"{f' ({detail})' if detail else ''}, {result.plan.lora_params:,} LoRA parameters."
    )
    if result.peft.saved:
        saved = ", ".join(dict.fromkeys(tensor.module for tensor in result.peft.saved))
        info(f"modules_to_save: {len(result.peft.saved)} tensor(s) of {saved} replace the base's.")
    for note in result.fold_notes:
        info(f"note: {note}")
    if args.merge:
        info(f"Merged: folded {len(result.folded)} branch(es) into the weights.")
    title = "Merged vs unmerged in onnxruntime" if args.merge else "Proof in onnxruntime (vs its own fold)"
    return report_written(result.validation, title, result.output)
