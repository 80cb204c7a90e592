"""Options shared by several commands: the adapter recipe, validation settings."""

from __future__ import annotations

import argparse
from typing import Any

from lora_onnx.config import INIT_KINDS, LoraConfig
from lora_onnx.errors import LoraOnnxError
from lora_onnx.inputs import parse_dims
from lora_onnx.sites import OP_KEYS
from lora_onnx.targets import TargetSelector


def add_recipe_arguments(parser: argparse.ArgumentParser) -> None:
    """--rank, --alpha, --target... : a fresh adapter's recipe, with PEFT's meaning."""
    group = parser.add_argument_group("adapter recipe (PEFT semantics)")
    group.add_argument("--rank", "-r", type=int, default=8, help="LoRA rank r (default 8)")
    group.add_argument("--alpha", type=float, help="lora_alpha (default: the rank, so the scale is 1)")
    group.add_argument("--rslora", action="store_true", help="scale alpha/sqrt(r) instead of alpha/r")
    group.add_argument(
        "--target", nargs="+", action="extend", default=[], metavar="NAME",
        help="module names: a path equal to NAME or ending in .NAME (default: every supported site)",
    )  # fmt: skip
    group.add_argument("--target-regex", metavar="RE", help="a regex that must match the whole module path")
    group.add_argument(
        "--exclude", nargs="+", action="extend", default=[], metavar="NAME", help="names to leave out"
    )
    group.add_argument("--exclude-regex", metavar="RE", help="a regex of module paths to leave out")
    group.add_argument(
        "--rank-pattern", nargs="+", action="extend", default=[], metavar="KEY=R",
        help="per-module rank: the first KEY whose regex ends the module path wins",
    )  # fmt: skip
    group.add_argument(
        "--alpha-pattern", nargs="+", action="extend", default=[], metavar="KEY=A", help="per-module alpha"
    )
    group.add_argument(
        "--ops",
        default=",".join(OP_KEYS),
        help=f"op types to consider, comma separated (default {','.join(OP_KEYS)})",
    )
    group.add_argument(
        "--init", choices=INIT_KINDS, default="default", help="initialisation (default: B = 0)"
    )
    group.add_argument("--seed", type=int, default=0, help="random seed for A/B initialisation")
    group.add_argument("--name", default="default", help="adapter name (several adapters can share a model)")


def _pairs(items: list[str], flag: str, kind: type) -> dict[str, object]:
    pairs: dict[str, object] = {}
    for item in items:
        key, sep, value = item.rpartition("=")
        try:
            pairs[key] = kind(value)
        except ValueError:
            key = ""
        if not sep or not key:
            raise LoraOnnxError(f"{flag} takes KEY=VALUE, got {item!r}")
    return pairs


def config_from_args(args: argparse.Namespace) -> LoraConfig:
    targets = TargetSelector(
        names=tuple(args.target),
        regex=args.target_regex,
        exclude=tuple(args.exclude),
        exclude_regex=args.exclude_regex,
    )
    return LoraConfig(
        rank=args.rank,
        alpha=args.alpha,
        use_rslora=args.rslora,
        targets=targets,
        ops=frozenset(op.strip().lower() for op in args.ops.split(",") if op.strip()),
        init=args.init,
        seed=args.seed,
        rank_pattern=_pairs(args.rank_pattern, "--rank-pattern", int),  # type: ignore[arg-type]
        alpha_pattern=_pairs(args.alpha_pattern, "--alpha-pattern", float),  # type: ignore[arg-type]
        adapter_name=args.name,
    )


#: Where :class:`AdapterSourceAction` records (kind, value) pairs in the order they were given.
ADAPTER_SOURCES = "adapter_sources"


class AdapterSourceAction(argparse.Action):
    """An adapter option (``--peft DIR``, ``--adapter-file FILE``): stores its value like a plain option
    (the last one wins) and records ``(kind, value)`` in order, so ``inject --mixed`` can take several,
    mixed, in the order given (their stack index)."""

    def __init__(self, *args: Any, kind: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.kind = kind

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: object,
        option_string: str | None = None,
    ) -> None:
        setattr(namespace, self.dest, values)
        recorded = getattr(namespace, ADAPTER_SOURCES, None) or []
        setattr(namespace, ADAPTER_SOURCES, [*recorded, (self.kind, str(values))])


def adapter_sources(args: argparse.Namespace, kind: str | None = None) -> list[tuple[str, str]]:
    """The adapter options given, in order (only those of ``kind`` when given)."""
    return [(k, v) for k, v in getattr(args, ADAPTER_SOURCES, None) or () if kind is None or k == kind]


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """--providers and --dim: where and with which symbolic dims onnxruntime runs a validation."""
    parser.add_argument(
        "--providers", default="cpu", help="execution providers: cpu, cuda or cpu,cuda (default cpu)"
    )
    parser.add_argument(
        "--dim",
        nargs="+",
        action="extend",
        default=[],
        metavar="NAME=V",
        help="values for symbolic input dims",
    )


def dims_from_args(args: argparse.Namespace) -> dict[str, int]:
    """``--dim`` values; refused where no validation runs (they would be ignored without a word)."""
    if args.dim and getattr(args, "validate", True) is False:
        raise LoraOnnxError("--dim sets the symbolic dims of the --validate run's inputs; add --validate")
    return parse_dims(args.dim)
