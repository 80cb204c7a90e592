"""How results look: rich tables and result lines on stdout, one-line errors and warnings on stderr,
progress bars while long steps run (only on a terminal).

rich is imported when a table or a bar is first drawn, never for ``--help`` or a one-line message. How
much is shown follows ``-q`` / ``-v`` (:func:`set_verbosity`): quiet keeps errors and each command's final
result line, verbose adds details (every skipped node, the time of each long step). ``NO_COLOR`` (any
non-empty value, https://no-color.org) removes all styling, not just colours.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_onnx.common.atomic import write_file
from lora_onnx.errors import EXIT_MISMATCH

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    from lora_onnx.commands.inspect import Inspection
    from lora_onnx.proofs.validation import ValidationReport
    from lora_onnx.sites.find import Skipped

QUIET, NORMAL, VERBOSE = -1, 0, 1
#: Table width when the output is not a terminal (CI logs, files), unless COLUMNS says otherwise.
PIPED_WIDTH = 100

_verbosity = NORMAL


def set_verbosity(level: int) -> None:
    """QUIET, NORMAL or VERBOSE for the messages that follow."""
    global _verbosity
    _verbosity = level


def verbosity() -> int:
    return _verbosity


def no_color() -> bool:
    return bool(os.environ.get("NO_COLOR"))


def console(stderr: bool = False) -> Console:
    """A rich console on stdout (or stderr): the terminal's width, or PIPED_WIDTH when piped."""
    from rich.console import Console

    # The stream is looked up at each write (no file=), so redirections made later still apply.
    stream = sys.stderr if stderr else sys.stdout
    width = None if stream.isatty() or os.environ.get("COLUMNS") else PIPED_WIDTH
    # color_system=None emits no escape codes at all: rich's own NO_COLOR handling drops colours but
    # keeps bold and italics.
    extra: dict[str, Any] = {"color_system": None} if no_color() else {}
    return Console(stderr=stderr, highlight=False, soft_wrap=True, width=width, **extra)


def _write(stream_name: str, message: str) -> None:
    # Plain text needs no rich; print looks the stream up now (a live progress display may have
    # redirected it above its bars).
    print(message, file=getattr(sys, stream_name), flush=True)


def error(message: str) -> None:
    """``lora-onnx: error: ...`` on stderr, always."""
    _write("stderr", f"lora-onnx: error: {message}")


def warn(message: str, always: bool = False) -> None:
    """``lora-onnx: warning: ...`` on stderr; quiet hides it unless ``always`` (a failed proof)."""
    if always or _verbosity > QUIET:
        _write("stderr", f"lora-onnx: warning: {message}")


def info(message: str) -> None:
    """A progress or summary line on stdout; quiet hides it."""
    if _verbosity > QUIET:
        _write("stdout", message)


def final(message: str) -> None:
    """A command's final result line (what it wrote, the verdict): shown even when quiet."""
    _write("stdout", message)


def print_table(table: Table) -> None:
    """A table on stdout; quiet hides it."""
    if _verbosity > QUIET:
        console().print(table)


def new_table(title: str) -> Table:
    from rich.table import Table

    return Table(title=title, title_justify="left")


def _shape(shape: Iterable[int]) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"


def _count(number: int) -> str:
    return f"{number:,}"


#: Skip reasons (a pattern of the message) -> what the nodes have in common, for the one-line summary.
_SKIP_KINDS = (
    (r"not a constant weight", "without a constant weight"),
    (r"inside a subgraph", "inside a subgraph"),
    (r"has no weight input", "without a weight input"),
    (r"the data input is a constant", "with a constant data input"),
    (r"the weight is the first input", "with the weight as first input (W @ x)"),
    (r"only 2-D weights", "with a weight that is not 2-D"),
    (r"\bis empty\b", "with an empty weight"),
    (r"passes Transpose", "with a weight behind a Transpose that is not a 2-D swap"),
    (r"not a multiple of the conv's group", "whose rank is not a multiple of the conv's group"),
)


def _skip_kind(reason: str) -> str:
    for pattern, kind in _SKIP_KINDS:
        if re.search(pattern, reason):
            return kind
    # Unknown reasons group by their wording, names left out: "input '…': rows mix across the batch".
    unnamed = re.sub(r"'[^']*'", "'…'", reason)
    return f"({unnamed})"


def _plural(op: str, count: int) -> str:
    if count == 1:
        return op
    return f"{op} nodes" if op.endswith("s") else f"{op}s"


