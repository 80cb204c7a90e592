"""Entry point: parse, dispatch to a command module, turn user errors into one line and an exit code."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from lora_onnx import __version__
from lora_onnx.atomic import Terminated, discard_live, signals_as_exceptions
from lora_onnx.cli import batch, check_adapter, export_adapter, inject, inspect, merge, report, validate
from lora_onnx.cli.render import error, warn
from lora_onnx.errors import LoraOnnxError

#: Command modules; each has ``register(subparsers)`` which sets ``func`` (args -> exit code).
COMMANDS = (inject, merge, validate, inspect, export_adapter, check_adapter, batch, report)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
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
    # SIGTERM (timeout, a CI runner cancelling) and SIGHUP (a closed terminal) unwind like Ctrl-C: every
    # writer removes its temporary files on the way out, and the run ends with one line.
    with signals_as_exceptions():
        try:
            args = build_parser().parse_args(argv)
            if getattr(args, "copy_data", False):
                warn("--copy-data is the default now (data is cloned or copied; --link-data hard-links it)")
            return int(args.func(args))
        except LoraOnnxError as exc:
            error(str(exc))
            return exc.exit_code
        except KeyboardInterrupt:
            discard_live()
            error("interrupted; nothing was written")
            return 130
        except Terminated as exc:
            discard_live()
            error(f"stopped by {exc.name}; the output being written was not written")
            return 128 + exc.signum


if __name__ == "__main__":
    sys.exit(main())
