"""Entry point: parse, dispatch to a command module, turn user errors into one line and an exit code.

Command modules register their options with argparse and :mod:`lora_onnx.common.constants` only and import the
library inside their ``run``: ``--help``, ``--version`` and argument errors import neither onnx nor
onnxruntime, and each command imports what it uses.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import NoReturn

from lora_onnx import __version__
from lora_onnx.cli import (
    batch,
    check_adapter,
    export_adapter,
    inject,
    inspect,
    merge,
    render,
    report,
    validate,
)
from lora_onnx.cli.options import add_output_arguments, leaf_parsers, reclaim_positionals
from lora_onnx.common import progress
from lora_onnx.common.atomic import Terminated, discard_live, signals_as_exceptions
from lora_onnx.errors import EXIT_USAGE, LoraOnnxError

#: Command modules; each has ``register(subparsers)`` which sets ``func`` (args -> exit code).
COMMANDS = (inject, merge, validate, inspect, export_adapter, check_adapter, batch, report)


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one ``lora-onnx: error:`` line (exit 2) like every other user error,
    pointing to the command's --help instead of printing the whole usage block."""

    def error(self, message: str) -> NoReturn:
        command = self.prog.removeprefix("lora-onnx").strip()
        where = f"{command}: " if command else ""
        self.exit(EXIT_USAGE, f"lora-onnx: error: {where}{message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="lora-onnx",
        description="Add, apply, swap and fold LoRA adapters in ONNX models, proven in onnxruntime.",
        epilog="Exit codes: 0 success, 1 validation mismatch, 2 bad input or impossible request.",
    )
    parser.add_argument("--version", action="version", version=f"lora-onnx {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.register(subparsers)
    for leaf in leaf_parsers(parser):
        add_output_arguments(leaf)
    return parser


@contextmanager
def _progress_shown() -> Iterator[None]:
    """Show the library's long steps (bars on a terminal, times with -v) while a command runs."""
    reporter = render.step_reporter()
    try:
        with progress.reporting(reporter):
            yield
    finally:
        if reporter is not None:
            reporter.close()


def main(argv: Sequence[str] | None = None) -> int:
    # SIGTERM (timeout, a CI runner cancelling) and SIGHUP (a closed terminal) unwind like Ctrl-C: every
    # writer removes its temporary files on the way out, and the run ends with one line.
    with signals_as_exceptions():
        try:
            parser = build_parser()
            args = parser.parse_args(reclaim_positionals(parser, sys.argv[1:] if argv is None else argv))
            render.set_verbosity(args.verbosity)
            if getattr(args, "copy_data", False):
                render.warn("--copy-data is the default now (data is cloned or copied; --link-data links it)")
            with _progress_shown():
                return int(args.func(args))
        except LoraOnnxError as exc:
            render.error(str(exc))
            return exc.exit_code
        except KeyboardInterrupt:
            discard_live()
            render.error("interrupted; nothing was written")
            return 130
        except Terminated as exc:
            discard_live()
            render.error(f"stopped by {exc.name}; the output being written was not written")
            return 128 + exc.signum
        except BrokenPipeError:
            # The reader went away (lora-onnx inspect ... | head): stop quietly, as cat does; outputs are
            # written before the result lines, so nothing is half done.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 141


if __name__ == "__main__":
    sys.exit(main())