def _where(paths: Iterable[str]) -> str:
    # model.layers.0.self_attn and model.layers.1.self_attn read as model.layers.*.self_attn
    places = sorted({re.sub(r"(?<=\.)\d+(?=\.|$)", "*", path) for path in paths if path})
    if not places:
        return ""
    if len(places) > 2:
        return f" (in {places[0]}, {places[1]} and {len(places) - 2} more)"
    return f" (in {' and '.join(places)})"


def skipped_summary(skipped: Iterable[Skipped]) -> str | None:
    """One line for the nodes that take no branch, grouped by op and reason (None when there are none)."""
    groups: dict[tuple[str, str], list[Skipped]] = {}
    for skip in skipped:
        groups.setdefault((skip.op, _skip_kind(skip.reason)), []).append(skip)
    if not groups:
        return None
    parts = [
        f"{len(rows)} {_plural(op, len(rows))} {kind}{_where(row.module_path for row in rows)}"
        for (op, kind), rows in groups.items()
    ]
    return f"{'; '.join(parts)}: not adapted (--verbose lists them)"


def _skipped_listing(rows: list[Skipped]) -> str:
    """Every skipped node: where it is on one line, why on the next.

    Not a box table: reasons are sentences naming tensors, and folded into a column of a 100-character
    table they take eight lines a node. Here each line is unbroken (a terminal wraps it, grep finds it).
    """
    width = min(max(len(skip.module_path) for skip in rows), 48)
    lines = [f"Skipped nodes ({len(rows)})"]
    for skip in rows:
        node = "" if skip.node == skip.module_path else f"  {skip.node}"
        lines.append(f"  {skip.module_path:<{width}}  {skip.op:<6}{node}".rstrip())
        lines.append(f"      {skip.reason}")
    return "\n".join(lines)


def print_skipped(skipped: Iterable[Skipped]) -> None:
    """The skipped nodes: one summary line, or every node and its reason with --verbose."""
    rows = list(skipped)
    if not rows:
        return
    if _verbosity >= VERBOSE:
        info(_skipped_listing(rows))
        return
    summary = skipped_summary(rows)
    if summary:
        info(summary)


def print_inspection(inspection: Inspection) -> None:
    # A and B shapes carry in / out; node, weight and layout are long or rarely what a reader looks for:
    # --verbose (and --json) show them.
    verbose = _verbosity >= VERBOSE
    table = new_table(f"LoRA sites ({len(inspection.sites)})")
    table.add_column("module path", no_wrap=True)  # whole: greppable, copyable into --target
    table.add_column("op")
    extra = ("node", "weight", "layout") if verbose else ()
    for column in extra:
        table.add_column(column, overflow="fold")
    for column in ("A shape", "B shape", "LoRA params"):
        table.add_column(column, justify="right", no_wrap=True)
    for row in inspection.sites:
        names = (row.node, row.weight, row.layout) if verbose else ()
        table.add_row(
            row.module_path, row.op, *names, _shape(row.a_shape), _shape(row.b_shape), _count(row.lora_params)
        )
    print_table(table)
    if inspection.skipped:  # inspect lists every skipped node: finding out why is what it is for
        info(_skipped_listing(list(inspection.skipped)))
    if inspection.branches:
        adapters = sorted({b.adapter for b in inspection.branches})
        info(f"Existing branches: {len(inspection.branches)} (adapters: {', '.join(adapters)})")
    final(
        f"Totals: {len(inspection.sites)} sites, {len(inspection.skipped)} skipped; "
        f"LoRA params {_count(inspection.lora_params)} = {inspection.lora_share:.3%} "
        f"of the base's {_count(inspection.base_params)}"
    )
    for message in inspection.warnings:
        warn(message)


def validation_verdict(report: ValidationReport, title: str = "Validation") -> str:
    verdict = "all outputs agree" if report.ok else f"{len(report.failures)} output(s) disagree"
    return f"{title}: {verdict}"


def print_validation(report: ValidationReport, title: str = "Validation") -> None:
    """The comparison table; quiet shows it only when some output disagrees."""
    table = new_table(validation_verdict(report, title))
    for column in ("provider", "output", "shape", "max abs err", "max rel err", "rtol / atol", "ok"):
        table.add_column(column, overflow="fold")
    notes: list[str] = []
    for c in report.comparisons:
        provider = c.provider.removesuffix("ExecutionProvider")
        verdict = "yes"
        if not c.ok:
            # The reason goes under the table in full: a narrow column would break its words (and a
            # hint such as --allow-nonfinite) across lines.
            verdict = "NO"
            if c.note:
                notes.append(
                    f"[{len(notes) + 1}] {c.provider.removesuffix('ExecutionProvider')} {c.name}: {c.note}"
                )
                verdict = f"NO [{len(notes)}]"
        table.add_row(
            provider, c.name, _shape(c.shape), f"{c.max_abs:.3g}",
            f"{c.max_rel:.3g}", f"{c.rtol:g} / {c.atol:g}", verdict,
        )  # fmt: skip
    if report.ok:
        print_table(table)
    else:
        console().print(table)
        for note in notes:
            _write("stdout", note)


