"""``lora-onnx validate``: compare two models' outputs in onnxruntime."""

from __future__ import annotations

import argparse
from pathlib import Path

from lora_onnx.cli.options import add_run_arguments, dims_from_args
from lora_onnx.cli.render import QUIET, final, print_validation, validation_verdict, verbosity, write_json
from lora_onnx.errors import EXIT_MISMATCH, LoraOnnxError


def _tolerance(items: list[str] | None, flag: str) -> float | dict[str, float] | None:
    """``--rtol 1e-3`` for every output, ``--rtol logits:1e-3`` for one (repeatable; both mix)."""
    if not items:
        return None
    from lora_onnx.common.finite import finite_number

    values: dict[str, float] = {}
    for item in items:
        name, _, number = item.rpartition(":")
        try:
            values[name or "*"] = float(number)
        except ValueError as exc:
            raise LoraOnnxError(f"{flag} takes a number or OUTPUT:number, got {item!r}") from exc
        finite_number(values[name or "*"], f"{flag} for output {name!r}" if name else flag)
    return values


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "validate",
        help="run two models in onnxruntime on the same inputs and compare every output",
        description="Run REFERENCE and CANDIDATE on the same inputs and compare every output: an output "
        "passes when max|cand - ref| <= atol + rtol * max|ref|; NaN / Inf never agree (see "
        "--allow-nonfinite). Exit 0 when all agree, 1 when any does not.",
    )
    parser.add_argument("reference", help="reference model")
    parser.add_argument("candidate", help="model to check against it")
    parser.add_argument(
        "--rtol", action="append", metavar="[OUTPUT:]R", help="relative tolerance (default by dtype)"
    )
    parser.add_argument(
        "--atol", action="append", metavar="[OUTPUT:]A", help="absolute tolerance (default by dtype)"
    )
    parser.add_argument("--inputs", metavar="FILE.npz", help="input arrays named after the graph inputs")
    parser.add_argument("--seed", type=int, default=0, help="seed for generated inputs")
    parser.add_argument("--json", metavar="REPORT", help="write a machine-readable report")
    add_run_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.inputs and args.dim:
        raise LoraOnnxError("--dim shapes generated inputs; with --inputs FILE.npz the arrays' shapes apply")
    from lora_onnx.model.save import check_report_paths
    from lora_onnx.proofs.validation import validate

    models = [Path(args.reference), Path(args.candidate)]
    check_report_paths([args.json], [*models, args.inputs], models)  # before any work
    report = validate(
        args.reference, args.candidate, providers=args.providers, rtol=_tolerance(args.rtol, "--rtol"),
        atol=_tolerance(args.atol, "--atol"), inputs=args.inputs, dims=dims_from_args(args), seed=args.seed,
        allow_nonfinite=args.allow_nonfinite,
    )  # fmt: skip
    print_validation(report)
    if verbosity() == QUIET and report.ok:
        final(validation_verdict(report))  # the table's title, which quiet does not print
    if args.json:
        write_json(args.json, report.to_json())
    return 0 if report.ok else EXIT_MISMATCH
