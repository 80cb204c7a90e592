"""``lora-onnx check-adapter``: does an adapter file fit a model's LoRA slots?"""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING

from lora_onnx.cli.render import QUIET, console, final, new_table, print_table, verbosity
from lora_onnx.errors import EXIT_MISMATCH

if TYPE_CHECKING:
    from lora_onnx.adapters.check import AdapterCheck


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "check-adapter",
        help="list missing, unexpected and mis-shaped tensors of an adapter file for a slotted model",
        description="Compare every tensor of ADAPTER_FILE with MODEL's slot of the same name (dtype, dims, "
        "A/B ranks). Exit 0 when it fits, 1 when it does not, 2 when a file is unreadable.",
    )
    parser.add_argument("model", help="a model with LoRA slots (inject --as-inputs)")
    parser.add_argument("adapter_file", help=".onnx_adapter, .safetensors or .npz")
    parser.add_argument("--name", help="the adapter whose slots the file is for (default: from its names)")
    parser.add_argument(
        "--partial", action="store_true", help="accept slots the file leaves out entirely (they stay off)"
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lora_onnx.adapters.check import check_adapter

    check = check_adapter(args.model, args.adapter_file, adapter=args.name, partial=args.partial)
    if args.json:
        final(json.dumps(check.to_json(), indent=2))
    else:
        print_check(check)
    return 0 if check.ok else EXIT_MISMATCH


def print_check(check: AdapterCheck) -> None:
    from lora_onnx.adapters.check import shapes_text

    verdict = "fits" if check.ok else f"does NOT fit ({len(check.problems)} problem(s))"
    adapters = ", ".join(check.adapters) or "none"
    title = f"{check.file} vs {check.model} (adapter {adapters}): {verdict}"
    table = new_table(title)
    for column in ("tensor", "status", "expected", "actual", "dtype", "detail"):
        table.add_column(column, overflow="fold")
    for row in check.rows:
        dtype = row.actual_dtype or ""
        if row.expected_dtype and row.expected_dtype != row.actual_dtype:
            dtype = f"{row.actual_dtype or '-'} (want {row.expected_dtype})"
        table.add_row(
            row.name, row.status if row.ok else row.status.upper(), shapes_text(row.expected_shape),
            shapes_text(row.actual_shape), dtype, row.detail,
        )  # fmt: skip
    if check.ok:
        print_table(table)
    else:
        console().print(table)  # the problems, even with --quiet
    counts = ", ".join(f"{count} {status}" for status, count in sorted(check.counts().items()))
    # Quiet prints no table, so its one line carries the verdict the table's title holds.
    verdict_line = f"{title}; " if verbosity() == QUIET and check.ok else ""
    final(f"{verdict_line}{len(check.rows)} tensors: {counts}")