def report_written(validation: ValidationReport | None, title: str, output: object) -> int:
    """Show a command's proof (when it ran) and what it wrote; the exit code (1: the proof failed)."""
    if validation is not None:
        print_validation(validation, title)
        if not validation.ok:
            warn("validation failed; nothing was written", always=True)
            return EXIT_MISMATCH
    final(f"Wrote {output}")
    return 0


def write_json(path: str | os.PathLike, payload: object) -> None:
    """Write a machine-readable report (temp file + rename, so a reader never sees half a report)."""
    write_file(Path(path), (json.dumps(payload, indent=2, default=str) + "\n").encode(), "report")


def _size(number: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if number < 1000 or unit == "GB":
            return f"{number:.0f} {unit}" if unit == "B" else f"{number:.1f} {unit}"
        number /= 1000
    return ""  # not reached


def _amount(done: float, total: float | None, unit: str) -> str:
    if unit == "bytes":
        return f"{_size(done)} / {_size(total)}" if total else _size(done)
    return f"{done:.0f}/{total:.0f}" if total else ""


class StepReporter:
    """The CLI's :class:`lora_onnx.common.progress.Reporter`: rich bars on an interactive stdout (one row per
    running step, removed when it ends) and, with --verbose, one line per finished step with its time."""

    def __init__(self, bars: bool, timings: bool) -> None:
        self._bars = bars
        self._timings = timings
        self._progress: Progress | None = None
        self._steps: dict[int, tuple[str, float, float | None, str]] = {}  # description, start, total, unit
        self._done: dict[int, float] = {}
        self._ids: dict[int, Any] = {}  # our step id -> rich's task id
        self._next = 0

    def _display(self) -> Progress:
        if self._progress is None:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[amount]}"))
            # stderr is moved above the bars only when it is a terminal too: a piped stderr keeps its lines.
            self._progress = Progress(
                *columns, TimeElapsedColumn(), console=console(), transient=True,
                redirect_stderr=sys.stderr.isatty(),
            )  # fmt: skip
            self._progress.start()
        return self._progress

    def start(self, description: str, total: float | None, unit: str = "") -> int:
        self._next += 1
        task = self._next
        self._steps[task] = (description, time.perf_counter(), total, unit)
        self._done[task] = 0
        if self._bars:
            display = self._display()
            self._ids[task] = display.add_task(description, total=total, amount=_amount(0, total, unit))
            display.refresh()  # drawn at once: a short step is still seen, not only after the next tick
        return task

    def advance(self, task: int, amount: float) -> None:
        if task not in self._ids or self._progress is None:
            return
        self._done[task] += amount
        _, _, total, unit = self._steps[task]
        self._progress.update(self._ids[task], advance=amount, amount=_amount(self._done[task], total, unit))

    def describe(self, task: int, description: str) -> None:
        if task in self._ids and self._progress is not None:
            self._progress.update(self._ids[task], description=description)

    def finish(self, task: int) -> None:
        description, began, _, _ = self._steps.pop(task)
        self._done.pop(task, None)
        if task in self._ids and self._progress is not None:
            self._progress.remove_task(self._ids.pop(task))
        if self._timings:
            # On stderr, like warnings (above the bars: the live display redirects a terminal's stderr).
            _write("stderr", f"{description}: {time.perf_counter() - began:.2f} s")

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


def _maybe_terminal() -> bool:
    # Checked before importing rich: rich also treats these variables as "a terminal".
    return sys.stdout.isatty() or any(os.environ.get(name) for name in ("TTY_COMPATIBLE", "TTY_INTERACTIVE"))


def step_reporter() -> StepReporter | None:
    """The reporter for this run: bars when stdout is an interactive terminal and not quiet, step times
    with --verbose; None (silence, and no rich import) otherwise."""
    timings = _verbosity >= VERBOSE
    bars = _verbosity > QUIET and _maybe_terminal() and console().is_interactive
    return StepReporter(bars, timings) if bars or timings else None
