"""``lora-onnx inspect``: list a model's LoRA sites and skipped nodes."""

from __future__ import annotations

import argparse
import json

from lora_onnx.cli.options import add_recipe_arguments, config_from_args
from lora_onnx.cli.render import final, print_inspection


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "inspect",
        help="list the sites a recipe would change, with A/B shapes, and the skipped nodes with reasons",
        description="Show every site (module path, op, A and B shapes, LoRA parameters; with -v also node, "
        "weight and layout; --json has all) for a recipe, every node that cannot take a branch and why, "
        "and totals.",
    )
    parser.add_argument("model", help="an .onnx model")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    add_recipe_arguments(parser, fresh=False)  # no alpha, init, seed or name: they change no site or shape
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lora_onnx.commands.inspect import inspect_model

    inspection = inspect_model(args.model, config_from_args(args))
    if args.json:
        final(json.dumps(inspection.to_json(), indent=2, default=str))
    else:
        print_inspection(inspection)
    return 0
