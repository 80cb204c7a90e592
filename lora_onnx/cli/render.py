"""How results look on a terminal: rich tables on stdout, one-line errors and warnings on stderr."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable
from pathlib import Path

from rich.console import Console
from rich.table import Table

from lora_onnx.atomic import write_file
from lora_onnx.errors import EXIT_MISMATCH
from lora_onnx.inspection import Inspection
from lora_onnx.sites import Skipped
from lora_onnx.validation import ValidationReport


def _console(stderr: bool) -> Console:
    # Piped output (CI logs, files) gets wide tables instead of rich's 80-column default, so module
    # paths stay on one line and stay greppable; terminals use their own width. The stream itself is
    # looked up at each write (no file=), so redirections made later still apply.
    stream = sys.stderr if stderr else sys.stdout
    width = None if stream.isatty() else 240
    return Console(stderr=stderr, highlight=False, soft_wrap=True, width=width)


out = _console(stderr=False)
err = _console(stderr=True)


def error(message: str) -> None:
    err.print(f"lora-onnx: error: {message}", markup=False)


def warn(message: str) -> None:
    err.print(f"lora-onnx: warning: {message}", markup=False)


def info(message: str) -> None:
    out.print(message, markup=False)


def _shape(shape: Iterable[int]) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"


def _count(number: int) -> str:
    return f"{number:,}"


def print_skipped(skipped: Iterable[Skipped]) -> None:
    rows = list(skipped)
    if not rows:
        return
    table = Table(title=f"Skipped nodes ({len(rows)})", title_justify="left")
    for column in ("node", "op", "module path", "reason"):
        table.add_column(column, overflow="fold")
    for skip in rows:
        table.add_row(skip.node, skip.op, skip.module_path, skip.reason)
    out.print(table)


def print_inspection(inspection: Inspection) -> None:
    table = Table(title=f"LoRA sites ({len(inspection.sites)})", title_justify="left")
    columns = (
        "node",
        "op",
        "module path",
        "weight",
        "layout",
        "in",
        "out",
        "A shape",
        "B shape",
        "LoRA params",
    )
    for column in columns:
        justify = "right" if column in ("in", "out", "LoRA params") else "left"
        table.add_column(column, overflow="fold", justify=justify)  # type: ignore[arg-type]
    for row in inspection.sites:
        table.add_row(
            row.node, row.op, row.module_path, row.weight, row.layout, str(row.in_features),
            str(row.out_features), _shape(row.a_shape), _shape(row.b_shape), _count(row.lora_params),
        )  # fmt: skip
    out.print(table)
    print_skipped(inspection.skipped)
    if inspection.branches:
        adapters = sorted({b.adapter for b in inspection.branches})
        info(f"Existing branches: {len(inspection.branches)} (adapters: {', '.join(adapters)})")
    info(
        f"Totals: {len(inspection.sites)} sites, {len(inspection.skipped)} skipped; "
        f"LoRA params {_count(inspection.lora_params)} = {inspection.lora_share:.3%} "
        f"of the base's {_count(inspection.base_params)}"
    )
    for message in inspection.warnings:
        warn(message)


def print_validation(report: ValidationReport, title: str = "Validation") -> None:
    verdict = "all outputs agree" if report.ok else f"{len(report.failures)} output(s) disagree"
    table = Table(title=f"{title}: {verdict}", title_justify="left")
    for column in ("provider", "output", "shape", "max abs err", "max rel err", "rtol / atol", "ok"):
        table.add_column(column, overflow="fold")
    for c in report.comparisons:
        table.add_row(
            c.provider.removesuffix("ExecutionProvider"), c.name, _shape(c.shape), f"{c.max_abs:.3g}",
            f"{c.max_rel:.3g}", f"{c.rtol:g} / {c.atol:g}", "yes" if c.ok else f"NO {c.note}".strip(),
        )  # fmt: skip
    out.print(table)


def report_written(validation: ValidationReport | None, title: str, output: object) -> int:
    """Show a command's proof (when it ran) and what it wrote; the exit code (1: the proof failed)."""
    if validation is not None:
        print_validation(validation, title)
        if not validation.ok:
            warn("validation failed; nothing was written")
            return EXIT_MISMATCH
    info(f"Wrote {output}")
    return 0


def write_json(path: str | os.PathLike, payload: object) -> None:
    """Write a machine-readable report (temp file + rename, so a reader never sees half a report)."""
    write_file(Path(path), (json.dumps(payload, indent=2, default=str) + "\n").encode(), "report")
