"""Entry point: parse, dispatch to a command module, turn user errors into one line and an exit code."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import NoReturn

from lora_onnx import __version__
from lora_onnx.cli import batch, check_adapter, export_adapter, inject, inspect, merge, report, validate
from lora_onnx.cli.render import error
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except LoraOnnxError as exc:
        error(str(exc))
        return exc.exit_code
    except KeyboardInterrupt:
        error("interrupted; nothing was written")
        return 130


if __name__ == "__main__":
    sys.exit(main())
